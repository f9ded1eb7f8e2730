"""Runs never lose or mix data (issue 14): run-directory ownership, resume compatibility,
checkpoint fallback, finishing, TensorBoard purge, atomic rewrites and our typed errors.

One finished 2-iteration tiny run is trained once per module (``finished``); each test works on a
copy of it. Tests that need no training call the run-directory code directly.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import presets, tasks
from klq_jax import errors, sharding, train
from klq_jax.checkpoint import Checkpointer
from klq_jax.models.load import load_model
from klq_jax.train import run_dir
from tests.helpers import testing

ITERS = 2


def _mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), total_episodes=16 * ITERS, save_every=1, progress=False,
                log_samples_every=1)
    base.update(kw)
    return dataclasses.replace(presets.get("tiny-klq"), **base)


def _exp(cfg):
    return tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = _cfg(out)
    res = train.train(cfg, _exp(cfg), mesh=_mesh())
    assert [h["iteration"] for h in res.history] == [1, 2]
    return out


def _copy(finished, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(finished, dst)
    return dst


_snapshot = testing.snapshot


# ------------------------------------------------------------------------------------------
# Ownership
# ------------------------------------------------------------------------------------------


def _trainer(out_dir, hold):
    env = dict(os.environ, **testing.cpu_env(1),
               KLQ_PHASE_MARKERS="1", KLQ_PHASE_HOLD=hold)
    cmd = [sys.executable, "-m", "experiments", "train", "tiny-klq", "--out-dir", str(out_dir),
           "--total-episodes", "32", "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = _trainer(out, "sample@1")
    try:
        testing.wait_for_stderr_line(proc, "klq-phase held sample 1")  # it owns the directory now
        cfg = _cfg(out)
        with pytest.raises(errors.RunLockedError, match=f"pid {proc.pid} on host"):
            train.train(cfg, _exp(cfg), mesh=_mesh())
        # one more input of the kind: --overwrite must not delete a live run's files either
        with pytest.raises(errors.RunLockedError, match=f"pid {proc.pid}"):
            run_dir.RunDir.open(str(out), resume=False, overwrite=True)
        assert (out / "config.json").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # the holder died by SIGKILL: its lock file is still there, and stale
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == proc.pid
    with run_dir.RunDir.open(str(out), resume=True, overwrite=False, allow_fresh=True):
        assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / run_dir.LOCK_NAME).exists()  # released on exit


def test_a_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / run_dir.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": 0}))
    with pytest.raises(errors.RunLockedError, match=r"host elsewhere-7.*delete .*\.klq-run\.lock"):
        run_dir.RunDir.open(str(tmp_path), resume=False, overwrite=False)
    # a lock file of a dead process on this host is stale: taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / run_dir.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    run_dir.RunDir.open(str(tmp_path), resume=False, overwrite=False).close()


def test_a_finished_run_is_not_touched_by_a_new_start_without_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    cfg = _cfg(run, total_episodes=64)  # the example: the same command, other episodes
    with pytest.raises(errors.RunExistsError, match=r"metrics.jsonl \(2 lines\).*checkpoints 1, 2.*policy/.*--resume.*--overwrite"):
        train.train(cfg, _exp(cfg), mesh=_mesh())
    assert _snapshot(run) == before
    # one more: a run killed before its first checkpoint (only its first metrics line) is a run too
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(errors.RunExistsError, match="metrics.jsonl"):
        run_dir.preflight(str(tmp_path / "early"), resume=False, overwrite=False)


def test_a_recorded_config_does_not_carry_how_its_run_was_started(finished, tmp_path):
    """`klq train --config OLD/config.json --out-dir OTHER`: OLD was started with --overwrite (or
    --resume); the rerun must not delete (or resume) the run in OTHER because of it."""
    from experiments import train as train_cmd

    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    for flags in (dict(overwrite=True), dict(resume=True, allow_fresh=True)):
        recorded = tmp_path / "recorded.json"
        recorded.write_text(json.dumps(run_dir.config_to_json(_cfg(tmp_path / "old", **flags))))
        for argv in (["--config", str(recorded)], ["tiny-klq", "--config", str(recorded)]):
            cfg = train_cmd.parse_args([*argv, "--out-dir", str(run)])
            assert (cfg.resume, cfg.overwrite, cfg.allow_fresh) == (False, False, False), (flags, argv)
            with pytest.raises(errors.RunExistsError, match="already holds a run"):
                run_dir.RunDir.open(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                    allow_fresh=cfg.allow_fresh)
        # given on the command line, the flags still count
        assert train_cmd.parse_args(["--config", str(recorded), "--overwrite"]).overwrite
    assert _snapshot(run) == before


def test_overwrite_deletes_the_run_files_only(finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "my_notes.txt").write_text("keep me")
    with run_dir.RunDir.open(str(run), resume=False, overwrite=True):
        assert sorted(os.listdir(run)) == [run_dir.LOCK_NAME, "my_notes.txt"]
    assert sorted(os.listdir(run)) == ["my_notes.txt"]
    with pytest.raises(errors.ConfigError, match="exclude each other"):
        _cfg(run, resume=True, overwrite=True)


def test_overwrite_refuses_files_the_trainer_did_not_write(finished, tmp_path, capsys):
    """--overwrite used to delete any config.json/eval/policy/... in --out-dir, whoever wrote them:
    here a Hugging Face model's directory, and a run with a user's files under the trainer's names."""
    from experiments import cli

    model = tmp_path / "model"
    testing.tiny_hf_gpt_neox(model)
    (model / "eval").mkdir()
    (model / "eval" / "scores.csv").write_text("task,score\n")
    before, entries = _snapshot(model), sorted(os.listdir(model))
    capsys.readouterr()
    with pytest.raises(errors.ForeignFilesError, match=r"config.json \(not a klq training config\); "
                                                       r"eval \(holds scores.csv, .*Nothing was deleted"):
        run_dir.RunDir.open(str(model), resume=False, overwrite=True)
    assert _snapshot(model) == before and sorted(os.listdir(model)) == entries  # no lock left
    # `klq train --overwrite`: one line, exit 2, before any model is loaded
    assert cli.run("train", ["tiny-klq", "--out-dir", str(model), "--overwrite", "--no-compile-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klq train: error: --overwrite deletes only") and "\n" not in err, err
    assert "config.json (not a klq training config)" in err
    assert _snapshot(model) == before
    # Without --overwrite it used to say "already holds a run (config.json)": it holds a model.
    assert cli.run("train", ["tiny-klq", "--out-dir", str(model), "--no-compile-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"klq train: error: {model} holds no klq train run but files of another kind under "
                          "a run's names: config.json (not a klq training config); eval (holds scores.csv") \
        and "choose another --out-dir" in err and "already holds a run" not in err and "\n" not in err, err
    assert _snapshot(model) == before and sorted(os.listdir(model)) == entries

    # A finished run where a user keeps files of theirs under the trainer's names: each is named.
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "best").mkdir()
    (run / "tb" / "README").write_text("my notes")
    shutil.rmtree(run / "policy")
    os.symlink(model, run / "policy")
    (run / "samples.jsonl").write_text("prompt,response\n")
    before = _snapshot(run)
    with pytest.raises(errors.ForeignFilesError) as e:
        run_dir.RunDir.open(str(run), resume=False, overwrite=True)
    for part in ("checkpoints (holds best, not only numbered checkpoints)", "policy (a symbolic link)",
                 "samples.jsonl (not a log of training iterations)", "tb (holds README"):
        assert part in str(e.value), str(e.value)
    assert "config.json" not in str(e.value) and "metrics.jsonl" not in str(e.value)
    assert _snapshot(run) == before and os.path.islink(run / "policy")
    # The trainer's export needs the trainer's config.json beside it.
    other = tmp_path / "other"
    shutil.copytree(finished / "policy", other / "policy")
    with pytest.raises(errors.ForeignFilesError, match=r"policy \(no klq training config.json beside it\)"):
        run_dir.preflight(str(other), resume=False, overwrite=True)
    assert os.path.isdir(other / "policy")


def test_overwrite_refuses_a_users_file_inside_the_export(finished, tmp_path):
    """--overwrite used to delete policy/ (and eval/) whole, with a file a user added to it (a model
    card, their own scores)."""
    run = _copy(finished, tmp_path)
    (run / "policy" / "README.md").write_text("my model card")
    before = _snapshot(run)
    with pytest.raises(errors.ForeignFilesError, match=r"policy \(holds README.md, not only the files of a "
                                                       r"Hugging Face export\)"):
        run_dir.RunDir.open(str(run), resume=False, overwrite=True)
    assert _snapshot(run) == before
    (run / "policy" / "README.md").unlink()  # the export's own files only: deleted
    (run / "eval").mkdir()  # eval/ likewise: the validation writes completions.jsonl there, nothing else
    (run / "eval" / "completions.jsonl").write_text('{"iteration": 1}\n')
    (run / "eval" / "my_scores.jsonl").write_text("mine")
    with pytest.raises(errors.ForeignFilesError, match=r"eval \(holds my_scores.jsonl, not only the validation"):
        run_dir.RunDir.open(str(run), resume=False, overwrite=True)
    (run / "eval" / "my_scores.jsonl").unlink()
    with run_dir.RunDir.open(str(run), resume=False, overwrite=True):
        assert not (run / "policy").exists()


def test_an_unwritable_out_dir_is_one_clear_error(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cfg = _cfg(afile / "run")
    with pytest.raises(errors.RunDirError, match="Cannot create the run directory .*choose a writable --out-dir"):
        train.train(cfg, _exp(cfg), mesh=_mesh())
    with pytest.raises(errors.RunDirError, match="not a directory|Cannot create"):
        run_dir.RunDir.open(str(afile), resume=False, overwrite=False)


# ------------------------------------------------------------------------------------------
# Resume compatibility
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    (dict(algo=dataclasses.replace(presets.get("tiny-klq").algo, name="ppo")), "algo.name"),
    (dict(rollouts_per_batch=32, total_episodes=64), "rollouts_per_batch"),
    (dict(task=dataclasses.replace(presets.get("tiny-klq").task, policy="random:pythia-14m")), "task.policy"),
    (dict(seed=1), "seed"),
    (dict(optim=dataclasses.replace(presets.get("tiny-klq").optim, learning_rate=1e-4)), "optim.learning_rate"),
])
def test_resume_refuses_a_change_of_meaning_by_name(finished, tmp_path, change, field):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    cfg = _cfg(run, resume=True, **change)
    with pytest.raises(errors.ResumeConfigError, match=rf"Cannot resume from checkpoint 2 .*{field} differs"):
        train.train(cfg, _exp(_cfg(run)), mesh=_mesh())
    assert _snapshot(run) == before


