"""Data loaders name the file and the row of what they cannot use (issue 14)."""

import json

import pytest

from klq_jax.data import load_hh, load_imdb, load_tldr
from tests.helpers import fixtures
from klq_jax.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tiny_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tldr_row(**kw):
    return dict(dict(subreddit="cats", title="Help", post="My cat.", summary="cat"), **kw)


def test_tldr_null_or_non_text_fields_are_named_by_row(tok, tmp_path):
    path = _jsonl(tmp_path / "tldr.jsonl", [_tldr_row(), _tldr_row(post=None), _tldr_row()])
    with pytest.raises(DataError, match=r"tldr:.*tldr.jsonl:train: field 'post' is null in row 1 \(1 rows\)"):
        load_tldr(tok, "train", name_or_path=path)
    path = _jsonl(tmp_path / "tldr2.jsonl", [_tldr_row(title=None), _tldr_row(subreddit=None), _tldr_row()])
    with pytest.raises(DataError, match=r"field 'title' is null in row 0, field 'subreddit' is null in row 1 \(2 rows\)"):
        load_tldr(tok, "train", name_or_path=path)


def test_hh_null_chosen_is_named_by_row(tok, tmp_path):
    ok = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."}
    path = _jsonl(tmp_path / "hh.jsonl", [ok, dict(ok, chosen=None), ok])
    with pytest.raises(DataError, match=r"field 'chosen' is null in row 1"):
        load_hh(tok, "train", name_or_path=path, data_dir=None)
    path = _jsonl(tmp_path / "hh2.jsonl", [dict(ok, rejected=i) for i in range(3)])  # a number column
    with pytest.raises(DataError, match=r"hh2.jsonl has values that are not text .*line 1: field 'rejected' is int; .*3 in all"):
        load_hh(tok, "train", name_or_path=path, data_dir=None)


def test_a_column_mixing_text_and_other_values_is_refused_by_line(tok, tmp_path):
    """datasets turns a JSON column that mixes text with other values into the JSON text of every
    value: the good rows' "My cat." would become '"My cat."' (quotes included), silently."""
    path = _jsonl(tmp_path / "tldr.jsonl", [_tldr_row(), _tldr_row(post=5), _tldr_row(), _tldr_row(title=["a"])])
    with pytest.raises(DataError, match=r"tldr.jsonl has values that are not text in text fields \(line 2: "
                                        r"field 'post' is int; line 4: field 'title' is list; 2 in all\)"):
        load_tldr(tok, "train", name_or_path=path)
    ok = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."}
    path = tmp_path / "hh.json"  # one more: a JSON array file, an object among texts
    path.write_text(json.dumps([ok, dict(ok, chosen={"text": "x"}), ok]))
    with pytest.raises(DataError, match=r"element 1: field 'chosen' is dict"):
        load_hh(tok, "train", name_or_path=str(path), data_dir=None)
    good = _jsonl(tmp_path / "good.jsonl", [_tldr_row(), _tldr_row()])
    assert load_tldr(tok, "train", name_or_path=good).prompt_texts[0].endswith("POST: My cat.\n\nTL;DR:")


