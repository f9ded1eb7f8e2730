"""The offline demo (``klq demo``), shortened: files written and both algorithms improve."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from experiments import demo
from experiments import synthetic as syn


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



@pytest.mark.slow
def test_a_demo_rerun_replaces_its_runs_but_never_a_live_one(tmp_path):
    """The demo used to rmtree <out>/klq before training it, whoever was writing there."""
    from klq_jax.errors import RunLockedError
    from klq_jax.train import run_dir

    live = tmp_path / "klq"
    live.mkdir()
    (live / "metrics.jsonl").write_text('{"iteration": 1}\n')
    lock = run_dir.RunLock.acquire(str(live))  # another process trains there
    try:
        cfg = demo.DemoConfig(out_dir=str(tmp_path), sft_steps=1, iterations=1, rollouts_per_batch=8,
                              epochs=1, eval_every=1, samples_per_prompt=0, progress=False)
        with pytest.raises(RunLockedError, match="in use by another training run"):
            demo.run(cfg)
        assert (live / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    finally:
        lock.release()
    # not live: the rerun replaces the previous run there
    demo.run(cfg)
    assert [json.loads(l)["iteration"] for l in (live / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (live / run_dir.LOCK_NAME).exists()
