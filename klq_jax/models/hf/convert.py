"""The conversion engine: one load and one save loop for every architecture in :mod:`.tables`."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.hf import tables
from klq_jax.models.hf.files import (
    DTYPES,
    AtomicDir,
    ConversionError,
    TensorSpec,
    WeightReader,
    SAVE_HF_FILES,
    cast,
    check_shard_size,
    copy_tokenizer,
    output_files,
    read_json,
    write_weights,
)
from klq_jax.sharding import variable_sharding

FLAX_CONFIG_FILE = "klq_config.json"
FLAX_PARAMS_STEM = "params"
FLAX_HF_CONFIG_FILE = "hf_config.json"
VALUE_HEAD_FILE = "value_head.safetensors"
_FLAX_VERSION = 1
# The safetensors metadata save_hf writes in its weights: what marks a Hugging Face export as ours
# (which --overwrite may replace), unlike a model transformers saved.
EXPORT_METADATA = {"format": "pt", "klq_jax_export": "1"}
_HF_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_MISSING = object()
# The names of the files save_flax writes in its directory (SAVE_HF_FILES: save_hf's).
FLAX_FILES = output_files((FLAX_CONFIG_FILE, FLAX_HF_CONFIG_FILE), (FLAX_PARAMS_STEM,))


def _check_dtype(name: str, value: str) -> str:
    if value not in DTYPES:
        raise ConversionError(f"{name}={value!r} is not supported; use one of {list(DTYPES)}.")
    return value


def _module(arch: tables.Arch):
    return importlib.import_module(f"klq_jax.models.{arch.name}")


def _config_class(arch: tables.Arch):
    return getattr(_module(arch), arch.config_class)


def arch_of_config(config) -> tables.Arch:
    """The :class:`tables.Arch` of one of our config objects."""
    for arch in tables.ARCHS.values():
        if type(config).__name__ == arch.config_class and type(config).__module__.endswith(arch.name):
            return arch
    raise ConversionError(f"{type(config).__name__} is not a config of a convertible architecture.")


def _supported_text() -> str:
    return "; ".join(
        f"{a.model_type} ({', '.join(h.hf_arch for h in a.heads)})" for a in tables.ARCHS.values()
    )


def _get(obj, dotted: str, default=_MISSING):
    head, *rest = dotted.split(".")
    v = obj.get(head, default) if isinstance(obj, Mapping) else getattr(obj, head, default)
    for k in rest:
        if not isinstance(v, Mapping) or k not in v:
            return default
        v = v[k]
    return v


def _set(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory (clear errors if absent/corrupt)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; pass a local Hugging Face model directory.")
    return read_json(
        path / "config.json",
        "a Hugging Face model directory needs its config.json (download it with the weights).",
    )


def _arch_of_raw(raw: Mapping, source: str) -> tables.Arch:
    model_type = raw.get("model_type")
    if model_type is None:  # old configs: infer from the architecture name
        names = raw.get("architectures") or []
        for a in tables.ARCHS.values():
            if any(n in {h.hf_arch for h in a.heads} for n in names):
                return a
        if not names:
            return tables.GPT_NEOX
    if model_type not in tables.ARCHS:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported (architectures "
            f"{raw.get('architectures')}); supported: {_supported_text()}."
        )
    return tables.ARCHS[model_type]


def _hf_object(raw: Mapping, arch: tables.Arch, source: str):
    import transformers

    cls = getattr(transformers, arch.hf_config_class)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_dict(copy.deepcopy(dict(raw)))  # (transformers edits nested dicts)
    except Exception as e:  # transformers' own validation (strict dataclasses, ValueError, ...)
        msg = " ".join(str(e).split())
        raise ConversionError(
            f"{source}: this config is not supported: transformers' {arch.hf_config_class} refuses it: {msg}"
        ) from None


def _check_supported(hf_obj, raw: Mapping, arch: tables.Arch, source: str):
    for attr, allowed in arch.supported.items():
        value = _get(hf_obj, attr, None)
        if value in allowed:
            continue
        hint = ""
        if attr.startswith("rope_parameters") and raw.get("rope_scaling"):
            hint = (
                f" It comes from rope_scaling={raw['rope_scaling']!r}, the old spelling of "
                "rope_parameters, which transformers applies over rope_parameters: remove it or "
                "make it a supported rope."
            )
        raise ConversionError(
            f"{source}: {attr}={value!r} is not supported; supported values of {attr}: "
            f"{list(allowed)}.{hint}"
        )


def _head_of(hf_obj, arch: tables.Arch, source: str) -> tables.Head:
    names = list(getattr(hf_obj, "architectures", None) or [arch.heads[0].hf_arch])
    by_name = {h.hf_arch: h for h in arch.heads}
    if len(names) != 1 or names[0] not in by_name:
        raise ConversionError(
            f"{source}: architecture {names} is not supported; supported architectures: "
            f"{', '.join(by_name)}."
        )
    head = by_name[names[0]]
    n = getattr(hf_obj, "num_labels", None)
    if head.num_labels is not None and n != head.num_labels:
        raise ConversionError(
            f"{source}: {head.hf_arch} with num_labels={n} is not supported; only a scalar reward "
            f"model (num_labels={head.num_labels}) converts to a score head."
        )
    return head


def config_from_hf(
    hf_config: Mapping[str, Any] | Any,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    value_head: bool = False,
    source: str = "config.json",
):
    """Our config (of the matching architecture) from a Hugging Face config.

    The config goes through its ``transformers`` config class (defaults, legacy spellings,
    validation), then every whitelisted attribute is checked (:data:`tables.Arch.supported`) before
    anything else: an unsupported value is refused by name, never ignored.

    Args:
      hf_config: the parsed ``config.json`` dict, or a ``transformers`` config object.
      dtype: compute dtype of the Flax model (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: storage dtype of the Flax parameters.
      value_head: add a value head (not part of the HF model; GPT-NeoX and Llama only).
      source: file name used in error messages.

    Raises:
      ConversionError: an unsupported model type, architecture, label count or attribute value.

    Example::

        >>> config_from_hf({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        ...     "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "intermediate_size": 64, "rotary_pct": 0.25}).num_heads
        4
    """
    _check_dtype("dtype", dtype)
    _check_dtype("param_dtype", param_dtype)
    raw = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    arch = _arch_of_raw(raw, source)
    hf_obj = _hf_object(raw, arch, source) if isinstance(hf_config, Mapping) else hf_config
    _check_supported(hf_obj, raw, arch, source)
    head = _head_of(hf_obj, arch, source)
    if value_head and not arch.value_head:
        raise ConversionError(
            f"{source}: a value head is not supported on {arch.model_type} models; load it without "
            "value_head (value heads go on GPT-NeoX and Llama policies)."
        )
    kwargs: dict[str, Any] = {}
    for f in arch.fields:
        v = _get(hf_obj, f.hf) if f.read else _MISSING
        if v is _MISSING:
            continue
        kwargs[f.ours] = f.to_ours(v) if (f.to_ours is not None and v is not None) else v
    kwargs.update(head.flags)
    kwargs.update(dtype=dtype, param_dtype=param_dtype, hf_token_ids=_token_ids(hf_obj))
    if arch.value_head:
        kwargs["value_head"] = value_head
    try:
        return _config_class(arch)(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: this config is not supported: {e}") from None


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(hf_config) -> dict:
    """The ``bos/eos/pad_token_id`` that ``hf_config`` (a dict or a ``transformers`` config) sets
    (an ``eos_token_id`` list stays a list): what a model's ``hf_token_ids`` carries to
    :func:`save_hf`."""
    ids = {k: _get(hf_config, k) for k in TOKEN_ID_KEYS}
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in ids.items() if v is not _MISSING}


def _head_for_config(config, arch: tables.Arch) -> tables.Head:
    for h in arch.heads:
        if all(getattr(config, k) == v for k, v in h.flags.items() if k in ("lm_head", "score_head")):
            return h
    lm, score = getattr(config, "lm_head", False), getattr(config, "score_head", False)
    what = (
        "both an LM head and a score head" if lm and score else f"lm_head={lm}, score_head={score}"
    )
    raise ConversionError(
        f"A {arch.model_type} model with {what} has no Hugging Face architecture (supported: "
        f"{', '.join(h.hf_arch for h in arch.heads)}); save the LM (score_head=False) or the "
        "reward model (lm_head=False) separately."
    )


def _hf_config_object(config, *, base: Mapping[str, Any] | None = None, torch_dtype: str = "float32"):
    import transformers

    arch = arch_of_config(config)
    head = _head_for_config(config, arch)
    kwargs: dict[str, Any] = {}
    for f in arch.fields:
        if f.write_if is not None and not f.write_if(config):
            continue
        v = getattr(config, f.ours)
        _set(kwargs, f.hf, f.to_hf(v) if f.to_hf is not None else v)
    for k, v in arch.hf_constants.items():
        _set(kwargs, k, v)
    if head.num_labels is not None:
        kwargs["num_labels"] = head.num_labels
    kwargs.update(arch.token_ids)
    base = {**config.hf_token_ids, **(base or {})}
    for k in TOKEN_ID_KEYS:
        if k in base:
            kwargs[k] = base[k]
    kwargs["architectures"] = [head.hf_arch]
    kwargs["dtype"] = torch_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, arch.hf_config_class)(**kwargs)


def config_to_hf(config, *, base: Mapping[str, Any] | None = None, torch_dtype: str = "float32") -> dict:
    """The Hugging Face ``config.json`` dict of ``config`` (built by its ``transformers`` class).

    Each token id (``bos/eos/pad_token_id``) comes from ``base`` (e.g. the original HF config) if
    it has it, else from ``config.hf_token_ids`` (those of the checkpoint it was read from), else
    the architecture's default (Pythia: ``bos = eos = 0``, no pad).

    Example::

        >>> from klq_jax.models.gpt_neox import GPTNeoXConfig
        >>> config_to_hf(GPTNeoXConfig.tiny())["architectures"]
        ['GPTNeoXForCausalLM']
    """
    return _hf_config_object(config, base=base, torch_dtype=torch_dtype).to_dict()


# ------------------------------------------------------------------------------------------------
# Tensor plans
# ------------------------------------------------------------------------------------------------


def _join(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _flat_abstract(config):
    arch = arch_of_config(config)
    graphdef, abstract = _module(arch).abstract_params(config)
    return graphdef, abstract, {tuple(k): v for k, v in nnx.to_flat_state(abstract)}


def _plan(arch: tables.Arch, config, flat, *, bare: bool = False) -> dict[tuple, tuple[str, tables.Transform]]:
    """Our parameter path → (HF tensor name, transform), for every parameter in ``flat``."""
    n_layers = getattr(config, arch.layers_field)
    rules: dict[str, tuple[str, tables.Transform]] = {}
    for ours, theirs, tf in arch.tensors:
        if "{i}" in ours:
            for i in range(n_layers):
                rules[ours.format(i=i)] = (theirs.format(i=i), tf)
        else:
            rules[ours] = (theirs, tf)
    plan = {}
    for p in flat:
        name = _join(p)
        if name in rules:
            hf_name, tf = rules[name]
            if bare and arch.prefix and hf_name.startswith(arch.prefix):
                hf_name = hf_name[len(arch.prefix):]
            plan[p] = (hf_name, tf)
        elif p not in (("value_kernel",), ("value_bias",)):
            raise ConversionError(f"Internal error: no Hugging Face name for {arch.name} parameter {name}")
    return plan


def _hf_shape(tf: tables.Transform, shape) -> tuple[int, ...]:
    return tuple(jax.eval_shape(tf.to_hf, jax.ShapeDtypeStruct(tuple(shape), jnp.float32)).shape)


def hf_tensor_names(config) -> dict[str, str]:
    """Our parameter path (``'layers.0.attention.qkv_kernel'``) → HF tensor name (as written).

    Example::

        >>> from klq_jax.models.gpt_neox import GPTNeoXConfig
        >>> hf_tensor_names(GPTNeoXConfig.tiny())["layers.1.mlp.up_kernel"]
        'gpt_neox.layers.1.mlp.dense_h_to_4h.weight'
    """
    arch = arch_of_config(config)
    _, _, flat = _flat_abstract(config)
    bare = _head_for_config(config, arch).bare
    return {_join(p): name for p, (name, _) in _plan(arch, config, flat, bare=bare).items()}


def _candidates(arch: tables.Arch, hf_name: str) -> list[str]:
    names = [hf_name]
    if arch.prefix and hf_name.startswith(arch.prefix):
        names.append(hf_name[len(arch.prefix):])
    names += list(arch.aliases.get(hf_name, ()))
    return names


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


def _place(arr: np.ndarray, var, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A tensor just read, on the default device, or (``mesh``) straight into ``var``'s sharding
    (each device receives only its shard)."""
    return jnp.asarray(arr) if mesh is None else jax.device_put(arr, variable_sharding(var, mesh))


def _fill(abstract: nnx.State, values: Mapping[tuple, Any]) -> nnx.State:
    """Replace every leaf of ``abstract`` by ``values[path]`` (a jax/numpy array)."""
    pure = nnx.to_pure_dict(abstract)

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, prefix + (k,)) for k, v in node.items()}
        return values[prefix]

    nnx.replace_by_pure_dict(abstract, walk(pure, ()))
    return abstract


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


def _check_params(config, values: Mapping[tuple, Any], source: str):
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


class _ValueHeadShape(NamedTuple):
    hidden_size: int
    param_dtype: Any


def _value_head(flat, values, path: Path, key, source_dir: Path | None):
    """Fill ``values`` with the value head: from ``value_head.safetensors`` or a fresh init."""
    D = flat[("value_kernel",)].shape[0]
    pd = flat[("value_kernel",)].dtype
    vh_file = None if source_dir is None else source_dir / VALUE_HEAD_FILE
    if vh_file is not None and vh_file.is_file():
        r = WeightReader(source_dir, stems=("value_head",), bin_files=False)
        for name, p, shape in (
            ("v_head.summary.weight", ("value_kernel",), (1, D)),
            ("v_head.summary.bias", ("value_bias",), (1,)),
        ):
            if name not in r:
                raise ConversionError(f"{vh_file} lacks tensor '{name}' (shape {shape}); re-create the value head file.")
            if r.shape(name) != shape:
                raise ConversionError(
                    f"{vh_file}: tensor '{name}' has shape {r.shape(name)}, expected {shape} (hidden size {D})."
                )
            values[p] = jnp.asarray(r.get(name).reshape(flat[p].shape).astype(pd))
        return
    if key is None:
        raise ConversionError(
            f"value_head=True and {path} has no {VALUE_HEAD_FILE}: pass a PRNG key "
            "(key=jax.random.key(seed)) to initialise the value head."
        )
    from klq_jax.models.decoder import init_value_head

    head = init_value_head(_ValueHeadShape(D, pd), key)
    values[("value_kernel",)], values[("value_bias",)] = head["value_kernel"], head["value_bias"]


# ------------------------------------------------------------------------------------------------
# HF -> Flax
# ------------------------------------------------------------------------------------------------


def _check_tied_copy(reader: WeightReader, name: str, embedding: str, path: Path, strict: bool) -> None:
    """Warn (raise if ``strict``) unless the stored tied unembedding ``name`` equals ``embedding``."""
    a, b = reader.get(name), reader.get(embedding)
    if a.shape == b.shape and np.array_equal(a, b):
        return  # a copy: nothing is lost by using the embedding
    diff = (f"max |difference| {float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))):.3g}"
            if a.shape == b.shape else f"shape {a.shape} vs {b.shape}")
    msg = (
        f"{path}: config.json ties the unembedding to the embedding '{embedding}', but the files also "
        f"hold '{name}', which is not a copy of it ({diff}); klq_jax uses the embedding and ignores "
        f"'{name}': set tie_word_embeddings to false in config.json to use '{name}' instead, or delete "
        f"it from the files."
    )
    if strict:
        raise ConversionError(msg)
    warnings.warn(msg, stacklevel=3)


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    value_head: bool = False,
    key: jax.Array | None = None,
    strict: bool = False,
    mesh: jax.sharding.Mesh | None = None,
):
    """Load a local Hugging Face directory as ``(config, graphdef, params)`` of our network.

    The architecture comes from ``config.json`` (see :mod:`.tables`); weights are read tensor by
    tensor (safetensors, sharded index, or ``.bin`` through ``torch.load(weights_only=True)``)
    into the parameter tree of its ``abstract_params``, every shape checked. A value head
    (``value_head=True``) comes from ``value_head.safetensors`` in ``path`` when present, else is
    initialised from ``key`` (N(0, 1/(D+1)), bias 0).

    Args:
      path: directory with ``config.json`` and weights.
      dtype: compute dtype recorded in the config (parameters are stored in ``param_dtype``).
      param_dtype: dtype of the loaded parameters (float32 by default, whatever the file holds).
      value_head: add a value head.
      key: PRNG key for a new value head.
      strict: raise (instead of warn) on tensors in the files that the model does not use.
      mesh: place each tensor, as it is read, with the sharding that :mod:`klq_jax.sharding`'s
        rules give it on this mesh (default: the default device).

    Raises:
      ConversionError: bad config, missing/mis-shaped tensor, unreadable file (named in the message).

    Example::

        >>> config, graphdef, params = load_hf("pythia-1b-deduped/")            # doctest: +SKIP
        >>> out = gpt_neox.apply(graphdef, params, tokens, mask)                 # doctest: +SKIP
    """
    path = Path(path)
    source = str(path / "config.json")
    raw = read_hf_config(path)
    config = config_from_hf(raw, dtype=dtype, param_dtype=param_dtype, value_head=value_head, source=source)
    arch = arch_of_config(config)
    hf_obj = _hf_object(raw, arch, source)
    reader = WeightReader(path)
    graphdef, abstract, flat = _flat_abstract(config)
    pd = DTYPES[config.param_dtype]
    values: dict[tuple, Any] = {}
    used: set[str] = set()
    disk_of: dict[tuple, str] = {}  # our path -> the tensor name read from the files
    for p, (hf_name, tf) in _plan(arch, config, flat).items():
        var = flat[p]
        hf_shape = _hf_shape(tf, var.shape)
        disk = next((n for n in _candidates(arch, hf_name) if n in reader), None)
        if disk is None:
            raise ConversionError(
                f"Tensor '{hf_name}' (shape {hf_shape}, for our '{_join(p)}') is missing from "
                f"{path} (files: {reader.files}). The weights do not match config.json, or a shard "
                "is missing: check the download."
            )
        found = reader.shape(disk)
        if found != hf_shape:
            sizes = ", ".join(
                f"{f.hf}={_get(hf_obj, f.hf)}" for f in arch.fields
                if isinstance(_get(hf_obj, f.hf, None), int) and not isinstance(_get(hf_obj, f.hf), bool)
            )
            raise ConversionError(
                f"Tensor '{disk}' in {reader.file_of(disk)} has shape {found}, expected {hf_shape} "
                f"(from config.json: {sizes}). The weights and config.json do not belong together."
            )
        arr = cast(tf.to_ours(reader.get(disk), tuple(var.shape)), pd, f"Tensor '{disk}' in {reader.file_of(disk)}")
        values[p] = _place(arr, var, mesh)
        used.add(disk)
        disk_of[p] = disk
    if ("value_kernel",) in flat:
        _value_head(flat, values, path, key, path)
        if mesh is not None:
            for p in (("value_kernel",), ("value_bias",)):
                values[p] = jax.device_put(values[p], variable_sharding(flat[p], mesh))
    ignored = re.compile(arch.ignored)
    # A tied unembedding may be stored anyway (a copy of the embedding): skip it, but only when
    # both configs say it is tied (an untied one is read above or reported as unused).
    is_tied = getattr(config, "tie_word_embeddings", False) and _get(hf_obj, "tie_word_embeddings", True)
    tied = set(arch.tied_names) if is_tied else set()
    for name in sorted(tied & set(reader.names())):
        _check_tied_copy(reader, name, disk_of[(arch.embedding,)], path, strict)
    unexpected = [n for n in reader.names() if n not in used and not ignored.search(n) and n not in tied]
    if unexpected:
        head = _head_for_config(config, arch).hf_arch
        msg = (
            f"{path} holds tensors that a {head} with this config.json does not use: {unexpected[:10]}"
            + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
            + ". Check that config.json (architectures, number of layers) matches the weights."
        )
        if strict:
            raise ConversionError(msg)
        warnings.warn(msg, stacklevel=2)
    return config, graphdef, _fill(abstract, values)


