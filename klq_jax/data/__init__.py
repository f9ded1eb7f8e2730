"""Prompt datasets for online RLHF: TL;DR, Anthropic-HH, IMDb, a resumable prompt iterator, and
offline fixtures (tiny tokenizers and datasets in the real schemas).

Every loader takes a hub name or a local directory / data file and returns a
:class:`PromptDataset` (LEFT-padded ``prompt_ids [N, Tq] int32``, ``prompt_mask [N, Tq] float32``,
texts, references, drop counts). :class:`PromptIterator` serves deterministic, resumable,
per-process batches of it.

Example (offline):

    >>> import tempfile
    >>> from klq_jax.data import PromptIterator, load_hh
    >>> tok = fixtures.make_tiny_tokenizer()
    >>> ds = load_hh(tok, "train", name_or_path=fixtures.write_tiny_hh(tempfile.mkdtemp()))
    >>> batch = next(PromptIterator(ds, batch_size=2, seed=0))
    >>> sorted(batch)
    ['index', 'prompt_ids', 'prompt_mask']
"""

from klq_jax.data.common import (
    PromptDataset,
    left_pad,
    load_split,
    mask_from_left_padded,
    require_pad_id,
)
from klq_jax.data.hh import HH_DATASET, extract_prompt, load_hh, num_human_turns
from klq_jax.data.imdb import IMDB_DATASET, load_imdb
from klq_jax.data.iterator import PromptIterator, epoch_permutation
from klq_jax.data.tldr import (
    QUERY_FORMAT,
    TLDR_DATASET,
    TLDR_RAW_DATASET,
    format_query,
    load_tldr,
    truncate_query,
)

__all__ = [
    "PromptDataset",
    "PromptIterator",
    "epoch_permutation",
    "left_pad",
    "load_split",
    "mask_from_left_padded",
    "require_pad_id",
    "HH_DATASET",
    "extract_prompt",
    "load_hh",
    "num_human_turns",
    "IMDB_DATASET",
    "load_imdb",
    "QUERY_FORMAT",
    "TLDR_DATASET",
    "TLDR_RAW_DATASET",
    "format_query",
    "load_tldr",
    "truncate_query",
]
