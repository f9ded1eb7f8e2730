"""Losses and per-token helpers for KLQ (Algorithm 2) and PPO (Algorithm 1).

Everything here is a pure function of arrays: jittable, vmappable and differentiable. Inputs may
be any float dtype (bfloat16 included); every output is float32. Arrays are batch-major
``[B, T]`` with a float ``mask`` that is 1 on real (non-padding) response tokens and 0 on padding.

Paper: Brown, Wells, Young, Bacallado, "KL-Regularised Q-Learning: A Token-level Action-Value
perspective on Online RLHF" (arXiv 2508.17000). Equation numbers below refer to it. The PPO
baseline follows TRL's ``PPOTrainer`` (v0.12), whose defaults the paper inherited.

Minibatch averaging follows Algorithms 1 and 2: a loss is the sum over the real tokens of the
minibatch divided by the number of real tokens ``Σ T`` (a token-level mean, no per-sequence
averaging). A minibatch with no real token gives a loss of 0, never NaN.
"""
from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from klq_jax.config import range_problems

from klq_jax.masked import (  # noqa: F401  (masked statistics live in klq_jax.masked)
    _check_same_shape,
    _f32,
    _safe_div,
    _zero_pads,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

Array = jax.Array

__all__ = [
    "token_logprobs",
    "entropy_from_logits",
    "kl_estimate",
    "klq_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ppo_loss",
]

_F32 = jnp.float32


def check_temperature(temperature, fn: str) -> None:
    """Refuse a concrete ``temperature`` that is not a finite number > 0 in one line (a traced
    one cannot be looked at and passes)."""
    if isinstance(temperature, jax.core.Tracer) or not isinstance(temperature, numbers.Real):
        return
    for problem in range_problems("temperature", temperature, 0, low_open=True):
        raise ValueError(
            f"{fn}: {problem} (the distributions are softmax(logits / temperature); for argmax "
            "decoding sample with SamplingConfig(greedy=True))."
        )


def token_logprobs(logits: Array, tokens: Array, *, temperature: float = 1.0) -> Array:
    """Log-probabilities of the taken tokens, ``log softmax(logits / temperature)[tokens]``.

    ``log π(a_t|s_t) = z_t[a_t] − logsumexp_v z_t[v]`` with ``z_t = logits_t / temperature``,
    computed in float32 as a gather minus a log-sum-exp, so no second ``[B, T, V]`` array (the
    full log-softmax) is built. ``logits[..., t, :]`` must be the model's prediction for
    ``tokens[..., t]`` (i.e. already shifted by one against the input ids). TRL divides by
    ``temperature + 1e-7``; pass that value if you want its numbers bit for bit.

    Args:
      logits: ``[B, T, V]`` (any leading shape), any float dtype.
      tokens: ``[B, T]`` integer ids in ``[0, V)``.
      temperature: sampling temperature the distribution refers to: a finite number > 0 (a
        concrete one that is not is refused; a traced one is not checked).

    Logits must be finite at every position, padding included: the log-sum-exp runs over every
    position, so a NaN or inf logit on a padded position makes the gradient NaN (upstream
    parameters included) even when the result is masked with ``jnp.where`` after the call. Give
    padded positions finite logits (the library's models do), e.g. ``jnp.where`` on the hidden
    states or logits *before* the call. (A ``-inf`` logit for a masked vocabulary entry is fine.)

    Returns:
      ``[B, T]`` float32 log-probabilities; NaN where an id is outside ``[0, V)`` (ids are
      traced values, so they cannot be checked here: the NaN surfaces in every loss and metric
      built on them; a negative id such as Hugging Face's ignore label -100 is not wrapped
      around NumPy-style). Mask such positions out with ``jnp.where`` *after* the call.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.losses import token_logprobs
      >>> lp = token_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))
      >>> [round(v, 6) for v in lp[0].tolist()]  # log(1/4)
      [-1.386294, -1.386294]
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"token_logprobs: logits{list(logits.shape)} must be tokens{list(tokens.shape)} plus a "
            "trailing vocabulary axis. Shift the logits so logits[..., t, :] predicts tokens[..., t]."
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"token_logprobs: tokens must be integer ids, got dtype {tokens.dtype}.")
    check_temperature(temperature, "token_logprobs")
    z = logits.astype(_F32) / temperature
    # out of range (negative, or >= V: also uint32 ids past int32): NaN, not wrapped or clipped
    ids = jnp.where((tokens < 0) | (tokens >= z.shape[-1]), z.shape[-1], tokens).astype(jnp.int32)
    picked = jnp.take_along_axis(z, ids[..., None], axis=-1, mode="fill", fill_value=jnp.nan)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits: Array, *, temperature: float = 1.0) -> Array:
    """Entropy of ``softmax(logits / temperature)`` at every position, float32.

    ``H_t = −Σ_v p_v log p_v = logsumexp(z_t) − Σ_v p_v z_{t,v}``, ``z = logits / temperature``
    (TRL's ``policy/entropy_avg`` diagnostic is its mean). Entries of probability 0 (a ``-inf``
    logit: a masked or padded vocabulary slot) contribute 0, to the value and to the gradient:
    the entropy of the distribution over the finite entries.

    Args:
      logits: ``[B, T, V]`` (any leading shape); ``-inf`` allowed, at least one finite per row.
      temperature: a finite number > 0 (a concrete one that is not is refused).

    Returns:
      ``[B, T]`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.losses import entropy_from_logits
      >>> round(float(entropy_from_logits(jnp.zeros((1, 1, 4)))[0, 0]), 6)  # log 4
      1.386294
    """
    check_temperature(temperature, "entropy_from_logits")
    z = jnp.asarray(logits).astype(_F32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    # 0·(−inf) would be NaN: z is replaced where p = 0, so neither branch's gradient sees −inf
    return lse - jnp.sum(p * jnp.where(p > 0, z, 0.0), axis=-1)


def kl_estimate(logp: Array, ref_logp: Array, kind: str = "k1") -> Array:
    """Per-token estimator of ``KL(π || π_ref)`` from log-probs of tokens sampled from ``π``.

    With ``Δ = log π(a|s) − log π_ref(a|s)`` (the sampled log-ratio):

    * ``"k1"``: ``Δ``, unbiased, can be negative; the per-token penalty of Eq. (2) and of TRL's
      KL-shaped reward ``−τ·Δ``.
    * ``"k2"``: ``½ Δ²``, biased, non-negative (TRL's ``approxkl``; tunix ``mse_kl``).
    * ``"k3"``: ``exp(−Δ) − (−Δ) − 1 = π_ref/π − log(π_ref/π) − 1``, unbiased, non-negative
      (tunix ``low_var_kl``).

    Args:
      logp, ref_logp: ``[B, T]`` (any one shape).
      kind: "k1", "k2" or "k3".

    Returns:
      float32 array of the input shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.losses import kl_estimate
      >>> d = jnp.array([0.5]); z = jnp.zeros(1)
      >>> [round(float(kl_estimate(d, z, k)[0]), 6) for k in ("k1", "k2", "k3")]
      [0.5, 0.125, 0.106531]
    """
    logp = _f32(logp)
    ref_logp = _f32(ref_logp)
    _check_same_shape({"logp": logp, "ref_logp": ref_logp}, "kl_estimate")
    delta = logp - ref_logp
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * jnp.square(delta)
    if kind == "k3":
        return jnp.expm1(-delta) + delta
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; use 'k1', 'k2' or 'k3'.")


# --------------------------------------------------------------------------------------------
# KLQ
# --------------------------------------------------------------------------------------------


def klq_loss(
    logp: Array,
    ref_logp: Array,
    values: Array,
    targets: Array,
    mask: Array,
    *,
    tau: float,
    entropy: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
    """The KLQ ℓ² action-value loss, Eq. (6) with the parametrisation of Eq. (13) (Algorithm 2).

    ``Q_θ(s_t, a_t) = τ·(log π_θ(a_t|s_t) − log π_b(a_t|s_t)) + V_θ(s_t)``  (Eq. 13) and

    ``L(θ) = (1 / Σ_B T) Σ_B Σ_t (Q_θ(s_t, a_t) − Ĝ_t)²``

    where ``Ĝ_t`` are the fixed λ-return targets of Eq. (7) (:func:`klq_jax.returns.klq_targets`,
    computed from the rollout-time π and V). The targets are wrapped in ``stop_gradient``: the
    gradient flows into ``logp`` (the policy) and ``values`` (the value head) only. There is no
    separate policy objective: the policy learns through Q. At π_θ = π_b this is the plain
    value-regression loss ``mean (V − Ĝ)²``.

    Args:
      logp: ``[B, T]`` log π_θ(a_t|s_t) of the taken tokens under the parameters being trained.
      ref_logp: ``[B, T]`` log π_b(a_t|s_t) under the fixed reference (SFT) policy.
      values: ``[B, T]`` V_θ(s_t) under the parameters being trained.
      targets: ``[B, T]`` Ĝ_t (no gradient flows into them).
      mask: ``[B, T]`` float, 1 = real response token.
      tau: KL coefficient τ.
      entropy: optional ``[B, T]`` per-token policy entropy; its masked mean is reported.

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars: ``loss``, ``q_mean``,
      ``target_mean``, ``value_mean``, ``logratio_mean`` (mean k1 KL to π_b), ``kl_k3_mean``,
      ``td_abs_mean`` (mean |Q − Ĝ|), ``explained_variance`` (of Ĝ by Q), ``num_tokens``
      (and ``entropy_mean`` if ``entropy`` is given).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.losses import klq_loss
      >>> lp = jnp.log(jnp.array([[0.5, 0.25]])); ref = lp; v = jnp.array([[1.0, 2.0]])
      >>> G = jnp.array([[2.0, 2.0]]); m = jnp.ones((1, 2))
      >>> loss, metrics = klq_loss(lp, ref, v, G, m, tau=0.05)
      >>> float(loss), float(metrics["td_abs_mean"])  # ((1-2)^2 + 0) / 2
      (0.5, 0.5)
      >>> jax.grad(lambda v: klq_loss(lp, ref, v, G, m, tau=0.05)[0])(v).tolist()
      [[-1.0, 0.0]]
    """
    logp = _f32(logp)
    ref_logp = _f32(ref_logp)
    values = _f32(values)
    targets = jax.lax.stop_gradient(_f32(targets))
    mask = _f32(mask)
    _check_same_shape(
        {"logp": logp, "ref_logp": ref_logp, "values": values, "targets": targets, "mask": mask}
        | ({} if entropy is None else {"entropy": entropy}),
        "klq_loss",
    )
    logp, ref_logp, values, targets = (
        _zero_pads(a, mask) for a in (logp, ref_logp, values, targets)
    )
    logratio = logp - ref_logp
    q = tau * logratio + values
    err = q - targets
    loss = masked_mean(jnp.square(err), mask)

    sg = jax.lax.stop_gradient
    metrics = {
        "loss": sg(loss),
        "q_mean": sg(masked_mean(q, mask)),
        "target_mean": sg(masked_mean(targets, mask)),
        "value_mean": sg(masked_mean(values, mask)),
        "logratio_mean": sg(masked_mean(logratio, mask)),
        "kl_k3_mean": sg(masked_mean(kl_estimate(logp, ref_logp, "k3"), mask)),
        "td_abs_mean": sg(masked_mean(jnp.abs(err), mask)),
        "explained_variance": sg(explained_variance(q, targets, mask)),
        "num_tokens": sg(jnp.sum(mask)),
    }
    if entropy is not None:
        metrics["entropy_mean"] = sg(masked_mean(entropy, mask))
    return loss, metrics


# --------------------------------------------------------------------------------------------
# PPO (Algorithm 1, TRL's PPOTrainer conventions)
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """PPO-clip policy loss, Eq. (4) as a loss (Algorithm 1's ``L_π``; TRL ``pg_loss``).

    ``ρ_t = exp(log π_θ(a_t|s_t) − log π_old(a_t|s_t))``,
    ``L_π = (1/Σ T) Σ_t max(−Â_t ρ_t, −Â_t clip(ρ_t, 1 − ε, 1 + ε))``.

    The advantages are constants (``stop_gradient``); whiten them beforehand if wanted
    (:func:`klq_jax.returns.whiten_advantages`, TRL's default, done once per rollout batch).

    Args:
      logp: ``[B, T]`` log π_θ of the taken tokens (being trained).
      old_logp: ``[B, T]`` log π_old from the rollout.
      advantages: ``[B, T]`` Â_t.
      mask: ``[B, T]`` float, 1 = real response token.
      clip_eps: ε (TRL ``cliprange`` 0.2).

    Returns:
      ``(loss, metrics)`` with float32 scalars ``pg_loss``, ``approx_kl`` (``½ mean Δ²``, TRL's
      ``approxkl``; masked here, TRL averages over pads too, where Δ = 0), ``clipfrac``
      (fraction of tokens where the clipped term is chosen), ``ratio_mean``, ``ratio_var``
      (masked, unbiased), ``advantage_mean``.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.losses import ppo_policy_loss
      >>> lp = jnp.log(jnp.array([[1.5, 1.0]])); old = jnp.zeros((1, 2))
      >>> loss, m = ppo_policy_loss(lp, old, jnp.array([[1.0, -1.0]]), jnp.ones((1, 2)))
      >>> round(float(loss), 6), float(m["clipfrac"])  # (-1.2 + 1.0) / 2; token 0 clipped
      (-0.1, 0.5)
    """
    logp = _f32(logp)
    old_logp = _f32(old_logp)
    adv = jax.lax.stop_gradient(_f32(advantages))
    mask = _f32(mask)
    _check_same_shape(
        {"logp": logp, "old_logp": old_logp, "advantages": adv, "mask": mask}, "ppo_policy_loss"
    )
    # Pads are selected out before exp so a garbage log-prob there cannot overflow into the grad.
    logratio = _zero_pads(logp - old_logp, mask)
    adv = _zero_pads(adv, mask)
    ratio = jnp.exp(logratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(pg1, pg2), mask)

    sg = jax.lax.stop_gradient
    metrics = {
        "pg_loss": sg(loss),
        "approx_kl": sg(0.5 * masked_mean(jnp.square(logratio), mask)),
        "clipfrac": sg(masked_mean((pg2 > pg1).astype(_F32), mask)),
        "ratio_mean": sg(masked_mean(ratio, mask)),
        "ratio_var": sg(masked_var(ratio, mask, unbiased=True)),
        "advantage_mean": sg(masked_mean(adv, mask)),
    }
    return loss, metrics


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip: Optional[float] = 0.2,
    half: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Clipped PPO value loss (Algorithm 1's ``L_V``; TRL ``vf_loss``).

    ``V^clip_t = clip(V_θ(s_t), V_old(s_t) − η, V_old(s_t) + η)``,
    ``L_V = c · (1/Σ T) Σ_t max((V_θ(s_t) − R_t)², (V^clip_t − R_t)²)``

    with ``c = ½`` when ``half=True`` (TRL's default) and ``c = 1`` as written in Algorithm 1.
    ``clip=None`` disables clipping (plain regression). The returns ``R_t`` are constants
    (``stop_gradient``); see :func:`klq_jax.returns.ppo_value_targets` for the two choices.

    Args:
      values: ``[B, T]`` V_θ(s_t) (being trained).
      old_values: ``[B, T]`` V_old(s_t) from the rollout.
      returns: ``[B, T]`` value targets R_t.
      mask: ``[B, T]`` float, 1 = real response token.
      clip: η (TRL ``cliprange_value`` 0.2), or None.
      half: multiply by ½ (TRL) or not (Algorithm 1).

    Returns:
      ``(loss, metrics)`` with float32 scalars ``vf_loss``, ``vf_clipfrac`` (fraction of tokens
      where the clipped error is the larger), ``value_mean``, ``return_mean``,
      ``value_error`` (mean (V − R)²), ``explained_variance`` (of R by V).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.losses import ppo_value_loss
      >>> v = jnp.array([[1.0, 0.0]]); old = jnp.zeros((1, 2)); R = jnp.array([[2.0, 1.0]])
      >>> loss, m = ppo_value_loss(v, old, R, jnp.ones((1, 2)))  # 0.5 * ((1.8^2) + 1) / 2
      >>> round(float(loss), 6), float(m["vf_clipfrac"])
      (1.06, 0.5)
    """
    values = _f32(values)
    old_values = _f32(old_values)
    returns = jax.lax.stop_gradient(_f32(returns))
    mask = _f32(mask)
    _check_same_shape(
        {"values": values, "old_values": old_values, "returns": returns, "mask": mask},
        "ppo_value_loss",
    )
    values, old_values, returns = (_zero_pads(a, mask) for a in (values, old_values, returns))
    err1 = jnp.square(values - returns)
    if clip is None:
        per_token = err1
        clipped = jnp.zeros_like(err1)
    else:
        v_clipped = jnp.clip(values, old_values - clip, old_values + clip)
        err2 = jnp.square(v_clipped - returns)
        per_token = jnp.maximum(err1, err2)
        clipped = (err2 > err1).astype(_F32)
    coef = 0.5 if half else 1.0
    loss = coef * masked_mean(per_token, mask)

    sg = jax.lax.stop_gradient
    metrics = {
        "vf_loss": sg(loss),
        "vf_clipfrac": sg(masked_mean(clipped, mask)),
        "value_mean": sg(masked_mean(values, mask)),
        "return_mean": sg(masked_mean(returns, mask)),
        "value_error": sg(masked_mean(err1, mask)),
        "explained_variance": sg(explained_variance(values, returns, mask)),
    }
    return loss, metrics


def ppo_loss(
    logp: Array,
    old_logp: Array,
    values: Array,
    old_values: Array,
    advantages: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
    value_clip: Optional[float] = 0.2,
    vf_coef: float = 0.1,
    half_value_loss: bool = True,
    entropy: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
    """Total PPO loss of Algorithm 1: ``L = L_π + ζ · L_V`` (TRL ``loss = pg_loss + vf_coef*vf_loss``).

    See :func:`ppo_policy_loss` (Eq. (4), clip ε) and :func:`ppo_value_loss` (clip η, the ½ of
    TRL when ``half_value_loss``). Both terms are token-level means over the minibatch, as in
    Algorithm 1's ``1 / Σ T``. Defaults are TRL's: ε = η = 0.2, ζ = 0.1, ½ on the value loss.
    Advantages should already be whitened if wanted (TRL whitens once per rollout batch:
    :func:`klq_jax.returns.whiten_advantages` / :func:`klq_jax.returns.ppo_targets`).

    Args:
      logp, old_logp: ``[B, T]`` log π_θ (trained) and log π_old (rollout) of the taken tokens.
      values, old_values: ``[B, T]`` V_θ (trained) and V_old (rollout).
      advantages: ``[B, T]`` Â_t;  returns: ``[B, T]`` value targets R_t.
      mask: ``[B, T]`` float, 1 = real response token.
      clip_eps: ε;  value_clip: η (None = no clipping);  vf_coef: ζ.
      half_value_loss: the ½ on the value loss (TRL) or not (Algorithm 1).
      entropy: optional ``[B, T]`` per-token entropy, reported as ``entropy_mean``.

    Returns:
      ``(loss, metrics)``: the float32 scalar loss and the union of both metric dicts plus
      ``loss``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.losses import ppo_loss
      >>> z = jnp.zeros((2, 3)); m = jnp.ones((2, 3)); A = jnp.ones((2, 3)); R = jnp.ones((2, 3))
      >>> loss, metrics = ppo_loss(z, z, z, z, A, R, m)  # -1 + 0.1 * 0.5 * 1
      >>> round(float(loss), 6), round(float(metrics["vf_loss"]), 6)
      (-0.95, 0.5)
      >>> g = jax.grad(lambda lp: ppo_loss(lp, z, z, z, A, R, m)[0])(z)
      >>> round(float(g[0, 0]), 6)  # d/dlogp of -A*exp(logp - old) / 6
      -0.166667
    """
    if entropy is not None:
        _check_same_shape({"entropy": entropy, "mask": mask}, "ppo_loss")
    pg_loss, pg_metrics = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps)
    vf_loss, vf_metrics = ppo_value_loss(
        values, old_values, returns, mask, clip=value_clip, half=half_value_loss
    )
    loss = pg_loss + vf_coef * vf_loss
    metrics = {"loss": jax.lax.stop_gradient(loss), **pg_metrics, **vf_metrics}
    if entropy is not None:
        metrics["entropy_mean"] = jax.lax.stop_gradient(masked_mean(entropy, mask))
    return loss, metrics
