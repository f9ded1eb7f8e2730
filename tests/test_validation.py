"""Held-out validation during training: eval/* metrics every iteration, completions at the end,
and a run with validation trains bit-identically to one without."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import tasks
from experiments import train as train_cmd
from klq_jax import sharding
from klq_jax.models import gpt_neox
from klq_jax.train.loop import TIMING_KEYS
from klq_jax.train.validation import STAT_NAMES

ARGS = ["tiny-klq", "--total-episodes", "48", "--no-progress", "--eval-prompts", "6",
        "--log-samples-every", "0", "--save-every", "100"]


def _run(out_dir, *extra):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = train_cmd.parse_args([*ARGS, "--out-dir", str(out_dir), *extra])
    res = train_cmd.run(cfg, mesh=mesh)
    return res, [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    on_dir, off_dir = tmp_path_factory.mktemp("eval_on"), tmp_path_factory.mktemp("eval_off")
    on = _run(on_dir, "--eval-every", "1")
    off = _run(off_dir)
    return on_dir, on, off_dir, off


def test_eval_metrics_every_iteration_and_completions(runs):
    on_dir, (res, lines), _, _ = runs
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    for r in lines:
        for mode_prefix in ("eval/", "eval/greedy/"):
            for stat in STAT_NAMES:
                assert np.isfinite(r[mode_prefix + stat]), (mode_prefix + stat, r)
        assert 0.0 <= r["eval/truncated_frac"] <= 1.0 and 0 < r["eval/response_length"] <= 8
    comps = [json.loads(line) for line in open(on_dir / "eval" / "completions.jsonl")]
    assert sorted((c["mode"], c["index"]) for c in comps) == sorted(
        (m, i) for m in ("sample", "greedy") for i in range(6))
    last = lines[-1]
    for mode, prefix in (("sample", "eval/"), ("greedy", "eval/greedy/")):
        rows = [c for c in comps if c["mode"] == mode]
        # The logged means are the means of the written per-response values (independent sum).
        assert abs(np.mean([c["score"] for c in rows]) - last[prefix + "score"]) < 1e-9
        assert abs(np.mean([c["kl"] for c in rows]) - last[prefix + "kl"]) < 1e-9
        assert abs(np.mean([c["response_length"] for c in rows]) - last[prefix + "response_length"]) < 1e-9
        assert all(c["iteration"] == 3 and c["prompt"] for c in rows)
    # The programmatic reward (fraction of response tokens below 16) recomputed from the text.
    for c in comps:
        toks = [int(t) for t in c["response"].split()]
        assert abs(c["score"] - np.mean([t < 16 for t in toks])) < 1e-6
    # The held-out prompts are not training prompts.
    cfg = train_cmd.parse_args([*ARGS, "--out-dir", str(on_dir)])
    vocab = gpt_neox.GPTNeoXConfig.tiny().vocab_size
    train_set = tasks.synthetic_prompts(cfg.task.num_prompts, cfg.task.prompt_len, vocab, cfg.seed)
    assert not set(train_set.prompt_texts) & {c["prompt"] for c in comps}


def _tensorboard_scalars(tb_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read from the TFRecord event files (length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_eval_metrics_reach_tensorboard(runs):
    on_dir, (_, lines), _, _ = runs
    tb = _tensorboard_scalars(on_dir / "tb")
    for key in ("eval/score", "eval/kl", "eval/rlhf_reward", "eval/greedy/response_length"):
        assert tb[key] == {r["iteration"]: pytest.approx(r[key], rel=1e-6, abs=1e-7) for r in lines}, key


def test_training_is_bit_identical_with_and_without_validation(runs):
    _, (res_on, lines_on), _, (res_off, lines_off) = runs

    def training(r):
        return {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("eval/")}

    assert [training(r) for r in lines_on] == [training(r) for r in lines_off]
    assert not any(k.startswith("eval/") for r in lines_off for k in r)
    p_on = jax.tree_util.tree_leaves(nnx.to_pure_dict(jax.device_get(res_on.state.params)))
    p_off = jax.tree_util.tree_leaves(nnx.to_pure_dict(jax.device_get(res_off.state.params)))
    assert len(p_on) == len(p_off) and all(np.array_equal(a, b) for a, b in zip(p_on, p_off))
    assert np.array_equal(np.asarray(res_on.state.key), np.asarray(res_off.state.key))


def test_heldout_synthetic_prompts_are_disjoint_and_fixed():
    train = tasks.synthetic_prompts(64, 3, 6, seed=0)  # a small space: collisions are likely
    held = tasks.heldout_synthetic_prompts(train, 40, 3, 6, seed=0)
    again = tasks.heldout_synthetic_prompts(train, 40, 3, 6, seed=0)
    assert np.array_equal(held.prompt_ids, again.prompt_ids)
    rows = lambda ds: [tuple(r[m > 0]) for r, m in zip(ds.prompt_ids, ds.prompt_mask)]
    assert len(set(rows(held))) == 40 and not set(rows(held)) & set(rows(train))
    with pytest.raises(ValueError, match="held-out"):
        tasks.heldout_synthetic_prompts(train, 200, 1, 4, seed=0)  # only 3 one-token prompts exist