def test_resume_accepts_logging_and_cadence_changes(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    cfg = _cfg(run, resume=True, tensorboard=False, log_samples_every=5, save_every=3, keep_checkpoints=5,
               num_logged_samples=1, progress=False)
    res = train.train(cfg, _exp(cfg), mesh=_mesh())
    assert res.history == []  # finished: nothing to run again
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"}


def test_a_resume_with_other_logging_and_cadence_ends_like_the_original(finished, tmp_path):
    """The fields that may change on --resume change nothing the run computes: a run killed after
    checkpoint 1, resumed with other logging and save settings, ends as the uninterrupted one."""
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "2")  # the state after a kill before checkpoint 2 was written
    shutil.rmtree(run / "policy")
    cfg = _cfg(run, resume=True, save_every=5, keep_checkpoints=1, log_samples_every=0, tensorboard=False)
    res = train.train(cfg, _exp(cfg), mesh=_mesh())
    assert [h["iteration"] for h in res.history] == [2]
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in train.loop.TIMING_KEYS}
                       for l in open(p)]
    assert strip(run / "metrics.jsonl") == strip(finished / "metrics.jsonl")
    assert _snapshot(run / "policy") == _snapshot(finished / "policy")
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]  # keep_checkpoints=1, the last always saved


def test_a_changed_model_size_is_a_clear_refusal(finished, tmp_path):
    run = _copy(finished, tmp_path)
    cfg = _cfg(run, resume=True)
    exp = _exp(cfg)
    _, graphdef, params = load_model("random:pythia-14m", key=jax.random.key(0), value_head=True)
    exp = dataclasses.replace(exp, graphdef=graphdef, params=params)  # same config, other model
    with pytest.raises(errors.ResumeConfigError, match=r"the model differs .* was \("):
        train.train(cfg, exp, mesh=_mesh())


