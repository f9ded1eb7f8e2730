"""The prompt dataset type shared by every loader, and the loading/padding helpers they share.

Every loader (`tldr.load_tldr`, `hh.load_hh`, `imdb.load_imdb`) returns a :class:`PromptDataset`:
numpy arrays of LEFT-padded prompt token ids and a float mask, the prompt texts, optional reference
responses for evaluation, and how many source rows were dropped (and why).

Left padding (pads first, then the prompt) is what TRL and the N+ details use for generation
(rlhf_facts.md §1 "Tokenizer: padding_side=left", §2 "Short queries are left-padded with the [PAD]
id"): every prompt then ends at the same column, so sampling appends tokens at column ``Tq`` for the
whole batch.

Loading goes through :func:`load_split`, which runs ``datasets.load_dataset`` on a hub name *or* a
local directory / data files, so the same code reads the real hub datasets and the tiny copies that
:mod:`tests.helpers.fixtures` writes to disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klq_jax.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "PromptDataset",
    "require_pad_id",
    "load_split",
    "read_columns",
    "read_token_matrix",
    "encode_texts",
    "left_pad",
    "mask_from_left_padded",
    "prompt_dataset_from_tokens",
    "check_text_columns",
]


@dataclasses.dataclass(frozen=True, eq=False)
class PromptDataset:
    """Prompts for online RLHF, left-padded to one width.

    Attributes:
      prompt_ids: ``[N, Tq]`` int32 token ids, LEFT-padded with ``pad_id``.
      prompt_mask: ``[N, Tq]`` float32, 1.0 on real prompt tokens and 0.0 on the left padding.
        Each row is 0...0 then 1...1 (at least one real token).
      prompt_texts: ``N`` prompt strings (the text the ids encode).
      references: ``N`` reference responses for evaluation (TL;DR: the human summary " ...",
        HH: the chosen reply " ..."), or None when the dataset has none (IMDb).
      pad_id: the tokenizer's pad id used for the left padding.
      dropped: number of source rows dropped (too long for the budget, filtered out, malformed).
      drop_reasons: the same count split by reason, e.g. ``{"too_long": 3, "multi_turn": 10}``.
      extras: optional per-prompt numpy arrays of length ``N`` (e.g. IMDb ``label``).
      name: a short description of the source (dataset and split), for logs.

    Example:
      >>> import numpy as np
      >>> ds = PromptDataset(prompt_ids=np.array([[9, 5, 6], [4, 5, 6]], np.int32),
      ...                    prompt_mask=np.array([[0, 1, 1], [1, 1, 1]], np.float32),
      ...                    prompt_texts=["ab", "cab"], references=None, pad_id=9)
      >>> len(ds), ds.width, ds.lengths.tolist()
      (2, 3, [2, 3])
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    prompt_texts: list[str]
    references: list[str] | None
    pad_id: int
    dropped: int = 0
    drop_reasons: Mapping[str, int] = dataclasses.field(default_factory=dict)
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        ids, mask = self.prompt_ids, self.prompt_mask
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype != np.int32:
            raise ValueError(
                "PromptDataset.prompt_ids must be a [N, Tq] int32 numpy array, got "
                f"{type(ids).__name__} {getattr(ids, 'shape', None)} {getattr(ids, 'dtype', None)}."
            )
        if not isinstance(mask, np.ndarray) or mask.shape != ids.shape or mask.dtype != np.float32:
            raise ValueError(
                f"PromptDataset.prompt_mask must be a float32 array of shape {ids.shape}, got "
                f"{getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)}."
            )
        n = ids.shape[0]
        if len(self.prompt_texts) != n:
            raise ValueError(f"{len(self.prompt_texts)} prompt_texts for {n} prompts.")
        if self.references is not None and len(self.references) != n:
            raise ValueError(f"{len(self.references)} references for {n} prompts.")
        for key, value in self.extras.items():
            if len(value) != n:
                raise ValueError(f"extras[{key!r}] has {len(value)} entries for {n} prompts.")
        if n:
            if not np.all((mask == 0.0) | (mask == 1.0)):
                raise ValueError("prompt_mask must hold only 0.0 and 1.0.")
            if np.any(np.diff(mask, axis=1) < 0):
                raise ValueError(
                    "prompts must be LEFT-padded: each prompt_mask row must be 0...0 then 1...1."
                )
            if ids.shape[1] == 0 or np.any(mask[:, -1] != 1.0):
                raise ValueError("every prompt needs at least one real token (its last column).")
            if np.any(ids[mask == 0.0] != self.pad_id):
                raise ValueError(f"padding positions must hold pad_id={self.pad_id}.")

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def width(self) -> int:
        """``Tq``, the padded prompt length."""
        return int(self.prompt_ids.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        """``[N]`` int32 number of real tokens per prompt."""
        return self.prompt_mask.sum(axis=1).astype(np.int32)

    def select(self, indices: Sequence[int] | np.ndarray) -> "PromptDataset":
        """The prompts at ``indices`` (in that order), same width; drop counts are kept.

        Example:
          >>> import numpy as np
          >>> ds = PromptDataset(np.array([[1], [2]], np.int32), np.ones((2, 1), np.float32),
          ...                    ["a", "b"], None, pad_id=0)
          >>> ds.select([1]).prompt_texts
          ['b']
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            prompt_texts=[self.prompt_texts[i] for i in idx],
            references=None if self.references is None else [self.references[i] for i in idx],
            extras={k: np.asarray(v)[idx] for k, v in self.extras.items()},
        )

    def left_trim(self, multiple_of: int = 1) -> "PromptDataset":
        """Drop leading columns that are padding in every row (keeping the width a multiple of
        ``multiple_of`` where possible): same prompts, smaller ``Tq``.

        Example:
          >>> import numpy as np
          >>> ds = PromptDataset(np.array([[0, 0, 5], [0, 4, 5]], np.int32),
          ...                    np.array([[0, 0, 1], [0, 1, 1]], np.float32), ["x", "yx"], None, 0)
          >>> ds.left_trim().prompt_ids.tolist()
          [[0, 5], [4, 5]]
        """
        longest = int(self.lengths.max()) if len(self) else 0
        width = max(1, -(-longest // multiple_of) * multiple_of)
        width = min(width, self.width)
        return dataclasses.replace(
            self,
            prompt_ids=np.ascontiguousarray(self.prompt_ids[:, self.width - width :]),
            prompt_mask=np.ascontiguousarray(self.prompt_mask[:, self.width - width :]),
        )


def require_pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or a clear error if it has none.

    Pythia's tokenizer has no pad token; TRL and the N+ details add one with
    ``tokenizer.add_special_tokens({"pad_token": "[PAD]"})`` (rlhf_facts.md §1, §4), which is the id
    the pre-tokenised TL;DR queries are padded with.

    Example:
      >>> make_tiny_tokenizer = fixtures.make_tiny_tokenizer  # test helpers (tests/helpers/fixtures.py)
      >>> require_pad_id(make_tiny_tokenizer()) == make_tiny_tokenizer().pad_token_id
      True
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise ValueError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has "
            "no pad token, which the left-padded prompts need. Add one as TRL and the N+ details do: "
            "tokenizer.add_special_tokens({'pad_token': '[PAD]'}) (its id must lie inside the policy's "
            "embedding; Pythia's 50304-row embedding covers '[PAD]' = 50277), or pass the policy's "
            "tokenizer as saved by the SFT run, which already has it."
        )
    return int(pad_id)


_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_EXT_TO_BUILDER = {
    ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
    ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}


def _local_cache_dir(path: str) -> str:
    """A ``datasets`` cache directory private to the local dataset directory ``path``.

    ``datasets`` names the cache of a local directory after its base name, so two copies with the
    same base name (e.g. ``/a/imdb`` and ``/b/imdb``) would share, and serve each other's rows. Key
    it on the absolute path and the files' sizes and modification times instead.
    """
    import hashlib

    h = hashlib.sha1(os.path.abspath(path).encode())
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    base = os.environ.get("KLQ_DATASETS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "klq_jax", "datasets"
    )
    return os.path.join(base, h.hexdigest()[:16])


def load_split(
    name_or_path: str,
    split: str,
    *,
    data_dir: str | None = None,
    data_files: Any = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
    text_columns: Sequence[str] = (),
):
    """Load one split as a ``datasets.Dataset`` from the hub or from local files, by the same code.

    * a hub name (``"Anthropic/hh-rlhf"``) or a local directory in a hub repo's layout (data files,
      optionally a README.md with ``configs``) -> ``datasets.load_dataset(name_or_path,
      name=config_name, data_dir=data_dir, data_files=data_files, split=split)``;
    * a directory written by ``Dataset(Dict).save_to_disk`` -> ``datasets.load_from_disk``;
    * a single data file (.jsonl[.gz], .json, .parquet, .csv, .arrow) -> the matching builder.

    A single data file, or a ``save_to_disk`` directory of ONE Dataset, has one split, served under
    the name ``"train"``; any other ``split`` is refused (:class:`~klq_jax.errors.DataError`), so a
    validation split never silently returns the training rows.

    ``text_columns``: fields that must hold text (or null, which the loaders report by row). A local
    JSON file where one of them holds another JSON value (a number, a list, an object) is refused
    by file and line: ``datasets`` would turn that whole column into JSON text, the good rows too
    (``My cat.`` would become ``"My cat."``, quotes included).

    Example (a local copy of hh-rlhf's layout; ``fixtures.write_tiny_hh`` writes one):
      >>> import tempfile
      >>> d = fixtures.write_tiny_hh(tempfile.mkdtemp(), n=4)
      >>> len(load_split(d, "test", data_dir="helpful-base")) > 0
      True
    """
    path = os.fspath(name_or_path)
    files = _local_data_files(path, data_dir)
    for f in files:  # the problems datasets reports without the file's name, or not at all
        problem = _text_file_problem(f, parse=False) or _non_text_values(f, text_columns)
        if problem:
            raise DataError(f"Cannot read split {split!r} of {path}: {problem}. Fix or remove that file.")
    try:
        rows = _load_split(path, split, data_dir=data_dir, data_files=data_files,
                           config_name=config_name, cache_dir=cache_dir)
    except Exception as err:
        if isinstance(err, (DataError, FileNotFoundError, ConnectionError)) or not files:
            raise
        problems = [p for p in (_text_file_problem(f, parse=True) for f in files) if p]
        what = problems[0] if problems else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise DataError(
            f"Cannot read split {split!r} of {path}: {what}. Fix or remove that file"
            + ("" if problems else f" (files: {', '.join(files) or 'none found'})") + "."
        ) from err
    if len(rows) == 0:
        raise DataError(
            f"Split {split!r} of {path} has no rows (files: {', '.join(files) or 'from the hub'}); "
            "pass a dataset with rows in that split."
        )
    return rows


def _local_data_files(path: str, data_dir: str | None) -> list[str]:
    """The local data files a load of ``path`` may read (none for a hub name)."""
    if os.path.isfile(path):
        return [path]
    root = os.path.join(path, data_dir) if data_dir and os.path.isdir(os.path.join(path, data_dir)) else path
    if not os.path.isdir(root):
        return []
    out = []
    for d, _, names in sorted(os.walk(root)):
        if os.path.basename(d).startswith("."):
            continue
        for name in sorted(names):
            if any(name.lower().endswith(ext) for ext in _EXT_TO_BUILDER):
                out.append(os.path.join(d, name))
    return out


def _read_bytes(path: str) -> bytes:
    import gzip

    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _non_text_values(path: str, columns: Sequence[str]) -> str | None:
    """Where a local JSON / JSON Lines file ``path`` has a value in one of ``columns`` that is
    neither text nor null (the first few, by line or array element), or None."""
    import json

    base = path.lower()[:-3] if path.lower().endswith(".gz") else path.lower()
    if not columns or not base.endswith((".json", ".jsonl")):
        return None
    try:
        text = _read_bytes(path).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None  # _text_file_problem names these
    rows: list[tuple[str, Any]] = []
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        rows = [(f"element {i}", r) for i, r in enumerate(whole)]
    elif whole is None:
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows.append((f"line {n}", json.loads(line)))
            except ValueError:
                pass  # reported as invalid JSON if the load fails
    else:
        rows = [("line 1", whole)]
    bad = [f"{where}: field {c!r} is {type(r[c]).__name__}" for where, r in rows if isinstance(r, dict)
           for c in columns if r.get(c) is not None and not isinstance(r[c], str)]
    if not bad:
        return None
    return (f"{path} has values that are not text in text fields ({'; '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''}; {len(bad)} in all)")


def _text_file_problem(path: str, *, parse: bool) -> str | None:
    """Why the text data file ``path`` (.json/.jsonl/.csv, maybe gzipped) cannot be read, or None.

    Checks that it is not empty and is UTF-8 text; with ``parse``, also that each line of a JSON
    Lines file (or the whole of a .json file) parses.
    """
    import json

    lower = path.lower()
    base = lower[:-3] if lower.endswith(".gz") else lower
    if not base.endswith((".json", ".jsonl", ".csv")):
        return None
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError) as err:
        return f"{path} cannot be read ({type(err).__name__}: {err})"
    if not raw.strip():
        return f"{path} is empty"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return f"{path} is not UTF-8 text (line {line}, byte {err.start}: {raw[err.start:err.start + 1]!r})"
    if parse and base.endswith((".json", ".jsonl")):
        try:
            json.loads(text)
            return None
        except ValueError:
            pass
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    return f"{path} line {n} is not valid JSON ({err})"
    return None


SINGLE_SPLIT = "train"
_SET_SPLIT = "set --task.split (training) / --task.eval-split (validation) to one of them"


def _require_single_split(path: str, split: str, what: str) -> None:
    """A single data file or saved Dataset holds ONE split, served as ``"train"`` (the name
    ``datasets`` gives the rows of data files passed without split names): refuse any other split
    name, so that validation can never read the training rows under another split's name."""
    if split != SINGLE_SPLIT:
        raise DataError(
            f"{path} is {what}, which has one split ({SINGLE_SPLIT!r}), not {split!r}: pass a "
            "directory with one data file per split (e.g. train.jsonl and test.jsonl) as "
            "--task.dataset and name its splits with --task.split / --task.eval-split."
        )


def _check_local_layout(path: str, split: str, *, data_dir, data_files, config_name) -> None:
    """Refuse, saying what to set, a subset folder ``data_dir`` or a ``split`` the local directory
    ``path`` (a hub repo's layout) does not have."""
    import datasets

    if data_dir and not os.path.isdir(os.path.join(path, data_dir)):
        subsets = sorted(d for d in os.listdir(path) if not d.startswith(".")
                         and os.path.isdir(os.path.join(path, d)) and _local_data_files(os.path.join(path, d), None))
        own = [f for f in os.listdir(path) if any(f.lower().endswith(e) for e in _EXT_TO_BUILDER)]
        choices = ([f"one of {subsets}"] if subsets else []) + (["None (its own data files)"] if own else [])
        raise DataError(
            f"{path} has no subset folder {data_dir!r}: set --task.dataset-subset to "
            + (" or ".join(choices) if choices else "a folder of it holding data files") + "."
        )
    if data_files is not None:
        return
    try:
        splits = [str(s) for s in datasets.load_dataset_builder(path, name=config_name, data_dir=data_dir).config.data_files or {}]
    except Exception:  # the load itself reports it
        return
    if splits and split.split("[")[0] not in splits:
        where = f"{path}" + (f" (subset {data_dir})" if data_dir else "")
        raise DataError(f"{where} has splits {splits}, not {split!r}: {_SET_SPLIT}.")


def _load_split(path: str, split: str, *, data_dir, data_files, config_name, cache_dir):
    import datasets  # local import: keeps `import klq_jax.data` light

    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _SAVED_MARKERS):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has splits {list(loaded)}, not {split!r}: {_SET_SPLIT}.")
            return loaded[split]
        _require_single_split(path, split, "a save_to_disk directory of one Dataset")
        return loaded
    if os.path.isfile(path):
        lower = path.lower()
        builder = next((b for ext, b in sorted(_EXT_TO_BUILDER.items(), key=lambda kv: -len(kv[0]))
                        if lower.endswith(ext)), None)
        if builder is None:
            raise DataError(
                f"Cannot tell the format of {path}: use one of {sorted(_EXT_TO_BUILDER)}, or pass a "
                "directory in the hub dataset's layout."
            )
        _require_single_split(path, split, "a single data file")
        return datasets.load_dataset(builder, data_files={split: path}, split=split, cache_dir=cache_dir)
    if os.path.isdir(path):
        _check_local_layout(path, split, data_dir=data_dir, data_files=data_files, config_name=config_name)
        if cache_dir is None:
            cache_dir = _local_cache_dir(path)
    try:
        return datasets.load_dataset(
            path, name=config_name, data_dir=data_dir, data_files=data_files, split=split,
            cache_dir=cache_dir,
        )
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        message = f"Could not load split {split!r} of {path!r} (data_dir={data_dir!r}): {err}" + (
            "" if os.path.isdir(path) else "\nWithout network access, pass a local directory in the "
            "hub repo's layout or a data file instead of a hub name."
        )
        try:
            new_err = type(err)(message)
        except Exception:  # an exception class with another constructor: keep the original
            raise err
        raise new_err from err


