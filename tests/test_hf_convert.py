"""HF ⇄ Flax conversion: round trips through transformers, input formats, the CLI, clear errors."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import jax

import torch  # test-time reference (the .[test] extra)
import transformers
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from convert import cli as convert_cli  # noqa: E402
from tests.helpers import testing  # noqa: E402
from klq_jax import errors  # noqa: E402
from klq_jax.models import gpt_neox, hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
_apply = jax.jit(gpt_neox.apply, static_argnums=0, static_argnames=("logits",))


@pytest.fixture(scope="module")
def batch():
    return testing.make_left_padded_batch(np.random.default_rng(0), 3, 10, 64, [10, 6, 2])


@pytest.fixture(scope="module")
def lm(tmp_path_factory, batch):
    """A tiny HF causal LM on disk (sequential residual, 3 heads) and its reference logits."""
    d = tmp_path_factory.mktemp("lm")
    model = testing.tiny_hf_gpt_neox(
        d, seed=1, num_attention_heads=3, hidden_size=24, use_parallel_residual=False
    )
    (d / "tokenizer_config.json").write_text('{"model_max_length": 2048}\n')
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}\n')
    return d, model, testing.hf_forward(model, *batch)


@pytest.fixture(scope="module")
def rm(tmp_path_factory, batch):
    d = tmp_path_factory.mktemp("rm")
    model = testing.tiny_hf_gpt_neox_reward(d, seed=2, pad_token_id=0)
    return d, model, testing.hf_forward(model, *batch)


def _masked_max_abs(a, b, mask):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None]))


def _logits(path, batch):
    config, graphdef, params = hf.load_hf(path)
    return np.asarray(_apply(graphdef, params, *batch).logits)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_round_trip_hf_flax_hf(lm, batch, tmp_path):
    d, _, ref = lm
    config, graphdef, params = hf.load_hf(d)
    assert _masked_max_abs(_apply(graphdef, params, *batch).logits, ref, batch[1]) <= ATOL
    hf.save_flax(tmp_path / "flax", config, params, hf_config=hf.read_hf_config(d), tokenizer_dir=d)
    assert sorted(os.listdir(tmp_path / "flax")) == [
        "generation_config.json", "hf_config.json", "klq_config.json", "params.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]
    with safe_open(str(tmp_path / "flax" / "params.safetensors"), "np") as f:
        assert "layers.0.attention.qkv_kernel" in f.keys()
        assert f.get_slice("layers.0.attention.qkv_kernel").get_shape() == [24, 3, 3, 8]
    config2, graphdef2, params2 = hf.load_flax(tmp_path / "flax")
    assert config2 == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    hf.save_hf(tmp_path / "hf", config2, params2, tokenizer_dir=d, hf_config=hf.read_flax_hf_config(tmp_path / "flax"))
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (d / "tokenizer.json").read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "GPTNeoXForCausalLM"
    assert back.config.use_parallel_residual is False and back.config.num_attention_heads == 3
    np.testing.assert_allclose(testing.hf_forward(back, *batch), ref, atol=1e-6, rtol=0)
    # Every tensor is bit-identical to the original file (same names, same layout).
    orig = load_file(str(d / "model.safetensors"))
    new = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(orig) == sorted(new)
    for k in orig:
        np.testing.assert_array_equal(orig[k], new[k], err_msg=k)


def test_written_config_reads_back_in_transformers(tmp_path):
    """rotary_pct / rope_theta / eps and the flags survive transformers' config parsing."""
    config = gpt_neox.GPTNeoXConfig.tiny(
        rotary_pct=0.5, rotary_emb_base=500.0, layer_norm_eps=1e-6, use_parallel_residual=False,
        attention_bias=False, hidden_act="gelu_new", tie_word_embeddings=True,
    )
    _, params = gpt_neox.init(config, jax.random.key(0))
    hf.save_hf(tmp_path / "hf", config, params)
    hc = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert hc.rope_parameters["partial_rotary_factor"] == 0.5
    assert hc.rope_parameters["rope_theta"] == 500.0
    assert hc.layer_norm_eps == 1e-6 and hc.attention_bias is False and hc.hidden_act == "gelu_new"
    assert hc.tie_word_embeddings is True
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        assert "embed_out.weight" not in f.keys()  # tied: HF reuses embed_in
    assert hf.config_from_hf(hc.to_dict()) == config
    # A model without attention biases, with tied embeddings, round-trips through transformers with the same logits.
    tokens, mask = testing.make_left_padded_batch(0, 2, 7, 64, [7, 4])
    ours = np.asarray(_apply(*gpt_neox.init(config, jax.random.key(0)), tokens, mask).logits)
    theirs = testing.hf_forward(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), tokens, mask)
    assert _masked_max_abs(ours, theirs, mask) <= ATOL


