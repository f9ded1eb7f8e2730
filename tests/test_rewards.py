"""Reward-model scoring: same tokenizer (ids straight in) and cross-tokenizer (decode, re-tokenise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klq_jax import rewards
from tests.helpers import fixtures
from klq_jax.data.common import left_pad
from klq_jax.models import gpt2, gpt_neox


@pytest.fixture(scope="module")
def toks():
    return fixtures.make_tiny_tokenizer(), fixtures.make_tiny_gpt2_tokenizer()


def _enc(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


# -------------------------------------------------------------------------- same tokenizer


def test_same_tokenizer_scores_equal_unpadded_sequences():
    cfg = gpt_neox.GPTNeoXConfig.tiny(lm_head=False, score_head=True)
    gd, p = gpt_neox.init(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    B, Tq, Tr = 5, 6, 4
    plens, rlens = [6, 3, 1, 4, 2], [4, 2, 1, 3, 4]
    pids = rng.integers(1, 64, (B, Tq)).astype(np.int32)
    pmask = (np.arange(Tq)[None] >= Tq - np.array(plens)[:, None]).astype(np.float32)
    rids = rng.integers(1, 64, (B, Tr)).astype(np.int32)
    rmask = (np.arange(Tr)[None] < np.array(rlens)[:, None]).astype(np.float32)
    pids = np.where(pmask > 0, pids, 63)  # pad ids are irrelevant: the mask decides
    rids = np.where(rmask > 0, rids, 63)
    got = np.asarray(rewards.make_rm_reward_fn(gd, p, micro_batch_size=2)(pids, pmask, rids, rmask))
    ref_fn = jax.jit(lambda seq: gpt_neox.apply(gd, p, seq, jnp.ones_like(seq)).scores[0])
    for b in range(B):
        seq = np.concatenate([pids[b][pmask[b] > 0], rids[b][rmask[b] > 0]])[None]
        ref = float(ref_fn(seq))
        assert abs(got[b] - ref) <= 1e-5
    assert np.std(got) > 1e-3


def test_same_tokenizer_rows_that_end_before_the_last_prompt_slot():
    """The score is computed from the last prompt slot on (``queries_from``): a row whose x ⧺ y ends
    earlier (a right-padded prompt with an empty response) is refused by name, and a DeviceReward
    called on one gives NaN rather than a padding slot's score; an empty prompt (Tq = 0) scores the
    response alone."""
    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(lm_head=False, score_head=True), jax.random.key(3))
    pids, pmask = np.array([[5, 6, 0], [0, 5, 6]]), np.array([[1, 1, 0], [0, 1, 1]])
    rids, rmask = np.zeros((2, 2), np.int32), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"rows \[0\].*left-pad"):
        rewards.reward_model_scores(gd, p, pids, pmask, rids, rmask)
    got = np.asarray(rewards.make_rm_reward_fn(gd, p)(pids, pmask, rids, rmask))
    ref = float(gpt_neox.apply(gd, p, jnp.array([[5, 6]]), jnp.ones((1, 2))).scores[0])
    assert np.isnan(got[0]) and abs(got[1] - ref) <= 1e-5
    resp, rm = np.array([[5, 6], [7, 0]]), np.array([[1.0, 1.0], [1.0, 0.0]])
    got = np.asarray(rewards.reward_model_scores(gd, p, np.zeros((2, 0), np.int32), np.zeros((2, 0)), resp, rm))
    assert abs(got[0] - ref) <= 1e-5
    assert abs(got[1] - float(gpt_neox.apply(gd, p, jnp.array([[7]]), jnp.ones((1, 1))).scores[0])) <= 1e-5


def test_same_tokenizer_needs_score_head():
    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(), jax.random.key(0))
    with pytest.raises(ValueError, match="score head"):
        rewards.make_rm_reward_fn(gd, p)


# -------------------------------------------------------------------------- cross tokenizer

Q1 = "\n\nHuman: What is the capital of France?\n\nAssistant:"
A1 = " The capital of France is Paris."
Q2 = "\n\nHuman: Why is the sky blue?\n\nAssistant:"
A2_FULL = " Sunlight is scattered by the molecules in the air."
Q3 = "\n\nHuman: How do I bake a loaf of bread at home?\n\nAssistant:"


def _rollout_batch(ptok, T_max):
    """Row 0 stopped on EOS, row 1 truncated at T_max, row 2 stopped at once (empty reply),
    row 3 a non-special stop token (a period) ending the reply."""
    eos = ptok.eos_token_id
    pad = ptok.pad_token_id
    a2 = _enc(ptok, A2_FULL)[:T_max]
    assert len(_enc(ptok, A2_FULL)) > T_max
    period = _enc(ptok, ".")
    assert len(period) == 1
    a4 = _enc(ptok, " The capital of France is Paris")
    responses = [_enc(ptok, A1) + [eos], a2, [eos], a4 + period]
    assert all(len(r) <= T_max for r in responses)
    prompts = [_enc(ptok, q) for q in (Q1, Q2, Q3, Q1)]
    pids, pmask = left_pad(prompts, max(map(len, prompts)), pad)
    rids = np.full((4, T_max), pad, np.int32)
    rmask = np.zeros((4, T_max), np.float32)
    for i, r in enumerate(responses):
        rids[i, : len(r)] = r
        rmask[i, : len(r)] = 1
    a2_text = ptok.decode(a2)
    expected_pairs = [(Q1, A1), (Q2, a2_text), (Q3, ""), (Q1, " The capital of France is Paris")]
    return pids, pmask, rids, rmask, expected_pairs, (eos, period[0])


def test_cross_tokenizer_rm_sees_exact_text_and_ids(toks):
    ptok, rtok = toks
    assert ptok.get_vocab() != rtok.get_vocab()
    T_max = 12
    pids, pmask, rids, rmask, pairs, stops = _rollout_batch(ptok, T_max)
    # the truncated reply really is cut mid-sentence, and the two tokenizers disagree on the ids
    assert pairs[1][1] != A2_FULL and A2_FULL.startswith(pairs[1][1])
    assert _enc(ptok, Q1) != _enc(rtok, Q1)

    seen = []

    def fake_score(ids, mask):  # records what the RM receives; score = a row checksum
        ids, mask = np.asarray(ids), np.asarray(mask)
        seen.append((ids.copy(), mask.copy()))
        return (ids * mask * np.arange(1, ids.shape[1] + 1)).sum(1).astype(np.float32)

    fn = rewards.CrossTokenizerRewardFn(
        fake_score, ptok, rtok, stop_token_ids=stops, max_length=256, micro_batch_size=3, min_bucket=8
    )
    scores = np.asarray(fn(pids, pmask, rids, rmask))
    exp_ids = [list(rtok(q, a)["input_ids"]) for q, a in pairs]
    assert exp_ids[2] == list(rtok(Q3)["input_ids"])  # the EOS-only reply adds nothing
    assert fn.last_inputs.prompts == [q for q, _ in pairs]
    assert fn.last_inputs.responses == [a for _, a in pairs]
    assert fn.last_inputs.token_ids == exp_ids
    # every call got exactly micro_batch_size rows with a power-of-two width
    assert [s[0].shape[0] for s in seen] == [3, 3]
    assert all(w & (w - 1) == 0 and w >= 8 for w in (s[0].shape[1] for s in seen))
    # the rows the RM saw (right-padded), mapped back to the batch order by their scores
    got_rows = [ids[m > 0].tolist() for ids, mask in seen for ids, m in zip(ids, mask)]
    for b, e in enumerate(exp_ids):
        assert e in got_rows
        w = np.arange(1, len(e) + 1)
        assert scores[b] == pytest.approx(float((np.array(e) * w).sum()))
    for ids, mask in seen:  # right padding: real tokens first
        assert np.all(np.diff(mask, axis=1) <= 0)


def test_cross_tokenizer_left_truncation_is_counted(toks, caplog):
    ptok, rtok = toks
    pids, pmask, rids, rmask, pairs, stops = _rollout_batch(ptok, 12)
    fn = rewards.CrossTokenizerRewardFn(
        lambda ids, mask: np.zeros(ids.shape[0], np.float32), ptok, rtok, stop_token_ids=stops,
        max_length=20, micro_batch_size=4,
    )
    with caplog.at_level("WARNING", logger="klq_jax.rewards"):
        fn(pids, pmask, rids, rmask)
    full = [list(rtok(q, a)["input_ids"]) for q, a in pairs]
    assert fn.last_inputs.token_ids == [f[-20:] for f in full]
    n_long = sum(len(f) > 20 for f in full)
    assert n_long >= 2 and fn.num_truncated == n_long == fn.last_inputs.num_truncated
    assert "truncated from the left" in caplog.text


def test_cross_tokenizer_gpt2_scores_match_unpadded_rows(toks):
    """The real jitted GPT-2 scorer: bucketing, padding side and batching do not change a score."""
    ptok, rtok = toks
    cfg = gpt2.GPT2Config.tiny(vocab_size=len(rtok), n_positions=64)
    gd, p = gpt2.init(cfg, jax.random.key(1))
    pids, pmask, rids, rmask, pairs, stops = _rollout_batch(ptok, 12)
    ref_fn = jax.jit(lambda ids: gpt2.score(gd, p, ids, jnp.ones_like(ids))[0])
    out = {}
    for side in ("right", "left"):
        fn = rewards.make_cross_tokenizer_reward_fn(
            gd, p, ptok, rtok, stop_token_ids=stops, micro_batch_size=3, padding_side=side
        )
        assert fn.max_length == 64
        out[side] = np.asarray(fn(pids, pmask, rids, rmask))
    for b, (q, a) in enumerate(pairs):
        ids = np.array([rtok(q, a)["input_ids"]])
        ref = float(ref_fn(ids))
        assert abs(out["right"][b] - ref) <= 1e-4 and abs(out["left"][b] - ref) <= 1e-4
    assert np.std(out["right"]) > 1e-3


def test_input_formats(toks):
    ptok, rtok = toks
    pids, pmask, rids, rmask, pairs, stops = _rollout_batch(ptok, 12)
    x = rewards.build_rm_inputs(ptok, rtok, pids, pmask, rids, rmask, stop_token_ids=stops,
                                input_format="concat", max_length=512)
    assert x.token_ids == [list(rtok(q + a)["input_ids"]) for q, a in pairs]
    y = rewards.build_rm_inputs(ptok, rtok, pids, pmask, rids, rmask, stop_token_ids=stops,
                                input_format=lambda q, a: f"{q}|{a}", max_length=512)
    assert y.token_ids[0] == list(rtok(f"{Q1}|{A1}")["input_ids"])
    # without the period as a stop token, row 3 keeps it
    _, resp = rewards.decode_rollout_texts(ptok, pids, pmask, rids, rmask, stop_token_ids=(stops[0],))
    assert resp[3] == " The capital of France is Paris." and resp[0] == A1


def test_bucket_and_pad_helpers():
    assert [rewards.bucket_width(n, min_bucket=16) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    assert rewards.bucket_width(100, max_length=80 + 20) == 100
    with pytest.raises(ValueError):
        rewards.bucket_width(101, max_length=100)
    ids, mask = rewards.pad_rows([[1, 2, 3], [4]], 4, num_rows=3, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]



def test_concat_keeps_a_character_split_at_the_prompt_boundary(toks):
    """Issue data F6: an IMDb prompt cut inside a multi-byte character (byte-level BPE) reaches a
    "concat" reward model as the text the policy wrote, not as two U+FFFD halves."""
    ptok, rtok = toks
    text = "\u4e2d\u6587\u8bc4\u8bba"  # 中文评论: several byte-level tokens per character
    ids = _enc(ptok, text)
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in ptok.decode(ids[:k]))
    p, r = ids[:cut], ids[cut:]
    q, a = rewards.decode_rollout_texts(ptok, [p], [[1] * len(p)], [r], [[1] * len(r)])
    assert "\ufffd" in q[0] + a[0]  # the separate texts, as shown in samples
    x = rewards.build_rm_inputs(ptok, rtok, [p], [[1] * len(p)], [r], [[1] * len(r)],
                                input_format="concat", max_length=512)
    assert x.token_ids == [list(rtok(text)["input_ids"])]
