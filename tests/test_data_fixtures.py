"""Offline fixtures: the tiny tokenizers, and loading the same data from the other supported forms."""
import numpy as np

from klq_jax.data import PromptDataset, hh, load_split, tldr
from tests.helpers import fixtures


def test_tiny_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    tok = fixtures.make_tiny_tokenizer(tmp_path / "pythia")
    assert (tok.eos_token_id, tok.bos_token_id, tok.eos_token) == (0, 0, "<|endoftext|>")
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(tok) - 1 == 511
    text = "SUBREDDIT: r/cats\n\nTITLE: Help\n\nPOST: My cat, 42 lives.\n\nTL;DR: ok<|endoftext|>"
    ids = tok(text)["input_ids"]
    assert ids[-1] == 0 and tok.decode(ids) == text
    loaded = AutoTokenizer.from_pretrained(tmp_path / "pythia")
    assert loaded(text)["input_ids"] == ids and loaded.pad_token_id == tok.pad_token_id

    gpt2 = fixtures.make_tiny_gpt2_tokenizer(tmp_path / "gpt2")
    assert gpt2.pad_token_id is None and gpt2.eos_token_id == len(gpt2) - 1 == 383
    g_ids = gpt2(text)["input_ids"]
    assert gpt2.decode(g_ids) == text and g_ids != ids and len(g_ids) != len(ids)
    # pairs concatenate with no special tokens, as GPT-2's tokenizer does for (query, answer)
    assert gpt2("\n\nHuman: hi\n\nAssistant:", " hello")["input_ids"] == \
        gpt2("\n\nHuman: hi\n\nAssistant:")["input_ids"] + gpt2(" hello")["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2")(text)["input_ids"] == g_ids


def test_same_rows_from_save_to_disk_and_single_file(tmp_path):
    import datasets

    tok = fixtures.make_tiny_tokenizer()
    d = fixtures.write_tiny_hh(tmp_path / "hub", n=5)
    from_dir = hh.load_hh(tok, "train", name_or_path=d)
    rows = load_split(d, "train", data_dir="helpful-base")
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "saved"))
    from_saved = hh.load_hh(tok, "train", name_or_path=str(tmp_path / "saved"), data_dir=None)
    from_file = hh.load_hh(tok, "train", name_or_path=str(tmp_path / "hub" / "helpful-base" / "train.jsonl.gz"),
                           data_dir=None)
    for other in (from_saved, from_file):
        assert isinstance(other, PromptDataset)
        np.testing.assert_array_equal(other.prompt_ids, from_dir.prompt_ids)
        assert other.prompt_texts == from_dir.prompt_texts and other.references == from_dir.references


def test_left_trim_and_select():
    tok = fixtures.make_tiny_tokenizer()
    ds = PromptDataset(np.array([[7, 7, 7, 1, 2], [7, 7, 3, 4, 5]], np.int32),
                       np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], np.float32), ["a", "b"], ["x", "y"], pad_id=7)
    t = ds.left_trim()
    assert t.prompt_ids.tolist() == [[7, 1, 2], [3, 4, 5]] and t.width == 3
    assert ds.left_trim(multiple_of=4).width == 4
    s = ds.select([1, 1, 0])
    assert s.prompt_texts == ["b", "b", "a"] and s.references == ["y", "y", "x"]
    assert tldr.QUERY_FORMAT.count("{") == 3 and tok is not None


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    import pytest

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((ConnectionError, FileNotFoundError, ValueError), match="local directory"):
        load_split("Anthropic/hh-rlhf", "train", data_dir="helpful-base")
