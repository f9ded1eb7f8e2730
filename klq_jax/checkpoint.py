"""Checkpoints: an orbax ``CheckpointManager`` holding the train state and the run's metadata.

A checkpoint at iteration ``k`` (directory ``<run>/checkpoints/<k>/``) holds:

* ``state``: the :class:`klq_jax.train.TrainState` pytree — policy (+ value) parameters, optimizer
  state, optimizer step, the raw PRNG key data — saved sharded as it lives on the devices, and
  restored straight into the target shardings (``StandardRestore`` with abstract arrays).
* ``meta``: JSON — the iteration, the prompt iterator's position, the full config, library version.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed at
any moment (even with SIGKILL) resumes from its last *complete* checkpoint; :meth:`Checkpointer.save`
refuses a state with NaN/inf leaves, so a diverged run never overwrites a good checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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
          FloatingPointError: if any floating leaf of ``state`` holds NaN/inf (nothing is written).
        """
        bad = nonfinite_leaves(state)
        if bad:
            raise FloatingPointError(
                f"Refusing to write checkpoint {step}: non-finite values in {bad[:5]}"
                + (" …" if len(bad) > 5 else "")
            )
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` (default: latest) into the structure/shardings of ``target``.

        ``target`` may hold concrete arrays or ``jax.ShapeDtypeStruct``\\ s with shardings.
        """
        self.manager.wait_until_finished()  # an asynchronous save still being written
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(
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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """``[n]`` bool: leaf ``i`` holds only finite values."""
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])
