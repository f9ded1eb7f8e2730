"""The last-layer shortcuts against the plain forward, for every decoder (GPT-NeoX parallel /
sequential, Llama with GQA and llama3 rope): the sampler's prefill (``model(..., prefill=True)``)
and ``queries_from`` (outputs only from a position on, as scoring and training use it)."""

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


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("q", [0, 3, 6])
def test_queries_from_matches_the_full_forward_sliced(name, q):
    graphdef, params = MODELS[name]()
    model = nnx.merge(graphdef, params)
    tokens = jax.random.randint(jax.random.key(2), (3, 7), 1, model.config.vocab_size)
    # left-padded prompts of 4 + right-padded responses of 3 (a row with an empty response)
    mask = jnp.array([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    ref = model(tokens, mask)
    out = model(tokens, mask, queries_from=q)
    assert out.hidden.shape == (3, 7 - q, model.config.hidden_size)
    np.testing.assert_allclose(out.logits, ref.logits[:, q:], atol=1e-5)
    np.testing.assert_allclose(out.values, ref.values[:, q:], atol=1e-5)
    if q <= 3:  # every row's last real token is at position >= 3 (the last prompt slot)
        np.testing.assert_allclose(out.scores, ref.scores, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_queries_from_score_of_a_row_that_ends_before_q_is_nan(name):
    """A row whose last real token is before ``q`` has no score computed: NaN, not a padding slot's
    score; an all-padding row (a micro-batch's filler) stays finite."""
    model = nnx.merge(*MODELS[name]())
    tokens = jax.random.randint(jax.random.key(4), (3, 6), 1, model.config.vocab_size)
    mask = jnp.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    out = model(tokens, mask, queries_from=3)
    ref = model(tokens, mask)
    assert np.isnan(float(out.scores[0])) and np.isfinite(float(out.scores[1]))
    np.testing.assert_allclose(out.scores[2], ref.scores[2], atol=1e-5)


def test_queries_from_matches_through_a_gradient():
    """The training loss's gradient with the shortcut equals the full forward's."""
    graphdef, params = MODELS["neox-parallel"]()
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 1, 50)
    mask = jnp.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])

    def loss(p, q):
        out = nnx.merge(graphdef, p)(tokens, mask, queries_from=q)
        sl = slice(None) if q is not None else slice(2, None)
        return jnp.sum(out.logits[:, sl] ** 2) * 1e-3 + jnp.sum(out.values[:, sl])

    g_full = jax.grad(loss)(params, None)
    g_fast = jax.grad(loss)(params, 2)
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_fast)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 7, 2.0])
def test_queries_from_out_of_range_is_refused(bad):
    model = nnx.merge(*MODELS["neox-parallel"]())
    with pytest.raises(ValueError, match="queries_from"):
        model(jnp.ones((1, 7), jnp.int32), jnp.ones((1, 7)), queries_from=bad)


def test_prefill_with_another_queries_from_is_refused():
    """``prefill`` computes the last position only: an explicit other ``queries_from`` is a conflict,
    not silently overridden."""
    graphdef, params = MODELS["neox-parallel"]()
    model = nnx.merge(graphdef, params)
    cache = gpt_neox.init_cache(model.config, 1, 8)
    tokens, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4))
    with pytest.raises(ValueError, match="prefill.*queries_from=1"):
        model(tokens, mask, cache=cache, prefill=True, queries_from=1)
    out = model(tokens, mask, cache=cache, prefill=True, queries_from=3)  # the same thing: allowed
    assert out.hidden.shape[1] == 1
