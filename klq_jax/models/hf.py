"""Hugging Face GPT-NeoX (Pythia) checkpoints ⇄ our Flax :mod:`klq_jax.models.gpt_neox`.

Both directions, as a library (the ``klq-convert`` CLI in :mod:`convert.cli` is a thin
layer over it)::

    >>> import jax, tempfile
    >>> from klq_jax.models import hf
    >>> tiny_hf_gpt_neox = testing.tiny_hf_gpt_neox  # test helpers (tests/helpers/testing.py)
    >>> d = tempfile.mkdtemp()
    >>> _ = tiny_hf_gpt_neox(d + "/hf")                           # a tiny random HF checkpoint
    >>> config, graphdef, params = hf.load_hf(d + "/hf")          # HF -> Flax (in memory)
    >>> _ = hf.save_flax(d + "/flax", config, params)             # our checkpoint format
    >>> config, graphdef, params = hf.load_flax(d + "/flax")
    >>> _ = hf.save_hf(d + "/hf2", config, params)                # Flax -> HF (transformers loads it)

Reading a Hugging Face directory
--------------------------------
:func:`load_hf` reads ``config.json`` (never ``trust_remote_code``) and the weights from, in this
order of preference: ``model.safetensors.index.json`` + its shards, ``model.safetensors``,
``pytorch_model.bin.index.json`` + its shards, ``pytorch_model.bin``. Safetensors are read tensor by
tensor (``safe_open``, numpy, no torch); ``.bin`` files go through
``torch.load(weights_only=True, mmap=True)`` (torch is imported only there). So converting a 12B
model holds the converted parameters plus one tensor at a time, not the whole state dict twice.

Supported architectures: ``GPTNeoXForCausalLM`` (LM head) and ``GPTNeoXForSequenceClassification``
with ``num_labels == 1`` (a reward model: score head, no LM head). Tensor names are accepted with or
without the ``gpt_neox.`` prefix, the unembedding as ``embed_out.weight`` (hub files) or
``lm_head.weight``; buffers (``attention.bias``, ``attention.masked_bias``, ``rotary_emb.inv_freq``)
are ignored; any other unexpected tensor is reported (a warning, or an error with ``strict=True``).

Tensor layout (HF ``torch.nn.Linear`` stores ``weight [out, in]``)::

    HF (after the optional ``gpt_neox.`` prefix)         ours                             mapping
    embed_in.weight                     [V, D]           embed_in            [V, D]       =
    layers.i.input_layernorm.{weight,bias}   [D]         layers.i.input_layernorm.{scale,bias}
    layers.i.post_attention_layernorm.{weight,bias}      layers.i.post_attention_layernorm.{scale,bias}
    layers.i.attention.query_key_value.weight [3D, D]    ...attention.qkv_kernel [D, 3, H, hd]
        (HF's 3D output rows are ordered (head, q/k/v, hd))                         W.T.reshape(D,H,3,hd).transpose(0,2,1,3)
    layers.i.attention.query_key_value.bias   [3D]       ...attention.qkv_bias  [3, H, hd]   b.reshape(H,3,hd).transpose(1,0,2)
    layers.i.attention.dense.weight  [D, D]              ...attention.out_kernel [H, hd, D]  W.T.reshape(H,hd,D)
    layers.i.attention.dense.bias    [D]                 ...attention.out_bias  [D]
    layers.i.mlp.dense_h_to_4h.{weight [F, D], bias}     ...mlp.up_kernel [D, F], up_bias     W.T
    layers.i.mlp.dense_4h_to_h.{weight [D, F], bias}     ...mlp.down_kernel [F, D], down_bias W.T
    final_layer_norm.{weight,bias}                       final_layer_norm.{scale,bias}
    embed_out.weight (lm_head.weight)  [V, D]            embed_out [D, V]                    W.T
    score.weight  [1, D]                                 score_kernel [D]                    W[0]

A value head (``value_kernel [D]``, ``value_bias []``) is not part of any HF model: :func:`load_hf`
initialises it randomly from ``key`` (N(0, 1/(D+1)), bias 0, as :func:`gpt_neox.init`) unless the
directory holds a ``value_head.safetensors`` written by :func:`save_hf`, which stores it beside the
HF files as ``v_head.summary.weight [1, D]`` and ``v_head.summary.bias [1]`` (TRL's names).

Our checkpoint format (:func:`save_flax` / :func:`load_flax`)
------------------------------------------------------------
A directory with

* ``klq_config.json``: ``{"format": "klq_jax.gpt_neox", "version": 1, "config": {...}}`` where
  ``config`` holds every field of :class:`gpt_neox.GPTNeoXConfig`;
* ``params.safetensors``: every parameter under its NNX path joined with ``'.'`` (e.g.
  ``layers.0.attention.qkv_kernel``, ``embed_out``, ``value_kernel``), in ``config.param_dtype``;
* optionally ``hf_config.json``: the original HF ``config.json`` when converted from HF (its token
  ids, e.g. ``pad_token_id``, are carried back by :func:`save_hf`), and tokenizer files.

Every writer here builds the output in a temporary sibling directory and renames it into place at
the end, so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from klq_jax.models import gpt_neox
from klq_jax.models.gpt_neox import GPTNeoXConfig
from klq_jax.sharding import variable_sharding

__all__ = [
    "ConversionError",
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "read_hf_config",
    "HFCheckpointReader",
    "hf_tensor_names",
    "load_hf",
    "save_hf",
    "save_flax",
    "load_flax",
    "parse_size",
    "TOKENIZER_FILES",
    "read_flax_config",
    "read_flax_hf_config",
]

SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")

FLAX_CONFIG_FILE = "klq_config.json"
FLAX_PARAMS_FILE = "params.safetensors"
FLAX_HF_CONFIG_FILE = "hf_config.json"
VALUE_HEAD_FILE = "value_head.safetensors"
_FLAX_FORMAT = "klq_jax.gpt_neox"
_FLAX_VERSION = 1

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)

# HF config keys (other than shapes) carried from an original HF config back into a written one.
_CARRIED_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Buffers some GPT-NeoX checkpoints store that carry no weights (causal-mask tables, rotary inverse
# frequencies): ignored when reading.
_IGNORED_TENSOR = re.compile(
    r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq|attention\.rotary_emb\.inv_freq)$"
)

_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says which file and what to do."""


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _check_dtype(name: str, value: str, allowed=("float32", "bfloat16", "float16")) -> str:
    if value not in allowed:
        raise ConversionError(f"{name}={value!r} is not supported; use one of {list(allowed)}.")
    return value


