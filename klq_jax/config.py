"""The configuration dataclasses of a run: algorithm, optimiser, mesh and schedule.

Plain Python (no JAX import), so that command-line help, presets and recorded config files load in
a fraction of a second. Their docstrings are the command-line help of ``klq train``: write them
as plain text (no reStructuredText roles or double backquotes; tests/test_cli.py checks).

* AlgoConfig — KLQ / PPO hyperparameters (used by :mod:`klq_jax.algorithms`);
* OptimConfig — AdamW and its learning-rate schedule (:func:`klq_jax.train.make_optimizer`);
* MeshConfig — the device mesh (:func:`klq_jax.sharding.mesh_from_config`);
* TrainConfig — everything the trainer (:func:`klq_jax.train.train`) needs besides the models,
  prompts and reward; experiment code adds the task on top (``experiments.tasks.RunConfig``).

Example::

    >>> from klq_jax.config import AlgoConfig, TrainConfig
    >>> cfg = TrainConfig(algo=AlgoConfig(name="ppo"), rollouts_per_batch=8, minibatch_size=4,
    ...                   micro_batch_size=2, total_episodes=32)
    >>> cfg.num_iterations, cfg.steps_per_iteration
    (4, 8)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from typing import Any, Literal

from klq_jax.errors import ConfigError

ALGORITHMS_NAMES = ("klq", "ppo")


def range_problems(name: str, value: Any, low: float, high: float | None = None, *,
                   low_open: bool = False, high_open: bool = False, integer: bool = False,
                   none_ok: bool = False, note: str = "") -> list[str]:
    """The phrase for a number field outside its range (empty: inside), for a config's one-line
    ``Invalid <Config>: ...; ...`` error: the one range check of every config here.

    The range is ``[low, high]`` (``high=None``: no upper bound; ``low_open`` / ``high_open``
    exclude the ends); ``integer``: an int (not a bool); ``none_ok``: None is allowed too; ``note``
    is added in parentheses. NaN and +-inf are outside every range, by name (a check written as
    ``x < 0`` lets NaN through: NaN compares False with everything).

    Example::

        >>> range_problems("tau", 0.05, 0)
        []
        >>> range_problems("tau", float("nan"), 0) + range_problems("b1", 1.5, 0, 1, high_open=True)
        ['tau=nan must be a finite number >= 0', 'b1=1.5 must be in [0, 1)']
        >>> range_problems("top_k", -1, 0, integer=True, note="0 turns it off")
        ['top_k=-1 must be an integer >= 0 (0 turns it off)']
    """
    if none_ok and value is None:
        return []
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if ok and not integer:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int beyond float range (a JSON 1e400 written out as digits)
            ok = False
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    if ok:
        return []
    if high is None:
        what = f"{'an integer' if integer else 'a finite number'} {'>' if low_open else '>='} {low}"
    else:
        what = (f"{'an integer ' if integer else ''}in {'(' if low_open else '['}{low}, {high}"
                f"{')' if high_open else ']'}")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:24] + "…"
    return [f"{name}={shown} must be {what}{' or None' if none_ok else ''}" + (f" ({note})" if note else "")]


def sampling_problems(temperature: Any, top_k: Any, top_p: Any) -> list[str]:
    """What is wrong with these sampling settings (empty: nothing), one phrase each.

    The one check of both :class:`TrainConfig` (at parse time) and
    :class:`klq_jax.sampling.SamplingConfig`.

    Example::

        >>> sampling_problems(0.7, 0, 1.0)
        []
        >>> sampling_problems(0.0, -1, 1.5)  # doctest: +NORMALIZE_WHITESPACE
        ['temperature=0.0 must be a finite number > 0', 'top_k=-1 must be an integer >= 0 (0 turns
        it off)', 'top_p=1.5 must be in (0, 1] (1.0 turns it off)']
    """
    return (range_problems("temperature", temperature, 0, low_open=True)
            + range_problems("top_k", top_k, 0, integer=True, note="0 turns it off")
            + range_problems("top_p", top_p, 0, 1, low_open=True, note="1.0 turns it off"))


# The largest seed + 1: jax.random.key takes a signed 64-bit integer.
SEED_LIMIT = 2**63


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """KLQ / PPO hyperparameters (KLQ: Algorithm 2, PPO: Algorithm 1; defaults: paper Table 2 + TRL).

    Attributes:
      name: the algorithm, klq or ppo.
      tau: KL coefficient τ (both algorithms; paper: 0.05). KLQ needs τ > 0 (with
        Q = τ·log(π/π_b) + V the policy gets no gradient at τ = 0); PPO takes τ >= 0.
      gamma: discount γ (paper: 1).
      lam: λ of the λ-returns / GAE (paper: 0.95).
      alpha: KLQ's conservativeness α of Eq. (7) (paper experiments: 1).
      clip_eps: PPO ratio clip ε (TRL: 0.2).
      value_clip: PPO value clip η (TRL: 0.2); None disables it.
      vf_coef: PPO value-loss coefficient ζ (TRL: 0.1).
      whiten_advantages: masked whitening of GAE advantages (TRL: on; Algorithm 1: off), over
        the global rollout batch.
      whiten_groups: whiten G equal contiguous row groups separately (the data-parallel shards);
        TRL whitens per process, i.e. G = its number of GPUs (the paper: 4). 1: the global batch.
      value_target: trl (advantages + old values) or mc (Algorithm 1's Monte-Carlo sum).
      half_value_loss: the 1/2 in TRL's value loss (Algorithm 1 has none).
    """

    name: Literal["klq", "ppo"] = "klq"
    tau: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    alpha: float = 1.0
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    whiten_groups: int = 1
    value_target: Literal["trl", "mc"] = "trl"
    half_value_loss: bool = True

    def __post_init__(self):
        problems = []
        if self.name not in ALGORITHMS_NAMES:
            problems.append(f"name={self.name!r} is not one of {ALGORITHMS_NAMES}")
        problems += range_problems("tau", self.tau, 0) or (range_problems(
            "tau", self.tau, 0, low_open=True,
            note="KLQ's Q = tau*log(pi/pi_b) + V gives the policy no gradient at tau = 0; "
                 "for no KL penalty use name='ppo' with tau=0") if self.name == "klq" else [])
        problems += range_problems("gamma", self.gamma, 0, 1)
        problems += range_problems("lam", self.lam, 0, 1)
        problems += range_problems("alpha", self.alpha, 0, 1, low_open=True)
        problems += range_problems("clip_eps", self.clip_eps, 0, low_open=True)
        problems += range_problems("value_clip", self.value_clip, 0, low_open=True, none_ok=True)
        # PPO's ζ (KLQ does not use it). 0 is allowed, an ablation: the policy still trains, on
        # advantages from a value head / critic that no longer learns; < 0 maximises the value error.
        problems += range_problems("vf_coef", self.vf_coef, 0)
        problems += range_problems("whiten_groups", self.whiten_groups, 1, integer=True)
        if self.value_target not in ("trl", "mc"):
            problems.append(f"value_target={self.value_target!r} must be 'trl' or 'mc'")
        if problems:
            raise ConfigError("Invalid AlgoConfig: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser: AdamW with a learning-rate schedule and optional global-norm gradient clipping.

    What the paper ran: its TRL fork (PPOv2's loop: no clip_grad_norm_, an HF linear scheduler
    stepped once per iteration) does not clip gradients, and Table 2 lists none; the paper presets
    therefore set max_grad_norm=None and lr_schedule_unit=iteration. This class's own default
    max_grad_norm=1.0 is a stabiliser for small, high-learning-rate runs (the tiny presets, the
    demo; pre-clip norms of 6-70 on a tiny run), not the paper's setting.

    Attributes:
      learning_rate: peak learning rate (paper Table 2: 1.41e-5).
      schedule: linear decay to end_lr_fraction x learning_rate over the whole run (paper),
        cosine, or constant.
      lr_schedule_unit: what the schedule counts. step: optimiser steps, so the learning rate also
        decays inside an iteration's epochs x minibatches steps. iteration: TRL's PPOv2, constant
        within an iteration and advanced before each iteration's updates (iteration k = 1..N uses
        the schedule's value after k of N units: with linear decay to 0 the last iteration has
        rate 0). warmup_steps counts the same unit.
      warmup_steps: linear warm-up length (optimiser steps or iterations, see lr_schedule_unit).
      end_lr_fraction: final learning rate as a fraction of the peak.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: AdamW decoupled weight decay.
      max_grad_norm: clip the global gradient norm at this value (None: no clipping, as the paper
        and TRL; the default 1.0 stabilises small, high-learning-rate runs).
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
        p = range_problems("learning_rate", self.learning_rate, 0, low_open=True)
        if self.schedule not in ("linear", "cosine", "constant"):
            p.append(f"schedule={self.schedule!r} must be 'linear', 'cosine' or 'constant'")
        if self.lr_schedule_unit not in ("step", "iteration"):
            p.append(f"lr_schedule_unit={self.lr_schedule_unit!r} must be 'step' or 'iteration'")
        p += range_problems("warmup_steps", self.warmup_steps, 0, integer=True)
        p += range_problems("end_lr_fraction", self.end_lr_fraction, 0, 1,
                            note="the final learning rate as a fraction of the peak: a decay")
        # b1 = 1 or b2 = 1: Adam's bias correction divides by 1 - b^t = 0.
        p += range_problems("b1", self.b1, 0, 1, high_open=True)
        p += range_problems("b2", self.b2, 0, 1, high_open=True)
        # eps = 0, which optax allows, divides 0 by 0 for a parameter whose gradient is exactly 0
        # (e.g. the embedding rows of tokens not in the batch): NaN weights.
        p += range_problems("eps", self.eps, 0, low_open=True,
                            note="0 turns a parameter with a zero gradient into NaN")
        p += range_problems("weight_decay", self.weight_decay, 0)
        p += range_problems("max_grad_norm", self.max_grad_norm, 0, low_open=True, none_ok=True)
        if p:
            raise ConfigError("Invalid OptimConfig: " + "; ".join(p))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; their product is the device count (data=-1: every remaining device).

    Attributes:
      data: data-parallel size (parameters replicated); -1 fills in the devices left over.
      fsdp: data-parallel size with parameters and optimiser state sharded (ZeRO-3 style).
      tensor: tensor-parallel size (heads, MLP width, vocabulary).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        p = [] if self.data == -1 else range_problems("data", self.data, 1, integer=True,
                                                       note="or -1: every remaining device")
        p += range_problems("fsdp", self.fsdp, 1, integer=True)
        p += range_problems("tensor", self.tensor, 1, integer=True)
        if p:
            raise ConfigError("Invalid MeshConfig: " + "; ".join(p))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One RLHF run: the algorithm, the optimiser, the mesh and the schedule.

    The library trainer takes it with an Experiment (models, prompts, reward); klq train adds
    the task (experiments.tasks.RunConfig) and every field can be overridden on the command line
    (klq train tiny-klq --algo.tau 0.1 --total-episodes 512).

    Batch sizes are global (all devices together). One iteration samples rollouts_per_batch
    responses, then runs epochs passes of rollouts_per_batch / minibatch_size optimizer steps,
    each accumulating gradients over minibatch_size / micro_batch_size micro-batches.

    Attributes:
      algo: KLQ / PPO hyperparameters.
      optim: optimiser and learning-rate schedule.
      mesh: device mesh sizes (data, fsdp, tensor); data=-1 uses every remaining device.
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
      logp_from_sampler: take θ_old's log π from the sampler's own log-probs (TRL's way) instead
        of a scoring forward of the policy: with a separate critic the policy's forward is skipped,
        with a value head its unembedding. Equal up to float rounding; off by default (exact).
      seed: seeds the prompt order, the sampler and the minibatch shuffles.
      out_dir: run directory (metrics.jsonl, samples.jsonl, tb/, checkpoints/, config.json).
      save_every: checkpoint every this many iterations (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      log_samples_every: log a few decoded samples every this many iterations (0: never).
      num_logged_samples: how many samples to log.
      resume: continue the run in out_dir from its newest checkpoint that restores; the config
        must equal the checkpoint's but for the fields of run_dir.RESUMABLE_FIELDS (logging,
        save cadence, mesh; README "Resuming: what may change"). Without a checkpoint: an error
        unless allow_fresh.
      overwrite: delete the run files already in out_dir (metrics, checkpoints, policy/, ...) and
        start again; without it (and without resume) a directory holding a run is refused.
      allow_fresh: with resume, start from iteration 0 when out_dir has no checkpoint yet
        (restart-on-failure scripts) instead of failing.
      progress: show a progress bar.
      tensorboard: write TensorBoard event files under out_dir/tb.
      eval_every: validate on held-out prompts every this many iterations and at the end (0:
        never): eval/... metrics in metrics.jsonl and TensorBoard, the final completions in
        out_dir/eval/completions.jsonl. Never changes the training.
      eval_prompts: how many held-out prompts (the first ones of the held-out set).
      eval_modes: sample (at the training temperature) and/or greedy.
      eval_seed: seeds the validation sampler (independent of seed).
      eval_batch_size: rows per validation rollout (None: rollouts_per_batch, whose compiled
        sampler it then reuses).
    """

    algo: AlgoConfig = AlgoConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
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
    logp_from_sampler: bool = False
    seed: int = 0
    out_dir: str = "runs/default"
    save_every: int = 50
    keep_checkpoints: int = 3
    log_samples_every: int = 10
    num_logged_samples: int = 4
    resume: bool = False
    overwrite: bool = False
    allow_fresh: bool = False
    progress: bool = True
    tensorboard: bool = True
    eval_every: int = 0
    eval_prompts: int = 64
    eval_modes: tuple[Literal["sample", "greedy"], ...] = ("sample", "greedy")
    eval_seed: int = 1234
    eval_batch_size: int | None = None

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
        if self.resume and self.overwrite:
            p.append("resume and overwrite exclude each other (--resume continues the run in out_dir, "
                     "--overwrite deletes it)")
        p += sampling_problems(self.temperature, self.top_k, self.top_p)
        p += range_problems("omega", self.omega, 0)
        p += range_problems("score_micro_batch_size", self.score_micro_batch_size, 1, integer=True,
                            none_ok=True)
        for name in ("seed", "eval_seed"):
            p += range_problems(name, getattr(self, name), 0, SEED_LIMIT, integer=True, high_open=True)
        p += range_problems("log_samples_every", self.log_samples_every, 0, integer=True, note="0: never")
        p += range_problems("num_logged_samples", self.num_logged_samples, 0, integer=True)
        if self.eval_every < 0:
            p.append(f"eval_every={self.eval_every} must be >= 0 (0: no validation)")
        if self.eval_prompts < 1:
            p.append(f"eval_prompts={self.eval_prompts} must be positive")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            p.append(f"eval_batch_size={self.eval_batch_size} must be positive or None")
        modes = tuple(self.eval_modes)
        if not modes or len(set(modes)) != len(modes) or not set(modes) <= {"sample", "greedy"}:
            p.append(f"eval_modes={modes!r} must be one or both of 'sample', 'greedy'")
        if self.rollouts_per_batch % self.algo.whiten_groups:
            p.append(
                f"algo.whiten_groups={self.algo.whiten_groups} must divide "
                f"rollouts_per_batch={self.rollouts_per_batch}"
            )
        if p:
            raise ConfigError("Invalid TrainConfig: " + "; ".join(p))

    @property
    def num_iterations(self) -> int:
        return self.total_episodes // self.rollouts_per_batch

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * (self.rollouts_per_batch // self.minibatch_size)

    def sampling_config(self, stop_token_ids=(0,), pad_token_id=0):
        """The :class:`klq_jax.sampling.SamplingConfig` of this run's rollouts."""
        from klq_jax.sampling import SamplingConfig  # JAX: only when a run starts

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_token_ids=tuple(stop_token_ids),
            pad_token_id=pad_token_id,
        )


def to_dict(cfg) -> dict:
    """A config dataclass as JSON-ready nested dicts (what ``config.json`` of a run holds)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, where: str = "config", base: Any = None):
    """The config dataclass ``cls`` from nested dicts (e.g. a run's ``config.json``).

    Fields missing from ``data`` take their value in ``base`` (an instance of ``cls``, e.g. a
    preset), or the defaults without one; an unknown field, or a value of the wrong type or
    length, is an error naming ``where`` (the file) and the field. JSON lists become tuples where
    the field is a tuple. The dataclass validates the values (its error is prefixed with ``where``).

    Example::

        >>> from klq_jax.config import TrainConfig, from_dict, to_dict
        >>> cfg = TrainConfig(rollouts_per_batch=8, minibatch_size=8, micro_batch_size=8)
        >>> from_dict(TrainConfig, to_dict(cfg)) == cfg
        True
        >>> from_dict(TrainConfig, {"epochs": 2}, base=cfg).rollouts_per_batch
        8
        >>> from_dict(TrainConfig, {"epochs": "two"})
        Traceback (most recent call last):
        ...
        ValueError: config: epochs = 'two' must be an int
    """
    try:
        return _from_dict(cls, data, "", base)
    except ValueError as err:  # ours, or a dataclass's validation (ConfigError): the file named first
        raise (ConfigError if isinstance(err, ConfigError) else ValueError)(f"{where}: {err}") from err


def _from_dict(cls: type, data: Any, path: str, base: Any):
    """:func:`from_dict` at the field path ``path`` ("" at the top), without the file's name."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'the file'} must be a JSON object of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{path + ' ' if path else ''}has field(s) {', '.join(unknown)} that {cls.__name__} does not "
            f"have; its fields are: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _from_json(hints[name], value, f"{path}.{name}" if path else name,
                         getattr(base, name) if base is not None else None)
        for name, value in data.items()
    }
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _from_json(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _from_dict(tp, value, where, base if isinstance(base, tp) else None)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} = {value!r} must be one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)) or not (variadic or not args or len(value) == len(args)):
            size = "" if variadic or not args else f" of {len(args)} values"
            example = [value] if variadic and not isinstance(value, (list, tuple)) else None
            raise ValueError(f"{where} = {json.dumps(value, default=repr)} must be a list{size}"
                             + (f" (e.g. {json.dumps(example, default=repr)})" if example else ""))
        items = args[:1] * len(value) if variadic else args or (Any,) * len(value)
        return tuple(_from_json(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_json(arg, value, where, base)
            except ValueError:
                continue
        names = " or ".join(_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args if a is not type(None))
        raise ValueError(f"{where} = {value!r} must be {names}" + (" or null" if type(None) in args else ""))
    if tp in _TYPE_NAMES:
        ok = (isinstance(value, bool) if tp is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
              isinstance(value, tp) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{where} = {value!r} must be {_TYPE_NAMES[tp]}")
        if tp is float:
            try:
                return float(value)
            except OverflowError:  # an integer written out past float range
                raise ValueError(f"{where} = {str(value)[:24]}… is too large for a float") from None
        return value
    return value
