"""Issue 11, fault 2: top-p keeps HF's / Holtzman et al.'s set, on exact float boundaries too.

The reference is Hugging Face's ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (torch, CPU), and the
exact kept sets written out by hand from the decimal probabilities.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klq_jax.sampling import SamplingConfig, kept_tokens, sample_from_logits

torch = pytest.importorskip("torch")
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper  # noqa: E402


def _logits(p, dtype=jnp.float32):
    return jnp.asarray([[math.log(x) if x > 0 else -math.inf for x in p]], jnp.float32).astype(dtype)


def _hf_kept(logits, top_p, top_k=0):
    scores = torch.from_numpy(np.asarray(logits, np.float32).copy())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores).numpy()


def _ours(logits, top_p, top_k=0):
    return np.asarray(kept_tokens(logits, SamplingConfig(max_new_tokens=1, top_p=top_p, top_k=top_k)))


def _drawn(logits, top_p, top_k=0, n=512):
    """The set of tokens :func:`sample_from_logits` draws in ``n`` rows (the sampler's support)."""
    cfg = SamplingConfig(max_new_tokens=1, top_p=top_p, top_k=top_k)
    tokens, _ = jax.jit(sample_from_logits, static_argnums=2)(
        jax.random.key(0), jnp.repeat(logits, n, axis=0), cfg)
    return set(np.asarray(tokens).tolist())


@pytest.mark.parametrize(
    "p, top_p, top_k, expected",
    [
        ([0.6, 0.05, 0.3, 0.05], 0.9, 0, {0, 2}),  # mass of {0, 2} is exactly 0.9
        ([0.55, 0.25, 0.1, 0.1], 0.8, 0, {0, 1}),  # mass of {0, 1} is exactly 0.8
        ([0.6, 0.05, 0.3, 0.05], 0.91, 0, {0, 2, 3}),  # past the boundary: the higher-index tied 0.05 joins
        ([0.2] * 5, 0.4, 0, {3, 4}),  # ties at the crossing: HF keeps the higher indices
        # top-k first: {1, 3, 5} renormalised is [0.6, 0.3, 0.1]; its 0.9 boundary keeps {1, 3}.
        ([0.05, 0.48, 0.05, 0.24, 0.05, 0.08, 0.05], 0.9, 3, {1, 3}),
    ],
)
def test_exact_boundaries_float32(p, top_p, top_k, expected):
    logits = _logits(p)
    kept = _ours(logits, top_p, top_k)
    assert set(np.flatnonzero(kept[0]).tolist()) == expected
    np.testing.assert_array_equal(kept, _hf_kept(logits, top_p, top_k))
    assert _drawn(logits, top_p, top_k) == expected


@pytest.mark.parametrize("n, top_p, expected", [(5, 0.4, {3, 4}), (10, 0.3, {7, 8, 9}), (4, 0.5, {2, 3})])
def test_exact_boundary_bfloat16(n, top_p, expected):
    """bf16 logits with an exact boundary: ``n`` equal logits (probability exactly 1/n each) and
    ``top_p = k/n``: exactly k tokens are kept (the tied ones HF keeps), also at temperature 0.7."""
    logits = jnp.zeros((1, n + 2), jnp.bfloat16).at[0, n:].set(-jnp.inf)  # two impossible tokens
    assert logits.dtype == jnp.bfloat16
    kept = _ours(logits, top_p)
    assert set(np.flatnonzero(kept[0]).tolist()) == expected
    np.testing.assert_array_equal(kept, _hf_kept(logits.astype(jnp.float32), top_p))
    cfg = SamplingConfig(max_new_tokens=1, top_p=top_p, temperature=0.7)
    assert set(np.flatnonzero(np.asarray(kept_tokens(logits, cfg))[0]).tolist()) == expected
    assert _drawn(logits, top_p) == expected


def test_issue_cases_with_bfloat16_logits():
    for p, top_p in (([0.6, 0.05, 0.3, 0.05], 0.9), ([0.55, 0.25, 0.1, 0.1], 0.8)):
        logits = _logits(p, jnp.bfloat16)
        np.testing.assert_array_equal(_ours(logits, top_p), _hf_kept(logits.astype(jnp.float32), top_p))


def _exact_kept(p_hundredths, top_p):
    """The nucleus in exact rational arithmetic: rank by probability (ties: higher index first, as
    HF), keep while the mass ranked before is below ``top_p`` (the decimal number written)."""
    target = Fraction(str(top_p))
    order = sorted(range(len(p_hundredths)), key=lambda i: (-p_hundredths[i], -i))
    kept, before = set(), Fraction(0)
    for i in order:
        if before >= target or p_hundredths[i] == 0:
            break
        kept.add(i)
        before += Fraction(p_hundredths[i], 100)
    return kept


def test_exact_boundaries_on_many_rows():
    """Random distributions in hundredths, ``top_p`` exactly the mass of a top set (every row is an
    exact boundary): the kept set is the exact nucleus; and HF's filter agrees where its float32
    rounding does not go the wrong way (reported, not required)."""
    rng = np.random.RandomState(0)
    cases = []
    for _ in range(300):
        n = rng.randint(3, 12)
        cuts = np.sort(rng.choice(np.arange(1, 100), n - 1, replace=False))
        h = np.diff(np.concatenate([[0], cuts, [100]])).tolist() + [0] * (12 - n)
        order = sorted(range(12), key=lambda i: (-h[i], -i))
        top_p = sum(h[i] for i in order[: rng.randint(1, n)]) / 100
        cases.append((h, top_p))
    hf_agrees = 0
    for h, top_p in cases:
        logits = _logits([x / 100 for x in h])
        ours = _ours(logits, top_p)
        assert set(np.flatnonzero(ours[0]).tolist()) == _exact_kept(h, top_p), (h, top_p)
        hf_agrees += bool((ours == _hf_kept(logits, top_p)).all())
    assert hf_agrees > 0.8 * len(cases)


def _hf_rule_kept(z, top_k, top_p):
    """numpy, Hugging Face's rule: top-k keeps values >= the k-th largest (every tie); top-p on those
    (stable ascending sort, drop while the cumulative mass <= 1 - top_p, keep the largest)."""
    z = np.asarray(z, np.float64)
    keep = z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        order = np.argsort(zk, kind="stable")
        p = np.exp(zk[order] - zk.max())
        drop = np.cumsum(p / p.sum()) <= 1 - top_p
        drop[-1] = False
        keep[order[drop]] = False
    return keep


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (3, 0.7), (2, 0.5)])
def test_top_k_keeps_every_token_tied_with_the_kth(top_k, top_p):
    """Logits with ties at (and around) the k-th value: kept_tokens is HF's set, and the sampler
    draws exactly that set (each tied token included); a row without ties in the same batch keeps k."""
    rows = np.array([
        [2.0, 1.0, 1.0, 2.0, 0.0, 1.0, -1.0, 1.0],  # 2 tops, then four tied at 1.0
        [3.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0],   # five tied tops
        [0.5, 1.5, 2.5, 3.5, 0.0, -0.5, 1.0, 2.0],  # no ties
    ], np.float32)
    ours = _ours(jnp.asarray(rows), top_p, top_k)
    want = np.stack([_hf_rule_kept(r, top_k, top_p) for r in rows])
    np.testing.assert_array_equal(ours, want)
    if top_p == 1.0:
        np.testing.assert_array_equal(ours, _hf_kept(rows, top_p, top_k))  # torch's own warper
    if top_p == 1.0:
        assert want[2].sum() == top_k
    for r, w in zip(rows, want):
        assert _drawn(jnp.asarray(r[None]), top_p, top_k, n=256) == set(np.flatnonzero(w).tolist())