def config_from_hf(
    hf_config: Mapping[str, Any],
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    value_head: bool = False,
    source: str = "config.json",
) -> GPTNeoXConfig:
    """Our :class:`GPTNeoXConfig` from a Hugging Face GPT-NeoX ``config.json`` dict.

    Reads both spellings of the rotary settings: ``rope_parameters: {partial_rotary_factor,
    rope_theta}`` (transformers ≥ 5) and ``rotary_pct`` / ``rotary_emb_base`` (hub Pythia configs).

    Args:
      hf_config: the parsed ``config.json``.
      dtype: compute dtype of the Flax model (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: storage dtype of the Flax parameters.
      value_head: add a value head (not part of the HF model).
      source: file name used in error messages.

    Raises:
      ConversionError: an unsupported architecture, ``num_labels != 1``, a rope type other than
        ``default``, or values the model cannot represent.

    Example::

        >>> config_from_hf({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        ...     "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "intermediate_size": 64, "rotary_pct": 0.25}).num_heads
        4
    """
    c = dict(hf_config)
    _check_dtype("dtype", dtype)
    _check_dtype("param_dtype", param_dtype)
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    model_type = c.get("model_type")
    if model_type is not None and model_type != "gpt_neox":
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported; only GPT-NeoX (Pythia) "
            f"checkpoints convert (model_type 'gpt_neox', architectures {supported})."
        )
    archs = c.get("architectures") or ["GPTNeoXForCausalLM"]
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{source}: architecture {archs} is not supported; supported architectures: {supported}."
        )
    arch = archs[0]
    score = arch == "GPTNeoXForSequenceClassification"
    if score:
        num_labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels", 2)
        if num_labels != 1:
            raise ConversionError(
                f"{source}: GPTNeoXForSequenceClassification with num_labels={num_labels} is not "
                "supported; only a scalar reward model (num_labels=1) converts to a score head."
            )

    rope = dict(c.get("rope_parameters") or {})
    rope_scaling = c.get("rope_scaling")
    if rope_scaling:
        rope = {**dict(rope_scaling), **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"{source}: rope_type {rope_type!r} is not supported; only the default (unscaled) "
            "rotary embedding of Pythia converts. Remove the rope scaling from config.json."
        )
    rotary_pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", c.get("rotary_emb_base", 10000.0))

    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
        if k not in c
    ]
    if missing:
        raise ConversionError(f"{source} lacks {missing}; is it a GPT-NeoX config.json?")
    hidden_act = c.get("hidden_act", "gelu")
    if hidden_act not in gpt_neox._ACTIVATIONS:
        raise ConversionError(
            f"{source}: hidden_act={hidden_act!r} is not supported; supported: "
            f"{sorted(gpt_neox._ACTIVATIONS)}."
        )
    try:
        return GPTNeoXConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=int(c["num_attention_heads"]),
            intermediate_size=int(c["intermediate_size"]),
            rotary_pct=float(rotary_pct),
            rotary_emb_base=float(rotary_base),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(c.get("use_parallel_residual", True)),
            attention_bias=bool(c.get("attention_bias", True)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)) and not score,
            hidden_act=hidden_act,
            lm_head=not score,
            value_head=value_head,
            score_head=score,
            dtype=dtype,
            param_dtype=param_dtype,
            initializer_range=float(c.get("initializer_range", 0.02)),
        )
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: this config is not supported: {e}") from None


