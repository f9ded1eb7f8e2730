"""Training: the run configuration, the sharded update step and the loop.

* :mod:`klq_jax.train.config` — :class:`TrainConfig`, :class:`OptimConfig`, :func:`make_optimizer`;
* :mod:`klq_jax.train.step` — :class:`TrainState`, :func:`make_update_fn` (the whole update phase
  of an iteration as one pure function), :func:`init_state`, :func:`jit_update_fn`;
* :mod:`klq_jax.train.loop` — :class:`Experiment` (models, prompts, reward) and :func:`train`, the
  only place with side effects (logging, checkpoints, resume, the policy export).
"""

from klq_jax.train.config import OptimConfig, TrainConfig, make_optimizer
from klq_jax.train.loop import (
    Experiment,
    NonFiniteError,
    TrainResult,
    export_policy,
    rollout_metrics,
    train,
)
from klq_jax.train.step import TrainState, init_state, jit_update_fn, make_update_fn, state_shardings

__all__ = [
    "OptimConfig", "TrainConfig", "make_optimizer", "Experiment", "NonFiniteError", "TrainResult",
    "export_policy", "rollout_metrics", "train", "TrainState", "init_state", "jit_update_fn",
    "make_update_fn", "state_shardings",
]