def test_unreadable_files_are_named(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl is empty"):
        load_tldr(tok, "train", name_or_path=str(empty))
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(_tldr_row()).encode() + b"\n" + '{"subreddit": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl is not UTF-8 text \(line 2"):
        load_tldr(tok, "train", name_or_path=str(latin))
    broken = tmp_path / "broken.jsonl"  # one more: a line that is not JSON
    broken.write_text(json.dumps(_tldr_row()) + "\n" + '{"subreddit": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2 is not valid JSON"):
        load_tldr(tok, "train", name_or_path=str(broken))


def test_an_empty_result_names_the_filter_counts(tok, tmp_path):
    d = fixtures.write_tiny_tldr(tmp_path / "tldr", tok, n=4, query_length=128)
    with pytest.raises(DataError, match=r"no prompt left of \d+ rows \(dropped \{'too_long': \d+\}"):
        load_tldr(tok, "validation", name_or_path=d, query_length=2)
    hh = fixtures.write_tiny_hh(tmp_path / "hh", n=6)
    with pytest.raises(DataError, match=r"no prompt left of \d+ rows after filtering \(dropped \{.*'too_long': \d+"):
        load_hh(tok, "train", name_or_path=hh, max_prompt_length=1)
    imdb = fixtures.write_tiny_imdb(tmp_path / "imdb", n=6)
    with pytest.raises(DataError, match=r"'short_review': \d+"):
        load_imdb(tok, "train", name_or_path=imdb, min_review_chars=10**6)


def test_a_single_file_or_saved_dataset_has_one_split(tok, tmp_path):
    """Issue data F2: a single data file (or a save_to_disk directory of one Dataset) has one split,
    'train'; asking it for another (validation) is refused instead of returning the training rows."""
    import dataclasses

    import datasets

    from experiments import presets, tasks

    rows = [_tldr_row(post=f"My cat number {i}.") for i in range(3)]
    path = _jsonl(tmp_path / "tldr.jsonl", rows)
    assert len(load_tldr(tok, "train", name_or_path=path)) == 3
    for split in ("validation", "test", "trian"):
        with pytest.raises(DataError, match=rf"tldr.jsonl is a single data file, which has one split \('train'\), "
                                            rf"not '{split}': pass a directory with one data file per split"):
            load_tldr(tok, split, name_or_path=path)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(saved)
    assert len(load_tldr(tok, "train", name_or_path=saved)) == 3
    with pytest.raises(DataError, match=r"saved is a save_to_disk directory of one Dataset, which has one split"):
        load_tldr(tok, "validation", name_or_path=saved)
    # validation through the task builder: refused, not the training rows
    task = dataclasses.replace(presets.get("tldr-klq").task, dataset=path, max_prompt_len=128)
    with pytest.raises(DataError, match=r"not 'validation'"):
        tasks.load_validation_prompts(task, tok, 2)


def test_missing_split_subset_path_and_filter_errors_say_what_to_set(tok, tmp_path):
    """Issue data F3: a missing split names the splits and the flags; a missing subset names the
    subsets and --task.dataset-subset; a mistyped local path says it does not exist; an empty result
    advises raising the token budget only when rows were too long."""
    import dataclasses

    from experiments import presets, tasks
    from klq_jax.errors import SourceNotFoundError

    hh = fixtures.write_tiny_hh(tmp_path / "hh", n=6)
    with pytest.raises(DataError, match=r"hh \(subset helpful-base\) has splits \['train', 'test'\], not 'validation': "
                                        r"set --task.split \(training\) / --task.eval-split \(validation\) to one of them\.$"):
        load_hh(tok, "validation", name_or_path=hh)
    with pytest.raises(DataError, match=r"hh has no subset folder 'harmless-base': set --task.dataset-subset to "
                                        r"one of \['helpful-base'\]\.$"):
        load_hh(tok, "train", name_or_path=hh, data_dir="harmless-base")
    imdb = fixtures.write_tiny_imdb(tmp_path / "imdb", n=6)
    with pytest.raises(DataError, match=r"has splits \['train', 'test', 'unsupervised'\], not 'validation'"):
        load_imdb(tok, "validation", name_or_path=imdb)
    task = dataclasses.replace(presets.get("hh-klq").task, dataset=str(tmp_path / "no-such" / "hh-rlhf"))
    with pytest.raises(SourceNotFoundError, match=r"^No such path: dataset '.*no-such/hh-rlhf'; fix the path"):
        tasks.check_sources(task)
    multi = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
             "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}
    only_multi = fixtures.write_hh_rows(tmp_path / "multi", {"train": [multi, multi]})
    with pytest.raises(DataError, match=r"dropped \{'multi_turn': 2\}\); keep multi-turn prompts \(single_turn=False, "
                                        r"--task.no-hh-single-turn\)\.$") as info:
        load_hh(tok, "train", name_or_path=only_multi)
    assert "token budget" not in str(info.value)
    with pytest.raises(DataError, match=r"dropped \{'short_review': 6\}\); lower min_review_chars=1000000") as info:
        load_imdb(tok, "train", name_or_path=imdb, min_review_chars=10**6)
    assert "token budget" not in str(info.value)
