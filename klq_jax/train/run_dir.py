"""The run directory: who owns it, what may resume it, and how its files are (re)written.

Rules (README "Run directories"):

* **Ownership.** A training process holds ``<out_dir>/.klq-run.lock`` (an exclusive ``flock`` plus
  its pid, host name and start time) for as long as it runs; a second writer is refused with the
  holder's pid and host. The kernel drops the lock when the process dies, even by SIGKILL, so a
  stale lock file from a dead process is taken over (and said so).
* **Starting.** A directory that already holds a run (``config.json``, ``metrics.jsonl``,
  ``checkpoints/``, ``policy/``, …) refuses to start a new one, naming what it found, unless
  ``resume`` (continue it) or ``overwrite`` (delete those run files first) is set. ``overwrite``
  deletes only what is recognisably the trainer's (:func:`foreign_run_entries`: a ``config.json``
  that parses as a training config, numbered checkpoints, event files, …); anything else under those
  names (an ``--out-dir`` pointed at a Hugging Face model directory, whose ``config.json`` is the
  model's) is refused by name and nothing is deleted; without ``overwrite`` such a directory,
  holding none of the trainer's entries, is refused as what it is (no run), naming them too.
  ``resume`` with no checkpoint is an error unless ``allow_fresh`` is set.
* **Resuming.** The checkpoint records the config; a resumed run compares it field by field with
  the new one. Only :data:`RESUMABLE_FIELDS` (logging, progress, cadence of saves/samples, where
  the run lives, mesh layout) may differ; any other difference is refused by name.
* **Writing.** Every rewrite of a run file is write-to-temp + ``fsync`` + rename
  (:func:`atomic_write`); ``metrics.jsonl``/``samples.jsonl`` are cut back to the resumed
  checkpoint that way, and TensorBoard event files are rewritten without the steps after it
  (:func:`purge_tensorboard`), so a resumed run has every step exactly once. TensorBoard events are
  written synchronously and flushed every iteration (before the checkpoint).

For fault-injection tests, ``KLQ_PHASE_MARKERS=1`` makes :func:`phase` print ``klq-phase NAME
ITERATION`` lines to stderr at each phase of the loop, and ``KLQ_PHASE_HOLD=NAME@K`` makes the
process stop (sleep) at the first marker ``NAME`` whose iteration is ``>= K``, to be killed there.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import time
from typing import Any, Callable, Mapping

from klq_jax.errors import (
    ForeignFilesError,
    NoCheckpointError,
    ResumeConfigError,
    RunDirError,
    RunExistsError,
    RunLockedError,
)
from klq_jax.models.hf.files import SAVE_HF_FILES, make_dir, pid_alive

logger = logging.getLogger(__name__)

LOCK_NAME = ".klq-run.lock"
TMP_PREFIX = ".klq-tmp."
TRASH_NAME = ".klq-trash"

# Entries of a run directory written by the trainer (what --overwrite deletes).
RUN_ENTRIES = (
    "config.json", "metrics.jsonl", "samples.jsonl", "tb", "checkpoints", "skipped_checkpoints",
    "policy", "eval",
)

# Config fields (dotted for nested ones) that may differ between a checkpoint and a resumed run:
# they change where and how the run is logged/saved, never what it computes. In three groups:
# where the run lives, its logging and its checkpoint cadence (what ``klq sweep`` ignores too);
# the device layout; and the validation's cadence and prompts.
BOOKKEEPING_FIELDS = frozenset({
    "out_dir", "resume", "overwrite", "allow_fresh",
    "progress", "tensorboard", "log_samples_every", "num_logged_samples",
    "save_every", "keep_checkpoints",
})
LAYOUT_FIELDS = frozenset({"mesh.data", "mesh.fsdp", "mesh.tensor", "score_micro_batch_size"})
VALIDATION_FIELDS = frozenset({"eval_every", "eval_prompts", "eval_batch_size", "eval_modes", "eval_seed"})
RESUMABLE_FIELDS = BOOKKEEPING_FIELDS | LAYOUT_FIELDS | VALIDATION_FIELDS


# ------------------------------------------------------------------------------------------
# Phase markers (fault-injection hook)
# ------------------------------------------------------------------------------------------


def phase(name: str, iteration: int) -> None:
    """Mark a phase of the loop (no-op unless ``KLQ_PHASE_MARKERS`` is set; see the module doc)."""
    if not os.environ.get("KLQ_PHASE_MARKERS"):
        return
    print(f"klq-phase {name} {iteration}", file=sys.stderr, flush=True)
    hold = os.environ.get("KLQ_PHASE_HOLD", "")
    if "@" in hold:
        hold_name, _, at = hold.partition("@")
        if hold_name == name and iteration >= int(at):
            print(f"klq-phase held {name} {iteration}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


# ------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------


def _tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f"{TMP_PREFIX}{base}.{os.getpid()}")


def atomic_write(path: str, data: str | bytes, *, marker: tuple[str, int] | None = None) -> None:
    """Replace ``path`` by ``data`` atomically: write a temp file beside it, fsync, rename.

    A reader (or a resumed run after a kill) sees the old file or the new one, never a mix.
    ``marker``: a :func:`phase` to mark between the write and the rename.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> atomic_write(p, "one\\n"); open(p).read()
        'one\\n'
    """
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    if marker is not None:
        phase(*marker)
    os.replace(tmp, path)


def truncate_jsonl(path: str, max_iteration: int) -> int:
    """Keep the lines of ``path`` whose ``"iteration"`` is ``<= max_iteration`` (atomically).

    Unparsable lines (a line cut by a kill) go too. Returns the number of lines dropped.
    """
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                ok = int(json.loads(line)["iteration"]) <= max_iteration and line.endswith(b"\n")
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        atomic_write(path, b"".join(keep), marker=("rewrite", max_iteration))
    return dropped


# ------------------------------------------------------------------------------------------
# Ownership
# ------------------------------------------------------------------------------------------


def _read_lock_info(path: str) -> dict:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(info: dict) -> str:
    if not info:
        return "another process"
    started = info.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``.klq-run.lock`` + pid/host inside).

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> lock = RunLock.acquire(d)
        >>> try:
        ...     RunLock.acquire(d)
        ... except RunLockedError as e:
        ...     print("refused")
        refused
        >>> lock.release()
        >>> RunLock.acquire(d).release()
    """

    def __init__(self, out_dir: str, fd: int, path: str):
        self.out_dir, self.fd, self.path = out_dir, fd, path

    @classmethod
    def acquire(cls, out_dir: str) -> "RunLock":
        path = os.path.join(out_dir, LOCK_NAME)
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunDirError(
                    f"Cannot write in the run directory {out_dir} ({type(err).__name__}: "
                    f"{err.strerror or err}); choose a writable --out-dir."
                ) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_lock_info(path)
                os.close(fd)
                raise RunLockedError(
                    f"{out_dir} is in use by another training run ({_describe_holder(info)}): wait for "
                    "it to finish, or choose another --out-dir."
                ) from None
            # The file may have been removed (a holder released it) between open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = _read_lock_info(path)
            host = socket.gethostname()
            if info and info.get("host") not in (None, host):
                os.close(fd)
                raise _other_host_lock(out_dir, path, info, "start again")
            if info and info.get("pid") not in (None, os.getpid()):
                state = "dead" if not pid_alive(int(info["pid"])) else "no longer holding it"
                logger.warning(
                    "Took over the stale lock of %s in %s (%s).", _describe_holder(info), out_dir, state
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode(), 0)
            os.fsync(fd)
            return cls(out_dir, fd, path)
        raise RunLockedError(f"Could not lock {out_dir}: its lock file keeps changing; is another run starting there?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def describe_run(out_dir: str) -> list[str]:
    """What in ``out_dir`` belongs to a run (empty: no run there)."""
    found = []
    if not os.path.isdir(out_dir):
        return found
    for name in RUN_ENTRIES:
        p = os.path.join(out_dir, name)
        if not os.path.exists(p):
            continue
        if name == "metrics.jsonl":
            with open(p, "rb") as f:
                n = sum(1 for _ in f)
            found.append(f"metrics.jsonl ({n} lines)")
        elif name == "checkpoints":
            steps = checkpoint_steps(out_dir)
            if steps:
                found.append("checkpoints " + ", ".join(map(str, steps)))
        elif name in ("tb", "skipped_checkpoints", "policy", "eval"):
            if os.path.isdir(p) and os.listdir(p):
                found.append(f"{name}/")
        else:
            found.append(name)
    return found


# ------------------------------------------------------------------------------------------
# What is ours: what --overwrite (and klq demo) may delete or replace
# ------------------------------------------------------------------------------------------

# Fields every config.json the trainer writes has (besides others, e.g. klq train's ``task``).
TRAIN_CONFIG_KEYS = frozenset({"algo", "optim", "rollouts_per_batch", "total_episodes", "out_dir"})


def recorded_config(path: str, cls: type, required=frozenset()):
    """The config ``cls`` recorded in the JSON file ``path`` (a run's or a demo's ``config.json``),
    or None when the file is not one: unreadable, not a JSON object, without one of the
    ``required`` fields, or with a value ``cls`` refuses. Fields that ``cls`` does not have (a
    subclass's, such as klq train's ``task``) are left out.

    Example::

        >>> import tempfile, os
        >>> from klq_jax.config import TrainConfig
        >>> p = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> atomic_write(p, json.dumps(config_to_json(TrainConfig(seed=3))))
        >>> recorded_config(p, TrainConfig, TRAIN_CONFIG_KEYS).seed
        3
        >>> atomic_write(p, '{"model_type": "gpt_neox", "hidden_size": 64}')  # a model's config
        >>> recorded_config(p, TrainConfig, TRAIN_CONFIG_KEYS) is None
        True
    """
    from klq_jax.config import from_dict

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not set(required) <= set(data):
        return None
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return from_dict(cls, {k: v for k, v in data.items() if k in known}, where=path)
    except (ValueError, TypeError):
        return None


def _train_config(path: str) -> str | None:
    from klq_jax.config import TrainConfig

    if not os.path.isfile(path):
        return "not a file"
    return None if recorded_config(path, TrainConfig, TRAIN_CONFIG_KEYS) is not None else "not a klq training config"


def _iteration_log(path: str) -> str | None:
    """metrics.jsonl / samples.jsonl: empty, or a first line that is a JSON object with ``iteration``."""
    if not os.path.isfile(path):
        return "not a file"
    with open(path, "rb") as f:
        first = f.readline()
    try:
        ok = not first or "iteration" in json.loads(first)
    except (ValueError, TypeError):
        ok = False
    return None if ok else "not a log of training iterations"


def _dir_of(pattern: str, what: str) -> Callable[[str], str | None]:
    """A check: a directory whose entries all match ``pattern`` (or are our temp files/trash)."""
    rx = re.compile(pattern)

    def check(path: str) -> str | None:
        if not os.path.isdir(path):
            return "not a directory"
        other = sorted(n for n in os.listdir(path)
                       if not (rx.search(n) or n.startswith(TMP_PREFIX) or n == TRASH_NAME))
        return f"holds {other[0]}, not only {what}" if other else None

    return check


# A directory holding only what save_hf writes (a policy/ export, the demo's sft-hf/).
hf_export_dir = _dir_of(SAVE_HF_FILES, "the files of a Hugging Face export")


def _export(path: str) -> str | None:
    """policy/: a directory of export files beside the trainer's config.json (the export of that run)."""
    if not os.path.isdir(path):
        return "not a directory"
    if os.listdir(path) and _train_config(os.path.join(os.path.dirname(path), "config.json")) is not None:
        return "no klq training config.json beside it"
    return hf_export_dir(path)


# How each entry of RUN_ENTRIES is recognised as the trainer's (None) or not (the reason).
RUN_ENTRY_CHECKS: dict[str, Callable[[str], str | None]] = {
    "config.json": _train_config,
    "metrics.jsonl": _iteration_log,
    "samples.jsonl": _iteration_log,
    "tb": _dir_of(r"tfevents", "TensorBoard event files"),
    "checkpoints": _dir_of(r"^\d+($|\.)", "numbered checkpoints"),
    "skipped_checkpoints": _dir_of(r"^\d+($|\.)", "numbered checkpoints"),
    "policy": _export,
    "eval": _dir_of(r"^completions\.jsonl$", "the validation's completions.jsonl"),
}
assert set(RUN_ENTRY_CHECKS) == set(RUN_ENTRIES)


def foreign_entries(path: str, checks: Mapping[str, Callable[[str], str | None]], *, only_these: bool = False,
                    ignore: Callable[[str], bool] | None = None, writer: str = "klq") -> list[str]:
    """``"NAME (why)"`` for each entry of the directory ``path`` that klq did not write there, and
    so must neither delete nor replace: an entry named in ``checks`` whose check (called with its
    path) gives a reason, or that is a symbolic link (klq writes none); with ``only_these``, every
    entry not named in ``checks`` too (except the lock, our temp files and trash, and the names
    ``ignore`` accepts). Empty when ``path`` is not a directory."""
    if not os.path.isdir(path):
        return []
    found = []
    for name in sorted(os.listdir(path)):
        if name in (LOCK_NAME, TRASH_NAME) or name.startswith(TMP_PREFIX) or (ignore and ignore(name)):
            continue
        p = os.path.join(path, name)
        if name not in checks:
            if only_these:
                found.append(f"{name} (not written by {writer})")
            continue
        why = "a symbolic link" if os.path.islink(p) else checks[name](p)
        if why:
            found.append(f"{name} ({why})")
    return found


def foreign_run_entries(out_dir: str) -> list[str]:
    """The entries of :data:`RUN_ENTRIES` in ``out_dir`` that are not recognisably the trainer's
    (``"NAME (why)"``): what ``overwrite`` refuses to delete. Example: the ``config.json`` of a
    Hugging Face model directory, which is not a training config."""
    return foreign_entries(out_dir, RUN_ENTRY_CHECKS)


def training_run_entries(out_dir: str) -> list[str]:
    """What in ``out_dir`` shows that it is a ``klq train`` run directory (empty: it is not one):
    a ``config.json`` that is a training config, numbered checkpoints. Other tools (``klq demo``)
    refuse such a directory whatever their ``--overwrite``: it is the trainer's to replace."""
    found = []
    cfg = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg) and not os.path.islink(cfg) and _train_config(cfg) is None:
        found.append("config.json (a klq training config)")
    steps = checkpoint_steps(out_dir)
    if steps:
        found.append("checkpoints " + ", ".join(map(str, steps)))
    return found


