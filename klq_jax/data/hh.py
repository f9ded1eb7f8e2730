"""Anthropic-HH single-turn dialogue prompts (paper §5: Anthropic-HH, Bai et al. 2022).

Source: ``Anthropic/hh-rlhf``, one subset per ``data_dir`` (``helpful-base``, ``harmless-base``,
``helpful-online``, ``helpful-rejection-sampled``, ``red-team-attempts``), files
``{data_dir}/train.jsonl.gz`` and ``{data_dir}/test.jsonl.gz``, so splits ``train`` and ``test``
(helpful-base: 43,835 / 2,354 rows). Columns ``chosen`` and ``rejected`` are whole transcripts
``"\\n\\nHuman: ...\\n\\nAssistant: ...[\\n\\nHuman: ...\\n\\nAssistant: ...]"`` that differ only in the
last Assistant reply (rlhf_facts.md §3).

Prompt extraction (as TRL's ``examples/datasets/hh-rlhf-helpful-base.py``, rlhf_facts.md §3):

1. take the longest common prefix of ``chosen`` and ``rejected`` (it may run into the reply when
   both replies start alike);
2. cut it back to end right after its last ``"\\n\\nAssistant:"``. The prompt ends with
   ``"\\n\\nAssistant:"`` **without** the trailing space: the space belongs to the reply, which begins
   ``" ..."``. This is the query format of the HH reward model ``Ray2333/gpt2-large-helpful-reward_model``
   (``q = "\\n\\nHuman: ...\\n\\nAssistant:"``, ``a = reply``; rlhf_facts.md §4) and keeps the space
   attached to the first reply word, as byte-level BPE tokenises it (``"Ġword"``).
3. the reference (for evaluation) is the chosen reply, ``chosen[len(prompt):]`` (starts with ``" "``).

Filters, each counted in ``PromptDataset.drop_reasons`` and logged:

* ``"no_assistant_turn"``: the common prefix has no ``"\\n\\nAssistant:"``;
* ``"diverges_early"``: the chosen reply itself contains ``"\\n\\nHuman:"`` (the transcripts part
  before their last turn, so the prompt would not be the whole conversation);
* ``"multi_turn"``: with ``single_turn=True`` (the paper's setting, the default) a prompt must have
  exactly one ``"\\n\\nHuman:"`` turn; ``single_turn=False`` keeps multi-turn prompts;
* ``"too_long"``: prompts of more than ``max_prompt_length`` tokens.

Prompts are encoded without special tokens and LEFT-padded with the pad id, to the longest kept
prompt (``pad_to="longest"``, the default: single-turn HH prompts are short) or to
``max_prompt_length`` (``pad_to="budget"``, one width for every split).

Example (offline):

    >>> import tempfile
    >>> from klq_jax.data import hh
    >>> tok = fixtures.make_tiny_tokenizer()
    >>> d = fixtures.write_tiny_hh(tempfile.mkdtemp(), n=6)
    >>> ds = hh.load_hh(tok, "train", name_or_path=d)
    >>> ds.prompt_texts[0].startswith("\\n\\nHuman:"), ds.prompt_texts[0].endswith("\\n\\nAssistant:")
    (True, True)
"""

from __future__ import annotations

import os
from typing import Literal

from klq_jax.data.common import (
    PromptDataset,
    check_text_columns,
    encode_texts,
    load_split,
    prompt_dataset_from_tokens,
    read_columns,
    require_pad_id,
)

__all__ = ["HH_DATASET", "HUMAN", "ASSISTANT", "extract_prompt", "num_human_turns", "load_hh"]

