"""experiments/bench_iteration.py: it runs at a tiny shape and reports every phase; its FLOP model
agrees with XLA's own count. (No speed is asserted: timings live in the benchmark's output.)"""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import bench_iteration
from klq_jax.models import gpt_neox


def test_tiny_run_prints_every_phase(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench_iteration.main(["--tiny", "--repeats", "1", "--epochs", "1", "--json", str(out)])
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for phase in bench_iteration.PHASES + ("iteration", "episodes/s"):
        assert phase in lines, f"no line for {phase!r} in:\n{text}"
    assert "AMD" in text or "Intel" in text or "machine:" in text  # the CPU model line
    (gemm,) = [line for line in text.splitlines() if line.strip().startswith("GEMM ")]
    assert "torch not measured (too small a GEMM to time)" in gemm  # not a meaningless "torch 0.0 GFLOP/s"
    saved = json.loads(out.read_text())
    for phase in bench_iteration.PHASES + ("iteration",):
        s = saved["klq"][phase]
        assert s["best"] >= 0 and s["median"] >= s["best"] and "compile" in s
    # The iteration (without the checkpoint, which is reported apart) is at least the sum of its
    # synced phases, and the compute phases did some work.
    it = saved["klq"]["iteration"]["all"][0]
    parts = sum(saved["klq"][p]["all"][0] for p in ("sample", "score", "targets", "update"))
    assert parts <= it + 1e-6
    for phase in ("sample", "score", "update"):
        assert saved["klq"][phase]["flops"] > 0
    for phase in ("sample", "score", "update"):
        assert saved["klq"][phase]["best"] > 0
    assert res["machine"]["load_start"] >= 0 and saved["rates"]["jax_gemm"] > 0


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("queries", [None, 5])
def test_forward_flops_match_xla_cost_analysis(grad, queries):
    # Matmul-dominated shapes: the elementwise work XLA also counts is ~1% (ReLU here: XLA counts
    # the exact GELU's erf as a ~60-flop polynomial per element, which the FLOP model leaves out).
    cfg = gpt_neox.GPTNeoXConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4,
                                 intermediate_size=512, max_position_embeddings=64, hidden_act="relu")
    gd, params = gpt_neox.init(cfg, jax.random.key(0))
    rows, seq = 2, 32
    tokens = jnp.ones((rows, seq), jnp.int32)
    mask = jnp.ones((rows, seq), jnp.int32)

    q_from = None if queries is None else seq - queries

    def loss(p):
        return nnx.merge(gd, p)(tokens, mask, queries_from=q_from).logits.sum()

    fn = jax.grad(loss) if grad else loss
    xla = jax.jit(fn).lower(params).cost_analysis()["flops"]
    n_logits = seq if queries is None else queries
    ours = bench_iteration.forward_flops(cfg, rows, seq, logit_positions=n_logits, queries=queries)
    ours *= 3 if grad else 1
    assert ours == pytest.approx(xla, rel=0.03), (ours, xla)


@pytest.mark.parametrize("bad,message", [
    (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--micro-batch", "-1"], "--micro-batch must be >= 1"),
    (["--score-micro-batch", "0"], "--score-micro-batch must be >= 1"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
])
def test_bad_arguments_are_refused_before_any_work(bad, message, capsys):
    with pytest.raises(SystemExit):
        bench_iteration.parse_args(["--tiny", *bad])
    assert message in capsys.readouterr().err
