"""GPT-2 in Flax NNX with the score head of ``GPT2ForSequenceClassification`` (the HH reward model).

The paper's Anthropic-HH reward model, ``Ray2333/gpt2-large-helpful-reward_model``, is a
``GPT2ForSequenceClassification`` (rlhf_facts.md §4: n_embd 1280, 36 layers, 20 heads, n_ctx 1024,
``score = Linear(n_embd, 1, bias=False)``). This module holds the network, in the style of
:mod:`klq_jax.models.gpt_neox` (frozen config, ``(graphdef, params)`` split, ``axes`` metadata on
every parameter, float32 outputs), and its Hugging Face loader :func:`load_hf_gpt2`::

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

Hugging Face tensors (``transformer.`` prefix optional; HF's ``Conv1D`` stores weights as
``[in, out]``, unlike ``nn.Linear``)::

    HF                                   ours                                     mapping
    wte.weight          [V, D]           wte              [V, D]                  =
    wpe.weight          [P, D]           wpe              [P, D]                  =
    h.i.ln_1.{weight,bias}               h.i.ln_1.{scale,bias}
    h.i.attn.c_attn.weight [D, 3D]       h.i.attn.qkv_kernel [D, 3, H, hd]        W.reshape(D, 3, H, hd)
    h.i.attn.c_attn.bias   [3D]          h.i.attn.qkv_bias   [3, H, hd]           b.reshape(3, H, hd)
    h.i.attn.c_proj.weight [D, D]        h.i.attn.out_kernel [H, hd, D]           W.reshape(H, hd, D)
    h.i.attn.c_proj.bias   [D]           h.i.attn.out_bias   [D]
    h.i.ln_2.{weight,bias}               h.i.ln_2.{scale,bias}
    h.i.mlp.c_fc.{weight [D, F], bias}   h.i.mlp.up_kernel [D, F], up_bias        =
    h.i.mlp.c_proj.{weight [F, D], bias} h.i.mlp.down_kernel [F, D], down_bias    =
    ln_f.{weight,bias}                   ln_f.{scale,bias}
    score.weight        [1, D]           score_kernel     [D]                     W[0]
    lm_head.weight      [V, D]           (tied to wte; not stored)

Buffers some checkpoints carry (``attn.bias``, ``attn.masked_bias``) are ignored. There is no KV
cache: the model only scores complete sequences.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.gpt_neox import _ACTIVATIONS, _MASK_VALUE, MLP, LayerNorm, _normal, gather_last

Array = jax.Array

__all__ = [
    "GPT2Config",
    "GPT2",
    "GPT2Output",
    "SUPPORTED_ARCHITECTURES",
    "init",
    "abstract_params",
    "apply",
    "score",
    "hf_tensor_names",
    "load_hf_gpt2",
]

SUPPORTED_ARCHITECTURES = ("GPT2ForSequenceClassification", "GPT2LMHeadModel", "GPT2Model")


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
      lm_head: unembed with ``wte.T`` (``GPT2LMHeadModel``).
      score_head: a scalar score head ``Linear(D, 1, bias=False)`` read at the last real token
        (``GPT2ForSequenceClassification`` with ``num_labels=1``).
      dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: storage dtype of the parameters.
      initializer_range: std of the normal init of the weights.
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
    score_head: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and self.n_inner <= 0:
            problems.append(f"n_inner={self.n_inner} must be positive (or None for 4 * n_embd)")
        if self.activation_function not in _ACTIVATIONS:
            problems.append(
                f"activation_function={self.activation_function!r} is not supported "
                f"(supported: {sorted(_ACTIVATIONS)})"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name}={getattr(self, name)!r} must be 'float32', 'bfloat16' or 'float16'")
        if problems:
            raise ValueError("Invalid GPT2Config: " + "; ".join(problems))

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

    @classmethod
    def from_hf(
        cls,
        hf_config: Mapping[str, Any],
        *,
        dtype: str = "float32",
        param_dtype: str = "float32",
        source: str = "config.json",
    ) -> "GPT2Config":
        """Our config from a Hugging Face GPT-2 ``config.json`` dict.

        ``GPT2ForSequenceClassification`` (``num_labels`` must be 1) gives a score head,
        ``GPT2LMHeadModel`` an LM head (tied to ``wte``), ``GPT2Model`` neither.

        Raises:
          ValueError (``hf.ConversionError``): another architecture, ``num_labels != 1``, missing keys.

        Example::

            >>> GPT2Config.from_hf({"architectures": ["GPT2ForSequenceClassification"],
            ...     "model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32,
            ...     "n_layer": 2, "n_head": 4, "num_labels": 1}).score_head
            True
        """
        from klq_jax.models.hf import ConversionError

        c = dict(hf_config)
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        if c.get("model_type") not in (None, "gpt2"):
            raise ConversionError(
                f"{source}: model_type {c.get('model_type')!r} is not GPT-2 (supported architectures: "
                f"{supported}). GPT-NeoX checkpoints load with klq_jax.models.hf.load_hf."
            )
        archs = c.get("architectures") or ["GPT2Model"]
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(f"{source}: architecture {archs} is not supported; supported: {supported}.")
        arch = archs[0]
        if arch == "GPT2ForSequenceClassification":
            num_labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels", 2)
            if num_labels != 1:
                raise ConversionError(
                    f"{source}: GPT2ForSequenceClassification with num_labels={num_labels} is not "
                    "supported; only a scalar reward model (num_labels=1) converts to a score head."
                )
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in c]
        if missing:
            raise ConversionError(f"{source} lacks {missing}; is it a GPT-2 config.json?")
        try:
            return cls(
                vocab_size=int(c["vocab_size"]),
                n_positions=int(c.get("n_positions", c.get("n_ctx", 1024))),
                n_embd=int(c["n_embd"]),
                n_layer=int(c["n_layer"]),
                n_head=int(c["n_head"]),
                n_inner=None if c.get("n_inner") is None else int(c["n_inner"]),
                activation_function=c.get("activation_function", "gelu_new"),
                layer_norm_epsilon=float(c.get("layer_norm_epsilon", 1e-5)),
                scale_attn_weights=bool(c.get("scale_attn_weights", True)),
                scale_attn_by_inverse_layer_idx=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
                lm_head=arch == "GPT2LMHeadModel",
                score_head=arch == "GPT2ForSequenceClassification",
                dtype=dtype,
                param_dtype=param_dtype,
                initializer_range=float(c.get("initializer_range", 0.02)),
            )
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{source}: this config is not supported: {e}") from None


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
    """The GPT-2 network with an optional tied LM head and an optional score head."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.wte = nnx.Param(_normal(rngs, (c.vocab_size, c.n_embd), c.initializer_range, pd), axes=("vocab", "embed"))
        self.wpe = nnx.Param(_normal(rngs, (c.n_positions, c.n_embd), 0.01, pd), axes=(None, "embed"))
        self.h = nnx.List([Block(c, i, rngs) for i in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, pd)
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
            out_logits = jnp.dot(hidden, self.wte[...].T.astype(hidden.dtype), preferred_element_type=jnp.float32)
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


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# --------------------------------------------------------------------------------------------

_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$")


def _hf_spec(path: tuple, c: GPT2Config):
    """``(hf name without 'transformer.', hf shape, to_ours)`` of our parameter at ``path``."""
    D, H, hd, F, V, P = c.n_embd, c.n_head, c.head_dim, c.inner_size, c.vocab_size, c.n_positions
    ln = {"scale": "weight", "bias": "bias"}
    ident = lambda w: w  # noqa: E731
    if path == ("wte",):
        return "wte.weight", (V, D), ident
    if path == ("wpe",):
        return "wpe.weight", (P, D), ident
    if path == ("score_kernel",):
        return "score.weight", (1, D), lambda w: w[0]
    if path[0] == "ln_f":
        return f"ln_f.{ln[path[1]]}", (D,), ident
    if path[0] == "h":
        i, mod, name = path[1], path[2], path[3]
        pre = f"h.{i}."
        if mod in ("ln_1", "ln_2"):
            return pre + f"{mod}.{ln[name]}", (D,), ident
        table = {
            ("attn", "qkv_kernel"): ("attn.c_attn.weight", (D, 3 * D), lambda w: w.reshape(D, 3, H, hd)),
            ("attn", "qkv_bias"): ("attn.c_attn.bias", (3 * D,), lambda b: b.reshape(3, H, hd)),
            ("attn", "out_kernel"): ("attn.c_proj.weight", (D, D), lambda w: w.reshape(H, hd, D)),
            ("attn", "out_bias"): ("attn.c_proj.bias", (D,), ident),
            ("mlp", "up_kernel"): ("mlp.c_fc.weight", (D, F), ident),
            ("mlp", "up_bias"): ("mlp.c_fc.bias", (F,), ident),
            ("mlp", "down_kernel"): ("mlp.c_proj.weight", (F, D), ident),
            ("mlp", "down_bias"): ("mlp.c_proj.bias", (D,), ident),
        }
        if (mod, name) in table:
            n, shape, fn = table[(mod, name)]
            return pre + n, shape, fn
    raise ValueError(f"Internal error: no Hugging Face name for GPT-2 parameter {'.'.join(map(str, path))}")


def _flat_abstract(config: GPT2Config):
    graphdef, abstract = abstract_params(config)
    return graphdef, abstract, {tuple(k): v for k, v in nnx.to_flat_state(abstract)}


def hf_tensor_names(config: GPT2Config) -> dict[str, str]:
    """Our parameter path → the HF tensor name of ``GPT2ForSequenceClassification``.

    Example::

        >>> hf_tensor_names(GPT2Config.tiny())["h.1.attn.qkv_kernel"]
        'transformer.h.1.attn.c_attn.weight'
    """
    _, _, flat = _flat_abstract(config)
    out = {}
    for p in flat:
        name = _hf_spec(p, config)[0]
        out[".".join(map(str, p))] = name if name == "score.weight" else "transformer." + name
    return out


def load_hf_gpt2(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    strict: bool = False,
) -> tuple[GPT2Config, nnx.GraphDef, nnx.State]:
    """Load a local Hugging Face GPT-2 directory as ``(config, graphdef, params)``.

    Reads ``config.json`` and the weights (``model.safetensors[.index.json]`` or
    ``pytorch_model.bin[.index.json]``) tensor by tensor through
    :class:`klq_jax.models.hf.HFCheckpointReader`, checking every shape.

    Args:
      path: directory of a ``GPT2ForSequenceClassification`` (``num_labels=1``), ``GPT2LMHeadModel``
        or ``GPT2Model`` checkpoint.
      dtype: compute dtype recorded in the config.
      param_dtype: dtype of the loaded parameters (float32 by default, whatever the file holds).
      strict: raise instead of warn on tensors the model does not use.

    Raises:
      klq_jax.models.hf.ConversionError: bad config, missing or mis-shaped tensor, unreadable file.

    Example::

        >>> config, graphdef, params = load_hf_gpt2("gpt2-large-helpful-reward_model/")   # doctest: +SKIP
        >>> scores = score(graphdef, params, tokens, mask)                                # doctest: +SKIP
    """
    from klq_jax.models import hf

    path = Path(path)
    config = GPT2Config.from_hf(
        hf.read_hf_config(path), dtype=dtype, param_dtype=param_dtype, source=str(path / "config.json")
    )
    reader = hf.HFCheckpointReader(path)
    # GPT2ForSequenceClassification / GPT2LMHeadModel prefix the trunk with "transformer.".
    names = {}
    for n in reader.names():
        names.setdefault(n[len("transformer."):] if n.startswith("transformer.") else n, n)
    graphdef, abstract, flat = _flat_abstract(config)
    pd = np.dtype(jnp.dtype(param_dtype))
    values, used = {}, set()
    for p, var in flat.items():
        hf_name, hf_shape, to_ours = _hf_spec(p, config)
        if hf_name not in names:
            raise hf.ConversionError(
                f"Tensor '{hf_name}' (shape {hf_shape}, for our '{'.'.join(map(str, p))}') is missing from "
                f"{path} (files: {reader.files}). The weights do not match config.json "
                "(a GPT2ForSequenceClassification needs score.weight), or a shard is missing."
            )
        found = reader.shape(names[hf_name])
        if found != hf_shape:
            raise hf.ConversionError(
                f"Tensor '{names[hf_name]}' in {reader.file_of(names[hf_name])} has shape {found}, expected "
                f"{hf_shape} from config.json (n_embd={config.n_embd}, n_head={config.n_head}, "
                f"n_inner={config.inner_size}, vocab_size={config.vocab_size}, n_positions={config.n_positions})."
            )
        arr = np.asarray(to_ours(reader.get(names[hf_name]))).astype(pd)
        assert arr.shape == tuple(var.shape), (p, arr.shape, var.shape)
        values[p] = jnp.asarray(arr)
        used.add(hf_name)
    unexpected = [n for short, n in names.items() if short not in used and not _IGNORED.search(short)]
    if unexpected:
        msg = (
            f"{path} holds tensors that this GPT-2 ({'score head' if config.score_head else 'no score head'}) "
            f"does not use: {unexpected[:10]}. Check config.json's architectures and n_layer."
        )
        if strict:
            raise hf.ConversionError(msg)
        warnings.warn(msg, stacklevel=2)
    pure = nnx.to_pure_dict(abstract)

    def fill(node, prefix):
        if isinstance(node, dict):
            return {k: fill(v, prefix + (k,)) for k, v in node.items()}
        return values[prefix]

    nnx.replace_by_pure_dict(abstract, fill(pure, ()))
    return config, graphdef, abstract
