"""Llama (Llama 3 / 3.2) in Flax NNX, with the same interface as :mod:`klq_jax.models.gpt_neox`.

RMSNorm, a SwiGLU MLP, grouped-query attention (``num_kv_heads`` key/value heads shared by
``num_heads / num_kv_heads`` query heads each), full rotary embeddings with ``rope_theta`` and the
``llama3`` frequency scaling, tied or untied embeddings. The forward pass, KV cache (``[B, H_kv, S,
head_dim]`` per layer), prefill fast path, value/score heads and left-padding semantics are those of
:class:`klq_jax.models.decoder.DecoderLM`, so the sampler, rollout, trainer and critic drive a Llama
policy exactly as a GPT-NeoX one::

    >>> import jax, jax.numpy as jnp
    >>> from klq_jax.models import llama
    >>> cfg = llama.LlamaConfig.tiny(value_head=True)
    >>> graphdef, params = llama.init(cfg, jax.random.key(0))
    >>> out = llama.apply(graphdef, params, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]))
    >>> out.logits.shape, out.values.shape
    ((1, 3, 64), (1, 3))

Architecture (Touvron et al. 2023; Grattafiori et al. 2024)::

    x   = embed[tokens]
    x   = x + attn(rms_1(x));   x = x + down(silu(gate(rms_2(x))) * up(rms_2(x)))    (each layer)
    h   = rms_f(x);             logits = h · (embed.T if tied else unembed)

Hugging Face checkpoints (``LlamaForCausalLM``, ``LlamaForSequenceClassification`` with one label)
load with :func:`klq_jax.models.hf.load_hf`; the tensor table is
:data:`klq_jax.models.hf.tables.LLAMA`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models import checks
from klq_jax.models.decoder import (  # noqa: F401  (re-exported: the public names of a decoder)
    Block,
    DecoderLM,
    KVCache,
    ModelOutput,
    RMSNorm,
    abstract_split,
    apply,
    apply_rotary,
    cached_attention,
    init_cache,
    init_split,
    normal,
    param_count,
    rope_inv_freq,
    rotary_tables,
)

Array = jax.Array

ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a Llama network (the fields of Hugging Face's ``LlamaConfig``).

    Attributes:
      vocab_size: rows of the embedding (Llama 3: 128256).
      hidden_size: model width D.
      num_layers: number of blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads (``H % num_kv_heads == 0``; H for plain multi-head attention).
      head_dim: dims per head (Llama: ``hidden_size // num_heads``).
      intermediate_size: SwiGLU width F.
      rope_theta: rotary base θ.
      rope_type: ``"default"`` or ``"llama3"`` (frequencies rescaled as Llama 3.1+).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position_embeddings:
        the ``llama3`` scaling parameters (ignored for ``"default"``).
      max_position_embeddings: longest sequence the model is meant for.
      rms_norm_eps: RMSNorm epsilon.
      tie_word_embeddings: unembed with ``embed_in.T`` (Llama 3.2 1B/3B: True).
      lm_head, value_head, score_head, dtype, param_dtype, initializer_range, hf_token_ids: as
        :class:`klq_jax.models.gpt_neox.GPTNeoXConfig`.
    """

    vocab_size: int = 128256
    hidden_size: int = 2048
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 8192
    rope_theta: float = 500000.0
    rope_type: str = "llama3"
    rope_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    lm_head: bool = True
    value_head: bool = False
    score_head: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    hf_token_ids: dict = checks.hf_token_ids_field()

    def __post_init__(self):
        problems = checks.positive(self, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                          "num_kv_heads", "head_dim", "intermediate_size"))
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (rotary pairs)")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_type={self.rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")
        elif self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            problems.append("llama3 rope needs rope_low_freq_factor < rope_high_freq_factor")
        problems += checks.dtypes(self)
        if self.tie_word_embeddings and not self.lm_head:
            problems.append("tie_word_embeddings=True needs lm_head=True")
        checks.raise_if(problems, "LlamaConfig")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def inv_freq(self) -> np.ndarray:
        """Rotary frequencies ``[head_dim / 2]`` (float32), with the ``llama3`` rescaling if set.

        ``llama3``: wavelengths ``2π/f`` longer than ``L / low_freq_factor`` (``L`` = original
        max positions) are divided by ``factor``, shorter than ``L / high_freq_factor`` kept, and in
        between interpolated with ``s = (L / wavelength - low) / (high - low)``:
        ``f' = (1 - s) f / factor + s f``.
        """
        f = rope_inv_freq(self.rope_theta, self.head_dim).astype(np.float64)
        if self.rope_type == "llama3":
            L, lo, hi, k = (self.rope_original_max_position_embeddings, self.rope_low_freq_factor,
                            self.rope_high_freq_factor, self.rope_factor)
            wavelen = 2 * math.pi / f
            scaled = np.where(wavelen > L / lo, f / k, f)
            s = (L / wavelen - lo) / (hi - lo)
            smooth = (1 - s) * scaled / k + s * scaled
            medium = (wavelen >= L / hi) & (wavelen <= L / lo)
            f = np.where(medium, smooth, scaled)
        return f.astype(np.float32)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A Llama 3.2 size by name (``"Llama-3.2-1B"``, ``"meta-llama/Llama-3.2-3B-Instruct"``)."""
        key = name.split("/")[-1].lower().removesuffix("-instruct")
        return checks.preset(LLAMA_PRESETS, key, name, "Llama",
                             "an '-Instruct' suffix and an org prefix are accepted", overrides)

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A tiny config for tests and CPU demos (vocab 64, D 32, 2 layers, 4 query / 2 kv heads)."""
        base = cls(
            vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, rope_theta=10000.0, rope_type="default", max_position_embeddings=256,
        )
        return dataclasses.replace(base, **overrides)


