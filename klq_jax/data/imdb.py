"""IMDb positive-sentiment prompts (the paper's App. D IMDb task; the old TRL sentiment example).

Source: ``stanfordnlp/imdb``, config ``plain_text``, splits ``train`` (25k), ``test`` (25k) and
``unsupervised`` (50k, label -1); columns ``text`` (str) and ``label`` (ClassLabel 0=neg, 1=pos)
(rlhf_facts.md §3).

Prompts follow the old TRL example (huggingface/trl@v0.9.6 ``examples/scripts/ppo.py``; rlhf_facts.md
§3): keep reviews of more than ``min_review_chars`` characters (TRL: ``len(review) > 200``) and keep
the first ``k`` tokens of ``tokenizer.encode(review)``, with ``k`` drawn per review from
``range(*prompt_length_range)`` (TRL's ``LengthSampler(2, 8)``: ``np.random.choice(range(2, 8))``, so
2..7 tokens; the range is half-open). TRL encodes with special tokens: a tokenizer that prepends a
BOS on encode (Llama 3: ``<|begin_of_text|>``; decided per tokenizer: ``tokenizer("x")`` starts with
``bos_token_id`` and ``tokenizer("x", add_special_tokens=False)`` does not) gives prompts
``[BOS] + the first k-1 review tokens`` (the BOS counts in the ``k``); GPT-2 / Pythia tokenizers add
nothing, so there the prompt is the first ``k`` review tokens. Here the draws come from
``np.random.default_rng(seed)`` in row order, so the prompts are a pure function of (dataset,
tokenizer, seed). The prompt text is the decoded review tokens (without the BOS); prompts are
LEFT-padded to ``max(range) - 1`` tokens. The review labels go to ``extras["label"]``; there are no
references.

Example (offline):

    >>> import tempfile
    >>> from klq_jax.data import imdb
    >>> tok = fixtures.make_tiny_tokenizer()
    >>> d = fixtures.write_tiny_imdb(tempfile.mkdtemp(), n=6)
    >>> ds = imdb.load_imdb(tok, "train", name_or_path=d, seed=0)
    >>> ds.width, bool(((ds.lengths >= 2) & (ds.lengths <= 7)).all())
    (7, True)
"""

from __future__ import annotations

import numpy as np

from klq_jax.data.common import (
    PromptDataset,
    check_text_columns,
    encode_texts,
    load_split,
    prompt_dataset_from_tokens,
    read_columns,
    require_pad_id,
)

__all__ = ["IMDB_DATASET", "load_imdb", "prepended_bos"]

IMDB_DATASET = "stanfordnlp/imdb"


def prepended_bos(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` prepends when encoding with special tokens (Llama 3's
    ``<|begin_of_text|>``), or None when it adds none (GPT-2, Pythia).

    Example:
      >>> prepended_bos(fixtures.make_tiny_tokenizer()) is None, prepended_bos(fixtures.make_tiny_llama_tokenizer())
      (True, 398)
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = list(tokenizer("x")["input_ids"])
    without = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return int(bos) if with_special[:1] == [bos] and without[:1] != [bos] else None


def load_imdb(
    tokenizer,
    split: str = "train",
    *,
    name_or_path: str = IMDB_DATASET,
    data_dir: str | None = None,
    data_files=None,
    prompt_length_range: tuple[int, int] = (2, 8),
    min_review_chars: int | None = 200,
    seed: int = 0,
    max_rows: int | None = None,
) -> PromptDataset:
    """IMDb review-prefix prompts as a :class:`PromptDataset` of width ``prompt_length_range[1] - 1``.

    Args:
      tokenizer: the policy's tokenizer, with a pad token.
      split: ``"train"``, ``"test"`` or ``"unsupervised"``.
      name_or_path: hub name, local directory in the hub layout, saved dataset, or data file (a
        single file or saved Dataset has one split, "train": see :func:`~klq_jax.data.load_split`).
      data_dir, data_files: passed to ``datasets.load_dataset``.
      prompt_length_range: half-open ``[lo, hi)`` range of prompt token counts (TRL: (2, 8)).
      min_review_chars: keep reviews with strictly more characters (None keeps all).
      seed: seeds the per-review prompt lengths.
      max_rows: use only the first ``max_rows`` rows of the split (before filtering).

    Example: see the module docstring.
    """
    lo, hi = (int(x) for x in prompt_length_range)
    if not 1 <= lo < hi:
        raise ValueError(f"prompt_length_range must be a half-open range [lo, hi) with 1 <= lo < hi, got {prompt_length_range}.")
    pad_id = require_pad_id(tokenizer)
    rows = load_split(name_or_path, split, data_dir=data_dir, data_files=data_files, text_columns=("text",))
    if max_rows is not None:
        rows = rows.select(range(min(int(max_rows), len(rows))))
    if "text" not in rows.column_names:
        raise ValueError(f"IMDb rows need a 'text' column; {name_or_path} has {rows.column_names}.")
    has_label = "label" in rows.column_names
    cols = read_columns(rows, ["text", "label"] if has_label else ["text"])
    texts = cols["text"]
    check_text_columns({"text": texts}, f"imdb:{name_or_path}:{split}")
    labels = np.asarray(cols["label"], dtype=np.int32) if has_label else None
    keep = [i for i, t in enumerate(texts) if min_review_chars is None or len(t) > min_review_chars]
    reasons = {"short_review": len(texts) - len(keep)}
    rng = np.random.default_rng(seed)
    ks = rng.integers(lo, hi, size=len(keep))
    full = encode_texts(tokenizer, [texts[i] for i in keep])
    bos = prepended_bos(tokenizer)
    lead = [] if bos is None else [bos]
    review_tokens = [toks[: k - len(lead)] for toks, k in zip(full, ks)]
    token_lists = [lead + toks for toks in review_tokens]
    prompts = [tokenizer.decode(t) for t in review_tokens]
    return prompt_dataset_from_tokens(
        token_lists,
        prompts,
        None,
        pad_id=pad_id,
        max_length=hi - 1,
        width=hi - 1,
        drop_reasons=reasons,
        extras={} if labels is None else {"label": labels[keep]},
        name=f"imdb:{name_or_path}:{split}",
        remedies={"short_review": f"lower min_review_chars={min_review_chars} (shorter reviews are dropped)"},
    )