def test_resume_refuses_other_weights_under_the_same_model_path(finished, tmp_path):
    """The config names models by path: a path that now holds other weights (a re-run SFT written
    into the same directory) would silently change θ_0 and π_b of a resumed run."""
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    cfg = _cfg(run, resume=True)
    exp = _exp(cfg)
    other = jax.tree_util.tree_map(lambda x: x * 1.001 if jnp.issubdtype(x.dtype, jnp.floating) else x, exp.params)
    with pytest.raises(errors.ResumeConfigError, match=r"checkpoint 2 .*the initial policy \(task.policy\) "
                                                       "loaded now has other weights"):
        train.train(cfg, dataclasses.replace(exp, params=other), mesh=_mesh())
    with pytest.raises(errors.ResumeConfigError, match="the reference policy π_b loaded now has other weights"):
        train.train(cfg, dataclasses.replace(exp, ref_graphdef=exp.graphdef, ref_params=other), mesh=_mesh())
    assert _snapshot(run) == before
    # the same weights on another mesh (their sums taken in another order) still resume
    res = train.train(cfg, exp, mesh=sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4]))  # FSDP-sharded
    assert res.history == []


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(errors.NoCheckpointError, match="no run there: is the --out-dir right"):
        run_dir.RunDir.open(str(missing), resume=True, overwrite=False)
    assert not missing.exists()  # not created by the refused start
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _cfg(empty, resume=True)
    with pytest.raises(errors.NoCheckpointError, match="--allow-fresh"):
        train.train(cfg, _exp(cfg), mesh=_mesh())
    run_dir.RunDir.open(str(empty), resume=True, overwrite=False, allow_fresh=True).close()


