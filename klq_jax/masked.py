"""Masked statistics over ``[B, T]`` arrays with a float mask (1 = real token, 0 = padding).

The one home of the masked sums, means, variances, whitening and explained variance that the
targets (:mod:`klq_jax.returns`), the losses (:mod:`klq_jax.losses`) and the trainer's rollout
metrics use. Pure functions; every output is float32 whatever the input dtype; a mask with no
real entry gives 0, never NaN. Padding entries are selected out (``jnp.where`` on the mask)
before any arithmetic, so a NaN or inf in a padding slot reaches neither a value nor a gradient.
A mask of another shape than its array is a one-line ValueError naming the function called.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "explained_variance"]

_F32 = jnp.float32


def _f32(x) -> Array:
    return jnp.asarray(x).astype(_F32)


def _zero_pads(x: Array, mask: Array) -> Array:
    """``x`` with padding entries replaced by 0, so inf/NaN there reach neither value nor gradient."""
    return jnp.where(mask != 0, x, 0.0)


def _check_same_shape(arrays: dict, fn: str, *, rank: Optional[int] = None) -> None:
    """Raise a readable error when the named arrays do not share one shape (and rank)."""
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        desc = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(
            f"{fn}: all of these arrays must have the same shape, got {desc}. "
            "Pass per-token arrays of one shape ([B, T] batched, [T] for one trajectory) and a float "
            "mask of the same shape (1 = real response token, 0 = padding)."
        )
    if rank is not None and len(first) != rank:
        want = "[T] (one trajectory)" if rank == 1 else "[B, T] (batch-major; x[None] for one row)"
        raise ValueError(f"{fn}: expected {want} arrays, got shape {list(first)}.")


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Sum of ``x`` over the positions where ``mask`` is non-zero, in float32.

    ``Σ_i m_i · x_i``. Padding is selected out with ``jnp.where``, so a NaN or inf sitting in a
    padding slot does not leak into the result (nor into its gradient).

    Args:
      x: any shape, e.g. ``[B, T]``.
      mask: same shape as ``x``; float (or bool) weights, 1 = real token, 0 = padding.
      axis: axis or axes to reduce; ``None`` reduces everything to a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.masked import masked_sum
      >>> float(masked_sum(jnp.array([1.0, 2.0, jnp.nan]), jnp.array([1.0, 1.0, 0.0])))
      3.0
    """
    x = _f32(x)
    m = _f32(mask)
    _check_same_shape({"x": x, "mask": m}, "masked_sum")
    return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den != 0``, else 0 (gradient-safe: no inf in the unused branch)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Masked mean ``Σ m·x / Σ m`` in float32 (TRL's ``masked_mean``); 0 where ``Σ m = 0``.

    With ``axis=None`` this is the token-level mean over a whole minibatch, the ``1 / Σ T``
    normalisation of Algorithms 1 and 2.

    Args:
      x: any shape, e.g. ``[B, T]``.
      mask: same shape as ``x``, 1 = real token, 0 = padding.
      axis: axis or axes to reduce; ``None`` reduces everything to a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.masked import masked_mean
      >>> x = jnp.array([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]])
      >>> m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
      >>> float(masked_mean(x, m))
      3.0
      >>> masked_mean(x, m, axis=1).tolist()
      [2.0, 5.0]
    """
    m = _f32(mask)
    _check_same_shape({"x": x, "mask": m}, "masked_mean")
    return _safe_div(masked_sum(x, m, axis=axis), jnp.sum(m, axis=axis))


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Masked variance of all real entries of ``x`` (a scalar, float32), as TRL's ``masked_var``.

    ``var = Σ m (x − μ)² / Σ m`` with ``μ = masked_mean(x, m)``; with ``unbiased=True`` (TRL's
    default) it is multiplied by Bessel's correction ``n / (n − 1)``, ``n = Σ m``. TRL raises when
    ``n ≤ 1``; this jittable version instead returns the uncorrected variance (0 for one entry,
    0 for none). The N+ PPO script uses ``unbiased=False``.

    Args:
      x: any shape, e.g. ``[B, T]``.
      mask: same shape as ``x``.
      unbiased: apply Bessel's correction.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.masked import masked_var
      >>> x = jnp.array([1.0, 2.0, 3.0, 50.0]); m = jnp.array([1.0, 1.0, 1.0, 0.0])
      >>> float(masked_var(x, m)), round(float(masked_var(x, m, unbiased=False)), 6)
      (1.0, 0.666667)
    """
    m = _f32(mask)
    _check_same_shape({"x": x, "mask": m}, "masked_var")
    x = _zero_pads(_f32(x), m)  # before any arithmetic: no NaN/inf from a pad in the gradient
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    if unbiased:
        n = jnp.sum(m)
        var = jnp.where(n > 1, var * _safe_div(n, n - 1.0), var)
    return var


def masked_whiten(
    x: Array,
    mask: Array,
    shift_mean: bool = True,
    *,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> Array:
    """Whiten the real entries of ``x``: ``(x − μ) / sqrt(σ² + eps)``, as TRL's ``masked_whiten``.

    μ and σ² are the masked mean and (by default Bessel-corrected) variance over *all* real
    entries of ``x`` (the whole batch). With ``shift_mean=False`` the mean is added back
    (``(x − μ)/σ + μ``: TRL's reward whitening). Padding entries of the output are 0 (TRL zeroes
    them right after whitening).

    Args:
      x: ``[B, T]`` (any shape).
      mask: same shape, 1 = real token.
      shift_mean: subtract the mean (True) or keep it (False).
      unbiased: Bessel-corrected variance (TRL) or the biased one (N+ ``ppo.py``).
      eps: added to the variance before the square root (TRL: 1e-8).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.masked import masked_whiten
      >>> w = masked_whiten(jnp.array([1.0, 2.0, 3.0, 9.0]), jnp.array([1.0, 1.0, 1.0, 0.0]))
      >>> [round(v, 4) for v in w.tolist()]
      [-1.0, 0.0, 1.0, 0.0]
    """
    m = _f32(mask)
    _check_same_shape({"x": x, "mask": m}, "masked_whiten")
    x = _zero_pads(_f32(x), m)  # before any arithmetic: no NaN/inf from a pad in the gradient
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=unbiased)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m != 0, out, 0.0)


def explained_variance(y_pred: Array, y_true: Array, mask: Array) -> Array:
    """Masked explained variance ``1 − Var[y_true − y_pred] / Var[y_true]`` (a scalar, float32).

    1 is a perfect fit, 0 is no better than predicting the mean, negative is worse. Returns 0
    when ``Var[y_true] = 0`` (undefined). Uses the biased masked variance for both terms.

    Args:
      y_pred, y_true, mask: ``[B, T]`` (any one shape).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.masked import explained_variance
      >>> y = jnp.array([1.0, 2.0, 3.0]); m = jnp.ones(3)
      >>> float(explained_variance(y, y, m)), float(explained_variance(jnp.full(3, 2.0), y, m))
      (1.0, 0.0)
    """
    m = _f32(mask)
    _check_same_shape({"y_pred": y_pred, "y_true": y_true, "mask": m}, "explained_variance")
    y_pred, y_true = _zero_pads(_f32(y_pred), m), _zero_pads(_f32(y_true), m)  # before arithmetic
    var_y = masked_var(y_true, mask, unbiased=False)
    var_res = masked_var(y_true - y_pred, mask, unbiased=False)
    return jnp.where(var_y > 0, 1.0 - _safe_div(var_res, var_y), 0.0)


# --------------------------------------------------------------------------------------------
# Log-probs, entropy, KL estimators
# --------------------------------------------------------------------------------------------