def config_to_hf(
    config: GPTNeoXConfig,
    *,
    base: Mapping[str, Any] | None = None,
    torch_dtype: str = "float32",
) -> dict:
    """A Hugging Face ``config.json`` dict for ``config`` (the value head is not part of it).

    An LM model becomes ``GPTNeoXForCausalLM``; a score-head model without LM head
    ``GPTNeoXForSequenceClassification`` (``num_labels=1``). The rotary settings are written in both
    spellings (``rope_parameters`` and ``rotary_pct``/``rotary_emb_base``) so old and new
    transformers read them. Token ids (``bos/eos/pad_token_id``) come from ``base`` (e.g. the
    original HF config) when given, else Pythia's (``bos = eos = 0``, no pad).

    Example::

        >>> config_to_hf(GPTNeoXConfig.tiny())["architectures"]
        ['GPTNeoXForCausalLM']
    """
    if config.lm_head and config.score_head:
        raise ConversionError(
            "A model with both an LM head and a score head has no Hugging Face architecture; "
            "save the LM (score_head=False) or the reward model (lm_head=False) separately."
        )
    if not config.lm_head and not config.score_head:
        raise ConversionError(
            "A model with neither an LM head nor a score head has no Hugging Face architecture "
            "(supported: " + ", ".join(SUPPORTED_ARCHITECTURES) + ")."
        )
    arch = "GPTNeoXForCausalLM" if config.lm_head else "GPTNeoXForSequenceClassification"
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.use_parallel_residual,
        "attention_bias": config.attention_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_emb_base,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_emb_base,
            "partial_rotary_factor": config.rotary_pct,
        },
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": None,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,
    }
    if base:
        for k in _CARRIED_HF_KEYS:
            if k in base:
                d[k] = base[k]
    if config.score_head:
        d["num_labels"] = 1
        d["id2label"] = {"0": "LABEL_0"}
        d["label2id"] = {"LABEL_0": 0}
    return d


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found: {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(
            f"{path} could not be read as JSON ({e}); the file is corrupt or truncated: "
            "re-download or re-create it."
        ) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object; is it the right file?")
    return data


def read_hf_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory (clear errors if absent/corrupt)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; pass a local Hugging Face model directory.")
    return _read_json(
        path / "config.json",
        "a Hugging Face model directory needs its config.json (download it with the weights).",
    )


# ------------------------------------------------------------------------------------------------
# Parameter paths <-> HF tensor names
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    hf_name: str  # canonical HF name: without the "gpt_neox." prefix; "embed_out.weight" for the LM head
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _spec(path: tuple, c: GPTNeoXConfig) -> _Spec | None:
    """How our parameter at ``path`` maps onto an HF tensor (None: not in HF files, e.g. value head)."""
    D, H, hd, F, V = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.vocab_size
    ln = {"scale": "weight", "bias": "bias"}
    if path == ("embed_in",):
        return _Spec("embed_in.weight", (V, D), _identity, _identity)
    if path == ("embed_out",):
        return _Spec("embed_out.weight", (V, D), _transpose, _transpose)
    if path == ("score_kernel",):
        return _Spec("score.weight", (1, D), lambda w: w[0], lambda k: k[None, :])
    if len(path) == 2 and path[0] == "final_layer_norm":
        return _Spec(f"final_layer_norm.{ln[path[1]]}", (D,), _identity, _identity)
    if path[0] == "layers":
        i, rest = path[1], path[2:]
        pre = f"layers.{i}."
        if rest[0] in ("input_layernorm", "post_attention_layernorm"):
            return _Spec(pre + f"{rest[0]}.{ln[rest[1]]}", (D,), _identity, _identity)
        name = rest[1]
        if rest[0] == "attention":
            if name == "qkv_kernel":
                return _Spec(
                    pre + "attention.query_key_value.weight",
                    (3 * D, D),
                    lambda w: w.T.reshape(D, H, 3, hd).transpose(0, 2, 1, 3),
                    lambda k: k.transpose(0, 2, 1, 3).reshape(D, 3 * D).T,
                )
            if name == "qkv_bias":
                return _Spec(
                    pre + "attention.query_key_value.bias",
                    (3 * D,),
                    lambda b: b.reshape(H, 3, hd).transpose(1, 0, 2),
                    lambda b: b.transpose(1, 0, 2).reshape(3 * D),
                )
            if name == "out_kernel":
                return _Spec(
                    pre + "attention.dense.weight",
                    (D, D),
                    lambda w: w.T.reshape(H, hd, D),
                    lambda k: k.reshape(D, D).T,
                )
            if name == "out_bias":
                return _Spec(pre + "attention.dense.bias", (D,), _identity, _identity)
        if rest[0] == "mlp":
            table = {
                "up_kernel": ("dense_h_to_4h.weight", (F, D), _transpose, _transpose),
                "up_bias": ("dense_h_to_4h.bias", (F,), _identity, _identity),
                "down_kernel": ("dense_4h_to_h.weight", (D, F), _transpose, _transpose),
                "down_bias": ("dense_4h_to_h.bias", (D,), _identity, _identity),
            }
            n, shape, fwd, bwd = table[name]
            return _Spec(pre + "mlp." + n, shape, fwd, bwd)
    if path in (("value_kernel",), ("value_bias",)):
        return None
    raise ConversionError(f"Internal error: no Hugging Face name for parameter {'.'.join(map(str, path))}")


def _flat_abstract(config: GPTNeoXConfig):
    graphdef, abstract = gpt_neox.abstract_params(config)
    flat = {tuple(k): v for k, v in nnx.to_flat_state(abstract)}
    return graphdef, abstract, flat


def hf_tensor_names(config: GPTNeoXConfig) -> dict[str, str]:
    """Our parameter path (``'layers.0.attention.qkv_kernel'``) → HF tensor name (as saved on disk).

    Example::

        >>> hf_tensor_names(GPTNeoXConfig.tiny())["layers.1.mlp.up_kernel"]
        'gpt_neox.layers.1.mlp.dense_h_to_4h.weight'
    """
    _, _, flat = _flat_abstract(config)
    out = {}
    for path in flat:
        s = _spec(path, config)
        if s is not None:
            out[_join(path)] = _hf_disk_name(s.hf_name)
    return out


def _join(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _hf_disk_name(canonical: str) -> str:
    if canonical in ("embed_out.weight", "score.weight"):
        return canonical
    return "gpt_neox." + canonical


def _canonical(name: str) -> str:
    if name.startswith("gpt_neox."):
        name = name[len("gpt_neox."):]
    if name == "lm_head.weight":
        name = "embed_out.weight"
    return name


# ------------------------------------------------------------------------------------------------
# Lazy reading of HF checkpoints
# ------------------------------------------------------------------------------------------------


def _corrupt(file: Path, err: Exception) -> ConversionError:
    return ConversionError(
        f"Could not read {file}: {type(err).__name__}: {err}. The file is corrupt, truncated or not "
        "a checkpoint: re-download or re-create it."
    )


class _SafetensorsFile:
    def __init__(self, file: Path):
        from safetensors import safe_open

        self.file = file
        try:
            self._f = safe_open(str(file), framework="np")
            self._keys = list(self._f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise _corrupt(file, e) from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise _corrupt(self.file, e) from None


class _TorchFile:
    def __init__(self, file: Path):
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"{file} is a PyTorch .bin checkpoint; reading it needs torch (pip install torch), "
                "or convert it to safetensors first."
            ) from None
        self.file = file
        try:
            try:
                sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) serialisation cannot be memory-mapped.
                sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _corrupt(file, e) from None
        if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
            raise ConversionError(f"{file} does not hold a state dict of tensors; is it a model checkpoint?")
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key].detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class HFCheckpointReader:
    """Lazy, tensor-by-tensor access to the weights of a local Hugging Face model directory.

    Finds ``model.safetensors[.index.json]`` or ``pytorch_model.bin[.index.json]`` (see the module
    docstring), maps names to their canonical form (no ``gpt_neox.`` prefix, ``lm_head.weight`` →
    ``embed_out.weight``) and opens each file only when one of its tensors is asked for.

    Example::

        >>> r = HFCheckpointReader(some_hf_dir)                        # doctest: +SKIP
        >>> r.shape("layers.0.attention.query_key_value.weight")       # doctest: +SKIP
        (96, 32)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path} is not a directory; pass a local Hugging Face model directory.")
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file name, key in file)
        p = self.path
        if (p / "model.safetensors.index.json").is_file():
            self._from_index(p / "model.safetensors.index.json")
        elif (p / "model.safetensors").is_file():
            self._from_single("model.safetensors")
        elif (p / "pytorch_model.bin.index.json").is_file():
            self._from_index(p / "pytorch_model.bin.index.json")
        elif (p / "pytorch_model.bin").is_file():
            self._from_single("pytorch_model.bin")
        else:
            raise ConversionError(
                f"No weights found in {p}: expected model.safetensors, model.safetensors.index.json "
                "(+ shards), pytorch_model.bin or pytorch_model.bin.index.json (+ shards). "
                f"Found: {sorted(x.name for x in p.iterdir())}."
            )

    def _add(self, key: str, fname: str):
        self._where.setdefault(_canonical(key), (fname, key))

    def _from_single(self, fname: str):
        for key in self._open(fname).keys():
            self._add(key, fname)

    def _from_index(self, index: Path):
        data = _read_json(index, "")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index} has no 'weight_map'; the index is corrupt: re-download it.")
        for key, fname in wm.items():
            if not (self.path / fname).is_file():
                raise ConversionError(
                    f"{index} lists tensor '{key}' in {fname}, but {self.path / fname} is missing: "
                    "download every shard of the checkpoint."
                )
            self._add(key, fname)

    def _open(self, fname: str):
        if fname not in self._files:
            file = self.path / fname
            if fname.endswith(".safetensors"):
                self._files[fname] = _SafetensorsFile(file)
            else:
                # One .bin shard at a time: drop the previous one (memory-mapped, but keep it light).
                for k in [k for k in self._files if not k.endswith(".safetensors")]:
                    del self._files[k]
                self._files[fname] = _TorchFile(file)
        return self._files[fname]

    @property
    def files(self) -> list[str]:
        return sorted({f for f, _ in self._where.values()})

    def names(self) -> list[str]:
        """Canonical names of every stored tensor."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return _canonical(name) in self._where

    def file_of(self, name: str) -> Path:
        return self.path / self._where[_canonical(name)][0]

    def shape(self, name: str) -> tuple[int, ...]:
        fname, key = self._where[_canonical(name)]
        f = self._open(fname)
        if key not in f.keys():
            raise ConversionError(
                f"The index of {self.path} puts tensor '{key}' in {fname}, but that file does not "
                "hold it: the index or the shard is corrupt; re-download the checkpoint."
            )
        return f.shape(key)

    def get(self, name: str) -> np.ndarray:
        fname, key = self._where[_canonical(name)]
        return self._open(fname).get(key)