def test_sharded_output_with_index_and_bfloat16(lm, batch, tmp_path):
    d, _, ref = lm
    config, _, params = hf.load_hf(d)
    hf.save_hf(tmp_path / "sharded", config, params, max_shard_size="10KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(os.path.getsize(tmp_path / "sharded" / s) < 10_000 + 2_000 for s in shards[:-1])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    np.testing.assert_allclose(testing.hf_forward(back, *batch), ref, atol=1e-6, rtol=0)
    # ... and our reader reads the sharded output too.
    assert _masked_max_abs(_logits(tmp_path / "sharded", batch), ref, batch[1]) <= ATOL

    hf.save_hf(tmp_path / "bf16", config, params, dtype="bfloat16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
        w = f.get_tensor("gpt_neox.embed_in.weight")
    assert str(w.dtype) == "bfloat16"
    np.testing.assert_array_equal(w.astype(np.float32), np.asarray(params["embed_in"][...]).astype(w.dtype).astype(np.float32))
    m16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert _masked_max_abs(testing.hf_forward(m16, *batch), ref, batch[1]) < 0.2  # bf16 rounding only


def test_score_model_round_trip(rm, batch, tmp_path):
    d, _, ref = rm
    config, graphdef, params = hf.load_hf(d)
    np.testing.assert_allclose(np.asarray(_apply(graphdef, params, *batch).scores), ref[:, 0], atol=ATOL)
    hf.save_flax(tmp_path / "flax", config, params, hf_config=hf.read_hf_config(d))
    # flax-to-hf through the CLI (in process): pad_token_id is carried over from hf_config.json.
    assert convert_cli.main(["flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    hc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hc["architectures"] == ["GPTNeoXForSequenceClassification"] and hc["pad_token_id"] == 0
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert back.config.num_labels == 1
    np.testing.assert_allclose(testing.hf_forward(back, *batch), ref, atol=1e-6, rtol=0)


def test_value_head_saved_beside_and_read_back(lm, batch, tmp_path):
    d, _, ref = lm
    config, graphdef, params = hf.load_hf(d, value_head=True, key=jax.random.key(3))
    hf.save_hf(tmp_path / "hf", config, params)
    assert (tmp_path / "hf" / "value_head.safetensors").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(testing.hf_forward(back, *batch), ref, atol=1e-6, rtol=0)
    _, graphdef2, params2 = hf.load_hf(tmp_path / "hf", value_head=True)  # no key needed now
    np.testing.assert_array_equal(np.asarray(params2["value_kernel"][...]), np.asarray(params["value_kernel"][...]))
    np.testing.assert_allclose(
        np.asarray(_apply(graphdef2, params2, *batch).values),
        np.asarray(_apply(graphdef, params, *batch).values), atol=1e-6,
    )
    # Converted without --value-head, the head beside would be dropped: a warning saying how to keep
    # it (review s7 F4), an error under --strict.
    with pytest.warns(UserWarning, match="value_head.safetensors .*pass --value-head"):
        assert convert_cli.main(["hf-to-flax", str(tmp_path / "hf"), str(tmp_path / "flax")]) == 0
    assert not hf.read_flax_config(tmp_path / "flax").value_head
    with pytest.raises(hf.ConversionError, match="value_head.safetensors .*pass --value-head"):
        convert_cli.main(["hf-to-flax", "--strict", str(tmp_path / "hf"), str(tmp_path / "flax2")])
    assert not (tmp_path / "flax2").exists()


# ------------------------------------------------------------------------------------------------
# Input formats
# ------------------------------------------------------------------------------------------------


def test_sharded_safetensors_input(lm, batch, tmp_path):
    _, model, ref = lm
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert _masked_max_abs(_logits(tmp_path, batch), ref, batch[1]) <= ATOL


def test_bin_inputs_single_sharded_bf16_and_prefixless(lm, batch, tmp_path):
    d, model, ref = lm
    sd = model.state_dict()
    # A single pytorch_model.bin, with the old buffers and the unembedding named lm_head.weight.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(d / "config.json", single)
    extra = {
        "gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool),
        "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(4),
    }
    torch.save({**sd, **extra}, single / "pytorch_model.bin")
    assert "lm_head.weight" in sd
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the buffers are ignored silently
        assert _masked_max_abs(_logits(single, batch), ref, batch[1]) <= ATOL

    # Two .bin shards + index, names without the "gpt_neox." prefix, bfloat16 tensors.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(d / "config.json", sharded)
    names = sorted(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k.removeprefix("gpt_neox."): sd[k].to(torch.bfloat16) for k in part}, sharded / fname)
        weight_map.update({k.removeprefix("gpt_neox."): fname for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config, _, params = hf.load_hf(sharded)
    assert params["embed_in"][...].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(params["embed_in"][...]),
        sd["gpt_neox.embed_in.weight"].to(torch.bfloat16).float().numpy(),
    )
    assert _masked_max_abs(_logits(sharded, batch), ref, batch[1]) < 0.2  # bf16 rounding only


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )


def test_cli_round_trip_in_subprocess(lm, batch, tmp_path):
    d, _, ref = lm
    r = _cli("hf-to-flax", d, tmp_path / "flax", "--dtype", "bfloat16", "--value-head", "--seed", "1")
    assert r.returncode == 0, r.stderr
    config, _, params = hf.load_flax(tmp_path / "flax")
    assert config.dtype == "bfloat16" and config.param_dtype == "float32" and config.value_head
    r = _cli("flax-to-hf", tmp_path / "flax", tmp_path / "hf", "--max-shard-size", "15KB")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").is_file() and (out / "value_head.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()  # kept in the flax checkpoint, copied along
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(testing.hf_forward(back, *batch), ref, atol=1e-6, rtol=0)


def test_cli_help_and_bad_input_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["--help"])
    assert e.value.code == 0
    help_text = _cli("--help").stdout
    assert "hf-to-flax" in help_text and "flax-to-hf" in help_text and "AutoModelForCausalLM" in help_text
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    r = _cli("hf-to-flax", tmp_path / "bad", tmp_path / "out")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "MistralForCausalLM" not in r.stdout and "GPTNeoXForCausalLM" in r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------


def _edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(architectures=["MistralForCausalLM"], model_type="mistral"), r"model_type 'mistral' is not supported.*GPTNeoXForCausalLM, GPTNeoXForSequenceClassification"),
        (dict(architectures=["GPTNeoXForTokenClassification"]), r"GPTNeoXForTokenClassification.*not supported; supported architectures: GPTNeoXForCausalLM"),
        (dict(architectures=["GPTNeoXForSequenceClassification"], id2label={"0": "a", "1": "b"}), r"num_labels=2 is not supported"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.25}), r"rope_parameters.rope_type='linear' is not supported; supported values of rope_parameters.rope_type: \['default'\]"),
        (dict(hidden_act="silu"), r"hidden_act='silu' is not supported"),
        (dict(num_attention_heads=5), r"config.json: this config is not supported: .*hidden size is not divisible by the number of attention heads"),
    ],
    ids=["arch-mistral", "arch-tokencls", "num-labels", "rope-type", "activation", "heads"],
)
def test_unsupported_configs(lm, tmp_path, changes, match):
    d = _copy(lm[0], tmp_path / "m")
    _edit_config(d, **changes)
    with pytest.raises(hf.ConversionError, match=match) as e:
        hf.load_hf(d)
    assert str(d / "config.json") in str(e.value)


