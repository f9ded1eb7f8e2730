"""The offline demo (``klq demo``), shortened: files written and both algorithms improve."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from experiments import demo
from experiments import synthetic as syn
from klq_jax import errors
from klq_jax.train import run_dir
from tests.helpers import testing


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo.main(["--quick", "--out-dir", str(out), "--no-progress"])
    return out, result


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_demo_writes_its_files(demo_run):
    out, result = demo_run
    # metrics.jsonl: both algorithms, every iteration, exact evaluations at a few of them.
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = demo.DemoConfig.quick()
    for algo in ("klq", "ppo"):
        rows = [r for r in recs if r["algo"] == algo]
        assert sorted(r["iteration"] for r in rows) == list(range(cfg.iterations + 1))
        exact = [r for r in rows if "exact/J" in r]
        assert len(exact) >= 3 and exact[0]["iteration"] == 0 and exact[-1]["iteration"] == cfg.iterations
        assert all(r["exact/J"] <= r["j_star"] + 1e-9 for r in exact)  # J(π) <= J* for every π
        assert all(np.isfinite(r["reward"]) for r in rows if r["iteration"] > 0)
    # The figure: a real PNG of a sensible size.
    png = out / "training_curves.png"
    assert str(png) == str(result["png"])
    w, h = _png_size(png)
    assert w >= 800 and h >= 300 and png.stat().st_size > 20_000, (w, h, png.stat().st_size)
    # Samples, decoded into words, before and after, for every prompt.
    samples = (out / "samples.md").read_text()
    lang = syn.SyntheticLanguage()
    for prompt in lang.prompts:
        assert f"## Prompt: *{prompt}*" in samples
    for name in ("π_b (SFT, before)", "KLQ (after)", "PPO (after)", "π* (optimum)"):
        assert name in samples
    assert "`runs fast <eos>`" in samples
    # config.json: `klq demo --config <it>` gives the same config back; flags still override it.
    ran = demo.DemoConfig.quick(out_dir=str(out), progress=False)
    assert demo.parse_args(["--config", str(out / "config.json")]) == ran
    assert demo.parse_args(["--config", str(out / "config.json"), "--seed", "3"]).seed == 3
    # The summary table (also printed).
    summary = (out / "summary.md").read_text()
    for row in ("| π_b (SFT, start) |", "| KLQ |", "| PPO |", "| π* (exact optimum) |"):
        assert row in summary
    # The checkpoint is a Hugging Face directory a user can load (tokenizer included).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "sft-hf"))
    assert tok("cat runs fast")["input_ids"] == lang.encode("cat runs fast")
    assert (out / "sft-hf" / "model.safetensors").is_file()
    assert (out / "klq" / "metrics.jsonl").is_file() and (out / "ppo" / "metrics.jsonl").is_file()


def test_both_algorithms_improve_the_reward(demo_run):
    out, result = demo_run
    s = result["summary"]
    start = s["sft"]
    for algo in ("klq", "ppo"):
        # Exact E[R] and J of the final policy (enumeration, no sampling noise).
        assert s[algo]["reward"] > start["reward"] + 0.3, (algo, s[algo], start)
        assert s[algo]["J"] > start["J"] + 0.1, (algo, s[algo], start)
        # The sampled rewards logged by the trainer went up too.
        hist = [r for r in result["records"] if r["algo"] == algo and r["iteration"] > 0]
        first = np.mean([r["reward"] for r in hist[:3]])
        last = np.mean([r["reward"] for r in hist[-3:]])
        assert last > first + 0.2, (algo, first, last)
    assert s["optimum"]["gap_closed"] == pytest.approx(1.0)
    assert s["optimum"]["kl_to_opt"] == pytest.approx(0.0, abs=1e-9)


def test_demo_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        demo.parse_args(["--iterations", "0"])
    assert err.value.code != 0
    assert "iterations=0 must be >= 1" in " ".join(capsys.readouterr().err.split())
    cfg = demo.parse_args(["--quick", "--out-dir", "x", "--learning-rate", "0.002"])
    assert cfg.out_dir == "x" and cfg.learning_rate == 0.002 and cfg.iterations == demo.DemoConfig.quick().iterations



# ------------------------------------------------------------------------------------------
# The out_dir: locked before anything is written; nothing a user wrote is replaced without --overwrite
# ------------------------------------------------------------------------------------------

TINY = dict(sft_steps=1, iterations=1, rollouts_per_batch=8, epochs=1, eval_every=1, samples_per_prompt=0,
            progress=False)
TINY_ARGS = ["--sft-steps", "1", "--iterations", "1", "--rollouts-per-batch", "8", "--epochs", "1",
             "--eval-every", "1", "--samples-per-prompt", "0", "--no-progress"]


def _tiny(out, **kw) -> demo.DemoConfig:
    return demo.DemoConfig(out_dir=str(out), **{**TINY, **kw})


def _copy(src, tmp_path):
    return Path(shutil.copytree(src, tmp_path / "demo", symlinks=True))


def _demo_cli(*args) -> int:
    """``klq demo ARGS`` in process: the exit status (2 and one line on stderr for our errors)."""
    from experiments import cli

    return cli.run("demo", ["--no-compile-cache", *map(str, args)])


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("klq demo: error: "), err
    return err[0]


@pytest.mark.slow
def test_a_second_demo_on_a_live_demos_directory_writes_nothing(demo_run, tmp_path, capsys):
    """A second demo on the same --out-dir used to rewrite config.json and sft-hf/ before the
    lock of its klq/ run refused it."""
    out = _copy(demo_run[0], tmp_path)  # a previous demo's directory
    with testing.held_by_another_process(out) as pid:  # the first demo, still running
        before = testing.snapshot(out)
        with pytest.raises(errors.RunLockedError, match=f"in use by .*pid {pid} on host"):
            demo.run(_tiny(out, seed=1))
        capsys.readouterr()
        assert _demo_cli("--out-dir", out, "--seed", "1", *TINY_ARGS) == 2
        assert f"is in use by another training run (pid {pid}" in _one_error_line(capsys)
        assert testing.snapshot(out) == before  # config.json, sft-hf/, klq/, ppo/, ... byte for byte


def test_a_demo_refuses_a_directory_holding_a_users_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"learning_rate": 0.1, "my": "settings"}\n')
    (mine / "sft-hf").mkdir()
    (mine / "sft-hf" / "weights.bin").write_bytes(b"mine")
    before = testing.snapshot(mine)
    with pytest.raises(errors.ForeignFilesError,
                       match=r"config.json \(not a klq demo config\); sft-hf \(not written by klq demo\)\. "
                             r".*--overwrite"):
        demo.run(_tiny(mine))
    assert testing.snapshot(mine) == before and sorted(os.listdir(mine)) == ["config.json", "sft-hf"]
    capsys.readouterr()
    assert _demo_cli("--out-dir", mine, *TINY_ARGS) == 2
    assert "config.json (not a klq demo config)" in _one_error_line(capsys)
    assert testing.snapshot(mine) == before

    # Files under the demo's names without a demo's config.json are someone else's too.
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(errors.ForeignFilesError, match=r"metrics.jsonl \(not written by klq demo\)"):
        demo.run(_tiny(logs))
    assert (logs / "metrics.jsonl").read_text() == '{"step": 1}\n' and os.listdir(logs) == ["metrics.jsonl"]
    # A demo's config.json, with a file the demo does not write beside it.
    (mine / "config.json").write_text(json.dumps(dataclasses.asdict(_tiny(mine))))
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(errors.ForeignFilesError, match=r"holds files that klq demo did not write: notes.txt "
                                                        r"\(not written by klq demo\); sft-hf \(holds weights.bin"):
        demo.run(_tiny(mine))
    assert (mine / "sft-hf" / "weights.bin").read_bytes() == b"mine"


def test_a_training_run_directory_is_refused_even_with_overwrite_and_the_trainer_refuses_a_demos(tmp_path, capsys):
    """``klq demo --overwrite`` on a ``klq train`` run directory used to replace the run's
    config.json and metrics.jsonl and keep its checkpoints/: a hybrid whose training metrics were
    gone. Each of the two signs of a training run is enough; the trainer's --overwrite, in the
    mirror case, refuses the demo's config.json."""
    from experiments.config import RunConfig

    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    run_dir.atomic_write(str(run / "config.json"), json.dumps(run_dir.config_to_json(RunConfig())))
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    before = testing.snapshot(run)
    for overwrite in (False, True):
        with pytest.raises(errors.ForeignFilesError, match=r"run is a `klq train` run directory \(config.json "
                                                           r"\(a klq training config\); checkpoints 4\): the demo "
                                                           r"never writes into one, even with --overwrite"):
            demo.check_out_dir(str(run), overwrite=overwrite)
    capsys.readouterr()
    assert _demo_cli("--out-dir", run, "--overwrite", *TINY_ARGS) == 2
    assert "is a `klq train` run directory" in _one_error_line(capsys)
    assert testing.snapshot(run) == before
    (run / "config.json").unlink()  # the checkpoints alone
    with pytest.raises(errors.ForeignFilesError, match=r"run directory \(checkpoints 4\)"):
        demo.check_out_dir(str(run), overwrite=True)
    shutil.rmtree(run / "checkpoints")  # the training config alone
    run_dir.atomic_write(str(run / "config.json"), json.dumps(run_dir.config_to_json(RunConfig())))
    with pytest.raises(errors.ForeignFilesError, match=r"run directory \(config.json \(a klq training config\)\)"):
        demo.check_out_dir(str(run), overwrite=True)
    # The mirror: a demo's directory is not the trainer's to delete.
    dem = tmp_path / "dem"
    dem.mkdir()
    (dem / "config.json").write_text(json.dumps(dataclasses.asdict(_tiny(dem))))
    (dem / "metrics.jsonl").write_text('{"iteration": 1, "algo": "klq"}\n')
    with pytest.raises(errors.ForeignFilesError, match=r"klq train did not write: config.json \(not a klq "
                                                       r"training config\)\. Nothing was deleted"):
        run_dir.preflight(str(dem), resume=False, overwrite=True)
    demo.check_out_dir(str(dem))  # and the demo takes its own directory back


