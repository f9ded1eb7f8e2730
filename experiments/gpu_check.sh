#!/usr/bin/env bash
# The GPU check (issue 17): one command, < 8 minutes on one H100/H200, at the paper's TL;DR shape
# (Pythia-1B random weights, B = 192, 512-token prompts, 53 new tokens, bf16 compute):
#   1. the sampler against Hugging Face generate on the same weights      (goal: >= 7x end to end)
#   2. one whole KLQ iteration, phase by phase, micro-batch 48:
#      the update's model-FLOPs utilisation                                (goal: >= 0.5)
#      the iteration's time and the peak device memory                    (goal: <= 8 s)
# Results go to $OUT (default ./gpu_check) as JSON; a summary is printed at the end.
#
#   bash experiments/gpu_check.sh            # on the GPU machine (pip install -e ".[test,cuda]" first)
#   bash experiments/gpu_check.sh --tiny     # seconds, on CPU: the same steps at a tiny shape
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# python3: the interpreter name every install has (a bare "python" is missing on some GPU images);
# PYTHON=/path/to/venv/bin/python overrides it.
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--tiny" ]; then
  SAMPLING=(--model pythia-14m --batch 2 --prompt-len 8 --new-tokens 4 --repeats 1)
  ITERATION=(--tiny --epochs 1 --repeats 1)
else
  SAMPLING=(--gpu-paper --repeats 3)
  ITERATION=(--gpu --repeats 2 --no-checkpoint)
fi
"$PY" -c "import jax; print('devices:', jax.devices())"
timeout 240 "$PY" experiments/bench_sampling.py "${SAMPLING[@]}" --json "$OUT/sampling.json"
timeout 300 "$PY" experiments/bench_iteration.py "${ITERATION[@]}" --json "$OUT/iteration.json"
"$PY" - "$OUT/sampling.json" "$OUT/iteration.json" <<'EOF'
import json, sys
s, it = (json.load(open(p)) for p in sys.argv[1:3])
ratio = s["ratio"]["end_to_end_best"]
k = it["klq"]
mfu = k.get("update_mfu")
peak = it.get("peak_bytes")
print("\nGPU check summary (" + it["machine"]["device"] + ")")
print(f"  sampler vs HF generate, best end to end: {ratio:.2f}x  (goal >= 7x; "
      f"{s['jax']['end_to_end_best_s']:.3f}s vs {s['hf']['end_to_end_best_s']:.3f}s)")
print("  update MFU at micro-batch " + str(it["setup"]["micro_batch"]) + ": "
      + (f"{mfu:.2f}" if mfu is not None else "n/a (no known peak for this device)") + "  (goal >= 0.5)")
print(f"  whole iteration: {k['iteration']['best']:.2f}s best, {k['iteration']['median']:.2f}s median "
      "(goal <= 8 s); phases: " + ", ".join(f"{p} {k[p]['best']:.2f}s" for p in
                                             ("sample", "score", "targets", "update")))
print("  peak device memory: " + (f"{peak / 2**30:.1f} GiB" if peak else "n/a"))
EOF
