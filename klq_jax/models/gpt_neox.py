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
* The forward loop, cache, heads and attention core are shared with Llama
  (:mod:`klq_jax.models.decoder`); this module holds the GPT-NeoX blocks and partial rotary only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from klq_jax.models import checks
from klq_jax.models.decoder import (  # noqa: F401  (re-exported: the public names of a decoder)
    ACTIVATIONS as _ACTIVATIONS,
    MLP,
    Block,
    DecoderLM,
    KVCache,
    LayerNorm,
    ModelOutput,
    abstract_split,
    apply,
    apply_rotary,
    cached_attention,
    gather_last,
    init_cache,
    init_split,
    init_value_head,
    last_token_index,
    normal as _normal,
    param_count,
    rope_inv_freq,
    rotary_tables,
)

Array = jax.Array


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
      hidden_act: ``"gelu"`` (exact erf GELU, Pythia), ``"gelu_new"``/``"gelu_fast"`` (tanh approx.), or ``"relu"``.
      lm_head: build the unembedding (``embed_out``); False for a reward model.
      value_head: build a value head ``V(s_t)`` = Linear(D, 1) on the final hidden state.
      score_head: build a reward-model score head (Linear(D, 1), no bias, as HF's
        ``GPTNeoXForSequenceClassification.score``), read at the last real token.
      dtype: compute dtype of activations and matmuls (``"float32"`` or ``"bfloat16"``).
      param_dtype: storage dtype of parameters (float32).
      initializer_range: std of the normal init of weights (HF: 0.02).
      hf_token_ids: ``bos/eos/pad_token_id`` of the Hugging Face config it was read from (``{}``:
        none), written back by ``save_hf``; ignored by ``==`` (:func:`checks.hf_token_ids_field`).
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
    hf_token_ids: dict = checks.hf_token_ids_field()

    def __post_init__(self):
        checks.raise_if(checks.positive(self, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "intermediate_size")), "GPTNeoXConfig")
        problems = checks.divisible(self, "hidden_size", "num_heads")
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
        problems += checks.supported(self, "hidden_act", _ACTIVATIONS) + checks.dtypes(self)
        if self.tie_word_embeddings and not self.lm_head:
            problems.append("tie_word_embeddings=True needs lm_head=True")
        checks.raise_if(problems, "GPTNeoXConfig")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (= ``num_heads``: GPT-NeoX has no grouped-query attention)."""
        return self.num_heads

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
        return checks.preset(PYTHIA_PRESETS, key, name, "GPT-NeoX", "a '-deduped' suffix is accepted",
                             overrides)

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
# Modules
# --------------------------------------------------------------------------------------------


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
        queries_from: int | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x ``[B, T, D]`` → ``[B, T, D]``; ``attn_bias [B, 1, T, S]`` additive; cache ``[B, H, S, hd]``.

        ``local``: the new keys/values are written to the cache but the queries attend only to the
        ``T`` new ones (an empty cache; ``attn_bias`` is then ``[B, 1, T, T]``). ``queries_from = q``:
        only the query positions ``q … T-1`` are computed (output ``[B, T - q, D]``;
        ``attn_bias [B, 1, T - q, ·]``); the keys/values still cover all ``T``.
        """
        c = self.config
        dt = x.dtype
        w = self.qkv_kernel[...].astype(dt)
        b = self.qkv_bias[...].astype(jnp.float32) if c.attention_bias else None
        if queries_from is not None:
            # Keys/values for every position (attended to / cached), queries only from `queries_from` on.
            qf = queries_from
            kv = jnp.einsum("btd,dkhe->btkhe", x, w[:, 1:], preferred_element_type=jnp.float32)
            q = jnp.einsum("btd,dhe->bthe", x[:, qf:], w[:, 0], preferred_element_type=jnp.float32)
            if b is not None:
                kv, q = kv + b[1:], q + b[0]
            k, v = kv[:, :, 0].astype(dt), kv[:, :, 1].astype(dt)
            q = apply_rotary(q.astype(dt), cos[:, qf:], sin[:, qf:], c.rotary_dim)
        else:
            qkv = jnp.einsum("btd,dkhe->btkhe", x, w, preferred_element_type=jnp.float32)
            if b is not None:
                qkv = qkv + b
            qkv = qkv.astype(dt)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
            q = apply_rotary(q, cos, sin, c.rotary_dim)
        k = apply_rotary(k, cos, sin, c.rotary_dim)
        ctx, new_cache = cached_attention(q, k, v, attn_bias, cache_kv, cache_index, local=local)
        out = jnp.einsum(
            "bqhe,hed->bqd", ctx, self.out_kernel[...].astype(dt), preferred_element_type=jnp.float32
        )
        if c.attention_bias:
            out = out + self.out_bias[...].astype(jnp.float32)
        return out.astype(dt), new_cache


def _block(c: GPTNeoXConfig, rngs: nnx.Rngs) -> Block:
    """One GPT-NeoX layer: LayerNorms, fused-QKV attention, GELU MLP; parallel or sequential residual."""
    pd = jnp.dtype(c.param_dtype)
    return Block(
        LayerNorm(c.hidden_size, c.layer_norm_eps, pd),
        Attention(c, rngs),
        LayerNorm(c.hidden_size, c.layer_norm_eps, pd),
        MLP(c.hidden_size, c.intermediate_size, c.hidden_act, init_std=c.initializer_range,
            param_dtype=c.param_dtype, rngs=rngs),
        parallel=c.use_parallel_residual,
    )


class GPTNeoX(DecoderLM):
    """The GPT-NeoX network with optional LM, value and score heads (see the module docstring).

    The forward pass (``model(tokens, mask, cache=, logits=, prefill=, queries_from=)``) and the heads are
    :class:`klq_jax.models.decoder.DecoderLM`'s.
    """

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.embed_in = nnx.Param(
            _normal(rngs, (c.vocab_size, c.hidden_size), c.initializer_range, pd),
            axes=("vocab", "embed"),
        )
        self.layers = nnx.List([_block(c, rngs) for _ in range(c.num_layers)])
        self.final_layer_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, pd)
        self._init_heads(c, rngs)

    def rotary(self, positions: Array) -> tuple[Array, Array]:
        """cos, sin ``[B, T, rotary_dim]``: frequencies ``base^(-2i / rotary_base_dim)``."""
        c = self.config
        return rotary_tables(positions, rope_inv_freq(c.rotary_emb_base, c.rotary_base_dim))


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def init(config: GPTNeoXConfig, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a randomly initialised model and split it into ``(graphdef, params)``."""
    return init_split(GPTNeoX, config, key)


def abstract_params(config: GPTNeoXConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: no memory is allocated."""
    return abstract_split(GPTNeoX, config)
