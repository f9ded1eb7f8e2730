"""Benchmark: klq_jax's jitted KV-cache sampler against ``transformers`` ``generate`` (PyTorch).

ONE run times both on the SAME random weights: a random Hugging Face ``GPTNeoXForCausalLM`` of the
chosen Pythia shape is built in torch, saved, and converted with ``klq_jax.models.hf.load_hf``.
Both generate exactly ``--new-tokens`` tokens per row (no stop token: ``generate`` gets
``eos_token_id=None`` and ``min_new_tokens = max_new_tokens``; the sampler gets
``stop_token_ids=()``), with the same decoding rule (multinomial sampling at temperature 1 over the
full vocabulary by default, ``--greedy`` for argmax).

Reported for both: the prefill (a 1-token generation), end-to-end time for the whole batch, the
steady-state time per decode step ``(end_to_end − prefill) / (new_tokens − 1)``, new tokens/s
``B · new_tokens / end_to_end``, and the ratios (medians, plus the best-of-N end-to-end ratio, the
fairer figure on a machine shared with other jobs). The sampler's compile time is reported separately
(first call minus steady state) and excluded from the steady-state figures. Runs of the two
libraries are interleaved and each figure is a median over ``--repeats`` runs, so background load
hits both alike.

Usage::

    python experiments/bench_sampling.py                      # CPU default: pythia-70m, B=16, 128+32
    python experiments/bench_sampling.py --json bench.json
    python experiments/bench_sampling.py --gpu-paper          # pythia-1b, B=192, 512+53, bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from experiments import benchenv

PRESETS = {
    "cpu": dict(model="pythia-70m", batch=16, prompt_len=128, new_tokens=32, dtype="float32", repeats=3),
    "gpu-paper": dict(model="pythia-1b", batch=192, prompt_len=512, new_tokens=53, dtype="bfloat16", repeats=5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time klq_jax.sampling.sample against transformers generate on the same random "
        "GPT-NeoX weights (prefill, ms per decode step, new tokens/s, ratio).",
    )
    p.add_argument("--gpu-paper", action="store_true",
                   help="paper-scale preset: pythia-1b shape, B=192, 512-token prompts, 53 new tokens, bf16")
    p.add_argument("--model", help="Pythia shape (klq_jax.models.gpt_neox.PYTHIA_PRESETS); default pythia-70m")
    p.add_argument("--batch", type=int, help="batch size B (default 16)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens Tq (default 128)")
    p.add_argument("--new-tokens", type=int, help="new tokens per row (default 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype of both (default float32)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median reported; default 3)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding for both instead of sampling")
    p.add_argument("--device", default=None, help="torch device for generate (default: cuda if available)")
    p.add_argument("--skip-hf", action="store_true", help="time only the JAX sampler")
    p.add_argument("--seed", type=int, default=0)
    benchenv.add_isa_argument(p)
    benchenv.add_malloc_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.isa_env = benchenv.cap_isa(args.isa)  # before jax/torch are imported
    preset = PRESETS["gpu-paper" if args.gpu_paper else "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def build_models(args, workdir):
    """A random HF GPTNeoXForCausalLM of the preset shape, and the same weights converted to JAX."""
    import jax
    import torch
    import transformers

    from klq_jax.models import gpt_neox, hf

    cfg = gpt_neox.GPTNeoXConfig.from_preset(args.model)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.prompt_len + args.new_tokens))
    torch.manual_seed(args.seed)
    hf_cfg = transformers.GPTNeoXConfig(**hf.config_to_hf(cfg))
    model = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    model.save_pretrained(workdir)
    config, graphdef, params = hf.load_hf(workdir, dtype=args.dtype)
    params = jax.device_put(params)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = model.to(device=device, dtype=tdtype)
    return config, graphdef, params, model, device


def median(xs):
    return float(statistics.median(xs))


def main(argv=None):
    args = parse_args(argv)
    args.malloc = benchenv.set_malloc(args.malloc)  # before jax starts its threads
    import jax
    import jax.numpy as jnp
    import torch

    from klq_jax.models import gpt_neox
    from klq_jax.sampling import SamplingConfig, sample

    B, Tq, T = args.batch, args.prompt_len, args.new_tokens
    print(f"bench_sampling: {args.model} B={B} prompt={Tq} new={T} dtype={args.dtype} "
          f"{'greedy' if args.greedy else 'sampling (T=1, full vocab)'}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} (torch ISA {torch.backends.cpu.get_cpu_capability()}"
          f"{'; XLA_FLAGS=' + os.environ['XLA_FLAGS'] if os.environ.get('XLA_FLAGS') else ''}); "
          f"malloc {args.malloc}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        config, graphdef, params, hf_model, device = build_models(args, workdir)
    print(f"  built random weights ({gpt_neox.param_count(params) / 1e6:.1f}M params) and converted "
          f"them in {time.perf_counter() - t0:.1f}s; generate runs on {device}", flush=True)

    rng = np.random.default_rng(args.seed)
    prompt_ids = rng.integers(1, config.vocab_size, size=(B, Tq)).astype(np.int32)
    prompt_mask = np.ones((B, Tq), np.int32)
    j_ids, j_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    t_ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    t_mask = torch.as_tensor(prompt_mask, dtype=torch.long, device=device)

    def jax_cfg(n):
        return SamplingConfig(max_new_tokens=n, temperature=1.0, greedy=args.greedy, stop_token_ids=())

    def run_jax(n, i):
        t = time.perf_counter()
        out = sample(graphdef, params, j_ids, j_mask, jax.random.key(i), jax_cfg(n))
        jax.block_until_ready(out)
        return time.perf_counter() - t, out

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_hf(n, i):
        torch.manual_seed(i)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(
                t_ids, attention_mask=t_mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=not args.greedy, temperature=1.0, top_k=0, top_p=1.0,
                eos_token_id=None, pad_token_id=0,
            )
        sync()
        dt = time.perf_counter() - t
        assert out.shape == (B, Tq + n), out.shape
        return dt

    res = {"jax": {}, "hf": {}}
    # First calls: the sampler compiles once per (B, Tq, T_max) and config.
    first_full, out = run_jax(T, 0)
    first_pre, _ = run_jax(1, 0)
    assert out.tokens.shape == (B, T) and bool(out.truncated.all()) and int(out.lengths.min()) == T
    if not args.skip_hf:
        run_hf(2, 0)  # warm-up (lazy initialisation, allocator, the decode path)

    times = {k: [] for k in ("jax_full", "jax_pre", "hf_full", "hf_pre")}
    for i in range(1, args.repeats + 1):
        times["jax_full"].append(run_jax(T, i)[0])
        if not args.skip_hf:
            times["hf_full"].append(run_hf(T, i))
        times["jax_pre"].append(run_jax(1, i)[0])
        if not args.skip_hf:
            times["hf_pre"].append(run_hf(1, i))
        print(f"  repeat {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v), flush=True)

    def summarise(full, pre):
        e2e, prefill = median(full), median(pre)
        step = (e2e - prefill) / max(T - 1, 1)
        best_e2e, best_pre = min(full), min(pre)
        return {
            "end_to_end_s": e2e,
            "end_to_end_best_s": best_e2e,
            "decode_step_best_ms": 1e3 * (best_e2e - best_pre) / max(T - 1, 1),
            "end_to_end_all_s": full,
            "prefill_s": prefill,
            "prefill_all_s": pre,
            "decode_step_ms": 1e3 * step,
            "new_tokens_per_s": B * T / e2e,
        }

    res["jax"] = summarise(times["jax_full"], times["jax_pre"])
    res["jax"]["compile_s"] = (first_full - res["jax"]["end_to_end_s"]) + (first_pre - res["jax"]["prefill_s"])
    if not args.skip_hf:
        res["hf"] = summarise(times["hf_full"], times["hf_pre"])
        res["ratio"] = {
            "end_to_end": res["hf"]["end_to_end_s"] / res["jax"]["end_to_end_s"],
            "decode_step": res["hf"]["decode_step_ms"] / res["jax"]["decode_step_ms"],
            "prefill": res["hf"]["prefill_s"] / res["jax"]["prefill_s"],
            "end_to_end_best": res["hf"]["end_to_end_best_s"] / res["jax"]["end_to_end_best_s"],
        }
    res["setup"] = {
        "model": args.model, "batch": B, "prompt_len": Tq, "new_tokens": T, "dtype": args.dtype,
        "greedy": args.greedy, "repeats": args.repeats, "isa": args.isa, "malloc": args.malloc, "jax": jax.__version__,
        "jax_backend": jax.devices()[0].platform, "jax_device": str(jax.devices()[0].device_kind),
        "torch": torch.__version__, "torch_device": device, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }

    j = res["jax"]
    print(f"\nklq_jax sample   : compile {j['compile_s']:.2f}s | prefill {j['prefill_s'] * 1e3:.0f} ms | "
          f"{j['decode_step_ms']:.1f} ms/decode step | end-to-end {j['end_to_end_s']:.3f}s | "
          f"{j['new_tokens_per_s']:.0f} new tokens/s")
    if not args.skip_hf:
        h, r = res["hf"], res["ratio"]
        print(f"HF generate      : prefill {h['prefill_s'] * 1e3:.0f} ms | {h['decode_step_ms']:.1f} ms/decode step"
              f" | end-to-end {h['end_to_end_s']:.3f}s | {h['new_tokens_per_s']:.0f} new tokens/s")
        print(f"ratio (HF / ours): end-to-end {r['end_to_end']:.2f}x | per decode step {r['decode_step']:.2f}x"
              f" | prefill {r['prefill']:.2f}x | best-of-{args.repeats} end-to-end {r['end_to_end_best']:.2f}x "
              f"({h['end_to_end_best_s']:.3f}s / {j['end_to_end_best_s']:.3f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
