"""experiments/benchenv.py: ``--isa avx2`` caps both libraries' vector ISA before they load."""

import os
import subprocess
import sys

import pytest

from experiments import benchenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_avx2_cap_reaches_jax_and_torch_in_a_fresh_process():
    code = (
        "import os\n"
        "from experiments.benchenv import cap_isa\n"
        "env = cap_isa('avx2')\n"
        "import jax.numpy as jnp, torch\n"
        "assert float(jnp.ones((64, 64)) @ jnp.ones((64,)) @ jnp.ones((64,))) == 64 * 64\n"
        "print(os.environ['XLA_FLAGS'], torch.backends.cpu.get_cpu_capability())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "XLA_FLAGS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, torch_isa = out.stdout.split()
    assert flags == "--xla_cpu_max_isa=AVX2"
    import torch

    native = torch.backends.cpu.get_cpu_capability()
    # An AVX-512 or AVX2 machine runs torch's AVX2 kernels under the cap (never above it).
    assert torch_isa == ("AVX2" if native in ("AVX2", "AVX512") else native)


def test_cap_refuses_once_jax_is_loaded_and_unknown_names():
    import jax  # noqa: F401  (loaded: the cap could no longer apply)

    assert benchenv.cap_isa("native") == {}
    with pytest.raises(RuntimeError, match="before jax"):
        benchenv.cap_isa("avx2")
    with pytest.raises(ValueError, match="choose one of native, avx2"):
        benchenv.cap_isa("sse")


def test_malloc_choice_is_checked_and_comes_before_jax():
    import jax  # noqa: F401 - imported here, as in any test process: too late for the setting

    assert benchenv.set_malloc("default") == "default"  # glibc's own settings: nothing to do
    # too late to apply: the benchmark's output says so instead of claiming it
    late = benchenv.set_malloc("retain")
    assert late.startswith("default (retain not applied: jax") and late.endswith("imported first)"), late
    with pytest.raises(ValueError, match="choose one of retain, default"):
        benchenv.set_malloc("jemalloc")
