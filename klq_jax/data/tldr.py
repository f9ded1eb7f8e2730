"""TL;DR summarisation prompts (paper §5: TL;DR, Syed et al. 2018; setup of the N+ details).

Two sources, one output (:class:`~klq_jax.data.common.PromptDataset`, queries left-padded to 512):

1. **Pre-tokenised** (the default, what the N+ PPO script trains on; rlhf_facts.md §2):
   ``vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144``, splits
   ``train`` / ``validation`` / ``test`` (116,722 / 6,447 / 6,553 rows). Column ``query_token`` holds
   512 ids already LEFT-padded with the Pythia ``[PAD]`` id; ``query`` is its text;
   ``reference_response`` is ``" " + summary + "<|endoftext|>"``. The ids are used as they are; the
   mask is 0 on the leading run of the tokenizer's pad id, so the tokenizer passed in must be the
   policy's (Pythia + ``[PAD]``) tokenizer the ids were made with.

2. **Raw rows** with columns ``subreddit``, ``title``, ``post`` (and ``summary``), e.g. the N+ source
   ``vwxyzjn/summarize_from_feedback_tldr_3_filtered`` or the columns of the dataset above. The
   query is built as N+ (vwxyzjn/summarize_from_feedback_details ``tldr_dataset.py``, OpenAI's
   ``lm-human-preferences`` recipe) does it::

       "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"

   *Smart truncation*: while the encoded query is longer than ``query_length`` (512), ``post`` is
   cut back to just before its last ``"\\n"`` (the newline itself goes too) and the query is
   re-encoded. When the post has no newline left, N+ removes one character at a time; here
   ``no_newline_cut`` chooses:

   * ``"tokens"`` (default, fast): encode the post on its own, keep its first
     ``len(post_tokens) - excess`` tokens (cut at the end character of the last kept token, so no
     character is split), re-encode the query, and drop one more post token until it fits;
   * ``"chars"``: N+'s loop exactly, one character at a time (slow for long newline-free posts).

   If the post is empty and the query is still too long (a very long title), the row is dropped and
   counted (``drop_reasons["too_long"]``); N+ raises instead. Queries are encoded without special
   tokens and LEFT-padded with the pad id to ``query_length``.

References (for evaluation) are the human summaries as a response text, ``" " + summary`` (from
``reference_response`` without its trailing EOS string, or built from ``summary``).

Example (offline, with the tiny fixtures):

    >>> import tempfile
    >>> from klq_jax.data import tldr
    >>> tok = fixtures.make_tiny_tokenizer()
    >>> d = fixtures.write_tiny_tldr(tempfile.mkdtemp(), tok, n=4, query_length=128)
    >>> ds = tldr.load_tldr(tok, "validation", name_or_path=d, query_length=128)
    >>> ds.prompt_ids.shape[1], ds.prompt_texts[0].endswith("\\n\\nTL;DR:")
    (128, True)
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from klq_jax.errors import DataError
from klq_jax.data.common import (
    PromptDataset,
    check_text_columns,
    encode_texts,
    left_pad,
    load_split,
    mask_from_left_padded,
    read_columns,
    read_token_matrix,
    require_pad_id,
)

__all__ = [
    "TLDR_DATASET",
    "TLDR_RAW_DATASET",
    "QUERY_FORMAT",
    "QUERY_LENGTH",
    "format_query",
    "truncate_query",
    "load_tldr",
]

logger = logging.getLogger(__name__)

TLDR_DATASET = "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144"
TLDR_RAW_DATASET = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
QUERY_LENGTH = 512
# Fields read as text, in either layout (raw posts, or the preprocessed queries + references).
TEXT_COLUMNS = ("subreddit", "title", "post", "summary", "query", "reference_response")


def format_query(subreddit: str, title: str, post: str) -> str:
    """The N+ / OpenAI TL;DR query text.

    Example:
      >>> format_query("cats", "Help", "My cat.")
      'SUBREDDIT: r/cats\\n\\nTITLE: Help\\n\\nPOST: My cat.\\n\\nTL;DR:'
    """
    return QUERY_FORMAT.format(subreddit=subreddit, title=title, post=post)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _post_prefixes_by_tokens(tokenizer, post: str):
    """``(num_tokens, prefix(k))``: the post encoded on its own, and a function giving the post cut
    after its first ``k`` tokens (at a character boundary)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(post, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

        def prefix(k: int) -> str:
            return "" if k <= 0 else post if k >= len(offsets) else post[: offsets[k - 1][1]]

        return len(offsets), prefix
    ids = _encode(tokenizer, post)

    def prefix(k: int) -> str:  # slow tokenizers: decode, dropping a split trailing character
        return "" if k <= 0 else tokenizer.decode(ids[:k]).rstrip("\ufffd")

    return len(ids), prefix


def truncate_query(
    tokenizer,
    subreddit: str,
    title: str,
    post: str,
    query_length: int = QUERY_LENGTH,
    *,
    no_newline_cut: Literal["tokens", "chars"] = "tokens",
    ids: list[int] | None = None,
) -> tuple[str, list[int]] | None:
    """Smart-truncate the post until the query fits ``query_length`` tokens (see module docstring).

    Args:
      tokenizer: a Hugging Face tokenizer (encoded without special tokens).
      subreddit, title, post: the raw row's fields.
      query_length: the token budget (N+: 512).
      no_newline_cut: ``"tokens"`` (fast hard cut of the post's tokens) or ``"chars"`` (N+'s
        one-character-at-a-time loop) once the post has no newline left.
      ids: the ids of the untruncated query, if already computed.

    Returns:
      ``(query_text, query_ids)`` with ``len(query_ids) <= query_length`` (not padded), or None when
      even an empty post does not fit.

    Example:
      >>> make_tiny_tokenizer = fixtures.make_tiny_tokenizer  # test helpers (tests/helpers/fixtures.py)
      >>> tok = make_tiny_tokenizer()
      >>> text, ids = truncate_query(tok, "a", "b", "first line\\nsecond line", 10**6)
      >>> text.endswith("second line\\n\\nTL;DR:")
      True
    """
    if no_newline_cut not in ("tokens", "chars"):
        raise ValueError(f"no_newline_cut must be 'tokens' or 'chars', got {no_newline_cut!r}.")
    if ids is None:
        ids = _encode(tokenizer, format_query(subreddit, title, post))
    while len(ids) > query_length:
        if not post:
            return None
        cut = post.rfind("\n")
        if cut >= 0:
            post = post[:cut]
        elif no_newline_cut == "chars":
            post = post[:-1]
        else:
            post_len, prefix = _post_prefixes_by_tokens(tokenizer, post)
            keep = post_len - (len(ids) - query_length)
            while True:
                candidate = prefix(keep)
                if candidate == "":
                    post = ""
                    break
                cand_ids = _encode(tokenizer, format_query(subreddit, title, candidate))
                if len(cand_ids) <= query_length:
                    post = candidate
                    break
                keep -= 1
        ids = _encode(tokenizer, format_query(subreddit, title, post))
    return format_query(subreddit, title, post), ids


def _padding_problem(ids: np.ndarray, pad_id: int, tokenizer) -> str | None:
    """Why the ``[N, T]`` pre-tokenised queries ``ids`` are not LEFT-padded with ``pad_id`` and what
    to do (the caller adds the ``source='raw'`` way out), or None.

    * right padding: a row that is not all padding ends with ``pad_id``;
    * another pad id: more rows start with a run (two or more) of one id ``c != pad_id`` than start
      with ``pad_id`` (a TL;DR query starts ``"SUBREDDIT: r/"``, never with a repeated token): ``c``
      is the id the dataset padded with, and masking ``pad_id`` would make that run prompt text.
    """
    if ids.size == 0 or ids.shape[1] < 2:
        return None
    all_pad = np.all(ids == pad_id, axis=1)
    right = (ids[:, -1] == pad_id) & ~all_pad
    if right.any():
        return (f"{int(right.sum())} of {len(ids)} rows of query_token end with the pad id {pad_id} "
                "(right-padded): LEFT-pad them")
    run = ids[:, 0] == ids[:, 1]
    firsts = ids[run, 0]
    firsts = firsts[firsts != pad_id]
    if not firsts.size:
        return None
    values, counts = np.unique(firsts, return_counts=True)
    other, n_other = int(values[np.argmax(counts)]), int(counts.max())
    if n_other <= int(np.sum(ids[:, 0] == pad_id)):
        return None
    def tok(i):
        return repr(tokenizer.convert_ids_to_tokens(i))
    return (f"{n_other} of {len(ids)} rows of query_token start with a run of id {other} ({tok(other)}), "
            f"the padding the dataset was made with, but the tokenizer's pad id is {pad_id} ({tok(pad_id)}): "
            "pass the tokenizer the ids were made with (its pad token must be the dataset's, e.g. Pythia "
            "+ '[PAD]')")


def _reference_from_response(text: str, eos: str | None) -> str:
    if eos and text.endswith(eos):
        return text[: -len(eos)]
    return text


def load_tldr(
    tokenizer,
    split: str = "train",
    *,
    name_or_path: str = TLDR_DATASET,
    source: Literal["auto", "query_token", "raw"] = "auto",
    query_length: int = QUERY_LENGTH,
    data_dir: str | None = None,
    data_files=None,
    max_rows: int | None = None,
    no_newline_cut: Literal["tokens", "chars"] = "tokens",
) -> PromptDataset:
    """TL;DR prompts as a :class:`PromptDataset` of width ``query_length``.

    Args:
      tokenizer: the policy's tokenizer, with a pad token (Pythia + ``[PAD]``).
      split: ``"train"``, ``"validation"`` or ``"test"``.
      name_or_path: hub name, local directory in the hub layout, saved dataset, or data file (a
        single file or saved Dataset has one split, "train": see :func:`~klq_jax.data.load_split`).
      source: ``"query_token"`` uses the pre-tokenised ids, ``"raw"`` re-encodes from
        ``subreddit``/``title``/``post``; ``"auto"`` picks ``query_token`` when the column exists.
        ``query_token`` must be LEFT-padded with the tokenizer's pad id: right-padded ids, or ids
        padded with another id (a tokenizer whose pad is EOS), are refused
        (:class:`~klq_jax.errors.DataError` naming both ids) rather than read as prompt text.
      query_length: the token budget and padded width (N+: 512). Pre-tokenised rows of another
        width are re-padded; those with more real tokens than ``query_length`` are dropped.
      data_dir, data_files: passed to ``datasets.load_dataset``.
      max_rows: use only the first ``max_rows`` rows of the split (quick runs).
      no_newline_cut: see :func:`truncate_query`.

    Returns:
      A PromptDataset with ``prompt_ids [N, query_length]`` and ``references`` = ``" " + summary``
      when the split has summaries.

    Example: see the module docstring.
    """
    pad_id = require_pad_id(tokenizer)
    rows = load_split(name_or_path, split, data_dir=data_dir, data_files=data_files,
                      text_columns=TEXT_COLUMNS)
    if max_rows is not None:
        rows = rows.select(range(min(int(max_rows), len(rows))))
    columns = set(rows.column_names)
    if source == "auto":
        source = "query_token" if "query_token" in columns else "raw"
    name = f"tldr:{name_or_path}:{split}"
    eos = getattr(tokenizer, "eos_token", None)

    references = None
    if "reference_response" in columns:
        refs = read_columns(rows, ["reference_response"])
        check_text_columns(refs, name)
        references = [_reference_from_response(t, eos) for t in refs["reference_response"]]
    elif "summary" in columns:
        refs = read_columns(rows, ["summary"])
        check_text_columns(refs, name)
        references = [" " + s for s in refs["summary"]]

    if source == "query_token":
        if "query_token" not in columns:
            raise ValueError(f"{name}: no 'query_token' column (columns: {sorted(columns)}); use source='raw'.")
        ids = read_token_matrix(rows, "query_token")
        vocab = len(tokenizer)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(
                f"{name}: query_token ids lie in [{ids.min()}, {ids.max()}] but the tokenizer has {vocab} "
                "tokens: pass the tokenizer the ids were made with (Pythia's, with '[PAD]' added)."
            )
        problem = _padding_problem(ids, pad_id, tokenizer)
        if problem:
            raise DataError(f"{name}: {problem}, or re-encode the text with source='raw' (--task.tldr-source raw).")
        mask = mask_from_left_padded(ids, pad_id)
        lengths = mask.sum(axis=1).astype(np.int64)
        if "query" in columns:
            texts = read_columns(rows, ["query"])["query"]
            check_text_columns({"query": texts}, name)
        else:
            texts = [tokenizer.decode(r[m > 0], skip_special_tokens=True).lstrip() for r, m in zip(ids, mask)]
        keep = np.nonzero((lengths > 0) & (lengths <= query_length))[0]
        reasons = {"too_long": int(np.sum(lengths > query_length)), "empty": int(np.sum(lengths == 0))}
        if ids.shape[1] == query_length:  # the usual case: use the ids as they are
            out_ids, out_mask = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(mask[keep])
        else:
            token_lists = [ids[i, ids.shape[1] - lengths[i]:] for i in keep]
            out_ids, out_mask = left_pad(token_lists, query_length, pad_id)
        reasons = {k: v for k, v in reasons.items() if v}
        if not len(keep):
            raise DataError(
                f"{name}: no prompt left of {len(ids)} rows (dropped {reasons}: queries longer than "
                f"query_length={query_length} tokens or empty); raise query_length (--task.max-prompt-len) "
                "or use another dataset."
            )
        if reasons:
            logger.warning("%s: dropped %d of %d rows %s", name, sum(reasons.values()), len(ids), reasons)
        return PromptDataset(
            prompt_ids=out_ids,
            prompt_mask=out_mask,
            prompt_texts=[texts[i] for i in keep],
            references=None if references is None else [references[i] for i in keep],
            pad_id=pad_id,
            dropped=int(sum(reasons.values())),
            drop_reasons=reasons,
            name=name,
        )

    if source != "raw":
        raise ValueError(f"source must be 'auto', 'query_token' or 'raw', got {source!r}.")
    missing = {"subreddit", "title", "post"} - columns
    if missing:
        raise DataError(f"{name}: raw TL;DR rows need columns subreddit/title/post; missing {sorted(missing)}.")
    cols = read_columns(rows, ["subreddit", "title", "post"])
    check_text_columns(cols, name)
    subreddits, titles, posts = cols["subreddit"], cols["title"], cols["post"]
    full_texts = [format_query(s, t, p) for s, t, p in zip(subreddits, titles, posts)]
    full_ids = encode_texts(tokenizer, full_texts)
    texts, token_lists, keep = [], [], []
    for i, ids in enumerate(full_ids):
        if len(ids) <= query_length:
            out = (full_texts[i], ids)
        else:
            out = truncate_query(tokenizer, subreddits[i], titles[i], posts[i], query_length,
                                 no_newline_cut=no_newline_cut, ids=ids)
        if out is not None and len(out[1]) > 0:
            keep.append(i)
            texts.append(out[0])
            token_lists.append(out[1])
    n_dropped = len(full_ids) - len(keep)
    if not keep:
        raise DataError(
            f"{name}: no prompt left of {len(full_ids)} rows (dropped {{'too_long': {n_dropped}}}: no "
            f"query fits query_length={query_length} tokens even with an empty post); raise "
            "query_length (--task.max-prompt-len)."
        )
    ids_arr, mask_arr = left_pad(token_lists, query_length, pad_id)
    reasons = {"too_long": n_dropped} if n_dropped else {}
    if n_dropped:
        logger.warning("%s: dropped %d of %d rows whose query does not fit %d tokens even with an "
                       "empty post", name, n_dropped, len(full_ids), query_length)
    return PromptDataset(
        prompt_ids=ids_arr,
        prompt_mask=mask_arr,
        prompt_texts=texts,
        references=None if references is None else [references[i] for i in keep],
        pad_id=pad_id,
        dropped=n_dropped,
        drop_reasons=reasons,
        name=name,
    )
