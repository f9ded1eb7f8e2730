"""KLQ and PPO as data: each is a pair (targets, loss) over the same rollout and update loop.

* ``targets(cfg, batch) -> batch`` runs once per iteration on the rollout of θ_old (no
  gradient) and fills the :class:`klq_jax.types.Batch`'s target fields: KLQ computes the λ-returns
  Ĝ of Eq. (7)/(14) (``targets``); PPO computes the KL-shaped rewards, GAE advantages (optionally
  whitened) and value targets of Algorithm 1 (``advantages``, ``returns``).
* ``loss(cfg, logp, values, batch) -> (loss, metrics)`` is evaluated on each minibatch (a
  :class:`~klq_jax.types.Batch` of fewer rows) with the current θ: KLQ is the ℓ² loss of Eq. (6)
  on Q_θ = τ·log(π_θ/π_b) + V_θ (Eq. 13); PPO is the clipped policy loss plus ζ times the clipped
  value loss.

Everything else — sampling, scoring, the epochs × minibatches × micro-batches update, sharding,
checkpoints — is shared (``klq_jax.train``).

Example::

    >>> import jax.numpy as jnp
    >>> from klq_jax import algorithms
    >>> from klq_jax.types import Batch
    >>> cfg = algorithms.AlgoConfig(name="klq", tau=0.05, lam=1.0)  # λ = 1: Monte-Carlo returns
    >>> z, ids = jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32)
    >>> batch = Batch(prompt_ids=ids, prompt_mask=z + 1, response_ids=ids,
    ...               response_mask=jnp.array([[1., 1., 1.], [1., 1., 0.]]),
    ...               logp=z, ref_logp=z, values=z, rewards=jnp.array([[0., 0., 1.], [0., 2., 0.]]))
    >>> algorithms.get(cfg.name).targets(cfg, batch).targets.tolist()
    [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from klq_jax import losses, returns
from klq_jax.config import ALGORITHMS_NAMES, AlgoConfig  # noqa: F401  (re-exported)
from klq_jax.types import Batch

Array = jax.Array


class Algorithm(NamedTuple):
    """An RLHF algorithm = how targets are made from a rollout + the minibatch loss."""

    name: str
    targets: Callable[[AlgoConfig, Batch], Batch]
    loss: Callable[[AlgoConfig, Array, Array, Batch], tuple[Array, dict]]


# ------------------------------------------------------------------------------------------
# KLQ (Algorithm 2)
# ------------------------------------------------------------------------------------------


def klq_compute_targets(cfg: AlgoConfig, batch: Batch) -> Batch:
    """Ĝ_t of Eq. (7) with δ_t of Eq. (14), from θ_old's log π, log π_b and V (held fixed).

    Reads ``batch.logp, ref_logp, values, rewards, response_mask``, all ``[B, T]``; returns
    ``batch`` with ``targets [B, T]`` filled in.
    """
    g = returns.klq_targets(
        batch.logp,
        batch.ref_logp,
        batch.values,
        batch.rewards,
        batch.response_mask,
        tau=cfg.tau,
        gamma=cfg.gamma,
        lam=cfg.lam,
        alpha=cfg.alpha,
    )
    return batch.replace(targets=g)


def klq_minibatch_loss(cfg: AlgoConfig, logp: Array, values: Array, batch: Batch):
    """Eq. (6) on Q_θ = τ·log(π_θ/π_b) + V_θ against the fixed targets (Algorithm 2).

    ``logp, values [b, T]`` of the current θ on the minibatch ``batch`` (``b`` rows)."""
    return losses.klq_loss(
        logp, batch.ref_logp, values, batch.targets, batch.response_mask, tau=cfg.tau
    )


# ------------------------------------------------------------------------------------------
# PPO (Algorithm 1, TRL's defaults)
# ------------------------------------------------------------------------------------------


def ppo_compute_targets(cfg: AlgoConfig, batch: Batch) -> Batch:
    """KL-shaped rewards r̄, GAE advantages (optionally whitened) and value targets (Alg. 1).

    Returns ``batch`` with ``advantages [B, T]`` and ``returns [B, T]`` filled in.
    """
    adv, ret = returns.ppo_targets(
        batch.rewards,
        batch.logp,
        batch.ref_logp,
        batch.values,
        batch.response_mask,
        tau=cfg.tau,
        gamma=cfg.gamma,
        lam=cfg.lam,
        whiten=cfg.whiten_advantages,
        value_target=cfg.value_target,
        whiten_groups=cfg.whiten_groups,
    )
    return batch.replace(advantages=adv, returns=ret)


def ppo_minibatch_loss(cfg: AlgoConfig, logp: Array, values: Array, batch: Batch):
    """Clipped policy loss + ζ · clipped value loss (Algorithm 1).

    ``logp, values [b, T]`` of the current θ on the minibatch ``batch`` (``b`` rows)."""
    return losses.ppo_loss(
        logp,
        batch.logp,
        values,
        batch.values,
        batch.advantages,
        batch.returns,
        batch.response_mask,
        clip_eps=cfg.clip_eps,
        value_clip=cfg.value_clip,
        vf_coef=cfg.vf_coef,
        half_value_loss=cfg.half_value_loss,
    )


KLQ = Algorithm("klq", klq_compute_targets, klq_minibatch_loss)
PPO = Algorithm("ppo", ppo_compute_targets, ppo_minibatch_loss)
_REGISTRY = {"klq": KLQ, "ppo": PPO}


def get(name: str) -> Algorithm:
    """The :class:`Algorithm` called ``name`` (``"klq"`` or ``"ppo"``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of {sorted(_REGISTRY)}") from None
