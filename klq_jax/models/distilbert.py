"""DistilBERT sequence classifier in Flax NNX (the IMDb reward model, ``lvwerra/distilbert-imdb``).

``DistilBertForSequenceClassification`` (Sanh et al. 2019): learned token and position embeddings,
post-LN encoder blocks with bidirectional attention and a GELU MLP, then the classifier head on the
first token ([CLS])::

    x   = LN(word[tokens] + pos[positions])
    x   = LN_sa(x + attn(x));   x = LN_out(x + lin2(gelu(lin1(x))))          (each of n_layers)
    logits = classifier(relu(pre_classifier(x[CLS])))                        [B, num_labels]

The reward of the sentiment task is one label's logit (``score(..., label=labels.index("POSITIVE"))``,
as in TRL's sentiment examples). Positions come from the mask (``cumsum(mask) - 1``) and the
classifier reads the **first real token**, so a row padded on either side gives the outputs of the
unpadded row (Hugging Face pads on the right and reads position 0, which is the same thing)::

    >>> import jax, jax.numpy as jnp
    >>> from klq_jax.models import distilbert
    >>> cfg = distilbert.DistilBertConfig.tiny()
    >>> graphdef, params = distilbert.init(cfg, jax.random.key(0))
    >>> out = distilbert.apply(graphdef, params, jnp.array([[2, 5, 6, 0]]), jnp.array([[1, 1, 1, 0]]))
    >>> out.logits.shape, cfg.labels
    ((1, 2), ('NEGATIVE', 'POSITIVE'))

Hugging Face checkpoints load with :func:`klq_jax.models.hf.load_hf`; the tensor table is
:data:`klq_jax.models.hf.tables.DISTILBERT`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from klq_jax.models import checks
from klq_jax.models.decoder import (
    ACTIVATIONS,
    MASK_VALUE,
    MLP,
    LayerNorm,
    abstract_split,
    cached_attention,
    init_split,
    mask_positions,
    normal,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """Shapes of a DistilBERT classifier (the fields of Hugging Face's ``DistilBertConfig``).

    Attributes:
      vocab_size, max_position_embeddings: rows of the token and position tables.
      dim: width D; n_layers: blocks; n_heads: attention heads; hidden_dim: MLP width F.
      activation: ``"gelu"`` (exact) or ``"relu"``.
      labels: the label names in id order (``config.id2label``); ``num_labels = len(labels)``.
      layer_norm_eps: LayerNorm epsilon (DistilBERT: 1e-12).
      dtype, param_dtype, initializer_range, hf_token_ids: as the other networks.
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE")
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    hf_token_ids: dict = checks.hf_token_ids_field()

    def __post_init__(self):
        problems = checks.positive(self, ("vocab_size", "max_position_embeddings", "dim", "n_layers",
                                          "n_heads", "hidden_dim"))
        if not problems:
            problems += checks.divisible(self, "dim", "n_heads")
        problems += checks.supported(self, "activation", ("gelu", "relu")) + checks.dtypes(self)
        if not self.labels:
            problems.append("labels must name at least one label")
        checks.raise_if(problems, "DistilBertConfig")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def label_id(self, name: str) -> int:
        """The id of label ``name`` (as ``config.label2id[name]``), with a clear error if absent."""
        if name not in self.labels:
            raise ValueError(f"Label {name!r} is not one of this classifier's labels {list(self.labels)}.")
        return self.labels.index(name)

    def replace(self, **changes) -> "DistilBertConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> "DistilBertConfig":
        """A tiny config for tests (vocab 64, 32 positions, D 32, 2 layers, 4 heads)."""
        base = cls(vocab_size=64, max_position_embeddings=32, dim=32, n_layers=2, n_heads=4, hidden_dim=48)
        return dataclasses.replace(base, **overrides)


class Attention(nnx.Module):
    """Bidirectional multi-head attention: ``{q,k,v}_kernel [D, H, hd]`` + ``[H, hd]`` biases,
    ``out_kernel [H, hd, D]`` + ``out_bias [D]``."""

    def __init__(self, c: DistilBertConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(c.param_dtype)
        std = c.initializer_range
        for n in ("q", "k", "v"):
            setattr(self, f"{n}_kernel", nnx.Param(normal(rngs, (c.dim, c.n_heads, c.head_dim), std, pd),
                                                   axes=("embed", "heads", "head_dim")))
            setattr(self, f"{n}_bias", nnx.Param(jnp.zeros((c.n_heads, c.head_dim), pd), axes=("heads", "head_dim")))
        self.out_kernel = nnx.Param(normal(rngs, (c.n_heads, c.head_dim, c.dim), std, pd),
                                    axes=("heads", "head_dim", "embed"))
        self.out_bias = nnx.Param(jnp.zeros((c.dim,), pd), axes=("embed",))

    def __call__(self, x: Array, attn_bias: Array) -> Array:
        """``x [B, T, D]``, additive ``attn_bias [B, 1, 1, T]`` → ``[B, T, D]``."""
        dt = x.dtype

        def proj(w, b):
            y = jnp.einsum("btd,dhe->bthe", x, w[...].astype(dt), preferred_element_type=jnp.float32)
            return (y + b[...].astype(jnp.float32)).astype(dt)

        q, k, v = (proj(self.q_kernel, self.q_bias), proj(self.k_kernel, self.k_bias),
                   proj(self.v_kernel, self.v_bias))
        ctx, _ = cached_attention(q, k, v, attn_bias, None, None, local=False)
        out = jnp.einsum("bqhe,hed->bqd", ctx, self.out_kernel[...].astype(dt), preferred_element_type=jnp.float32)
        return (out + self.out_bias[...].astype(jnp.float32)).astype(dt)


class EncoderBlock(nnx.Module):
    """Post-LN: ``h = LN_sa(x + attn(x))``, ``out = LN_out(h + mlp(h))``."""

    def __init__(self, c: DistilBertConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(c.param_dtype)
        self.attention = Attention(c, rngs)
        self.sa_layer_norm = LayerNorm(c.dim, c.layer_norm_eps, pd)
        self.mlp = MLP(c.dim, c.hidden_dim, c.activation, init_std=c.initializer_range,
                       param_dtype=c.param_dtype, rngs=rngs)
        self.output_layer_norm = LayerNorm(c.dim, c.layer_norm_eps, pd)

    def __call__(self, x: Array, attn_bias: Array) -> Array:
        h = self.sa_layer_norm(x + self.attention(x, attn_bias))
        return self.output_layer_norm(h + self.mlp(h))


class DistilBertOutput(NamedTuple):
    """``hidden [B, T, D]`` (compute dtype) and float32 classifier ``logits [B, num_labels]``."""

    hidden: Array
    logits: Array


def first_token_index(mask: Array) -> Array:
    """Index of the first nonzero entry of each row of ``mask [B, T]`` (0 for an all-zero row)."""
    mask = jnp.asarray(mask).astype(bool)
    T = mask.shape[-1]
    return jnp.where(mask, jnp.arange(T), T).min(axis=-1) % T


class DistilBert(nnx.Module):
    """The DistilBERT encoder with the sequence-classification head (see the module docstring)."""

    def __init__(self, config: DistilBertConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        std = c.initializer_range
        self.config = c
        self.word_embeddings = nnx.Param(normal(rngs, (c.vocab_size, c.dim), std, pd), axes=("vocab", "embed"))
        self.position_embeddings = nnx.Param(normal(rngs, (c.max_position_embeddings, c.dim), std, pd),
                                             axes=(None, "embed"))
        self.embed_layer_norm = LayerNorm(c.dim, c.layer_norm_eps, pd)
        self.layers = nnx.List([EncoderBlock(c, rngs) for _ in range(c.n_layers)])
        self.pre_classifier_kernel = nnx.Param(normal(rngs, (c.dim, c.dim), std, pd), axes=("embed", None))
        self.pre_classifier_bias = nnx.Param(jnp.zeros((c.dim,), pd), axes=(None,))
        self.classifier_kernel = nnx.Param(normal(rngs, (c.dim, c.num_labels), std, pd), axes=("embed", None))
        self.classifier_bias = nnx.Param(jnp.zeros((c.num_labels,), pd), axes=(None,))

    def __call__(self, tokens: Array, mask: Array) -> DistilBertOutput:
        """``tokens [B, T]``, ``mask [B, T]`` (1 = real token; padding on either side)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        tokens = jnp.asarray(tokens)
        mask = jnp.asarray(mask).astype(bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"tokens and mask must both be [B, T]; got tokens {tokens.shape}, mask {mask.shape}")
        T = tokens.shape[1]
        if T > c.max_position_embeddings:
            raise ValueError(
                f"Sequences of {T} tokens are longer than the model's max_position_embeddings="
                f"{c.max_position_embeddings}; truncate the inputs to at most that many tokens."
            )
        positions = mask_positions(mask)
        x = jnp.take(self.word_embeddings[...], tokens, axis=0) + jnp.take(self.position_embeddings[...], positions, axis=0)
        x = self.embed_layer_norm(x.astype(dt))
        attn_bias = jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None, :]
        for block in self.layers:
            x = block(x, attn_bias)
        cls = jnp.take_along_axis(x, first_token_index(mask)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        h = ACTIVATIONS["relu"](cls @ self.pre_classifier_kernel[...].astype(jnp.float32)
                                + self.pre_classifier_bias[...].astype(jnp.float32))
        logits = h @ self.classifier_kernel[...].astype(jnp.float32) + self.classifier_bias[...].astype(jnp.float32)
        return DistilBertOutput(hidden=x, logits=logits)


def init(config: DistilBertConfig, key: Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialised classifier split into ``(graphdef, params)``."""
    return init_split(DistilBert, config, key)


def abstract_params(config: DistilBertConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return abstract_split(DistilBert, config)


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, mask: Array) -> DistilBertOutput:
    """Pure forward pass ``nnx.merge(graphdef, params)(tokens, mask)``."""
    return nnx.merge(graphdef, params)(tokens, mask)


def score(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, mask: Array, *, label: int) -> Array:
    """The logit of class ``label`` ``[B]`` float32: the sentiment reward (``label`` = POSITIVE's id).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> cfg = DistilBertConfig.tiny()
        >>> g, p = init(cfg, jax.random.key(0))
        >>> score(g, p, jnp.array([[2, 3, 4]]), jnp.ones((1, 3)), label=cfg.label_id("POSITIVE")).shape
        (1,)
    """
    return apply(graphdef, params, tokens, mask).logits[:, label]
