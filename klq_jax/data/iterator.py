"""A deterministic, resumable, multi-process prompt iterator.

Order: epoch ``e`` visits the prompts in the permutation ``np.random.default_rng([seed, e])
.permutation(N)``; epochs follow one another forever. A *global* batch is the next ``batch_size``
entries of the current epoch's permutation; process ``p`` of ``P`` gets the rows
``[p * b, (p + 1) * b)`` of it, with ``b = batch_size // P``, so the processes' slices are disjoint
and together make the global batch (every process builds the same permutation; no communication).

Epoch ends: with ``drop_last=True`` a tail shorter than ``batch_size`` is skipped and the next epoch
starts. With ``drop_last=False`` the last batch of an epoch is filled up to ``batch_size`` with the
first rows of the same epoch's permutation, and the batch gets a ``"valid"`` float32 ``[b]`` entry
(1.0 for rows seen for the first time in the epoch, 0.0 for the filler), so shapes never change.

State: :meth:`PromptIterator.state_dict` is a dict of plain ints (``epoch``, ``position`` = rows of
the epoch's permutation already served, plus ``seed``, ``num_rows`` and ``fingerprint`` to detect a
different dataset) that JSON or orbax save as they are. It is the same on every process, and depends
on neither ``batch_size`` nor the process count, so a run may resume with other values of both;
:meth:`load_state_dict` resumes at exactly the next prompt.

Example:

    >>> import numpy as np
    >>> from klq_jax.data.common import PromptDataset
    >>> ds = PromptDataset(np.arange(10, dtype=np.int32)[:, None], np.ones((10, 1), np.float32),
    ...                    [str(i) for i in range(10)], None, pad_id=-1)
    >>> it = PromptIterator(ds, batch_size=4, seed=0)
    >>> _ = next(it); state = it.state_dict()
    >>> b1 = next(it)
    >>> it2 = PromptIterator(ds, batch_size=4, seed=0); it2.load_state_dict(state)
    >>> bool((next(it2)["index"] == b1["index"]).all())
    True
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from klq_jax.data.common import PromptDataset

__all__ = ["PromptIterator", "epoch_permutation"]


def epoch_permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """``[num_rows]`` int64: the visiting order of epoch ``epoch`` for ``seed``.

    Example:
      >>> sorted(epoch_permutation(0, 3, 5).tolist())
      [0, 1, 2, 3, 4]
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}.")
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(num_rows))


class PromptIterator:
    """Infinite iterator of prompt batches (numpy) over a :class:`PromptDataset`.

    Args:
      dataset: the prompts.
      batch_size: the GLOBAL batch size (all processes together).
      seed: seeds the per-epoch shuffles.
      process_index, process_count: this process's slice of each global batch (e.g.
        ``jax.process_index(), jax.process_count()``); ``batch_size`` must be divisible by
        ``process_count``.
      drop_last: skip (True) or fill up (False, with a ``"valid"`` mask) the short last batch of
        an epoch.

    ``next(it)`` returns ``{"prompt_ids": [b, Tq] int32, "prompt_mask": [b, Tq] float32,
    "index": [b] int32}`` (+ ``"valid": [b] float32`` when ``drop_last=False``), with
    ``b = batch_size // process_count`` and ``index`` the rows of ``dataset`` (for its texts and
    references).

    Example: see the module docstring.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        drop_last: bool = True,
    ):
        n = len(dataset)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}.")
        if batch_size % process_count:
            raise ValueError(
                f"The global batch_size {batch_size} is not divisible by the {process_count} processes: "
                f"choose a batch size that is a multiple of {process_count}."
            )
        if n == 0:
            raise ValueError("The dataset has no prompts.")
        if drop_last and n < batch_size:
            raise ValueError(
                f"The dataset has {n} prompts, fewer than one batch of {batch_size}: lower the batch size "
                "or use drop_last=False."
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        self.drop_last = bool(drop_last)
        self._epoch = 0
        self._position = 0
        self._perm_epoch = -1
        self._perm = None
        self._fingerprint = None

    # -- order -------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (a filled-up last batch counts when ``drop_last=False``)."""
        if self.drop_last:
            return self.num_rows // self.batch_size
        return -(-self.num_rows // self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(self.seed, epoch, self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def _next_global_rows(self) -> tuple[np.ndarray, np.ndarray]:
        n, bs = self.num_rows, self.batch_size
        if self.drop_last and self._position + bs > n:
            self._epoch, self._position = self._epoch + 1, 0
        if self._position >= n:
            self._epoch, self._position = self._epoch + 1, 0
        perm = self._permutation(self._epoch)
        start = self._position
        if start + bs <= n:
            rows = perm[start : start + bs]
            valid = np.ones(bs, np.float32)
        else:  # drop_last=False: fill up with the epoch's first rows (wrapping as often as needed)
            real = perm[start:]
            filler = np.resize(perm, bs - len(real))
            rows = np.concatenate([real, filler])
            valid = np.concatenate([np.ones(len(real), np.float32), np.zeros(len(filler), np.float32)])
        self._position = min(start + bs, n)
        return rows, valid

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, valid = self._next_global_rows()
        lo = self.process_index * self.local_batch_size
        local = rows[lo : lo + self.local_batch_size]
        batch = {
            "prompt_ids": self.dataset.prompt_ids[local],
            "prompt_mask": self.dataset.prompt_mask[local],
            "index": local.astype(np.int32),
        }
        if not self.drop_last:
            batch["valid"] = valid[lo : lo + self.local_batch_size]
        return batch

    next = __next__

    # -- checkpointing -------------------------------------------------------------------------
    def fingerprint(self) -> int:
        """A crc32 of the prompt ids and shape (a plain int), to catch a resume on other data."""
        if self._fingerprint is None:
            ids = np.ascontiguousarray(self.dataset.prompt_ids)
            crc = zlib.crc32(np.asarray(ids.shape, np.int64).tobytes())
            self._fingerprint = int(zlib.crc32(ids.tobytes(), crc))
        return self._fingerprint

    def state_dict(self) -> dict[str, int]:
        """Plain ints: where the next batch starts (the same on every process)."""
        return {
            "epoch": int(self._epoch),
            "position": int(self._position),
            "seed": self.seed,
            "num_rows": self.num_rows,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at the state's next prompt. Raises if it was written for other data or seed."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"Iterator state lacks {sorted(missing)}: got {dict(state)}.")
        if "num_rows" in state and int(state["num_rows"]) != self.num_rows:
            raise ValueError(
                f"The iterator state was saved for a dataset of {state['num_rows']} prompts, this one has "
                f"{self.num_rows}: resume with the same dataset settings (split, max_rows, filters)."
            )
        if "fingerprint" in state and int(state["fingerprint"]) != self.fingerprint():
            raise ValueError(
                "The iterator state was saved for different prompts (fingerprint mismatch): resume with "
                "the same dataset, tokenizer and loader settings."
            )
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(
                f"The iterator state was saved with seed {state['seed']}, this iterator has seed {self.seed}: "
                "build it with the run's original data seed to resume."
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_rows:
            raise ValueError(f"Invalid iterator state epoch={epoch}, position={position}.")
        self._epoch, self._position = epoch, position