def test_missing_tensor_named(lm, tmp_path):
    d = _copy(lm[0], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.ConversionError) as e:
        hf.load_hf(d)
    msg = str(e.value)
    assert "'gpt_neox.layers.1.mlp.dense_h_to_4h.bias'" in msg and "(64,)" in msg
    assert "layers.1.mlp.up_bias" in msg and str(d) in msg and "model.safetensors" in msg


def test_misshaped_tensor_named(lm, tmp_path):
    d = _copy(lm[0], tmp_path / "m")
    _edit_config(d, intermediate_size=48)
    with pytest.raises(hf.ConversionError) as e:
        hf.load_hf(d)
    msg = str(e.value)
    assert "'gpt_neox.layers.0.mlp.dense_4h_to_h.weight'" in msg
    assert "shape (24, 64), expected (24, 48)" in msg and str(d / "model.safetensors") in msg


@pytest.mark.parametrize("what", ["truncated-safetensors", "garbage-bin", "bad-json", "no-weights", "missing-shard"])
def test_unreadable_files(lm, tmp_path, what):
    d = _copy(lm[0], tmp_path / "m")
    if what == "truncated-safetensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
        bad, match = d / "model.safetensors", "corrupt"
    elif what == "garbage-bin":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 10)
        bad, match = d / "pytorch_model.bin", "corrupt"
    elif what == "bad-json":
        (d / "config.json").write_text('{"architectures": [')
        bad, match = d / "config.json", "could not be read as JSON"
    elif what == "no-weights":
        (d / "model.safetensors").unlink()
        bad, match = d, "No weights found"
    else:
        (d / "model.safetensors").unlink()
        lm[1].save_pretrained(d, max_shard_size="20KB")
        shard = sorted(d.glob("model-*.safetensors"))[-1]
        shard.unlink()
        bad, match = shard, "is missing: download every shard"
    with pytest.raises(hf.ConversionError, match=match) as e:
        hf.load_hf(d)
    assert str(bad) in str(e.value)