# ------------------------------------------------------------------------------------------------
# Filling abstract params
# ------------------------------------------------------------------------------------------------


def _fill(abstract: nnx.State, values: Mapping[tuple, Any]) -> nnx.State:
    """Replace every leaf of ``abstract`` by ``values[path]`` (a jax/numpy array)."""
    pure = nnx.to_pure_dict(abstract)

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, prefix + (k,)) for k, v in node.items()}
        return values[prefix]

    nnx.replace_by_pure_dict(abstract, walk(pure, ()))
    return abstract


def _init_value_head(config: GPTNeoXConfig, key) -> dict[tuple, jax.Array]:
    return {(k,): v for k, v in gpt_neox.init_value_head(config, key).items()}


def _read_value_head(file: Path, config: GPTNeoXConfig) -> dict[tuple, jax.Array]:
    f = _SafetensorsFile(file)
    pd = _DTYPES[config.param_dtype]
    out = {}
    for key, path, shape in (
        ("v_head.summary.weight", ("value_kernel",), (1, config.hidden_size)),
        ("v_head.summary.bias", ("value_bias",), (1,)),
    ):
        if key not in f.keys():
            raise ConversionError(f"{file} lacks tensor '{key}' (shape {shape}); re-create the value head file.")
        if f.shape(key) != shape:
            raise ConversionError(
                f"{file}: tensor '{key}' has shape {f.shape(key)}, expected {shape} "
                f"(hidden_size={config.hidden_size})."
            )
        out[path] = jnp.asarray(f.get(key).reshape(-1 if key.endswith("weight") else ()).astype(pd))
    return out


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    value_head: bool = False,
    key: jax.Array | None = None,
    strict: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[GPTNeoXConfig, nnx.GraphDef, nnx.State]:
    """Load a local Hugging Face GPT-NeoX directory as ``(config, graphdef, params)``.

    Reads tensor by tensor into the parameter tree from :func:`gpt_neox.abstract_params`, checking
    every shape. A value head (``value_head=True``) comes from ``value_head.safetensors`` in
    ``path`` when present, else is initialised randomly from ``key``.

    Args:
      path: directory with ``config.json`` and weights (see the module docstring).
      dtype: compute dtype recorded in the config (parameters are stored in ``param_dtype``).
      param_dtype: dtype of the loaded parameters (float32 by default, whatever the file holds).
      value_head: add a value head.
      key: PRNG key for a new value head.
      strict: raise (instead of warn) on unexpected tensors in the files.
      mesh: place each tensor, as it is read, with the sharding that
        :mod:`klq_jax.sharding`'s rules give it on this mesh, so a model larger than one device's
        memory never sits on one device (default: the default device).

    Returns:
      ``(config, graphdef, params)`` for :func:`gpt_neox.apply`.

    Raises:
      ConversionError: bad config, missing/mis-shaped tensor, unreadable file (named in the message).

    Example::

        >>> config, graphdef, params = load_hf("pythia-1b-deduped/")            # doctest: +SKIP
        >>> out = gpt_neox.apply(graphdef, params, tokens, mask)                 # doctest: +SKIP
    """
    path = Path(path)
    config = config_from_hf(
        read_hf_config(path),
        dtype=dtype,
        param_dtype=param_dtype,
        value_head=value_head,
        source=str(path / "config.json"),
    )
    reader = HFCheckpointReader(path)
    graphdef, abstract, flat = _flat_abstract(config)
    pd = _DTYPES[config.param_dtype]
    values: dict[tuple, Any] = {}
    used = set()
    for p, var in flat.items():
        spec = _spec(p, config)
        if spec is None:
            continue
        if spec.hf_name not in reader:
            raise ConversionError(
                f"Tensor '{_hf_disk_name(spec.hf_name)}' (shape {spec.hf_shape}, for our "
                f"'{_join(p)}') is missing from {path} (files: {reader.files}). The weights do not "
                "match config.json, or a shard is missing: check the download."
            )
        found = reader.shape(spec.hf_name)
        if found != spec.hf_shape:
            raise ConversionError(
                f"Tensor '{_hf_disk_name(spec.hf_name)}' in {reader.file_of(spec.hf_name)} has shape "
                f"{found}, expected {spec.hf_shape} (from config.json: hidden_size="
                f"{config.hidden_size}, num_attention_heads={config.num_heads}, intermediate_size="
                f"{config.intermediate_size}, vocab_size={config.vocab_size}). The weights and "
                "config.json do not belong together."
            )
        arr = spec.to_ours(reader.get(spec.hf_name)).astype(pd)
        assert arr.shape == tuple(var.shape), (p, arr.shape, var.shape)
        values[p] = jnp.asarray(arr) if mesh is None else jax.device_put(arr, variable_sharding(var, mesh))
        used.add(spec.hf_name)
    if value_head:
        vh_file = path / VALUE_HEAD_FILE
        if vh_file.is_file():
            values.update(_read_value_head(vh_file, config))
        else:
            if key is None:
                raise ConversionError(
                    f"value_head=True and {path} has no {VALUE_HEAD_FILE}: pass a PRNG key "
                    "(key=jax.random.key(seed)) to initialise the value head."
                )
            values.update(_init_value_head(config, key))
        if mesh is not None:  # the (small) value head: placed like every other parameter
            for p in [q for q in values if q[0].startswith("value_")]:
                values[p] = jax.device_put(values[p], variable_sharding(flat[p], mesh))
    ignorable = {"embed_out.weight"} if config.tie_word_embeddings else set()
    unexpected = [
        n for n in reader.names()
        if n not in used and n not in ignorable and not _IGNORED_TENSOR.search(n)
    ]
    if unexpected:
        msg = (
            f"{path} holds tensors that a {('GPTNeoXForCausalLM' if config.lm_head else 'GPTNeoXForSequenceClassification')} "
            f"with this config.json does not use: {unexpected[:10]}"
            + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
            + ". Check that config.json (architectures, num_hidden_layers) matches the weights."
        )
        if strict:
            raise ConversionError(msg)
        warnings.warn(msg, stacklevel=2)
    return config, graphdef, _fill(abstract, values)


