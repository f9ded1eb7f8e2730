"""The KV-cache sampler against Hugging Face ``generate`` and against exact distributions.

Reference computations are independent of the sampler: ``transformers``' PyTorch model (greedy
``generate`` and fresh forward passes for logits / log-probs) and numpy softmax / sorting for the
sampling distributions and the top-k / top-p kept sets.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import torch  # test-time reference (the .[test] extra)
import scipy.stats as scipy_stats

from tests.helpers import testing  # noqa: E402
from klq_jax.models import hf  # noqa: E402
from klq_jax.sampling import SampleResult, SamplingConfig, sample, sample_from_logits  # noqa: E402

PAD = 0
TQ, T_MAX = 8, 12
LENGTHS = [8, 5, 3, 6, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, config, graphdef, params) of one tiny random HF GPT-NeoX, converted."""
    d = tmp_path_factory.mktemp("tiny-neox-sampling")
    model = testing.tiny_hf_gpt_neox(d, seed=1)
    config, graphdef, params = hf.load_hf(d)
    return model, config, graphdef, params


@pytest.fixture(scope="module")
def prompts():
    return testing.make_left_padded_batch(np.random.default_rng(0), len(LENGTHS), TQ, 64, LENGTHS)


def _hf_logits(model, tokens, mask):
    return testing.hf_forward(model, tokens, mask).astype(np.float64)


def _log_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def _hf_response_logits(model, prompt_ids, prompt_mask, resp, resp_mask):
    """Logits ``[B, Tr, V]`` predicting each response token, from one HF forward over prompt+response."""
    tokens = np.concatenate([prompt_ids, resp], 1)
    mask = np.concatenate([prompt_mask, resp_mask], 1).astype(np.int64)
    logits = _hf_logits(model, tokens, mask)
    Tq, Tr = prompt_ids.shape[1], resp.shape[1]
    return logits[:, Tq - 1 : Tq + Tr - 1]


def _hf_greedy(model, prompt_ids, prompt_mask, eos, n):
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(prompt_ids, dtype=torch.long),
            attention_mask=torch.as_tensor(prompt_mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=PAD,
        ).numpy()
    resp = out[:, prompt_ids.shape[1] :]
    return np.pad(resp, ((0, 0), (0, n - resp.shape[1])), constant_values=PAD)


# ----------------------------------------------------------------------------------------------
# Greedy decoding == HF generate(do_sample=False)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_free_run(tiny, prompts):
    _, _, gd, p = tiny
    ids, mask = prompts
    cfg = SamplingConfig(max_new_tokens=T_MAX, greedy=True, stop_token_ids=(), pad_token_id=PAD)
    return sample(gd, p, ids, mask, jax.random.key(0), cfg)


def _pick_eos(tokens, k=1):
    """Token ids that occur after the first step in some rows but not in all (so some rows stop)."""
    B = tokens.shape[0]
    picks = []
    for tok in sorted(set(tokens[:, 1:].ravel().tolist())):
        rows = sum(tok in row for row in tokens.tolist())
        if tok != PAD and 1 <= rows <= B - 2:
            picks.append(tok)
    assert len(picks) >= k, "the tiny model's greedy outputs are too uniform to pick an EOS"
    return picks[:k]


def test_greedy_without_stop_matches_hf(tiny, prompts, greedy_free_run):
    model = tiny[0]
    ids, mask = prompts
    ref = _hf_greedy(model, ids, mask, None, T_MAX)
    np.testing.assert_array_equal(np.asarray(greedy_free_run.tokens), ref)
    assert np.all(np.asarray(greedy_free_run.truncated))
    assert np.all(np.asarray(greedy_free_run.lengths) == T_MAX)


