"""Test set-up: 8 simulated CPU devices (for the sharding tests), float32 matmuls, no network."""
import os
import tempfile

# LLVM optimisation level 0 for the compiled programs: the tests' tiny programs compile about a third
# faster (compiling is most of the suite's CPU time) and still run in little time; XLA's HLO passes
# (fusion, SPMD partitioning) are unchanged. Subprocesses get the same from tests.helpers.testing.cpu_env.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The klq command's persistent compilation cache goes to a temporary directory, never to ~/.cache.
os.environ["KLQ_COMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="klq-test-jax-cache-")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The tests' own programs use that cache too, from the first compile on: the many tests that build
# the same tiny runs (each train() traces new closures) load what an earlier test compiled.
jax.config.update("jax_compilation_cache_dir", os.environ["KLQ_COMPILE_CACHE_DIR"])


def pytest_collection_modifyitems(config, items):
    """Modules holding a test marked ``slow`` run first (each module's tests stay together and in
    order, so module-scoped fixtures are built once per worker): with ``-n 2`` the long tests then
    start at once on both workers and the many short ones fill in at the end, instead of two long
    tests landing last on one worker."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow)  # stable: the order within a group stays
