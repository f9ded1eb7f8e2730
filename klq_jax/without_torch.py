"""Importing tensorboardX and transformers without torch (seconds of start-up each).

Both import torch whenever it is installed, though what klq_jax uses of them needs none: the event
writer of tensorboardX, and the tokenizers, configs (``config.json``, ``generation_config.json``)
and files of transformers. This module imports no third-party package, so that the ``klq``
command can use it before parsing its arguments.

* :func:`hidden`: while inside, ``import torch`` raises ImportError (torch already imported stays).
* :func:`transformers_without_torch`: for a process that uses transformers for nothing needing
  torch (the ``klq`` commands), its first ``import transformers`` runs with torch hidden, so that
  transformers decides once (its ``is_torch_available()`` is cached) that there is no torch: in
  that process its PyTorch models are unavailable, everything else works. ``import torch`` itself
  still works as usual afterwards (``.bin`` checkpoints are read with ``torch.load``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from typing import Iterator


@contextlib.contextmanager
def hidden() -> Iterator[None]:
    """``import torch`` raises ImportError inside (unless torch is imported already), as if torch
    were not installed; afterwards it imports as usual."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # what `import` takes for "not importable"
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


class _ExecWithoutTorch(importlib.abc.Loader):
    """A module's own loader, whose ``exec_module`` runs with torch :func:`hidden`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with hidden():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the loader's own
        return getattr(self.loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds ``transformers`` as the other finders do, then runs its
    ``__init__`` with torch hidden (unless torch is imported by then)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or "torch" in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ExecWithoutTorch(spec.loader)
        return spec


def transformers_without_torch() -> None:
    """Make this process's first ``import transformers`` see no torch (see the module docstring).

    Only for a process that uses transformers for tokenizers, configs and files, never its PyTorch
    models. Nothing happens if transformers or torch is imported already; calling it again changes
    nothing.
    """
    if "transformers" in sys.modules or "torch" in sys.modules:
        return
    if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
