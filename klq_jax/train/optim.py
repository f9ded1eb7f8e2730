"""The optimiser of a run: AdamW after optional global-norm clipping, with a learning-rate schedule.

The settings are :class:`klq_jax.config.OptimConfig`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from klq_jax.config import OptimConfig


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