# ------------------------------------------------------------------------------------------------
# Writing safetensors (streamed: one tensor in host memory at a time)
# ------------------------------------------------------------------------------------------------

_ST_NAMES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


@dataclasses.dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _write_safetensors(file: Path, entries: list[_Entry], metadata: Mapping[str, str] | None = None):
    """Write ``entries`` as a safetensors file, producing (and freeing) one tensor at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _ST_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for e in entries:
            arr = np.asarray(e.produce()).astype(e.dtype, copy=False)
            if not arr.flags.c_contiguous:
                arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            if arr.shape != e.shape:
                raise ConversionError(f"Internal error: tensor {e.name} has shape {arr.shape}, expected {e.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` (10^9), ``500MiB`` (2^20), ``20KB`` or an int.

    Example::

        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(123)
        (5000000000, 2097152, 123)
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"max_shard_size={size!r} is not a size; write e.g. '5GB', '500MB' or '2GiB'.")
    num, unit = float(m.group(1)), m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I") or ""]
    return int(num * base**power)


# ------------------------------------------------------------------------------------------------
# Atomic directory writes
# ------------------------------------------------------------------------------------------------


class _AtomicDir:
    """Write into a temporary sibling directory; rename it to ``path`` on success, delete on error."""

    def __init__(self, path: str | os.PathLike, overwrite: bool):
        self.path = Path(path)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise ConversionError(f"{self.path} exists and is not a directory; choose another output path.")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise ConversionError(
                f"{self.path} exists and is not empty; choose a new output directory or pass "
                "overwrite=True (--overwrite)."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        # mkdtemp makes a private (0700) directory; a checkpoint should be readable like any other.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _flat_values(params) -> dict[tuple, Any]:
    """``{path tuple: array}`` of an ``nnx.State`` or nested dict of arrays."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            out[prefix] = node

    walk(params, ())
    # Normalise digit-string keys (e.g. from a restored dict) to the ints NNX uses for layers.
    return {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): v for p, v in out.items()}


