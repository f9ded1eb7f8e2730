"""Sweeps: a grid over config fields, the Pareto plot and table from VALIDATION metrics, finished
runs skipped, and run safety (distinct values never share a directory, a rerun with other
overrides is refused or moved aside, sweep-owned fields refused among the overrides)."""
import json
import os
import socket

import jax
import numpy as np
import pytest

from experiments import cli, sweep
from experiments.sweep import SweepConfig, SweepError
from klq_jax import sharding
from klq_jax.errors import RunLockedError
from tests.helpers import testing

FAST = ["--no-progress", "--no-tensorboard", "--log-samples-every", "0", "--eval-prompts", "4"]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _completions(run_dir, mode="sample"):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "eval", "completions.jsonl"))]
    return [r for r in rows if r["mode"] == mode]


def test_plan_runs_grid_over_config_fields():
    cfg = SweepConfig(preset="tiny-klq", taus=(0.05, 0.1), algos=("klq", "ppo"),
                      grid=("algo.lam=0.9,0.95", "optim.learning-rate=1e-3,3e-3"), out_dir="/tmp/s")
    specs = sweep.plan_runs(cfg, ["--total-episodes", "32"])
    assert len(specs) == 2 * 2 * 2 * 2
    s = specs[-1]
    assert s.name == "ppo-tau0.1-lam0.95-learning_rate0.003"
    assert (s.config.algo.name, s.config.algo.tau, s.config.algo.lam, s.config.optim.learning_rate) == (
        "ppo", 0.1, 0.95, 3e-3)
    assert s.config.out_dir == os.path.join("/tmp/s", s.name) and s.config.total_episodes == 32
    assert s.config.eval_every == s.config.num_iterations  # validates at least at the end
    assert len({x.name for x in specs}) == len(specs)
    for bad, match in [
        (dict(grid=("algo.tau=0.1",)), "twice"),
        (dict(grid=("out_dir=a,b",)), "sweep sets it"),
        (dict(grid=("algo.lam",)), "FIELD=V1"),
        (dict(grid=("algo.nope=1,2",)), ""),
    ]:
        with pytest.raises((SweepError, SystemExit)):
            sweep.plan_runs(SweepConfig(preset="tiny-klq", taus=(0.1,), **bad), [])
    with pytest.raises(SweepError, match="both a per-run override and a grid axis"):
        sweep.plan_runs(SweepConfig(preset="tiny-klq", taus=(0.1,)), ["--algo.tau", "0.2"])
    for owned in (["--out-dir", "x"], ["--out_dir=x"], ["--resume"], ["--algo.name", "ppo"]):
        with pytest.raises(SweepError, match="cannot be a per-run override"):
            sweep.plan_runs(SweepConfig(preset="tiny-klq", taus=(0.1,)), owned)


@pytest.mark.slow
def test_pareto_and_table_use_validation_metrics(tmp_path, mesh):
    cfg = SweepConfig(preset="tiny-klq", taus=(0.05, 0.5), algos=("klq", "ppo"), out_dir=str(tmp_path))
    overrides = ["--total-episodes", "32", "--eval-every", "1", *FAST]
    rows = sweep.run_sweep(cfg, overrides, mesh=mesh)
    assert [(r["algo"], r["tau"]) for r in rows] == [("klq", 0.05), ("klq", 0.5), ("ppo", 0.05), ("ppo", 0.5)]
    drawn = json.load(open(tmp_path / "pareto.json"))
    assert sorted(drawn) == ["KLQ", "PPO"]
    table = (tmp_path / "sweep.md").read_text()
    for r in rows:
        run_dir = tmp_path / r["run"]
        cfg_run = json.load(open(run_dir / "config.json"))
        assert cfg_run["algo"]["name"] == r["algo"] and cfg_run["algo"]["tau"] == r["tau"]
        # The plotted point and the table cell are the means of the held-out completions (an
        # independent sum over eval/completions.jsonl), not the last training batch's metrics.
        comps = _completions(run_dir)
        val_score = float(np.mean([c["score"] for c in comps]))
        val_kl = float(np.mean([c["kl"] for c in comps]))
        assert len(comps) == 4 and abs(r["eval/score"] - val_score) < 1e-9
        (pt,) = [p for p in drawn[r["algo"].upper()] if p["tau"] == r["tau"]]
        assert abs(pt["x"] - val_kl) < 1e-9 and abs(pt["y"] - val_score) < 1e-9
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {r['run']} |"))
        assert f"| {val_score:.4f} | {val_kl:.4f} |" in line
        assert line.endswith(f"| {r['score']:.4f} |")  # the training score is a separate column
    assert open(tmp_path / "pareto.png", "rb").read(4) == b"\x89PNG"
    assert open(tmp_path / "validation_curves.png", "rb").read(4) == b"\x89PNG"
    # A second call finds every run finished and does not train again.
    stamp = os.path.getmtime(tmp_path / "klq-tau0.05" / "metrics.jsonl")
    again = sweep.run_sweep(cfg, overrides, mesh=mesh)
    assert os.path.getmtime(tmp_path / "klq-tau0.05" / "metrics.jsonl") == stamp
    assert [r["eval/score"] for r in again] == [r["eval/score"] for r in rows]


