"""SIGKILL a real training process 10 times at seeded random phases (sampling, update,
checkpointing, the rewrite of the metrics on resume, the final export), resume it each time, and
compare everything it wrote with an uninterrupted run.

No wall-clock deadline: the trainer prints phase markers (``KLQ_PHASE_MARKERS=1``) and can be
told to stop at one (``KLQ_PHASE_HOLD=NAME@K``, :func:`klq_jax.train.run_dir.phase`); the test
waits on those lines (a trainer that exits first fails the test, naming the marker) and kills there,
or right after a marker while the process works on ("live" kills land inside the sampler, the
update or the orbax save). A persistent compilation cache keeps the 12 processes cheap.
"""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from klq_jax.checkpoint import Checkpointer
from klq_jax.train import run_dir
from klq_jax.train.loop import TIMING_KEYS
from tests.helpers import testing

ITERS = 3
KILLS = 10


def _cmd(out_dir, *extra):
    return [
        sys.executable, "-m", "experiments", "train", "tiny-klq",
        "--out-dir", str(out_dir), "--total-episodes", str(16 * ITERS), "--save-every", "1",
        "--log-samples-every", "1", "--no-progress", *extra,
    ]


def _env(cache_dir, **extra):
    env = dict(os.environ)
    env.update(**testing.cpu_env(1),
               **testing.compile_cache_env(cache_dir))
    env.pop("KLQ_PHASE_HOLD", None)
    env.update(extra)
    return env


class _Proc:
    """A trainer subprocess whose stderr lines are read on a thread into a queue."""

    def __init__(self, cmd, env):
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, wanted: str):
        """Block until a stderr line equals ``wanted``; fail if the process ends first."""
        while True:
            line = self.lines.get()  # the reader puts None when the trainer's stderr closes
            if line is None:
                self.p.wait()
                raise AssertionError(f"the trainer exited (rc {self.p.returncode}) before printing "
                                     f"{wanted!r}:\n" + "\n".join(self.log[-30:]))
            self.log.append(line)
            if line == wanted:
                return

    def kill(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()
        assert self.p.returncode == -signal.SIGKILL


def _latest_checkpoint(out_dir) -> int:
    d = os.path.join(out_dir, "checkpoints")
    steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def _has_lines_after(out_dir, c: int) -> bool:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    for line in open(path, "rb"):
        try:
            if json.loads(line)["iteration"] > c or not line.endswith(b"\n"):
                return True
        except ValueError:
            return True
    return False


LOOP_PHASES = {"sampling": ["sample"], "update": ["update", "log"], "checkpointing": ["checkpoint", "checkpoint-done"]}


def _choose(rng, category, out_dir, exports_seen=0):
    """``(marker name, iteration, live)`` of a kill of ``category`` that the next process reaches,
    or None when none is reachable now."""
    c = _latest_checkpoint(out_dir)
    if category in LOOP_PHASES:
        assert c < ITERS
        name = rng.choice(LOOP_PHASES[category])
        if name == "checkpoint-done" and c + 1 >= ITERS:
            name = "checkpoint"
        # the last checkpoint only at the end: the loop must stay unfinished until the export kills
        k = rng.randint(c + 1, ITERS - 1 if name == "checkpoint-done" else ITERS)
        # a live kill lands in the work after the marker; keep it away from the last iteration's
        # end, where the process might finish before the signal arrives
        live = name in ("sample", "update", "checkpoint") and k < ITERS and rng.random() < 0.5
        return name, k, live
    if category == "rewrite":
        if _has_lines_after(out_dir, c):
            return "rewrite", c, False  # between the temp file's write and its rename
        return None
    if category == "export":  # before the export, then with policy/ written but the run not ended
        done = os.path.isdir(os.path.join(out_dir, "policy"))
        return ("export-written" if done or exports_seen else "export"), ITERS, False
    raise AssertionError(category)


def _checkpoint_contents(out_dir):
    target = testing.tiny_klq_state_target()
    ck = Checkpointer(os.path.join(out_dir, "checkpoints"))
    out = {}
    try:
        for step in ck.all_steps():
            state, meta = ck.restore(step, target)
            config = {k: v for k, v in meta.pop("config").items()
                      if k not in ("out_dir", "resume", "allow_fresh")}
            out[step] = (jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(state.params)),
                         np.asarray(state.key), int(state.step), meta, config)
    finally:
        ck.close()
    return out


def _scalars(out_dir):
    rows = run_dir.read_tensorboard_scalars(os.path.join(out_dir, "tb"))
    rows = [r for r in rows if r[0] not in TIMING_KEYS]
    keys = [(t, s) for t, s, _ in rows]
    assert len(keys) == len(set(keys)), "a TensorBoard step appears twice"
    return sorted(rows)



@pytest.mark.slow
def test_ten_sigkills_then_resume_match_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "jax-cache"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    rng = random.Random(14)
    plan = ["sampling", "update", "checkpointing", "rewrite"] * 2
    rng.shuffle(plan)
    plan += ["export", "export"]  # after the export kills only the export is left to do
    kills = []
    while plan:
        cat = plan.pop(0)
        choice = _choose(rng, cat, killed, sum(c == "export" for c, *_ in kills))
        if choice is None:  # rewrite: first leave a metrics line past the checkpoint
            choice = ("checkpoint", _latest_checkpoint(killed) + 1, False)
            plan.insert(0, cat)
            if "checkpointing" in plan:
                plan.remove("checkpointing")
            cat = "checkpointing"
        name, k, live = choice
        hold = {} if live else {"KLQ_PHASE_HOLD": f"{name}@{k}"}
        extra = ("--resume", "--allow-fresh") if kills else ()
        proc = _Proc(_cmd(killed, *extra), _env(cache, KLQ_PHASE_MARKERS="1", **hold))
        proc.wait_for(f"klq-phase {name} {k}" if live else f"klq-phase held {name} {k}")
        proc.kill()
        kills.append((cat, name, k, "live" if live else "held"))
    assert len(kills) >= KILLS, kills
    covered = {c for c, *_ in kills}
    assert {"sampling", "update", "checkpointing", "rewrite", "export"} <= covered, kills

    final = subprocess.run(_cmd(killed, "--resume", "--allow-fresh"), env=_env(cache), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    done = subprocess.run(_cmd(clean), env=_env(cache), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    assert [r["iteration"] for r in testing.metrics_without_timings(killed)] == list(range(1, ITERS + 1)), kills
    assert testing.metrics_without_timings(killed) == testing.metrics_without_timings(clean), kills  # bit-identical but for wall-clock timings
    assert open(killed / "samples.jsonl").read() == open(clean / "samples.jsonl").read()
    assert _scalars(killed) == _scalars(clean)
    ck_k, ck_c = _checkpoint_contents(killed), _checkpoint_contents(clean)
    assert sorted(ck_k) == sorted(ck_c) == list(range(1, ITERS + 1))
    for step in ck_c:
        pk, kk, sk, mk, ck = ck_k[step]
        pc, kc, sc, mc, cc = ck_c[step]
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), pk, pc)
        assert all(jax.tree_util.tree_leaves(same)), step
        assert np.array_equal(kk, kc) and sk == sc and mk == mc and ck == cc, step
    names = sorted(os.listdir(clean / "policy"))
    assert sorted(os.listdir(killed / "policy")) == names
    for n in names:
        assert (killed / "policy" / n).read_bytes() == (clean / "policy" / n).read_bytes(), n
    leftovers = [n for n in os.listdir(killed) if n.startswith(".")]
    assert leftovers == [], leftovers  # no temp files, no lock
    assert not (killed / "skipped_checkpoints").exists()
