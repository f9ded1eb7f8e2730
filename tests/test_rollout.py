"""The experience phase (Algorithms 1-2) against HF PyTorch forwards and plain-Python loops."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import torch  # noqa: F401  (test-time reference, the .[test] extra)

from tests.helpers import testing  # noqa: E402
from klq_jax.models import gpt_neox, hf  # noqa: E402
from klq_jax.rollout import (  # noqa: E402
    Rollout,
    make_rollout,
    response_logprobs,
    sequence_rewards,
)
from klq_jax.rewards import reward_model_scores  # noqa: E402
from klq_jax.sampling import SamplingConfig, sample  # noqa: E402

_apply = jax.jit(gpt_neox.apply, static_argnums=0, static_argnames=("logits",))

PAD = 0
B, TQ, TR = 5, 7, 6
P_LENGTHS = [7, 4, 2, 5, 1]
R_LENGTHS = [6, 3, 1, 4, 6]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    model = testing.tiny_hf_gpt_neox(d, seed=3)
    config, graphdef, params = hf.load_hf(d, value_head=True, key=jax.random.key(0))
    return model, config, graphdef, params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    model = testing.tiny_hf_gpt_neox(d, seed=4)
    config, graphdef, params = hf.load_hf(d)
    return model, config, graphdef, params


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    model = testing.tiny_hf_gpt_neox_reward(d, seed=5, pad_token_id=PAD)
    config, graphdef, params = hf.load_hf(d)
    return model, config, graphdef, params


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    p_ids, p_mask = testing.make_left_padded_batch(rng, B, TQ, 64, P_LENGTHS)
    r_mask = (np.arange(TR)[None, :] < np.asarray(R_LENGTHS)[:, None]).astype(np.float32)
    r_ids = (rng.integers(1, 64, (B, TR)) * r_mask).astype(np.int32)  # right-padded with PAD
    return p_ids, p_mask, r_ids, r_mask


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hf_logp_loop(model, p_ids, p_mask, r_ids, r_mask, temperature):
    """log π(a_t|s_t) by a plain loop: for each row and t, one HF forward on x ⧺ y_<t, last logits."""
    out = np.zeros(r_ids.shape)
    for b in range(B):
        prompt = [int(t) for t, m in zip(p_ids[b], p_mask[b]) if m]
        for t in range(int(r_mask[b].sum())):
            seq = np.asarray([prompt + [int(x) for x in r_ids[b, :t]]])
            logits = testing.hf_forward(model, seq, np.ones_like(seq))[0, -1].astype(np.float64)
            out[b, t] = _log_softmax(logits / temperature)[r_ids[b, t]]
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_hf_loop(policy, batch, temperature):
    model, config, gd, p = policy
    p_ids, p_mask, r_ids, r_mask = batch
    logp, values = response_logprobs(gd, p, p_ids, p_mask, r_ids, r_mask, temperature=temperature)
    ref = _hf_logp_loop(model, p_ids, p_mask, r_ids, r_mask, temperature)
    assert logp.dtype == jnp.float32 and logp.shape == (B, TR)
    np.testing.assert_allclose(np.asarray(logp), ref, atol=1e-4)
    assert np.all(np.asarray(logp)[r_mask == 0] == 0.0)

    # V(s_t): the value head at the hidden state of the token before a_t, from one forward over the
    # rows laid out differently (unpadded sequences, right-padded to a common length).
    seqs, starts = [], []
    for b in range(B):
        prompt = [int(t) for t, m in zip(p_ids[b], p_mask[b]) if m]
        seqs.append(prompt + [int(x) for x in r_ids[b, : int(r_mask[b].sum())]])
        starts.append(len(prompt) - 1)
    L = max(map(len, seqs))
    toks = np.asarray([s + [PAD] * (L - len(s)) for s in seqs])
    m = np.asarray([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    v_all = np.asarray(_apply(gd, p, jnp.asarray(toks), jnp.asarray(m)).values)
    for b in range(B):
        n = int(r_mask[b].sum())
        expect = np.zeros(TR)
        expect[:n] = v_all[b, starts[b] : starts[b] + n]
        np.testing.assert_allclose(np.asarray(values[b]), expect, atol=1e-5)


def test_response_logprobs_micro_batches_and_no_value_head(policy, reference, batch):
    _, _, gd, p = policy
    p_ids, p_mask, r_ids, r_mask = batch
    full = response_logprobs(gd, p, p_ids, p_mask, r_ids, r_mask, temperature=0.7)
    for mb in (2, 3, 5, 8):  # 2 and 3 do not divide B = 5: padded chunks
        chunked = response_logprobs(gd, p, p_ids, p_mask, r_ids, r_mask, temperature=0.7, micro_batch_size=mb)
        np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(full[0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(chunked[1]), np.asarray(full[1]), atol=1e-5)
    _, _, rgd, rp = reference
    logp, values = response_logprobs(rgd, rp, p_ids, p_mask, r_ids, r_mask)
    assert values is None and logp.shape == (B, TR)
    with pytest.raises(ValueError, match="micro_batch_size"):
        response_logprobs(gd, p, p_ids, p_mask, r_ids, r_mask, micro_batch_size=0)
    with pytest.raises(ValueError, match="one batch size"):
        response_logprobs(gd, p, p_ids, p_mask, r_ids[1:], r_mask[1:])


def test_response_logprobs_refuses_ids_outside_the_vocabulary_and_bad_temperature(policy, batch):
    _, config, gd, p = policy
    p_ids, p_mask, r_ids, r_mask = batch
    for bad in (-5, config.vocab_size):
        ids = r_ids.copy()
        ids[1, 2] = bad  # a real response token of row 1
        with pytest.raises(ValueError, match=rf"^response_logprobs: response_ids .*\[0, {config.vocab_size}\) "
                                             rf"\(rows \[1\], e.g. {bad};") as e:
            response_logprobs(gd, p, p_ids, p_mask, ids, r_mask, temperature=0.7)
        assert "\n" not in str(e.value)
    # on padding too (such an id would embed as NaN and reach the real positions through attention)
    ids = np.where(r_mask != 0, r_ids, -100).astype(np.int32)
    with pytest.raises(ValueError, match=r"response_ids .*\(rows \[1, 2, 3\], e.g. -100; padding slots too\)"):
        response_logprobs(gd, p, p_ids, p_mask, ids, r_mask, temperature=0.7)
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^response_logprobs: temperature=.* must be a finite number > 0"):
            response_logprobs(gd, p, p_ids, p_mask, r_ids, r_mask, temperature=t)


def test_make_rollout_refuses_a_reference_model_of_another_vocabulary():
    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))
    rgd, rp = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(vocab_size=32), jax.random.key(1))
    with pytest.raises(ValueError, match=r"^make_rollout: the reference model π_b has vocab_size 32 != the "
                                         r"policy's vocab_size 64: π and π_b .*must share a tokenizer") as e:
        make_rollout(gd, p, rgd, rp, lambda *a: jnp.zeros(1), jnp.array([[5, 6]]), jnp.ones((1, 2)),
                     jax.random.key(2), SamplingConfig(max_new_tokens=2))
    assert "\n" not in str(e.value)


def test_response_logprobs_is_differentiable(policy, batch):
    _, _, gd, p = policy
    p_ids, p_mask, r_ids, r_mask = batch

    @jax.jit
    def loss(params):
        logp, values = response_logprobs(gd, params, p_ids, p_mask, r_ids, r_mask, temperature=0.7)
        return (logp * r_mask).sum() + (values**2 * r_mask).sum()

    g = jax.grad(loss)(p)
    norms = [float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_reward_model_scores_match_hf(reward_model, policy, batch):
    model, _, gd, p = reward_model
    p_ids, p_mask, r_ids, r_mask = batch
    scores = reward_model_scores(gd, p, p_ids, p_mask, r_ids, r_mask)
    chunked = reward_model_scores(gd, p, p_ids, p_mask, r_ids, r_mask, micro_batch_size=2)
    # Reference: HF's sequence classifier on each unpadded prompt+response (reads its last token).
    ref = []
    for b in range(B):
        prompt = [int(t) for t, m in zip(p_ids[b], p_mask[b]) if m]
        seq = np.asarray([prompt + [int(x) for x in r_ids[b, : int(r_mask[b].sum())]]])
        ref.append(testing.hf_forward(model, seq, np.ones_like(seq))[0, 0])
    assert scores.shape == (B,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(scores), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(scores), atol=1e-5)
    with pytest.raises(ValueError, match="score head"):
        reward_model_scores(policy[2], policy[3], p_ids, p_mask, r_ids, r_mask)


def _rewards_loop(scores, mask, stopped, omega):
    """Algorithms 1-2: R_i = R_φ − ω·1[T_i = T_max]; r_{T_i} = R_i, r_t = 0 for t < T_i."""
    out = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        T_i = int(mask[i].sum())
        if T_i == 0:
            continue
        R_i = scores[i] - (omega if not stopped[i] else 0.0)
        out[i, T_i - 1] = R_i
    return out


def test_sequence_rewards_penalty_and_placement():
    scores = np.array([1.0, -2.0, 0.5, 3.0, 0.0], np.float32)
    mask = np.array(
        [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32
    )
    stopped = np.array([True, False, True, True, False])
    for omega in (0.0, 1.0, 2.5):
        r = sequence_rewards(jnp.asarray(scores), jnp.asarray(mask), jnp.asarray(stopped), omega=omega)
        assert r.dtype == jnp.float32 and r.shape == mask.shape
        np.testing.assert_allclose(np.asarray(r), _rewards_loop(scores, mask, stopped, omega), atol=1e-7)
    r = np.asarray(sequence_rewards(scores, mask, stopped, omega=1.0))
    assert r[1, 3] == -3.0  # truncated: R − ω
    assert r[3, 3] == 3.0  # stopped on its last slot: no penalty
    assert r[0].sum() == 1.0 and r[0, 2] == 1.0  # on the last real token (the stop token), not after
    for omega in (-1.0, float("nan"), float("inf"), jnp.float32(-0.5)):  # a concrete ω is checked
        with pytest.raises(ValueError, match=r"^sequence_rewards: omega=.* must be a finite number >= 0"):
            sequence_rewards(scores, mask, stopped, omega=omega)
    traced = jax.jit(lambda w: sequence_rewards(scores, mask, stopped, omega=w))(2.5)  # traced: unchecked
    np.testing.assert_allclose(np.asarray(traced), _rewards_loop(scores, mask, stopped, 2.5), atol=1e-7)


@pytest.fixture(scope="module")
def rollout_and_eos(policy, reference, reward_model):
    _, _, gd, p = policy
    _, _, rgd, rp = reference
    _, _, mgd, mp = reward_model
    rng = np.random.default_rng(2)
    p_ids, p_mask = testing.make_left_padded_batch(rng, 8, TQ, 64, [7, 3, 5, 1, 6, 2, 4, 7])
    # Pick as stop token one that roughly half of the rows emit in a free run.
    free = sample(gd, p, p_ids, p_mask, jax.random.key(11),
                  SamplingConfig(max_new_tokens=8, temperature=0.8, stop_token_ids=()))
    toks = np.asarray(free.tokens)
    counts = {t: sum(t in row for row in toks.tolist()) for t in set(toks[:, 1:].ravel().tolist())}
    eos = min((t for t in counts if t != PAD), key=lambda t: abs(counts[t] - 4))
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, stop_token_ids=(eos,), pad_token_id=PAD)
    ro = make_rollout(
        gd, p, rgd, rp, functools.partial(reward_model_scores, mgd, mp), p_ids, p_mask,
        jax.random.key(11), cfg, omega=1.5, micro_batch_size=3,
    )
    return ro, eos, cfg


def test_make_rollout(policy, reference, reward_model, rollout_and_eos):
    ro, eos, cfg = rollout_and_eos
    assert isinstance(ro, Rollout)
    model, _, gd, p = policy
    stopped = np.asarray(ro.stopped)
    mask = np.asarray(ro.response_mask)
    assert stopped.any() and not stopped.all(), "need both stopped and truncated rows"
    # The sampler's log-probs equal the recomputed ones (one forward over prompt+response).
    np.testing.assert_allclose(np.asarray(ro.sample_logp), np.asarray(ro.logp), atol=1e-4)
    # log π and log π_b against HF forwards, temperature-scaled.
    p_ids, p_mask, r_ids = (np.asarray(x) for x in (ro.prompt_ids, ro.prompt_mask, ro.response_ids))
    for hf_model, logp in ((model, ro.logp), (reference[0], ro.ref_logp)):
        tokens = np.concatenate([p_ids, r_ids], 1)
        full_mask = np.concatenate([p_mask, mask], 1).astype(np.int64)
        logits = testing.hf_forward(hf_model, tokens, full_mask)[:, TQ - 1 : -1].astype(np.float64)
        ref = np.take_along_axis(_log_softmax(logits / cfg.temperature), r_ids[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.asarray(logp), ref * mask, atol=1e-4)
    assert not np.allclose(np.asarray(ro.logp), np.asarray(ro.ref_logp))
    assert ro.values.shape == mask.shape and np.all(np.asarray(ro.values)[mask == 0] == 0)
    # Stop flags from the tokens themselves; rewards from the Algorithm 1-2 loop with ω = 1.5.
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        assert bool(stopped[b]) == (int(r_ids[b, n - 1]) == eos)
    np.testing.assert_allclose(
        np.asarray(ro.rewards), _rewards_loop(np.asarray(ro.scores), mask, stopped, 1.5), atol=1e-6
    )
    # The scores are the RM's, without the penalty.
    _, _, mgd, mp = reward_model
    np.testing.assert_allclose(
        np.asarray(ro.scores),
        np.asarray(reward_model_scores(mgd, mp, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)),
        atol=1e-6,
    )


def test_make_rollout_checks_reward_fn_shape(policy, reference, rollout_and_eos):
    _, _, gd, p = policy
    _, _, rgd, rp = reference
    ro, _, cfg = rollout_and_eos  # same shapes and config: reuses the compiled functions
    with pytest.raises(ValueError, match="one score per row"):
        make_rollout(
            gd, p, rgd, rp, lambda pi, pm, ri, rm: rm, ro.prompt_ids, ro.prompt_mask,
            jax.random.key(0), cfg, micro_batch_size=3,
        )


@pytest.mark.parametrize("layout,fused", [("value-head", False), ("critic", False), ("critic", True)])
def test_logp_from_sampler_skips_the_policy_forward_and_keeps_the_rest(policy, reference, reward_model,
                                                                       rollout_and_eos, layout, fused):
    """``logp_from_sampler=True``: logp is the sampler's, values / ref_logp / rewards are the
    recomputing rollout's (same key: same samples), and in the critic layout the policy's trunk
    does not run while scoring (its parameters get no gradient through the values). ``fused``: a
    device reward, so the whole rollout is one program (the training loop's path)."""
    from klq_jax.models import critic as critic_lib
    from klq_jax.rewards import make_rm_reward_fn

    ro_ref, _, cfg = rollout_and_eos
    _, _, gd, p = policy
    _, _, rgd, rp = reference
    _, _, mgd, mp = reward_model
    if layout == "critic":
        gd, p = critic_lib.with_critic_from_reward_model(gd, p, mgd, mp)
    reward = make_rm_reward_fn(mgd, mp) if fused else functools.partial(reward_model_scores, mgd, mp)
    args = (gd, p, rgd, rp, reward, ro_ref.prompt_ids, ro_ref.prompt_mask, jax.random.key(11), cfg)
    exact = make_rollout(*args, omega=1.5, micro_batch_size=3)
    fast = make_rollout(*args, omega=1.5, micro_batch_size=3, logp_from_sampler=True)
    mask = np.asarray(fast.response_mask)
    np.testing.assert_array_equal(np.asarray(fast.response_ids), np.asarray(exact.response_ids))
    np.testing.assert_array_equal(np.asarray(fast.logp), np.asarray(fast.sample_logp) * (mask != 0))
    np.testing.assert_allclose(np.asarray(fast.logp), np.asarray(exact.logp), atol=1e-4)
    for name in ("values", "ref_logp", "rewards", "scores"):
        np.testing.assert_allclose(np.asarray(getattr(fast, name)), np.asarray(getattr(exact, name)),
                                   atol=1e-5, err_msg=name)
    if layout == "critic":  # the scoring program reads no policy weight
        from flax import nnx

        from klq_jax import rollout as rollout_lib

        def values_only(params):
            _, v = rollout_lib.response_logprobs_traced(
                gd, params, ro_ref.prompt_ids, ro_ref.prompt_mask, fast.response_ids,
                fast.response_mask, 1.0, with_logp=False)
            return v.sum()

        grads = nnx.to_pure_dict(jax.grad(values_only)(p))
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads["policy"]))
        assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree_util.tree_leaves(grads["critic"]))


def test_response_logprobs_needs_a_prompt_token():
    """log π of the first response token is read at the last prompt slot: an empty prompt (Tq = 0)
    is refused by name (not with the model's internal ``queries_from`` range error)."""
    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))
    with pytest.raises(ValueError, match=r"response_logprobs: .*Tq = 0"):
        response_logprobs(gd, p, jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0)), jnp.array([[7, 0]]),
                          jnp.array([[1.0, 0.0]]))
