"""Multi-process training (issue 13): two OS processes on localhost under ``jax.distributed``
(2 processes × 2 simulated CPU devices, gloo collectives) run ``klq train tiny-klq`` and equal a
one-process run on 4 devices; each process reads only its half of every prompt batch; a SIGKILL of
both processes followed by ``--resume`` in both continues bit-identically."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from klq_jax.checkpoint import Checkpointer
from tests.helpers import testing

ITERS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n_proc: int, devices: int, out_dir, *extra, pause_after: int | None = None):
    port = _free_port()
    procs = []
    for i in range(n_proc):
        env = dict(os.environ)
        env.update(**testing.cpu_env(devices),
                   PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
                   # the killed and resumed runs load the programs the first 2-process run compiled
                   **testing.compile_cache_env(os.path.join(os.path.dirname(out_dir), "jax-cache")))
        if n_proc > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n_proc),
                       JAX_PROCESS_ID=str(i))
        if pause_after is not None:
            env["KLQ_TEST_PAUSE_AFTER"] = str(pause_after)
        cmd = [sys.executable, "-m", "tests.helpers.mp_train", "tiny-klq", "--out-dir", str(out_dir),
               "--total-episodes", str(16 * ITERS), "--save-every", "1", "--no-progress",
               "--no-tensorboard", *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    return procs


def _wait(procs):
    """Wait for every process to end (no deadline: a loaded machine is slow, not wrong). The first
    one to fail fails the test and the others are killed (they would wait on it in a collective)."""
    errs = {}

    def drain(p):
        errs[p.pid] = p.stderr.read()

    readers = [threading.Thread(target=drain, args=(p,), daemon=True) for p in procs]
    for r in readers:
        r.start()
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed:
            for q in procs:
                q.kill()
            break
        time.sleep(0.2)
    for p, r in zip(procs, readers):
        p.wait()
        r.join()
    for p in sorted(procs, key=lambda p: p.returncode == -signal.SIGKILL):  # the failed one first
        assert p.returncode == 0, errs[p.pid].decode()[-3000:]


def _final_params(out_dir):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # restore onto this process's device
    target = testing.tiny_klq_state_target(one)
    ck = Checkpointer(os.path.join(out_dir, "checkpoints"))
    assert ck.latest_step() == ITERS
    state, meta = ck.restore(None, target)
    ck.close()
    return nnx.to_pure_dict(jax.device_get(state.params)), meta


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_sigkill(tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _wait(_launch(1, 4, one))
    _wait(_launch(2, 2, two))

    # The same run: parameters and every metric (but wall-clock timings) to 1e-5.
    m1, m2 = testing.metrics_without_timings(one), testing.metrics_without_timings(two)
    assert [r["iteration"] for r in m2] == list(range(1, ITERS + 1))
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        for k in r1:
            assert abs(r1[k] - r2[k]) <= 1e-5 * max(1.0, abs(r1[k])), (k, r1[k], r2[k])
    p1, meta1 = _final_params(one)
    p2, meta2 = _final_params(two)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), p1, p2)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    assert meta1["prompts"] == meta2["prompts"]  # the iterator position is the same

    # Each process read only its own half of every global batch (the one-process run read all).
    full = [json.loads(l)["index"] for l in open(one / "rows.0.jsonl")]
    halves = [[json.loads(l)["index"] for l in open(two / f"rows.{p}.jsonl")] for p in (0, 1)]
    assert len(full) == ITERS and all(len(b) == 16 for b in full)
    for it in range(ITERS):
        assert halves[0][it] == full[it][:8] and halves[1][it] == full[it][8:], it
    assert not (one / "rows.1.jsonl").exists()

    # SIGKILL both processes once checkpoint 1 is complete, then --resume in both.
    procs = _launch(2, 2, killed, pause_after=1)
    while not all((killed / f"paused.{p}").exists() for p in (0, 1)):  # no deadline: the event
        for p in procs:
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert sorted(d for d in os.listdir(killed / "checkpoints") if d.isdigit()) == ["1"]
    _wait(_launch(2, 2, killed, "--resume"))
    assert testing.metrics_without_timings(killed) == m2  # bit-identical
    pk, metak = _final_params(killed)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), pk, p2)
    assert all(jax.tree_util.tree_leaves(same))
    assert metak["prompts"] == meta2["prompts"]
    resumed = [[json.loads(l)["index"] for l in open(killed / f"rows.{p}.jsonl")] for p in (0, 1)]
    for p in (0, 1):  # iteration 1 before the kill, then iterations 2.. after the resume
        assert resumed[p] == halves[p], p
