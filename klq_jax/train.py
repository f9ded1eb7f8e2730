"""The trainer: KLQ and PPO over one rollout phase and one sharded, jitted update step.

One iteration (paper Algorithms 1 and 2; DESIGN.md's data flow)::

    prompts ─ sample(θ_old) ─ score (log π, log π_b, V, R_φ) ─ rewards ─ targets (fixed) ─┐
       epochs × shuffled minibatches × micro-batches of the algorithm's loss (one jit) ←──┘

:func:`make_update_fn` builds the whole update phase of an iteration as ONE ``jax.jit``: a
``lax.scan`` over epochs, each drawing a permutation of the rollout batch, a ``lax.scan`` over its
minibatches, and gradient accumulation over micro-batches (a ``lax.scan`` whose micro-batch losses
are weighted by their share of the minibatch's real tokens, so the accumulated gradient equals the
full-minibatch gradient of the Σ-over-tokens / Σ T loss of Algorithms 1-2). It runs sharded over a
``(data, fsdp, tensor)`` mesh (:mod:`klq_jax.sharding`) with the state donated.

:func:`train` is the only place with side effects: the prompt iterator, logging (JSONL,
TensorBoard, a progress bar), checkpoints (:mod:`klq_jax.checkpoint`) and resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from klq_jax import algorithms, rollout, sharding
from klq_jax.algorithms import AlgoConfig
from klq_jax.checkpoint import Checkpointer
from klq_jax.sampling import SamplingConfig
from klq_jax.tasks import Experiment, TaskConfig

Array = jax.Array


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser: AdamW with a learning-rate schedule and optional global-norm gradient clipping.

    Defaults and what the paper ran: the paper's TRL fork (PPOv2's loop: ``optimizer.step()``
    with no ``clip_grad_norm_``, an HF ``"linear"`` scheduler stepped once per iteration) does not
    clip gradients, and Table 2 lists none; the paper presets (:mod:`klq_jax.presets`) therefore
    set ``max_grad_norm=None`` and ``lr_schedule_unit="iteration"``. This class's own default
    ``max_grad_norm=1.0`` is a stabiliser for small, high-learning-rate runs (the tiny presets, the
    demo): it is active there (pre-clip norms of 6-70 on a tiny run), so it is not the paper's.

    Attributes:
      learning_rate: peak learning rate (paper Table 2: 1.41e-5).
      schedule: ``"linear"`` decay to ``end_lr_fraction × lr`` over the whole run (paper),
        ``"cosine"`` or ``"constant"``.
      lr_schedule_unit: what the schedule counts. ``"step"`` (default): optimiser steps, so the
        learning rate also decays inside an iteration's epochs × minibatches steps.
        ``"iteration"``: TRL's PPOv2, the rate is constant within an iteration and the schedule
        runs over the iterations, advanced *before* each iteration's updates as TRL calls
        ``lr_scheduler.step()`` at the top of its loop (iteration ``k = 1..N`` uses the schedule's
        value after ``k`` of ``N`` units: with ``"linear"`` to 0 the last iteration has rate 0).
        ``warmup_steps`` counts the same unit.
      warmup_steps: linear warm-up length (optimiser steps or iterations, see
        ``lr_schedule_unit``).
      end_lr_fraction: final learning rate as a fraction of the peak.
      b1, b2, eps: Adam's moments and epsilon.
      weight_decay: AdamW decoupled weight decay.
      max_grad_norm: clip the global gradient norm at this value (``None``: no clipping, the
        paper and TRL; default 1.0, see above).
    """

    learning_rate: float = 1.41e-5
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    lr_schedule_unit: Literal["step", "iteration"] = "step"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"OptimConfig.learning_rate={self.learning_rate} must be > 0")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"OptimConfig.schedule={self.schedule!r} must be 'linear', 'cosine' or 'constant'"
            )
        if self.lr_schedule_unit not in ("step", "iteration"):
            raise ValueError(
                f"OptimConfig.lr_schedule_unit={self.lr_schedule_unit!r} must be 'step' or 'iteration'"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"OptimConfig.max_grad_norm={self.max_grad_norm} must be > 0 or None")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One RLHF run: the task (models, prompts, reward), the algorithm and the schedule.

    Presets live in :mod:`klq_jax.presets`; every field can be overridden from the command line
    (``python -m klq_jax.train tiny-klq --algo.tau 0.1 --total-episodes 512``).

    Batch sizes are GLOBAL (all devices together). One iteration samples ``rollouts_per_batch``
    responses, then runs ``epochs`` passes of ``rollouts_per_batch // minibatch_size`` optimizer
    steps, each accumulating gradients over ``minibatch_size // micro_batch_size`` micro-batches.

    Attributes:
      task: models, prompts and reward (:class:`klq_jax.tasks.TaskConfig`).
      algo: KLQ / PPO hyperparameters (:class:`klq_jax.algorithms.AlgoConfig`).
      optim: optimiser and learning-rate schedule.
      mesh: device mesh sizes (data, fsdp, tensor); ``data=-1`` uses every remaining device.
      rollouts_per_batch: N, responses sampled per iteration (paper: 192).
      minibatch_size: B, rollouts per optimizer step (paper: 192).
      micro_batch_size: rows per forward/backward inside a minibatch (gradient accumulation).
      epochs: passes over each rollout batch (paper: 4).
      total_episodes: responses sampled over the whole run (paper: 75k).
      max_new_tokens: T_max, the response budget (TL;DR: 53).
      temperature: sampling temperature; log π and log π_b are taken at the same temperature.
      top_k: keep the k most likely tokens when sampling (0: off).
      top_p: nucleus sampling mass (1.0: off).
      omega: ω, the penalty subtracted from R_φ when a response has no stop token.
      score_micro_batch_size: rows per scoring forward (None: the whole batch).
      seed: seeds the prompt order, the sampler and the minibatch shuffles.
      out_dir: run directory (metrics.jsonl, samples.jsonl, tb/, checkpoints/, config.json).
      save_every: checkpoint every this many iterations (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      log_samples_every: log a few decoded samples every this many iterations (0: never).
      num_logged_samples: how many samples to log.
      resume: continue from the newest complete checkpoint in out_dir.
      progress: show a progress bar.
      tensorboard: write TensorBoard event files under out_dir/tb.
    """

    task: TaskConfig = TaskConfig()
    algo: AlgoConfig = AlgoConfig()
    optim: OptimConfig = OptimConfig()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    rollouts_per_batch: int = 192
    minibatch_size: int = 192
    micro_batch_size: int = 192
    epochs: int = 4
    total_episodes: int = 75_000
    max_new_tokens: int = 53
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    omega: float = 1.0
    score_micro_batch_size: int | None = None
    seed: int = 0
    out_dir: str = "runs/default"
    save_every: int = 50
    keep_checkpoints: int = 3
    log_samples_every: int = 10
    num_logged_samples: int = 4
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        p = []
        for name in ("rollouts_per_batch", "minibatch_size", "micro_batch_size", "epochs",
                     "total_episodes", "max_new_tokens", "save_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                p.append(f"{name}={getattr(self, name)} must be positive")
        if not p:
            if self.rollouts_per_batch % self.minibatch_size:
                p.append(
                    f"rollouts_per_batch={self.rollouts_per_batch} must be a multiple of "
                    f"minibatch_size={self.minibatch_size}"
                )
            if self.minibatch_size % self.micro_batch_size:
                p.append(
                    f"minibatch_size={self.minibatch_size} must be a multiple of "
                    f"micro_batch_size={self.micro_batch_size}"
                )
            if self.total_episodes < self.rollouts_per_batch:
                p.append(
                    f"total_episodes={self.total_episodes} is less than one batch of "
                    f"rollouts_per_batch={self.rollouts_per_batch}"
                )
        if self.temperature <= 0:
            p.append(f"temperature={self.temperature} must be > 0")
        if self.omega < 0:
            p.append(f"omega={self.omega} must be >= 0")
        if self.rollouts_per_batch % self.algo.whiten_groups:
            p.append(
                f"algo.whiten_groups={self.algo.whiten_groups} must divide "
                f"rollouts_per_batch={self.rollouts_per_batch}"
            )
        if p:
            raise ValueError("Invalid TrainConfig: " + "; ".join(p))

    @property
    def num_iterations(self) -> int:
        return self.total_episodes // self.rollouts_per_batch

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * (self.rollouts_per_batch // self.minibatch_size)

    def sampling_config(self, stop_token_ids=(0,), pad_token_id=0) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_token_ids=tuple(stop_token_ids),
            pad_token_id=pad_token_id,
        )


def make_optimizer(
    cfg: OptimConfig, total_steps: int, steps_per_iteration: int = 1
) -> tuple[optax.GradientTransformation, Callable]:
    """``(optimizer, schedule)``: clip-by-global-norm (unless ``max_grad_norm=None``), then AdamW.

    ``schedule(step)`` is the learning rate of optimiser step ``step`` (0-based) of
    ``total_steps``; with ``cfg.lr_schedule_unit="iteration"`` it is constant over each block of
    ``steps_per_iteration`` steps (see :class:`OptimConfig`).
    """
    per = max(int(steps_per_iteration), 1) if cfg.lr_schedule_unit == "iteration" else 1
    units = max(int(total_steps) // per, 1)
    base = _lr_schedule(cfg, units)
    if per == 1 and cfg.lr_schedule_unit == "step":
        schedule = base
    else:  # TRL: the scheduler is stepped at the start of each iteration, before its updates
        def schedule(count):
            return base(jnp.asarray(count) // per + 1)
    chain = []
    if cfg.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    chain.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*chain), schedule


def _lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable:
    """The optax schedule of ``cfg`` over ``total_steps`` units (warm-up included)."""
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_fraction)
    else:
        main = optax.constant_schedule(lr)
    if cfg.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, cfg.warmup_steps), main], [cfg.warmup_steps]
        )
    else:
        schedule = main
    return schedule


# ------------------------------------------------------------------------------------------
# State and the update step
# ------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything that changes during training (one pytree: sharded, donated, checkpointed).

    Attributes:
      params: the policy's ``nnx.State`` (LM head + value head).
      opt_state: optax state.
      step: ``[]`` int32 optimizer steps taken.
      key: ``[2]`` uint32 raw PRNG key data (``jax.random.key_data``).
    """

    params: Any
    opt_state: Any
    step: Array
    key: Array


ROLLOUT_KEYS = (
    "prompt_ids", "prompt_mask", "response_ids", "response_mask", "logp", "ref_logp", "values",
    "rewards",
)


def _global_norm(tree):
    norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm
    return norm(tree)


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def make_update_fn(
    graphdef: nnx.GraphDef,
    cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The update phase of one iteration as a pure function ``(state, batch) -> (state, metrics)``.

    ``batch`` holds the rollout (``ROLLOUT_KEYS``, ``[N, ...]`` with ``N = rollouts_per_batch``)
    plus the algorithm's fixed targets. ``metrics`` are float32 scalars averaged over every
    optimizer step of the iteration (plus ``grad_norm``). Not jitted: see :func:`jit_update_fn`.
    """
    algo = algorithms.get(cfg.algo.name)
    n, mb, mu = cfg.rollouts_per_batch, cfg.minibatch_size, cfg.micro_batch_size
    n_mb, n_micro = n // mb, mb // mu

    def micro_loss(params, micro, n_tokens_minibatch):
        logp, values = rollout.response_logprobs(
            graphdef,
            params,
            micro["prompt_ids"],
            micro["prompt_mask"],
            micro["response_ids"],
            micro["response_mask"],
            temperature=cfg.temperature,
        )
        loss, metrics = algo.loss(cfg.algo, logp, values, micro)
        # Share of the minibatch's real tokens: Σ_micro w·loss_micro = Σ tokens / Σ T (Alg. 1-2).
        w = micro["response_mask"].sum() / jnp.maximum(n_tokens_minibatch, 1.0)
        metrics = {k: v * w for k, v in metrics.items() if k != "num_tokens"}
        return loss * w, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        n_tok = minibatch["response_mask"].sum()
        micros = jax.tree_util.tree_map(
            lambda x: x.reshape((n_micro, mu) + x.shape[1:]), minibatch
        )

        def accumulate(acc, micro):
            (loss, metrics), grads = grad_fn(params, micro, n_tok)
            return _tree_add(acc, (loss, metrics, grads)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micros)
        (loss, metrics), grads = grad_fn(params, first, n_tok)
        if n_micro > 1:
            rest = jax.tree_util.tree_map(lambda x: x[1:], micros)
            (loss, metrics, grads), _ = jax.lax.scan(accumulate, (loss, metrics, grads), rest)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads))
        return (params, opt_state), metrics

    def epoch(carry, key):
        batch, params, opt_state = carry
        perm = jax.random.permutation(key, n)
        shuffled = jax.tree_util.tree_map(lambda x: jnp.take(x, perm, axis=0), batch)
        minibatches = jax.tree_util.tree_map(
            lambda x: x.reshape((n_mb, mb) + x.shape[1:]), shuffled
        )
        (params, opt_state), metrics = jax.lax.scan(minibatch_step, (params, opt_state), minibatches)
        return (batch, params, opt_state), metrics

    def update(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.wrap_key_data(state.key)
        key, *epoch_keys = jax.random.split(key, cfg.epochs + 1)
        (_, params, opt_state), metrics = jax.lax.scan(
            epoch, (batch, state.params, state.opt_state), jnp.stack(epoch_keys)
        )
        metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            step=state.step + cfg.steps_per_iteration,
            key=jax.random.key_data(key),
        )
        return new_state, metrics

    return update


def state_shardings(state: TrainState, mesh) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) :class:`TrainState`."""
    rep = sharding.replicated(mesh)
    return TrainState(
        params=sharding.param_shardings(state.params, mesh),
        opt_state=sharding.param_shardings(state.opt_state, mesh),
        step=rep,
        key=rep,
    )


def jit_update_fn(update, state_sh: TrainState, mesh):
    """``jax.jit`` of an update function with the state sharded/donated, batches data-sharded."""
    return jax.jit(
        update,
        in_shardings=(state_sh, sharding.batch_sharding(mesh, 2)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def init_state(params, optimizer, seed: int, mesh) -> tuple[TrainState, TrainState]:
    """Place ``params`` on the mesh and build the optimizer state sharded from the start.

    Returns ``(state, state_shardings)``. The optimizer state is created by a jitted ``init`` whose
    ``out_shardings`` come from ``jax.eval_shape`` of it, so nothing is materialised unsharded.
    """
    key_data = jax.random.key_data(jax.random.key(seed))
    abstract = jax.eval_shape(
        lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32), key_data), params
    )
    sh = state_shardings(abstract, mesh)
    # A fresh copy: the state is donated to the update, and the caller may keep using ``params``.
    params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=sh.params)(params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), sh.step),
        key=jax.device_put(key_data, sh.key),
    )
    return state, sh


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def rollout_metrics(ro: rollout.Rollout, tau: float) -> dict[str, float]:
    """Host-side statistics of one rollout batch (float Python numbers)."""
    mask = np.asarray(ro.response_mask, np.float64)
    logp = np.asarray(ro.logp, np.float64)
    ref = np.asarray(ro.ref_logp, np.float64)
    kl_seq = ((logp - ref) * mask).sum(1)
    rewards_seq = (np.asarray(ro.rewards, np.float64) * mask).sum(1)
    lengths = mask.sum(1)
    scores = np.asarray(ro.scores, np.float64)
    return {
        "score": float(scores.mean()),
        "reward": float(rewards_seq.mean()),
        "kl": float(kl_seq.mean()),
        "rlhf_reward": float((rewards_seq - tau * kl_seq).mean()),
        "entropy": float((-logp * mask).sum() / max(mask.sum(), 1.0)),
        "response_length": float(lengths.mean()),
        "truncated_frac": float(1.0 - np.asarray(ro.stopped, np.float64).mean()),
    }


