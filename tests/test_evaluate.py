"""Exact evaluation (klq_jax.evaluate) against brute force on a hand-built tabular "network".

The next-token distribution is the softmax of a fixed random table row chosen by a hash of
(first real prompt token, last real token, number of real tokens), so the test can recompute
π(y|x) of every response independently, one sequence at a time, as a product of per-token
probabilities. The optimum is checked against the closed forms of §2 / App. A and, on a tree MDP,
against soft policy iteration of ``tests.helpers.tabular`` (token-level view, Remark 2.1).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klq_jax import evaluate as ev
from tests.helpers import tabular as tb

V, EOS, T_MAX, TAU = 5, 2, 4, 0.6
N_HASH = 97
PROMPTS = np.array([[0, 0, 7, 3], [4, 1, 6, 8], [0, 9, 9, 5]], dtype=np.int32)  # left-padded
PROMPT_MASK = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=np.float32)


def _hash(first, last, length):
    return (first * 31 + last * 7919 + length * 104729) % N_HASH


def _table(seed, scale=1.5):
    return (scale * np.random.default_rng(seed).standard_normal((N_HASH, V))).astype(np.float32)


def _make_fn(table, calls=None):
    """Batched next-token log-probs of left-padded rows, from the table (float32, like a network)."""

    def fn(tokens, mask):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        assert tokens.dtype == np.int32 and mask.dtype == np.float32
        assert np.all(np.diff(mask, axis=-1) >= 0) and np.all(mask[:, -1] == 1), "rows must be left-padded"
        if calls is not None:
            calls.append(tokens.shape)
        first = tokens[np.arange(len(tokens)), np.argmax(mask > 0, axis=-1)]
        idx = _hash(first.astype(np.int64), tokens[:, -1].astype(np.int64), mask.sum(-1).astype(np.int64))
        logits = table[idx]
        return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)

    return fn


def _brute_responses(vocab, eos, t_max):
    """Every response, by cutting every length-t_max token string at its first EOS."""
    out = set()
    for seq in itertools.product(range(vocab), repeat=t_max):
        out.add(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return out


def _brute_logp(table, prompt, pmask, response):
    """log Π_t π(y_t | x, y_<t) in float64, one sequence at a time."""
    real = [int(t) for t, m in zip(prompt, pmask) if m > 0]
    logp, ctx = 0.0, list(real)
    for tok in response:
        row = table[_hash(ctx[0], ctx[-1], len(ctx))].astype(np.float64)
        logp += row[tok] - np.log(np.exp(row).sum())
        ctx.append(tok)
    return logp


def _real(responses, mask):
    return [tuple(int(t) for t, m in zip(r, mr) if m > 0) for r, mr in zip(responses, mask)]


@pytest.mark.parametrize("vocab,eos,t_max", [(2, 0, 1), (3, 0, 2), (V, EOS, T_MAX), (4, 3, 3)])
def test_enumerate_responses(vocab, eos, t_max):
    responses, mask, truncated = ev.enumerate_responses(vocab, eos, t_max, pad_id=0)
    assert responses.dtype == np.int32 and mask.dtype == np.float32 and truncated.dtype == bool
    m = ev.num_responses(vocab, t_max)
    assert responses.shape == (m, t_max) == mask.shape and truncated.shape == (m,)
    seqs = _real(responses, mask)
    assert len(set(seqs)) == m  # no duplicates
    assert set(seqs) == _brute_responses(vocab, eos, t_max)
    for seq, r, mr, tr in zip(seqs, responses, mask, truncated):
        n = len(seq)
        assert np.all(mr[:n] == 1) and np.all(mr[n:] == 0) and np.all(r[n:] == 0)
        assert tr == (eos not in seq)
        assert (eos not in seq[:-1]) and (tr or seq[-1] == eos)
        assert tr == (n == t_max and seq[-1] != eos)


def test_sequence_logprobs_matches_brute_force_one_call_per_depth():
    table = _table(0)
    calls = []
    fn = _make_fn(table, calls)
    responses, mask, _ = ev.enumerate_responses(V, EOS, T_MAX)
    seqs = _real(responses, mask)
    # one prompt at a time
    for p in range(len(PROMPTS)):
        calls.clear()
        got = ev.sequence_logprobs(fn, PROMPTS[p], PROMPT_MASK[p], T_MAX, V, EOS)
        assert len(calls) == T_MAX  # one batched call per depth
        assert [c[0] for c in calls] == [(V - 1) ** d for d in range(T_MAX)]
        want = np.array([_brute_logp(table, PROMPTS[p], PROMPT_MASK[p], s) for s in seqs])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert abs(np.exp(got).sum() - 1.0) < 1e-12
    # all prompts together: still one call per depth, same numbers
    calls.clear()
    batch = ev.sequence_logprobs_batch(fn, PROMPTS, PROMPT_MASK, T_MAX, V, EOS)
    assert len(calls) == T_MAX and batch.shape == (len(PROMPTS), len(seqs))
    for p in range(len(PROMPTS)):
        np.testing.assert_allclose(batch[p], ev.sequence_logprobs(fn, PROMPTS[p], PROMPT_MASK[p], T_MAX, V, EOS),
                                   rtol=0, atol=1e-12)
    # chunked calls give the same numbers
    chunked = ev.sequence_logprobs_batch(fn, PROMPTS, PROMPT_MASK, T_MAX, V, EOS, max_rows=7)
    np.testing.assert_allclose(chunked, batch, rtol=0, atol=1e-12)


def test_sequence_logprobs_accepts_a_jitted_jax_function():
    table = _table(1)
    jtable = jnp.asarray(table)

    @jax.jit
    def jfn(tokens, mask):
        first = jnp.take_along_axis(tokens, jnp.argmax(mask > 0, axis=-1)[:, None], axis=-1)[:, 0]
        idx = _hash(first, tokens[:, -1], mask.sum(-1).astype(jnp.int32))
        return jax.nn.log_softmax(jtable[idx], axis=-1)

    got = ev.sequence_logprobs_batch(jfn, PROMPTS, PROMPT_MASK, T_MAX, V, EOS)
    want = ev.sequence_logprobs_batch(_make_fn(table), PROMPTS, PROMPT_MASK, T_MAX, V, EOS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _rewards(seqs, seed=5, omega=1.0):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(len(seqs))
    return r - omega * np.array([EOS not in s for s in seqs])


def test_exact_optimum_and_objective():
    responses, mask, _ = ev.enumerate_responses(V, EOS, T_MAX)
    seqs = _real(responses, mask)
    rewards = _rewards(seqs)
    ref = ev.sequence_logprobs(_make_fn(_table(0)), PROMPTS[0], PROMPT_MASK[0], T_MAX, V, EOS)
    j_star, log_opt = ev.exact_optimum(ref, rewards, TAU)
    # brute force closed forms
    pb = np.exp(ref)
    z = sum(pb[i] * np.exp(rewards[i] / TAU) for i in range(len(seqs)))
    assert j_star == pytest.approx(TAU * np.log(z), abs=1e-10)
    np.testing.assert_allclose(np.exp(log_opt), pb * np.exp(rewards / TAU) / z, rtol=1e-10, atol=0)
    assert abs(np.exp(log_opt).sum() - 1) < 1e-12
    # π* attains J*, KL(π*‖π*) = 0
    at_opt = ev.exact_objective(log_opt, ref, rewards, TAU)
    assert at_opt["J"] == pytest.approx(j_star, abs=1e-10)
    assert abs(at_opt["kl_to_opt"]) < 1e-10
    # π_b: KL to itself 0, J = E_b[R]
    at_ref = ev.exact_objective(ref, ref, rewards, TAU)
    assert abs(at_ref["kl_to_ref"]) < 1e-12
    assert at_ref["J"] == pytest.approx(float(np.dot(pb, rewards)), abs=1e-10)
    # random policies: J < J*, and J* - J = τ KL(π‖π*), against plain loops
    for seed in range(6):
        pol = ev.sequence_logprobs(_make_fn(_table(100 + seed, scale=2.0)), PROMPTS[0], PROMPT_MASK[0],
                                   T_MAX, V, EOS)
        s = ev.exact_objective(pol, ref, rewards, TAU)
        p = np.exp(pol)
        reward = sum(p[i] * rewards[i] for i in range(len(p)))
        kl_ref = sum(p[i] * (pol[i] - ref[i]) for i in range(len(p)))
        kl_opt = sum(p[i] * (pol[i] - log_opt[i]) for i in range(len(p)))
        assert s["reward"] == pytest.approx(reward, abs=1e-10)
        assert s["kl_to_ref"] == pytest.approx(kl_ref, abs=1e-10) and kl_ref > 0
        assert s["kl_to_opt"] == pytest.approx(kl_opt, abs=1e-10) and kl_opt > 1e-3
        assert s["J"] == pytest.approx(reward - TAU * kl_ref, abs=1e-10)
        assert s["J"] < j_star - 1e-4
        assert s["gap"] == pytest.approx(TAU * kl_opt, abs=1e-9)
        assert s["j_star"] == pytest.approx(j_star, abs=1e-12)


def test_exact_evaluation_averages_over_prompts():
    responses, mask, truncated = ev.enumerate_responses(V, EOS, T_MAX)
    seqs = _real(responses, mask)
    ref_fn, pol_fn = _make_fn(_table(0)), _make_fn(_table(3))
    base = _rewards(seqs, seed=9, omega=0.0)
    rewards = np.stack([base + p for p in range(len(PROMPTS))]) - 0.7 * truncated  # [P, M]
    w = np.array([0.5, 0.3, 0.2])
    out = ev.exact_evaluation(pol_fn, ref_fn, PROMPTS, PROMPT_MASK, rewards, tau=TAU, t_max=T_MAX,
                              vocab_size=V, eos_id=EOS, prompt_weights=w)
    rows = []
    for p in range(len(PROMPTS)):
        pol = ev.sequence_logprobs(pol_fn, PROMPTS[p], PROMPT_MASK[p], T_MAX, V, EOS)
        ref = ev.sequence_logprobs(ref_fn, PROMPTS[p], PROMPT_MASK[p], T_MAX, V, EOS)
        rows.append(ev.exact_objective(pol, ref, rewards[p], TAU))
    for k in ("J", "reward", "kl_to_ref", "kl_to_opt", "j_star", "gap"):
        np.testing.assert_allclose(out["per_prompt"][k], [r[k] for r in rows], rtol=0, atol=1e-12)
        assert out[k] == pytest.approx(sum(wi * r[k] for wi, r in zip(w, rows)), abs=1e-12)

    def reward_fn(prompt_ids, prompt_mask, resp, rmask, trunc):
        p = [i for i in range(len(PROMPTS)) if np.array_equal(PROMPTS[i], prompt_ids)][0]
        assert resp.shape == (len(seqs), T_MAX) and rmask.shape == resp.shape and trunc.shape == (len(seqs),)
        return base + p - 0.7 * trunc

    out2 = ev.exact_evaluation(pol_fn, ref_fn, PROMPTS, PROMPT_MASK, reward_fn, tau=TAU, t_max=T_MAX,
                               vocab_size=V, eos_id=EOS, prompt_weights=w)
    assert out2["J"] == pytest.approx(out["J"], abs=1e-12)


def test_matches_soft_policy_iteration_on_a_tree_mdp():
    """Token-level soft policy iteration (tabular KLQ, α = λ = 1, γ = 1) reaches the sequence-level
    optimum that evaluate computes in closed form (Remark 2.1): V(root) = J*, and the policy it
    reaches has KL(π‖π*) = 0 when read back through sequence_logprobs."""
    vocab, eos, t_max = 4, 0, 3
    mdp = tb.make_tree_mdp(n_actions=vocab, eos_id=eos, horizon=t_max, gamma=1.0, seed=2, truncation_penalty=0.5)
    index = {s: i for i, s in enumerate(mdp.states)}
    rng = np.random.default_rng(0)
    pi_b = tb.random_policy(mdp, rng)

    def fn_of(pi):
        def fn(tokens, mask):  # prompt = one token; state = (0,) + response prefix
            rows = [index[(0,) + tuple(int(t) for t in row[1:])] for row in np.asarray(tokens)]
            return np.log(pi[rows]).astype(np.float32)
        return fn

    responses, mask, _ = ev.enumerate_responses(vocab, eos, t_max)
    rewards = np.array([mdp.reward[index[(0,) + s[:-1]], s[-1]] for s in _real(responses, mask)])
    prompt, pmask = np.array([11]), np.array([1.0])
    ref = ev.sequence_logprobs(fn_of(pi_b), prompt, pmask, t_max, vocab, eos)
    j_star, _ = ev.exact_optimum(ref, rewards, TAU)

    q = np.zeros((mdp.num_states, vocab))
    for _ in range(t_max + 1):
        q = tb.klq_step(mdp, q, pi_b, TAU, lam=1.0, alpha=1.0)
    pi, v = tb.boltzmann(q, pi_b, TAU)
    assert v[0] == pytest.approx(j_star, abs=1e-6)
    s = ev.exact_objective(ev.sequence_logprobs(fn_of(pi), prompt, pmask, t_max, vocab, eos), ref, rewards, TAU)
    assert abs(s["kl_to_opt"]) < 1e-6 and s["J"] == pytest.approx(j_star, abs=1e-5)
    # and π_b is strictly worse
    assert ev.exact_objective(ref, ref, rewards, TAU)["J"] < j_star - 1e-3


def test_errors_are_helpful():
    fn = _make_fn(_table(0))
    with pytest.raises(ValueError, match="LEFT-padded"):
        ev.sequence_logprobs(fn, np.array([3, 4, 0]), np.array([1.0, 1.0, 0.0]), T_MAX, V, EOS)
    with pytest.raises(ValueError, match="expected"):
        ev.sequence_logprobs(lambda t, m: np.zeros((t.shape[0], V + 1)), PROMPTS[0], PROMPT_MASK[0], T_MAX, V, EOS)
    with pytest.raises(ValueError, match="sum to"):
        ev.exact_optimum(np.log(np.full(4, 0.2)), np.zeros(4), TAU)
    with pytest.raises(ValueError, match="too many"):
        ev.enumerate_responses(50_000, 0, 3)