@pytest.mark.parametrize("n_eos", [1, 2])
def test_greedy_with_eos_matches_hf(tiny, prompts, greedy_free_run, n_eos):
    model, _, gd, p = tiny
    ids, mask = prompts
    eos = _pick_eos(np.asarray(greedy_free_run.tokens), n_eos)
    cfg = SamplingConfig(max_new_tokens=T_MAX, greedy=True, stop_token_ids=tuple(eos), pad_token_id=PAD)
    res = sample(gd, p, ids, mask, jax.random.key(0), cfg)
    ref = _hf_greedy(model, ids, mask, eos if n_eos > 1 else eos[0], T_MAX)
    tokens = np.asarray(res.tokens)
    np.testing.assert_array_equal(tokens, ref)

    # Independent bookkeeping: first stop token per row, padding after it.
    stopped = np.asarray(res.stopped)
    assert stopped.any() and not stopped.all(), "the chosen EOS must stop some rows but not all"
    for b, row in enumerate(tokens.tolist()):
        hits = [t for t, tok in enumerate(row) if tok in eos]
        length = hits[0] + 1 if hits else T_MAX
        assert bool(stopped[b]) == bool(hits)
        assert bool(res.truncated[b]) == (not hits)
        assert int(res.lengths[b]) == length
        np.testing.assert_array_equal(np.asarray(res.mask[b]), (np.arange(T_MAX) < length).astype(np.float32))
        assert all(tok == PAD for tok in row[length:])
        assert np.all(np.asarray(res.logprobs[b, length:]) == 0.0)
    assert res.tokens.dtype == jnp.int32 and res.mask.dtype == jnp.float32
    assert res.lengths.dtype == jnp.int32 and res.logprobs.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Log-probs of the samples == a fresh forward pass
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0.7), dict(temperature=1.3, top_k=5, top_p=0.8), dict(greedy=True, temperature=0.5)],
    ids=["t0.7", "t1.3-topk-topp", "greedy"],
)
def test_logprobs_match_fresh_forward(tiny, prompts, greedy_free_run, kw):
    model, _, gd, p = tiny
    ids, mask = prompts
    eos = _pick_eos(np.asarray(greedy_free_run.tokens), 1)
    cfg = SamplingConfig(max_new_tokens=T_MAX, stop_token_ids=tuple(eos), pad_token_id=PAD, **kw)
    res = sample(gd, p, ids, mask, jax.random.key(3), cfg)
    tokens, rmask = np.asarray(res.tokens), np.asarray(res.mask)
    logits = _hf_response_logits(model, ids, mask, tokens, rmask)
    ref = np.take_along_axis(_log_softmax(logits / cfg.temperature), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(res.logprobs), ref * rmask, atol=1e-4)
    if cfg.greedy:
        np.testing.assert_array_equal(tokens[rmask > 0], logits.argmax(-1)[rmask > 0])


def test_same_key_same_tokens(tiny, prompts):
    _, _, gd, p = tiny
    ids, mask = prompts
    cfg = SamplingConfig(max_new_tokens=T_MAX, temperature=1.0, stop_token_ids=(), pad_token_id=PAD)
    a = sample(gd, p, ids, mask, jax.random.key(7), cfg)
    b = sample(gd, p, ids, mask, jax.random.key(7), cfg)
    c = sample(gd, p, ids, mask, jax.random.key(8), cfg)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ----------------------------------------------------------------------------------------------
# Distribution of the first sampled token
# ----------------------------------------------------------------------------------------------

N_ROWS, N_KEYS = 2048, 4  # 8192 draws of the first token


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value of ``counts`` against ``probs`` (bins with expected < 5 pooled)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    obs, e = obs[keep], e[keep]
    stat = ((obs - e) ** 2 / e).sum()
    return scipy_stats.chi2.sf(stat, len(e) - 1)


@pytest.fixture(scope="module")
def first_token_setup(tiny, prompts):
    """The prompt with the flattest next-token distribution, repeated ``N_ROWS`` times, and its logits."""
    model, _, _, _ = tiny
    ids, mask = prompts
    last = _hf_logits(model, ids, mask)[:, -1]  # [B, V]
    ent = -(np.exp(_log_softmax(last)) * _log_softmax(last)).sum(-1)
    b = int(ent.argmax())
    rep_ids = np.repeat(ids[b : b + 1], N_ROWS, 0)
    rep_mask = np.repeat(mask[b : b + 1], N_ROWS, 0)
    return rep_ids, rep_mask, last[b]


def _first_token_counts(tiny, setup, cfg):
    _, config, gd, p = tiny
    rep_ids, rep_mask, _ = setup
    counts = np.zeros(config.vocab_size, np.int64)
    for k in range(N_KEYS):
        res = sample(gd, p, rep_ids, rep_mask, jax.random.key(100 + k), cfg)
        counts += np.bincount(np.asarray(res.tokens[:, 0]), minlength=config.vocab_size)
    return counts


def _kept(logits, temperature, top_k=0, top_p=1.0):
    """Boolean kept set of HF's warpers (temperature, then top-k, then top-p), in numpy."""
    z = logits / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        order = np.argsort(-zk, kind="stable")
        probs = np.exp(_log_softmax(zk))[order]
        before = np.cumsum(probs) - probs
        keep_sorted = before < top_p
        keep_sorted[0] = True
        kp = np.zeros_like(keep)
        kp[order] = keep_sorted
        keep &= kp
    return keep


def _renorm(logits, temperature, keep):
    p = np.exp(_log_softmax(np.where(keep, logits / temperature, -np.inf)))
    return p / p.sum()


def test_first_token_distribution_matches_tempered_softmax(tiny, first_token_setup):
    logits = first_token_setup[2]
    T = 0.7
    cfg = SamplingConfig(max_new_tokens=1, temperature=T, stop_token_ids=(), pad_token_id=PAD)
    counts = _first_token_counts(tiny, first_token_setup, cfg)
    probs = np.exp(_log_softmax(logits / T))
    assert counts.sum() == N_ROWS * N_KEYS
    assert (counts > 0).sum() >= 10, "test needs a spread-out distribution"
    assert _chi2_pvalue(counts, probs) > 1e-3
    tv = 0.5 * np.abs(counts / counts.sum() - probs).sum()
    assert tv < 0.05
    # The same counts must reject what a wrong sampler would target: no temperature, or T applied twice.
    for wrong in (np.exp(_log_softmax(logits)), np.exp(_log_softmax(logits / T**2))):
        assert _chi2_pvalue(counts, wrong) < 1e-8
        assert 0.5 * np.abs(counts / counts.sum() - wrong).sum() > tv + 0.02