# ------------------------------------------------------------------------------------------
# Checkpoint fallback
# ------------------------------------------------------------------------------------------


def _truncate_largest_data_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
             if "ocdbt.process" in r and os.sep + "d" in r]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def _damage(kind, step_dir):
    if kind == "truncated data file":
        _truncate_largest_data_file(step_dir)
    elif kind == "missing _METADATA":
        os.remove(step_dir / "state" / "_METADATA")
    elif kind == "truncated meta":
        p = step_dir / "meta" / "metadata"
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    elif kind == "missing state/":
        shutil.rmtree(step_dir / "state")
    elif kind in ("meta without prompts", "meta iteration not an int"):  # valid JSON, wrong content
        p = step_dir / "meta" / "metadata"
        meta = json.loads(p.read_text())
        if kind == "meta without prompts":
            del meta["prompts"]
        else:
            meta["iteration"] = str(meta["iteration"])
        p.write_text(json.dumps(meta))
    elif kind == "zeroed manifest":
        p = step_dir / "state" / "manifest.ocdbt"
        p.write_bytes(b"\0" * len(p.read_bytes()))
    elif kind == "flipped bit in an array":  # still decodes: only the checksums show it
        testing.flip_one_bit_in_checkpoint(step_dir, prefix="params.")


def _target(cfg):
    exp = _exp(cfg)
    opt, _ = train.make_optimizer(cfg.optim, 1)
    return jax.eval_shape(lambda p: train.TrainState(p, opt.init(p), jnp.zeros((), jnp.int32),
                                                     jax.random.key_data(jax.random.key(0))), exp.params)


