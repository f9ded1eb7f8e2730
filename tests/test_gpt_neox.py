"""GPT-NeoX in Flax against Hugging Face's PyTorch GPT-NeoX: logits, KV-cache decoding, heads, presets.

The reference is always ``transformers``' own model on the same weights (converted with
``klq_jax.models.hf.load_hf``), fed the position ids our model derives from the mask.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import torch  # test-time reference (the .[test] extra)

from tests.helpers import testing  # noqa: E402
from klq_jax.models import gpt_neox, hf  # noqa: E402

ATOL = 1e-4

# One jitted forward for every test (graphdef static: one compilation per model/shape).
_apply = jax.jit(gpt_neox.apply, static_argnums=0, static_argnames=("logits",))

# Tiny variants: parallel residual on/off, rotary_pct 0.25 / 0.5 / 1.0, odd head counts (3, 5), an
# odd number of rotary dims (head_dim 12 * 0.25 = 3), tied embeddings.
VARIANTS = {
    "parallel-rot0.25-h4": dict(),
    "sequential-rot0.25-h4": dict(use_parallel_residual=False),
    "parallel-rot1.0-h3": dict(num_attention_heads=3, hidden_size=24, rotary_pct=1.0),
    "sequential-rot1.0-h5": dict(
        num_attention_heads=5, hidden_size=40, rotary_pct=1.0, use_parallel_residual=False
    ),
    "parallel-rot0.25-h5": dict(num_attention_heads=5, hidden_size=40, num_hidden_layers=3),
    "oddrot-h3-hd12": dict(num_attention_heads=3, hidden_size=36, rotary_pct=0.25),
    "tied-gelu_new": dict(tie_word_embeddings=True, hidden_act="gelu_new", rotary_pct=0.5),
}

B, T = 4, 12
LENGTHS = [12, 9, 5, 1]


@pytest.fixture(scope="module")
def batch():
    return testing.make_left_padded_batch(np.random.default_rng(0), B, T, 64, LENGTHS)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, torch model, config, graphdef, params) for one tiny HF variant, converted."""
    d = tmp_path_factory.mktemp(request.param)
    model = testing.tiny_hf_gpt_neox(d, seed=len(request.param), **VARIANTS[request.param])
    config, graphdef, params = hf.load_hf(d)
    return request.param, model, config, graphdef, params


def _masked_max_abs(a, b, mask):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None]))


def test_logits_match_hf_on_left_padded_batch(variant, batch):
    name, model, config, graphdef, params = variant
    tokens, mask = batch
    ref = testing.hf_forward(model, tokens, mask)
    out = _apply(graphdef, params, tokens, mask)
    assert out.logits.dtype == jnp.float32
    assert out.logits.shape == (B, T, config.vocab_size)
    assert np.abs(ref).max() > 1.0  # the random weights give non-trivial logits
    assert _masked_max_abs(out.logits, ref, mask) <= ATOL, name


def test_padding_does_not_change_real_tokens(variant, batch):
    """A left-padded row gives the same logits on its real tokens as the row without padding."""
    _, _, _, graphdef, params = variant
    tokens, mask = batch
    full = np.asarray(_apply(graphdef, params, tokens, mask).logits)
    for b in (2,):  # one row (each unpadded length is another compilation)
        n = LENGTHS[b]
        alone = _apply(graphdef, params, tokens[b:b + 1, T - n:], mask[b:b + 1, T - n:]).logits
        np.testing.assert_allclose(np.asarray(alone)[0], full[b, T - n:], atol=ATOL, rtol=0)
        # ...and against HF on the unpadded row (no mask, default positions).
        with torch.no_grad():
            ref = variant[1](torch.as_tensor(tokens[b:b + 1, T - n:], dtype=torch.long)).logits
        np.testing.assert_allclose(full[b, T - n:], ref.numpy()[0], atol=ATOL, rtol=0)


def test_kv_cache_decode_16_steps_matches_full_forward(variant):
    """Prefill a left-padded prompt, decode 16 tokens one at a time: logits equal the full pass."""
    _, model, config, graphdef, params = variant
    P, steps = 6, 16
    rng = np.random.default_rng(1)
    prompt, pmask = testing.make_left_padded_batch(rng, 3, P, config.vocab_size, [6, 3, 1])
    new = rng.integers(1, config.vocab_size, size=(3, steps)).astype(np.int32)
    tokens = np.concatenate([prompt, new], axis=1)
    mask = np.concatenate([pmask, np.ones_like(new)], axis=1)

    full = np.asarray(_apply(graphdef, params, tokens, mask).logits)
    cache = gpt_neox.init_cache(config, 3, P + steps)
    out = _apply(graphdef, params, prompt, pmask, cache=cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(steps):
        out = _apply(graphdef, params, new[:, t:t + 1], np.ones((3, 1), np.int32), cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    assert got.shape == full.shape
    assert int(cache.index) == P + steps
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1))
    assert _masked_max_abs(got, full, mask) <= ATOL
    # The decoded logits also equal HF's full forward.
    assert _masked_max_abs(got, testing.hf_forward(model, tokens, mask), mask) <= ATOL


# ------------------------------------------------------------------------------------------------
# Value and score heads
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    model = testing.tiny_hf_gpt_neox(d, seed=3)
    return d, model