@pytest.mark.parametrize(
    "kw", [dict(top_k=4), dict(top_p=0.5), dict(top_k=10, top_p=0.7)], ids=["k4", "p0.5", "k10-p0.7"]
)
def test_first_token_top_k_top_p_distribution(tiny, first_token_setup, kw):
    logits = first_token_setup[2]
    T = 0.9
    cfg = SamplingConfig(max_new_tokens=1, temperature=T, stop_token_ids=(), pad_token_id=PAD, **kw)
    counts = _first_token_counts(tiny, first_token_setup, cfg)
    keep = _kept(logits, T, **kw)
    assert 1 < keep.sum() < len(keep)
    assert counts[~keep].sum() == 0, "a token outside the kept set was sampled"
    assert _chi2_pvalue(counts, _renorm(logits, T, keep)) > 1e-3
    # The unfiltered distribution must be rejected by the same counts.
    assert _chi2_pvalue(counts, np.exp(_log_softmax(logits / T))) < 1e-8


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.4), dict(top_k=6, top_p=0.6)], ids=["k3", "p0.4", "k6-p0.6"])
def test_top_k_top_p_never_leave_kept_set(tiny, prompts, kw):
    """Every token of every step lies in the kept set computed from a fresh HF forward."""
    model, _, gd, p = tiny
    ids, mask = prompts
    T = 1.5  # flattens the distribution so the filters matter
    cfg = SamplingConfig(max_new_tokens=T_MAX, temperature=T, stop_token_ids=(), pad_token_id=PAD, **kw)
    for k in range(3):
        res = sample(gd, p, ids, mask, jax.random.key(200 + k), cfg)
        tokens = np.asarray(res.tokens)
        logits = _hf_response_logits(model, ids, mask, tokens, np.asarray(res.mask))
        for b in range(tokens.shape[0]):
            for t in range(T_MAX):
                keep = _kept(logits[b, t], T, **kw)
                if "top_p" in kw:  # tolerate float32-vs-float64 disagreement right at the p boundary
                    keep |= _kept(logits[b, t], T, top_k=kw.get("top_k", 0), top_p=kw["top_p"] + 1e-5)
                assert keep[tokens[b, t]], (b, t, tokens[b, t])


def test_sample_from_logits_zero_probability_never_drawn():
    """Exact zeros (-inf logits, top-k cut) are never drawn, including at the last vocabulary slot."""
    V = 300  # not a multiple of the block size
    logits = jnp.full((4096, V), -jnp.inf).at[:, 7].set(0.0).at[:, V - 2].set(1.0)
    tok, lp = sample_from_logits(jax.random.key(0), logits, SamplingConfig(max_new_tokens=1))
    tok = np.asarray(tok)
    assert set(tok.tolist()) == {7, V - 2}
    frac = (tok == V - 2).mean()
    assert abs(frac - np.e / (1 + np.e)) < 0.03
    np.testing.assert_allclose(np.asarray(lp)[tok == 7], -np.log1p(np.e), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Validation and errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=0.0), "temperature"),
        (dict(max_new_tokens=4, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=4, top_k=-1), "top_k"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(max_new_tokens=4, pad_token_id=-3), "pad_token_id"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_config_normalises_stop_ids():
    assert SamplingConfig(max_new_tokens=2, stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingConfig(max_new_tokens=2, stop_token_ids=5).stop_token_ids == (5,)
    hash(SamplingConfig(max_new_tokens=2, stop_token_ids=[3]))


def test_errors(tiny, prompts):
    _, config, gd, p = tiny
    ids, mask = prompts
    too_long = SamplingConfig(max_new_tokens=config.max_position_embeddings - TQ + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sample(gd, p, ids, mask, jax.random.key(0), too_long)
    cfg = SamplingConfig(max_new_tokens=2)
    right = np.ascontiguousarray(mask[:, ::-1])
    with pytest.raises(ValueError, match="left-padded"):
        sample(gd, p, ids, right, jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"\[B, Tq\]"):
        sample(gd, p, ids, mask[:, 1:], jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        sample(gd, p, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=2, stop_token_ids=(10_000,)))
    with pytest.raises(ValueError, match=r"^The prompts are empty \(\[5, 0\]\): each prompt needs at least one token") as e:
        sample(gd, p, ids[:, :0], mask[:, :0], jax.random.key(0), cfg)
    assert "\n" not in str(e.value)


def test_result_type(greedy_free_run):
    assert isinstance(greedy_free_run, SampleResult)
    assert greedy_free_run.tokens.shape == (len(LENGTHS), T_MAX)
