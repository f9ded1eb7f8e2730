"""Kill a real training process with SIGKILL mid-run, resume it, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from experiments import presets, tasks
from klq_jax import train
from klq_jax.train.loop import TIMING_KEYS
from klq_jax.checkpoint import Checkpointer

ITERS = 8


def _cmd(out_dir, *extra):
    return [
        sys.executable, "-m", "experiments", "train", "tiny-klq",
        "--out-dir", str(out_dir), "--total-episodes", str(16 * ITERS), "--save-every", "1",
        "--no-progress", "--no-tensorboard", *extra,
    ]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _metrics(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _final_params(out_dir):
    cfg = presets.get("tiny-klq")
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    opt, _ = train.make_optimizer(cfg.optim, 1)
    target = jax.eval_shape(
        lambda p: train.TrainState(p, opt.init(p), jax.numpy.zeros((), jax.numpy.int32),
                                   jax.random.key_data(jax.random.key(0))), exp.params)
    ck = Checkpointer(os.path.join(out_dir, "checkpoints"))
    assert ck.latest_step() == ITERS
    state, meta = ck.restore(None, target)
    ck.close()
    return nnx.to_pure_dict(state.params), meta


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "checkpoints"
    # Wait on the event (checkpoint 2 on disk) for as long as the trainer runs: a loaded machine is
    # slow, not wrong. If the process ends first, the test fails saying so.
    while True:
        done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
        if done and max(map(int, done)) >= 2:
            break
        if proc.poll() is not None:
            raise AssertionError(
                "waited for checkpoint 2, but training exited first: "
                f"{proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert stopped_at < ITERS, "the run finished before it could be killed"

    subprocess.run(_cmd(killed, "--resume"), env=_env(), check=True, capture_output=True)
    subprocess.run(_cmd(clean), env=_env(), check=True, capture_output=True)

    m_killed, m_clean = _metrics(killed), _metrics(clean)
    assert [r["iteration"] for r in m_killed] == list(range(1, ITERS + 1))
    assert m_killed == m_clean  # bit-identical on CPU, every field but wall-clock timings
    p_killed, meta_k = _final_params(killed)
    p_clean, meta_c = _final_params(clean)
    assert meta_k["prompts"] == meta_c["prompts"]
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), p_killed, p_clean)
    assert all(jax.tree_util.tree_leaves(same))