def test_a_previous_demos_sft_hf_holding_a_users_file_is_refused(tmp_path):
    """A rerun on a previous demo's directory used to replace sft-hf/ whole, with a file a user
    added to it (a model card), without any flag."""
    out = tmp_path / "demo"
    (out / "sft-hf").mkdir(parents=True)
    run_dir.atomic_write(str(out / "config.json"), json.dumps(dataclasses.asdict(_tiny(out))))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (out / "sft-hf" / name).write_text("{}")
    demo.check_out_dir(str(out))  # the demo's export: a rerun replaces it
    (out / "sft-hf" / "README.md").write_text("my model card")
    with pytest.raises(errors.ForeignFilesError, match=r"sft-hf \(holds README.md, not only the files of a "
                                                       r"Hugging Face export\)"):
        demo.check_out_dir(str(out))
    demo.check_out_dir(str(out), overwrite=True)  # the explicit flag


@pytest.mark.slow
def test_overwrite_replaces_the_demos_entries_keeps_the_rest_and_writes_nothing_through_a_link(tmp_path):
    """One --overwrite demo on a directory holding a user's files: config.json (under a demo's
    name) and notes.txt, and symbolic links under three of the demo's names. --overwrite used to
    write metrics.jsonl, summary.md, ... through such a link into the file it points to, and train
    klq/ in the directory a link pointed to, outside --out-dir."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "runs").mkdir(parents=True)
    (elsewhere / "log.jsonl").write_text('{"iteration": 0, "mine": 1}\n')
    (elsewhere / "summary.md").write_text("my summary")
    (elsewhere / "runs" / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}\n')
    (mine / "notes.txt").write_text("mine")
    for name, target in (("metrics.jsonl", "log.jsonl"), ("summary.md", "summary.md"), ("klq", "runs")):
        (mine / name).symlink_to(elsewhere / target)
    before = testing.snapshot(elsewhere)
    # Seed 1, as the rerun test's demo below: that one then compiles nothing anew (a seed changes programs).
    demo.main(["--out-dir", str(mine), "--overwrite", "--seed", "1", *TINY_ARGS])

    # The demo's entries are replaced (the user's config.json too); the user's other file stays.
    assert (mine / "notes.txt").read_text() == "mine"
    assert json.loads((mine / "config.json").read_text())["sft_steps"] == 1
    assert (mine / "sft-hf" / "model.safetensors").is_file() and (mine / "ppo" / "policy").is_dir()
    # The links are replaced by the demo's own entries; nothing was written where they pointed.
    assert testing.snapshot(elsewhere) == before
    for name in ("metrics.jsonl", "summary.md", "klq"):
        assert not (mine / name).is_symlink()
    assert json.loads((mine / "metrics.jsonl").read_text().splitlines()[0])["algo"] == "klq"
    assert (mine / "klq" / "policy").is_dir()
    # --overwrite is not taken from a recorded config; without it notes.txt is still in the way.
    assert demo.parse_args(["--config", str(mine / "config.json")]).overwrite is False
    with pytest.raises(errors.ForeignFilesError, match=r"did not write: notes.txt \(not written by klq demo\)\."):
        demo.run(_tiny(mine))


@pytest.mark.slow
def test_a_demo_rerun_replaces_its_runs_but_never_a_live_one(demo_run, tmp_path):
    """The demo used to rmtree <out>/klq before training it, whoever was writing there."""
    out = _copy(demo_run[0], tmp_path)  # a previous (--quick) demo's directory, rerun with tiny settings
    with testing.held_by_another_process(out / "klq") as pid:  # another process trains there
        before = testing.snapshot(out)
        with pytest.raises(errors.RunLockedError, match=f"klq is in use by another training run \\(pid {pid}"):
            demo.run(_tiny(out, seed=1))
        assert testing.snapshot(out) == before  # refused before anything was written
    # Both that run and an earlier demo died holding their locks: their stale locks are taken over.
    # The rerun replaces the previous demo's files and runs, without any flag.
    with testing.held_by_another_process(out):
        pass
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] != os.getpid()
    assert json.loads((out / "klq" / "config.json").read_text())["seed"] == 0
    demo.run(_tiny(out, seed=1))
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    for algo in ("klq", "ppo"):
        assert json.loads((out / algo / "config.json").read_text())["seed"] == 1
        assert [json.loads(l)["iteration"] for l in (out / algo / "metrics.jsonl").read_text().splitlines()] == [1]
        assert not (out / algo / run_dir.LOCK_NAME).exists()
    assert not (out / run_dir.LOCK_NAME).exists()
    assert sorted(os.listdir(out)) == sorted(demo.DEMO_ENTRIES)
