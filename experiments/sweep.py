"""τ sweeps of KLQ against PPO: one training run per (algorithm, τ), then a Pareto plot.

``python -m experiments.sweep PRESET --taus 0.01 0.05 0.1 [--algos klq ppo] [--out-dir DIR] [-- overrides]``
runs ``klq train`` for each ``<algo>`` and τ with the preset's other settings (the
preset's own ``algo.name`` is replaced; any further ``--field value`` overrides after ``--`` apply
to every run), each in ``<out-dir>/<algo>-tau<τ>``, then writes

* ``sweep.jsonl``: the last metrics record of every run with its ``algo`` and ``tau``;
* ``pareto.png``: final reward-model score against KL(π‖π_b), one line per algorithm (the paper's
  Figure 2 shape);
* ``sweep.md``: the same numbers as a table.

Runs that finished already (their ``policy/`` export exists) are not run again, so an interrupted
sweep continues where it stopped (each run also resumes from its own checkpoints).

Example (seconds on a CPU)::

    python -m experiments.sweep tiny-klq --taus 0.02 0.2 --out-dir runs/sweep-tiny -- --total-episodes 64
"""

from __future__ import annotations

import argparse
import json
import os

from experiments import plots, presets
from experiments import train as train_cmd


def run_sweep(
    preset: str,
    taus: list[float],
    algos: list[str],
    out_dir: str,
    overrides: list[str] | None = None,
    *,
    mesh=None,
) -> list[dict]:
    """Train every (algo, τ) and return one row per run (its last metrics record + algo, tau)."""
    if not taus:
        raise ValueError("Give at least one τ (--taus).")
    presets.get(preset)  # a clear error for an unknown preset before anything runs
    rows = []
    for algo in algos:
        for tau in taus:
            run_dir = os.path.join(out_dir, f"{algo}-tau{tau:g}")
            cfg = train_cmd.parse_args(
                [preset, "--algo.name", algo, "--algo.tau", str(tau), "--out-dir", run_dir,
                 "--resume", *(overrides or [])]
            )
            metrics = os.path.join(run_dir, "metrics.jsonl")
            if not os.path.isdir(os.path.join(run_dir, "policy")):
                train_cmd.run(cfg, mesh=mesh)
            with open(metrics) as f:
                last = [json.loads(line) for line in f][-1]
            rows.append(dict(last, algo=algo, tau=tau))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    plots.plot_pareto(rows, os.path.join(out_dir, "pareto.png"), title=f"{preset}: τ sweep")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the sweep's final metrics."""
    lines = [
        "| algo | τ | score | KL(π‖π_b) | reward − τ·KL | response length | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algo']} | {r['tau']:g} | {r['score']:.4f} | {r['kl']:.4f} | "
            f"{r['rlhf_reward']:.4f} | {r['response_length']:.1f} | {r['truncated_frac']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="klq sweep",
        description="Train KLQ and PPO over several τ and plot final reward against KL.",
        epilog="Arguments after '--' are passed to every run as config overrides "
        "(e.g. -- --total-episodes 64 --mesh.fsdp 2).",
    )
    parser.add_argument("preset", help=f"one of {', '.join(sorted(presets.PRESETS))}")
    parser.add_argument("--taus", type=float, nargs="+", required=True, help="KL coefficients τ")
    parser.add_argument("--algos", nargs="+", default=["klq", "ppo"], choices=["klq", "ppo"])
    parser.add_argument("--out-dir", default=None, help="default: runs/sweep-<preset>")
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)
    try:
        presets.get(args.preset)
    except ValueError as e:
        parser.error(str(e))
    out_dir = args.out_dir or os.path.join("runs", f"sweep-{args.preset}")
    rows = run_sweep(args.preset, args.taus, args.algos, out_dir, overrides)
    print(format_table(rows))
    print(f"wrote {out_dir}/sweep.jsonl, pareto.png, sweep.md")
    return rows


if __name__ == "__main__":
    main()