@pytest.mark.parametrize("kind, reason", [
    ("truncated data file", "does not restore"),
    ("missing _METADATA", "missing state/_METADATA"),
    ("truncated meta", "unreadable meta"),
    ("missing state/", "missing state/"),
    ("zeroed manifest", "does not restore|unreadable state metadata"),
    ("meta without prompts", "meta has no valid 'prompts'"),
    ("meta iteration not an int", "meta's iteration is '2', not 2"),
    ("flipped bit in an array", r"^array data do not match their checksums: params/\S+$"),
])
def test_restore_falls_back_past_a_damaged_newest_checkpoint(finished, tmp_path, kind, reason, caplog):
    run = _copy(finished, tmp_path)
    _damage(kind, run / "checkpoints" / "2")
    ck = Checkpointer(str(run / "checkpoints"))
    try:
        step, _, meta, skipped = ck.restore_newest(_target(_cfg(run)), required_meta={"prompts": dict})
    finally:
        ck.close()
    assert step == 1 and meta["iteration"] == 1
    assert [s for s, _ in skipped] == [2]
    assert __import__("re").search(reason, skipped[0][1]), skipped
    assert "Skipping checkpoint 2" in caplog.text
    assert (run / "skipped_checkpoints" / "2").is_dir() and not (run / "checkpoints" / "2").exists()


def test_no_restorable_checkpoint_names_each_reason(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _damage("missing state/", run / "checkpoints" / "2")
    _damage("truncated meta", run / "checkpoints" / "1")
    ck = Checkpointer(str(run / "checkpoints"))
    try:
        with pytest.raises(errors.CheckpointError, match=r"2: missing state/; 1: unreadable meta"):
            ck.restore_newest(_target(_cfg(run)))
    finally:
        ck.close()


@pytest.mark.parametrize("kind", ["truncated data file", "meta without prompts"])
def test_a_resumed_run_past_a_damaged_checkpoint_ends_like_the_original(finished, tmp_path, kind):
    run = _copy(finished, tmp_path)
    _damage(kind, run / "checkpoints" / "2")
    shutil.rmtree(run / "policy")  # the state after a kill between checkpoint 2 and the export
    cfg = _cfg(run, resume=True)
    res = train.train(cfg, _exp(cfg), mesh=_mesh())
    assert [h["iteration"] for h in res.history] == [2]
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in train.loop.TIMING_KEYS}
                       for l in open(p)]
    assert strip(run / "metrics.jsonl") == strip(finished / "metrics.jsonl")
    for name in os.listdir(finished / "policy"):
        assert (run / "policy" / name).read_bytes() == (finished / "policy" / name).read_bytes()


# ------------------------------------------------------------------------------------------
# Finishing
# ------------------------------------------------------------------------------------------