def remove_leftovers(out_dir: str) -> None:
    """Temp files and trash of dead processes (we hold the lock, so no live writer owns them)."""
    for root in (out_dir, os.path.join(out_dir, "tb"), os.path.join(out_dir, "eval")):
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX) or name == TRASH_NAME:
                p = os.path.join(root, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.remove(p)


def holds_no_result(path: str, also_ours: tuple[str, ...] = ()) -> bool:
    """Whether the directory ``path`` holds only the trainer's entries (and ``also_ours``) and no
    result: no metrics or samples row, checkpoint, export, evaluation or skipped checkpoint."""
    ours = set(RUN_ENTRIES) | {LOCK_NAME, TRASH_NAME} | set(also_ours)
    for name in os.listdir(path):
        if name not in ours and not name.startswith(TMP_PREFIX):
            return False
    for name in ("metrics.jsonl", "samples.jsonl"):
        p = os.path.join(path, name)
        if os.path.exists(p) and os.path.getsize(p) > 0:
            return False
    if any(os.path.lexists(os.path.join(path, n)) for n in ("policy", "eval", "skipped_checkpoints")):
        return False
    return not _has_checkpoint(path)


def _other_host_lock(out_dir: str, lock: str, info: dict, then: str) -> RunLockedError:
    """The refusal of a lock written on another host: its process cannot be checked from here."""
    return RunLockedError(
        f"{out_dir} was locked by {_describe_holder(info)}, which this host ({socket.gethostname()}) "
        f"cannot check. If no run is using it, delete {lock} and {then}."
    )


def refuse_live_holder(out_dir: str, instead: str = "choose another --out-dir") -> None:
    """Raise :class:`RunLockedError` if a live process on this host holds ``out_dir``'s lock, or
    a process on another host wrote it (it cannot be checked from here: :class:`RunLock` refuses
    it too). A check without taking the lock, to fail fast; :class:`RunLock` is the real one.
    ``instead``: the message's other way out."""
    lock = os.path.join(out_dir, LOCK_NAME)
    info = _read_lock_info(lock) if os.path.exists(lock) else {}
    if info and info.get("host") not in (None, socket.gethostname()):
        raise _other_host_lock(out_dir, lock, info, f"try again, or {instead}")
    if info and info.get("host") == socket.gethostname() and info.get("pid") != os.getpid():
        if pid_alive(int(info.get("pid", 0) or 0)):
            try:  # the pid may have been reused: only a held flock means a live run
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    raise RunLockedError(
                        f"{out_dir} is in use by another training run ({_describe_holder(info)}): "
                        f"wait for it to finish, or {instead}."
                    ) from None
                finally:
                    os.close(fd)


def preflight(out_dir: str, *, resume: bool, overwrite: bool, allow_fresh: bool = False) -> None:
    """The run-directory checks of :meth:`RunDir.open` that need no lock: call it before loading
    models so that a refused start fails fast. Raises what :meth:`RunDir.open` would."""
    if resume and overwrite:
        from klq_jax.errors import ConfigError

        raise ConfigError("resume and overwrite exclude each other: --resume continues the run in "
                          "out_dir, --overwrite deletes it; pass one of them.")
    refuse_live_holder(out_dir)
    if resume and not allow_fresh and not _has_checkpoint(out_dir):
        found = describe_run(out_dir)
        raise NoCheckpointError(
            f"--resume: {out_dir} holds no checkpoint to continue"
            + (f" (found {', '.join(found)})" if found else " (no run there: is the --out-dir right?)")
            + ". Drop --resume to start a new run (with --overwrite if the directory holds one), or "
            "add --allow-fresh to start from scratch when there is no checkpoint."
        )
    if not resume and not overwrite:
        found = describe_run(out_dir)
        foreign = foreign_run_entries(out_dir)
        if found and len(foreign) == sum(os.path.lexists(os.path.join(out_dir, n)) for n in RUN_ENTRIES):
            raise ForeignFilesError(  # none of the trainer's: e.g. a Hugging Face model's config.json
                f"{out_dir} holds no klq train run but files of another kind under a run's names: "
                f"{'; '.join(foreign)}; choose another --out-dir (a new or empty directory)."
            )
        if found:
            raise RunExistsError(
                f"{out_dir} already holds a run ({', '.join(found)}). Continue it with --resume, "
                "delete it and start again with --overwrite, or choose another --out-dir."
            )
    if overwrite:
        foreign = foreign_run_entries(out_dir)
        if foreign:
            raise ForeignFilesError(
                f"--overwrite deletes only a previous run's files, and {out_dir} holds some that klq "
                f"train did not write: {'; '.join(foreign)}. Nothing was deleted: move them away "
                "yourself, or choose another --out-dir."
            )


def claim(out_dir: str, check: Callable[[str], None]) -> tuple[RunLock, bool]:
    """Take the directory ``out_dir`` for one writer: ``check(out_dir)`` (raising refuses), create
    the directory, lock it (:class:`RunLock`; a dead holder's stale lock is taken over), remove the
    leftovers of dead processes, and ``check`` again under the lock (another writer may have
    started in between). Returns the lock (the caller releases it) and whether the directory was
    created. Used by :meth:`RunDir.open` and ``klq demo``.

    Raises:
      RunDirError: ``out_dir`` cannot be created or is not a directory; RunLockedError: a live
      process holds it; whatever ``check`` raises.
    """
    check(out_dir)
    created = make_dir(out_dir, what="the run directory", option="--out-dir", error=RunDirError)
    lock = RunLock.acquire(out_dir)
    try:
        remove_leftovers(out_dir)
        check(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock, created


def checkpoint_steps(out_dir: str) -> list[int]:
    """The steps of the complete checkpoints in ``out_dir/checkpoints`` (orbax renames a
    checkpoint to its bare number once written), ascending; empty without any."""
    d = os.path.join(out_dir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _has_checkpoint(out_dir: str) -> bool:
    return bool(checkpoint_steps(out_dir))


class RunDir:
    """An owned run directory: locked, checked against ``resume``/``overwrite``, cleaned of the
    temp files of dead processes. Use :meth:`open` and :meth:`close` (or ``with``)."""

    def __init__(self, path: str, lock: RunLock | None, created: bool = False):
        self.path, self.lock, self.created = path, lock, created

    @classmethod
    def open(cls, out_dir: str, *, resume: bool, overwrite: bool, allow_fresh: bool = False,
             owner: bool = True) -> "RunDir":
        """Take ``out_dir`` for a run (see the module docstring for the rules).

        ``owner=False`` (processes other than 0 of a multi-process run): no lock, no checks.

        Raises:
          RunDirError: unwritable; RunLockedError: another live run holds it; RunExistsError: it
          holds a run and neither ``resume`` nor ``overwrite`` is set; NoCheckpointError:
          ``resume`` without a checkpoint (and not ``allow_fresh``); ForeignFilesError:
          ``overwrite`` would delete entries the trainer did not write; ConfigError: both flags.
        """
        out_dir = os.path.abspath(out_dir)
        if not owner:  # process 0 checks and owns the directory; the others see its lock and files
            return cls(out_dir, None)
        lock, created = claim(out_dir, lambda d: preflight(d, resume=resume, overwrite=overwrite,
                                                           allow_fresh=allow_fresh))
        try:
            if overwrite:  # the preflight under the lock found nothing but the trainer's entries
                found = describe_run(out_dir)
                if found:
                    logger.warning("--overwrite: deleting the run in %s (%s)", out_dir, ", ".join(found))
                    trash = os.path.join(out_dir, TRASH_NAME)
                    os.makedirs(trash, exist_ok=True)
                    for name in RUN_ENTRIES:
                        p = os.path.join(out_dir, name)
                        if os.path.lexists(p):
                            os.rename(p, os.path.join(trash, name))
                    shutil.rmtree(trash)
        except BaseException:
            lock.release()
            raise
        return cls(out_dir, lock, created=created)

    def discard_if_new(self) -> bool:
        """After a run failed: remove the directory if this process created it and it holds no
        result (no metrics row, checkpoint, sample, export or anything not the trainer's), so
        that a run refused at its start leaves nothing behind. Returns whether it was removed."""
        if self.lock is None or not self.created or not os.path.isdir(self.path) or not holds_no_result(self.path):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()
        return True

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------
# Resume compatibility
# ------------------------------------------------------------------------------------------


def config_to_json(cfg) -> dict:
    """A config dataclass as plain JSON values (what checkpoints and ``config.json`` record):
    :func:`klq_jax.config.to_dict` through a JSON round trip (tuples become lists)."""
    from klq_jax.config import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, cfg) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` of every field (dotted) that differs, resumable or not.

    A field the saved config lacks (added by a newer version) counts as its default value.
    """
    new = _flatten(config_to_json(cfg))
    old = _flatten(saved)
    try:
        defaults = _flatten(config_to_json(type(cfg)()))
    except Exception:  # a config class without defaults
        defaults = {}
    diffs = []
    for key in sorted(set(new) | set(old)):
        a = old.get(key, defaults.get(key, "<absent>"))
        b = new.get(key, "<absent>")
        if a != b:
            diffs.append((key, a, b))
    return diffs


def check_resume_config(saved: dict | None, cfg, *, where: str) -> None:
    """Refuse to resume with a config whose meaning differs from ``saved`` (the fields named).

    Raises:
      ResumeConfigError: a field outside :data:`RESUMABLE_FIELDS` differs.

    Example::

        >>> from klq_jax.config import TrainConfig
        >>> saved = config_to_json(TrainConfig(seed=0))
        >>> check_resume_config(saved, TrainConfig(seed=0, progress=False), where="checkpoint 2")
        >>> try:
        ...     check_resume_config(saved, TrainConfig(seed=1), where="checkpoint 2")
        ... except ResumeConfigError as e:
        ...     print(str(e)[:62])
        Cannot resume from checkpoint 2: seed differs (saved 0, now 1)
    """
    if saved is None:
        logger.warning("%s records no config: cannot check that --resume continues the same run.", where)
        return
    bad = [(k, a, b) for k, a, b in config_differences(saved, cfg) if k not in RESUMABLE_FIELDS]
    if bad:
        parts = ", ".join(f"{k} differs (saved {a!r}, now {b!r})" for k, a, b in bad[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise ResumeConfigError(
            f"Cannot resume from {where}: {parts}{more}; these change what the run computes. Resume "
            "with the saved values, or start a new run in another --out-dir. Only "
            + ", ".join(sorted(RESUMABLE_FIELDS))
            + " may change on --resume."
        )


_MODEL_WHAT = {"policy": "the initial policy (task.policy)", "reference": "the reference policy π_b"}


def check_resume_models(saved: dict | None, current: dict, *, where: str, rtol: float = 1e-4) -> None:
    """Refuse to resume when the models loaded now are not the ones the run started from.

    ``saved``/``current``: ``{"policy": fingerprint, "reference": fingerprint}``
    (:func:`klq_jax.checkpoint.params_fingerprint`). The config names a model by its path; this
    catches a path that now holds other weights (a re-run SFT into the same directory, another
    KLQ_LOCAL_MODELS copy), which would silently change θ_0's value head or π_b.

    Raises:
      ResumeConfigError: a model's weights differ (by more than float rounding).
    """
    import math

    if not saved:
        return  # a checkpoint written before models were recorded
    for name, now in current.items():
        then = saved.get(name)
        if then is None:
            continue
        same = len(then) == len(now) and all(
            math.isclose(a, b, rel_tol=rtol, abs_tol=1e-30) for x, y in zip(then, now) for a, b in zip(x, y)
        )
        if not same:
            raise ResumeConfigError(
                f"Cannot resume from {where}: {_MODEL_WHAT.get(name, name)} loaded now has other weights "
                "than the one this run started from (same config, different files?). Resume with the "
                "original model files, or start a new run in another --out-dir."
            )


# ------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------


@functools.cache  # once: every event frame's CRC asks for it, and torch is hidden only the first time
def _tensorboardx():
    """The ``tensorboardX`` package, imported without torch.

    Its ``__init__`` imports its ``SummaryWriter``, which imports torch when torch is installed (seconds
    of start-up, for type hints of torch tensors); this module writes only numpy scalars and text, so
    torch is hidden during that import (:func:`klq_jax.without_torch.hidden`, unless already
    imported). Nothing else changes: a later ``import torch`` works as usual."""
    from klq_jax import without_torch

    with without_torch.hidden():  # an ImportError of torch, which tensorboardX allows
        import tensorboardX

    return tensorboardX


def _event_files(logdir: str) -> list[str]:
    if not os.path.isdir(logdir):
        return []
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n and
                  not n.startswith(TMP_PREFIX))


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C."""
    _tensorboardx()
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path: str) -> list[bytes]:
    """The complete, checksum-valid TFRecords of an event file (a cut-off tail is dropped)."""
    masked = _masked_crc
    with open(path, "rb") as f:
        buf = f.read()
    out, pos = [], 0
    while pos + 12 <= len(buf):
        header = buf[pos:pos + 8]
        (length,) = struct.unpack("Q", header)
        (hcrc,) = struct.unpack("I", buf[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if hcrc != masked(header) or end > len(buf):
            break
        data = buf[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("I", buf[end - 4:end])
        if dcrc != masked(data):
            break
        out.append(data)
        pos = end
    return out


def _frame(data: bytes) -> bytes:
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", _masked_crc(header)) + data + struct.pack("I", _masked_crc(data))


def read_tensorboard_scalars(logdir: str) -> list[tuple[str, int, float]]:
    """Every scalar ``(tag, step, value)`` in the event files of ``logdir``, in file order."""
    _tensorboardx()
    from tensorboardX.proto import event_pb2

    out = []
    for path in _event_files(logdir):
        for rec in _read_records(path):
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.append((v.tag, int(ev.step), float(v.simple_value)))
    return out


def purge_tensorboard(logdir: str, max_step: int) -> int:
    """Rewrite (atomically, file by file) the event files of ``logdir`` without the events of steps
    after ``max_step`` and without a cut-off tail. Returns the number of events dropped."""
    _tensorboardx()
    from tensorboardX.proto import event_pb2

    dropped = 0
    for path in _event_files(logdir):
        with open(path, "rb") as f:
            size = len(f.read())
        records = _read_records(path)
        keep = [r for r in records if event_pb2.Event.FromString(r).step <= max_step]
        data = b"".join(_frame(r) for r in keep)
        if len(data) != size:
            dropped += len(records) - len(keep)
            atomic_write(path, data, marker=("rewrite", max_step))
    return dropped


class TensorBoardWriter:
    """Synchronous TensorBoard event writer: every call is written (and :meth:`flush` fsyncs)
    before it returns, so a checkpoint taken after a flush never outlives its events."""

    def __init__(self, logdir: str):
        _tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        n = len(_event_files(logdir))
        self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}.{n:03d}")

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                 summary=summary.scalar(tag, value)))

    def text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                 summary=summary.text(tag, text)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------------------
# The run's log files
# ------------------------------------------------------------------------------------------


class RunLogger:
    """``metrics.jsonl`` + ``samples.jsonl`` + TensorBoard under the run directory.

    On construction, the lines and events of iterations after ``done_iterations`` (left by a killed
    run, to be run again) are removed atomically, so a resumed run's files equal an uninterrupted
    run's.
    """

    def __init__(self, out_dir: str, done_iterations: int, tensorboard: bool):
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        phase("rewrite-start", done_iterations)
        for path in (self.metrics_path, self.samples_path):
            truncate_jsonl(path, done_iterations)
        tb_dir = os.path.join(out_dir, "tb")
        purge_tensorboard(tb_dir, done_iterations)
        self.tb = TensorBoardWriter(tb_dir) if tensorboard else None

    def log(self, iteration: int, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.scalar(k, float(v), iteration)
            self.tb.flush()

    def samples(self, iteration: int, texts: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for t in texts:
                f.write(json.dumps(dict(t, iteration=iteration)) + "\n")
        if self.tb is not None:
            body = "\n\n".join(f"**{t['prompt']}** → {t['response']} (score {t['score']:.3f})" for t in texts)
            self.tb.text("samples", body, iteration)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
