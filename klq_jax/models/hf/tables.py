"""The declarative part of the conversion: per architecture, what maps onto what.

Each :class:`Arch` says, and only says:

* which network module and config class are ours, which ``transformers`` config class and
  ``model_type`` are theirs;
* the Hugging Face architectures (model classes) it converts, and the head flags each one means;
* ``fields``: our config field ↔ the attribute of the transformers config (a dotted path reaches
  into a dict attribute such as ``rope_parameters``);
* ``supported``: the whitelist of attribute values we implement; anything else is refused by
  name before a tensor is read;
* ``tensors``: our parameter path ↔ the HF tensor name, with the layout transform between them
  (``{i}`` stands for the layer index).

The engine (:mod:`klq_jax.models.hf.convert`) does every read and write from these tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Transform:
    """Layout change between an HF tensor and our parameter of shape ``shape``.

    ``to_ours(hf_array, our_shape)`` and ``to_hf(our_array)``; both work on numpy and jax arrays.
    """

    name: str
    to_ours: Callable[[Any, tuple], Any]
    to_hf: Callable[[Any], Any]


SAME = Transform("same", lambda w, s: w, lambda k: k)
# torch Linear weight [out, in] <-> our kernel [in, out].
LINEAR = Transform("linear", lambda w, s: w.T, lambda k: k.T)
# Linear [H*hd, D] <-> [D, H, hd] (a projection into heads).
LINEAR_TO_HEADS = Transform("linear_to_heads", lambda w, s: w.T.reshape(s), lambda k: k.reshape(k.shape[0], -1).T)
# Linear [D, H*hd] <-> [H, hd, D] (the projection out of heads).
LINEAR_FROM_HEADS = Transform(
    "linear_from_heads", lambda w, s: w.T.reshape(s), lambda k: k.reshape(-1, k.shape[-1]).T
)
# A [1, D] row (a one-output Linear) <-> [D].
ROW = Transform("row", lambda w, s: w.reshape(s), lambda k: k.reshape(1, -1))
# GPT-2 Conv1D [D, 3*H*hd] <-> [D, 3, H, hd]; bias [3*H*hd] <-> [3, H, hd]; c_proj [H*hd, D] <-> [H, hd, D].
SPLIT_COLUMNS = Transform("split_columns", lambda w, s: w.reshape(s), lambda k: k.reshape(k.shape[0], -1))
SPLIT_ALL = Transform("split_all", lambda w, s: w.reshape(s), lambda k: k.reshape(-1))
SPLIT_ROWS = Transform("split_rows", lambda w, s: w.reshape(s), lambda k: k.reshape(-1, k.shape[-1]))
# GPT-NeoX fused QKV: HF's 3D output rows are ordered (head, q/k/v, hd).
NEOX_QKV = Transform(
    "neox_qkv",
    lambda w, s: w.T.reshape(s[0], s[2], 3, s[3]).transpose(0, 2, 1, 3),
    lambda k: k.transpose(0, 2, 1, 3).reshape(k.shape[0], -1).T,
)
NEOX_QKV_BIAS = Transform(
    "neox_qkv_bias",
    lambda b, s: b.reshape(s[1], 3, s[2]).transpose(1, 0, 2),
    lambda b: b.transpose(1, 0, 2).reshape(-1),
)


@dataclasses.dataclass(frozen=True)
class Field:
    """Our config field ``ours`` ↔ the HF config attribute ``hf`` (dotted: into a dict attribute).

    ``to_ours`` / ``to_hf`` convert values; ``write_if(config)`` skips writing a field that means
    nothing for this config (e.g. llama3 rope factors of a default rope); ``read=False`` marks a
    field that is only written (a second HF spelling of the same value).
    """

    ours: str
    hf: str
    to_ours: Callable[[Any], Any] | None = None
    to_hf: Callable[[Any], Any] | None = None
    write_if: Callable[[Any], bool] | None = None
    read: bool = True


@dataclasses.dataclass(frozen=True)
class Head:
    """One HF architecture (model class) and the head flags of our config it stands for.

    ``num_labels``: the number of labels it must have (None: any). ``bare``: its tensors carry no
    prefix (the base model class).
    """

    hf_arch: str
    flags: Mapping[str, Any]
    num_labels: int | None = None
    bare: bool = False


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str  # our module under klq_jax.models, and the klq checkpoint format "klq_jax.<name>"
    config_class: str  # our config class in that module
    model_type: str  # HF model_type
    hf_config_class: str  # transformers config class
    heads: tuple[Head, ...]  # the first is the default when config.json names no architecture
    fields: tuple[Field, ...]
    supported: Mapping[str, tuple]
    tensors: tuple[tuple[str, str, Transform], ...]
    layers_field: str = "num_layers"
    prefix: str = ""  # HF name prefix of the trunk, optional when reading
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    ignored: str = r"(?!)"  # regex of buffers to skip when reading (matched on names without prefix)
    tied_names: tuple[str, ...] = ()  # HF names of a tied unembedding: skipped when reading...
    embedding: str = ""  # ...if equal to this parameter's tensor (our path of the embedding)
    token_ids: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # defaults when writing
    hf_constants: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # always written
    value_head: bool = False  # our network can carry a value head


_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")


def _ln(ours: str, hf: str) -> tuple[tuple[str, str, Transform], ...]:
    return ((f"{ours}.scale", f"{hf}.weight", SAME), (f"{ours}.bias", f"{hf}.bias", SAME))


def _policy_and_reward_heads(prefix: str) -> tuple[Head, Head]:
    """A decoder's ``<prefix>ForCausalLM`` (a policy) and ``<prefix>ForSequenceClassification``
    with one label (a reward model: a score head, no tied unembedding)."""
    return (
        Head(f"{prefix}ForCausalLM", {"lm_head": True, "score_head": False}),
        Head(f"{prefix}ForSequenceClassification",
             {"lm_head": False, "score_head": True, "tie_word_embeddings": False}, num_labels=1),
    )


GPT_NEOX = Arch(
    name="gpt_neox",
    config_class="GPTNeoXConfig",
    model_type="gpt_neox",
    hf_config_class="GPTNeoXConfig",
    heads=_policy_and_reward_heads("GPTNeoX"),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "hidden_size"),
        Field("num_layers", "num_hidden_layers"),
        Field("num_heads", "num_attention_heads"),
        Field("intermediate_size", "intermediate_size"),
        Field("rotary_pct", "rope_parameters.partial_rotary_factor", float),
        Field("rotary_emb_base", "rope_parameters.rope_theta", float),
        Field("max_position_embeddings", "max_position_embeddings"),
        Field("layer_norm_eps", "layer_norm_eps", float),
        Field("use_parallel_residual", "use_parallel_residual", bool),
        Field("attention_bias", "attention_bias", bool),
        Field("tie_word_embeddings", "tie_word_embeddings", bool),
        Field("hidden_act", "hidden_act"),
        Field("initializer_range", "initializer_range", float),
    ),
    supported={"hidden_act": _ACTS, "rope_parameters.rope_type": ("default",)},
    tensors=(
        ("embed_in", "gpt_neox.embed_in.weight", SAME),
        *_ln("layers.{i}.input_layernorm", "gpt_neox.layers.{i}.input_layernorm"),
        *_ln("layers.{i}.post_attention_layernorm", "gpt_neox.layers.{i}.post_attention_layernorm"),
        ("layers.{i}.attention.qkv_kernel", "gpt_neox.layers.{i}.attention.query_key_value.weight", NEOX_QKV),
        ("layers.{i}.attention.qkv_bias", "gpt_neox.layers.{i}.attention.query_key_value.bias", NEOX_QKV_BIAS),
        ("layers.{i}.attention.out_kernel", "gpt_neox.layers.{i}.attention.dense.weight", LINEAR_FROM_HEADS),
        ("layers.{i}.attention.out_bias", "gpt_neox.layers.{i}.attention.dense.bias", SAME),
        ("layers.{i}.mlp.up_kernel", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", LINEAR),
        ("layers.{i}.mlp.up_bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", SAME),
        ("layers.{i}.mlp.down_kernel", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", LINEAR),
        ("layers.{i}.mlp.down_bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", SAME),
        *_ln("final_layer_norm", "gpt_neox.final_layer_norm"),
        ("embed_out", "embed_out.weight", LINEAR),
        ("score_kernel", "score.weight", ROW),
    ),
    prefix="gpt_neox.",
    aliases={"embed_out.weight": ("lm_head.weight",)},
    ignored=r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$",
    tied_names=("embed_out.weight", "lm_head.weight"),
    embedding="embed_in",
    token_ids={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None},
    hf_constants={"rope_parameters.rope_type": "default"},
    value_head=True,
)

GPT2 = Arch(
    name="gpt2",
    config_class="GPT2Config",
    model_type="gpt2",
    hf_config_class="GPT2Config",
    heads=(
        Head("GPT2Model", {"lm_head": False, "score_head": False}, bare=True),
        Head("GPT2ForSequenceClassification", {"lm_head": False, "score_head": True}, num_labels=1),
        Head("GPT2LMHeadModel", {"lm_head": True, "score_head": False}),
    ),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("n_positions", "n_positions"),
        Field("n_embd", "n_embd"),
        Field("n_layer", "n_layer"),
        Field("n_head", "n_head"),
        Field("n_inner", "n_inner"),
        Field("activation_function", "activation_function"),
        Field("layer_norm_epsilon", "layer_norm_epsilon", float),
        Field("scale_attn_weights", "scale_attn_weights", bool),
        Field("scale_attn_by_inverse_layer_idx", "scale_attn_by_inverse_layer_idx", bool),
        Field("tie_word_embeddings", "tie_word_embeddings", bool),
        Field("initializer_range", "initializer_range", float),
    ),
    supported={"activation_function": _ACTS, "add_cross_attention": (False,)},
    tensors=(
        ("wte", "transformer.wte.weight", SAME),
        ("wpe", "transformer.wpe.weight", SAME),
        *_ln("h.{i}.ln_1", "transformer.h.{i}.ln_1"),
        ("h.{i}.attn.qkv_kernel", "transformer.h.{i}.attn.c_attn.weight", SPLIT_COLUMNS),
        ("h.{i}.attn.qkv_bias", "transformer.h.{i}.attn.c_attn.bias", SPLIT_ALL),
        ("h.{i}.attn.out_kernel", "transformer.h.{i}.attn.c_proj.weight", SPLIT_ROWS),
        ("h.{i}.attn.out_bias", "transformer.h.{i}.attn.c_proj.bias", SAME),
        *_ln("h.{i}.ln_2", "transformer.h.{i}.ln_2"),
        ("h.{i}.mlp.up_kernel", "transformer.h.{i}.mlp.c_fc.weight", SAME),
        ("h.{i}.mlp.up_bias", "transformer.h.{i}.mlp.c_fc.bias", SAME),
        ("h.{i}.mlp.down_kernel", "transformer.h.{i}.mlp.c_proj.weight", SAME),
        ("h.{i}.mlp.down_bias", "transformer.h.{i}.mlp.c_proj.bias", SAME),
        *_ln("ln_f", "transformer.ln_f"),
        ("embed_out", "lm_head.weight", LINEAR),
        ("score_kernel", "score.weight", ROW),
    ),
    layers_field="n_layer",
    prefix="transformer.",
    ignored=r"(^|\.)attn\.(bias|masked_bias)$",
    tied_names=("lm_head.weight",),
    embedding="wte",
)


def _llama3(config) -> bool:
    return config.rope_type == "llama3"


LLAMA = Arch(
    name="llama",
    config_class="LlamaConfig",
    model_type="llama",
    hf_config_class="LlamaConfig",
    heads=_policy_and_reward_heads("Llama"),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "hidden_size"),
        Field("num_layers", "num_hidden_layers"),
        Field("num_heads", "num_attention_heads"),
        Field("num_kv_heads", "num_key_value_heads"),
        Field("head_dim", "head_dim"),
        Field("intermediate_size", "intermediate_size"),
        Field("rope_theta", "rope_parameters.rope_theta", float),
        Field("rope_type", "rope_parameters.rope_type"),
        Field("rope_factor", "rope_parameters.factor", float, write_if=_llama3),
        Field("rope_low_freq_factor", "rope_parameters.low_freq_factor", float, write_if=_llama3),
        Field("rope_high_freq_factor", "rope_parameters.high_freq_factor", float, write_if=_llama3),
        Field("rope_original_max_position_embeddings", "rope_parameters.original_max_position_embeddings",
              int, write_if=_llama3),
        Field("max_position_embeddings", "max_position_embeddings"),
        Field("rms_norm_eps", "rms_norm_eps", float),
        Field("tie_word_embeddings", "tie_word_embeddings", bool),
        Field("initializer_range", "initializer_range", float),
    ),
    supported={
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "rope_parameters.rope_type": ("default", "llama3"),
    },
    tensors=(
        ("embed_in", "model.embed_tokens.weight", SAME),
        ("layers.{i}.input_layernorm.scale", "model.layers.{i}.input_layernorm.weight", SAME),
        ("layers.{i}.attention.q_kernel", "model.layers.{i}.self_attn.q_proj.weight", LINEAR_TO_HEADS),
        ("layers.{i}.attention.k_kernel", "model.layers.{i}.self_attn.k_proj.weight", LINEAR_TO_HEADS),
        ("layers.{i}.attention.v_kernel", "model.layers.{i}.self_attn.v_proj.weight", LINEAR_TO_HEADS),
        ("layers.{i}.attention.out_kernel", "model.layers.{i}.self_attn.o_proj.weight", LINEAR_FROM_HEADS),
        ("layers.{i}.post_attention_layernorm.scale", "model.layers.{i}.post_attention_layernorm.weight", SAME),
        ("layers.{i}.mlp.gate_kernel", "model.layers.{i}.mlp.gate_proj.weight", LINEAR),
        ("layers.{i}.mlp.up_kernel", "model.layers.{i}.mlp.up_proj.weight", LINEAR),
        ("layers.{i}.mlp.down_kernel", "model.layers.{i}.mlp.down_proj.weight", LINEAR),
        ("final_layer_norm.scale", "model.norm.weight", SAME),
        ("embed_out", "lm_head.weight", LINEAR),
        ("score_kernel", "score.weight", ROW),
    ),
    prefix="model.",
    ignored=r"(^|\.)rotary_emb\.inv_freq$",
    tied_names=("lm_head.weight",),
    embedding="embed_in",
    value_head=True,
)


def _labels_to_ours(id2label) -> tuple[str, ...]:
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def _labels_to_hf(labels) -> dict[int, str]:
    return dict(enumerate(labels))


DISTILBERT = Arch(
    name="distilbert",
    config_class="DistilBertConfig",
    model_type="distilbert",
    hf_config_class="DistilBertConfig",
    heads=(Head("DistilBertForSequenceClassification", {}),),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("max_position_embeddings", "max_position_embeddings"),
        Field("dim", "dim"),
        Field("n_layers", "n_layers"),
        Field("n_heads", "n_heads"),
        Field("hidden_dim", "hidden_dim"),
        Field("activation", "activation"),
        Field("labels", "id2label", _labels_to_ours, _labels_to_hf),
        Field("labels", "label2id", to_hf=lambda labels: {n: i for i, n in enumerate(labels)}, read=False),
        Field("initializer_range", "initializer_range", float),
    ),
    supported={"activation": ("gelu", "relu")},
    tensors=(
        ("word_embeddings", "distilbert.embeddings.word_embeddings.weight", SAME),
        ("position_embeddings", "distilbert.embeddings.position_embeddings.weight", SAME),
        *_ln("embed_layer_norm", "distilbert.embeddings.LayerNorm"),
        *(
            (f"layers.{{i}}.attention.{n}_kernel", f"distilbert.transformer.layer.{{i}}.attention.{n}_lin.weight",
             LINEAR_TO_HEADS)
            for n in ("q", "k", "v")
        ),
        *(
            (f"layers.{{i}}.attention.{n}_bias", f"distilbert.transformer.layer.{{i}}.attention.{n}_lin.bias", SPLIT_ALL)
            for n in ("q", "k", "v")
        ),
        ("layers.{i}.attention.out_kernel", "distilbert.transformer.layer.{i}.attention.out_lin.weight",
         LINEAR_FROM_HEADS),
        ("layers.{i}.attention.out_bias", "distilbert.transformer.layer.{i}.attention.out_lin.bias", SAME),
        *_ln("layers.{i}.sa_layer_norm", "distilbert.transformer.layer.{i}.sa_layer_norm"),
        ("layers.{i}.mlp.up_kernel", "distilbert.transformer.layer.{i}.ffn.lin1.weight", LINEAR),
        ("layers.{i}.mlp.up_bias", "distilbert.transformer.layer.{i}.ffn.lin1.bias", SAME),
        ("layers.{i}.mlp.down_kernel", "distilbert.transformer.layer.{i}.ffn.lin2.weight", LINEAR),
        ("layers.{i}.mlp.down_bias", "distilbert.transformer.layer.{i}.ffn.lin2.bias", SAME),
        *_ln("layers.{i}.output_layer_norm", "distilbert.transformer.layer.{i}.output_layer_norm"),
        ("pre_classifier_kernel", "pre_classifier.weight", LINEAR),
        ("pre_classifier_bias", "pre_classifier.bias", SAME),
        ("classifier_kernel", "classifier.weight", LINEAR),
        ("classifier_bias", "classifier.bias", SAME),
    ),
    layers_field="n_layers",
    prefix="distilbert.",
    ignored=r"(^|\.)position_ids$",
    token_ids={"pad_token_id": 0},
)


ARCHS: dict[str, Arch] = {a.model_type: a for a in (GPT_NEOX, GPT2, LLAMA, DISTILBERT)}


def arch_by_name(name: str) -> Arch:
    for a in ARCHS.values():
        if a.name == name:
            return a
    raise KeyError(name)
