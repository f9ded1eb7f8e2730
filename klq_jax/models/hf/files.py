"""Files of a checkpoint directory: reading weights tensor by tensor, writing shards, and
directories that are replaced whole or not at all.

Nothing here knows an architecture; :mod:`klq_jax.models.hf.convert` maps names and layouts.

* :class:`WeightReader` finds ``<stem>.safetensors.index.json`` + shards, ``<stem>.safetensors``,
  ``pytorch_model.bin.index.json`` + shards or ``pytorch_model.bin``; safetensors are read with
  ``safe_open`` (numpy, no torch), ``.bin`` files with ``torch.load(weights_only=True, mmap=True)``.
  It reads **only regular files inside the directory**: an index whose ``weight_map`` names an
  absolute path or a path through ``..`` is refused (files may be symlinks, as in the Hugging Face
  cache, whose snapshot directories link to its blob store).
* :func:`write_weights` splits tensors into shards with ``huggingface_hub``'s
  ``split_state_dict_into_shards_factory`` and writes each shard with ``safetensors``, holding one
  shard's tensors in host memory at a time.
* :class:`AtomicDir` builds an output in a hidden temporary sibling and swaps it into place only
  when it is complete (an atomic exchange where the OS has one), so the destination is whole at
  every instant; leftovers of a killed earlier run are cleaned up (a set-aside old directory is
  restored if the destination is missing).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


# The files that make a tokenizer: TOKENIZER_FILES less generation_config.json, which every model
# directory has (copied along with the tokenizer, not part of it).
TOKENIZER_ONLY_FILES = tuple(n for n in TOKENIZER_FILES if n != "generation_config.json")


def tokenizer_files_in(directory: str | os.PathLike) -> list[str]:
    """The :data:`TOKENIZER_ONLY_FILES` present in ``directory``: empty for a model saved without its
    tokenizer, from which ``AutoTokenizer`` would quietly build an empty tokenizer."""
    return [n for n in TOKENIZER_ONLY_FILES if os.path.isfile(os.path.join(directory, n))]


def output_files(configs: tuple[str, ...], stems: tuple[str, ...]) -> str:
    """A regular expression matching the names of the files a conversion writes in its output
    directory: the ``configs``, the weights of each of ``stems`` (single file, or shards + index)
    and the tokenizer files it copies. A directory holding another name holds a file someone else
    put there."""
    st = "(" + "|".join(re.escape(n) for n in stems) + ")"
    return ("^(" + "|".join(re.escape(n) for n in configs) + rf"|{st}(-\d+-of-\d+)?\.safetensors"
            rf"|{st}\.safetensors\.index\.json|" + "|".join(re.escape(n) for n in TOKENIZER_FILES) + ")$")


# The names of the files :func:`klq_jax.models.hf.save_hf` writes in its directory: config.json, the
# weights (model/value_head) and the tokenizer files it copies.
SAVE_HF_FILES = output_files(("config.json",), ("model", "value_head"))


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says which file and what to do."""


