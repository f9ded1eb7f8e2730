"""Hugging Face checkpoints ⇄ our Flax networks: one engine for GPT-NeoX, GPT-2, Llama, DistilBERT.

Both directions, as a library (the ``klq-convert`` CLI is a thin layer over it)::

    >>> import jax, tempfile
    >>> from klq_jax.models import hf
    >>> from klq_jax.models.gpt_neox import GPTNeoXConfig, init
    >>> d = tempfile.mkdtemp()
    >>> config = GPTNeoXConfig.tiny()
    >>> _ = hf.save_hf(d + "/hf", config, init(config, jax.random.key(0))[1])   # Flax -> HF
    >>> config2, graphdef, params = hf.load_hf(d + "/hf")                      # HF -> Flax
    >>> config2 == config
    True

The round trip keeps the checkpoint's ``bos/eos/pad_token_id`` (an ``eos_token_id`` list too):
:func:`load_hf` returns them on ``config.hf_token_ids`` and :func:`save_hf` writes them into
``config.json`` and ``generation_config.json`` (pass ``hf_config=`` to write others)::

    >>> config2.hf_token_ids
    {'bos_token_id': 0, 'eos_token_id': 0, 'pad_token_id': None}

How it is built
---------------
* :mod:`.tables`: per architecture, a declarative table — our parameter path ↔ HF tensor name
  with its layout transform, our config field ↔ the ``transformers`` config attribute, and the
  whitelist of supported attribute values (anything else is refused by name before loading).
* :mod:`.convert`: the one load loop (:func:`load_hf`, tensor by tensor, straight into a mesh
  if given) and the one save loop (:func:`save_hf`); configs go through ``transformers``' config
  classes (``GPTNeoXConfig``, ``GPT2Config``, ``LlamaConfig``, ``DistilBertConfig``: no torch).
* :mod:`.files`: reading weights (safetensors, sharded index, ``.bin`` via
  ``torch.load(weights_only=True)``; only regular files inside the directory), writing them
  (``safetensors`` per shard, split by ``huggingface_hub``), and directories that are replaced
  whole or not at all.

Reading a Hugging Face directory
--------------------------------
:func:`load_hf` reads ``config.json`` (never ``trust_remote_code``) and the weights from, in this
order of preference: ``model.safetensors.index.json`` + its shards, ``model.safetensors``,
``pytorch_model.bin.index.json`` + its shards, ``pytorch_model.bin``. Tensor names are accepted with
or without the trunk prefix (``gpt_neox.``, ``transformer.``, ``model.``, ``distilbert.``); buffers
(causal-mask tables, rotary inverse frequencies) are ignored; any other unexpected tensor is
reported (a warning, or an error with ``strict=True``).

A value head (``value_kernel [D]``, ``value_bias []``; GPT-NeoX and Llama) is not part of any HF
model: :func:`load_hf` initialises it randomly from ``key`` unless the directory holds a
``value_head.safetensors`` written by :func:`save_hf` (``v_head.summary.weight [1, D]``,
``v_head.summary.bias [1]``, TRL's names).

Our checkpoint format (:func:`save_flax` / :func:`load_flax`)
------------------------------------------------------------
A directory with ``klq_config.json`` (``{"format": "klq_jax.<arch>", "version": 1, "config":
{...}}``, every field of our config, compute dtype and heads included), ``params.safetensors``
(every parameter under its NNX path, e.g. ``layers.0.attention.qkv_kernel``, in our layout;
sharded above 5GB), optionally ``hf_config.json`` (the original HF ``config.json``; its token ids
fill ``config.hf_token_ids`` of a checkpoint whose ``klq_config.json`` has none) and tokenizer files. It stores a model exactly as the library holds it —
including models with no HF architecture (an LM with a score head) — and loads without any
layout transform; the end of a training run writes a Hugging Face directory instead.
"""

from klq_jax.models.hf.convert import (
    FLAX_CONFIG_FILE,
    VALUE_HEAD_FILE,
    arch_of_config,
    config_from_hf,
    config_to_hf,
    hf_tensor_names,
    load_flax,
    load_hf,
    read_flax_config,
    read_flax_hf_config,
    read_hf_config,
    save_flax,
    save_hf,
)
from klq_jax.models.hf.files import (
    TOKENIZER_FILES,
    ConversionError,
    WeightReader,
    clean_stale,
    refuse_overlap,
    tokenizer_size,
)
from klq_jax.models.hf.tables import ARCHS

SUPPORTED_ARCHITECTURES = tuple(h.hf_arch for a in ARCHS.values() for h in a.heads)

__all__ = [
    "ARCHS",
    "ConversionError",
    "FLAX_CONFIG_FILE",
    "SUPPORTED_ARCHITECTURES",
    "TOKENIZER_FILES",
    "VALUE_HEAD_FILE",
    "WeightReader",
    "arch_of_config",
    "clean_stale",
    "config_from_hf",
    "config_to_hf",
    "hf_tensor_names",
    "load_flax",
    "load_hf",
    "read_flax_config",
    "read_flax_hf_config",
    "read_hf_config",
    "refuse_overlap",
    "save_flax",
    "save_hf",
    "tokenizer_size",
]
