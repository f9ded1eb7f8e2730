"""Offline stand-ins for the hub: tiny tokenizers and tiny datasets in the real schemas and layouts.

Used by the tests and by offline smoke runs of the presets, so the real loaders run unchanged on them
(``datasets.load_dataset(directory)`` reads the same file layout as the hub repository):

* :func:`make_tiny_tokenizer`: a byte-level BPE trained in well under a second on a built-in English
  corpus, Pythia-like: ``<|endoftext|>`` is id 0 (bos = eos = unk) and ``[PAD]`` is the last id, as
  TRL/N+ add it to Pythia's tokenizer.
* :func:`make_tiny_gpt2_tokenizer`: GPT-2-like, for the HH reward model: a different vocabulary,
  ``<|endoftext|>`` as the LAST id (GPT-2: 50256) and no pad token.
* :func:`write_tiny_tldr` (the pre-tokenised N+ dataset), :func:`write_tiny_tldr_raw`
  (``subreddit/title/post/summary`` rows), :func:`write_tiny_hh` (hh-rlhf ``{subset}/{split}.jsonl.gz``),
  :func:`write_tiny_imdb` (``plain_text/{split}-00000-of-00001.parquet``), each returning the directory
  to pass as ``name_or_path``. The row writers :func:`write_tldr_raw_rows` and :func:`write_hh_rows`
  write hand-made rows in the same layouts.

Example:

    >>> import tempfile
    >>> tok = make_tiny_tokenizer()
    >>> tok.eos_token_id, tok.pad_token_id == len(tok) - 1
    (0, True)
    >>> make_tiny_gpt2_tokenizer().pad_token_id is None
    True
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence

__all__ = [
    "CORPUS",
    "make_tiny_tokenizer",
    "make_tiny_gpt2_tokenizer",
    "write_tldr_raw_rows",
    "write_tiny_tldr_raw",
    "write_tiny_tldr",
    "write_hh_rows",
    "write_tiny_hh",
    "write_tiny_imdb",
]

EOS = "<|endoftext|>"
PAD = "[PAD]"

# A small English corpus in the three tasks' registers (Reddit posts, dialogue, film reviews).
CORPUS: tuple[str, ...] = (
    "I have been dating my girlfriend for two years and we recently moved in together.",
    "Last week she told me that she wants to travel for a few months without me.",
    "I am not sure what to think about it, because we never talked about this before.",
    "My roommate keeps eating my food and never cleans the kitchen after cooking dinner.",
    "We signed the lease together, so I cannot just ask him to move out of the apartment.",
    "My boss asked me to work every weekend this month, but my contract says I do not have to.",
    "Should I talk to human resources first, or should I try to speak with him directly?",
    "The dog barks all night and the neighbours have started to complain to the landlord.",
    "I started running three times a week and lost ten pounds, but my knees hurt a lot.",
    "My parents want me to study medicine, while I would rather become a software engineer.",
    "TL;DR: the summary of the post is short and tells the reader what happened.",
    "Human: How do I bake a loaf of bread at home? Assistant: Mix flour, water, salt and yeast.",
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: Can you help me write an email to my landlord? Assistant: Of course, here is a draft.",
    "Human: Why is the sky blue? Assistant: Sunlight is scattered by the molecules in the air.",
    "Human: I feel tired every morning. Assistant: Try to sleep at the same time every night.",
    "Thank you, that was very helpful. I think I understand it much better now.",
    "This movie was one of the best films I have seen in years, with a wonderful cast.",
    "The acting was terrible and the story made no sense at all; I want my money back.",
    "A beautiful and moving film about family, love and the things we leave unsaid.",
    "I was bored from the first scene to the last, and the ending was predictable.",
    "The director has a great eye, the music is lovely and the characters feel real.",
    "Honestly, this is the worst movie ever made. Avoid it at all costs, it is awful.",
    "If you enjoy horror films with clever twists, you will love this little gem.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "People often ask questions about relationships, money, school, work and health.",
    "Please explain the reasons for your answer, and give an example if you can.",
    "We went to the beach on Saturday, swam in the cold sea and ate ice cream together.",
    "It is important to be kind, honest and patient when you talk with other people.",
    "Numbers like 1, 2, 3, 10, 42 and 2024 appear in posts, reviews and conversations.",
)


def _train_bpe(vocab_size: int, special_first: bool, corpus: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS] if special_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return tok


def make_tiny_tokenizer(dir: str | os.PathLike | None = None, vocab_size: int = 512):
    """A tiny Pythia-like byte-level BPE tokenizer, trained offline (< 1 s).

    ``<|endoftext|>`` is id 0 (bos = eos = unk, as Pythia), ``[PAD]`` is the last id; ``len(tok)``
    is ``vocab_size`` unless the corpus runs out of merges first (then smaller). Saved with
    ``save_pretrained(dir)`` when ``dir`` is given, so ``AutoTokenizer.from_pretrained(dir)`` loads it.

    Example:
      >>> tok = make_tiny_tokenizer(vocab_size=400)
      >>> len(tok), tok.decode(tok("Hello there")["input_ids"])
      (400, 'Hello there')
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (256 bytes + specials), got {vocab_size}.")
    tok = _train_bpe(vocab_size - 1, special_first=True, corpus=CORPUS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
    )
    assert hf.eos_token_id == 0 and hf.pad_token_id == len(hf) - 1, (hf.eos_token_id, hf.pad_token_id)
    if dir is not None:
        hf.save_pretrained(os.fspath(dir))
    return hf