@pytest.mark.slow
def test_run_safety(tmp_path, mesh, capsys):
    overrides = ["--total-episodes", "16", *FAST]
    # Two distinct τ that print alike get two directories; an equal value written twice runs once.
    cfg = SweepConfig(preset="tiny-klq", taus=(0.1, 0.1000001, 0.10), algos=("klq",), out_dir=str(tmp_path))
    rows = sweep.run_sweep(cfg, overrides, mesh=mesh)
    assert [r["run"] for r in rows] == ["klq-tau0.1", "klq-tau0.1000001"]
    for r in rows:
        assert json.load(open(tmp_path / r["run"] / "config.json"))["algo"]["tau"] == r["tau"]
    out = capsys.readouterr().out
    assert "[1/2] klq-tau0.1: training" in out and "listed twice" in out
    stamp = os.path.getmtime(tmp_path / "klq-tau0.1" / "metrics.jsonl")
    # Other overrides than the ones the runs were trained with: refused, naming the field, and
    # nothing is trained.
    with pytest.raises(SweepError, match=r"algo\.lam: 0\.95 → 0\.9"):
        sweep.run_sweep(cfg, [*overrides, "--algo.lam", "0.9"], mesh=mesh)
    assert os.path.getmtime(tmp_path / "klq-tau0.1" / "metrics.jsonl") == stamp
    # The sweep owns --out-dir: refused before any training (it used to crash after training).
    assert cli.run("sweep", ["tiny-klq", "--taus", "0.3", "--algos", "klq", "--out-dir", str(tmp_path),
                             "--", "--out-dir", str(tmp_path / "elsewhere"), *overrides]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith("klq sweep: error: --out-dir cannot be a per-run override"), line
    assert not (tmp_path / "klq-tau0.3").exists() and not (tmp_path / "elsewhere").exists()
    # --on-mismatch rerun moves the old run aside (never deletes it) and trains the new config.
    cfg1 = SweepConfig(preset="tiny-klq", taus=(0.1,), algos=("klq",), out_dir=str(tmp_path),
                       on_mismatch="rerun")
    (row,) = sweep.run_sweep(cfg1, [*overrides, "--algo.lam", "0.9"], mesh=mesh)
    assert json.load(open(tmp_path / "klq-tau0.1" / "config.json"))["algo"]["lam"] == 0.9
    assert json.load(open(tmp_path / "klq-tau0.1.stale-1" / "config.json"))["algo"]["lam"] == 0.95
    assert os.path.getmtime(tmp_path / "klq-tau0.1.stale-1" / "metrics.jsonl") == stamp


def test_rerun_never_moves_a_live_run_aside(tmp_path, capsys):
    """--on-mismatch rerun used to rename a run directory while its run was still training (which
    then died in orbax tracebacks). Two runs of another config; the second one live: refused in one
    line naming it, and neither is moved (nothing is trained)."""
    cfg = SweepConfig(preset="tiny-klq", taus=(0.05, 0.1), algos=("klq",), out_dir=str(tmp_path),
                      on_mismatch="rerun")
    specs = sweep.plan_runs(cfg, ["--total-episodes", "32"])
    for s in specs:  # what a sweep with --algo.lam 0.9 recorded
        os.makedirs(s.config.out_dir)
        old = dict(sweep._config_json(s.config), algo=dict(sweep._config_json(s.config)["algo"], lam=0.9))
        with open(os.path.join(s.config.out_dir, sweep.RECORD), "w") as f:
            json.dump({"name": s.name, "config": old}, f)
    live = specs[1].config.out_dir
    with testing.held_by_another_process(live) as pid:
        before = testing.snapshot(tmp_path)
        assert cli.run("sweep", ["tiny-klq", "--taus", "0.05", "0.1", "--algos", "klq", "--out-dir", str(tmp_path),
                                 "--on-mismatch", "rerun", "--", "--total-episodes", "32"]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert line.startswith(f"klq sweep: error: {live} is in use by another training run (pid {pid} on host "
                               f"{socket.gethostname()}, started ") and line.count("\n") == 0, line
        assert "): wait for it to finish, or choose another --out-dir for the sweep." in line, line
        assert testing.snapshot(tmp_path) == before
        assert sorted(os.listdir(tmp_path)) == ["klq-tau0.05", "klq-tau0.1"]
        with pytest.raises(RunLockedError, match=f"pid {pid}"):  # run_state alone: the same check
            sweep.run_state(specs[1], "rerun")
        assert sorted(os.listdir(tmp_path)) == ["klq-tau0.05", "klq-tau0.1"]
    # Its holder gone (a stale lock), the run is moved aside as before.
    assert sweep.run_state(specs[1], "rerun") == "new"
    assert sorted(os.listdir(tmp_path)) == ["klq-tau0.05", "klq-tau0.1.stale-1"]


def test_a_sweep_run_that_fails_before_training_leaves_nothing_to_block_a_rerun(tmp_path, mesh):
    """A run refused before its first iteration (a missing policy) leaves no sweep_run.json: a
    rerun with other overrides is a new run, not a 'run trained with another config'."""
    cfg = SweepConfig(preset="tiny-klq", taus=(0.1,), algos=("klq",), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-policy"):
        sweep.run_sweep(cfg, ["--task.policy", str(tmp_path / "no-such-policy"), "--eval-every", "1", *FAST],
                        mesh=mesh)
    assert not (tmp_path / "klq-tau0.1").exists()
    (spec,) = sweep.plan_runs(cfg, ["--eval-every", "2", *FAST])
    assert sweep.run_state(spec) == "new"
    # What a sweep rerun may change: the bookkeeping group of RESUMABLE_FIELDS, not the validation.
    from klq_jax.train import run_dir

    assert sweep.ignored_fields() == run_dir.BOOKKEEPING_FIELDS
    assert "eval_every" in run_dir.RESUMABLE_FIELDS and "eval_every" not in sweep.ignored_fields()


def test_an_out_dir_that_is_a_training_run_a_file_or_read_only_is_refused_in_one_line(tmp_path, capsys):
    """newcomer 3 #10/#5: a sweep wrote its files into a finished `klq train` run's directory; a
    file or a read-only location as --out-dir gave a bare [Errno N]. Each: one line, before any run."""
    from experiments import presets
    from klq_jax.train import run_dir
    from tests.helpers import testing

    run = tmp_path / "run"  # what `klq train` leaves: its config and its iteration log
    run.mkdir()
    (run / "config.json").write_text(json.dumps(run_dir.config_to_json(presets.get("tiny-klq"))))
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    before = testing.snapshot(run)
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    for out, expected in [
        (run, f"klq sweep: error: {run} is a `klq train` run directory (config.json (a klq training config)): "),
        (afile, f"klq sweep: error: --out-dir {afile} is not a directory; choose another --out-dir."),
        (ro / "sw", f"klq sweep: error: Cannot create the sweep directory {ro / 'sw'} ("),
    ]:
        capsys.readouterr()
        with testing.read_only(ro):
            rc = cli.run("sweep", ["tiny-klq", "--taus", "0.1", "--out-dir", str(out), "--no-compile-cache"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith(expected) and "Errno" not in err[0], err
    assert testing.snapshot(run) == before and sorted(os.listdir(run)) == ["config.json", "metrics.jsonl"]
    assert afile.read_text() == "x" and os.listdir(ro) == []
    # A directory holding no run of the trainer's (here a model's config.json) is no training run.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"model_type": "gpt_neox"}')
    assert run_dir.training_run_entries(str(tmp_path / "notes")) == []