def cast(arr, dtype: np.dtype, what: str) -> np.ndarray:
    """``arr`` as a numpy array of ``dtype``; finite values beyond float16's range (±65504), which
    the cast would make inf, are refused in one :class:`ConversionError` naming ``what`` (a tensor)
    and its largest magnitude.

    Example::

        >>> cast(np.array([1.0, 1e5], np.float32), np.dtype(np.float16), "Tensor 'x'")
        Traceback (most recent call last):
        ...
        klq_jax.models.hf.files.ConversionError: Tensor 'x' has values up to 1e+05, beyond float16's range (±65504): as float16 they would become inf. Convert to bfloat16 or float32 instead.
    """
    src = np.asarray(arr)
    with np.errstate(over="ignore"):
        out = src.astype(dtype, copy=False)
    if out.dtype == np.float16 and src.dtype != np.float16 and np.isinf(out).any():
        wide = src.astype(np.float32)
        finite = np.isfinite(wide)
        if (np.isinf(out) & finite).any():
            raise ConversionError(
                f"{what} has values up to {float(np.abs(wide[finite]).max()):.4g}, beyond float16's range "
                "(±65504): as float16 they would become inf. Convert to bfloat16 or float32 instead."
            )
    return out


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a clear :class:`ConversionError` if absent, corrupt or not an object."""
    if not path.is_file():
        raise ConversionError(f"{path} not found: {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(
            f"{path} could not be read as JSON ({e}); the file is corrupt or truncated: "
            "re-download or re-create it."
        ) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object; is it the right file?")
    return data


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _corrupt(file: Path, err: Exception) -> ConversionError:
    return ConversionError(
        f"Could not read {file}: {type(err).__name__}: {err}. The file is corrupt, truncated or not "
        "a checkpoint: re-download or re-create it."
    )


class _SafetensorsFile:
    def __init__(self, file: Path):
        from safetensors import safe_open

        self.file = file
        try:
            self._f = safe_open(str(file), framework="np")
            self._keys = list(self._f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise _corrupt(file, e) from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise _corrupt(self.file, e) from None


class _TorchFile:
    def __init__(self, file: Path):
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"{file} is a PyTorch .bin checkpoint; reading it needs torch (pip install torch), "
                "or convert it to safetensors first."
            ) from None
        self.file = file
        try:
            try:
                sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) serialisation cannot be memory-mapped.
                sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _corrupt(file, e) from None
        if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
            raise ConversionError(f"{file} does not hold a state dict of tensors; is it a model checkpoint?")
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key].detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _inside(directory: Path, fname: str, index: Path, key: str) -> Path:
    """``directory / fname`` if ``fname`` is a relative path that stays inside ``directory``."""
    parts = PurePath(fname).parts
    if not fname or PurePath(fname).is_absolute() or ".." in parts or "\\" in fname:
        raise ConversionError(
            f"{index} puts tensor '{key}' in {fname!r}, which is not a file inside {directory}: "
            "refusing to read outside the checkpoint directory. Fix the index (shards are named "
            "relative to it, e.g. 'model-00001-of-00002.safetensors')."
        )
    return directory / fname


class WeightReader:
    """Lazy, tensor-by-tensor access to the weights of a local checkpoint directory.

    Args:
      path: the directory.
      stems: file stems tried in order (``"model"`` for Hugging Face, ``"params"`` for ours); after
        them ``pytorch_model.bin[.index.json]``.

    Example::

        >>> r = WeightReader(some_hf_dir)                                      # doctest: +SKIP
        >>> r.shape("gpt_neox.layers.0.attention.query_key_value.weight")      # doctest: +SKIP
        (96, 32)
    """

    def __init__(self, path: str | os.PathLike, stems: tuple[str, ...] = ("model",), *, bin_files: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path} is not a directory; pass a local Hugging Face model directory.")
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        p = self.path
        candidates = [c for s in stems for c in (f"{s}.safetensors.index.json", f"{s}.safetensors")]
        if bin_files:
            candidates += ["pytorch_model.bin.index.json", "pytorch_model.bin"]
        for c in candidates:
            if (p / c).is_file():
                self._from_index(p / c) if c.endswith(".index.json") else self._from_single(c)
                break
        else:
            raise ConversionError(
                f"No weights found in {p}: expected one of {candidates} (+ shards). "
                f"Found: {sorted(x.name for x in p.iterdir())}."
            )

    def _from_single(self, fname: str):
        for key in self._open(fname).keys():
            self._where[key] = fname

    def _from_index(self, index: Path):
        data = read_json(index, "")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ConversionError(f"{index} has no valid 'weight_map'; the index is corrupt: re-download it.")
        for key, fname in wm.items():
            file = _inside(self.path, fname, index, key)
            if not file.is_file():
                what = "is not a regular file" if file.exists() else "is missing"
                raise ConversionError(
                    f"{index} lists tensor '{key}' in {fname}, but {file} {what}: "
                    "download every shard of the checkpoint."
                )
            self._where[key] = fname

    def _open(self, fname: str):
        if fname not in self._files:
            file = self.path / fname
            if fname.endswith(".safetensors"):
                self._files[fname] = _SafetensorsFile(file)
            else:
                # One .bin shard at a time: drop the previous one (memory-mapped, but keep it light).
                for k in [k for k in self._files if not k.endswith(".safetensors")]:
                    del self._files[k]
                self._files[fname] = _TorchFile(file)
        return self._files[fname]

    @property
    def files(self) -> list[str]:
        return sorted(set(self._where.values()))

    def names(self) -> list[str]:
        """Every stored tensor name, as on disk."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.path / self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        fname = self._where[name]
        f = self._open(fname)
        if name not in f.keys():
            raise ConversionError(
                f"The index of {self.path} puts tensor '{name}' in {fname}, but that file does not "
                "hold it: the index or the shard is corrupt; re-download the checkpoint."
            )
        return f.shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._open(self._where[name]).get(name)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    """A tensor to write: its shape, storage dtype and a function that produces it (on demand)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def check_shard_size(max_shard_size: int | str) -> int:
    """Bytes of ``max_shard_size`` (``5GB`` = 5·10^9, ``2GiB`` = 2·2^30, or an int), via huggingface_hub."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        n = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(str(max_shard_size))
    except ValueError:
        n = -1
    if n <= 0:
        raise ConversionError(
            f"max_shard_size={max_shard_size!r} is not a positive size; write e.g. '5GB', '500MB' or '2GiB'."
        )
    return n