def make_tiny_gpt2_tokenizer(dir: str | os.PathLike | None = None, vocab_size: int = 384):
    """A tiny GPT-2-like byte-level BPE tokenizer: no pad token, ``<|endoftext|>`` the last id.

    Its vocabulary differs from :func:`make_tiny_tokenizer`'s (bytes start at id 0, fewer merges,
    trained on the corpus in reverse order), so the same text gets other ids: the cross-tokenizer
    reward tests need two genuinely different tokenizers.

    Example:
      >>> tok = make_tiny_gpt2_tokenizer()
      >>> tok.eos_token_id == len(tok) - 1, tok.pad_token_id
      (True, None)
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260, got {vocab_size}.")
    tok = _train_bpe(vocab_size - 1, special_first=False, corpus=CORPUS[::-1])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    assert hf.pad_token_id is None and hf.eos_token_id == len(hf) - 1
    if dir is not None:
        hf.save_pretrained(os.fspath(dir))
    return hf


# ------------------------------------------------------------------------------------------ TL;DR
_TLDR_ROWS = (
    ("relationships", "My girlfriend wants to travel without me, what should I do?",
     "I have been dating my girlfriend for two years.\nLast week she told me that she wants to travel "
     "for a few months without me.\nI am not sure what to think about it.",
     "girlfriend wants to travel alone for months, not sure how to feel"),
    ("AskReddit", "Roommate keeps eating my food",
     "My roommate keeps eating my food and never cleans the kitchen.\nWe signed the lease together.",
     "roommate eats my food, can't kick him out"),
    ("jobs", "Boss wants me to work every weekend",
     "My boss asked me to work every weekend this month, but my contract says I do not have to. "
     "Should I talk to human resources first?",
     "boss wants weekend work that my contract doesn't require"),
    ("running", "Knee pain after starting to run",
     "I started running three times a week and lost ten pounds.\n\nBut my knees hurt a lot.",
     "running helped me lose weight but my knees hurt"),
)


def _long_post(paragraphs: int = 24, newlines: bool = True) -> str:
    sep = "\n" if newlines else " "
    return sep.join(CORPUS[i % 10] + " " + CORPUS[(i + 3) % 10] for i in range(paragraphs))


def _tldr_raw_rows(n: int) -> list[dict]:
    """n rows: the hand-written ones, a post far too long for 512 tokens (with newlines) and one
    without any newline, then variations."""
    rows = []
    for i in range(n):
        if i == 1:
            sub, title, post, summ = ("relationships", "A very long story", _long_post(24, True),
                                      "long story about my life")
        elif i == 3:
            sub, title, post, summ = ("tifu", "One endless paragraph", _long_post(24, False),
                                      "a paragraph without newlines")
        else:
            sub, title, post, summ = _TLDR_ROWS[i % len(_TLDR_ROWS)]
            if i >= len(_TLDR_ROWS):
                title = f"{title} (update {i})"
        rows.append({"id": f"t3_{i:05d}", "subreddit": sub, "title": title, "post": post, "summary": summ})
    return rows


_DEFAULT_CONFIG_README = """---
configs:
- config_name: default
  data_files:
{entries}
---
"""


def _write_readme(dir: str, split_globs: Mapping[str, str], config_name: str = "default") -> None:
    entries = "".join(f"  - split: {s}\n    path: {g}\n" for s, g in split_globs.items())
    text = _DEFAULT_CONFIG_README.format(entries=entries.rstrip("\n")).replace("default", config_name, 1)
    with open(os.path.join(dir, "README.md"), "w") as f:
        f.write(text)


def _write_parquet_splits(dir: str, splits: Mapping[str, Sequence[dict]], subdir: str, features=None,
                          config_name: str = "default") -> str:
    import datasets

    os.makedirs(os.path.join(dir, subdir), exist_ok=True)
    for split, rows in splits.items():
        cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        ds = datasets.Dataset.from_dict(cols, features=features)
        ds.to_parquet(os.path.join(dir, subdir, f"{split}-00000-of-00001.parquet"))
    _write_readme(dir, {s: f"{subdir}/{s}-*" for s in splits}, config_name)
    return os.fspath(dir)


def write_tldr_raw_rows(dir: str | os.PathLike, splits: Mapping[str, Sequence[dict]]) -> str:
    """Write raw TL;DR rows (dicts with id/subreddit/title/post/summary) as
    ``data/{split}-00000-of-00001.parquet`` (the layout of ``vwxyzjn/summarize_from_feedback_tldr_3_filtered``)."""
    return _write_parquet_splits(os.fspath(dir), splits, "data")


def write_tiny_tldr_raw(dir: str | os.PathLike, n: int = 8) -> str:
    """Raw TL;DR rows (``id, subreddit, title, post, summary``) for train/validation/test; row 1 has a
    long post with newlines and row 3 a long post without any, both longer than 512 tokens.

    Example:
      >>> import tempfile
      >>> from klq_jax.data import tldr
      >>> tok = make_tiny_tokenizer()
      >>> d = write_tiny_tldr_raw(tempfile.mkdtemp(), n=4)
      >>> ds = tldr.load_tldr(tok, "train", name_or_path=d)
      >>> ds.prompt_ids.shape, int(ds.lengths.max()) <= 512
      ((4, 512), True)
    """
    rows = _tldr_raw_rows(n)
    return write_tldr_raw_rows(dir, {"train": rows, "validation": rows[: max(2, n // 2)], "test": rows[:2]})


def write_tiny_tldr(dir: str | os.PathLike, tokenizer, n: int = 8, query_length: int = 512,
                    response_length: int = 53) -> str:
    """The pre-tokenised N+ TL;DR dataset's schema (``..._oai_preprocessing_1706381144``): columns
    id, subreddit, title, post, summary, query_token (``query_length`` ids, left-padded with the
    tokenizer's pad id), query, reference_response(_token, _token_len),
    query_reference_response(_token, _token_response_label, _token_len); splits train/validation/test
    in ``data/{split}-00000-of-00001.parquet``. Rows whose title alone does not fit ``query_length``
    are left out (N+ raises on them; the real dataset has none).

    Example: see :mod:`klq_jax.data.tldr`.
    """
    from klq_jax.data.common import left_pad, require_pad_id
    from klq_jax.data.tldr import truncate_query

    pad_id = require_pad_id(tokenizer)
    eos = tokenizer.eos_token or EOS

    def enc(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def right_pad(ids, width):
        ids = list(ids)[:width]
        return ids + [pad_id] * (width - len(ids))

    def process(row):
        out = truncate_query(tokenizer, row["subreddit"], row["title"], row["post"], query_length)
        if out is None:  # like N+, which raises on such rows: the real dataset has none
            return None
        query, q_ids = out
        query_token = left_pad([q_ids], query_length, pad_id)[0][0].tolist()
        ref = f" {row['summary']}{eos}"
        ref_ids = enc(ref)
        qrr = query.strip() + ref
        qrr_ids = enc(qrr)
        qrr_width = query_length + response_length + 9
        qrr_token = right_pad(qrr_ids, qrr_width)
        label = list(qrr_token)
        label[: len(q_ids)] = [pad_id] * len(q_ids)
        return {
            **row,
            "query": query,
            "query_token": query_token,
            "reference_response": ref,
            "reference_response_token": right_pad(ref_ids, response_length),
            "reference_response_token_len": len(ref_ids),
            "query_reference_response": qrr,
            "query_reference_response_token": qrr_token,
            "query_reference_response_token_response_label": label,
            "query_reference_response_token_len": len(qrr_ids),
        }

    rows = [r for r in map(process, _tldr_raw_rows(n)) if r is not None]
    if not rows:
        raise ValueError(f"no fixture TL;DR query fits query_length={query_length} tokens; use a larger one.")
    return _write_parquet_splits(
        os.fspath(dir), {"train": rows, "validation": rows[: max(2, n // 2)], "test": rows[:2]}, "data"
    )


# ---------------------------------------------------------------------------------------------- HH
def _hh_rows(n: int) -> list[dict]:
    base = [
        ("\n\nHuman: How do I bake a loaf of bread at home?\n\nAssistant:",
         " Mix flour, water, salt and yeast, let it rise, then bake it.",
         " I don't know."),
        ("\n\nHuman: What is the capital of France?\n\nAssistant:",
         " The capital of France is Paris.",
         " The capital of France is Lyon."),
        ("\n\nHuman: Can you help me write an email to my landlord?\n\nAssistant: Sure, what is it about?"
         "\n\nHuman: The heating is broken.\n\nAssistant:",
         " Here is a draft: Dear landlord, the heating in my flat is broken.",
         " No."),
        ("\n\nHuman: " + " ".join(CORPUS[:20]) + " " + " ".join(CORPUS[:20]) + "\n\nAssistant:",
         " That is a lot to think about; let us take it one step at a time.",
         " Whatever."),
        ("\n\nHuman: Why is the sky blue?\n\nAssistant:",
         " Sunlight is scattered by the molecules in the air.",
         " Because it is."),
    ]
    rows = []
    for i in range(n):
        prompt, chosen, rejected = base[i % len(base)]
        if i >= len(base):
            prompt = prompt.replace("\n\nHuman: ", f"\n\nHuman: ({i}) ", 1)
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    return rows


def write_hh_rows(dir: str | os.PathLike, splits: Mapping[str, Sequence[dict]],
                  data_dir: str = "helpful-base") -> str:
    """Write hh-rlhf rows (dicts with chosen/rejected) as ``{data_dir}/{split}.jsonl.gz`` (the
    layout of ``Anthropic/hh-rlhf``); returns ``dir``."""
    dir = os.fspath(dir)
    os.makedirs(os.path.join(dir, data_dir), exist_ok=True)
    for split, rows in splits.items():
        with gzip.open(os.path.join(dir, data_dir, f"{split}.jsonl.gz"), "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
    return dir


def write_tiny_hh(dir: str | os.PathLike, n: int = 10, data_dir: str = "helpful-base") -> str:
    """hh-rlhf rows for train/test in ``{data_dir}/{split}.jsonl.gz``: single-turn rows, a multi-turn
    row (index 2), a row whose replies share their first words (index 1), and a single-turn prompt
    longer than 512 tokens of the tiny tokenizer (index 3).

    Example: see :mod:`klq_jax.data.hh`.
    """
    rows = _hh_rows(n)
    return write_hh_rows(dir, {"train": rows, "test": rows[: max(3, n // 2)]}, data_dir)


LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def make_tiny_llama_tokenizer(dir: str | os.PathLike | None = None, vocab_size: int = 400):
    """A tiny Llama-3-like tokenizer: byte-level BPE, ``<|begin_of_text|>`` prepended to every
    encoding, ``<|end_of_text|>`` the EOS, both special tokens the LAST two ids, **no pad token**
    (as Llama 3.2, whose 128256 tokens fill its embedding: a ``[PAD]`` would not fit).

    Example:
      >>> tok = make_tiny_llama_tokenizer()
      >>> len(tok), tok.eos_token_id, tok.pad_token_id, tok("Hi")["input_ids"][0] == tok.bos_token_id
      (400, 399, None, True)
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size - 2, special_first=False, corpus=CORPUS[1::2] + CORPUS[::2])
    tok.add_special_tokens([LLAMA_BOS, LLAMA_EOS])
    bos = tok.token_to_id(LLAMA_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A $B:1", special_tokens=[(LLAMA_BOS, bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS)
    assert hf.pad_token_id is None and hf.eos_token_id == len(hf) - 1, (hf.pad_token_id, hf.eos_token_id)
    if dir is not None:
        hf.save_pretrained(os.fspath(dir))
    return hf


def make_tiny_bert_tokenizer(dir: str | os.PathLike | None = None, vocab_size: int = 300):
    """A tiny DistilBERT-like (uncased WordPiece) tokenizer: ``[PAD]`` 0, ``[UNK]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]``; encodings are ``[CLS] … [SEP]``.

    Example:
      >>> tok = make_tiny_bert_tokenizer()
      >>> ids = tok("A great film!")["input_ids"]
      >>> tok.convert_ids_to_tokens(ids)[0], tok.convert_ids_to_tokens(ids)[-1], tok.pad_token_id
      ('[CLS]', '[SEP]', 0)
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(CORPUS), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                    show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    if dir is not None:
        hf.save_pretrained(os.fspath(dir))
    return hf


# -------------------------------------------------------------------------------------------- IMDb
def write_tiny_imdb(dir: str | os.PathLike, n: int = 8) -> str:
    """``stanfordnlp/imdb``'s schema (text, label ClassLabel neg/pos) and layout
    (``plain_text/{train,test,unsupervised}-00000-of-00001.parquet`` with a README config); every
    third review is shorter than 200 characters.

    Example: see :mod:`klq_jax.data.imdb`.
    """
    import datasets

    reviews = [c for c in CORPUS[17:24]]
    rows = []
    for i in range(n):
        text = reviews[i % len(reviews)]
        if i % 3 != 2:
            text = " ".join([text] + [reviews[(i + j) % len(reviews)] for j in range(1, 4)]) + " <br /><br />The end."
        positive = i % len(reviews) in (0, 2, 4, 6)
        rows.append({"text": text, "label": int(positive)})
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["neg", "pos"]))
    unsup = [{"text": r["text"], "label": -1} for r in rows]
    d = _write_parquet_splits(os.fspath(dir), {"train": rows, "test": rows[: max(2, n // 2)]}, "plain_text",
                              features=features, config_name="plain_text")
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in unsup], "label": [r["label"] for r in unsup]},
                                    features=features)
    ds.to_parquet(os.path.join(d, "plain_text", "unsupervised-00000-of-00001.parquet"))
    _write_readme(d, {s: f"plain_text/{s}-*" for s in ("train", "test", "unsupervised")}, "plain_text")
    return d
