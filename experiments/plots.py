"""Training curves of KLQ / PPO runs (matplotlib, Agg backend: no display needed).

:func:`plot_training_curves` draws, over episodes, one line per algorithm for

1. the sequence reward ``E[R]`` (the reward model's score minus the ω penalty),
2. ``KL(π‖π_b)`` (sequence level),
3. the regularised objective ``J = E[R] − τ·KL(π‖π_b)`` (Eq. 3 in expectation), with the exact
   optimum ``J* = τ·log E_{π_b}[exp(R/τ)]`` as a horizontal line when it is known,
4. ``KL(π‖π*)`` (log scale) when exact evaluations are available,

from the records of ``metrics.jsonl`` (``train.train`` writes them; the demo adds an ``"algo"``
field and, at a few iterations, ``exact/*`` fields computed by enumeration). Sample estimates are
drawn as thin lines with a centred moving average on top, at the episodes seen by the policy that
sampled them (a record's rollout precedes its update); exact values (of the policy after the
record's update) as markers.

Example:
    >>> import os, tempfile
    >>> recs = [{"algo": a, "episodes": 64 * i, "reward": 0.1 * i, "kl": 0.05 * i,
    ...          "rlhf_reward": 0.09 * i} for a in ("klq", "ppo") for i in range(1, 6)]
    >>> path = plot_training_curves(recs, os.path.join(tempfile.mkdtemp(), "c.png"), tau=0.2, j_star=0.5)
    >>> open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np

__all__ = ["plot_training_curves", "plot_pareto", "plot_validation_curves", "plot_win_rates", "moving_average"]

COLORS = {"klq": "tab:blue", "ppo": "tab:orange"}
LABELS = {"klq": "KLQ", "ppo": "PPO"}


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shrinking at the ends), same length as ``x``.

    Example:
      >>> moving_average(np.array([0.0, 2.0, 4.0, 6.0]), 3).tolist()
      [1.0, 2.0, 4.0, 5.0]
    """
    x = np.asarray(x, np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(len(x))
    lo = np.maximum(idx - window // 2, 0)
    hi = np.minimum(idx + (window - 1 - window // 2) + 1, len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_training_curves(
    records: Iterable[Mapping],
    path: str | os.PathLike,
    *,
    tau: float,
    j_star: float | None = None,
    j_ref: float | None = None,
    title: str | None = None,
    smooth: int | None = None,
) -> str:
    """Write the 3-4 panel figure described in the module docstring to ``path`` (PNG).

    Args:
      records: metric dicts with ``algo``, ``episodes`` and the sample estimates ``reward``,
        ``kl``, ``rlhf_reward`` (as ``train.train`` logs them); optional exact values
        ``exact/reward``, ``exact/kl_to_ref``, ``exact/J``, ``exact/kl_to_opt``.
      path: output file.
      tau: τ (for the labels).
      j_star: the exact optimum J* (a horizontal line on the J panel).
      j_ref: J(π_b) (a dotted line on the J panel).
      title: figure title.
      smooth: moving-average window over iterations (default: ~1/15 of the run).

    Returns:
      ``path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    algos = [a for a in dict.fromkeys(r.get("algo", "run") for r in records)]
    has_opt = any("exact/kl_to_opt" in r for r in records)
    panels = [
        ("reward", "exact/reward", "reward  E[R]"),
        ("kl", "exact/kl_to_ref", "KL(π ‖ π_b)"),
        ("rlhf_reward", "exact/J", f"J = E[R] − τ·KL   (τ = {tau:g})"),
    ]
    if has_opt:
        panels.append((None, "exact/kl_to_opt", "KL(π ‖ π*)  (exact)"))
    if len(panels) == 4:  # 2 x 2 reads better in a README than 1 x 4
        fig, axes = plt.subplots(2, 2, figsize=(10.5, 7.6))
        axes = axes.ravel()
    else:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9))
    for ax, (key, exact_key, label) in zip(axes, panels):
        for algo in algos:
            color = COLORS.get(algo, None)
            name = LABELS.get(algo, algo)
            rows = [r for r in records if r.get("algo", "run") == algo]
            if key is not None:
                # A record's sample metrics come from the rollout of the policy BEFORE that
                # iteration's update: plot them at the episodes seen by that policy.
                pts = sorted((r["episodes"] * (r["iteration"] - 1) / r["iteration"] if r.get("iteration") else
                              r["episodes"], r[key]) for r in rows if key in r and r.get("iteration", 1) > 0)
                if pts:
                    ep, val = map(np.asarray, zip(*pts))
                    w = smooth or max(1, len(ep) // 15)
                    ax.plot(ep, val, color=color, alpha=0.25, lw=0.8)
                    ax.plot(ep, moving_average(val, w), color=color, lw=1.8, label=f"{name} (samples)")
            ex = sorted((r["episodes"], r[exact_key]) for r in rows if exact_key in r)
            if ex:
                ep, val = map(np.asarray, zip(*ex))
                ax.plot(ep, val, "o--" if key is not None else "o-", color=color, ms=4, lw=1.0,
                        label=f"{name} (exact)")
        if exact_key == "exact/J":
            if j_star is not None:
                ax.axhline(j_star, color="k", lw=1.2, label=f"J* = {j_star:.3f} (exact optimum)")
            if j_ref is not None:
                ax.axhline(j_ref, color="gray", lw=1.0, ls=":", label=f"J(π_b) = {j_ref:.3f}")
        if key is None:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("episodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(
    rows: Iterable[Mapping],
    path: str,
    *,
    x: str = "eval/kl",
    y: str = "eval/score",
    group: str = "group",
    title: str | None = None,
) -> dict[str, list[dict]]:
    """Reward against KL(π‖π_b) at the end of training, one line per group over τ (paper Fig. 2).

    ``rows`` hold ``algo``, ``tau``, the ``x`` and ``y`` metrics (default: the VALIDATION KL and
    reward-model score of the final policy, as the paper's Fig. 2) and a ``group`` label (default
    the algorithm when a row has no ``group``); e.g. the rows of :mod:`experiments.sweep`. Each
    point is labelled with its τ. Writes ``path`` (PNG) and returns the points drawn,
    ``{group: [{"tau", "x", "y"}, ...]}`` sorted by ``x``.

    Example:
        >>> import os, tempfile
        >>> rows = [{"algo": a, "tau": t, "eval/kl": 1 / t, "eval/score": 1 - t}
        ...         for a in ("klq", "ppo") for t in (0.05, 0.1, 0.2)]
        >>> d = tempfile.mkdtemp()
        >>> drawn = plot_pareto(rows, os.path.join(d, "p.png"))
        >>> [p["tau"] for p in drawn["klq"]], open(os.path.join(d, "p.png"), "rb").read(4) == b"\\x89PNG"
        ([0.2, 0.1, 0.05], True)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    missing = [r.get("run", r.get("algo")) for r in rows if x not in r or y not in r]
    if missing:
        raise ValueError(f"plot_pareto: rows {missing} have no {x!r} / {y!r} (validation metrics).")
    drawn: dict[str, list[dict]] = {}
    for r in rows:
        drawn.setdefault(str(r.get(group, r["algo"])), []).append(
            {"tau": r["tau"], "x": float(r[x]), "y": float(r[y]), "algo": r["algo"]})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, pts in drawn.items():
        pts.sort(key=lambda p: p["x"])
        algo = pts[0]["algo"]
        ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "o-", color=COLORS.get(algo) if
                sum(q[0]["algo"] == algo for q in drawn.values()) == 1 else None,
                label=LABELS.get(name, name))
        for p in pts:
            ax.annotate(f"τ={p['tau']:g}", (p["x"], p["y"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(π‖π_b) (sequence level)" + (" — validation" if x.startswith("eval/") else ""))
    ax.set_ylabel("reward-model score" + (" — validation" if y.startswith("eval/") else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Reward vs KL at the end of training")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_validation_curves(
    records: Iterable[Mapping],
    path: str,
    *,
    keys: tuple[str, ...] = ("eval/score", "eval/rlhf_reward"),
    panel: str = "setting",
    line: str = "algo",
    title: str | None = None,
) -> str:
    """Validation metrics over training (paper Figs. 4-6): one column of panels per ``panel``
    value (e.g. a τ of a sweep), one row per metric in ``keys``, one line per ``line`` value.

    ``records``: metrics records with ``episodes`` and the ``keys`` (a validation at iteration k
    is of the policy after k iterations, so it is drawn at ``episodes``), plus the ``panel`` and
    ``line`` labels. Returns ``path``.

    Example:
        >>> import os, tempfile
        >>> recs = [{"algo": a, "setting": f"τ={t}", "episodes": 64 * i, "eval/score": i * t,
        ...          "eval/rlhf_reward": i * t / 2} for a in ("klq", "ppo") for t in (0.1, 0.2)
        ...         for i in range(1, 4)]
        >>> p = plot_validation_curves(recs, os.path.join(tempfile.mkdtemp(), "v.png"))
        >>> open(p, "rb").read(4) == b"\\x89PNG"
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if all(k in r for k in keys)]
    panels = list(dict.fromkeys(str(r.get(panel, "")) for r in records)) or [""]
    lines = list(dict.fromkeys(str(r.get(line, "run")) for r in records))
    fig, axes = plt.subplots(len(keys), len(panels), figsize=(4.2 * len(panels), 3.2 * len(keys)),
                             squeeze=False)
    for col, pv in enumerate(panels):
        for row, key in enumerate(keys):
            ax = axes[row][col]
            for lv in lines:
                pts = sorted((r["episodes"], r[key]) for r in records
                             if str(r.get(panel, "")) == pv and str(r.get(line, "run")) == lv)
                if pts:
                    ep, val = zip(*pts)
                    ax.plot(ep, val, "o-", ms=3, color=COLORS.get(lv), label=LABELS.get(lv, lv))
            ax.set_title(f"{pv}  {key}" if pv else key, fontsize=9)
            ax.set_xlabel("episodes")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_win_rates(rows: Iterable[Mapping], path: str, *, title: str | None = None) -> str:
    """One bar per pair of runs (e.g. per τ): the pooled win rate of A over B with its Jeffreys
    interval as an error bar, and the 50% line (paper Fig. 3). ``rows``: :mod:`experiments.judge`'s
    summaries (``label``, ``pooled`` with ``win_rate``, ``interval_low``, ``interval_high``).
    Returns ``path``.

    Example:
        >>> import os, tempfile
        >>> rows = [{"label": "τ=0.05", "pooled": {"win_rate": 0.6, "interval_low": 0.5,
        ...          "interval_high": 0.7, "alpha": 0.2}}]
        >>> p = plot_win_rates(rows, os.path.join(tempfile.mkdtemp(), "w.png"))
        >>> open(p, "rb").read(4) == b"\\x89PNG"
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    labels = [r["label"] for r in rows]
    rate = np.array([r["pooled"]["win_rate"] for r in rows], np.float64)
    lo = np.array([r["pooled"]["interval_low"] for r in rows], np.float64)
    hi = np.array([r["pooled"]["interval_high"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x, np.nan_to_num(rate), color=COLORS["klq"], alpha=0.8)
    # The interval drawn as it is (it need not contain wins/(wins+losses), e.g. at 6 wins, 0 losses).
    ax.vlines(x, lo, hi, color="k", lw=1.2)
    ax.hlines(np.concatenate([lo, hi]), np.concatenate([x, x]) - 0.12, np.concatenate([x, x]) + 0.12,
              color="k", lw=1.2)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xticks(x, labels, rotation=20 if len(rows) > 4 else 0)
    ax.set_ylim(0, 1)
    level = round(100 * (1 - rows[0]["pooled"].get("alpha", 0.2))) if rows else 80
    ax.set_ylabel(f"win rate of A over B ({level}% Jeffreys interval)")
    ax.set_title(title or "LLM-as-a-judge win rate")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
