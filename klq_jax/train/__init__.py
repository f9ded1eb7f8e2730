"""Training: the sharded update step and the loop (the run configs are :mod:`klq_jax.config`).

* :mod:`klq_jax.train.optim` — :func:`make_optimizer` (AdamW + schedule of an :class:`OptimConfig`);
* :mod:`klq_jax.train.step` — :class:`TrainState`, :func:`make_update_fn` (the whole update phase
  of an iteration as one pure function), :func:`init_state`, :func:`jit_update_fn`;
* :mod:`klq_jax.train.loop` — :class:`Experiment` (models, prompts, reward) and :func:`train`, the
  only place with side effects (logging, checkpoints, resume, the policy export);
* :mod:`klq_jax.train.run_dir` — the run directory's lock, resume/overwrite rules, resume
  compatibility (``RESUMABLE_FIELDS``), atomic rewrites, TensorBoard.

The names below load on first use (PEP 562): ``from klq_jax.train import TrainConfig`` does not
import JAX.
"""

import importlib

_EXPORTS = {
    "klq_jax.config": ("OptimConfig", "TrainConfig"),
    "klq_jax.train.optim": ("make_optimizer",),
    "klq_jax.train.loop": ("Experiment", "NonFiniteError", "TrainResult", "export_policy",
                           "rollout_metrics", "train"),
    "klq_jax.train.step": ("TrainState", "init_state", "jit_update_fn", "make_update_fn",
                           "state_shardings"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in ("loop", "optim", "step", "run_dir"):
        value = importlib.import_module(f"klq_jax.train.{name}")
    else:
        raise AttributeError(f"module 'klq_jax.train' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