def _arrow_table(rows):
    # One arrow table of the rows, honouring any indices mapping (select/shuffle); reading columns
    # through arrow is ~50x faster than iterating a datasets Column row by row.
    return rows.with_format("arrow")[0 : len(rows)]


def read_columns(rows, names: Sequence[str]) -> dict[str, list]:
    """Python lists of the named columns of a ``datasets.Dataset`` (fast, through arrow)."""
    table = _arrow_table(rows)
    return {name: table.column(name).to_pylist() for name in names}


def read_token_matrix(rows, name: str) -> np.ndarray:
    """``[N, T]`` int32 array of a column of equal-length token-id lists (e.g. ``query_token``)."""
    import pyarrow.compute as pc

    col = _arrow_table(rows).column(name).combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.int32)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if np.any(lengths != lengths[0]):
        raise ValueError(
            f"column {name!r} holds token lists of different lengths ({lengths.min()}..{lengths.max()}); "
            "pre-tokenised prompts must all be padded to one length."
        )
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.int64).reshape(n, int(lengths[0])).astype(np.int32)


def check_text_columns(columns: Mapping[str, Sequence[Any]], source: str) -> None:
    """Raise :class:`~klq_jax.errors.DataError` naming the rows whose fields are null or not text.

    Example:
      >>> try:
      ...     check_text_columns({"post": ["a", None, 3]}, "tldr:x.jsonl:train")
      ... except DataError as e:
      ...     print(e)  # doctest: +ELLIPSIS
      tldr:x.jsonl:train: field 'post' is null in row 1, field 'post' is int in row 2 (2 rows); ...
    """
    bad = []
    for name, values in columns.items():
        for i, v in enumerate(values):
            if not isinstance(v, str):
                bad.append((i, name, "null" if v is None else type(v).__name__))
    if bad:
        bad.sort()
        rows = len({i for i, _, _ in bad})
        listed = ", ".join(f"field {n!r} is {t} in row {i}" for i, n, t in bad[:5])
        raise DataError(
            f"{source}: {listed}{' …' if len(bad) > 5 else ''} ({rows} rows); every row needs text "
            "in these fields (rows count from 0 in the split): fix or remove those rows."
        )


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (N+/TRL encode prompts the same way with
    Pythia's tokenizer, which adds none)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def left_pad(token_lists: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad each token list to ``width``: ``(ids [N, width] int32, mask [N, width] float32)``.

    Example:
      >>> ids, mask = left_pad([[5, 6], [7]], 3, pad_id=0)
      >>> ids.tolist(), mask.tolist()
      ([[0, 5, 6], [0, 0, 7]], [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    """
    n = len(token_lists)
    ids = np.full((n, width), pad_id, dtype=np.int32)
    mask = np.zeros((n, width), dtype=np.float32)
    for i, toks in enumerate(token_lists):
        k = len(toks)
        if k > width:
            raise ValueError(f"prompt {i} has {k} tokens, more than the width {width}.")
        if k:
            ids[i, width - k :] = np.asarray(toks, dtype=np.int32)
            mask[i, width - k :] = 1.0
    return ids, mask


def mask_from_left_padded(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """``[N, T]`` float32 mask of a left-padded ``[N, T]`` id array: 0 on the leading run of
    ``pad_id`` and 1 from the first other token on (a pad id *inside* a prompt stays real).

    Example:
      >>> import numpy as np
      >>> mask_from_left_padded(np.array([[9, 9, 3, 9, 4]]), 9).tolist()
      [[0.0, 0.0, 1.0, 1.0, 1.0]]
    """
    ids = np.asarray(ids)
    return np.maximum.accumulate(ids != pad_id, axis=1).astype(np.float32)


def prompt_dataset_from_tokens(
    token_lists: Sequence[Sequence[int]],
    texts: Sequence[str],
    references: Sequence[str] | None,
    *,
    pad_id: int,
    max_length: int,
    width: int | None = None,
    drop_reasons: Mapping[str, int] | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    name: str = "",
    remedies: Mapping[str, str] | None = None,
) -> PromptDataset:
    """Drop prompts longer than ``max_length`` tokens (or empty), left-pad the rest.

    ``width`` is the padded width; None pads to the longest kept prompt. The drop counts are added
    to ``drop_reasons`` ("too_long", "empty") and logged. When no prompt is left, the error advises
    raising the budget only if rows were too long, and ``remedies[reason]`` for the other reasons
    that dropped rows.
    """
    reasons = dict(drop_reasons or {})
    keep = []
    for i, toks in enumerate(token_lists):
        if len(toks) == 0:
            reasons["empty"] = reasons.get("empty", 0) + 1
        elif len(toks) > max_length:
            reasons["too_long"] = reasons.get("too_long", 0) + 1
        else:
            keep.append(i)
    if not keep:
        advice = [f"raise the token budget (max_length={max_length})"] if reasons.get("too_long") else []
        advice += [text for reason, text in (remedies or {}).items() if reasons.get(reason)]
        raise DataError(
            f"{name or 'dataset'}: no prompt left of {len(token_lists) + sum((drop_reasons or {}).values())} "
            f"rows after filtering (dropped {({k: v for k, v in reasons.items() if v})}); "
            + (" or ".join(advice) if advice else "pass a dataset with rows that pass these filters") + "."
        )
    kept_tokens = [token_lists[i] for i in keep]
    if width is None:
        width = max(len(t) for t in kept_tokens)
    ids, mask = left_pad(kept_tokens, width, pad_id)
    reasons = {k: v for k, v in reasons.items() if v}
    dropped = int(sum(reasons.values()))
    if dropped:
        logger.warning("%s: dropped %d of %d rows %s", name or "dataset", dropped, dropped + len(keep), reasons)
    return PromptDataset(
        prompt_ids=ids,
        prompt_mask=mask,
        prompt_texts=[texts[i] for i in keep],
        references=None if references is None else [references[i] for i in keep],
        pad_id=int(pad_id),
        dropped=dropped,
        drop_reasons=reasons,
        extras={k: np.asarray(v)[keep] for k, v in (extras or {}).items()},
        name=name,
    )
