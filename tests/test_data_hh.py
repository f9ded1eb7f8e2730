"""Anthropic-HH data: prompt extraction, the single-turn filter, the budget, on hand-written rows."""
import pytest

from tests.helpers import fixtures
from klq_jax.data import hh


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tiny_tokenizer()


SINGLE = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: No idea.",
}
SHARED_START = {  # both replies start with " The capital of France is"
    "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Lyon.",
}
MULTI = {
    "chosen": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke.\n\nAssistant: Why did the cat sit?",
    "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke.\n\nAssistant: No.",
}
IDENTICAL = {
    "chosen": "\n\nHuman: Thanks!\n\nAssistant: You are welcome.",
    "rejected": "\n\nHuman: Thanks!\n\nAssistant: You are welcome.",
}
EARLY = {  # the transcripts part in the second Human turn
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: See you\n\nAssistant: Ok",
}
NO_ASSISTANT = {"chosen": "\n\nHuman: A", "rejected": "\n\nHuman: B"}
LONG = {
    "chosen": "\n\nHuman: " + " ".join(fixtures.CORPUS) + "\n\nAssistant: Ok.",
    "rejected": "\n\nHuman: " + " ".join(fixtures.CORPUS) + "\n\nAssistant: No.",
}


def test_extract_prompt_exact():
    assert hh.extract_prompt(SINGLE["chosen"], SINGLE["rejected"]) == (
        "\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour and water.")
    assert hh.extract_prompt(SHARED_START["chosen"], SHARED_START["rejected"]) == (
        "\n\nHuman: What is the capital of France?\n\nAssistant:", " The capital of France is Paris.")
    assert hh.extract_prompt(MULTI["chosen"], MULTI["rejected"]) == (
        "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke.\n\nAssistant:",
        " Why did the cat sit?")
    assert hh.extract_prompt(IDENTICAL["chosen"], IDENTICAL["rejected"]) == (
        "\n\nHuman: Thanks!\n\nAssistant:", " You are welcome.")
    assert hh.extract_prompt(NO_ASSISTANT["chosen"], NO_ASSISTANT["rejected"]) is None
    assert hh.num_human_turns("\n\nHuman: Hi!\n\nAssistant:") == 1
    assert hh.num_human_turns(hh.extract_prompt(MULTI["chosen"], MULTI["rejected"])[0]) == 2


def _left_padded(tok, text, width):
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return [tok.pad_token_id] * (width - len(ids)) + ids


def test_loader_single_turn_filter_and_budget(tok, tmp_path):
    rows = [SINGLE, MULTI, SHARED_START, EARLY, NO_ASSISTANT, LONG, IDENTICAL]
    d = fixtures.write_hh_rows(tmp_path, {"train": rows, "test": [SINGLE]})
    budget = 64
    assert len(tok(LONG["chosen"])["input_ids"]) > budget
    ds = hh.load_hh(tok, "train", name_or_path=d, max_prompt_length=budget)
    p_single = "\n\nHuman: How do I bake bread?\n\nAssistant:"
    p_shared = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    p_ident = "\n\nHuman: Thanks!\n\nAssistant:"
    assert ds.prompt_texts == [p_single, p_shared, p_ident]
    assert ds.references == [" Mix flour and water.", " The capital of France is Paris.", " You are welcome."]
    assert ds.drop_reasons == {"multi_turn": 1, "diverges_early": 1, "no_assistant_turn": 1, "too_long": 1}
    assert ds.dropped == 4
    width = max(len(tok(p)["input_ids"]) for p in ds.prompt_texts)
    assert ds.width == width
    assert ds.prompt_ids.tolist() == [_left_padded(tok, p, width) for p in ds.prompt_texts]
    assert ds.prompt_mask.sum(1).tolist() == [len(tok(p)["input_ids"]) for p in ds.prompt_texts]

    multi = hh.load_hh(tok, "train", name_or_path=d, max_prompt_length=budget, single_turn=False,
                       pad_to="budget")
    p_multi = "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert multi.prompt_texts == [p_single, p_multi, p_shared, p_ident]
    assert multi.references[1] == " Why did the cat sit?"
    assert multi.drop_reasons == {"diverges_early": 1, "no_assistant_turn": 1, "too_long": 1}
    assert multi.prompt_ids.shape == (4, budget)
    assert multi.prompt_ids.tolist()[1] == _left_padded(tok, p_multi, budget)

    test = hh.load_hh(tok, "test", name_or_path=d)
    assert test.prompt_texts == [p_single] and test.dropped == 0


def test_tiny_fixture_and_other_subset(tok, tmp_path):
    d = fixtures.write_tiny_hh(tmp_path / "a", n=10)
    ds = hh.load_hh(tok, "train", name_or_path=d)
    # rows 2 and 7 are multi-turn, rows 3 and 8 longer than 512 tokens
    assert ds.drop_reasons == {"multi_turn": 2, "too_long": 2} and len(ds) == 6
    assert all(p.count("\n\nHuman:") == 1 and p.endswith("\n\nAssistant:") for p in ds.prompt_texts)
    assert all(r.startswith(" ") for r in ds.references)
    d2 = fixtures.write_tiny_hh(tmp_path / "b", n=5, data_dir="harmless-base")
    assert len(hh.load_hh(tok, "test", name_or_path=d2, data_dir="harmless-base")) == 2


def test_no_pad_tokenizer_error(tmp_path):
    d = fixtures.write_hh_rows(tmp_path, {"train": [SINGLE]})
    with pytest.raises(ValueError, match="no pad token"):
        hh.load_hh(fixtures.make_tiny_gpt2_tokenizer(), "train", name_or_path=d)


def test_flat_copy_with_subset_none_and_multi_turn_switch(tok, tmp_path):
    """Issue data F9: --task.dataset-subset None reads a flat local copy's own split files (the
    preset's helpful-base is refused naming that way out); F7: --task.no-hh-single-turn keeps
    multi-turn conversations."""
    import dataclasses

    from experiments import presets, tasks
    from klq_jax.errors import DataError

    rows = {"train": [SINGLE, MULTI, SHARED_START], "test": [SINGLE]}
    hub = fixtures.write_hh_rows(tmp_path / "hub", rows)
    flat = fixtures.write_hh_rows(tmp_path / "flat", rows, data_dir="")
    preset = dataclasses.replace(presets.get("hh-klq").task, dataset=flat, max_prompt_len=64)
    with pytest.raises(DataError, match=r"flat has no subset folder 'helpful-base': set --task.dataset-subset "
                                        r"to None \(its own data files\)\.$"):
        tasks.load_prompts(preset, tok)
    task = dataclasses.replace(preset, dataset_subset=None)
    expected = hh.load_hh(tok, "train", name_or_path=hub, max_prompt_length=64)
    got = tasks.load_prompts(task, tok)
    assert got.prompt_texts == expected.prompt_texts and got.drop_reasons == {"multi_turn": 1}
    assert tasks.load_prompts(dataclasses.replace(task, dataset=hub), tok).prompt_texts == expected.prompt_texts
    multi = tasks.load_prompts(dataclasses.replace(task, hh_single_turn=False), tok)
    assert multi.prompt_texts == [hh.extract_prompt(r["chosen"], r["rejected"])[0] for r in rows["train"]]
    assert multi.prompt_texts[1].count("\n\nHuman:") == 2 and multi.dropped == 0
