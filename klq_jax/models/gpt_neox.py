"""GPT-NeoX (Pythia) in Flax NNX, with a KV cache and scalar (value / score) heads.

One transformer serves as the policy (LM head + value head), the frozen reference policy (LM head)
and the reward model (score head), as in the paper (§3.2: "a randomly initialised value head added
to the policy network").

The functional boundary (DESIGN.md): build a module once, split it into a static ``graphdef`` and a
``params`` pytree (``nnx.State`` of ``nnx.Param``), and let every jitted function take ``params`` and
call ``nnx.merge(graphdef, params)`` inside::

    >>> import jax, jax.numpy as jnp
    >>> from klq_jax.models import gpt_neox
    >>> cfg = gpt_neox.GPTNeoXConfig.tiny(value_head=True)
    >>> graphdef, params = gpt_neox.init(cfg, jax.random.key(0))
    >>> tokens = jnp.array([[0, 0, 5, 6, 7]]); mask = jnp.array([[0, 0, 1, 1, 1]])
    >>> out = gpt_neox.apply(graphdef, params, tokens, mask)
    >>> out.logits.shape, out.values.shape
    ((1, 5, 64), (1, 5))

Conventions
-----------
* Batches are **left-padded** ``tokens [B, T]`` with a float/bool ``mask [B, T]`` (1 = real token).
  Position ids are derived from the mask (``cumsum(mask) - 1``), so a padded row gives the same
  outputs on its real tokens as the unpadded row.
* Hidden states are in the compute dtype (``config.dtype``: float32 on CPU, bfloat16 on
  accelerators); logits, values and scores are always float32.
* Every parameter carries logical axis names in its ``axes`` metadata (``'vocab'``, ``'embed'``,
  ``'qkv'``, ``'heads'``, ``'head_dim'``, ``'mlp'``, ``None``); ``klq_jax.sharding`` maps them onto a
  device mesh with one rules table.
* The KV cache (:class:`KVCache`) is a plain pytree, laid out ``[B, H, S, head_dim]`` per layer so the
  decode-step attention contracts without transposing the cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# Large negative number for masked attention logits: finite, so fully masked rows (padding queries)
# give a uniform softmax instead of NaN.
_MASK_VALUE = -1e30


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


_ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
}



@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    """Shapes and numerics of a GPT-NeoX network (the fields of Hugging Face's ``GPTNeoXConfig``).

    Attributes:
      vocab_size: rows of the embedding and of the unembedding (Pythia: 50304 up to 2.8b).
      hidden_size: model width D.
      num_layers: number of transformer blocks L.
      num_heads: attention heads H; ``head_dim = hidden_size // num_heads``.
      intermediate_size: MLP width F.
      rotary_pct: fraction of each head's dims that get rotary embeddings (Pythia: 0.25).
      rotary_emb_base: rotary base θ (Pythia: 10000).
      max_position_embeddings: longest sequence the rotary table is meant for.
      layer_norm_eps: LayerNorm epsilon.
      use_parallel_residual: ``x + attn(ln1(x)) + mlp(ln2(x))`` (Pythia) instead of sequential.
      attention_bias: biases on the QKV and output projections.
      tie_word_embeddings: reuse ``embed_in`` as the unembedding (Pythia: False).
      hidden_act: ``"gelu"`` (exact erf GELU, Pythia), ``"gelu_new"``/``"gelu_fast"`` (tanh approx.) or ``"relu"``.
      lm_head: build the unembedding (``embed_out``); False for a reward model.
      value_head: build a value head ``V(s_t)`` = Linear(D, 1) on the final hidden state.
      score_head: build a reward-model score head (Linear(D, 1), no bias, as HF's
        ``GPTNeoXForSequenceClassification.score``), read at the last real token.
      dtype: compute dtype of activations and matmuls (``"float32"`` or ``"bfloat16"``).
      param_dtype: storage dtype of parameters (float32).
      initializer_range: std of the normal init of weights (HF: 0.02).
    """

    vocab_size: int = 50304
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    lm_head: bool = True
    value_head: bool = False
    score_head: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("Invalid GPTNeoXConfig: " + "; ".join(problems))
        if self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0 or int(self.head_dim * self.rotary_pct) < 1:
            problems.append(
                f"rotary_pct={self.rotary_pct} must be in (0, 1] and leave at least one rotary dim "
                f"(head_dim={self.hidden_size // self.num_heads})"
            )
        elif 2 * ((int(self.head_dim * self.rotary_pct) + 1) // 2) > self.head_dim:
            problems.append(
                f"rotary_pct={self.rotary_pct} with head_dim={self.head_dim} rotates more dims than "
                "the head has"
            )
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(
                f"hidden_act={self.hidden_act!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r} must be 'float32', 'bfloat16' or 'float16'")
        if self.tie_word_embeddings and not self.lm_head:
            problems.append("tie_word_embeddings=True needs lm_head=True")
        if problems:
            raise ValueError("Invalid GPTNeoXConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_base_dim(self) -> int:
        """``int(head_dim * rotary_pct)``: the ``d`` in the rotary frequencies ``base^(-2i/d)`` (HF)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def rotary_dim(self) -> int:
        """Head dims that get rotated: ``2 * ceil(d / 2)``, which is ``d`` for every Pythia model.

        For an odd ``d`` this reproduces what Hugging Face computes (one extra rotated dim).
        """
        return 2 * ((self.rotary_base_dim + 1) // 2)

    def replace(self, **changes) -> "GPTNeoXConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTNeoXConfig":
        """A Pythia size by name (``"pythia-1b"``; ``-deduped`` suffixes share the shapes)."""
        key = name.split("/")[-1].lower().replace("-deduped", "").replace("eleutherai_", "")
        if key not in PYTHIA_PRESETS:
            raise ValueError(
                f"Unknown GPT-NeoX preset {name!r}. Known presets: {sorted(PYTHIA_PRESETS)} "
                "(a '-deduped' suffix is accepted)."
            )
        return dataclasses.replace(PYTHIA_PRESETS[key], **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "GPTNeoXConfig":
        """A tiny config for tests and CPU demos (vocab 64, D 32, 2 layers, 4 heads)."""
        base = cls(
            vocab_size=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
        )
        return dataclasses.replace(base, **overrides)


def _pythia(hidden, layers, heads, vocab=50304):
    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden,
    )


# Shapes from EleutherAI's published config.json files (the deduped twins are identical). The two
# largest models pad the vocabulary further (50432, 50688) for tensor parallelism.
PYTHIA_PRESETS: dict[str, GPTNeoXConfig] = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-31m": _pythia(256, 6, 8),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
}

# Published parameter counts of the causal-LM checkpoints (Pythia model cards, "Total Params").
PYTHIA_PARAM_COUNTS: dict[str, int] = {
    "pythia-14m": 14_067_712,
    "pythia-31m": 30_494_720,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
}


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Decode state: keys/values of every layer and which slots hold real tokens.

    Attributes:
      k, v: tuples of ``num_layers`` arrays ``[B, H, S, head_dim]`` (compute dtype).
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


def init_cache(config: GPTNeoXConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for ``batch_size`` rows of at most ``max_len`` tokens (prompt + response)."""
    shape = (batch_size, config.num_heads, max_len, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    zeros_v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        k=zeros,
        v=zeros_v,
        mask=jnp.zeros((batch_size, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch_size,), jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


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


def _rotary(positions: Array, base_dim: int, base: float) -> tuple[Array, Array]:
    """cos, sin ``[B, T, 2*ceil(base_dim/2)]`` (float32) for integer ``positions [B, T]``.

    Frequencies ``base^(-2i / base_dim)`` for ``i < ceil(base_dim / 2)``, duplicated (rotate-half layout).
    """
    inv_freq = 1.0 / (base ** (np.arange(0, base_dim, 2, dtype=np.float32) / base_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: Array, cos: Array, sin: Array, rotary_dim: int) -> Array:
    """Rotate the first ``rotary_dim`` dims of ``x [B, T, H, hd]`` (HF's non-interleaved rotate-half)."""
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    out = x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


class Attention(nnx.Module):
    """Multi-head causal self-attention with a fused QKV projection and partial rotary embeddings.

    Parameters: ``qkv.kernel [D, 3, H, hd]`` (q, k, v stacked on axis 1), ``qkv.bias [3, H, hd]``,
    ``out.kernel [H, hd, D]``, ``out.bias [D]``.
    """

    def __init__(self, config: GPTNeoXConfig, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.qkv_kernel = nnx.Param(
            _normal(rngs, (c.hidden_size, 3, c.num_heads, c.head_dim), c.initializer_range, pd),
            axes=("embed", "qkv", "heads", "head_dim"),
        )
        self.out_kernel = nnx.Param(
            _normal(rngs, (c.num_heads, c.head_dim, c.hidden_size), c.initializer_range, pd),
            axes=("heads", "head_dim", "embed"),
        )
        if c.attention_bias:
            self.qkv_bias = nnx.Param(
                jnp.zeros((3, c.num_heads, c.head_dim), pd), axes=("qkv", "heads", "head_dim")
            )
            self.out_bias = nnx.Param(jnp.zeros((c.hidden_size,), pd), axes=("embed",))

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        attn_bias: Array,
        cache_kv: tuple[Array, Array] | None,
        cache_index: Array | None,
        *,
        local: bool = False,
        last_only: bool = False,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x ``[B, T, D]`` → ``[B, T, D]``; ``attn_bias [B, 1, T, S]`` additive; cache ``[B, H, S, hd]``.

        ``local``: the new keys/values are written to the cache but the queries attend only to the
        ``T`` new ones (an empty cache; ``attn_bias`` is then ``[B, 1, T, T]``). ``last_only``: only
        the last query position is computed (output ``[B, 1, D]``; ``attn_bias [B, 1, 1, ·]``).
        """
        c = self.config
        dt = x.dtype
        w = self.qkv_kernel[...].astype(dt)
        b = self.qkv_bias[...].astype(jnp.float32) if c.attention_bias else None
        if last_only:
            # Keys/values for every position (they go to the cache), the query only for the last.
            kv = jnp.einsum("btd,dkhe->btkhe", x, w[:, 1:], preferred_element_type=jnp.float32)
            q = jnp.einsum("btd,dhe->bthe", x[:, -1:], w[:, 0], preferred_element_type=jnp.float32)
            if b is not None:
                kv, q = kv + b[1:], q + b[0]
            k, v = kv[:, :, 0].astype(dt), kv[:, :, 1].astype(dt)
            q = _apply_rotary(q.astype(dt), cos[:, -1:], sin[:, -1:], c.rotary_dim)
        else:
            qkv = jnp.einsum("btd,dkhe->btkhe", x, w, preferred_element_type=jnp.float32)
            if b is not None:
                qkv = qkv + b
            qkv = qkv.astype(dt)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
            q = _apply_rotary(q, cos, sin, c.rotary_dim)
        k = _apply_rotary(k, cos, sin, c.rotary_dim)
        k = k.transpose(0, 2, 1, 3)  # [B, H, T, hd]
        v = v.transpose(0, 2, 1, 3)
        new_cache = None
        if cache_kv is not None:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, cache_index, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, cache_index, 0))
            new_cache = (ck, cv)
            if not local:
                k, v = ck, cv
        scale = 1.0 / math.sqrt(c.head_dim)
        q = q.transpose(0, 2, 1, 3)  # [B, H, T, hd]
        scores = jnp.einsum("bhqe,bhke->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * scale + attn_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        ctx = jnp.einsum("bhqk,bhke->bqhe", probs, v, preferred_element_type=jnp.float32).astype(dt)
        out = jnp.einsum(
            "bqhe,hed->bqd", ctx, self.out_kernel[...].astype(dt), preferred_element_type=jnp.float32
        )
        if c.attention_bias:
            out = out + self.out_bias[...].astype(jnp.float32)
        return out.astype(dt), new_cache


class MLP(nnx.Module):
    """``down(act(up(x)))``: ``up_kernel [D, F]``, ``down_kernel [F, D]`` and biases.

    Shared by GPT-NeoX and GPT-2 (:mod:`klq_jax.models.gpt2`).
    """

    def __init__(self, dim: int, hidden: int, act: str, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        pd = jnp.dtype(param_dtype)
        self.act = _ACTIVATIONS[act]
        self.up_kernel = nnx.Param(_normal(rngs, (dim, hidden), init_std, pd), axes=("embed", "mlp"))
        self.up_bias = nnx.Param(jnp.zeros((hidden,), pd), axes=("mlp",))
        self.down_kernel = nnx.Param(_normal(rngs, (hidden, dim), init_std, pd), axes=("mlp", "embed"))
        self.down_bias = nnx.Param(jnp.zeros((dim,), pd), axes=("embed",))

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        h = jnp.dot(x, self.up_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        h = self.act(h + self.up_bias[...].astype(jnp.float32)).astype(dt)
        y = jnp.dot(h, self.down_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        return (y + self.down_bias[...].astype(jnp.float32)).astype(dt)


class Block(nnx.Module):
    """One GPT-NeoX layer (parallel or sequential residual)."""

    def __init__(self, config: GPTNeoXConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.parallel = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, pd)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, pd)
        self.attention = Attention(config, rngs)
        self.mlp = MLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            init_std=config.initializer_range,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, attn_bias, cache_kv, cache_index, *, local=False, last_only=False):
        if last_only:
            attn_bias = attn_bias[:, :, -1:]
        attn, new_kv = self.attention(
            self.input_layernorm(x), cos, sin, attn_bias, cache_kv, cache_index,
            local=local, last_only=last_only,
        )
        if last_only:
            x = x[:, -1:]
        if self.parallel:
            x = x + attn + self.mlp(self.post_attention_layernorm(x))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class ModelOutput(NamedTuple):
    """What :func:`apply` returns.

    Attributes:
      hidden: ``[B, T, D]`` final-layer-normed hidden states (compute dtype).
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


class GPTNeoX(nnx.Module):
    """The GPT-NeoX network with optional LM, value and score heads (see the module docstring)."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.embed_in = nnx.Param(
            _normal(rngs, (c.vocab_size, c.hidden_size), c.initializer_range, pd),
            axes=("vocab", "embed"),
        )
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
        self.final_layer_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, pd)
        if c.lm_head and not c.tie_word_embeddings:
            self.embed_out = nnx.Param(
                _normal(rngs, (c.hidden_size, c.vocab_size), c.initializer_range, pd),
                axes=("embed", "vocab"),
            )
        head_std = 1.0 / math.sqrt(c.hidden_size + 1)
        if c.value_head:
            self.value_kernel = nnx.Param(_normal(rngs, (c.hidden_size,), head_std, pd), axes=("embed",))
            self.value_bias = nnx.Param(jnp.zeros((), pd), axes=())
        if c.score_head:
            self.score_kernel = nnx.Param(_normal(rngs, (c.hidden_size,), head_std, pd), axes=("embed",))

    # -- trunk ---------------------------------------------------------------------------------

    def __call__(
        self,
        tokens: Array,
        mask: Array,
        *,
        cache: KVCache | None = None,
        logits: bool = True,
        prefill: bool = False,
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
            last layer's attention output, its MLP, the final layer norm and the heads are
            computed **at the last position only**, so ``hidden``/``logits``/``values`` come back
            ``[B, 1, ...]`` (``scores`` reads that position). The cache gets the keys/values of
            every position, exactly as without ``prefill``.

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
        if prefill and cache is None:
            raise ValueError(
                "prefill=True needs a cache (an empty one from init_cache): it writes the prompt's "
                "keys/values there. Pass cache=init_cache(config, B, max_len), or prefill=False."
            )
        if cache is None:
            positions = jnp.maximum(jnp.cumsum(mask_i, axis=1) - 1, 0)
            causal = jnp.tril(jnp.ones((T, T), bool))
            allowed = causal[None, :, :] & mask[:, None, :]  # [B, T(q), T(k)]
            cache_index = None
        else:
            positions = cache.next_pos[:, None] + jnp.maximum(jnp.cumsum(mask_i, axis=1) - 1, 0)
            S = cache.max_len
            new_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            q_slot = cache.index + jnp.arange(T)
            k_slot = jnp.arange(S)
            causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
            allowed = causal[None] & new_mask[:, None, :]
            cache_index = cache.index
            if prefill:  # an empty cache: attend among the T new tokens only
                allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
        attn_bias = jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)[:, None]
        cos, sin = _rotary(positions, c.rotary_base_dim, c.rotary_emb_base)

        x = jnp.take(self.embed_in[...], tokens, axis=0).astype(dt)
        new_k, new_v = [], []
        n_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, new_kv = layer(
                x, cos, sin, attn_bias, kv, cache_index,
                local=prefill, last_only=prefill and i == n_layers - 1,
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
            scores=(self.scores(hidden, mask[:, -1:] if prefill else mask) if c.score_head else None),
            cache=new_cache,
        )

    # -- heads ---------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def init(config: GPTNeoXConfig, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a randomly initialised model and split it into ``(graphdef, params)``."""
    model = GPTNeoX(config, rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def init_value_head(config: GPTNeoXConfig, key: Array) -> dict[str, Array]:
    """A fresh value head ``{"value_kernel": [D], "value_bias": []}`` in ``config.param_dtype``.

    The initialisation of :class:`GPTNeoX`'s value head (normal with std ``1/sqrt(D + 1)``, zero
    bias), for adding a head to a model loaded without one.
    """
    pd = jnp.dtype(config.param_dtype)
    std = 1.0 / math.sqrt(config.hidden_size + 1)
    return {
        "value_kernel": (std * jax.random.normal(key, (config.hidden_size,))).astype(pd),
        "value_bias": jnp.zeros((), pd),
    }


def abstract_params(config: GPTNeoXConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: nnx.split(GPTNeoX(config, rngs=nnx.Rngs(0)), nnx.Param))


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

    Args:
      graphdef, params: from :func:`init`, :func:`abstract_params` or the HF converter.
      tokens: ``[B, T]`` int token ids, left-padded.
      mask: ``[B, T]`` 1 on real tokens.
      cache: optional :class:`KVCache` (see :meth:`GPTNeoX.__call__`).
      logits: also compute the float32 ``[B, T, V]`` logits.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, mask, cache=cache, logits=logits)


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree (works on abstract params too)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
