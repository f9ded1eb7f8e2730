"""What every decoder-only network here shares: the KV cache, masks and positions, rotary tables,
the attention core (grouped-query capable), norms, the MLP, the heads and the forward loop.

:mod:`klq_jax.models.gpt_neox` and :mod:`klq_jax.models.llama` subclass :class:`DecoderLM` and
only define their blocks and their rotary frequencies, so the sampler, rollout, trainer and critic
drive either through one interface:

* ``model(tokens [B, T], mask [B, T], cache=None, logits=True, prefill=False) -> ModelOutput``;
* ``model.logits(hidden)``, ``model.values(hidden)``, ``model.scores(hidden, mask)``;
* :func:`init_cache` ``(config, B, S)`` for any config with ``num_layers``, ``num_kv_heads``,
  ``head_dim`` and ``dtype``.

Attribute names of the shared parts (``embed_in``, ``layers``, ``final_layer_norm``,
``embed_out``, ``value_kernel``/``value_bias``, ``score_kernel``) are the same in both networks,
so sharding rules, the sampler's weight cast and the value-head I/O treat them alike.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# Large negative number for masked attention logits: finite, so fully masked rows (padding queries)
# give a uniform softmax instead of NaN.
MASK_VALUE = -1e30


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
}


def normal(rngs: nnx.Rngs, shape, std, dtype):
    """``std * N(0, 1)`` of ``shape`` in ``dtype`` from the ``params`` stream of ``rngs``."""
    return (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Decode state: keys/values of every layer and which slots hold real tokens.

    Attributes:
      k, v: tuples of ``num_layers`` arrays ``[B, H_kv, S, head_dim]`` (compute dtype).
      mask: ``[B, S]`` bool, True for slots holding a real (non-padding) token.
      index: ``[]`` int32, the next slot to write (the same for every row).
      next_pos: ``[B]`` int32, position id of the next real token of each row (its count of real
        tokens so far).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    mask: Array
    index: Array
    next_pos: Array

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for ``batch_size`` rows of at most ``max_len`` tokens (prompt + response).

    ``config`` is any decoder config (``num_layers``, ``num_kv_heads``, ``head_dim``, ``dtype``).
    """
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        mask=jnp.zeros((batch_size, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch_size,), jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Small modules
# --------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("embed",))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * scale`` over the last axis, in float32 (Llama's norm)."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """``down(act(up(x)))``: ``up_kernel [D, F]``, ``down_kernel [F, D]`` and biases.

    Shared by GPT-NeoX, GPT-2 and DistilBERT.
    """

    def __init__(self, dim: int, hidden: int, act: str, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        pd = jnp.dtype(param_dtype)
        self.act = ACTIVATIONS[act]
        self.up_kernel = nnx.Param(normal(rngs, (dim, hidden), init_std, pd), axes=("embed", "mlp"))
        self.up_bias = nnx.Param(jnp.zeros((hidden,), pd), axes=("mlp",))
        self.down_kernel = nnx.Param(normal(rngs, (hidden, dim), init_std, pd), axes=("mlp", "embed"))
        self.down_bias = nnx.Param(jnp.zeros((dim,), pd), axes=("embed",))

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        h = jnp.dot(x, self.up_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        h = self.act(h + self.up_bias[...].astype(jnp.float32)).astype(dt)
        y = jnp.dot(h, self.down_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        return (y + self.down_bias[...].astype(jnp.float32)).astype(dt)


# --------------------------------------------------------------------------------------------
# Rotary embeddings and attention
# --------------------------------------------------------------------------------------------


def rope_inv_freq(base: float, dim: int) -> np.ndarray:
    """``base^(-2i / dim)`` for ``i < ceil(dim / 2)`` (float32 numpy)."""
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def rotary_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos, sin ``[B, T, 2 * len(inv_freq)]`` (float32) for integer ``positions [B, T]``.

    The angles ``positions * inv_freq`` are duplicated (HF's rotate-half layout).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array, rotary_dim: int) -> Array:
    """Rotate the first ``rotary_dim`` dims of ``x [B, T, H, hd]`` (HF's non-interleaved rotate-half)."""
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    out = x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    attn_bias: Array,
    cache_kv: tuple[Array, Array] | None,
    cache_index: Array | None,
    *,
    local: bool,
) -> tuple[Array, tuple[Array, Array] | None]:
    """Scaled dot-product attention with an optional KV cache and grouped-query heads.

    Args:
      q: ``[B, Tq, H, hd]`` rotated queries (compute dtype).
      k, v: ``[B, T, H_kv, hd]`` rotated keys / values of the new tokens (``H % H_kv == 0``; query
        head ``h`` reads key/value head ``h // (H / H_kv)``, as HF's ``repeat_kv``).
      attn_bias: ``[B, 1, Tq, S]`` additive mask (``S = T`` without a cache or with ``local``).
      cache_kv: ``([B, H_kv, S, hd], [B, H_kv, S, hd])`` or None; the new keys/values are written at
        slot ``cache_index``.
      local: attend only to the ``T`` new keys/values (an empty cache's prefill).

    Returns:
      ``(ctx [B, Tq, H, hd], new cache or None)``.
    """
    dt = q.dtype
    B, Tq, H, hd = q.shape
    k = k.transpose(0, 2, 1, 3)  # [B, H_kv, T, hd]
    v = v.transpose(0, 2, 1, 3)
    new_cache = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, cache_index, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache_index, 0))
        new_cache = (ck, cv)
        if not local:
            k, v = ck, cv
    Hkv = k.shape[1]
    qg = q.reshape(B, Tq, Hkv, H // Hkv, hd)
    scores = jnp.einsum("btkge,bkse->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd)) + attn_bias[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    ctx = jnp.einsum("bkgts,bkse->btkge", probs, v, preferred_element_type=jnp.float32).astype(dt)
    return ctx.reshape(B, Tq, H, hd), new_cache


class Block(nnx.Module):
    """One pre-norm decoder layer: sequential ``x + attn(n1(x))`` then ``x + mlp(n2(x))``, or
    parallel ``x + attn(n1(x)) + mlp(n2(x))`` (GPT-NeoX/Pythia).

    The network passes in its own norms, attention (called as
    ``attention(h, cos, sin, attn_bias, cache_kv, cache_index, local=, queries_from=)``) and MLP.

    ``queries_from`` (a static int or None): compute the layer's output only at positions
    ``queries_from …  T-1`` (``[B, T - queries_from, D]``); the keys/values still cover every position.
    Used for the last layer, whose outputs at earlier positions nobody reads.
    """

    def __init__(self, input_layernorm, attention, post_attention_layernorm, mlp, *, parallel: bool):
        self.parallel = parallel
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.attention = attention
        self.mlp = mlp

    def __call__(self, x, cos, sin, attn_bias, cache_kv, cache_index, *, local=False, queries_from=None):
        if queries_from is not None:
            attn_bias = attn_bias[:, :, queries_from:]
        attn, new_kv = self.attention(
            self.input_layernorm(x), cos, sin, attn_bias, cache_kv, cache_index,
            local=local, queries_from=queries_from,
        )
        if queries_from is not None:
            x = x[:, queries_from:]
        if self.parallel:
            x = x + attn + self.mlp(self.post_attention_layernorm(x))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


# --------------------------------------------------------------------------------------------
# Outputs and read-outs
# --------------------------------------------------------------------------------------------


class ModelOutput(NamedTuple):
    """What a decoder's forward pass returns.

    Attributes:
      hidden: ``[B, T, D]`` final-normed hidden states (compute dtype).
      logits: ``[B, T, V]`` float32 next-token logits, or None (no LM head / not asked for).
      values: ``[B, T]`` float32 value-head outputs ``V(s_t)``, or None.
      scores: ``[B]`` float32 score-head output at each row's last real token, or None.
      cache: the updated :class:`KVCache` when one was passed in, else None.
    """

    hidden: Array
    logits: Array | None
    values: Array | None
    scores: Array | None
    cache: KVCache | None


def last_token_index(mask: Array) -> Array:
    """Index of the last nonzero entry of each row of ``mask [B, T]`` (0 for an all-zero row).

    Works for padding on the left, on the right, or both.
    """
    mask = jnp.asarray(mask).astype(bool)
    T = mask.shape[-1]
    idx = jnp.where(mask, jnp.arange(T), -1).max(axis=-1)
    return jnp.maximum(idx, 0)


def gather_last(x: Array, mask: Array) -> Array:
    """``x [B, T, ...]`` at each row's last real token of ``mask [B, T]`` → ``[B, ...]``."""
    idx = last_token_index(mask)
    return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def mask_positions(mask: Array) -> Array:
    """Position ids ``max(cumsum(mask) - 1, 0)`` ``[B, T]`` int32: padding does not move them."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(mask).astype(jnp.int32), axis=1) - 1, 0)


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


class DecoderLM(nnx.Module):
    """Shared forward pass and heads of a decoder-only transformer.

    A subclass builds ``embed_in [V, D]``, ``layers`` (blocks called as
    ``block(x, cos, sin, attn_bias, cache_kv, cache_index, local=, queries_from=)``), a
    ``final_layer_norm`` and calls :meth:`_init_heads`; it defines :meth:`rotary` (positions →
    cos, sin).
    """

    def _init_heads(self, c, rngs: nnx.Rngs):
        pd = jnp.dtype(c.param_dtype)
        if c.lm_head and not c.tie_word_embeddings:
            self.embed_out = nnx.Param(
                normal(rngs, (c.hidden_size, c.vocab_size), c.initializer_range, pd),
                axes=("embed", "vocab"),
            )
        head_std = 1.0 / math.sqrt(c.hidden_size + 1)  # (init_value_head draws the same law)
        if c.value_head:
            self.value_kernel = nnx.Param(normal(rngs, (c.hidden_size,), head_std, pd), axes=("embed",))
            self.value_bias = nnx.Param(jnp.zeros((), pd), axes=())
        if c.score_head:
            self.score_kernel = nnx.Param(normal(rngs, (c.hidden_size,), head_std, pd), axes=("embed",))

    def rotary(self, positions: Array) -> tuple[Array, Array]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(
        self,
        tokens: Array,
        mask: Array,
        *,
        cache: KVCache | None = None,
        logits: bool = True,
        prefill: bool = False,
        queries_from: int | None = None,
    ) -> ModelOutput:
        """Run the network.

        Args:
          tokens: ``[B, T]`` int token ids, left-padded.
          mask: ``[B, T]`` 1 for real tokens, 0 for padding.
          cache: optional :class:`KVCache`; the ``T`` tokens are written at slots
            ``cache.index … cache.index + T - 1`` and attend to every real slot before them.
          logits: compute the ``[B, T, V]`` logits (set False to get only hidden/values/scores).
          prefill: the fast path of a sampler's prefill. Needs a ``cache`` that holds no real
            token (fresh from :func:`init_cache`, or with only padding written so far): the
            queries attend only to the ``T`` new keys/values instead of all ``S`` slots, and the
            last layer's attention output, its MLP, the final norm and the heads are computed
            **at the last position only**, so ``hidden``/``logits``/``values`` come back
            ``[B, 1, ...]`` (``scores`` reads that position). The cache gets the keys/values of
            every position, exactly as without ``prefill``.
          queries_from: a static int ``q`` (``0 <= q < T``) or None: the outputs are wanted only at
            positions ``q … T-1``. The last layer's attention output and MLP, the final norm and the
            heads then run only there (every layer's keys/values still cover all ``T`` positions),
            and ``hidden``/``logits``/``values`` come back ``[B, T - q, ...]``; the values equal
            ``out[:, q:]`` of the full pass. ``scores`` are the full pass's for every row whose last
            real token is at ``q`` or later (left-padded prompts + right-padded responses with
            ``q`` = the last prompt slot), NaN for a row that ends before ``q`` (not computed).
            Scoring and training a policy on prompt + response want only the ``Tr + 1`` positions
            from the last prompt token on: this skips the last layer's work on the rest of the
            prompt. ``prefill`` implies ``q = T - 1``.

        Returns:
          :class:`ModelOutput`.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        tokens = jnp.asarray(tokens)
        mask = jnp.asarray(mask).astype(bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(
                f"tokens and mask must both be [B, T]; got tokens {tokens.shape}, mask {mask.shape}"
            )
        B, T = tokens.shape
        mask_i = mask.astype(jnp.int32)
        if prefill:
            if queries_from not in (None, T - 1):
                raise ValueError(
                    f"prefill=True computes the last position only (queries_from={T - 1}); got "
                    f"queries_from={queries_from!r}. Drop one of the two."
                )
            queries_from = T - 1
        if queries_from is not None and not (
            isinstance(queries_from, int) and 0 <= queries_from < T
        ):
            raise ValueError(
                f"queries_from={queries_from!r} must be a Python int in [0, {T}) (the sequence length "
                "is T), or None for outputs at every position."
            )
        if prefill and cache is None:
            raise ValueError(
                "prefill=True needs a cache (an empty one from init_cache): it writes the prompt's "
                "keys/values there. Pass cache=init_cache(config, B, max_len), or prefill=False."
            )
        if cache is None:
            positions = mask_positions(mask_i)
            causal = jnp.tril(jnp.ones((T, T), bool))
            allowed = causal[None, :, :] & mask[:, None, :]  # [B, T(q), T(k)]
            cache_index = None
        else:
            positions = cache.next_pos[:, None] + mask_positions(mask_i)
            S = cache.max_len
            new_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            q_slot = cache.index + jnp.arange(T)
            k_slot = jnp.arange(S)
            causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
            allowed = causal[None] & new_mask[:, None, :]
            cache_index = cache.index
            if prefill:  # an empty cache: attend among the T new tokens only
                allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
        attn_bias = jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)[:, None]
        cos, sin = self.rotary(positions)

        x = jnp.take(self.embed_in[...], tokens, axis=0).astype(dt)
        new_k, new_v = [], []
        n_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, new_kv = layer(
                x, cos, sin, attn_bias, kv, cache_index,
                local=prefill, queries_from=queries_from if i == n_layers - 1 else None,
            )
            if new_kv is not None:
                new_k.append(new_kv[0])
                new_v.append(new_kv[1])
        hidden = self.final_layer_norm(x)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                mask=new_mask,
                index=cache.index + T,
                next_pos=cache.next_pos + mask_i.sum(axis=1),
            )
        return ModelOutput(
            hidden=hidden,
            logits=self.logits(hidden) if (logits and c.lm_head) else None,
            values=self.values(hidden) if c.value_head else None,
            scores=self._scores_from(hidden, mask, queries_from) if c.score_head else None,
            cache=new_cache,
        )

    def _scores_from(self, hidden: Array, mask: Array, queries_from: int | None) -> Array:
        """The score head at each row's last real token, of ``hidden`` from position ``queries_from``
        on: NaN for a row whose last real token is before it (its score was not computed)."""
        if queries_from is None:
            return self.scores(hidden, mask)
        seen = mask[:, queries_from:]
        ended_before = mask.any(axis=1) & ~seen.any(axis=1)
        return jnp.where(ended_before, jnp.nan, self.scores(hidden, seen))

    # -- heads ---------------------------------------------------------------------------------

    def value_network(self) -> "DecoderLM":
        """The module whose forward gives ``ModelOutput.values``: this one (a value head on the
        trunk; :class:`klq_jax.models.critic.PolicyWithCritic` returns its separate critic)."""
        return self

    def unembedding(self) -> Array:
        """The ``[D, V]`` unembedding matrix (``embed_in.T`` when tied)."""
        if not self.config.lm_head:
            raise ValueError("This model has no LM head (config.lm_head=False).")
        if self.config.tie_word_embeddings:
            return self.embed_in[...].T
        return self.embed_out[...]

    def logits(self, hidden: Array) -> Array:
        """``hidden [..., D]`` → float32 logits ``[..., V]``."""
        w = self.unembedding().astype(hidden.dtype)
        return jnp.dot(hidden, w, preferred_element_type=jnp.float32)

    def values(self, hidden: Array) -> Array:
        """Value head: ``hidden [..., D]`` → float32 ``V [...]``."""
        if not self.config.value_head:
            raise ValueError("This model has no value head (config.value_head=False).")
        v = jnp.dot(hidden.astype(jnp.float32), self.value_kernel[...].astype(jnp.float32))
        return v + self.value_bias[...].astype(jnp.float32)

    def scores(self, hidden: Array, mask: Array) -> Array:
        """Score head read at each row's last real token: ``[B, T, D]``, ``[B, T]`` → float32 ``[B]``."""
        if not self.config.score_head:
            raise ValueError("This model has no score head (config.score_head=False).")
        per_token = jnp.dot(hidden.astype(jnp.float32), self.score_kernel[...].astype(jnp.float32))
        return gather_last(per_token, mask)


def init_value_head(config, key: Array) -> dict[str, Array]:
    """A fresh value head ``{"value_kernel": [D], "value_bias": []}`` in ``config.param_dtype``.

    The initialisation of a decoder's value head (normal with std ``1/sqrt(D + 1)``, zero bias), for
    adding a head to a model loaded without one.
    """
    pd = jnp.dtype(config.param_dtype)
    std = 1.0 / math.sqrt(config.hidden_size + 1)
    return {
        "value_kernel": (std * jax.random.normal(key, (config.hidden_size,))).astype(pd),
        "value_bias": jnp.zeros((), pd),
    }


def init_split(model_cls, config, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialised ``model_cls(config)`` split into ``(graphdef, params)``."""
    return nnx.split(model_cls(config, rngs=nnx.Rngs(params=key)), nnx.Param)


def abstract_split(model_cls, config) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of ``model_cls(config)`` with ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: nnx.split(model_cls(config, rngs=nnx.Rngs(0)), nnx.Param))


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: Array,
    mask: Array,
    *,
    cache: KVCache | None = None,
    logits: bool = True,
) -> ModelOutput:
    """Pure forward pass: ``nnx.merge(graphdef, params)(tokens, mask, cache=cache)``.

    Works for any decoder (GPT-NeoX, Llama): the graphdef carries the network. With a bfloat16 or
    float16 compute dtype, call it under ``jax.jit`` on CPU: XLA:CPU's eager (op-by-op) matmul
    refuses the bf16 × bf16 → float32 products the model accumulates in ("Unsupported element
    type for DotThunk"); jitted, it runs (float32 runs either way).

    Args:
      graphdef, params: from an ``init``, ``abstract_params`` or the HF converter.
      tokens: ``[B, T]`` int token ids, left-padded.
      mask: ``[B, T]`` 1 on real tokens.
      cache: optional :class:`KVCache` (see :meth:`DecoderLM.__call__`).
      logits: also compute the float32 ``[B, T, V]`` logits.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, mask, cache=cache, logits=logits)


def param_count(params) -> int:
    """Number of scalars in a params pytree (works on abstract params too)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
