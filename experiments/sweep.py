"""Sweeps: one training run per (algorithm, grid point), then the paper's validation figures.

``klq sweep PRESET --taus 0.01 0.05 0.1 [--grid FIELD=V1,V2 ...] [--algos klq ppo] [--out-dir DIR]
[-- overrides]`` trains, for every algorithm and every point of the product of the grid axes
(``--taus`` is the axis ``algo.tau``; any dotted config field can be an axis, e.g.
``--grid algo.lam=0.9,0.95 optim.learning-rate=1e-5,1.41e-5``, paper App. E.3-E.4), the preset
with those values and the overrides after ``--`` (applied to every run), each in
``<out-dir>/<algo>-<field><value>...`` named after the resolved values (``repr`` of floats, so
distinct values never share a directory and equal ones, ``0.1`` and ``0.10``, run once). Every run
validates on held-out prompts (``--eval-every N`` among the overrides; a run without it validates
once, at its end) and the sweep writes, from the **validation** metrics of each run's last
iteration:

* ``sweep.jsonl``: one row per run: its last metrics record with ``algo``, ``tau``, the grid
  values, ``run`` (the directory name) and ``group`` (the Pareto line it belongs to);
* ``sweep.md``: the same as a table;
* ``pareto.png`` (+ ``pareto.json``, the points drawn): validation reward-model score against
  validation KL(π‖π_b), one line per algorithm (and per value of the other grid axes) over τ
  (paper Fig. 2);
* ``validation_curves.png``: validation score and RLHF reward over episodes, one panel per grid
  point, one line per algorithm (paper Figs. 4-6).

**Run safety.** Each run directory records what it was trained with (``sweep_run.json``: the
resolved config). A run whose directory holds a run of another config (another override, another
preset) is refused, naming the fields that differ, unless ``--on-mismatch rerun`` (the old
directory is moved aside to ``<dir>.stale-<n>``, never deleted); a run that fails before producing
anything leaves no directory (so no record). A run counts as finished when its
last iteration is in ``metrics.jsonl`` with its validation, ``policy/`` is exported and the final
completions are written; finished runs are not run again, interrupted ones resume from their
checkpoints, so the same command continues a sweep. ``--out-dir``, ``--resume`` and ``--algo.name``
belong to the sweep and are refused among the overrides.

Example (seconds on a CPU)::

    klq sweep tiny-klq --taus 0.02 0.2 --out-dir runs/sweep-tiny -- --total-episodes 64 --eval-every 1
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import sys
from typing import Annotated, Any, Literal

import tyro

from experiments import plots, presets
from experiments import train as train_cmd

__all__ = ["SweepConfig", "SweepError", "RunSpec", "plan_runs", "run_sweep", "format_table", "main"]

# Owned by the sweep: refused among the per-run overrides and as grid axes.
SWEEP_FIELDS = {"out_dir": "--out-dir", "resume": "--resume", "algo.name": "--algos"}
RECORD = "sweep_run.json"


def ignored_fields() -> frozenset[str]:
    """Config fields that do not change what a run computes (where it lives, logging, checkpoint
    cadence: ``run_dir.BOOKKEEPING_FIELDS``): a rerun may change them without counting as another
    run. Unlike ``--resume``, a sweep rerun may not change the validation settings or the device
    layout (the rest of ``RESUMABLE_FIELDS``): the runs of a sweep are compared by their validation."""
    from klq_jax.train import run_dir  # imports JAX: not at `klq sweep --help`

    return run_dir.BOOKKEEPING_FIELDS


class SweepError(ValueError):
    """A sweep that cannot run as asked (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Train a preset for every algorithm and grid point; plot validation reward against KL.

    Config overrides for every run go after -- (e.g. -- --total-episodes 64 --eval-every 5).

    Attributes:
      preset: the preset every run starts from (klq train --help lists them).
      taus: KL coefficients τ (the grid axis algo.tau).
      grid: further grid axes, each FIELD=V1,V2,... with a dotted config field, e.g.
        algo.lam=0.9,0.95 or optim.learning-rate=1e-5,1.41e-5; the sweep runs the product of all
        axes for every algorithm.
      algos: the algorithms.
      out_dir: the sweep directory (default runs/sweep-PRESET), one subdirectory per run.
      on_mismatch: a run directory trained with another config: refuse (an error naming the
        fields that differ) or rerun (move it aside to DIR.stale-N and train again).
    """

    preset: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PRESET")]
    taus: tuple[float, ...] = ()
    grid: tuple[str, ...] = ()
    algos: tuple[Literal["klq", "ppo"], ...] = ("klq", "ppo")
    out_dir: str | None = None
    on_mismatch: Literal["refuse", "rerun"] = "refuse"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name, algorithm, grid values and resolved config."""

    name: str
    algo: str
    values: tuple[tuple[str, Any], ...]  # (canonical dotted field, resolved value) per grid axis
    args: tuple[str, ...]  # the `klq train` arguments after the preset
    config: Any  # experiments.tasks.RunConfig, out_dir set to the run directory


def _canonical(field: str) -> str:
    return field.lstrip("-").replace("-", "_")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise SweepError(f"--grid: {dotted!r} is not a config field (see `klq train PRESET --help`).")
        obj = getattr(obj, part)
    return obj


def _fmt(value) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _parse_axes(cfg: SweepConfig) -> list[tuple[str, str, list[str]]]:
    """``[(cli field, canonical field, values)]`` of ``--taus`` and ``--grid``."""
    axes = []
    if cfg.taus:
        axes.append(("algo.tau", "algo.tau", [repr(float(t)) for t in cfg.taus]))
    for item in cfg.grid:
        field, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not field.strip() or not vals:
            raise SweepError(f"--grid {item!r}: write FIELD=V1,V2,... (e.g. algo.lam=0.9,0.95).")
        cli = field.strip().lstrip("-")
        axes.append((cli, _canonical(cli), vals))
    seen = set()
    for _, canon, _ in axes:
        if canon in SWEEP_FIELDS:
            raise SweepError(f"--grid {canon}: the sweep sets it itself (use {SWEEP_FIELDS[canon]}).")
        if canon in seen:
            raise SweepError(f"The grid axis {canon} is given twice (--taus is the axis algo.tau).")
        seen.add(canon)
    return axes


def _check_overrides(overrides: list[str], axes) -> None:
    grid_fields = {canon for _, canon, _ in axes}
    for arg in overrides:
        if not arg.startswith("--"):
            continue
        canon = _canonical(arg.split("=", 1)[0])
        if canon.startswith("no_"):
            canon = canon[3:]
        if canon in SWEEP_FIELDS:
            raise SweepError(
                f"{arg.split('=', 1)[0]} cannot be a per-run override: the sweep sets it for every run "
                f"(use the sweep's {SWEEP_FIELDS[canon]})."
            )
        if canon in grid_fields:
            raise SweepError(f"{arg} is both a per-run override and a grid axis; give it once.")


def plan_runs(cfg: SweepConfig, overrides: list[str] | None = None) -> list[RunSpec]:
    """Every distinct run of the sweep, in order (algorithm-major), with resolved configs.

    Raises:
      SweepError: a malformed grid, a field owned by the sweep, two runs with one name.
    """
    overrides = list(overrides or [])
    presets.get(cfg.preset)  # a clear error for an unknown preset before anything runs
    if not cfg.algos:
        raise SweepError("Give at least one algorithm (--algos klq ppo).")
    axes = _parse_axes(cfg)
    _check_overrides(overrides, axes)
    out_dir = cfg.out_dir or os.path.join("runs", f"sweep-{cfg.preset}")
    leaves = [canon.rsplit(".", 1)[-1] for _, canon, _ in axes]
    short = [leaf if leaves.count(leaf) == 1 else canon.replace(".", "_")
             for leaf, (_, canon, _) in zip(leaves, axes)]
    specs, seen, names = [], set(), {}
    for algo in dict.fromkeys(cfg.algos):
        for point in itertools.product(*(vals for _, _, vals in axes)):
            grid_args = [a for (cli, _, _), v in zip(axes, point) for a in (f"--{cli}", v)]
            args = ("--algo.name", algo, *overrides, *grid_args)
            run_cfg = train_cmd.parse_args([cfg.preset, *args])
            values = tuple((canon, _get(run_cfg, canon)) for _, canon, _ in axes)
            if (algo, values) in seen:
                print(f"note: {algo} {' '.join(f'{k}={v!r}' for k, v in values)} is listed twice; "
                      "it runs once.")
                continue
            seen.add((algo, values))
            name = "-".join([algo] + [f"{s}{_fmt(v)}" for s, (_, v) in zip(short, values)])
            if name in names:
                raise SweepError(f"Two different runs would share the directory {name!r} "
                                 f"({names[name]} and {values}); rename a grid value.")
            names[name] = values
            if run_cfg.eval_every == 0:  # the sweep reports validation: at least at the end
                run_cfg = dataclasses.replace(run_cfg, eval_every=run_cfg.num_iterations)
            run_cfg = dataclasses.replace(run_cfg, out_dir=os.path.join(out_dir, name), resume=False)
            specs.append(RunSpec(name=name, algo=algo, values=values, args=args, config=run_cfg))
    return specs


def _config_json(cfg) -> dict:
    full = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in full.items() if k not in ignored_fields()}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """``"field: old → new"`` for every differing (flattened) field of two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} → {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if k not in ignored_fields() and a.get(k) != b.get(k)]


def _write_json(path: str, obj) -> None:
    from klq_jax.train import run_dir  # imports JAX: not at `klq sweep --help`

    run_dir.atomic_write(path, json.dumps(obj, indent=2))


def _read_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _finished(spec: RunSpec) -> bool:
    d, cfg = spec.config.out_dir, spec.config
    recs = _read_records(d)
    return bool(
        recs and recs[-1].get("iteration") == cfg.num_iterations and "eval/score" in recs[-1]
        and os.path.isdir(os.path.join(d, "policy"))
        and os.path.exists(os.path.join(d, "eval", "completions.jsonl"))
    )


def _refuse_live(d: str) -> None:
    """RunLockedError if a live process trains in the run directory ``d``."""
    from klq_jax.train import run_dir  # imports JAX: not at `klq sweep --help`

    run_dir.refuse_live_holder(d, instead="choose another --out-dir for the sweep")


def run_state(spec: RunSpec, on_mismatch: str = "refuse") -> str:
    """``"new"``, ``"resume"`` or ``"finished"`` for a run's directory (see the module docstring).

    Raises:
      SweepError: the directory holds a run of another config (``on_mismatch="refuse"``) or
        something that is not a run of this sweep.
      RunLockedError: ``on_mismatch="rerun"`` and a live process trains in the directory.
    """
    d = spec.config.out_dir
    if not os.path.isdir(d) or not os.listdir(d):
        return "new"
    new = _config_json(spec.config)
    if os.path.exists(os.path.join(d, RECORD)):
        with open(os.path.join(d, RECORD)) as f:
            old = json.load(f)["config"]
    elif os.path.exists(os.path.join(d, "config.json")):
        with open(os.path.join(d, "config.json")) as f:
            old = {k: v for k, v in json.load(f).items() if k not in ignored_fields()}
    else:
        raise SweepError(f"{d} exists and holds no run of this sweep (no {RECORD} or config.json); "
                         "move it away or choose another --out-dir.")
    diff = config_diff(old, new)
    if diff:
        if on_mismatch != "rerun":
            raise SweepError(
                f"{d} holds a run trained with another config ({'; '.join(diff)}); use another "
                "--out-dir, or --on-mismatch rerun to move it aside and train again."
            )
        _refuse_live(d)  # never move a live run aside
        n = 1
        while os.path.exists(f"{d}.stale-{n}"):
            n += 1
        os.rename(d, f"{d}.stale-{n}")
        print(f"  moved the run trained with another config to {d}.stale-{n} ({'; '.join(diff)})")
        return "new"
    return "finished" if _finished(spec) else "resume"


def _group(spec: RunSpec) -> str:
    others = [f"{k.rsplit('.', 1)[-1]}={v!r}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
              for k, v in spec.values if k != "algo.tau"]
    return " ".join([plots.LABELS.get(spec.algo, spec.algo)] + others)


def _setting(spec: RunSpec) -> str:
    parts = [f"{'τ' if k == 'algo.tau' else k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float)
             else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in spec.values]
    return " ".join(parts) or "all runs"


def run_sweep(cfg: SweepConfig, overrides: list[str] | None = None, *, mesh=None) -> list[dict]:
    """Train every run of :func:`plan_runs` not yet finished, then write the sweep's outputs.

    Returns one row per run: the last metrics record (validation included) with ``algo``, ``tau``,
    the grid values, ``run`` and ``group``.
    """
    from klq_jax.errors import RunDirError
    from klq_jax.models.hf.files import make_dir
    from klq_jax.train import run_dir

    specs = plan_runs(cfg, overrides)
    out_dir = cfg.out_dir or os.path.join("runs", f"sweep-{cfg.preset}")
    found = run_dir.training_run_entries(out_dir)
    if found:  # the sweep's files beside a run's would make a mixed directory
        raise SweepError(f"{out_dir} is a `klq train` run directory ({'; '.join(found)}): a sweep puts one "
                         "run directory per run and its tables in --out-dir; choose another --out-dir.")
    make_dir(out_dir, what="the sweep directory", option="--out-dir", error=RunDirError)
    if cfg.on_mismatch == "rerun":  # no run moved aside before a live one is refused
        for s in specs:
            _refuse_live(s.config.out_dir)
    states = [run_state(s, cfg.on_mismatch) for s in specs]  # refuse before training anything
    rows, curves = [], []
    for i, (spec, state) in enumerate(zip(specs, states), 1):
        d = spec.config.out_dir
        if state == "finished":
            print(f"[{i}/{len(specs)}] {spec.name}: finished, skipped ({d})", flush=True)
        else:
            print(f"[{i}/{len(specs)}] {spec.name}: {'resuming' if state == 'resume' else 'training'} -> {d}",
                  flush=True)
            os.makedirs(d, exist_ok=True)
            _write_json(os.path.join(d, RECORD), {
                "name": spec.name, "algo": spec.algo, "grid": dict(spec.values),
                "args": list(spec.args), "config": _config_json(spec.config),
            })
            # resume from the run's checkpoint, or start it (also when killed before its first one)
            try:
                train_cmd.run(dataclasses.replace(spec.config, resume=True, allow_fresh=True), mesh=mesh)
            except BaseException:
                if state == "new" and os.path.isdir(d) and run_dir.holds_no_result(d, also_ours=(RECORD,)):
                    shutil.rmtree(d, ignore_errors=True)  # nothing trained: leave no record to block a rerun
                raise
        recs = _read_records(d)
        if not recs or "eval/score" not in recs[-1]:
            raise SweepError(f"{d}/metrics.jsonl has no validation metrics at its last iteration; "
                             "rerun the sweep with --on-mismatch rerun.")
        extra = dict(spec.values, algo=spec.algo, tau=spec.config.algo.tau, run=spec.name,
                     group=_group(spec), setting=_setting(spec))
        rows.append(dict(recs[-1], **extra))
        curves.extend(dict(r, **extra) for r in recs if "eval/score" in r)
    with open(os.path.join(out_dir, "sweep.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    drawn = plots.plot_pareto(rows, os.path.join(out_dir, "pareto.png"),
                              title=f"{cfg.preset}: validation score vs KL at the end of training")
    _write_json(os.path.join(out_dir, "pareto.json"), drawn)
    plots.plot_validation_curves(curves, os.path.join(out_dir, "validation_curves.png"),
                                 title=f"{cfg.preset}: validation over training")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(format_table(rows, [k for k, _ in specs[0].values if k != "algo.tau"] if specs else []))
    return rows


def format_table(rows: list[dict], grid_fields: list[str] = ()) -> str:
    """Markdown table of the runs' final validation metrics (and the final training score)."""
    head = ["run", "algo", "τ", *grid_fields, "val. score", "val. KL(π‖π_b)", "val. reward − τ·KL",
            "val. length", "val. truncated", "val. greedy score", "train score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]

    def num(r, k, f="{:.4f}"):
        return f.format(r[k]) if k in r else "–"

    for r in rows:
        lines.append("| " + " | ".join([
            r["run"], r["algo"], f"{r['tau']:g}", *(str(r.get(k)) for k in grid_fields),
            num(r, "eval/score"), num(r, "eval/kl"), num(r, "eval/rlhf_reward"),
            num(r, "eval/response_length", "{:.1f}"), num(r, "eval/truncated_frac", "{:.2f}"),
            num(r, "eval/greedy/score"), num(r, "score"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    cfg = tyro.cli(SweepConfig, args=argv, prog="klq sweep",
                   description=__doc__.split("\n\n")[0] + " Overrides for every run go after '--'.")
    rows = run_sweep(cfg, overrides)
    out_dir = cfg.out_dir or os.path.join("runs", f"sweep-{cfg.preset}")
    with open(os.path.join(out_dir, "sweep.md")) as f:
        print(f.read())
    print(f"{len(rows)} runs; wrote {out_dir}/sweep.jsonl, sweep.md, pareto.png, pareto.json, validation_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