def test_a_run_killed_before_its_export_completes_it_on_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "policy")
    cfg = _cfg(run, resume=True)
    res = train.train(cfg, _exp(cfg), mesh=_mesh())
    assert res.history == []
    assert _snapshot(run / "policy") == _snapshot(finished / "policy")
    # one more: killed half-way through the export (a partial temp dir of a dead pid, no policy/)
    shutil.rmtree(run / "policy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = run / f".policy.tmp-{int(dead.stdout)}-0abc"
    partial.mkdir()
    (partial / "params.safetensors").write_bytes(b"half")
    train.train(cfg, _exp(cfg), mesh=_mesh())
    assert _snapshot(run / "policy") == _snapshot(finished / "policy")
    assert not partial.exists()


def test_klq_train_says_when_a_resumed_run_has_nothing_left(finished, tmp_path, capsys, monkeypatch):
    from experiments import train as train_cmd

    monkeypatch.setattr(sharding, "mesh_from_config", lambda _cfg: _mesh())  # one of the 8 test devices
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "policy")  # killed before its export: the resume writes it, and says so
    for progress in ("--no-progress", "--progress"):  # then once more, finished: nothing to do, and it says so too
        tb = _snapshot(run / "tb")
        res = train_cmd.main(["tiny-klq", "--out-dir", str(run), "--total-episodes", str(16 * ITERS),
                              "--save-every", "1", "--log-samples-every", "1", progress, "--resume"])
        assert res.history == []
        out, err = capsys.readouterr()
        assert out == f"nothing left to train: {run} has all {ITERS} iterations and its policy/ export.\n"
        assert _snapshot(run / "tb") == tb and "100%" not in err  # no empty events file, no progress bar
    assert _snapshot(run / "policy") == _snapshot(finished / "policy")


def test_the_done_line_counts_the_runs_iterations_and_says_it_resumed():
    from types import SimpleNamespace

    from experiments import train as train_cmd

    cfg = SimpleNamespace(out_dir="runs/x", omega=1.0)
    rec = dict(score=0.5, reward=0.25, truncated_frac=0.25, kl=0.1, rlhf_reward=0.2)
    assert train_cmd.summary(cfg, [dict(rec, iteration=1)]).startswith("done: 1 iteration -> runs/x; ")
    resumed = [dict(rec, iteration=i) for i in range(5, 33)]  # killed after checkpoint 4 of 32
    assert train_cmd.summary(cfg, resumed).startswith(
        "done: 32 iterations (resumed from checkpoint 4: 28 trained now) -> runs/x; last batch: score 0.5000, "
        "ω penalty -0.2500 (ω=1 x 25% of responses")


# ------------------------------------------------------------------------------------------
# Atomic rewrites and TensorBoard
# ------------------------------------------------------------------------------------------


def test_a_kill_during_the_metrics_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"iteration": i, "x": i}) + "\n" for i in range(1, 5)) + '{"iterat'
    path.write_text(text)

    def killed(*a):  # the process dies between writing the temp file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dir.truncate_jsonl(str(path), 2)
    assert path.read_text() == text
    monkeypatch.undo()
    assert run_dir.truncate_jsonl(str(path), 2) == 3  # lines 3, 4 and the cut-off line
    assert [json.loads(l)["iteration"] for l in open(path)] == [1, 2]


def test_a_kill_while_writing_the_completions_leaves_nothing_behind(tmp_path, monkeypatch):
    from klq_jax.train import validation

    path = tmp_path / "eval" / "completions.jsonl"
    validation.write_completions(str(path), [{"prompt": "a", "response": "b"}], iteration=1)

    def killed(*a):  # the process dies between writing the temp file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        validation.write_completions(str(path), [{"prompt": "c", "response": "d"}], iteration=2)
    monkeypatch.undo()
    assert json.loads(path.read_text())["iteration"] == 1  # the old file, whole
    run_dir.RunDir.open(str(tmp_path), resume=True, overwrite=False, allow_fresh=True).close()
    assert os.listdir(tmp_path / "eval") == ["completions.jsonl"]  # the temp file went with its process


