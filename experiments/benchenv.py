"""Benchmark environment: cap the vector instruction set of both libraries (``--isa avx2``).

CPU speed ratios hold only for the machine they ran on, and AVX-512 machines favour the libraries
differently from AVX2 ones. :func:`cap_isa` makes an AVX-512 machine run both sides of a benchmark
with AVX2 code, the closest stand-in for an AVX2 machine type that one machine has:

* XLA:CPU (JAX): ``--xla_cpu_max_isa=AVX2`` in ``XLA_FLAGS``;
* PyTorch: ``ATEN_CPU_CAPABILITY=avx2`` (ATen's kernels), ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL's
  GEMM) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN).

These are read when each library initialises, so :func:`cap_isa` must run before ``jax`` or
``torch`` is imported (the benchmarks call it right after parsing their arguments). It is an
emulation: the cache sizes and memory bandwidth stay those of the machine.
"""

from __future__ import annotations

import os
import sys

ISAS = ("native", "avx2")


def add_isa_argument(parser) -> None:
    """Add ``--isa {native,avx2}`` to a benchmark's ``argparse`` parser (apply it with
    :func:`cap_isa` right after parsing, before jax or torch is imported)."""
    parser.add_argument("--isa", choices=list(ISAS), default="native",
                        help="cap both libraries' vector ISA (avx2: an AVX2 machine's code on an "
                        "AVX-512 one; see experiments/benchenv.py)")


def _imported_frameworks() -> list[str]:
    """Which of jax and torch this process has imported: a setting read when they load comes too late."""
    return [m for m in ("jax", "torch") if m in sys.modules]


MALLOCS = ("retain", "default")


def add_malloc_argument(parser) -> None:
    """Add ``--malloc {retain,default}`` to a benchmark's parser (apply it with :func:`set_malloc`
    right after parsing, before jax or torch is imported): ``retain`` is what the ``klq`` command
    runs with (:func:`klq_jax.hostmem.retain_freed_memory`), ``default`` glibc's own settings."""
    parser.add_argument("--malloc", choices=list(MALLOCS), default="retain",
                        help="retain: glibc keeps freed memory for reuse, as the klq command sets it "
                        "(klq_jax/hostmem.py; both libraries of a --peer run share it); default: glibc's own")


def set_malloc(malloc: str) -> str:
    """Apply ``--malloc`` (the benchmarks call it first thing in ``main``); returns what holds, for
    the benchmark's output: ``"retain"``, ``"default"``, or ``"default (retain not applied: ...)"``
    where jax or torch was imported first (their threads may have their own arenas by then) or
    the C library is not glibc."""
    if malloc not in MALLOCS:
        raise ValueError(f"--malloc {malloc!r}: choose one of {', '.join(MALLOCS)}")
    if malloc == "default":
        return "default"
    loaded = _imported_frameworks()
    if loaded:
        return f"default (retain not applied: {' and '.join(loaded)} imported first)"
    from klq_jax import hostmem

    return "retain" if hostmem.retain_freed_memory() else "default (retain not applied: no glibc)"


def cap_isa(isa: str) -> dict[str, str]:
    """Set the environment so JAX and torch use at most ``isa``; returns what it set.

    ``"native"`` changes nothing. Raises ``RuntimeError`` if jax or torch is already imported (the
    setting would silently not apply).
    """
    if isa not in ISAS:
        raise ValueError(f"--isa {isa!r}: choose one of {', '.join(ISAS)}")
    if isa == "native":
        return {}
    loaded = _imported_frameworks()
    if loaded:
        raise RuntimeError(f"--isa {isa} must be set before {' and '.join(loaded)} is imported")
    xla = os.environ.get("XLA_FLAGS", "")
    env = {
        "XLA_FLAGS": (xla + " --xla_cpu_max_isa=AVX2").strip(),
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    os.environ.update(env)
    return env