def _llama32(hidden, layers, heads, head_dim, intermediate=8192):
    return LlamaConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=8,
                       head_dim=head_dim, intermediate_size=intermediate)


# Shapes from Meta's published config.json files (rope llama3: factor 32, low 1, high 4, 8192).
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-3.2-1b": _llama32(2048, 16, 32, 64),
    "llama-3.2-3b": _llama32(3072, 28, 24, 128),
}

# Published parameter counts (the model cards / safetensors metadata; tied embeddings counted once).
LLAMA_PARAM_COUNTS: dict[str, int] = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
}


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Grouped-query causal self-attention, no biases, full rotary.

    Parameters: ``q_kernel [D, H, hd]``, ``k_kernel``/``v_kernel [D, H_kv, hd]``, ``out_kernel [H, hd, D]``.
    """

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        std = c.initializer_range
        self.config = c
        self.q_kernel = nnx.Param(normal(rngs, (c.hidden_size, c.num_heads, c.head_dim), std, pd),
                                  axes=("embed", "heads", "head_dim"))
        self.k_kernel = nnx.Param(normal(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), std, pd),
                                  axes=("embed", "kv_heads", "head_dim"))
        self.v_kernel = nnx.Param(normal(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), std, pd),
                                  axes=("embed", "kv_heads", "head_dim"))
        self.out_kernel = nnx.Param(normal(rngs, (c.num_heads, c.head_dim, c.hidden_size), std, pd),
                                    axes=("heads", "head_dim", "embed"))

    def __call__(self, x, cos, sin, attn_bias, cache_kv, cache_index, *, local=False, queries_from=None):
        """x ``[B, T, D]`` → ``[B, T, D]`` (``[B, T - queries_from, D]``); see ``decoder.Block``."""
        c = self.config
        dt = x.dtype

        def proj(h, w):
            return jnp.einsum("btd,dhe->bthe", h, w[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)

        qf = queries_from
        xq, cq, sq = (x, cos, sin) if qf is None else (x[:, qf:], cos[:, qf:], sin[:, qf:])
        q = apply_rotary(proj(xq, self.q_kernel), cq, sq, c.head_dim)
        k = apply_rotary(proj(x, self.k_kernel), cos, sin, c.head_dim)
        v = proj(x, self.v_kernel)
        ctx, new_cache = cached_attention(q, k, v, attn_bias, cache_kv, cache_index, local=local)
        out = jnp.einsum("bqhe,hed->bqd", ctx, self.out_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        return out.astype(dt), new_cache


class GatedMLP(nnx.Module):
    """SwiGLU: ``down(silu(x · gate) * (x · up))``; ``gate_kernel``/``up_kernel [D, F]``, ``down_kernel [F, D]``."""

    def __init__(self, dim: int, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        pd = jnp.dtype(param_dtype)
        self.gate_kernel = nnx.Param(normal(rngs, (dim, hidden), init_std, pd), axes=("embed", "mlp"))
        self.up_kernel = nnx.Param(normal(rngs, (dim, hidden), init_std, pd), axes=("embed", "mlp"))
        self.down_kernel = nnx.Param(normal(rngs, (hidden, dim), init_std, pd), axes=("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        g = jnp.dot(x, self.gate_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        u = jnp.dot(x, self.up_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(dt)
        return jnp.dot(h, self.down_kernel[...].astype(dt), preferred_element_type=jnp.float32).astype(dt)


def _block(c: LlamaConfig, rngs: nnx.Rngs) -> Block:
    pd = jnp.dtype(c.param_dtype)
    return Block(
        RMSNorm(c.hidden_size, c.rms_norm_eps, pd),
        Attention(c, rngs),
        RMSNorm(c.hidden_size, c.rms_norm_eps, pd),
        GatedMLP(c.hidden_size, c.intermediate_size, init_std=c.initializer_range,
                 param_dtype=c.param_dtype, rngs=rngs),
        parallel=False,
    )


class Llama(DecoderLM):
    """The Llama network with optional LM, value and score heads (see the module docstring)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.embed_in = nnx.Param(
            normal(rngs, (c.vocab_size, c.hidden_size), c.initializer_range, pd), axes=("vocab", "embed")
        )
        self.layers = nnx.List([_block(c, rngs) for _ in range(c.num_layers)])
        self.final_layer_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, pd)
        self._init_heads(c, rngs)

    def rotary(self, positions: Array) -> tuple[Array, Array]:
        """cos, sin ``[B, T, head_dim]`` from :meth:`LlamaConfig.inv_freq`."""
        return rotary_tables(positions, self.config.inv_freq())


def init(config: LlamaConfig, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a randomly initialised model and split it into ``(graphdef, params)``."""
    return init_split(Llama, config, key)


def abstract_params(config: LlamaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: no memory is allocated."""
    return abstract_split(Llama, config)