def test_unexpected_tensor_warns_or_fails_strict(lm, tmp_path):
    d = _copy(lm[0], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["gpt_neox.layers.2.mlp.dense_h_to_4h.bias"] = np.zeros(64, np.float32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"layers\.2\.mlp\.dense_h_to_4h\.bias"):
        hf.load_hf(d)
    with pytest.raises(hf.ConversionError, match="does not use"):
        hf.load_hf(d, strict=True)


def test_writers_refuse_bad_input_and_leave_nothing(lm, tmp_path):
    d = lm[0]
    config, _, params = hf.load_hf(d)
    wrong = config.replace(intermediate_size=48)
    with pytest.raises(hf.ConversionError, match=r"'layers.0.mlp.down_kernel' has shape \(64, 24\), expected \(48, 24\)"):
        hf.save_hf(tmp_path / "out", wrong, params)
    with pytest.raises(hf.ConversionError, match="down_kernel"):
        hf.save_flax(tmp_path / "out", wrong, params)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(hf.ConversionError, match="not empty"):
        hf.save_hf(tmp_path / "full", config, params)
    with pytest.raises(errors.ForeignFilesError, match=r"keep.txt \(not written by a conversion\)"):
        hf.save_hf(tmp_path / "full", config, params, overwrite=True)  # only a conversion output is replaced
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "full" / "keep.txt").unlink()
    hf.save_hf(tmp_path / "full", config, params)
    hf.save_hf(tmp_path / "full", config.replace(param_dtype="bfloat16"), params, overwrite=True)
    assert "bfloat16" in (tmp_path / "full" / "config.json").read_text()
    with pytest.raises(hf.ConversionError, match="both an LM head and a score head"):
        hf.config_to_hf(config.replace(score_head=True))
    with pytest.raises(hf.ConversionError, match="max_shard_size='lots'"):
        hf.save_hf(tmp_path / "x", config, params, max_shard_size="lots")


def test_load_flax_errors(lm, tmp_path):
    config, _, params = hf.load_hf(lm[0])
    with pytest.raises(hf.ConversionError, match="klq_config.json not found"):
        hf.load_flax(lm[0])  # an HF directory is not our format
    hf.save_flax(tmp_path / "f", config, params)
    doc = json.loads((tmp_path / "f" / "klq_config.json").read_text())
    doc["config"]["num_layers"] = 3
    (tmp_path / "f" / "klq_config.json").write_text(json.dumps(doc))
    with pytest.raises(hf.ConversionError, match=r"Tensor 'layers\.2\.attention\.out_bias' \(shape \(24,\)\) is missing from"):
        hf.load_flax(tmp_path / "f")