def _check_params(config: GPTNeoXConfig, values: Mapping[tuple, Any], source: str):
    _, _, flat = _flat_abstract(config)
    missing = [_join(p) for p in flat if p not in values]
    if missing:
        raise ConversionError(
            f"{source}: parameters {missing[:8]} are missing for this config; the params do not "
            "belong to the config."
        )
    for p, var in flat.items():
        shape = tuple(np.shape(values[p]))
        if shape != tuple(var.shape):
            raise ConversionError(
                f"{source}: parameter '{_join(p)}' has shape {shape}, expected {tuple(var.shape)} for "
                "this config; the params do not belong to the config."
            )
    extra = [_join(p) for p in values if p not in flat]
    if extra:
        raise ConversionError(f"{source}: parameters {extra[:8]} are not part of this config's model.")
    return flat


def _copy_tokenizer(src: str | os.PathLike, dst: Path, required: bool):
    src = Path(src)
    found = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if required and not [n for n in found if n != "generation_config.json"]:
        raise ConversionError(
            f"No tokenizer files in {src} (looked for {list(TOKENIZER_FILES)}); pass the directory "
            "that holds tokenizer.json / tokenizer_config.json."
        )
    for n in found:
        shutil.copy2(src / n, dst / n)


# ------------------------------------------------------------------------------------------------
# Flax -> HF
# ------------------------------------------------------------------------------------------------


