"""The errors klq_jax raises on purpose: one line each, saying what went wrong and what to do.

Every error of ours derives from :class:`KLQError`; a command-line front end prints ``str(err)``
as one line and exits non-zero (a traceback only with ``--debug``). Each class also derives from
the built-in exception a caller would have caught before (``ValueError``, ``FileNotFoundError``,
…), so ``except ValueError`` keeps working.

Hierarchy::

    KLQError
    ├── ConfigError (ValueError)              a setting or a combination of settings is invalid
    │   ├── MeshError                         the mesh does not fit the devices / batch sizes
    │   ├── PromptTooLongError                prompt + response budget exceed the model's positions
    │   └── ResumeConfigError                 --resume with settings that change the run's meaning
    ├── RunDirError (OSError)                 the run directory cannot be used as asked
    │   ├── RunLockedError                    another live process writes the run directory
    │   ├── RunExistsError                    the directory holds a run (or klq judge's outputs)
    │   │                                     and neither --resume nor --overwrite was given
    │   ├── NoCheckpointError                 --resume found no checkpoint to continue from
    │   └── ForeignFilesError                 files klq did not write are where it would delete
    │                                         or replace its own (--overwrite, klq demo)
    ├── CheckpointError (OSError)             no checkpoint restores / a checkpoint cannot be written
    ├── DataError (ValueError)                a dataset file or row cannot be used
    ├── SourceNotFoundError (FileNotFoundError)  models/datasets that are neither local nor
    │                                         downloadable (all of them listed at once)
    └── NonFiniteError (FloatingPointError)   NaN/inf in a metric or in the policy's weights

Example::

    >>> from klq_jax import errors
    >>> err = errors.RunLockedError("runs/x is in use by pid 7 on host a: wait for it or pick another --out-dir")
    >>> isinstance(err, errors.KLQError), isinstance(err, OSError)
    (True, True)
"""

from __future__ import annotations

__all__ = [
    "KLQError",
    "ConfigError",
    "MeshError",
    "PromptTooLongError",
    "ResumeConfigError",
    "RunDirError",
    "RunLockedError",
    "RunExistsError",
    "NoCheckpointError",
    "ForeignFilesError",
    "CheckpointError",
    "DataError",
    "SourceNotFoundError",
    "NonFiniteError",
]


class KLQError(Exception):
    """Base of every error klq_jax raises on purpose; ``str(err)`` is the one line to show."""


class ConfigError(KLQError, ValueError):
    """A setting, or a combination of settings, is invalid."""


class MeshError(ConfigError):
    """The device mesh does not match the available devices or the batch sizes."""


class PromptTooLongError(ConfigError):
    """Prompt width + ``max_new_tokens`` exceed the model's ``max_position_embeddings``."""


class ResumeConfigError(ConfigError):
    """``--resume`` with a config whose meaning differs from the checkpoint's (fields named)."""


class RunDirError(KLQError, OSError):
    """The run directory cannot be used as asked (unwritable, owned, already holding a run)."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


class RunExistsError(RunDirError):
    """The run directory already holds a run; start with ``--resume`` or ``--overwrite``. Also: an
    ``--out-dir`` holding an earlier ``klq judge``'s outputs (replace them with ``--overwrite``)."""


class NoCheckpointError(RunDirError, FileNotFoundError):
    """``--resume`` found no checkpoint (and starting fresh was not allowed)."""


class ForeignFilesError(RunDirError):
    """A directory holds files klq did not write under the names it would delete or replace
    (``--overwrite`` of ``klq train``, ``klq demo``), or under a run's names where no run is (a
    Hugging Face model's directory as ``klq train --out-dir``); they are named, and nothing was
    touched."""


class CheckpointError(KLQError, OSError):
    """No checkpoint can be restored, or a checkpoint cannot be written (disk full, permissions)."""


class DataError(KLQError, ValueError):
    """A dataset file cannot be read, or its rows cannot be used (the file/row is named)."""


class SourceNotFoundError(KLQError, FileNotFoundError):
    """Models or datasets that are neither local nor downloadable (all listed at once)."""


class NonFiniteError(KLQError, FloatingPointError):
    """A loss, gradient, metric or weight is NaN/inf; no checkpoint was written for it."""