def test_tensorboard_purge_leaves_every_step_once(tmp_path):
    tb = str(tmp_path / "tb")
    w = run_dir.TensorBoardWriter(tb)
    for step in range(1, 6):
        w.scalar("score", float(step), step)
        w.text("samples", f"s{step}", step)
    w.flush()
    w.close()
    events = run_dir._event_files(tb)[0]
    with open(events, "ab") as f:  # a record cut off by a kill
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert run_dir.purge_tensorboard(tb, 3) == 4
    w = run_dir.TensorBoardWriter(tb)  # the resumed run writes steps 4 and 5 again
    for step in (4, 5):
        w.scalar("score", 10.0 + step, step)
    w.close()
    assert sorted(run_dir.read_tensorboard_scalars(tb)) == [
        ("score", 1, 1.0), ("score", 2, 2.0), ("score", 3, 3.0), ("score", 4, 14.0), ("score", 5, 15.0)]


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX's package imports torch when installed (seconds of every trainer's start-up): the
    run's writer and reader do not, and torch still imports normally afterwards."""
    code = (
        "import sys\n"
        "from klq_jax.train import run_dir\n"
        "w = run_dir.TensorBoardWriter(sys.argv[1]); w.scalar('score', 2.5, 7); w.text('s', 'x', 7); w.close()\n"
        "assert run_dir.read_tensorboard_scalars(sys.argv[1]) == [('score', 7, 2.5)]\n"
        "assert run_dir.purge_tensorboard(sys.argv[1], 7) == 0\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(float(torch.ones(2).sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "2.0"]


# ------------------------------------------------------------------------------------------
# Typed errors
# ------------------------------------------------------------------------------------------


def test_a_nan_weight_is_reported_as_such(tmp_path):
    cfg = _cfg(tmp_path / "run")
    exp = _exp(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(exp.params)
    bad = [leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)] + leaves[1:]
    with pytest.raises(errors.NonFiniteError, match="The initial policy holds NaN/inf weights .*damaged"):
        train.train(cfg, dataclasses.replace(exp, params=jax.tree_util.tree_unflatten(treedef, bad)), mesh=_mesh())
    with pytest.raises(errors.NonFiniteError, match="The reference policy holds NaN/inf"):
        train.train(dataclasses.replace(cfg, overwrite=True), dataclasses.replace(
            exp, ref_graphdef=exp.graphdef, ref_params=jax.tree_util.tree_unflatten(treedef, bad)), mesh=_mesh())


def test_mesh_and_prompt_length_mismatches_are_typed_errors(tmp_path):
    with pytest.raises(errors.MeshError, match="does not match the .* available devices"):
        sharding.make_mesh(3, 1, 1, devices=jax.devices()[:8])
    cfg = _cfg(tmp_path / "a", micro_batch_size=4)
    with pytest.raises(errors.MeshError, match="micro_batch_size=4 must be a multiple of the 8"):
        train.train(cfg, _exp(cfg), mesh=sharding.make_mesh(8, 1, 1, devices=jax.devices()[:8]))
    long = _cfg(tmp_path / "b")
    long = dataclasses.replace(long, task=dataclasses.replace(long.task, prompt_len=300))
    with pytest.raises(errors.PromptTooLongError, match="exceeds the model's max_position_embeddings=256"):
        train.train(long, _exp(long), mesh=_mesh())
    many = _cfg(tmp_path / "c", max_new_tokens=255)
    with pytest.raises(errors.PromptTooLongError, match="max_new_tokens 255"):
        train.train(many, _exp(many), mesh=_mesh())
    too_many = _cfg(tmp_path / "d", max_new_tokens=256)  # alone as long as the positions: say max_new_tokens
    with pytest.raises(errors.PromptTooLongError) as info:
        train.train(too_many, _exp(too_many), mesh=_mesh())
    width = int(re.match(r"Prompt length (\d+) ", str(info.value)).group(1))
    assert str(info.value).endswith(f"max_position_embeddings=256. max_new_tokens must be <= {256 - width}.")


def _assert_quotes_whole_words(err: BaseException) -> None:
    """The cause's first line, quoted in ``err``'s message in parentheses: whole, or cut before a
    space (orbax's "... failed to fil …" used to be cut mid-word)."""
    cause = str(err.__cause__).strip().splitlines()[0]
    quoted = re.search(r"\(\w+: (.*?)\)\. Free disk", str(err)).group(1)
    if quoted.endswith(" …"):
        kept = quoted[:-2]
        assert cause.startswith(kept) and cause[len(kept)] in " \t,;:(", (quoted, cause)
    else:
        assert quoted == cause


def test_a_failed_checkpoint_write_is_one_clear_error(tmp_path, caplog):
    import logging
    import resource

    ck = Checkpointer(str(tmp_path / "ck"))
    state = {"w": jax.random.normal(jax.random.key(0), (256, 1024))}  # 1 MiB, incompressible
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # "disk full" after 64 KiB a file
    try:
        with pytest.raises(errors.CheckpointError, match=r"Could not write checkpoint 1 to .*Free disk space") as info:
            ck.save(1, state, {"iteration": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert ck.all_steps() == []
    # no checkpoint to resume from: the advice is to start again, not --resume (which would fail)
    assert "no earlier checkpoint was written, so there is nothing for --resume" in str(info.value)
    assert "intact" not in str(info.value)
    _assert_quotes_whole_words(info.value)
    # the one error replaces orbax's own: each writer thread logged the failure with its traceback
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR] == []
    # one more: an asynchronous save (the loop's) fails in the background; the wait names it
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        ck.save(1, state, {"iteration": 1}, wait=False)
        with pytest.raises(errors.CheckpointError, match=r"Could not write checkpoint 1 to "):
            ck.finish_pending()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert ck.all_steps() == []
    ck.save(2, state, {"iteration": 2})  # space again: the next save works
    with pytest.raises(errors.CheckpointError, match="would not be written: .* already holds checkpoint 2"):
        ck.save(1, state, {"iteration": 1})  # orbax would skip it silently
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # full again, after checkpoint 2
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with pytest.raises(errors.CheckpointError, match=r"Could not write checkpoint 3 to .*continue with "
                                                         r"--resume: it restarts from checkpoint 2"):
            ck.save(3, state, {"iteration": 3})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert ck.all_steps() == [2]
    ck.close()
    (tmp_path / "file").write_text("x")  # one more: the checkpoint directory is a file
    with pytest.raises(errors.CheckpointError, match="checkpoint"):
        Checkpointer(str(tmp_path / "file")).save(1, state, {"iteration": 1})


def test_offline_lists_every_missing_source_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KLQ_LOCAL_MODELS", str(tmp_path / "empty"))
    t = presets.TLDR_TASK
    with pytest.raises(errors.SourceNotFoundError) as info:
        tasks.build_experiment(t, batch_size=4, seed=0)
    msg = str(info.value)
    assert msg.startswith("3 source(s)") and "\n" not in msg
    for name in (t.policy, t.reward_model, t.dataset):
        assert name in msg
    h = presets.HH_TASK  # one more: HH's policy, GPT-2 reward model and dataset
    with pytest.raises(errors.SourceNotFoundError, match=rf"policy '{h.policy}', reward_model '{h.reward_model}', dataset '{h.dataset}'"):
        tasks.build_experiment(h, batch_size=4, seed=0)


def test_klq_train_with_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    """The Hub does not answer (``HF_ENDPOINT``: a localhost port bound but never listening, so
    connections are refused): one error line naming HF_HUB_OFFLINE=1 and the missing
    KLQ_LOCAL_MODELS directory, and none of huggingface_hub's retry warnings (~25 s of them)."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}", HF_HUB_OFFLINE="0",
                   HF_DATASETS_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
                   KLQ_LOCAL_MODELS=str(tmp_path / "missing"), JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-m", "experiments", "train", "tldr-klq", "--out-dir",
                               str(tmp_path / "run")], env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Retry" not in proc.stderr and "thrown while requesting" not in proc.stderr
    assert lines[0].startswith("klq train: error: 3 source(s) are neither local nor downloadable")
    assert "set HF_HUB_OFFLINE=1" in lines[0]
    assert f"KLQ_LOCAL_MODELS={tmp_path / 'missing'}, a directory that does not exist" in lines[0]
