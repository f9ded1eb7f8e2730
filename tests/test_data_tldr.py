"""TL;DR data: the N+ query format, smart truncation, and both loaders on tiny on-disk datasets."""
import json

import numpy as np
import pytest

from tests.helpers import fixtures
from klq_jax.data import tldr
from klq_jax.data.common import PromptDataset
from klq_jax.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tiny_tokenizer()


def enc(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def left_padded(tok, text, width):
    ids = enc(tok, text)
    return [tok.pad_token_id] * (width - len(ids)) + ids


def nplus_char_loop(tok, subreddit, title, post, length):
    """N+ tldr_dataset.py process_query as plain Python: cut at the last newline, else drop a char."""
    fmt = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    info = dict(subreddit=subreddit, title=title, post=post)
    toks = enc(tok, fmt.format(**info))
    while len(toks) > length:
        i = info["post"].rfind("\n")
        info["post"] = info["post"][:i]  # i = -1 drops one character
        toks = enc(tok, fmt.format(**info))
    return fmt.format(**info), toks


def test_format_query_exact():
    assert tldr.format_query("relationships", "Help me", "Line one.\nLine two.") == (
        "SUBREDDIT: r/relationships\n\nTITLE: Help me\n\nPOST: Line one.\nLine two.\n\nTL;DR:"
    )


POST = "I have been dating my girlfriend.\nShe wants to travel.\nI am not sure what to think."


def test_smart_truncation_cuts_at_last_newlines(tok):
    full = "SUBREDDIT: r/relationships\n\nTITLE: Travel\n\nPOST: " + POST + "\n\nTL;DR:"
    one_cut = ("SUBREDDIT: r/relationships\n\nTITLE: Travel\n\nPOST: I have been dating my girlfriend.\n"
               "She wants to travel.\n\nTL;DR:")
    two_cuts = "SUBREDDIT: r/relationships\n\nTITLE: Travel\n\nPOST: I have been dating my girlfriend.\n\nTL;DR:"
    n_full, n_one, n_two = (len(enc(tok, s)) for s in (full, one_cut, two_cuts))
    assert n_full > n_one > n_two
    # fits: unchanged
    assert tldr.truncate_query(tok, "relationships", "Travel", POST, n_full) == (full, enc(tok, full))
    # one token too many: cut back to the last newline, and only that far
    assert tldr.truncate_query(tok, "relationships", "Travel", POST, n_full - 1) == (one_cut, enc(tok, one_cut))
    assert tldr.truncate_query(tok, "relationships", "Travel", POST, n_one)[0] == one_cut
    # one token less than that: the next newline back
    assert tldr.truncate_query(tok, "relationships", "Travel", POST, n_one - 1) == (two_cuts, enc(tok, two_cuts))
    # both modes agree with N+'s loop while newlines remain
    for mode in ("tokens", "chars"):
        assert tldr.truncate_query(tok, "relationships", "Travel", POST, n_two, no_newline_cut=mode) == \
            nplus_char_loop(tok, "relationships", "Travel", POST, n_two)


def test_no_newline_post_hard_cut(tok):
    post = "I have been dating my girlfriend for two years"
    expected = "SUBREDDIT: r/dating\n\nTITLE: Two years\n\nPOST: I have been dating\n\nTL;DR:"
    budget = len(enc(tok, expected))
    text, ids = tldr.truncate_query(tok, "dating", "Two years", post, budget, no_newline_cut="tokens")
    assert text == expected and ids == enc(tok, expected)
    # 'chars' mode is N+'s one-character loop exactly
    got = tldr.truncate_query(tok, "dating", "Two years", post, budget, no_newline_cut="chars")
    assert got == nplus_char_loop(tok, "dating", "Two years", post, budget)
    assert len(got[1]) <= budget and got[0].startswith(expected[:-len("\n\nTL;DR:")])


def test_title_too_long_returns_none(tok):
    title = "A title that is far too long " * 5
    budget = len(enc(tok, tldr.format_query("x", title, ""))) - 1
    assert tldr.truncate_query(tok, "x", title, "a\nb", budget) is None
    assert tldr.truncate_query(tok, "x", title, "ab", budget, no_newline_cut="chars") is None


def test_raw_loader_exact_prompts_and_drops(tok, tmp_path):
    long_post = "\n".join(fixtures.CORPUS[:12])  # far too long for 96 tokens
    rows = [
        {"id": "a", "subreddit": "cats", "title": "Help", "post": "My cat.", "summary": "cat"},
        {"id": "b", "subreddit": "life", "title": "Long", "post": long_post, "summary": "long post"},
        {"id": "c", "subreddit": "x", "title": "T " * 80, "post": "p", "summary": "too long title"},
    ]
    d = fixtures.write_tldr_raw_rows(tmp_path, {"train": rows, "validation": rows[:1]})
    width = 96
    ds = tldr.load_tldr(tok, "train", name_or_path=d, query_length=width)
    assert isinstance(ds, PromptDataset)
    expected_a = "SUBREDDIT: r/cats\n\nTITLE: Help\n\nPOST: My cat.\n\nTL;DR:"
    # the long post keeps the most leading lines that fit
    expected_b = None
    for k in range(12, 0, -1):
        cand = "SUBREDDIT: r/life\n\nTITLE: Long\n\nPOST: " + "\n".join(fixtures.CORPUS[:k]) + "\n\nTL;DR:"
        if len(enc(tok, cand)) <= width:
            expected_b = cand
            break
    assert expected_b is not None and expected_b.count("\n") < long_post.count("\n") + 6
    assert ds.prompt_texts == [expected_a, expected_b]
    assert ds.prompt_ids.dtype == np.int32 and ds.prompt_ids.shape == (2, width)
    assert ds.prompt_ids.tolist() == [left_padded(tok, expected_a, width), left_padded(tok, expected_b, width)]
    assert ds.prompt_mask.tolist()[0] == [0.0] * (width - len(enc(tok, expected_a))) + [1.0] * len(enc(tok, expected_a))
    assert ds.references == [" cat", " long post"]
    assert ds.dropped == 1 and ds.drop_reasons == {"too_long": 1}
    assert tldr.load_tldr(tok, "validation", name_or_path=d, query_length=width).prompt_texts == [expected_a]


def test_pretokenised_loader_matches_raw_and_repads(tok, tmp_path):
    d = fixtures.write_tiny_tldr(tmp_path, tok, n=6, query_length=96)
    pre = tldr.load_tldr(tok, "train", name_or_path=d, query_length=96)
    raw = tldr.load_tldr(tok, "train", name_or_path=d, query_length=96, source="raw")
    assert pre.prompt_ids.shape == (6, 96)
    np.testing.assert_array_equal(pre.prompt_ids, raw.prompt_ids)
    np.testing.assert_array_equal(pre.prompt_mask, raw.prompt_mask)
    assert pre.prompt_texts == raw.prompt_texts
    # row 0 of the fixture: hand-written summary; reference = " " + summary without the EOS string
    assert pre.references[0] == " girlfriend wants to travel alone for months, not sure how to feel"
    # mask = non-pad tokens, ids decode to the query text
    for ids, m, text in zip(pre.prompt_ids, pre.prompt_mask, pre.prompt_texts):
        assert tok.decode(ids[m > 0]) == text
        assert np.all(ids[m == 0] == tok.pad_token_id)
    # wider: same real tokens, more left padding
    wide = tldr.load_tldr(tok, "train", name_or_path=d, query_length=112)
    np.testing.assert_array_equal(wide.prompt_ids[:, 16:], pre.prompt_ids)
    assert np.all(wide.prompt_ids[:, :16] == tok.pad_token_id)
    # narrower: rows with more real tokens are dropped and counted
    narrow_len = int(pre.lengths.min())
    narrow = tldr.load_tldr(tok, "train", name_or_path=d, query_length=narrow_len)
    assert 0 < len(narrow) == int(np.sum(pre.lengths <= narrow_len)) < 6
    assert narrow.prompt_texts == [t for t, n in zip(pre.prompt_texts, pre.lengths) if n <= narrow_len]
    assert narrow.dropped == 6 - len(narrow) and narrow.drop_reasons == {"too_long": 6 - len(narrow)}
    # the fixture's columns are the N+ schema
    import datasets

    row_ds = datasets.load_dataset(d, split="validation")
    assert {"id", "subreddit", "title", "post", "summary", "query", "query_token", "reference_response",
            "reference_response_token", "reference_response_token_len", "query_reference_response",
            "query_reference_response_token", "query_reference_response_token_response_label",
            "query_reference_response_token_len"} <= set(row_ds.column_names)
    assert row_ds[0]["reference_response"].endswith("<|endoftext|>")


def test_full_size_fixture_has_too_long_posts(tok, tmp_path):
    d = fixtures.write_tiny_tldr_raw(tmp_path, n=4)
    rows = json.loads(json.dumps(__import__("datasets").load_dataset(d, split="train").to_list()))
    lens = [len(enc(tok, tldr.format_query(r["subreddit"], r["title"], r["post"]))) for r in rows]
    assert lens[1] > 512 and lens[3] > 512 and "\n" not in rows[3]["post"]
    ds = tldr.load_tldr(tok, "train", name_or_path=d)
    assert ds.prompt_ids.shape == (4, 512) and ds.dropped == 0
    assert ds.lengths[1] <= 512 and ds.lengths[3] <= 512 and ds.lengths[3] > 400


def test_errors(tok, tmp_path):
    d = fixtures.write_tiny_tldr(tmp_path, tok, n=2, query_length=96)
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        tldr.load_tldr(fixtures.make_tiny_gpt2_tokenizer(), "train", name_or_path=d, query_length=96)
    small = fixtures.make_tiny_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer the ids were made with"):
        tldr.load_tldr(small, "train", name_or_path=d, query_length=96, source="query_token")


def test_query_token_padded_with_another_id_is_refused(tok, tmp_path):
    """Issue data F4: a tokenizer whose pad id is not the dataset's (pad = EOS, as TRL-trained SFT
    tokenizers often are), or right-padded query_token, is refused naming both ids, instead of the
    padding run becoming prompt text."""
    import datasets

    d = fixtures.write_tiny_tldr(tmp_path / "tldr", tok, n=4, query_length=96)
    eos_pad = fixtures.make_tiny_tokenizer()
    eos_pad.pad_token = eos_pad.eos_token
    assert eos_pad.pad_token_id != tok.pad_token_id
    rows = datasets.load_dataset(d, split="train").to_list()
    padded = sum(r["query_token"][:2] == [tok.pad_token_id] * 2 for r in rows)
    assert padded > 0
    with pytest.raises(DataError, match=rf"{padded} of 4 rows of query_token start with a run of id {tok.pad_token_id} "
                                        rf"\('\[PAD\]'\), .* the tokenizer's pad id is {eos_pad.pad_token_id} .*"
                                        r"--task.tldr-source raw"):
        tldr.load_tldr(eos_pad, "train", name_or_path=d, query_length=96)
    raw = tldr.load_tldr(eos_pad, "train", name_or_path=d, query_length=96, source="raw")  # the way out
    assert raw.prompt_texts == tldr.load_tldr(tok, "train", name_or_path=d, query_length=96).prompt_texts
    with_pad = sum(tok.pad_token_id in r["query_token"] for r in rows)
    for r in rows:  # right padding: the same ids, the pad run moved to the end
        real = [i for i in r["query_token"] if i != tok.pad_token_id]
        r["query_token"] = real + [tok.pad_token_id] * (96 - len(real))
    path = str(tmp_path / "right.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError, match=rf"{with_pad} of 4 rows of query_token end with the pad id "
                                        rf"{tok.pad_token_id} \(right-padded\): LEFT-pad them, or .* raw"):
        tldr.load_tldr(tok, "train", name_or_path=path, query_length=96)
    # the command line's way out: --task.tldr-source raw reaches the loader
    import dataclasses

    from experiments import presets, tasks

    task = dataclasses.replace(presets.get("tldr-klq").task, dataset=d, max_prompt_len=96)
    with pytest.raises(DataError, match="--task.tldr-source raw"):
        tasks.load_prompts(task, eos_pad)
    via_task = tasks.load_prompts(dataclasses.replace(task, tldr_source="raw"), eos_pad)
    assert via_task.prompt_texts == raw.prompt_texts
