"""Regression targets: KLQ λ-returns (Eq. 7 / Algorithm 2) and PPO's GAE (Algorithm 1).

Time-index convention (paper, Appendix B): the state is ``s_t = (x, y_1..y_t)`` and the action
``a_t = y_{t+1}``; a response has ``T`` real tokens. Position ``t`` of every ``[T]`` array refers
to ``s_t`` / ``a_t``:

* ``logp[t] = log π(a_t|s_t)``, ``ref_logp[t] = log π_b(a_t|s_t)``, ``values[t] = V(s_t)``;
* ``rewards[t]`` holds ``r_{t+1}``, the reward that follows action ``a_t``. The sequence reward
  ``R`` (minus any missing-EOS penalty ω) sits at the **last real token**, ``t = T − 1``;
* ``V(s_T) = 0``: nothing is bootstrapped after the last real token.

(TRL puts the score one slot *after* the EOS token; this library puts it on the last real token,
as Algorithms 1 and 2 do.)

``mask[t]`` is 1 for real tokens and 0 for padding. Padding may sit anywhere after the last real
token (right padding of any length); targets are 0 there, and whatever the padding slots hold
(even NaN or inf) is ignored. A zero *inside* a trajectory acts as an episode boundary (no
bootstrapping across it), which is only what you want for packed sequences.

Every function has a per-trajectory ``*_single`` form on ``[T]`` arrays, written as a reverse
``jax.lax.scan``, and a batched ``[B, T]`` form that is ``jax.vmap`` of it. All outputs are
float32, whatever the input dtype (bfloat16 included). The coefficients (τ, γ, λ, α) may be
Python floats or traced scalars.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from klq_jax.masked import _check_same_shape, masked_whiten

Array = jax.Array

__all__ = [
    "klq_targets_single",
    "klq_targets",
    "gae_single",
    "gae",
    "kl_shaped_rewards",
    "discounted_returns_single",
    "discounted_returns",
    "ppo_value_targets",
    "whiten_advantages",
    "ppo_targets",
]

_F32 = jnp.float32


_VALUE_KEYS = ("values", "v_t")


def _prep(arrays: dict, fn: str, rank: int, hint: str | None = None) -> tuple[Array, ...]:
    """Cast to float32, check one shape of the given rank, and zero the padding entries.

    The last entry of ``arrays`` must be the mask; the mask is returned as float32. ``hint``
    replaces the default advice on another shape (the ``[T]`` / ``[B, T]`` form to use instead).
    """
    for k, v in arrays.items():
        if v is None:
            why = (
                " (a rollout has values=None when the policy has no value head: build it with "
                "value_head=True, e.g. GPTNeoXConfig(..., value_head=True), or wrap it with a critic, "
                "klq_jax.models.critic.PolicyWithCritic)"
                if k in _VALUE_KEYS
                else ""
            )
            raise ValueError(f"{fn}: {k} is None{why}; every input must be a per-token array.")
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()) or len(first) != rank:
        desc = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        want = "[T] (one trajectory)" if rank == 1 else "[B, T] (batch-major)"
        if hint is None:
            alt = fn.removesuffix("_single") if rank == 1 else f"{fn}_single"
            hint = (
                (f"for [B, T] batches use {alt}" if rank == 1 else f"for one [T] trajectory use {alt}")
                if alt in __all__
                else "for one [T] trajectory pass x[None] (a batch of one row)"
            )
        raise ValueError(
            f"{fn}: expected arrays of one shape {want}, got {desc}; {hint}. Every per-token "
            "array and the float mask (1 = real token, 0 = padding) must have the same shape."
        )
    vals = [jnp.asarray(v).astype(_F32) for v in arrays.values()]
    mask = vals[-1]
    real = mask != 0
    return tuple(jnp.where(real, v, 0.0) for v in vals[:-1]) + (mask,)


def _reverse_recursion(x_t: Array, mask_t: Array, discount: Array) -> Array:
    """``y_t = x_t + discount · y_{t+1}`` for real ``t`` (``y_T = 0``); ``y_t = 0`` on padding.

    A reverse ``lax.scan`` over ``[T]``; a padding slot resets the carry to 0.
    """
    discount = jnp.asarray(discount, _F32)

    def step(carry, inp):
        x, m = inp
        y = jnp.where(m != 0, x + discount * carry, 0.0)
        return y, y

    _, y = jax.lax.scan(step, jnp.zeros((), _F32), (x_t, mask_t), reverse=True)
    return y


def _next_values(v_t: Array, mask_t: Array) -> Array:
    """``V(s_{t+1})`` at every ``t``: ``v[t+1]`` where ``t+1`` is real, else 0 (``V(s_T) = 0``)."""
    v_next = jnp.concatenate([v_t[1:], jnp.zeros((1,), _F32)])
    m_next = jnp.concatenate([mask_t[1:], jnp.zeros((1,), _F32)])
    return jnp.where(m_next != 0, v_next, 0.0)


# --------------------------------------------------------------------------------------------
# KLQ (Algorithm 2)
# --------------------------------------------------------------------------------------------


def klq_targets_single(
    logp_t: Array,
    ref_logp_t: Array,
    v_t: Array,
    r_t: Array,
    mask_t: Array,
    *,
    tau,
    gamma=1.0,
    lam=0.95,
    alpha=1.0,
) -> Array:
    """Conservative λ-return targets of KLQ for one trajectory, Eq. (7) with the TD error (14).

    As in Algorithm 2, for ``t = T−1, …, 0``::

        Q_t = τ·(log π(a_t|s_t) − log π_b(a_t|s_t)) + V(s_t)          # Eq. (13)
        δ_t = r_{t+1} + γ·V(s_{t+1}) − Q_t,   V(s_T) = 0               # Eq. (14)
        Δ_t = δ_t + γλ·Δ_{t+1},               Δ_T = 0
        G_t = α·Δ_t + Q_t                                              # Eq. (7)

    i.e. ``G_t = α Σ_{k=t}^{T−1} (λγ)^{k−t} δ_k + Q_t``. α = 1 is Algorithm 2 (and all the paper's
    experiments); α < 1 is the conservative return of the equivalence result (Section 4, β =
    τ(1−α)/α). With λ = γ = α = 1 this is exactly
    ``G_t = Σ_{k≥t} r_{k+1} − Σ_{k>t} τ·log(π/π_b)(a_k|s_k)``: the KL-regularised return.

    The inputs are rollout-time quantities (no gradient is meant to flow through the targets;
    :func:`klq_jax.losses.klq_loss` stops it anyway).

    Args:
      logp_t: ``[T]`` log π(a_t|s_t) of the sampled tokens under the rollout policy.
      ref_logp_t: ``[T]`` log π_b(a_t|s_t) under the reference (SFT) policy.
      v_t: ``[T]`` V(s_t) from the value head.
      r_t: ``[T]``, ``r_t[t] = r_{t+1}`` (the sequence reward at the last real token, 0 elsewhere).
      mask_t: ``[T]`` float, 1 = real token, 0 = padding (after the last real token).
      tau: KL coefficient τ.  gamma: discount γ.  lam: λ.  alpha: conservativeness α ∈ (0, 1].

    Returns:
      ``[T]`` float32 targets ``G_t``; 0 on padding.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import klq_targets_single
      >>> z = jnp.zeros(4); r = jnp.array([0.0, 0.0, 1.0, 0.0]); m = jnp.array([1.0, 1.0, 1.0, 0.0])
      >>> klq_targets_single(z, z, z, r, m, tau=0.05, lam=0.5).tolist()  # V = 0, π = π_b
      [0.25, 0.5, 1.0, 0.0]
    """
    logp_t, ref_logp_t, v_t, r_t, mask_t = _prep(
        {"logp_t": logp_t, "ref_logp_t": ref_logp_t, "v_t": v_t, "r_t": r_t, "mask_t": mask_t},
        "klq_targets_single",
        rank=1,
    )
    q_t = tau * (logp_t - ref_logp_t) + v_t
    delta_t = r_t + gamma * _next_values(v_t, mask_t) - q_t
    big_delta_t = _reverse_recursion(delta_t, mask_t, gamma * lam)
    return jnp.where(mask_t != 0, alpha * big_delta_t + q_t, 0.0)


def klq_targets(
    logp: Array,
    ref_logp: Array,
    values: Array,
    rewards: Array,
    mask: Array,
    *,
    tau,
    gamma=1.0,
    lam=0.95,
    alpha=1.0,
) -> Array:
    """Batched KLQ λ-return targets, Eq. (7) with (14): ``jax.vmap`` of :func:`klq_targets_single`.

    Args:
      logp, ref_logp, values, rewards, mask: ``[B, T]`` (see :func:`klq_targets_single`;
        ``rewards[b, t] = r_{t+1}``, the sequence reward on each row's last real token).
      tau, gamma, lam, alpha: τ, γ, λ, α (scalars shared by the batch).

    Returns:
      ``[B, T]`` float32 targets, 0 on padding (all-zero rows for fully padded rows).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import klq_targets
      >>> lp = jnp.array([[-1.0, -1.0]]); ref = jnp.array([[-1.0, -2.0]])  # log(π/π_b) = [0, 1]
      >>> G = klq_targets(lp, ref, jnp.zeros((1, 2)), jnp.array([[0.0, 3.0]]), jnp.ones((1, 2)),
      ...                 tau=0.5, lam=1.0)
      >>> G.tolist()  # λ = γ = α = 1: G_t = Σ_{k≥t} r_{k+1} − Σ_{k>t} τ log(π/π_b)
      [[2.5, 3.0]]
    """
    logp, ref_logp, values, rewards, mask = _prep(
        {"logp": logp, "ref_logp": ref_logp, "values": values, "rewards": rewards, "mask": mask},
        "klq_targets",
        rank=2,
    )
    fn = lambda a, b, c, d, e: klq_targets_single(  # noqa: E731
        a, b, c, d, e, tau=tau, gamma=gamma, lam=lam, alpha=alpha
    )
    return jax.vmap(fn)(logp, ref_logp, values, rewards, mask)


# --------------------------------------------------------------------------------------------
# PPO (Algorithm 1, TRL conventions)
# --------------------------------------------------------------------------------------------


def kl_shaped_rewards(rewards: Array, logp: Array, ref_logp: Array, mask: Array, *, tau) -> Array:
    """PPO's KL-shaped per-token rewards (Algorithm 1): ``r̄_{t+1} = r_{t+1} − τ·log(π/π_b)(a_t|s_t)``.

    ``logp`` are the rollout (old) policy's log-probs, so this is TRL's
    ``rewards = -kl_coef * (logprobs - ref_logprobs)`` plus the score, with the k1 estimator.

    Args:
      rewards: ``[B, T]`` (or ``[T]``), ``rewards[t] = r_{t+1}``.
      logp, ref_logp: same shape, log π_old and log π_b of the taken tokens.
      mask: same shape, 1 = real token.
      tau: KL coefficient τ (TRL ``kl_coef``).

    Returns:
      float32 array of the input shape, 0 on padding.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import kl_shaped_rewards
      >>> kl_shaped_rewards(jnp.array([[0.0, 1.0]]), jnp.array([[-1.0, -2.0]]),
      ...                   jnp.array([[-2.0, -2.0]]), jnp.ones((1, 2)), tau=0.5).tolist()
      [[-0.5, 1.0]]
    """
    rank = jnp.ndim(rewards)
    rewards, logp, ref_logp, mask = _prep(
        {"rewards": rewards, "logp": logp, "ref_logp": ref_logp, "mask": mask},
        "kl_shaped_rewards",
        rank=rank if rank in (1, 2) else 2,
        hint="it takes [B, T] batches or one [T] trajectory",
    )
    return jnp.where(mask != 0, rewards - tau * (logp - ref_logp), 0.0)


def gae_single(r_t: Array, v_t: Array, mask_t: Array, *, gamma=1.0, lam=0.95) -> Array:
    """Generalised advantage estimates for one trajectory (Algorithm 1's inner loop).

    For ``t = T−1, …, 0``::

        δ_t = r̄_{t+1} + γ·V(s_{t+1}) − V(s_t),   V(s_T) = 0
        Â_t = δ_t + γλ·Â_{t+1},                  Â_T = 0

    Args:
      r_t: ``[T]`` rewards, ``r_t[t] = r̄_{t+1}`` (normally :func:`kl_shaped_rewards`).
      v_t: ``[T]`` V(s_t) from the rollout.
      mask_t: ``[T]`` float, 1 = real token.
      gamma: γ (TRL 1.0).  lam: λ (TRL 0.95).

    Returns:
      ``[T]`` float32 advantages, 0 on padding.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import gae_single
      >>> gae_single(jnp.array([0.0, 1.0, 0.0]), jnp.array([0.5, 0.5, 9.0]),
      ...            jnp.array([1.0, 1.0, 0.0]), lam=0.5).tolist()
      [0.25, 0.5, 0.0]
    """
    r_t, v_t, mask_t = _prep({"r_t": r_t, "v_t": v_t, "mask_t": mask_t}, "gae_single", rank=1)
    delta_t = r_t + gamma * _next_values(v_t, mask_t) - v_t
    return _reverse_recursion(delta_t, mask_t, gamma * lam)


def gae(rewards: Array, values: Array, mask: Array, *, gamma=1.0, lam=0.95) -> Array:
    """Batched GAE (Algorithm 1): ``jax.vmap`` of :func:`gae_single` over ``[B, T]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import gae
      >>> gae(jnp.array([[0.0, 1.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)), lam=1.0).tolist()
      [[1.0, 1.0]]
    """
    rewards, values, mask = _prep(
        {"rewards": rewards, "values": values, "mask": mask}, "gae", rank=2
    )
    return jax.vmap(lambda r, v, m: gae_single(r, v, m, gamma=gamma, lam=lam))(rewards, values, mask)


def discounted_returns_single(r_t: Array, mask_t: Array, *, gamma=1.0) -> Array:
    """Monte-Carlo return of one trajectory: ``R_t = Σ_{k=t}^{T−1} γ^{k−t} r_{k+1}`` (reverse scan).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import discounted_returns_single
      >>> discounted_returns_single(jnp.array([1.0, 2.0, 7.0]), jnp.array([1.0, 1.0, 0.0]),
      ...                           gamma=0.5).tolist()
      [2.0, 2.0, 0.0]
    """
    r_t, mask_t = _prep({"r_t": r_t, "mask_t": mask_t}, "discounted_returns_single", rank=1)
    return _reverse_recursion(r_t, mask_t, gamma)


def discounted_returns(rewards: Array, mask: Array, *, gamma=1.0) -> Array:
    """Batched Monte-Carlo returns ``R_t = Σ_{k≥t} γ^{k−t} r_{k+1}`` over ``[B, T]``.

    This is Algorithm 1's value target ``Σ_{k=t}^{T−1} r̄_k`` (with γ = 1 and the reward
    indexing of this module) when ``rewards`` are the KL-shaped rewards.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import discounted_returns
      >>> discounted_returns(jnp.array([[1.0, 2.0]]), jnp.ones((1, 2))).tolist()
      [[3.0, 2.0]]
    """
    rewards, mask = _prep({"rewards": rewards, "mask": mask}, "discounted_returns", rank=2)
    return jax.vmap(lambda r, m: discounted_returns_single(r, m, gamma=gamma))(rewards, mask)


def ppo_value_targets(
    advantages: Array,
    values: Array,
    rewards_bar: Array,
    mask: Array,
    *,
    gamma=1.0,
    mode: str = "trl",
) -> Array:
    """PPO value-function targets ``R_t``, two choices.

    * ``mode="trl"`` (default, what TRL and the paper's PPO runs do):
      ``R_t = Â_t + V_old(s_t)`` with the *unwhitened* GAE advantages: the TD(λ) return
      ``Σ_k (γλ)^{k−t} δ_k + V(s_t)``, which bootstraps on the old value function.
    * ``mode="mc"`` (Algorithm 1 as written): the Monte-Carlo return of the KL-shaped rewards,
      ``R_t = Σ_{k≥t} γ^{k−t} r̄_{k+1}`` (no bootstrapping, unbiased, higher variance).

    The two coincide when λ = 1 (GAE with λ = 1 telescopes to the Monte-Carlo return minus V).
    For λ < 1 the TRL target is biased towards the old value estimates.

    Args:
      advantages: ``[B, T]`` GAE advantages *before* whitening (used by "trl").
      values: ``[B, T]`` V_old(s_t) (used by "trl").
      rewards_bar: ``[B, T]`` KL-shaped rewards r̄ (used by "mc").
      mask: ``[B, T]`` float, 1 = real token.
      gamma: γ (used by "mc").
      mode: "trl" or "mc".

    Returns:
      ``[B, T]`` float32, 0 on padding.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import gae, ppo_value_targets
      >>> rb = jnp.array([[0.0, 1.0]]); v = jnp.array([[0.5, 0.5]]); m = jnp.ones((1, 2))
      >>> A = gae(rb, v, m, lam=0.5)
      >>> ppo_value_targets(A, v, rb, m, mode="trl").tolist()
      [[0.75, 1.0]]
      >>> ppo_value_targets(A, v, rb, m, mode="mc").tolist()
      [[1.0, 1.0]]
    """
    advantages, values, rewards_bar, mask = _prep(
        {"advantages": advantages, "values": values, "rewards_bar": rewards_bar, "mask": mask},
        "ppo_value_targets",
        rank=2,
    )
    if mode == "trl":
        return jnp.where(mask != 0, advantages + values, 0.0)
    if mode == "mc":
        return discounted_returns(rewards_bar, mask, gamma=gamma)
    raise ValueError(
        f"ppo_value_targets: unknown mode {mode!r}; use 'trl' (advantages + old values, TRL's "
        "choice) or 'mc' (Monte-Carlo sum of KL-shaped rewards, Algorithm 1)."
    )


def whiten_advantages(
    advantages: Array, mask: Array, *, unbiased: bool = True, groups: int = 1
) -> Array:
    """Masked advantage whitening, TRL's default for PPO; over the GLOBAL rollout batch by default.

    ``Â ← (Â − mean(Â)) / sqrt(var(Â) + 1e-8)`` over all real tokens of the batch, pads set to 0
    (TRL: ``masked_whiten(advantages, ~padding_mask)`` with the Bessel-corrected variance, once
    per rollout batch, after the value targets were formed). Algorithm 1 does not whiten.

    TRL whitens per process (each GPU over its own rows: 48 of the paper's 192 on 4 GPUs);
    ``groups = G`` does that: the rows are split into G equal contiguous groups (the trainer's
    data-parallel shards) and each is whitened with its own mean and variance.

    Args:
      advantages: ``[B, T]``.  mask: ``[B, T]``.
      unbiased: Bessel-corrected variance (TRL) or biased (N+ ``ppo.py``).
      groups: number of row groups whitened separately (1: the whole batch); must divide ``B``.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import whiten_advantages
      >>> w = whiten_advantages(jnp.array([[1.0, 3.0, 0.0]]), jnp.array([[1.0, 1.0, 0.0]]))
      >>> [round(v, 4) for v in w[0].tolist()]
      [-0.7071, 0.7071, 0.0]
    """
    _check_same_shape({"advantages": advantages, "mask": mask}, "whiten_advantages", rank=2)
    B = jnp.shape(advantages)[0]
    if groups < 1 or B % groups:
        raise ValueError(
            f"whiten_advantages: groups={groups} must be >= 1 and divide the batch of {B} rows; "
            "set AlgoConfig.whiten_groups to a divisor of rollouts_per_batch."
        )
    if groups == 1:
        return masked_whiten(advantages, mask, shift_mean=True, unbiased=unbiased)
    split = lambda x: jnp.asarray(x).reshape((groups, B // groups) + jnp.shape(x)[1:])  # noqa: E731
    out = jax.vmap(lambda a, m: masked_whiten(a, m, shift_mean=True, unbiased=unbiased))(
        split(advantages), split(mask)
    )
    return out.reshape(advantages.shape)


def ppo_targets(
    scores_per_token: Array,
    logp: Array,
    ref_logp: Array,
    values: Array,
    mask: Array,
    *,
    tau,
    gamma=1.0,
    lam=0.95,
    whiten: bool = True,
    value_target: str = "trl",
    whiten_groups: int = 1,
) -> tuple[Array, Array]:
    """The whole PPO target pipeline of Algorithm 1 with TRL's defaults, in one call.

    ``r̄ = kl_shaped_rewards(...)`` → ``Â = gae(r̄, V)`` → ``R = ppo_value_targets(Â, V, r̄)``
    (from the unwhitened Â) → ``Â ← whiten_advantages(Â)`` if ``whiten``.

    Args:
      scores_per_token: ``[B, T]`` environment rewards ``r_{t+1}`` (the sequence reward, minus any
        missing-EOS penalty, on each row's last real token; 0 elsewhere).
      logp, ref_logp, values: ``[B, T]`` rollout log π_old, log π_b, V_old.
      mask: ``[B, T]`` float, 1 = real token.
      tau, gamma, lam: τ (TRL kl_coef 0.05), γ (1.0), λ (0.95).
      whiten: whiten the advantages (TRL True; Algorithm 1 False).
      value_target: "trl" or "mc" (see :func:`ppo_value_targets`).
      whiten_groups: row groups whitened separately (see :func:`whiten_advantages`).

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32 and 0 on padding.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.returns import ppo_targets
      >>> z = jnp.zeros((1, 2)); m = jnp.ones((1, 2))
      >>> A, R = ppo_targets(jnp.array([[0.0, 1.0]]), z, z, z, m, tau=0.05, lam=1.0, whiten=False)
      >>> A.tolist(), R.tolist()
      ([[1.0, 1.0]], [[1.0, 1.0]])
    """
    scores_per_token, logp, ref_logp, values, mask = _prep(
        {"scores_per_token": scores_per_token, "logp": logp, "ref_logp": ref_logp,
         "values": values, "mask": mask},
        "ppo_targets",
        rank=2,
    )
    rewards_bar = kl_shaped_rewards(scores_per_token, logp, ref_logp, mask, tau=tau)
    advantages = gae(rewards_bar, values, mask, gamma=gamma, lam=lam)
    returns = ppo_value_targets(
        advantages, values, rewards_bar, mask, gamma=gamma, mode=value_target
    )
    if whiten:
        advantages = whiten_advantages(advantages, mask, groups=whiten_groups)
    return advantages, returns
