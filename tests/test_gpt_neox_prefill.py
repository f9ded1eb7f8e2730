"""The sampler's prefill fast path (``model(..., prefill=True)``) against the plain cached forward,
for every decoder (GPT-NeoX parallel / sequential, Llama with GQA and llama3 rope)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klq_jax.models import gpt_neox, llama

MODELS = {
    "neox-parallel": lambda: gpt_neox.init(
        gpt_neox.GPTNeoXConfig.tiny(value_head=True, score_head=True, use_parallel_residual=True), jax.random.key(0)),
    "neox-sequential": lambda: gpt_neox.init(
        gpt_neox.GPTNeoXConfig.tiny(value_head=True, score_head=True, use_parallel_residual=False), jax.random.key(0)),
    "llama-gqa-llama3": lambda: llama.init(
        llama.LlamaConfig.tiny(value_head=True, score_head=True, rope_type="llama3", rope_factor=8.0,
                               rope_original_max_position_embeddings=16), jax.random.key(0)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_matches_full_cached_forward(name):
    graphdef, params = MODELS[name]()
    model = nnx.merge(graphdef, params)
    cfg = model.config
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 1, cfg.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 0, 1]])
    cache = gpt_neox.init_cache(cfg, 3, 10)
    ref = model(tokens, mask, cache=cache)
    fast = model(tokens, mask, cache=cache, prefill=True)
    assert fast.hidden.shape == (3, 1, cfg.hidden_size) and fast.logits.shape == (3, 1, cfg.vocab_size)
    np.testing.assert_allclose(fast.logits, ref.logits[:, -1:], atol=1e-5)
    np.testing.assert_allclose(fast.values, ref.values[:, -1:], atol=1e-5)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-5)
    # The cache is the same on every real slot (padding slots are masked and may differ).
    real = np.asarray(ref.cache.mask)[:, None, :, None]
    for a, b in zip(ref.cache.k + ref.cache.v, fast.cache.k + fast.cache.v):
        np.testing.assert_allclose(np.where(real, b, 0), np.where(real, a, 0), atol=1e-5)
    np.testing.assert_array_equal(fast.cache.mask, ref.cache.mask)
    np.testing.assert_array_equal(fast.cache.next_pos, ref.cache.next_pos)
    assert int(fast.cache.index) == int(ref.cache.index) == 7


def test_prefill_needs_a_cache():
    cfg = gpt_neox.GPTNeoXConfig.tiny()
    model = nnx.merge(*gpt_neox.init(cfg, jax.random.key(0)))
    with pytest.raises(ValueError, match="needs a cache"):
        model(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3)), prefill=True)
