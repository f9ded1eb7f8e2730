"""GPT-2 in Flax NNX with the score head of ``GPT2ForSequenceClassification`` (the HH reward model).

The paper's Anthropic-HH reward model, ``Ray2333/gpt2-large-helpful-reward_model``, is a
``GPT2ForSequenceClassification`` (rlhf_facts.md §4: n_embd 1280, 36 layers, 20 heads, n_ctx 1024,
``score = Linear(n_embd, 1, bias=False)``). This module holds the network, in the style of
:mod:`klq_jax.models.gpt_neox` (frozen config, ``(graphdef, params)`` split, ``axes`` metadata on
every parameter, float32 outputs)::

    >>> import jax, jax.numpy as jnp
    >>> from klq_jax.models import gpt2
    >>> cfg = gpt2.GPT2Config.tiny()
    >>> graphdef, params = gpt2.init(cfg, jax.random.key(0))
    >>> tokens = jnp.array([[5, 6, 7, 0, 0]]); mask = jnp.array([[1, 1, 1, 0, 0]])
    >>> out = gpt2.apply(graphdef, params, tokens, mask)
    >>> out.scores.shape, out.scores.dtype
    ((1,), dtype('float32'))

Architecture (pre-LN, Radford et al. 2019)::

    x_0 = wte[tokens] + wpe[positions]
    x   = x + attn(ln_1(x));   x = x + mlp(ln_2(x))      (each of the n_layer blocks)
    h   = ln_f(x);             score = h[last real token] · w_score

with causal multi-head attention scaled by ``1/sqrt(head_dim)`` and ``mlp = c_proj(gelu_new(c_fc(x)))``.

Padding: the tokenizer of the GPT-2 reward model has **no pad token**, so nothing here looks at pad
ids. Positions are ``max(cumsum(mask) - 1, 0)`` and the score is read at the last position where
``mask`` is 1, whatever ids the padding holds; padding may be on the left, the right or both.
A row's outputs on its real tokens equal those of the unpadded row (HF with the same
``attention_mask`` and ``position_ids``).

There is no KV cache: the model only scores complete sequences. Hugging Face checkpoints
(``GPT2ForSequenceClassification`` with one label, ``GPT2LMHeadModel``, ``GPT2Model``) load with
:func:`klq_jax.models.hf.load_hf`; the tensor table is :data:`klq_jax.models.hf.tables.GPT2`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from klq_jax.models import checks
from klq_jax.models.decoder import MLP, LayerNorm, gather_last
from klq_jax.models.decoder import ACTIVATIONS as _ACTIVATIONS
from klq_jax.models.decoder import MASK_VALUE as _MASK_VALUE
from klq_jax.models.decoder import normal as _normal

Array = jax.Array

__all__ = [
    "GPT2Config",
    "GPT2",
    "GPT2Output",
    "init",
    "abstract_params",
    "apply",
    "score",
]

@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Shapes and numerics of a GPT-2 network (the fields of Hugging Face's ``GPT2Config``).

    Attributes:
      vocab_size: rows of ``wte`` (GPT-2: 50257).
      n_positions: rows of the learned position table ``wpe`` (the longest input; GPT-2: 1024).
      n_embd: model width D.
      n_layer: number of blocks L.
      n_head: attention heads H; ``head_dim = n_embd // n_head``.
      n_inner: MLP width F (HF: ``None`` means ``4 * n_embd``).
      activation_function: ``"gelu_new"`` (tanh approximation, GPT-2), ``"gelu"``, ``"relu"``, ...
      layer_norm_epsilon: LayerNorm epsilon.
      scale_attn_weights: divide attention logits by ``sqrt(head_dim)``.
      scale_attn_by_inverse_layer_idx: also divide layer ``i``'s logits by ``i + 1``.
      lm_head: an LM head (``GPT2LMHeadModel``): logits ``hidden @ wte.T``, or ``hidden @ embed_out``
        if not ``tie_word_embeddings``.
      tie_word_embeddings: unembed with ``wte.T`` (GPT-2: True); False: a separate ``embed_out
        [D, V]`` (HF's untied ``lm_head.weight``). Only read with ``lm_head``.
      score_head: a scalar score head ``Linear(D, 1, bias=False)`` read at the last real token
        (``GPT2ForSequenceClassification`` with ``num_labels=1``).
      dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: storage dtype of the parameters.
      initializer_range: std of the normal init of the weights.
      hf_token_ids: as :class:`klq_jax.models.gpt_neox.GPTNeoXConfig`.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    lm_head: bool = False
    tie_word_embeddings: bool = True
    score_head: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    hf_token_ids: dict = checks.hf_token_ids_field()

    def __post_init__(self):
        problems = checks.positive(self, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
        if not problems:
            problems += checks.divisible(self, "n_embd", "n_head")
        if self.n_inner is not None and self.n_inner <= 0:
            problems.append(f"n_inner={self.n_inner} must be positive (or None for 4 * n_embd)")
        problems += checks.supported(self, "activation_function", _ACTIVATIONS) + checks.dtypes(self)
        checks.raise_if(problems, "GPT2Config")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> "GPT2Config":
        """A tiny config for tests (vocab 64, 32 positions, D 32, 2 layers, 4 heads)."""
        base = cls(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Causal self-attention: ``qkv_kernel [D, 3, H, hd]``, ``qkv_bias [3, H, hd]``,
    ``out_kernel [H, hd, D]``, ``out_bias [D]``."""

    def __init__(self, config: GPT2Config, layer_idx: int, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        scale = 1.0 / math.sqrt(c.head_dim) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        std = c.initializer_range
        self.qkv_kernel = nnx.Param(
            _normal(rngs, (c.n_embd, 3, c.n_head, c.head_dim), std, pd),
            axes=("embed", "qkv", "heads", "head_dim"),
        )
        self.qkv_bias = nnx.Param(jnp.zeros((3, c.n_head, c.head_dim), pd), axes=("qkv", "heads", "head_dim"))
        self.out_kernel = nnx.Param(
            _normal(rngs, (c.n_head, c.head_dim, c.n_embd), std, pd), axes=("heads", "head_dim", "embed")
        )
        self.out_bias = nnx.Param(jnp.zeros((c.n_embd,), pd), axes=("embed",))

    def __call__(self, x: Array, attn_bias: Array) -> Array:
        """``x [B, T, D]``, additive ``attn_bias [B, 1, T, T]`` → ``[B, T, D]``."""
        dt = x.dtype
        qkv = jnp.einsum("btd,dkhe->btkhe", x, self.qkv_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        qkv = (qkv + self.qkv_bias[...].astype(jnp.float32)).astype(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * self.scale + attn_bias, axis=-1).astype(dt)
        ctx = jnp.einsum("bhqk,bkhe->bqhe", probs, v, preferred_element_type=jnp.float32).astype(dt)
        out = jnp.einsum("bqhe,hed->bqd", ctx, self.out_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        return (out + self.out_bias[...].astype(jnp.float32)).astype(dt)


class Block(nnx.Module):
    """One pre-LN GPT-2 block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPT2Config, layer_idx: int, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, pd)
        self.attn = Attention(config, layer_idx, rngs)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, pd)
        self.mlp = MLP(
            config.n_embd,
            config.inner_size,
            config.activation_function,
            init_std=config.initializer_range,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, attn_bias: Array) -> Array:
        x = x + self.attn(self.ln_1(x), attn_bias)
        return x + self.mlp(self.ln_2(x))


class GPT2Output(NamedTuple):
    """What :func:`apply` returns.

    Attributes:
      hidden: ``[B, T, D]`` final-layer-normed hidden states (compute dtype).
      logits: ``[B, T, V]`` float32 logits (LM head models, when asked), else None.
      scores: ``[B]`` float32 score at each row's last real token (score head), else None.
    """

    hidden: Array
    logits: Array | None
    scores: Array | None


class GPT2(nnx.Module):
    """The GPT-2 network with an optional LM head (tied or not) and an optional score head."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.wte = nnx.Param(_normal(rngs, (c.vocab_size, c.n_embd), c.initializer_range, pd), axes=("vocab", "embed"))
        self.wpe = nnx.Param(_normal(rngs, (c.n_positions, c.n_embd), 0.01, pd), axes=(None, "embed"))
        self.h = nnx.List([Block(c, i, rngs) for i in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, pd)
        if c.lm_head and not c.tie_word_embeddings:
            self.embed_out = nnx.Param(
                _normal(rngs, (c.n_embd, c.vocab_size), c.initializer_range, pd), axes=("embed", "vocab")
            )
        if c.score_head:
            self.score_kernel = nnx.Param(_normal(rngs, (c.n_embd,), c.initializer_range, pd), axes=("embed",))

    def __call__(self, tokens: Array, mask: Array, *, logits: bool = True) -> GPT2Output:
        """Run the network on ``tokens [B, T]`` with ``mask [B, T]`` (1 = real token, any padding side)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        tokens = jnp.asarray(tokens)
        mask = jnp.asarray(mask).astype(bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"tokens and mask must both be [B, T]; got tokens {tokens.shape}, mask {mask.shape}")
        B, T = tokens.shape
        if T > c.n_positions:
            raise ValueError(
                f"Sequences of {T} tokens are longer than the model's n_positions={c.n_positions}; "
                "truncate the inputs (e.g. from the left) to at most n_positions tokens."
            )
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        causal = jnp.tril(jnp.ones((T, T), bool))
        allowed = causal[None] & mask[:, None, :]
        attn_bias = jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)[:, None]
        x = jnp.take(self.wte[...], tokens, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
        x = x.astype(dt)
        for block in self.h:
            x = block(x, attn_bias)
        hidden = self.ln_f(x)
        out_logits = None
        if logits and c.lm_head:
            unembed = self.wte[...].T if c.tie_word_embeddings else self.embed_out[...]
            out_logits = jnp.dot(hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)
        scores = None
        if c.score_head:
            per_token = jnp.dot(hidden.astype(jnp.float32), self.score_kernel[...].astype(jnp.float32))
            scores = gather_last(per_token, mask)
        return GPT2Output(hidden=hidden, logits=out_logits, scores=scores)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def init(config: GPT2Config, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialised model split into ``(graphdef, params)``."""
    return nnx.split(GPT2(config, rngs=nnx.Rngs(params=key)), nnx.Param)


def abstract_params(config: GPT2Config) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: nnx.split(GPT2(config, rngs=nnx.Rngs(0)), nnx.Param))


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, mask: Array, *, logits: bool = True) -> GPT2Output:
    """Pure forward pass ``nnx.merge(graphdef, params)(tokens, mask)``; see :class:`GPT2`."""
    return nnx.merge(graphdef, params)(tokens, mask, logits=logits)


def score(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, mask: Array) -> Array:
    """Reward-model scores ``[B]`` float32 of ``tokens [B, T]`` at each row's last real token.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> g, p = init(GPT2Config.tiny(), jax.random.key(0))
        >>> s = score(g, p, jnp.array([[3, 4, 5], [3, 4, 9]]), jnp.array([[1, 1, 1], [1, 1, 0]]))
        >>> s.shape
        (2,)
    """
    out = apply(graphdef, params, tokens, mask, logits=False)
    if out.scores is None:
        raise ValueError("This GPT-2 has no score head (config.score_head=False); load a GPT2ForSequenceClassification.")
    return out.scores
