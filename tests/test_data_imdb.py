"""IMDb data: seeded review-prefix prompts and the review-length filter."""
import numpy as np
import pytest

from tests.helpers import fixtures
from klq_jax.data import imdb


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tiny_tokenizer()


def test_prefix_prompts_exact(tok, tmp_path):
    d = fixtures.write_tiny_imdb(tmp_path, n=9)
    import datasets

    raw = datasets.load_dataset(d, split="train")
    assert raw.features["label"].names == ["neg", "pos"]
    ds = imdb.load_imdb(tok, "train", name_or_path=d, seed=5)
    kept = [r for r in raw if len(r["text"]) > 200]
    assert ds.drop_reasons == {"short_review": 9 - len(kept)} and len(ds) == len(kept) == 6
    assert ds.width == 7 and ds.references is None
    assert ds.extras["label"].tolist() == [r["label"] for r in kept]
    ks = ds.lengths.tolist()
    assert all(2 <= k <= 7 for k in ks)
    for row, k, ids, text in zip(kept, ks, ds.prompt_ids.tolist(), ds.prompt_texts):
        first = tok(row["text"], add_special_tokens=False)["input_ids"][:k]
        assert ids == [tok.pad_token_id] * (7 - k) + first
        assert text == tok.decode(first) and row["text"].startswith(text)
    # same seed -> same prompts; another seed -> other lengths
    again = imdb.load_imdb(tok, "train", name_or_path=d, seed=5)
    np.testing.assert_array_equal(again.prompt_ids, ds.prompt_ids)
    others = [imdb.load_imdb(tok, "train", name_or_path=d, seed=s).lengths.tolist() for s in range(6, 10)]
    assert any(o != ks for o in others)


def test_no_filter_and_splits(tok, tmp_path):
    d = fixtures.write_tiny_imdb(tmp_path, n=6)
    ds = imdb.load_imdb(tok, "unsupervised", name_or_path=d, min_review_chars=None, prompt_length_range=(4, 5))
    assert len(ds) == 6 and ds.dropped == 0 and ds.lengths.tolist() == [4] * 6
    assert ds.extras["label"].tolist() == [-1] * 6
    assert len(imdb.load_imdb(tok, "test", name_or_path=d, min_review_chars=None)) == 3
    with pytest.raises(ValueError, match="half-open"):
        imdb.load_imdb(tok, "train", name_or_path=d, prompt_length_range=(3, 3))


def test_bos_adding_tokenizer_prompts_start_with_bos(tok, tmp_path):
    """Issue data F1: with a tokenizer that prepends a BOS on encode (Llama 3), the prompts are
    TRL's ``tokenizer.encode(review)[:k]``: BOS + the first k-1 review tokens; tokenizers that add
    nothing (the Pythia-like ``tok``) keep the first k review tokens (test_prefix_prompts_exact)."""
    import datasets

    llama = fixtures.make_tiny_llama_tokenizer()
    llama.pad_token = llama.eos_token  # as load_policy_tokenizer(pad_with_eos=True) for Llama 3.2
    assert imdb.prepended_bos(llama) == llama.bos_token_id and imdb.prepended_bos(tok) is None
    d = fixtures.write_tiny_imdb(tmp_path, n=9)
    kept = [r["text"] for r in datasets.load_dataset(d, split="train") if len(r["text"]) > 200]
    ds = imdb.load_imdb(llama, "train", name_or_path=d, seed=5)
    assert ds.width == 7 and len(ds) == len(kept)
    # the lengths k are the same draws as for a tokenizer without BOS; the BOS counts in the k
    assert ds.lengths.tolist() == imdb.load_imdb(tok, "train", name_or_path=d, seed=5).lengths.tolist()
    for text, k, ids, prompt in zip(kept, ds.lengths.tolist(), ds.prompt_ids.tolist(), ds.prompt_texts):
        trl = llama(text)["input_ids"][:k]  # TRL v0.9.6: tokenizer.encode(review)[: input_size()]
        assert trl[0] == llama.bos_token_id and ids == [llama.pad_token_id] * (7 - k) + trl
        assert prompt == llama.decode(trl[1:]) and text.startswith(prompt)


def test_validation_prompts_are_a_fixed_shuffle_of_the_heldout_split(tok, tmp_path, caplog):
    """Issue data F10 + F5: validation prompts are K of a fixed-seed permutation of the held-out
    split, not its first K rows (stanfordnlp/imdb's splits are sorted by label: all neg first);
    asking for more than there are warns with both counts."""
    import dataclasses
    import json
    import logging

    from experiments import presets, tasks

    d = tmp_path / "imdb_sorted"
    d.mkdir()
    long = " ".join(["A long review that goes on and on about the film and its actors."] * 5)
    for split in ("train", "test"):  # label-sorted, as the real parquet files
        rows = [{"text": f"{long} number {i}.", "label": int(i >= 6)} for i in range(12)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = dataclasses.replace(presets.get("imdb-klq").task, dataset=str(d))
    val = tasks.load_validation_prompts(task, tok, 6)
    assert len(val) == 6 and set(val.extras["label"].tolist()) == {0, 1}
    heldout = imdb.load_imdb(tok, "test", name_or_path=str(d), seed=tasks.VALIDATION_SEED)
    order = np.random.default_rng(tasks.VALIDATION_SEED).permutation(12)[:6]
    np.testing.assert_array_equal(val.prompt_ids, heldout.prompt_ids[order])
    with caplog.at_level(logging.WARNING):
        assert len(tasks.load_validation_prompts(task, tok, 100)) == 12
    assert "100 prompts requested (--eval-prompts) but" in caplog.text and "only 12 usable" in caplog.text