# ------------------------------------------------------------------------------------------------
# What overwrite may replace
# ------------------------------------------------------------------------------------------------


def _conversion_config(path: str, flax: bool) -> str | None:
    """None if ``path`` is the config a conversion writes (ours: a ``klq_jax.*`` format; a Hugging
    Face export's: a transformers config with its ``model_type``), else why not."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = None
    if flax:
        ok = isinstance(doc, dict) and str(doc.get("format", "")).startswith("klq_jax.")
    else:
        ok = isinstance(doc, dict) and isinstance(doc.get("model_type"), str)
    return None if ok else f"not the config of a {'klq_jax checkpoint' if flax else 'Hugging Face export'}"


def _regular_file(path: str) -> str | None:
    """None if ``path`` is a regular file (what a conversion writes), else what it is."""
    if os.path.isfile(path):
        return None
    return f"{'a directory' if os.path.isdir(path) else 'not a regular file'}; a conversion writes a file"


def _marked_export(path: str) -> str | None:
    """None if ``path`` is a weights file :func:`save_hf` wrote (its metadata holds
    :data:`EXPORT_METADATA`'s mark; only the header is read), else why not."""
    why = _regular_file(path)
    if why:
        return why
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
    except Exception:  # not a readable safetensors file
        meta = {}
    if meta.get("klq_jax_export") == EXPORT_METADATA["klq_jax_export"]:
        return None
    return "not written by klq convert: no klq_jax_export mark in its metadata, e.g. a model transformers saved"


def refuse_unless_conversion_output(path: str | os.PathLike) -> None:
    """Raise unless the directory ``path`` is a previous conversion output, which ``overwrite``
    (``klq convert --overwrite``) may replace: a klq_jax checkpoint (only :func:`save_flax`'s files,
    its ``klq_config.json`` one of ours) or a Hugging Face export (only :func:`save_hf`'s files, its
    ``config.json`` a transformers config, its ``model*.safetensors`` marked by :data:`EXPORT_METADATA`:
    a model saved by ``transformers`` is not one), whose run lock no live process holds. Each entry must be
    a regular file: a directory or a symbolic link under an output file's name is not a conversion's.

    Raises:
      RunLockedError: a live process (a training run) holds the directory's lock.
      ForeignFilesError: it holds anything else; the first entries are named, nothing is deleted.
    """
    from klq_jax.errors import ForeignFilesError
    from klq_jax.train import run_dir

    path = str(path)
    run_dir.refuse_live_holder(path, instead="choose another DST")
    flax = os.path.lexists(os.path.join(path, FLAX_CONFIG_FILE))
    config = FLAX_CONFIG_FILE if flax else "config.json"
    if os.path.lexists(os.path.join(path, config)):  # a conversion's directory: its files only
        names = re.compile(FLAX_FILES if flax else SAVE_HF_FILES)
        # Under an output file's name a conversion writes a regular file (a link or a directory is not its).
        checks = {n: _regular_file for n in os.listdir(path) if names.search(n)}
        checks[config] = lambda p: _conversion_config(p, flax)
        weights = [] if flax else [n for n in checks if _HF_WEIGHTS.search(n)]
        checks.update({n: _marked_export for n in weights})
        foreign = run_dir.foreign_entries(path, checks, only_these=True, writer="a conversion")
        if not flax and not weights:
            foreign.insert(0, "model.safetensors (missing: an export of klq convert holds its weights)")
    else:  # without its config nothing there is recognisably a conversion's
        foreign = run_dir.foreign_entries(path, {}, only_these=True, writer="a conversion")
    if foreign:
        raise ForeignFilesError(
            f"--overwrite replaces only a previous conversion output (a klq_jax checkpoint or a Hugging "
            f"Face export), and {path} holds files a conversion did not write: {'; '.join(foreign[:5])}"
            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            + ". The conversion will not delete them: choose another DST."
        )


# ------------------------------------------------------------------------------------------------
# Flax -> HF
# ------------------------------------------------------------------------------------------------


def save_hf(
    path: str | os.PathLike,
    config,
    params,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as a Hugging Face directory that ``transformers`` loads.

    ``config.json`` (written by the architecture's ``transformers`` config class), the weights as
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards +
    ``model.safetensors.index.json`` (split by ``huggingface_hub``), ``generation_config.json`` for
    a causal LM, and the tokenizer files of ``tokenizer_dir``; the safetensors metadata holds
    :data:`EXPORT_METADATA` (``klq_jax_export``: what ``overwrite`` looks for). A value head goes beside, to
    ``value_head.safetensors`` (``v_head.summary.{weight,bias}``, TRL's names); transformers
    ignores it and :func:`load_hf` reads it back. The directory appears whole or not at all.

    Args:
      path: output directory (must not exist or be empty unless ``overwrite``).
      config, params: the model (as returned by :func:`load_hf` or an ``init``).
      tokenizer_dir: copy the tokenizer files found there (refused if larger than the embedding).
      max_shard_size: largest shard, bytes or a string like ``"5GB"``.
      dtype: storage dtype of the HF tensors (default ``config.param_dtype``).
      hf_config: a HF config dict whose token ids (``bos/eos/pad_token_id``) are written; the
        ids it lacks come from ``config.hf_token_ids``, those of the checkpoint :func:`load_hf` /
        :func:`load_flax` read (else the architecture's defaults).
      overwrite: replace an existing non-empty ``path`` if it is a previous conversion output
        (:func:`refuse_unless_conversion_output`); it stays whole until the new one is complete.

    Example::

        >>> save_hf("out/policy-hf", config, params, tokenizer_dir="pythia-1b/")   # doctest: +SKIP
        >>> transformers.AutoModelForCausalLM.from_pretrained("out/policy-hf")      # doctest: +SKIP
    """
    arch = arch_of_config(config)
    dtype = _check_dtype("dtype", dtype or config.param_dtype)
    head = _head_for_config(config, arch)
    hf_obj = _hf_config_object(config, base=hf_config, torch_dtype=dtype)
    values = _flat_values(params)
    flat = _check_params(config, values, "save_hf")
    check_shard_size(max_shard_size)
    sd = DTYPES[dtype]
    tensors = {
        name: TensorSpec(_hf_shape(tf, flat[p].shape), sd, lambda v=values[p], tf=tf: tf.to_hf(np.asarray(v)))
        for p, (name, tf) in _plan(arch, config, flat, bare=head.bare).items()
    }
    with AtomicDir(path, overwrite, refuse_unless_conversion_output) as tmp:
        write_weights(tmp, tensors, stem="model", max_shard_size=max_shard_size, metadata=EXPORT_METADATA)
        if ("value_kernel",) in flat:
            k, b = values[("value_kernel",)], values[("value_bias",)]
            f32 = DTYPES["float32"]
            write_weights(tmp, {
                "v_head.summary.weight": TensorSpec((1, k.shape[0]), f32, lambda: np.asarray(k).reshape(1, -1)),
                "v_head.summary.bias": TensorSpec((1,), f32, lambda: np.asarray(b).reshape(1)),
            }, stem="value_head", metadata=EXPORT_METADATA)
        hf_obj.save_pretrained(tmp)
        if getattr(config, "lm_head", False):
            import transformers

            transformers.GenerationConfig.from_model_config(hf_obj).save_pretrained(tmp)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp, required=True, vocab_size=config.vocab_size)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# Our format
# ------------------------------------------------------------------------------------------------


def save_flax(
    path: str | os.PathLike,
    config,
    params,
    *,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write our checkpoint: ``klq_config.json`` + ``params.safetensors`` (see the package docstring).

    Args:
      path: output directory (must not exist or be empty unless ``overwrite``).
      config, params: the model.
      hf_config: the original HF ``config.json`` dict, kept as ``hf_config.json``.
      tokenizer_dir: copy tokenizer files found there (none is fine; refused if larger than the
        embedding).
      overwrite: replace an existing non-empty ``path`` if it is a previous conversion output
        (:func:`refuse_unless_conversion_output`).
      max_shard_size: split ``params`` into ``params-0000i-of-0000n.safetensors`` above this size.
    """
    arch = arch_of_config(config)
    values = _flat_values(params)
    flat = _check_params(config, values, "save_flax")
    pd = DTYPES[config.param_dtype]
    tensors = {
        _join(p): TensorSpec(tuple(var.shape), pd, lambda v=values[p]: np.asarray(v)) for p, var in flat.items()
    }
    fmt = f"klq_jax.{arch.name}"
    with AtomicDir(path, overwrite, refuse_unless_conversion_output) as tmp:
        write_weights(tmp, tensors, stem=FLAX_PARAMS_STEM, max_shard_size=max_shard_size,
                      metadata={"format": fmt, "version": str(_FLAX_VERSION)})
        doc = {"format": fmt, "version": _FLAX_VERSION, "config": dataclasses.asdict(config)}
        (tmp / FLAX_CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if hf_config is not None:
            (tmp / FLAX_HF_CONFIG_FILE).write_text(json.dumps(dict(hf_config), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp, required=False, vocab_size=config.vocab_size)
    return Path(path)


def read_flax_config(path: str | os.PathLike):
    """The config stored in our checkpoint directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; pass a klq_jax checkpoint directory.")
    file = path / FLAX_CONFIG_FILE
    doc = read_json(
        file,
        f"a klq_jax checkpoint directory holds {FLAX_CONFIG_FILE} and {FLAX_PARAMS_STEM}.safetensors "
        "(written by save_flax / `klq-convert hf-to-flax`).",
    )
    fmt = doc.get("format")
    names = {a.name for a in tables.ARCHS.values()}
    if not (isinstance(fmt, str) and fmt.startswith("klq_jax.") and fmt[8:] in names) or not isinstance(doc.get("config"), dict):
        raise ConversionError(
            f"{file} is not a klq_jax checkpoint config (format {fmt!r}, expected one of "
            f"{sorted('klq_jax.' + n for n in names)})."
        )
    if doc.get("version", 1) > _FLAX_VERSION:
        raise ConversionError(
            f"{file} has format version {doc['version']}, newer than this klq_jax reads ({_FLAX_VERSION}); "
            "upgrade klq_jax."
        )
    cls = _config_class(tables.arch_by_name(fmt[8:]))
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc["config"]) - fields)
    if unknown:
        raise ConversionError(f"{file}: unknown config fields {unknown}; upgrade klq_jax.")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: invalid config: {e}") from None


def read_flax_hf_config(path: str | os.PathLike) -> dict | None:
    """The original HF config kept in our checkpoint (``hf_config.json``), or None."""
    f = Path(path) / FLAX_HF_CONFIG_FILE
    return read_json(f, "") if f.is_file() else None


def load_flax(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None):
    """Load our checkpoint directory as ``(config, graphdef, params)``.

    Args:
      path: directory written by :func:`save_flax` (or ``klq-convert hf-to-flax``).
      dtype: override the compute dtype stored in the config.
      mesh: place each tensor, as it is read, with its :mod:`klq_jax.sharding` sharding on this
        mesh, as :func:`load_hf` does (default: the default device).
    """
    path = Path(path)
    config = read_flax_config(path)
    kept = read_flax_hf_config(path)
    if not config.hf_token_ids and kept:  # a checkpoint written before configs carried the ids
        config = config.replace(hf_token_ids=_token_ids(kept))
    if dtype is not None:
        config = config.replace(dtype=_check_dtype("dtype", dtype))
    reader = WeightReader(path, stems=(FLAX_PARAMS_STEM,), bin_files=False)
    graphdef, abstract, flat = _flat_abstract(config)
    values = {}
    for p, var in flat.items():
        name = _join(p)
        if name not in reader:
            raise ConversionError(
                f"Tensor '{name}' (shape {tuple(var.shape)}) is missing from {path} ({reader.files}); "
                f"the files do not match {FLAX_CONFIG_FILE}."
            )
        if reader.shape(name) != tuple(var.shape):
            raise ConversionError(
                f"Tensor '{name}' in {reader.file_of(name)} has shape {reader.shape(name)}, expected "
                f"{tuple(var.shape)} from {FLAX_CONFIG_FILE}."
            )
        values[p] = _place(reader.get(name).astype(var.dtype), var, mesh)
    extra = sorted(set(reader.names()) - {_join(p) for p in flat})
    if extra:
        raise ConversionError(f"{path} holds tensors {extra[:8]} that {FLAX_CONFIG_FILE}'s model lacks.")
    return config, graphdef, _fill(abstract, values)

