"""Run configuration: the optimiser and the schedule of one KLQ / PPO run.

:class:`TrainConfig` holds everything the trainer (:func:`klq_jax.train.train`) needs besides the
models, prompts and reward (an :class:`klq_jax.train.Experiment`); experiment code adds the task
(``experiments.tasks.TaskConfig``) on top of it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax.numpy as jnp
import optax

from klq_jax import sharding
from klq_jax.algorithms import AlgoConfig
from klq_jax.sampling import SamplingConfig

@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser: AdamW with a learning-rate schedule and optional global-norm gradient clipping.

    Defaults and what the paper ran: the paper's TRL fork (PPOv2's loop: ``optimizer.step()``
    with no ``clip_grad_norm_``, an HF ``"linear"`` scheduler stepped once per iteration) does not
    clip gradients, and Table 2 lists none; the paper presets (``experiments/presets.py``) therefore
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

    The library trainer takes it with an :class:`klq_jax.train.Experiment` (models, prompts,
    reward). The ``klq train`` command adds the task to it (``experiments.tasks.RunConfig``); its
    presets live in ``experiments/presets.py`` and every field can be overridden from the command
    line (``klq train tiny-klq --algo.tau 0.1 --total-episodes 512``).

    Batch sizes are GLOBAL (all devices together). One iteration samples ``rollouts_per_batch``
    responses, then runs ``epochs`` passes of ``rollouts_per_batch // minibatch_size`` optimizer
    steps, each accumulating gradients over ``minibatch_size // micro_batch_size`` micro-batches.

    Attributes:
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
