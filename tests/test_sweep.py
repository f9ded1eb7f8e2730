"""The τ sweep runs every (algorithm, τ), writes its table and Pareto plot, and skips finished runs."""
import json
import os

import jax

from experiments import sweep
from klq_jax import sharding


def test_tau_sweep_runs_writes_and_resumes(tmp_path):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    overrides = ["--total-episodes", "16", "--no-progress", "--no-tensorboard"]
    rows = sweep.run_sweep("tiny-klq", [0.05, 0.5], ["klq", "ppo"], str(tmp_path), overrides, mesh=mesh)
    assert [(r["algo"], r["tau"]) for r in rows] == [("klq", 0.05), ("klq", 0.5), ("ppo", 0.05), ("ppo", 0.5)]
    for r in rows:
        cfg = json.load(open(tmp_path / f"{r['algo']}-tau{r['tau']:g}" / "config.json"))
        assert cfg["algo"]["name"] == r["algo"] and cfg["algo"]["tau"] == r["tau"]
    assert open(tmp_path / "pareto.png", "rb").read(4) == b"\x89PNG"
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "| ppo | 0.5 |" in (tmp_path / "sweep.md").read_text()
    # A second call finds every run finished and does not train again.
    stamp = os.path.getmtime(tmp_path / "klq-tau0.05" / "metrics.jsonl")
    again = sweep.run_sweep("tiny-klq", [0.05, 0.5], ["klq", "ppo"], str(tmp_path), overrides, mesh=mesh)
    assert os.path.getmtime(tmp_path / "klq-tau0.05" / "metrics.jsonl") == stamp
    assert [r["score"] for r in again] == [r["score"] for r in rows]