TIMING_KEYS = (
    "time_sample", "time_score", "time_update", "time_iteration", "tokens_per_s", "wall_time",
)


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN/inf; the run stopped before writing a checkpoint."""


def _check_finite(metrics: dict, iteration: int):
    for k, v in metrics.items():
        if not math.isfinite(v):
            raise NonFiniteError(
                f"Iteration {iteration}: metric '{k}' is {v}. The run was stopped and no checkpoint "
                "was written for this iteration; lower the learning rate or check the reward. "
                "Resume from the last checkpoint with --resume."
            )


def _config_to_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


class _Logger:
    """JSONL + TensorBoard + samples file under the run directory."""

    def __init__(self, out_dir: str, done_iterations: int, tensorboard: bool):
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        # On resume, drop the lines of iterations after the checkpoint (they are run again) so the
        # file matches an uninterrupted run.
        for path in (self.metrics_path, self.samples_path):
            if os.path.exists(path):
                keep = []
                with open(path) as f:
                    for line in f:
                        try:
                            if json.loads(line)["iteration"] <= done_iterations:
                                keep.append(line)
                        except (ValueError, KeyError):
                            pass
                with open(path, "w") as f:
                    f.writelines(keep)
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, iteration: int, record: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, iteration)

    def samples(self, iteration: int, texts: list[dict]):
        with open(self.samples_path, "a") as f:
            for t in texts:
                f.write(json.dumps(dict(t, iteration=iteration)) + "\n")
        if self.tb is not None:
            body = "\n\n".join(f"**{t['prompt']}** → {t['response']} (score {t['score']:.3f})" for t in texts)
            self.tb.add_text("samples", body, iteration)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class TrainResult(NamedTuple):
    state: TrainState
    history: list[dict]
    graphdef: Any


def train(cfg: TrainConfig, exp: Experiment, *, mesh=None, on_iteration: Callable | None = None) -> TrainResult:
    """Run (or resume) KLQ / PPO training. See the module docstring.

    Writes ``metrics.jsonl``, ``samples.jsonl``, ``tb/``, ``checkpoints/``, ``config.json`` and,
    at the end, the trained policy (``policy/``, see :func:`export_policy`) under ``cfg.out_dir``.
    Returns the final state and the metrics of the iterations run now. ``exp.params`` is copied
    into the (donated) train state, so the caller's arrays stay valid.
    """
    sharding.initialize_distributed()
    mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
    dp = sharding.data_parallel_size(mesh)
    for name in ("rollouts_per_batch", "minibatch_size", "micro_batch_size"):
        if getattr(cfg, name) % dp:
            raise ValueError(
                f"{name}={getattr(cfg, name)} must be a multiple of the {dp} data-parallel devices "
                f"of the mesh {dict(mesh.shape)}."
            )
    algo = algorithms.get(cfg.algo.name)
    total_steps = cfg.num_iterations * cfg.steps_per_iteration
    optimizer, schedule = make_optimizer(cfg.optim, total_steps, cfg.steps_per_iteration)
    state, state_sh = init_state(exp.params, optimizer, cfg.seed, mesh)
    ref_graphdef = exp.ref_graphdef if exp.ref_graphdef is not None else exp.graphdef
    ref_params = exp.ref_params
    if ref_params is None:  # π_b = θ_0's policy, frozen (a copy: the state is donated)
        ref_params = jax.tree_util.tree_map(jnp.copy, state.params)
    else:
        ref_params = jax.device_put(ref_params, sharding.param_shardings(ref_params, mesh))

    update = jit_update_fn(make_update_fn(exp.graphdef, cfg, optimizer), state_sh, mesh)
    targets_fn = jax.jit(lambda e: algo.targets(cfg.algo, e))
    sampling_cfg = cfg.sampling_config(exp.stop_token_ids, exp.pad_token_id)

    ckpt = Checkpointer(os.path.join(cfg.out_dir, "checkpoints"), keep=cfg.keep_checkpoints)
    start = 0
    if cfg.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(None, state)
        start = int(meta["iteration"])
        exp.prompts.load_state_dict(meta["prompts"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(_config_to_json(cfg), f, indent=2)
    logger = _Logger(cfg.out_dir, start, cfg.tensorboard)

    history = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.num_iterations, initial=start, desc=f"{cfg.algo.name}", unit="it")
    t_run = time.perf_counter()
    try:
        for it in range(start, cfg.num_iterations):
            t0 = time.perf_counter()
            batch = next(exp.prompts)
            phase: dict[str, float] = {}
            key = jax.random.wrap_key_data(state.key)
            sample_key = jax.random.fold_in(key, 1_000_003)
            ro = rollout.make_rollout(
                exp.graphdef,
                state.params,
                ref_graphdef,
                ref_params,
                exp.reward_fn,
                jnp.asarray(batch["prompt_ids"]),
                jnp.asarray(batch["prompt_mask"]),
                sample_key,
                sampling_cfg,
                omega=cfg.omega,
                micro_batch_size=cfg.score_micro_batch_size,
                timings=phase,
            )
            exp_dict = {k: getattr(ro, k) for k in ROLLOUT_KEYS}
            jax.block_until_ready(exp_dict)
            t1 = time.perf_counter()
            exp_dict.update(targets_fn(exp_dict))
            exp_dict = sharding.shard_batch(exp_dict, mesh)
            state, upd = update(state, exp_dict)
            upd = {k: float(v) for k, v in jax.device_get(upd).items()}
            t2 = time.perf_counter()

            record = {"iteration": it + 1, "episodes": (it + 1) * cfg.rollouts_per_batch}
            record.update(rollout_metrics(ro, cfg.algo.tau))
            record.update({f"train/{k}": v for k, v in upd.items()})
            record["lr"] = float(schedule(int(state.step)))
            n_tokens = float(np.asarray(ro.response_mask).sum())
            record.update(
                time_sample=phase["sample"],
                time_score=phase["score"],
                time_update=t2 - t1,
                time_iteration=t2 - t0,
                tokens_per_s=n_tokens / max(t2 - t0, 1e-9),
                wall_time=time.perf_counter() - t_run,
            )
            _check_finite({k: v for k, v in record.items() if isinstance(v, float)}, it + 1)
            logger.log(it + 1, record)
            history.append(record)
            if cfg.log_samples_every and (it % cfg.log_samples_every == 0):
                logger.samples(it + 1, _sample_texts(exp, batch, ro, cfg.num_logged_samples))
            last = it + 1 == cfg.num_iterations
            if (it + 1) % cfg.save_every == 0 or last:
                meta = {
                    "iteration": it + 1,
                    "prompts": exp.prompts.state_dict(),
                    "config": _config_to_json(cfg),
                }
                ckpt.save(it + 1, state, meta)
            if bar is not None:
                bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
                bar.update(1)
            if on_iteration is not None:
                on_iteration(it + 1, record, state)
        if history and int(history[-1]["iteration"]) == cfg.num_iterations:
            export_policy(
                os.path.join(cfg.out_dir, "policy"), exp.graphdef, state.params,
                tokenizer=exp.tokenizer,
            )
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        ckpt.close()
    return TrainResult(state=state, history=history, graphdef=exp.graphdef)


def export_policy(path: str, graphdef, params, *, tokenizer=None) -> str:
    """Write a trained policy as a Hugging Face directory (value head beside it).

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it (config.json, safetensors,
    generation_config.json); the value head goes to ``value_head.safetensors``, which
    :func:`klq_jax.models.hf.load_hf` reads back with ``value_head=True``. With a separate critic
    (:class:`klq_jax.models.critic.PolicyWithCritic`) only the policy is written. A Hugging Face
    ``tokenizer``, if given, is saved with it and its bos/eos/pad ids go into the configs.
    :func:`train` calls this at the end of a run (``<out_dir>/policy``).
    """
    import tempfile

    from klq_jax.models import hf
    from klq_jax.models.critic import PolicyWithCritic

    model = nnx.merge(graphdef, params)
    if isinstance(model, PolicyWithCritic):
        model = model.policy
    _, policy_params = nnx.split(model, nnx.Param)
    policy_params = jax.device_get(policy_params)
    if tokenizer is None:
        hf.save_hf(path, model.config, policy_params, overwrite=True)
        return path
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        hf.save_hf(path, model.config, policy_params, tokenizer_dir=tok_dir, hf_config=ids, overwrite=True)
    return path


def _sample_texts(exp: Experiment, batch, ro, k: int) -> list[dict]:
    out = []
    ids = np.asarray(batch["prompt_ids"])
    pmask = np.asarray(batch["prompt_mask"]) > 0
    rids = np.asarray(ro.response_ids)
    rmask = np.asarray(ro.response_mask) > 0
    scores = np.asarray(ro.scores)
    for i in range(min(k, ids.shape[0])):
        p, r = ids[i][pmask[i]].tolist(), rids[i][rmask[i]].tolist()
        if exp.decode is not None:
            p, r = exp.decode(p), exp.decode(r)
        out.append({"prompt": str(p), "response": str(r), "score": float(scores[i])})
    return out


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """``<preset> [--field value ...]`` → a validated :class:`TrainConfig` (tyro-generated help).

    Nested fields are dotted: ``--algo.tau 0.1``, ``--task.policy path/to/hf_dir``,
    ``--optim.learning-rate 1e-5``, ``--mesh.fsdp 2``.
    """
    import sys

    import tyro

    from klq_jax import presets

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(
                "usage: python -m klq_jax.train PRESET [--field value ...]\n\n"
                "Presets: " + ", ".join(sorted(presets.PRESETS)) + "\n"
                "Run `python -m klq_jax.train PRESET --help` to list every field of a preset."
            )
            raise SystemExit(0)
        raise SystemExit(
            "error: name a preset first: python -m klq_jax.train PRESET [--field value ...]\n"
            "Presets: " + ", ".join(sorted(presets.PRESETS))
        )
    name, rest = argv[0], argv[1:]
    try:
        default = presets.get(name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return tyro.cli(TrainConfig, default=default, args=rest, prog=f"python -m klq_jax.train {name}")
    except ValueError as e:  # a config __post_init__ rejected the overrides
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> TrainResult:
    from klq_jax import tasks

    cfg = parse_args(argv)
    sharding.initialize_distributed()
    mesh = sharding.mesh_from_config(cfg.mesh)
    exp = tasks.build_experiment(
        cfg.task,
        batch_size=cfg.rollouts_per_batch,
        seed=cfg.seed,
        score_micro_batch_size=cfg.score_micro_batch_size,
        mesh=mesh,
    )
    result = train(cfg, exp, mesh=mesh)
    if result.history:
        last = result.history[-1]
        print(
            f"done: {len(result.history)} iterations, score {last['score']:.4f}, "
            f"KL {last['kl']:.4f}, RLHF reward {last['rlhf_reward']:.4f} -> {cfg.out_dir}"
        )
    return result


if __name__ == "__main__":
    # Re-import so every config class comes from ``klq_jax.train`` (not ``__main__``).
    from klq_jax import train as _train

    _train.main()