def test_value_head_shapes_and_masking(lm_dir, batch):
    d, _ = lm_dir
    tokens, mask = batch
    config, graphdef, params = hf.load_hf(d, value_head=True, key=jax.random.key(0))
    assert config.value_head and params["value_kernel"].shape == (config.hidden_size,)
    out = _apply(graphdef, params, tokens, mask)
    assert out.values.shape == (B, T) and out.values.dtype == jnp.float32
    assert out.scores is None
    # V(s_t) = w . h_t + b on the final hidden state.
    expect = np.asarray(out.hidden, np.float64) @ np.asarray(params["value_kernel"][...], np.float64)
    expect += float(params["value_bias"][...])
    np.testing.assert_allclose(np.asarray(out.values), expect, atol=1e-5)
    # Padding tokens do not leak into real positions: change the pad ids, real values are unchanged.
    noisy = np.where(mask == 1, tokens, np.random.default_rng(5).integers(1, 64, tokens.shape))
    out2 = _apply(graphdef, params, noisy.astype(np.int32), mask)
    np.testing.assert_allclose(
        np.asarray(out2.values) * mask, np.asarray(out.values) * mask, atol=1e-5
    )
    # The LM logits are those of the model without the head; another key gives another head.
    _, g0, p0 = hf.load_hf(d)
    np.testing.assert_array_equal(np.asarray(_apply(g0, p0, tokens, mask).logits), np.asarray(out.logits))
    _, _, p1 = hf.load_hf(d, value_head=True, key=jax.random.key(1))
    assert not np.allclose(np.asarray(p1["value_kernel"][...]), np.asarray(params["value_kernel"][...]))


def test_value_head_needs_a_key(lm_dir):
    with pytest.raises(hf.ConversionError, match="PRNG key"):
        hf.load_hf(lm_dir[0], value_head=True)


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    model = testing.tiny_hf_gpt_neox_reward(d, seed=4, pad_token_id=0)
    config, graphdef, params = hf.load_hf(d)
    return d, model, config, graphdef, params


def test_score_head_matches_hf_sequence_classification(reward, batch):
    _, model, config, graphdef, params = reward
    tokens, mask = batch
    assert config.score_head and not config.lm_head
    out = _apply(graphdef, params, tokens, mask)
    assert out.logits is None and out.values is None
    assert out.scores.shape == (B,) and out.scores.dtype == jnp.float32
    ref = testing.hf_forward(model, tokens, mask)  # [B, 1], read at the last non-pad token
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out.scores), ref[:, 0], atol=ATOL, rtol=0)


def test_score_read_at_last_real_token_left_and_right_padding(reward):
    """Rows padded on the left, on the right and on both sides: score at the last real token."""
    _, model, config, graphdef, params = reward
    rng = np.random.default_rng(7)
    Tn = 10
    spans = [(0, 10), (3, 10), (0, 6), (2, 7), (4, 5)]  # [start, end) of the real tokens
    mask = np.zeros((len(spans), Tn), np.int32)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1
    tokens = rng.integers(1, config.vocab_size, size=mask.shape).astype(np.int32) * mask
    out = _apply(graphdef, params, tokens, mask)
    per_token = np.asarray(out.hidden, np.float64) @ np.asarray(params["score_kernel"][...], np.float64)
    for b, (s, e) in enumerate(spans):
        assert abs(float(out.scores[b]) - per_token[b, e - 1]) <= 1e-5
        # Each row alone, unpadded, gives the same score.
        alone = _apply(graphdef, params, tokens[b:b + 1, s:e], mask[b:b + 1, s:e]).scores
        assert abs(float(alone[0]) - float(out.scores[b])) <= ATOL
    # HF (pad_token_id = 0, so its last non-pad token is ours) agrees.
    ref = testing.hf_forward(model, tokens, mask)
    np.testing.assert_allclose(np.asarray(out.scores), ref[:, 0], atol=ATOL, rtol=0)
    # Right padding is not read: changing the tokens after the last real one changes nothing.
    noisy = np.where(mask == 1, tokens, rng.integers(1, config.vocab_size, tokens.shape)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(_apply(graphdef, params, noisy, mask).scores), np.asarray(out.scores), atol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(gpt_neox.PYTHIA_PRESETS))
def test_preset_shapes_and_param_count(name):
    config = gpt_neox.GPTNeoXConfig.from_preset(name + "-deduped")
    graphdef, params = gpt_neox.abstract_params(config)  # jax.eval_shape: nothing allocated
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert gpt_neox.param_count(params) == gpt_neox.PYTHIA_PARAM_COUNTS[name]
    D, H = config.hidden_size, config.num_heads
    assert params["layers"][0]["attention"]["qkv_kernel"].shape == (D, 3, H, D // H)
    # Every parameter names its logical axes, one per dimension.
    for path, var in nnx_flat(params):
        assert len(var.get_metadata()["axes"]) == len(var.shape), path
    # The config survives the HF config round trip.
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


def nnx_flat(params):
    from flax import nnx

    return list(nnx.to_flat_state(params))


def test_published_pythia_config_maps_to_preset():
    """EleutherAI/pythia-1b-deduped's config.json (transformers 4.x spelling) gives the preset."""
    published = {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
        "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 16,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
        "use_parallel_residual": True, "vocab_size": 50304,
    }
    assert hf.config_from_hf(published) == gpt_neox.GPTNeoXConfig.from_preset("pythia-1b-deduped")