def test_load_hf_straight_into_a_mesh(tmp_path):
    """With a mesh, every tensor is placed with its rule-table sharding as it is read; values equal."""
    from klq_jax import sharding

    testing.tiny_hf_gpt_neox(tmp_path, seed=5, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    mesh = sharding.make_mesh(4, 2, 1, devices=jax.devices()[:8])
    config, _, plain = hf.load_hf(tmp_path, value_head=True, key=jax.random.key(0))
    _, _, placed = hf.load_hf(tmp_path, value_head=True, key=jax.random.key(0), mesh=mesh)
    hf.save_flax(tmp_path / "flax", config, plain)  # a klq_jax checkpoint is placed the same way
    _, _, placed_flax = hf.load_flax(tmp_path / "flax", mesh=mesh)
    want = sharding.param_shardings(placed, mesh)
    flat_plain = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
    for loaded in (placed, placed_flax):
        for (path, got), (_, w) in zip(
            jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree_util.tree_flatten_with_path(want)[0]
        ):
            assert got.sharding.is_equivalent_to(w, got.ndim), path
            np.testing.assert_array_equal(np.asarray(got), np.asarray(flat_plain[path]))
    assert any("fsdp" in str(s.spec) for s in jax.tree_util.tree_leaves(want))


# ------------------------------------------------------------------------------------------------
# Token ids survive load_hf -> save_hf without hf_config= (review s7 F4)
# ------------------------------------------------------------------------------------------------


def _ids(path):
    return {k: json.loads(Path(path).read_text()).get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


@pytest.mark.parametrize("cls, ids", [
    ("LlamaForCausalLM", {"bos_token_id": 60, "eos_token_id": [61, 62], "pad_token_id": None}),
    ("LlamaForSequenceClassification", {"bos_token_id": 60, "eos_token_id": 61, "pad_token_id": 61}),
])
def test_library_round_trip_keeps_token_ids(tmp_path, cls, ids):
    """Not the architecture's defaults (Llama: bos 1, eos 2): the checkpoint's own ids, in
    config.json and generation_config.json; a reward model keeps its pad id (HF needs it to run
    batched)."""
    testing.tiny_hf_llama(tmp_path / "src", cls=cls, num_labels=1, **ids)
    assert _ids(tmp_path / "src" / "config.json") == ids
    config, _, params = hf.load_hf(tmp_path / "src")
    hf.save_hf(tmp_path / "out", config, params)
    assert _ids(tmp_path / "out" / "config.json") == ids
    if cls.endswith("CausalLM"):
        assert _ids(tmp_path / "out" / "generation_config.json") == {**ids, "pad_token_id": None}
    # through our checkpoint format too, and an explicit hf_config= still wins
    hf.save_flax(tmp_path / "flax", config, params)
    config2, _, params2 = hf.load_flax(tmp_path / "flax")
    hf.save_hf(tmp_path / "out2", config2, params2, hf_config={"eos_token_id": 7})
    assert _ids(tmp_path / "out2" / "config.json") == {**ids, "eos_token_id": 7}


def test_tied_checkpoint_with_a_different_stored_unembedding_warns(tmp_path):
    """A tied config whose files also hold an lm_head.weight: an exact copy of the embedding is
    skipped silently; a different one (transformers 5 would use it) is named with the max
    difference, a warning, or an error with strict=True (review s7 F6)."""
    testing.tiny_hf_llama(tmp_path / "src", tie_word_embeddings=True)
    sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    for name, head in (("copy", emb.copy()), ("other", emb + np.float32(0.5))):
        d = _copy(tmp_path / "src", tmp_path / name)
        save_file({**sd, "lm_head.weight": head}, str(d / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.load_hf(tmp_path / "copy", strict=True)
    with pytest.warns(UserWarning, match=r"'lm_head.weight', which is not a copy of it \(max \|difference\| 0.5\)"):
        hf.load_hf(tmp_path / "other")
    with pytest.raises(hf.ConversionError, match="set tie_word_embeddings to false"):
        hf.load_hf(tmp_path / "other", strict=True)
