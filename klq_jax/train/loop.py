"""The training loop: one rollout phase and one sharded, jitted update step per iteration.

One iteration (paper Algorithms 1 and 2; DESIGN.md's data flow)::

    prompts ─ sample(θ_old) ─ score (log π, log π_b, V, R_φ) ─ rewards ─ targets (fixed) ─┐
       epochs × shuffled minibatches × micro-batches of the algorithm's loss (one jit) ←──┘

The update is :mod:`klq_jax.train.step`. :func:`train` is the only place with side effects: the prompt iterator, logging (JSONL,
TensorBoard, a progress bar), checkpoints (:mod:`klq_jax.checkpoint`) and resume. The run
directory's rules (lock, resume/overwrite, resume compatibility, atomic rewrites, the log files)
are :mod:`klq_jax.train.run_dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax import algorithms, rollout, sampling, sharding
from klq_jax.rollout import rollout_metrics
from klq_jax.checkpoint import Checkpointer, nonfinite_leaves, params_fingerprint
from klq_jax.errors import MeshError, NonFiniteError
from klq_jax.config import TrainConfig
from klq_jax.train import run_dir
from klq_jax.train.optim import make_optimizer
from klq_jax.train.run_dir import config_to_json as _config_to_json
from klq_jax.train.step import TrainState, init_state, jit_update_fn, make_update_fn
from klq_jax.types import Rollout
from klq_jax.train import validation

Array = jax.Array




@dataclasses.dataclass
class Experiment:
    """What :func:`train` trains: the models, the prompts and the reward of one run.

    Experiment code builds it from a task config (``experiments/tasks.py``); library users build
    it from their own models, prompt iterator and reward function.

    Attributes:
      graphdef, params: the policy (with a value head); ``params`` become θ_0.
      reward_fn: ``(prompt_ids, prompt_mask, response_ids, response_mask) -> scores [B]`` (R_φ).
      prompts: an iterator with ``next()``, ``state_dict()``, ``load_state_dict()`` yielding
        ``{"prompt_ids": [B, Tq], "prompt_mask": [B, Tq], ...}`` (numpy, global batch).
      ref_graphdef, ref_params: the frozen reference policy π_b (default: a copy of θ_0).
      stop_token_ids, pad_token_id: for the sampler.
      decode: optional ``token ids -> str`` for logged samples.
      tokenizer: the policy's Hugging Face tokenizer (saved next to the exported policy at the
        end of training), or None.
      validation_prompts: held-out prompts (a :class:`klq_jax.data.PromptDataset`, disjoint from
        the training prompts) for ``TrainConfig.eval_every`` (:mod:`klq_jax.train.validation`).
    """

    graphdef: Any
    params: Any
    reward_fn: Callable
    prompts: Any
    ref_graphdef: Any = None
    ref_params: Any = None
    stop_token_ids: tuple[int, ...] = (0,)
    pad_token_id: int = 0
    decode: Callable | None = None
    tokenizer: Any = None
    validation_prompts: Any = None


# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def _targets_and_metrics(algo, algo_cfg, ro: Rollout):
    """The rollout's ``finish``: the update's :class:`Batch` with its targets, and the metrics."""
    return algo.targets(algo_cfg, ro.to_batch()), rollout_metrics(ro, algo_cfg.tau)


TIMING_KEYS = (
    "time_rollout", "time_reward", "time_update", "time_iteration", "tokens_per_s", "wall_time",
    "time_eval",
)


# Below this sampling temperature a non-finite metric is blamed on the temperature first: the
# log-probabilities are logits / T, so the KL estimates' exp(log-ratio) overflows float32
# (exp(88.7)) once the policy's and the reference's logits differ by 88.7·T (8.9 at T = 0.1, a
# change a learning rate can cause; 0.9 at T = 0.01, and float rounding at T = 1e-9).
LOW_TEMPERATURE = 0.1


def _check_finite(metrics: dict, iteration: int, params=None, temperature: float | None = None):
    bad_metrics = [k for k, v in metrics.items() if not math.isfinite(v)]
    if not bad_metrics:
        return
    k = bad_metrics[0]
    bad_weights = nonfinite_leaves(params) if params is not None else []
    weights = (
        f" and the update made the policy's weights NaN/inf ({', '.join(bad_weights[:3])}"
        f"{' …' if len(bad_weights) > 3 else ''})" if bad_weights else ""
    )
    if temperature is not None and temperature < LOW_TEMPERATURE:
        advice = (f"At --temperature {temperature:g} the log-probabilities are logits / {temperature:g}: a "
                  f"logit difference of {88.7 * temperature:.3g} between the policy and the reference "
                  "overflows the KL estimates. Raise --temperature (the paper samples at 0.7) or lower "
                  "the learning rate")
    else:
        advice = "Lower the learning rate or check the reward"
    raise NonFiniteError(
        f"Iteration {iteration}: metric '{k}' is {metrics[k]}{weights}. The run was stopped and no "
        f"checkpoint was written for this iteration. {advice}, "
        "and start again (--overwrite, or another --out-dir): --resume takes only the same config, "
        "which computes this iteration again."
    )


def _check_weights_finite(params, what: str):
    bad = nonfinite_leaves(params)
    if bad:
        raise NonFiniteError(
            f"{what} holds NaN/inf weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}): the "
            "checkpoint it came from is damaged. Re-convert or re-download it (or resume from an "
            "earlier checkpoint)."
        )


def count_without_timing(bar, seconds: float) -> None:
    """Count one step of the tqdm ``bar`` that took ``seconds`` without letting it enter the rate.

    An iteration that compiled takes far longer than the others: counting it like them would make
    the first ETAs wrong by the compile time. Its time is left out of the bar's elapsed time and
    rate (so the ETA is that of the iterations that run compiled programs).
    """
    bar.n += 1
    bar.initial += 1  # the rate counts from here, as for a resumed bar
    bar.start_t += seconds
    bar.last_print_n = bar.n
    bar.last_print_t = bar._time()
    bar.refresh()


class _SilentLogger:
    """The logger of processes other than 0 (they compute the same metrics and write nothing)."""

    def log(self, iteration: int, record: dict):
        pass

    def samples(self, iteration: int, texts: list[dict]):
        pass

    def close(self):
        pass


class TrainResult(NamedTuple):
    state: TrainState
    history: list[dict]
    graphdef: Any


def train(cfg: TrainConfig, experiment: Experiment, *, mesh=None, on_iteration: Callable | None = None) -> TrainResult:
    """Run (or resume) KLQ / PPO training. See the module docstring.

    Writes ``metrics.jsonl``, ``samples.jsonl``, ``tb/``, ``checkpoints/``, ``config.json`` and,
    to finish, the trained policy (``policy/``, see :func:`export_policy`) under ``cfg.out_dir``,
    which it owns while it runs (:mod:`klq_jax.train.run_dir`: lock, ``resume``/``overwrite``
    rules, resume compatibility, atomic rewrites). A resumed run whose iterations are all done only
    completes what is missing (the export). Returns the final state and the metrics of the
    iterations run now. ``experiment.params`` is copied into the (donated) train state, so the
    caller's arrays stay valid.

    Raises:
      klq_jax.errors.KLQError subclasses, each with a one-line message: RunDirError (and
      RunLockedError, RunExistsError, NoCheckpointError), ResumeConfigError, CheckpointError,
      MeshError, NonFiniteError.
    """
    sharding.initialize_distributed()
    mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
    check_batch_sizes(cfg, mesh)
    _check_before_starting(cfg, experiment)
    run = run_dir.RunDir.open(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                              allow_fresh=cfg.allow_fresh, owner=jax.process_index() == 0)
    try:
        return _train_in(cfg, experiment, mesh, on_iteration)
    except BaseException:
        run.discard_if_new()
        raise
    finally:
        run.close()


def check_batch_sizes(cfg: TrainConfig, mesh) -> None:
    """Every global batch size splits evenly over the mesh's ``data × fsdp`` devices (each holds
    its own rows): rollouts_per_batch, minibatch_size, micro_batch_size, eval_batch_size. Raises
    MeshError naming the field and a value that would do."""
    dp = sharding.data_parallel_size(mesh)
    for name in ("rollouts_per_batch", "minibatch_size", "micro_batch_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if value is not None and value % dp:
            raise MeshError(
                f"{name}={value} must be a multiple of the {dp} data-parallel devices of the mesh "
                f"{dict(mesh.shape)}: set --{name.replace('_', '-')} to a multiple of {dp} (e.g. "
                f"{math.lcm(value, dp)}; each batch size must still divide the one above it), or "
                "take devices out of the data split with --mesh.tensor."
            )


def _check_before_starting(cfg: TrainConfig, experiment: Experiment) -> None:
    """What can be checked before the run directory is created, so that a refused run leaves
    nothing behind: the models' weights are finite, the policy can sample this run's
    responses (an LM head, stop/pad ids in its vocabulary, prompts + max_new_tokens within its
    positions)."""
    _check_weights_finite(experiment.params, "The initial policy")
    if experiment.ref_params is not None:
        _check_weights_finite(experiment.ref_params, "The reference policy")
    scfg = cfg.sampling_config(experiment.stop_token_ids, experiment.pad_token_id)
    model_cfg = nnx.merge(experiment.graphdef, experiment.params).config
    prompts = [getattr(experiment.prompts, "dataset", None)]
    if cfg.eval_every:
        prompts.append(experiment.validation_prompts)
    widths = [getattr(p, "width", None) for p in prompts if p is not None]
    sampling.check_model_for_sampling(model_cfg, scfg, max((w for w in widths if w is not None), default=None))


def _restore_or_start(cfg: TrainConfig, experiment: Experiment, ckpt: Checkpointer, state, models: dict):
    """``(start_iteration, state)``: the newest checkpoint that restores (``cfg.resume``), checked
    against ``cfg`` field by field and against the fingerprints of the ``models`` loaded now, or
    the fresh state."""
    if not cfg.resume:
        return 0, state
    if not ckpt.all_steps():  # run_dir allowed it: allow_fresh
        saved = os.path.join(cfg.out_dir, "config.json")
        if os.path.exists(saved):
            with open(saved) as f:
                run_dir.check_resume_config(json.load(f), cfg, where=saved)
        return 0, state
    step, state, meta, skipped = ckpt.restore_newest(
        state,
        check_meta=lambda s, m: run_dir.check_resume_config(
            m.get("config"), cfg, where=f"checkpoint {s} in {cfg.out_dir}"
        ),
        required_meta={"prompts": dict},
    )
    if skipped:
        logging.getLogger(__name__).warning(
            "Resumed from checkpoint %d; skipped damaged checkpoints %s", step,
            "; ".join(f"{s} ({r})" for s, r in skipped),
        )
    # after the shape check of restore_newest (another model size is named by its parameters)
    run_dir.check_resume_models(meta.get("models"), models, where=f"checkpoint {step} in {cfg.out_dir}")
    _check_weights_finite(state.params, f"Checkpoint {step} in {cfg.out_dir}")
    experiment.prompts.load_state_dict(meta["prompts"])
    return int(meta["iteration"]), state


def _finish(cfg: TrainConfig, experiment: Experiment, params) -> str:
    """Export ``policy/`` unless it is there: the export writes a temporary sibling and renames it
    into place only when complete (:class:`klq_jax.models.hf.files.AtomicDir`, which also removes
    what a killed export left), so an existing ``policy/`` is a complete one. (Multi-process: every
    process takes part in the export; the run directory is on a file system they share.)"""
    final = os.path.join(cfg.out_dir, "policy")
    if os.path.isdir(final):
        return final
    run_dir.phase("export", cfg.num_iterations)
    export_policy(final, experiment.graphdef, params, tokenizer=experiment.tokenizer)
    run_dir.phase("export-written", cfg.num_iterations)
    return final


def _train_in(cfg: TrainConfig, experiment: Experiment, mesh, on_iteration) -> TrainResult:
    algo = algorithms.get(cfg.algo.name)
    total_steps = cfg.num_iterations * cfg.steps_per_iteration
    optimizer, schedule = make_optimizer(cfg.optim, total_steps, cfg.steps_per_iteration)
    state, state_sh = init_state(experiment.params, optimizer, cfg.seed, mesh)
    note = sharding.replication_note(experiment.params, mesh)
    if note and jax.process_index() == 0:  # what the mesh leaves whole on every device, said once
        logging.getLogger(__name__).warning("Policy: %s", note)
    ref_graphdef = experiment.ref_graphdef if experiment.ref_graphdef is not None else experiment.graphdef
    ref_params = experiment.ref_params
    if ref_params is None:  # π_b = θ_0's policy, frozen (a copy: the state is donated)
        ref_params = jax.tree_util.tree_map(jnp.copy, state.params)
    else:
        ref_params = jax.device_put(ref_params, sharding.param_shardings(ref_params, mesh))
    # What the checkpoints record of θ_0 and π_b: a resume refuses other weights under the same paths.
    models = {"policy": params_fingerprint(state.params), "reference": params_fingerprint(ref_params)}

    update = jit_update_fn(make_update_fn(experiment.graphdef, cfg, optimizer), state_sh, mesh)
    # Computed inside the rollout's compiled program (one object: a static argument of that jit).
    finish = functools.partial(_targets_and_metrics, algo, cfg.algo)
    sampling_cfg = cfg.sampling_config(experiment.stop_token_ids, experiment.pad_token_id)

    def run_rollout(params, prompt_ids, prompt_mask, key, scfg, timings=None, finish=None):
        """The experience phase with this run's models, reward and ω (training and validation),
        batch-sharded on the mesh (:func:`klq_jax.rollout.make_rollout`)."""
        return rollout.make_rollout(
            experiment.graphdef, params, ref_graphdef, ref_params, experiment.reward_fn,
            prompt_ids, prompt_mask, key, scfg, omega=cfg.omega,
            micro_batch_size=cfg.score_micro_batch_size, timings=timings, mesh=mesh, finish=finish,
            logp_from_sampler=cfg.logp_from_sampler,
        )

    validator = _make_validator(cfg, experiment, run_rollout, sampling_config=sampling_cfg)

    ckpt = Checkpointer(os.path.join(cfg.out_dir, "checkpoints"), keep=cfg.keep_checkpoints)
    # Multi-process runs: every process runs the same program; process 0 alone writes the files.
    primary = jax.process_index() == 0
    logger = None
    history = []
    bar = None
    try:
        start, state = _restore_or_start(cfg, experiment, ckpt, state, models)
        if primary:
            run_dir.atomic_write(
                os.path.join(cfg.out_dir, "config.json"), json.dumps(_config_to_json(cfg), indent=2)
            )
        left = start < cfg.num_iterations  # --resume of a finished run: no events file, no bar
        logger = run_dir.RunLogger(cfg.out_dir, start, cfg.tensorboard and left) if primary else _SilentLogger()
        if cfg.progress and primary and left:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.num_iterations, initial=start, desc=f"{cfg.algo.name}", unit="it")
        t_run = time.perf_counter()
        seen_shapes = set()  # prompt-batch shapes compiled for: a new one compiles every program
        for it in range(start, cfg.num_iterations):
            t0 = time.perf_counter()
            run_dir.phase("sample", it + 1)
            batch = next(experiment.prompts)
            compiling = np.shape(batch["prompt_ids"]) not in seen_shapes
            if compiling:
                seen_shapes.add(np.shape(batch["prompt_ids"]))
                notice = (
                    f"compiling the sampler, scoring and update step for prompts of shape "
                    f"{list(np.shape(batch['prompt_ids']))} (once per shape; not counted in "
                    "the ETA)…"
                )
                if bar is not None:
                    bar.write(notice, file=sys.stderr)
                elif jax.process_index() == 0:
                    print(notice, file=sys.stderr, flush=True)
            phase: dict[str, float] = {}
            key = jax.random.wrap_key_data(state.key)
            sample_key = jax.random.fold_in(key, 1_000_003)
            # This process's rows of the prompts, placed batch-sharded on the mesh; every device
            # samples and scores only its own rows; targets and metrics in the same program.
            ro, (train_batch, ro_metrics) = run_rollout(
                state.params,
                batch["prompt_ids"],
                batch["prompt_mask"],
                sample_key,
                sampling_cfg,
                timings=phase,
                finish=finish,
            )
            t1 = time.perf_counter()
            run_dir.phase("update", it + 1)
            state, upd = update(state, train_batch)
            upd = {k: float(v) for k, v in jax.device_get(upd).items()}
            t2 = time.perf_counter()

            record = {"iteration": it + 1, "episodes": (it + 1) * cfg.rollouts_per_batch}
            record.update({k: float(v) for k, v in jax.device_get(ro_metrics).items()})
            record.update({f"train/{k}": v for k, v in upd.items()})
            record["lr"] = float(schedule(int(state.step)))
            n_tokens = record["response_length"] * cfg.rollouts_per_batch
            last = it + 1 == cfg.num_iterations
            if validator is not None and ((it + 1) % cfg.eval_every == 0 or last):
                t_eval = time.perf_counter()
                record.update(_validate(validator, state.params, cfg, it + 1, last))
                record["time_eval"] = time.perf_counter() - t_eval
            record.update(
                time_rollout=phase["rollout"],
                time_reward=phase["reward"],
                time_update=t2 - t1,
                time_iteration=t2 - t0,
                tokens_per_s=n_tokens / max(t2 - t0, 1e-9),
                wall_time=time.perf_counter() - t_run,
            )
            _check_finite({k: v for k, v in record.items() if isinstance(v, float)}, it + 1, state.params,
                          cfg.temperature)
            run_dir.phase("log", it + 1)
            logger.log(it + 1, record)
            history.append(record)
            if cfg.log_samples_every and (it % cfg.log_samples_every == 0):
                texts = _sample_texts(experiment, batch, ro, cfg.num_logged_samples, mesh)
                logger.samples(it + 1, texts)
            if (it + 1) % cfg.save_every == 0 or last:
                meta = {
                    "iteration": it + 1,
                    "prompts": experiment.prompts.state_dict(),
                    "config": _config_to_json(cfg),
                    "models": models,
                }
                run_dir.phase("checkpoint", it + 1)
                ckpt.save(it + 1, state, meta, wait=False)  # written while the next iteration runs
                run_dir.phase("checkpoint-done", it + 1)
            if bar is not None:
                bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", refresh=False)
                if compiling:
                    count_without_timing(bar, time.perf_counter() - t0)
                else:
                    bar.update(1)
            if on_iteration is not None:
                on_iteration(it + 1, record, state)
        ckpt.finish_pending()  # the last checkpoint is written before the run counts as finished
        _finish(cfg, experiment, state.params)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        ckpt.close()
    return TrainResult(state=state, history=history, graphdef=experiment.graphdef)


def _make_validator(cfg: TrainConfig, experiment: Experiment, run_rollout, *, sampling_config):
    """The validation hook of :func:`train` (None when ``cfg.eval_every == 0``): a
    :class:`klq_jax.train.validation.Validator` over the training rollout function ``run_rollout``."""
    if not cfg.eval_every:
        return None
    if experiment.validation_prompts is None:
        raise ValueError(
            f"eval_every={cfg.eval_every} needs held-out prompts, and the experiment has none: set "
            "Experiment.validation_prompts (klq train builds them from the task), or eval_every=0."
        )
    prompts = experiment.validation_prompts
    if len(prompts) > cfg.eval_prompts:
        prompts = prompts.select(np.arange(cfg.eval_prompts))
    return validation.Validator(
        run_rollout, prompts, sampling_config, tau=cfg.algo.tau,
        batch_size=cfg.eval_batch_size or cfg.rollouts_per_batch, modes=cfg.eval_modes,
        seed=cfg.eval_seed, decode=experiment.decode,
    )


def _validate(validator, params, cfg: TrainConfig, iteration: int, last: bool) -> dict[str, float]:
    """Validate the current policy; the final validation also writes ``eval/completions.jsonl``."""
    res = validator(params)
    if last and jax.process_index() == 0:
        validation.write_completions(
            os.path.join(cfg.out_dir, "eval", "completions.jsonl"), res.completions, iteration=iteration
        )
    return res.metrics


def export_policy(path: str, graphdef, params, *, tokenizer=None) -> str:
    """Write a trained policy as a Hugging Face directory (value head beside it).

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it (config.json, safetensors,
    generation_config.json); the value head goes to ``value_head.safetensors``, which
    :func:`klq_jax.models.hf.load_hf` reads back with ``value_head=True``. With a separate critic
    (:class:`klq_jax.models.critic.PolicyWithCritic`) only the policy is written. A Hugging Face
    ``tokenizer``, if given, is saved with it and its bos/eos/pad ids go into the configs.
    :func:`train` calls this at the end of a run (``<out_dir>/policy``). In a multi-process run
    every process must call it (the parameters are gathered); process 0 writes.
    """
    import tempfile

    from klq_jax.models import hf
    from klq_jax.models.critic import PolicyWithCritic

    model = nnx.merge(graphdef, params)
    if isinstance(model, PolicyWithCritic):
        model = model.policy
    _, policy_params = nnx.split(model, nnx.Param)
    if jax.process_count() > 1:  # collective: every process takes part, process 0 writes
        from jax.experimental import multihost_utils

        policy_params = multihost_utils.process_allgather(policy_params, tiled=True)
        if jax.process_index() != 0:
            return path
    policy_params = jax.device_get(policy_params)
    if tokenizer is None:
        hf.save_hf(path, model.config, policy_params, overwrite=True)
        return path
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        hf.save_hf(path, model.config, policy_params, tokenizer_dir=tok_dir, hf_config=ids, overwrite=True)
    return path


def _sample_texts(experiment: Experiment, batch, ro, k: int, mesh) -> list[dict]:
    """The first ``k`` rows of this process's slice of the batch, decoded."""
    out = []
    ids = np.asarray(batch["prompt_ids"])
    pmask = np.asarray(batch["prompt_mask"]) > 0
    rids, rmask, scores = sharding.process_rows((ro.response_ids, ro.response_mask, ro.scores), mesh)
    rmask = rmask > 0
    for i in range(min(k, ids.shape[0])):
        p, r = ids[i][pmask[i]].tolist(), rids[i][rmask[i]].tolist()
        if experiment.decode is not None:
            p, r = experiment.decode(p), experiment.decode(r)
        out.append({"prompt": str(p), "response": str(r), "score": float(scores[i])})
    return out