HH_DATASET = "Anthropic/hh-rlhf"
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def extract_prompt(chosen: str, rejected: str) -> tuple[str, str] | None:
    """``(prompt, chosen_reply)`` of one hh-rlhf row, or None when no Assistant turn is shared.

    The prompt is the longest common prefix of the two transcripts cut back to end with the last
    ``"\\n\\nAssistant:"`` (no trailing space); ``chosen_reply = chosen[len(prompt):]``.

    Example:
      >>> extract_prompt("\\n\\nHuman: Hi?\\n\\nAssistant: Yes, hello.",
      ...                "\\n\\nHuman: Hi?\\n\\nAssistant: Yes, go away.")
      ('\\n\\nHuman: Hi?\\n\\nAssistant:', ' Yes, hello.')
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        return None
    prompt = common[: cut + len(ASSISTANT)]
    return prompt, chosen[len(prompt):]


def num_human_turns(prompt: str) -> int:
    """Number of ``"\\n\\nHuman:"`` turns in a transcript.

    Example:
      >>> num_human_turns("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:")
      2
    """
    return prompt.count(HUMAN)


def load_hh(
    tokenizer,
    split: str = "train",
    *,
    name_or_path: str = HH_DATASET,
    data_dir: str | None = "helpful-base",
    data_files=None,
    max_prompt_length: int = 512,
    single_turn: bool = True,
    pad_to: Literal["longest", "budget"] = "longest",
    max_rows: int | None = None,
) -> PromptDataset:
    """HH prompts as a :class:`PromptDataset` (see the module docstring for the rules).

    Args:
      tokenizer: the policy's tokenizer, with a pad token.
      split: ``"train"`` or ``"test"`` (hh-rlhf has no validation split).
      name_or_path: hub name, local directory in the hub layout, saved dataset, or data file (a
        single file or saved Dataset has one split, "train": see :func:`~klq_jax.data.load_split`).
      data_dir: the subset (``"helpful-base"``); None for all subsets or a single local file.
      data_files: passed to ``datasets.load_dataset``.
      max_prompt_length: prompts with more tokens are dropped (counted as ``"too_long"``).
      single_turn: keep only prompts with exactly one Human turn (the paper's setting).
      pad_to: ``"longest"`` (width = longest kept prompt) or ``"budget"`` (width = max_prompt_length).
      max_rows: use only the first ``max_rows`` rows of the split.

    Returns:
      A PromptDataset; ``references`` are the chosen replies.

    Example: see the module docstring.
    """
    if pad_to not in ("longest", "budget"):
        raise ValueError(f"pad_to must be 'longest' or 'budget', got {pad_to!r}.")
    pad_id = require_pad_id(tokenizer)
    rows = load_split(name_or_path, split, data_dir=data_dir, data_files=data_files,
                      text_columns=("chosen", "rejected"))
    if max_rows is not None:
        rows = rows.select(range(min(int(max_rows), len(rows))))
    missing = {"chosen", "rejected"} - set(rows.column_names)
    if missing:
        raise ValueError(f"hh-rlhf rows need columns chosen/rejected; {name_or_path} lacks {sorted(missing)}.")
    reasons = {"no_assistant_turn": 0, "diverges_early": 0, "multi_turn": 0}
    prompts, replies = [], []
    cols = read_columns(rows, ["chosen", "rejected"])
    check_text_columns(cols, f"hh:{name_or_path}/{data_dir or ''}:{split}")
    for chosen, rejected in zip(cols["chosen"], cols["rejected"]):
        out = extract_prompt(chosen, rejected)
        if out is None:
            reasons["no_assistant_turn"] += 1
            continue
        prompt, reply = out
        if HUMAN in reply:
            reasons["diverges_early"] += 1
            continue
        if single_turn and num_human_turns(prompt) != 1:
            reasons["multi_turn"] += 1
            continue
        prompts.append(prompt)
        replies.append(reply)
    token_lists = encode_texts(tokenizer, prompts)
    return prompt_dataset_from_tokens(
        token_lists,
        prompts,
        replies,
        pad_id=pad_id,
        max_length=max_prompt_length,
        width=max_prompt_length if pad_to == "budget" else None,
        drop_reasons=reasons,
        name=f"hh:{name_or_path}/{data_dir or ''}:{split}",
        remedies={"multi_turn": "keep multi-turn prompts (single_turn=False, --task.no-hh-single-turn)"},
    )
