"""klq_jax.hostmem: with glibc keeping freed memory, repeated XLA:CPU runs fault no pages in again.

Counts minor page faults (``getrusage``), never time: each arm runs in its own interpreter, since
the setting is process-wide and applies only before JAX starts its threads.
"""

import json
import os
import subprocess
import sys

import pytest

from klq_jax import hostmem

# A 64 MiB result per run: above glibc's largest dynamic mmap threshold (32 MiB), so by default
# each run maps fresh pages (16384 of 4 KiB) and unmaps them when the array is freed.
_PROBE = r"""
import json, resource, sys
retain = sys.argv[1] == "retain"
RUNS = int(sys.argv[2])
from klq_jax import hostmem
took = hostmem.retain_freed_memory() if retain else False
import jax, jax.numpy as jnp
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
f = jax.jit(lambda x: x * 2.0)
for _ in range(2):  # compile, and the first run's pages (faulted in once in either arm)
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(RUNS):
    y = f(x)
    y.block_until_ready()
    del y
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


RUNS = 40
BUFFER_PAGES = 16 * 1024 * 1024 * 4 // 4096  # one 64 MiB result in 4 KiB pages


def _faults(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(RUNS)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc's mallopt only (Linux with glibc)")
def test_retained_memory_is_reused_without_page_faults():
    default, retain = _faults("default"), _faults("retain")
    # glibc's own settings: every run maps its result afresh
    assert default["faults"] > RUNS * BUFFER_PAGES // 2, default
    assert retain["took"] is True
    # kept and reused: the heap grows a few times (1-5 results' pages seen over 40 runs, as frees
    # and the next run's allocation overlap), then stops; not once a run
    assert retain["faults"] <= RUNS * BUFFER_PAGES // 4, (retain, default)
