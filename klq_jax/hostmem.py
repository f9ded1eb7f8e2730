"""Host memory under XLA:CPU: keep freed memory in the process instead of faulting it in again.

XLA:CPU allocates the large buffers of each program run afresh (an update's activations,
gradients and logits: gigabytes at a Pythia-70m update) and frees them when the run ends. glibc's
``malloc`` serves blocks that large with ``mmap`` (and from one arena per thread) and hands them
back to the kernel on ``free``, so every run faults all of its pages in again, each one zeroed by
the kernel. At the CPU shape of ``experiments/bench_iteration.py`` that is ~495k minor page faults
(~2 GB) and ~1 s of system time per update. :func:`retain_freed_memory` sets glibc to one arena,
no ``mmap`` and no trimming, so freed blocks are reused by the next run: no page faults after the
first run, and the update 3-5 % faster (``bench_iteration.py --malloc default`` against the
default ``retain``, README "Iteration speed"). The cost: the process keeps its peak heap until it
exits (fine for a training or benchmark process; the ``klq`` command sets it).

It only applies to threads that have not allocated yet, so call it before JAX starts (before the
first computation; the ``klq`` command and the benchmarks call it first thing). A process-wide
setting: a library never sets it behind its user's back, a program opts in.

Example::

    from klq_jax import hostmem
    hostmem.retain_freed_memory()   # first thing in the program; True where glibc took it
    import jax
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory above the heap's top stays.
_NEVER_TRIM = 2**31 - 1


@functools.cache
def _glibc():
    """The process's glibc (``ctypes.CDLL``), or None on another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl, e.g. Alpine, has no mallopt options)
        libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (one arena, no ``mmap``, no trimming).

    Returns True where the settings took (Linux with glibc), False elsewhere (nothing changed).
    Calling it again does nothing more. See the module docstring for why and when to call it.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        ok = libc.mallopt(option, value) == 1 and ok  # mallopt returns 1 on success
    return ok