def write_weights(
    directory: Path,
    tensors: Mapping[str, TensorSpec],
    *,
    stem: str = "model",
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` as ``<stem>.safetensors`` or shards + ``<stem>.safetensors.index.json``.

    The split is ``huggingface_hub.split_state_dict_into_shards_factory`` (the one transformers
    uses); each shard's tensors are produced, written with ``safetensors.numpy.save_file`` and freed
    before the next. Returns the written file names.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    check_shard_size(max_shard_size)
    split = split_state_dict_into_shards_factory(
        dict(tensors),
        get_storage_size=lambda t: t.nbytes,
        get_storage_id=lambda t: None,
        filename_pattern=stem + "{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    written = []
    for fname, names in split.filename_to_tensors.items():
        arrays = {}
        for n in names:
            t = tensors[n]
            arr = cast(t.produce(), t.dtype, f"Tensor '{n}'")
            if arr.shape != tuple(t.shape):
                raise ConversionError(f"Internal error: tensor {n} has shape {arr.shape}, expected {t.shape}")
            arrays[n] = np.ascontiguousarray(arr) if arr.ndim else arr.copy()
        try:
            save_file(arrays, str(directory / fname), metadata=dict(metadata or {}))
        except Exception as e:  # safetensors' own SafetensorError: an OSError if it is one
            raise _as_os_error(e, directory / fname) from e
        del arrays
        _sort_metadata(directory / fname)
        written.append(fname)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(f"{stem}.safetensors.index.json")
    return written


def _sort_metadata(file: Path) -> None:
    """Rewrite the header of the safetensors ``file`` in place with its ``__metadata__`` keys sorted:
    safetensors writes them in a per-process random order (a Rust ``HashMap``), so the same tensors
    and metadata would give different bytes in each run. The header keeps its length (same JSON,
    keys reordered); anything unexpected leaves the file as written."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.rstrip(b" ")
        doc = json.loads(text)
        meta = doc.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        doc["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        if new != text and len(new) == len(text):
            f.seek(8)
            f.write(new)


def _as_os_error(err: Exception, file: Path) -> Exception:
    """An :class:`OSError` (errno, ``file``) for a safetensors error that reports one
    (``... I/O error: No space left on device (os error 28)``); ``err`` itself otherwise."""
    m = re.search(r"\(os error (\d+)\)", str(err))
    if isinstance(err, OSError) or not m:
        return err
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(file))


def tokenizer_size(directory: str | os.PathLike) -> int | None:
    """``1 + the largest token id`` of the tokenizer files in ``directory`` (None if there are none).

    Reads ``tokenizer.json`` (its model vocabulary and added tokens), else ``vocab.json`` /
    ``vocab.txt`` with ``added_tokens.json``.
    """
    d = Path(directory)
    ids: list[int] = []
    if (d / "tokenizer.json").is_file():
        tj = read_json(d / "tokenizer.json", "")
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += [int(i) for i in vocab.values()]
        elif isinstance(vocab, list):
            ids.append(len(vocab) - 1)
        ids += [int(t["id"]) for t in tj.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
    else:
        if (d / "vocab.json").is_file():
            ids += [int(i) for i in read_json(d / "vocab.json", "").values()]
        elif (d / "vocab.txt").is_file():
            ids.append(len((d / "vocab.txt").read_text(encoding="utf-8").splitlines()) - 1)
        if (d / "added_tokens.json").is_file():
            ids += [int(i) for i in read_json(d / "added_tokens.json", "").values()]
    return max(ids) + 1 if ids else None


def copy_tokenizer(src: str | os.PathLike, dst: Path, *, required: bool, vocab_size: int | None = None):
    """Copy the tokenizer files of ``src`` into ``dst``; refuse a tokenizer larger than the embedding."""
    src = Path(src)
    found = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if required and not tokenizer_files_in(src):
        where = f"{src} (no such directory)" if not src.is_dir() else f"{src} (looked for {list(TOKENIZER_ONLY_FILES)})"
        raise ConversionError(
            f"No tokenizer files in {where}; pass the directory that holds tokenizer.json / "
            "tokenizer_config.json."
        )
    if vocab_size is not None:
        n = tokenizer_size(src)
        if n is not None and n > vocab_size:
            raise ConversionError(
                f"The tokenizer in {src} has {n} tokens but the model's embedding has only "
                f"{vocab_size} rows: token ids >= {vocab_size} would index past it. Pass the "
                "tokenizer the model was trained with (or resize the embedding first)."
            )
    for n in found:
        shutil.copy2(src / n, dst / n)


# ------------------------------------------------------------------------------------------------
# Directories
# ------------------------------------------------------------------------------------------------


def refuse_overlap(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Raise unless ``src`` and ``dst`` are disjoint (neither is the other or inside the other).

    Writing DST replaces it whole, so a DST that is SRC or holds SRC would delete the input.
    """
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d:
        why = "are the same directory"
    elif d in s.parents:
        why = "overlap: DST contains SRC (replacing DST would delete SRC)"
    elif s in d.parents:
        why = "overlap: DST is inside SRC"
    else:
        return
    raise ConversionError(f"SRC {src} and DST {dst} {why}; write the output to a separate directory.")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def cannot_create(path: str | os.PathLike, err: OSError, *, what: str, option: str,
                  error: Callable[[str], Exception] = OSError) -> Exception:
    """The one-line ``error`` for a directory ``path`` the OS would not create (``err``), naming
    ``path`` (never a temp name of ours) and what to do: the one wording of every command.

    Example::

        >>> import errno
        >>> str(cannot_create("runs/x", OSError(errno.EROFS, "Read-only file system", "runs/.x.tmp"),
        ...                   what="the run directory", option="--out-dir"))
        'Cannot create the run directory runs/x (OSError: Read-only file system); choose a writable --out-dir.'
    """
    return error(f"Cannot create {what} {os.fspath(path)} ({type(err).__name__}: {err.strerror or err}); "
                 f"choose a writable {option}.")


def cannot_write(path: str | os.PathLike, err: OSError, *, what: str, option: str,
                 error: Callable[[str], Exception] = OSError) -> Exception:
    """The one-line ``error`` for writing into the directory ``path`` that failed with ``err``
    (a full disk, an I/O error), naming ``path`` (never a temp name of ours) and what to do.

    Example::

        >>> import errno
        >>> str(cannot_write("out/ck", OSError(errno.ENOSPC, "No space left on device", "out/.ck.tmp-1/x"),
        ...                  what="the output directory", option="output directory"))
        'Could not write the output directory out/ck (OSError: No space left on device); free disk space or choose another output directory.'
    """
    full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return error(f"Could not write {what} {os.fspath(path)} ({type(err).__name__}: {err.strerror or err}); "
                 + ("free disk space or choose another " if full else "choose another writable ") + f"{option}.")


def make_dir(path: str | os.PathLike, *, what: str, option: str,
             error: Callable[[str], Exception] = OSError) -> bool:
    """Create the directory ``path`` and its parents unless it is one; return whether it was absent.

    ``path`` not a directory (a file, a broken link) or not creatable (a read-only or full file
    system, a file on the way, no permission) raises ``error`` with one line naming ``path`` and
    ``option`` (what the user sets it with, e.g. ``--out-dir``); see :func:`cannot_create`.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise error(f"{option} {os.fspath(path)} is not a directory; choose another {option}.")
    created = not os.path.lexists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise cannot_create(path, err, what=what, option=option, error=error) from err
    return created


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (ours included; one we may not signal
    counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Delete ``path``: a symlink (or file) itself, never what it points to; a directory with all
    it holds. What cannot be deleted stays (a later :func:`clean_stale` tries again)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _leftover_match(name: str, of: str):
    return re.match(rf"^\.{re.escape(of)}\.(tmp|old)-(\d+)-[0-9a-f]+$", name)


def is_leftover(name: str, of: str) -> bool:
    """Whether ``name`` is a sibling :class:`AtomicDir` writes beside the directory named ``of``
    (``.<of>.tmp-<pid>-*`` or ``.<of>.old-<pid>-*``; :func:`clean_stale` removes dead ones)."""
    return _leftover_match(name, of) is not None


def clean_stale(path: Path) -> list[str]:
    """Remove leftovers of killed writers of ``path``; restore a set-aside old copy if ``path`` is gone.

    Leftovers are the hidden siblings ``.<name>.tmp-<pid>-*`` (a half-written output) and
    ``.<name>.old-<pid>-*`` (the previous output, set aside during an overwrite) whose process no
    longer runs; one that is a symlink (a DST that was a link, replaced) is unlinked, its target
    left alone. Returns what was done, one line each.
    """
    done = []
    parent = path.parent
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        m = _leftover_match(entry.name, path.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(path):
            os.rename(entry, path)
            done.append(f"restored {path} from {entry.name}")
        else:
            _remove(entry)
            done.append(f"removed {entry}")
    return done


class AtomicDir:
    """Write into a temporary sibling directory; swap it into ``path`` when complete, delete on error.

    ``path`` is whole at every instant: before the swap it is the old directory (or absent), after
    it the new one. With ``overwrite=False`` a non-empty ``path`` is refused; with ``overwrite=True``
    a non-empty directory ``path`` is replaced only if ``replaceable(path)`` (which raises to refuse)
    lets it. A ``path`` that is a symlink to a directory is replaced as a link: the new directory
    takes its place, the directory it pointed to is not touched (nor checked).

    Every failure is one :class:`ConversionError` line naming ``path`` (never the temp sibling, which
    is removed): a mount point ``path`` (it cannot be replaced) is refused before anything is
    written; a write into the temp directory that fails (a full disk) says so
    (:func:`cannot_write`); without ``overwrite`` a ``path`` another process filled meanwhile is left
    alone; a swap the OS refuses leaves ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool,
                 replaceable: Callable[[Path], None] | None = None):
        self.path = Path(path)
        self.overwrite = overwrite
        self.replaceable = replaceable

    def __enter__(self) -> Path:
        if self.path.name in ("", ".."):  # "." or "..": a directory that cannot be renamed or replaced
            raise ConversionError(f"{self.path} is the current directory or a parent of it; name the output "
                                  "directory itself (e.g. ../NAME).")
        clean_stale(self.path)
        if os.path.lexists(self.path) and not self.path.is_dir():
            what = "a broken symlink" if not os.path.exists(self.path) else "not a directory"
            raise ConversionError(f"{self.path} exists and is {what}; choose another output path.")
        if os.path.ismount(self.path):  # the swap could not replace it (EBUSY): refuse before writing
            raise ConversionError(
                f"{self.path} is a mount point, which a conversion cannot replace; convert into a new "
                f"directory inside it, e.g. {self.path / 'model'}."
            )
        if self.path.is_dir() and any(self.path.iterdir()):
            if not self.overwrite:
                raise ConversionError(
                    f"{self.path} exists and is not empty; choose a new output directory (--overwrite "
                    "replaces only a previous conversion output: a klq_jax checkpoint or a Hugging Face "
                    "export)."
                )
            if self.replaceable is not None and not self.path.is_symlink():
                self.replaceable(self.path)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:  # a read-only or full location: name the path asked for, not our temp sibling
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as err:
            raise cannot_create(self.path, err, what="the output directory", option="output directory",
                                error=ConversionError) from err
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def _ours(self, err: OSError) -> bool:
        """Whether ``err`` is a failure to write into our temp directory (no file named, or one of ours)."""
        return all(f is None or os.fspath(f).startswith(os.fspath(self.tmp)) for f in (err.filename, err.filename2))

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and self._ours(exc):  # a full disk: name DST, not our temp
                raise cannot_write(self.path, exc, what="the output directory", option="output directory",
                                   error=ConversionError) from exc
            return False
        try:
            self._swap()
        except OSError as err:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConversionError(
                f"Could not put the new output in place at {self.path} ({type(err).__name__}: "
                f"{err.strerror or err}); {self.path} is left as it was: convert into a new directory "
                f"(e.g. {self.path.parent / (self.path.name + '-new')})."
            ) from err
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _swap(self):
        if not self.overwrite and not self.path.is_symlink():
            # Empty or absent at __enter__: a plain rename, which replaces an empty directory and
            # fails on one another process filled meanwhile (atomically: no check-then-act window).
            try:
                os.rename(self.tmp, self.path)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise ConversionError(
                    f"{self.path} was written by another process meanwhile (it was empty or absent when "
                    "this conversion started); it is left as it is and this output discarded: choose "
                    "another output directory."
                ) from err
            return
        if not os.path.lexists(self.path):
            os.rename(self.tmp, self.path)
            return
        if _exchange(self.tmp, self.path):  # self.tmp now holds the old directory (or link)
            _remove(self.tmp)
            return
        # No atomic exchange here: set the old one aside, move the new one in, restore on failure.
        # A kill between the two renames leaves .<name>.old-<pid>-*; clean_stale restores it.
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(self.path, old)
        try:
            os.rename(self.tmp, self.path)
        except BaseException:
            os.rename(old, self.path)
            raise
        _remove(old)
