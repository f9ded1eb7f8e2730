"""Checkpoints: an orbax ``CheckpointManager`` holding the train state and the run's metadata.

A checkpoint at iteration ``k`` (directory ``<run>/checkpoints/<k>/``) holds:

* ``state``: the :class:`klq_jax.train.TrainState` pytree — policy (+ value) parameters, optimizer
  state, optimizer step, the raw PRNG key data — saved sharded as it lives on the devices, and
  restored straight into the target shardings (``StandardRestore`` with abstract arrays).
* ``meta``: JSON — the iteration, the prompt iterator's position, the full config.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed at
any moment (even with SIGKILL) resumes from its last *complete* checkpoint; :meth:`Checkpointer.save`
refuses a state with NaN/inf leaves, so a diverged run never overwrites a good checkpoint.
:meth:`Checkpointer.restore_newest` restores the newest checkpoint that restores, skipping (and
moving aside, into ``<run>/skipped_checkpoints/``) damaged ones with the reason for each.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from klq_jax.errors import CheckpointError, NoCheckpointError, NonFiniteError, ResumeConfigError

logger = logging.getLogger(__name__)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (orbax/tensorstore errors run to hundreds of lines)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + " …"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class _DropSynchronousWaitWarning(logging.Filter):
    """Drop orbax's "Waiting for previous save to complete took N seconds" warning.

    A synchronous :meth:`Checkpointer.save` waits for its save to finish, and orbax adds that wait
    of ours to its "waiting for the previous save" time; an asynchronous one (``wait=False``, the
    training loop's) lets the next save wait for the write still in progress, by design. Either
    way the warning, repeated at every save once a write takes over a second, is noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save to complete")


_SYNC_WAIT_FILTER = _DropSynchronousWaitWarning()


class _DropErrors(logging.Filter):
    """Drop orbax's ERROR records while a save of :class:`Checkpointer` is pending: a failed write
    is logged, with its traceback, by every thread that saw it; the save (or the wait for it)
    raises one CheckpointError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_DROP_ERRORS = _DropErrors()
logging.getLogger("absl").addFilter(_SYNC_WAIT_FILTER)  # orbax logs through absl's logger


class Checkpointer:
    """Save every ``save_every`` iterations (and at the end), keep the ``keep`` newest.

    Example::

        >>> import tempfile, jax.numpy as jnp
        >>> ck = Checkpointer(tempfile.mkdtemp(), keep=2)
        >>> ck.save(1, {"w": jnp.ones(3)}, {"iteration": 1})
        >>> ck.latest_step()
        1
        >>> state, meta = ck.restore(1, {"w": jnp.zeros(3)})
        >>> float(state["w"].sum()), meta["iteration"]
        (3.0, 1)
    """

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        try:
            self.manager = self._make_manager(keep)
        except OSError as err:
            raise CheckpointError(
                f"Cannot use the checkpoint directory {self.directory} ({_one_line(err)}); choose a "
                "writable --out-dir."
            ) from err
        self.keep = keep
        self._pending: int | None = None  # the step of an asynchronous save being written

    def _make_manager(self, keep: int):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = True) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``.

        With ``wait=False`` the save is asynchronous: it returns once orbax has copied the arrays to
        host memory (so ``state`` may be donated or overwritten right away) and writes them in a
        background thread; the next :meth:`save`, :meth:`restore` or :meth:`close` waits for it,
        and the step only becomes :meth:`latest_step` once complete.

        Raises:
          NonFiniteError: if any floating leaf of ``state`` holds NaN/inf (nothing is written).
          CheckpointError: the checkpoint could not be written (disk full, permissions), or a
            checkpoint ``>= step`` already exists (orbax would silently skip it).
        """
        self.finish_pending()  # the previous asynchronous save: its failure is reported first
        bad = nonfinite_leaves(state)
        if bad:
            raise NonFiniteError(
                f"Refusing to write checkpoint {step}: non-finite values in {bad[:5]}"
                + (" …" if len(bad) > 5 else "")
            )
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"Checkpoint {step} would not be written: {self.directory} already holds checkpoint "
                f"{latest}. Another run wrote there; use a fresh --out-dir or --overwrite."
            )
        logging.getLogger("absl").addFilter(_DROP_ERRORS)  # failed writes: logged per thread
        self._pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as err:
            self._pending = None
            logging.getLogger("absl").removeFilter(_DROP_ERRORS)
            raise self._write_error(step, err) from err
        if wait:
            self.finish_pending()

    def finish_pending(self) -> None:
        """Wait for an asynchronous save still being written.

        Raises:
          CheckpointError: that save failed (disk full, permissions), named by its step.
        """
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._write_error(step, err) from err
        finally:
            if step is not None:
                logging.getLogger("absl").removeFilter(_DROP_ERRORS)

    def _write_error(self, step, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"Could not write checkpoint {step} to {self.directory} ({_one_line(err)}). Free disk "
            "space or fix the directory's permissions, then continue with --resume (earlier "
            "checkpoints are intact)."
        )

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` (default: latest) into the structure/shardings of ``target``.

        ``target`` may hold concrete arrays or ``jax.ShapeDtypeStruct``\\ s with shardings.
        """
        self.finish_pending()  # an asynchronous save still being written
        if step is None:
            step = self.latest_step()
        if step is None:
            raise NoCheckpointError(
                f"No complete checkpoint in {self.directory}. Start without --resume, or point "
                "out_dir at the run you want to continue."
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def read_meta(self, step: int) -> dict:
        """The JSON ``meta`` of checkpoint ``step`` alone (no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_newest(
        self,
        target: Any,
        *,
        check_meta: Callable[[int, dict], None] | None = None,
        skipped_dir: str | None = None,
        required_meta: Mapping[str, type] | None = None,
    ) -> tuple[int, Any, dict, list[tuple[int, str]]]:
        """Restore the newest checkpoint that restores: ``(step, state, meta, skipped)``.

        Damaged checkpoints (missing ``state/`` or its ``_METADATA``, unreadable ``meta``, a
        truncated data file, …) are skipped, newest first; each is logged with its reason, listed in
        ``skipped`` as ``(step, reason)`` and moved into ``skipped_dir`` (default
        ``<directory>/../skipped_checkpoints``) so that the run's next checkpoints can be written.

        Args:
          target: the train state (concrete or abstract arrays with shardings).
          check_meta: called with ``(step, meta)`` of each candidate before its arrays are read; it
            raises to refuse the checkpoint (e.g. a config that changes the run's meaning). Its
            errors propagate: they are not damage.
          required_meta: ``{key: type}`` the meta must hold besides ``iteration`` (an int equal to
            the step); a meta without them is damage (e.g. the training loop's ``{"prompts": dict}``).

        Raises:
          NoCheckpointError: the directory holds no checkpoint.
          ResumeConfigError: a checkpoint's arrays have other shapes/dtypes than ``target`` (the
            model changed); no array is read.
          CheckpointError: every checkpoint is damaged (each one's reason is named).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise NoCheckpointError(f"No complete checkpoint in {self.directory}.")
        skipped: list[tuple[int, str]] = []
        for step in steps:
            reason = self._structural_problem(step)
            meta = None
            if reason is None:
                try:
                    meta = self.read_meta(step)
                except Exception as err:  # truncated / unreadable JSON
                    reason = f"unreadable meta ({_one_line(err, 120)})"
                else:
                    reason = _meta_problem(step, meta, required_meta or {})
            if reason is None:
                if check_meta is not None:
                    check_meta(step, meta)
                try:
                    saved = _leaf_specs(self.manager.item_metadata(step)["state"])
                except Exception as err:
                    reason = f"unreadable state metadata ({_one_line(err, 120)})"
                else:
                    _check_same_arrays(step, saved, _leaf_specs(target))
            if reason is None:
                try:
                    state, meta = self.restore(step, target)
                except Exception as err:
                    reason = f"state does not restore ({_one_line(err, 160)})"
                else:
                    self._move_aside([s for s, _ in skipped], skipped_dir)
                    return step, state, meta, skipped
            logger.warning("Skipping checkpoint %d in %s: %s", step, self.directory, reason)
            skipped.append((step, reason))
        raise CheckpointError(
            f"No checkpoint in {self.directory} restores: "
            + "; ".join(f"{s}: {r}" for s, r in skipped)
            + ". Start the run again with --overwrite, or restore a backup of the directory."
        )

    def _structural_problem(self, step: int) -> str | None:
        d = os.path.join(self.directory, str(step))
        for rel, what in (("state", "state/"), (os.path.join("state", "_METADATA"), "state/_METADATA"),
                          (os.path.join("meta", "metadata"), "meta/metadata")):
            if not os.path.exists(os.path.join(d, rel)):
                return f"missing {what}"
        return None

    def _move_aside(self, steps: list[int], skipped_dir: str | None) -> None:
        if not steps:
            return
        dest_root = skipped_dir or os.path.join(os.path.dirname(self.directory), "skipped_checkpoints")
        if jax.process_index() != 0:  # multi-process: process 0 moves them (a shared directory)
            self.manager.reload()
            return
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            dest = os.path.join(dest_root, str(step))
            n = 1
            while os.path.exists(dest):
                dest = os.path.join(dest_root, f"{step}.{n}")
                n += 1
            shutil.move(os.path.join(self.directory, str(step)), dest)
            logger.warning("Moved damaged checkpoint %d to %s", step, dest)
        self.manager.reload()

    def close(self) -> None:
        try:
            self.finish_pending()
        finally:
            self.manager.close()


def _meta_problem(step: int, meta: Any, required: Mapping[str, type]) -> str | None:
    """Why ``meta`` (valid JSON) cannot be checkpoint ``step``'s, or None."""
    if not isinstance(meta, dict):
        return f"meta is a JSON {type(meta).__name__}, not an object"
    it = meta.get("iteration")
    if "iteration" not in meta:
        return "meta has no 'iteration'"
    if type(it) is not int or it != step:
        return f"meta's iteration is {it!r}, not {step}"
    bad = [k for k, t in required.items() if not isinstance(meta.get(k), t)]
    if bad:
        return "meta has no valid " + ", ".join(repr(k) for k in bad)
    return None


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """``{path names: (shape, dtype)}`` of the array leaves of a (metadata or array) tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        out[_path_names(path)] = (tuple(shape), str(getattr(leaf, "dtype", "")))
    return out


def _check_same_arrays(step: int, saved: dict, current: dict) -> None:
    # Orbax stores nnx.Variable values under a trailing 'value' key; compare modulo that.
    def norm(d):
        return {tuple(p for p in k if p != "value"): v for k, v in d.items()}

    saved, current = norm(saved), norm(current)
    problems = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if a is None:
            problems.append(f"{'/'.join(k)} is new")
        elif b is None:
            problems.append(f"{'/'.join(k)} is gone")
        elif a[0] != b[0] or (a[1] and b[1] and a[1] != b[1]):
            problems.append(f"{'/'.join(k)} was {a[0]} {a[1]}, now {b[0]} {b[1]}")
    if problems:
        raise ResumeConfigError(
            f"Cannot resume from checkpoint {step}: the model differs from the one it saved "
            f"({'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''}). Resume with the same "
            "model (--task.policy, model size), or start a new run in another --out-dir."
        )


def nonfinite_leaves(tree: Any) -> list[str]:
    """Key paths of floating-point leaves of ``tree`` that contain NaN or inf.

    One jitted reduction over every floating leaf and one transfer of its ``[n]`` flags, not a
    device round trip per leaf (a train state has hundreds of leaves).
    """
    flat = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
    ]
    if not flat:
        return []
    finite = jax.device_get(_all_finite([leaf for _, leaf in flat]))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


def params_fingerprint(tree: Any) -> list[list[float]]:
    """``[[Σ|x|, Σx²], ...]`` over the floating leaves of ``tree`` (float32 sums, one jitted
    reduction): what a checkpoint records of the models a run started from, so that a resume can
    tell that a model path now holds other weights. Equal weights give equal sums up to float
    rounding (a different mesh may reorder them); compare with a relative tolerance."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree)
              if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)]
    if not leaves:
        return []
    return [[float(a), float(b)] for a, b in jax.device_get(_abs_and_square_sums(leaves))]


@jax.jit
def _abs_and_square_sums(leaves: list) -> jax.Array:
    """``[n, 2]`` float32: ``(Σ|x|, Σx²)`` of each leaf."""
    f = [x.astype(jax.numpy.float32) for x in leaves]
    return jax.numpy.stack([jax.numpy.stack([jax.numpy.abs(x).sum(), jax.numpy.square(x).sum()]) for x in f])


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """``[n]`` bool: leaf ``i`` holds only finite values."""
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])
