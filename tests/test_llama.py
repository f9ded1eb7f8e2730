"""Llama in Flax against Hugging Face's PyTorch Llama: logits, KV-cache decoding, greedy generation,
presets (the prefill fast path: tests/test_gpt_neox_prefill.py).

Tiny random ``LlamaConfig`` variants cover grouped-query attention 4:1 and plain multi-head (1:1),
the ``llama3`` rope scaling on and off, tied and untied embeddings; the reference is transformers'
own model on the same weights, fed the position ids our model derives from the mask.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import torch  # test-time reference (the .[test] extra)

from klq_jax import sampling
from tests.helpers import testing
from klq_jax.models import decoder, hf, llama

ATOL = 1e-4
_apply = jax.jit(llama.apply, static_argnums=0, static_argnames=("logits",))

VARIANTS = {
    "gqa4to1-llama3-tied": dict(num_key_value_heads=1, rope_parameters=testing.TINY_LLAMA3_ROPE,
                                tie_word_embeddings=True),
    "mha1to1-default-untied": dict(num_key_value_heads=4),
    "gqa4to1-default-untied": dict(num_key_value_heads=1),
    "mha1to1-llama3-tied": dict(num_key_value_heads=4, rope_parameters=testing.TINY_LLAMA3_ROPE,
                                tie_word_embeddings=True),
}
B, T = 4, 12
LENGTHS = [12, 9, 5, 1]


@pytest.fixture(scope="module")
def batch():
    return testing.make_left_padded_batch(np.random.default_rng(0), B, T, 64, LENGTHS)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = testing.tiny_hf_llama(d, seed=len(request.param), **VARIANTS[request.param])
    config, graphdef, params = hf.load_hf(d, strict=True)
    return request.param, model, config, graphdef, params


def _masked_max_abs(a, b, mask):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None]))


def test_config_and_rope_frequencies_match_hf(variant):
    name, model, config, _, _ = variant
    hc = model.config
    assert config.num_kv_heads == hc.num_key_value_heads and config.num_heads == 4
    assert config.tie_word_embeddings == hc.tie_word_embeddings
    assert config.rope_type == ("llama3" if "llama3" in name else "default")
    ours = config.inv_freq()
    np.testing.assert_allclose(ours, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    plain = decoder.rope_inv_freq(config.rope_theta, config.head_dim)
    # llama3 changes every band here (one smoothed, the rest divided by the factor); default does not.
    assert (not np.allclose(ours, plain)) == ("llama3" in name)


def test_logits_match_hf_on_left_padded_batch(variant, batch):
    name, model, config, graphdef, params = variant
    tokens, mask = batch
    ref = testing.hf_forward(model, tokens, mask)
    out = _apply(graphdef, params, tokens, mask)
    assert out.logits.dtype == jnp.float32 and out.logits.shape == (B, T, config.vocab_size)
    assert np.abs(ref).max() > 1.0
    assert _masked_max_abs(out.logits, ref, mask) <= ATOL, name


def test_kv_cache_decode_16_steps_matches_full_forward(variant):
    _, model, config, graphdef, params = variant
    P, steps = 6, 16
    rng = np.random.default_rng(1)
    prompt, pmask = testing.make_left_padded_batch(rng, 3, P, config.vocab_size, [6, 3, 1])
    new = rng.integers(1, config.vocab_size, size=(3, steps)).astype(np.int32)
    tokens = np.concatenate([prompt, new], axis=1)
    mask = np.concatenate([pmask, np.ones_like(new)], axis=1)
    full = np.asarray(_apply(graphdef, params, tokens, mask).logits)
    cache = llama.init_cache(config, 3, P + steps)
    assert cache.k[0].shape == (3, config.num_kv_heads, P + steps, config.head_dim)
    out = _apply(graphdef, params, prompt, pmask, cache=cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(steps):
        out = _apply(graphdef, params, new[:, t:t + 1], np.ones((3, 1), np.int32), cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.index) == P + steps
    assert _masked_max_abs(got, full, mask) <= ATOL
    assert _masked_max_abs(got, testing.hf_forward(model, tokens, mask), mask) <= ATOL


def test_greedy_sampling_equals_hf_generate(variant):
    _, model, config, graphdef, params = variant
    prompt, pmask = testing.make_left_padded_batch(np.random.default_rng(2), 3, 5, 64, [5, 3, 2])
    prompt = np.where(pmask > 0, prompt, 0).astype(np.int32)
    n_new = 10
    cfg = sampling.SamplingConfig(max_new_tokens=n_new, greedy=True, stop_token_ids=(2,), pad_token_id=0)
    ours = sampling.sample(graphdef, params, prompt, pmask, jax.random.key(0), cfg)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.as_tensor(prompt, dtype=torch.long),
            attention_mask=torch.as_tensor(pmask, dtype=torch.long),
            max_new_tokens=n_new, do_sample=False, eos_token_id=2, pad_token_id=0,
        ).numpy()[:, prompt.shape[1]:]
    ref = np.pad(ref, ((0, 0), (0, n_new - ref.shape[1])), constant_values=0)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert len(set(ref[:, 0].tolist()) | set(ref[:, -1].tolist())) > 1  # not one repeated token


@pytest.mark.parametrize("name", sorted(llama.LLAMA_PRESETS))
def test_preset_param_counts_and_config_round_trip(name):
    config = llama.LlamaConfig.from_preset("meta-llama/" + name.replace("llama", "Llama").replace("b", "B"))
    _, params = llama.abstract_params(config)
    assert llama.param_count(params) == llama.LLAMA_PARAM_COUNTS[name]
    for path, var in nnx.to_flat_state(params):
        assert len(var.get_metadata()["axes"]) == len(var.shape), path
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


def test_published_llama_3_2_1b_config_maps_to_preset():
    published = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
    }
    assert hf.config_from_hf(published) == llama.LlamaConfig.from_preset("Llama-3.2-1B")