def save_hf(
    path: str | os.PathLike,
    config: GPTNeoXConfig,
    params,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as a Hugging Face GPT-NeoX directory that ``transformers`` loads.

    ``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` when the weights exceed ``max_shard_size``), with the names and
    layouts of ``GPTNeoXForCausalLM`` (``AutoModelForCausalLM``) or, for a score-head model without
    LM head, ``GPTNeoXForSequenceClassification`` (``AutoModelForSequenceClassification``). A value
    head is written beside, to ``value_head.safetensors`` (``v_head.summary.{weight,bias}``);
    transformers ignores it and :func:`load_hf` reads it back.

    Args:
      path: output directory (must not exist or be empty unless ``overwrite``).
      config, params: the model (``params`` as returned by :func:`load_hf` / :func:`gpt_neox.init`).
      tokenizer_dir: copy the tokenizer files found there.
      max_shard_size: largest shard, bytes or a string like ``"5GB"``.
      dtype: storage dtype of the HF tensors (default ``config.param_dtype``).
      hf_config: an original HF config whose token ids (``bos/eos/pad_token_id``) are kept.
      overwrite: replace an existing non-empty ``path``.

    Returns:
      ``path``.

    Example::

        >>> save_hf("out/policy-hf", config, params, tokenizer_dir="pythia-1b/")   # doctest: +SKIP
        >>> transformers.AutoModelForCausalLM.from_pretrained("out/policy-hf")      # doctest: +SKIP
    """
    dtype = _check_dtype("dtype", dtype or config.param_dtype)
    hf_dict = config_to_hf(config, base=hf_config, torch_dtype=dtype)
    values = _flat_values(params)
    flat = _check_params(config, values, "save_hf")
    sd = _DTYPES[dtype]
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ConversionError(f"max_shard_size={max_shard_size!r} must be positive.")

    entries: list[_Entry] = []
    vh: list[_Entry] = []
    for p in flat:
        spec = _spec(p, config)
        if spec is None:
            continue
        v = values[p]
        entries.append(
            _Entry(_hf_disk_name(spec.hf_name), spec.hf_shape, sd, lambda v=v, s=spec: s.to_hf(np.asarray(v)))
        )
    if config.value_head:
        D = config.hidden_size
        k, b = values[("value_kernel",)], values[("value_bias",)]
        vh = [
            _Entry("v_head.summary.weight", (1, D), _DTYPES["float32"], lambda k=k: np.asarray(k).reshape(1, D)),
            _Entry("v_head.summary.bias", (1,), _DTYPES["float32"], lambda b=b: np.asarray(b).reshape(1)),
        ]

    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes

    meta = {"format": "pt"}
    with _AtomicDir(path, overwrite) as tmp:
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", shards[0], meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                _write_safetensors(tmp / fname, shard, meta)
                weight_map.update({e.name: fname for e in shard})
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if vh:
            _write_safetensors(tmp / VALUE_HEAD_FILE, vh, meta)
        (tmp / "config.json").write_text(json.dumps(hf_dict, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp, required=True)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# Our format
# ------------------------------------------------------------------------------------------------


def save_flax(
    path: str | os.PathLike,
    config: GPTNeoXConfig,
    params,
    *,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write our checkpoint: ``klq_config.json`` + ``params.safetensors`` (see the module docstring).

    Args:
      path: output directory (must not exist or be empty unless ``overwrite``).
      config, params: the model.
      hf_config: the original HF ``config.json`` dict, kept as ``hf_config.json``.
      tokenizer_dir: copy tokenizer files found there (none is fine).
      overwrite: replace an existing non-empty ``path``.

    Example::

        >>> save_flax("ckpt/pythia-1b", *load_hf("pythia-1b/")[::2])             # doctest: +SKIP
    """
    values = _flat_values(params)
    flat = _check_params(config, values, "save_flax")
    pd = _DTYPES[config.param_dtype]
    entries = [
        _Entry(_join(p), tuple(var.shape), pd, lambda v=values[p]: np.asarray(v)) for p, var in flat.items()
    ]
    meta = {"format": _FLAX_FORMAT, "version": str(_FLAX_VERSION)}
    with _AtomicDir(path, overwrite) as tmp:
        _write_safetensors(tmp / FLAX_PARAMS_FILE, entries, meta)
        doc = {"format": _FLAX_FORMAT, "version": _FLAX_VERSION, "config": dataclasses.asdict(config)}
        (tmp / FLAX_CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if hf_config is not None:
            (tmp / FLAX_HF_CONFIG_FILE).write_text(json.dumps(dict(hf_config), indent=2) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp, required=False)
    return Path(path)


def read_flax_config(path: str | os.PathLike) -> GPTNeoXConfig:
    """The :class:`GPTNeoXConfig` stored in our checkpoint directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; pass a klq_jax checkpoint directory.")
    doc = _read_json(
        path / FLAX_CONFIG_FILE,
        f"a klq_jax checkpoint directory holds {FLAX_CONFIG_FILE} and {FLAX_PARAMS_FILE} "
        "(written by save_flax / `klq-convert hf-to-flax`).",
    )
    if doc.get("format") != _FLAX_FORMAT or not isinstance(doc.get("config"), dict):
        raise ConversionError(
            f"{path / FLAX_CONFIG_FILE} is not a klq_jax GPT-NeoX config (format "
            f"{doc.get('format')!r}, expected {_FLAX_FORMAT!r})."
        )
    if doc.get("version", 1) > _FLAX_VERSION:
        raise ConversionError(
            f"{path / FLAX_CONFIG_FILE} has format version {doc['version']}, newer than this klq_jax "
            f"reads ({_FLAX_VERSION}); upgrade klq_jax."
        )
    fields = {f.name for f in dataclasses.fields(GPTNeoXConfig)}
    unknown = sorted(set(doc["config"]) - fields)
    if unknown:
        raise ConversionError(f"{path / FLAX_CONFIG_FILE}: unknown config fields {unknown}; upgrade klq_jax.")
    try:
        return GPTNeoXConfig(**doc["config"])
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path / FLAX_CONFIG_FILE}: invalid config: {e}") from None


def read_flax_hf_config(path: str | os.PathLike) -> dict | None:
    """The original HF config kept in our checkpoint (``hf_config.json``), or None."""
    f = Path(path) / FLAX_HF_CONFIG_FILE
    return _read_json(f, "") if f.is_file() else None


def load_flax(
    path: str | os.PathLike, *, dtype: str | None = None
) -> tuple[GPTNeoXConfig, nnx.GraphDef, nnx.State]:
    """Load our checkpoint directory as ``(config, graphdef, params)``.

    Args:
      path: directory written by :func:`save_flax` (or ``klq-convert hf-to-flax``).
      dtype: override the compute dtype stored in the config.

    Example::

        >>> config, graphdef, params = load_flax("ckpt/pythia-1b")                # doctest: +SKIP
    """
    path = Path(path)
    config = read_flax_config(path)
    if dtype is not None:
        config = config.replace(dtype=_check_dtype("dtype", dtype))
    file = path / FLAX_PARAMS_FILE
    if not file.is_file():
        raise ConversionError(f"{file} not found; a klq_jax checkpoint needs {FLAX_PARAMS_FILE}.")
    f = _SafetensorsFile(file)
    graphdef, abstract, flat = _flat_abstract(config)
    values = {}
    for p, var in flat.items():
        name = _join(p)
        if name not in f.keys():
            raise ConversionError(
                f"Tensor '{name}' (shape {tuple(var.shape)}) is missing from {file}; the file does not "
                f"match {FLAX_CONFIG_FILE}."
            )
        if f.shape(name) != tuple(var.shape):
            raise ConversionError(
                f"Tensor '{name}' in {file} has shape {f.shape(name)}, expected {tuple(var.shape)} "
                f"from {FLAX_CONFIG_FILE}."
            )
        values[p] = jnp.asarray(f.get(name).astype(var.dtype))
    extra = sorted(set(f.keys()) - {_join(p) for p in flat})
    if extra:
        raise ConversionError(f"{file} holds tensors {extra[:8]} that {FLAX_CONFIG_FILE}'s model lacks.")
    return config, graphdef, _fill(abstract, values)
