"""The conversion engine on all four architectures: unsupported config values refused by name,
and HF → Flax → HF round trips (sharded safetensors and .bin inputs) through the klq-convert CLI
that transformers loads back with the original's logits."""

import json
import shutil

import numpy as np
import pytest

import torch  # test-time reference (the .[test] extra)
import transformers

from convert import cli as convert_cli
from tests.helpers import testing
from klq_jax.models import hf

# ------------------------------------------------------------------------------------------------
# Unsupported config values: one case per attribute, refused before any weight is read
# ------------------------------------------------------------------------------------------------

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             head_dim=8, max_position_embeddings=64)
NEOX = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=64, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, rotary_pct=0.25)
GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=64, n_positions=32, n_embd=32,
            n_layer=2, n_head=4)
DISTILBERT = dict(model_type="distilbert", architectures=["DistilBertForSequenceClassification"],
                  vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48)
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

REFUSALS = {
    # attribute: (config, the attribute's name in the message, supported values in the message)
    "llama-rope-type": (dict(LLAMA, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                        "rope_parameters.rope_type='dynamic'", "['default', 'llama3']"),
    "llama-old-rope_scaling-beside-rope_parameters": (
        dict(LLAMA, rope_parameters=DEFAULT_ROPE, rope_scaling={"type": "linear", "factor": 2.0}),
        "rope_parameters.rope_type='linear'", "rope_scaling={'type': 'linear', 'factor': 2.0}"),
    "llama-old-rope_scaling-yarn-beside-llama3": (
        dict(LLAMA, rope_parameters=dict(testing.TINY_LLAMA3_ROPE),
             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        "rope_parameters.rope_type='yarn'", "the old spelling of rope_parameters"),
    "llama-attention_bias": (dict(LLAMA, attention_bias=True), "attention_bias=True", "[False]"),
    "llama-mlp_bias": (dict(LLAMA, mlp_bias=True), "mlp_bias=True", "[False]"),
    "llama-hidden_act": (dict(LLAMA, hidden_act="gelu"), "hidden_act='gelu'", "['silu']"),
    "neox-old-rope_scaling-beside-rope_parameters": (
        dict(NEOX, rope_parameters=dict(DEFAULT_ROPE, partial_rotary_factor=0.25),
             rope_scaling={"type": "linear", "factor": 2.0}),
        "rope_parameters.rope_type='linear'", "['default']"),
    "neox-old-rope_scaling-dynamic": (dict(NEOX, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                                      "rope_parameters.rope_type='dynamic'", "rope_scaling="),
    "neox-hidden_act": (dict(NEOX, hidden_act="silu"), "hidden_act='silu'", "'gelu_new'"),
    "gpt2-activation_function": (dict(GPT2, activation_function="swish"), "activation_function='swish'",
                                 "'gelu_new'"),
    "gpt2-add_cross_attention": (dict(GPT2, add_cross_attention=True), "add_cross_attention=True", "[False]"),
    "distilbert-activation": (dict(DISTILBERT, activation="silu"), "activation='silu'", "['gelu', 'relu']"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_value_refused_by_name(tmp_path, case):
    config, attr, supported = REFUSALS[case]
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: the config is checked first
    with pytest.raises(hf.ConversionError) as e:
        hf.load_hf(tmp_path)
    msg = str(e.value)
    assert attr in msg and supported in msg and "is not supported" in msg, msg
    assert str(tmp_path / "config.json") in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------
# Round trips HF -> Flax -> HF, for every architecture, from sharded safetensors and from .bin
# ------------------------------------------------------------------------------------------------


def _neox(d):
    return testing.tiny_hf_gpt_neox(d, seed=11), transformers.AutoModelForCausalLM


def _gpt2(d):
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=3, n_inner=40, num_labels=1, pad_token_id=0))
    testing._randomise(model, 12, 0.2)
    model.eval().save_pretrained(d)
    return model, transformers.AutoModelForSequenceClassification


def _llama(d):
    return (testing.tiny_hf_llama(d, seed=13, rope_parameters=testing.TINY_LLAMA3_ROPE),
            transformers.AutoModelForCausalLM)


def _distilbert(d):
    return testing.tiny_hf_distilbert(d, seed=14), transformers.AutoModelForSequenceClassification


BUILDERS = {"gpt_neox": _neox, "gpt2": _gpt2, "llama": _llama, "distilbert": _distilbert}


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("fmt", ["sharded-safetensors", "bin"])
def test_round_trip_hf_flax_hf(tmp_path, arch, fmt):
    model, auto = BUILDERS[arch](tmp_path / "orig")
    src = tmp_path / "src"
    if fmt == "sharded-safetensors":
        model.save_pretrained(src, max_shard_size="8KB")
        assert len(list(src.glob("model-*.safetensors"))) > 1
    else:
        src.mkdir()
        shutil.copy(tmp_path / "orig" / "config.json", src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}))
    assert convert_cli.main(["hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
    assert hf.read_flax_config(tmp_path / "flax").__class__.__module__.endswith(arch)
    assert convert_cli.main(["flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    back = auto.from_pretrained(tmp_path / "hf").eval()
    assert type(back) is type(model)
    tokens = np.random.default_rng(0).integers(1, 64, (2, 9))
    ref = _logits(model, tokens)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(_logits(back, tokens), ref, atol=1e-6, rtol=0)
    # The weights themselves are unchanged (float32 all the way).
    sd, sd2 = model.state_dict(), back.state_dict()
    for k in sd2:
        np.testing.assert_array_equal(sd2[k].numpy(), sd[k].numpy(), err_msg=k)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # Straight HF -> HF through the library too (no klq format in between).
    config, _, params = hf.load_hf(src)
    hf.save_hf(tmp_path / "hf2", config, params, hf_config=hf.read_hf_config(src))
    np.testing.assert_allclose(_logits(auto.from_pretrained(tmp_path / "hf2").eval(), tokens), ref, atol=1e-6, rtol=0)
    if arch == "distilbert":
        hc = json.loads((tmp_path / "hf2" / "config.json").read_text())
        assert hc["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"} and hc["label2id"]["POSITIVE"] == 1
