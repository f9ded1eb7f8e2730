"""The offline demo (the README's first command): ``klq demo [--quick] [--out-dir DIR] [--field value ...]``.

End to end on a 2-core CPU in a couple of minutes, with no network:

1. fit a tiny GPT-NeoX to the synthetic language of :mod:`experiments.synthetic` by maximum
   likelihood — the base ("SFT") policy π_b;
2. save it as a Hugging Face checkpoint (``config.json``, ``model.safetensors``, a word-level
   ``tokenizer.json``) with our converter and load it back with :func:`klq_jax.models.load.load_model`,
   exactly as a user loads a hub checkpoint (policy + fresh value head, frozen reference);
3. run KLQ (Algorithm 2) and PPO (Algorithm 1) with the same budget (seed, episodes, batch,
   epochs, learning rate, τ, ω, sampling temperature 1) through :func:`klq_jax.train.train`;
4. every few iterations, evaluate the policy EXACTLY by enumerating all 19,608 responses per
   prompt (:mod:`klq_jax.evaluate`): E[R], KL(π‖π_b), J(π) = E[R] − τ·KL(π‖π_b) and KL(π‖π*),
   against the known optimum J* = τ·log E_{π_b}[exp(R/τ)] (paper §2, App. A);
5. write to ``--out-dir`` (default ``runs/demo``): ``metrics.jsonl`` (both algorithms, field
   ``algo``), ``training_curves.png``, ``samples.md`` (responses before/after, decoded),
   ``summary.md`` (the table also printed at the end), ``sft-hf/`` (the checkpoint) and the
   trainer's own run directories ``klq/`` and ``ppo/``.

``--quick`` shortens every phase (about a minute; used by the tests).

The demo owns ``--out-dir`` while it runs (``.klq-run.lock``, as a training run) and writes nothing
before it holds it: a second demo on the same directory is refused. The directory must be new,
empty, or a previous demo's (its ``config.json`` is a demo config and it holds nothing but the
entries the demo writes, :data:`DEMO_ENTRIES`); otherwise the demo refuses, naming the files it did
not write, unless ``--overwrite`` lets it replace its entries (other files stay). A ``klq train``
run directory (a training config.json, checkpoints) is refused even with ``--overwrite``. A previous
demo's runs ``klq/`` and ``ppo/`` are replaced; a live one is never touched.

Example::

    >>> from experiments import demo
    >>> result = demo.main(["--quick", "--out-dir", "/tmp/klq-demo"])     # doctest: +SKIP
    >>> result["summary"]["klq"]["gap_closed"] > 0.5                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from klq_jax.config import SEED_LIMIT, range_problems

__all__ = ["DemoConfig", "DEMO_ENTRIES", "check_out_dir", "run", "main", "format_summary"]

# What the demo writes in its out_dir (besides its lock): a directory holding nothing else, with the
# demo's config.json, is a previous demo's, which a rerun replaces without --overwrite.
DEMO_ENTRIES = ("config.json", "sft-hf", "klq", "ppo", "metrics.jsonl", "training_curves.png", "samples.md",
                "summary.md")
_DEMO_DIRS = ("sft-hf", "klq", "ppo")
# Fields every recorded demo config.json has.
_DEMO_CONFIG_KEYS = frozenset({"out_dir", "seed", "tau", "sft_steps", "iterations", "rollouts_per_batch"})


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the same for KLQ and PPO).

    Attributes:
      out_dir: where everything is written.
      seed: seeds the corpus, the SFT fit, the value heads, the prompts and the sampling.
      tau: KL coefficient τ of both algorithms and of J*.
      omega: missing-<eos> penalty ω (in the rollout and in the exact rewards).
      sft_steps: optimizer steps of the maximum-likelihood fit of π_b.
      iterations: RL iterations per algorithm (each samples rollouts_per_batch responses).
      rollouts_per_batch: responses per iteration (one minibatch, as in the paper).
      epochs: passes over each batch (paper: 4).
      learning_rate: peak AdamW learning rate, decayed linearly to 0 (paper's schedule).
      eval_every: exact evaluation every this many iterations (and at the end).
      samples_per_prompt: responses shown per prompt and policy in samples.md.
      progress: progress bars.
      overwrite: use an out_dir that holds files a demo did not write (a previous demo's directory
        needs no flag): the demo's entries there (config.json, sft-hf/, klq/, ppo/, metrics.jsonl,
        training_curves.png, samples.md, summary.md) are replaced, other files stay; an entry that
        is a symbolic link is replaced by the demo's own (its target untouched). The runs klq/
        and ppo/ are still replaced only if the trainer wrote them; a klq train run directory is
        refused all the same. Not taken from --config.
    """

    out_dir: str = "runs/demo"
    seed: int = 0
    tau: float = 0.2
    omega: float = 1.0
    sft_steps: int = 400
    iterations: int = 150
    rollouts_per_batch: int = 64
    epochs: int = 4
    learning_rate: float = 5e-4
    eval_every: int = 10
    samples_per_prompt: int = 4
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        p = [f"{n}={getattr(self, n)} must be >= 1" for n in
             ("sft_steps", "iterations", "rollouts_per_batch", "epochs", "eval_every") if getattr(self, n) < 1]
        for n in ("tau", "learning_rate"):
            p += range_problems(n, getattr(self, n), 0, low_open=True)
        p += range_problems("omega", self.omega, 0)
        p += range_problems("seed", self.seed, 0, SEED_LIMIT, integer=True, high_open=True)
        if self.samples_per_prompt < 0:
            p.append(f"samples_per_prompt={self.samples_per_prompt} must be >= 0")
        if p:
            raise ValueError("Invalid DemoConfig: " + "; ".join(p))

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A shortened run (about a minute on 2 cores)."""
        base = dict(sft_steps=200, iterations=30, eval_every=5, learning_rate=1e-3)
        base.update(overrides)
        return cls(**base)


def _exact_fields(e: dict) -> dict:
    return {f"exact/{k}": float(e[k]) for k in ("J", "reward", "kl_to_ref", "kl_to_opt")}


def check_out_dir(out_dir: str, *, overwrite: bool = False) -> None:
    """Refuse an ``out_dir`` the demo may not write in (see the module docstring): a ``klq train``
    run directory (:func:`klq_jax.train.run_dir.training_run_entries`, whatever ``overwrite``), one
    holding files a demo did not write (unless ``overwrite``), or a run ``klq/``/``ppo/`` that is live or
    holds files the trainer did not write (``klq train --overwrite``'s rule, whatever ``overwrite``).

    Raises:
      ForeignFilesError: the files named; RunLockedError: a live run in ``klq/`` or ``ppo/``.
    """
    from klq_jax.errors import ForeignFilesError
    from klq_jax.models.hf.files import is_leftover
    from klq_jax.train import run_dir

    trainers = run_dir.training_run_entries(out_dir)
    if trainers:  # --overwrite would leave a hybrid: the run's checkpoints with the demo's metrics
        raise ForeignFilesError(
            f"{out_dir} is a `klq train` run directory ({'; '.join(trainers)}): the demo never writes "
            "into one, even with --overwrite; choose another --out-dir."
        )
    if not overwrite:
        cfg_path = os.path.join(out_dir, "config.json")
        previous = run_dir.recorded_config(cfg_path, DemoConfig, _DEMO_CONFIG_KEYS)
        if previous is not None and not os.path.islink(cfg_path):  # a previous demo's: its entries only
            def a_dir(p):
                return None if os.path.isdir(p) else "not a directory"

            def a_file(p):
                return None if os.path.isfile(p) else "not a file"

            checks = {n: a_dir if n in _DEMO_DIRS else a_file for n in DEMO_ENTRIES}
            checks["sft-hf"] = run_dir.hf_export_dir  # replaced whole: nothing but the demo's export in it
        else:  # no previous demo here: whatever is there is someone else's
            checks = {"config.json": lambda p: "not a klq demo config"}
        foreign = run_dir.foreign_entries(out_dir, checks, only_these=True, writer="klq demo",
                                          ignore=lambda n: any(is_leftover(n, d) for d in _DEMO_DIRS))
        if foreign:
            raise ForeignFilesError(
                f"{out_dir} holds files that klq demo did not write: {'; '.join(foreign[:8])}"
                + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
                + ". The demo writes " + ", ".join(n + "/" if n in _DEMO_DIRS else n for n in DEMO_ENTRIES)
                + " there: choose a new or empty --out-dir (or a previous demo's), or pass --overwrite "
                "to replace those entries (other files stay)."
            )
    for algo in ("klq", "ppo"):  # their runs are replaced with the trainer's --overwrite
        if not os.path.islink(os.path.join(out_dir, algo)):  # a link (overwrite only) is replaced, see run()
            run_dir.preflight(os.path.join(out_dir, algo), resume=False, overwrite=True)


def run(cfg: DemoConfig) -> dict:
    """Run the demo (see the module docstring). Returns paths, timings and the summary rows.

    ``cfg.out_dir`` is checked (:func:`check_out_dir`) and locked before anything is written, and
    stays locked until the demo ends.

    Raises:
      RunLockedError: another demo (or run) uses the directory; ForeignFilesError: it holds files
      the demo did not write (see ``DemoConfig.overwrite``); RunDirError: it cannot be written.
    """
    from klq_jax.train import run_dir

    lock, _ = run_dir.claim(os.path.abspath(cfg.out_dir),
                            lambda d: check_out_dir(d, overwrite=cfg.overwrite))
    try:
        if cfg.overwrite:  # an entry that is a symbolic link is replaced, never written through
            for name in DEMO_ENTRIES:
                if os.path.islink(os.path.join(lock.out_dir, name)):
                    os.unlink(os.path.join(lock.out_dir, name))
        return _run(cfg, Path(cfg.out_dir))
    finally:
        lock.release()


def _run(cfg: DemoConfig, out: Path) -> dict:
    """The demo in ``out``, which :func:`run` holds."""
    import jax

    from klq_jax import evaluate, sampling, sharding, train
    from klq_jax.models.load import load_model
    from klq_jax.algorithms import AlgoConfig
    from experiments import synthetic as syn
    from klq_jax.models import hf
    from experiments.plots import plot_training_curves
    from klq_jax.train.run_dir import atomic_write

    t0 = time.perf_counter()
    # The demo's own settings: ``klq demo --config <out_dir>/config.json`` runs it again.
    atomic_write(str(out / "config.json"), json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    lang = syn.SyntheticLanguage()
    task = syn.SyntheticTask(lang, tau=cfg.tau, omega=cfg.omega, temperature=1.0)  # the runs' temperature
    say = print
    say(f"[demo] synthetic language: {len(lang.words)} words {' '.join(lang.words)}; prompts: "
        f"{', '.join(repr(p) for p in lang.prompts)}; T_max = {lang.t_max}")
    say("[demo] reward: +1 if the response says 'runs fast', -0.5 if it rambles on with 'and' "
        f"(ω = {cfg.omega} penalty without <eos>); τ = {cfg.tau}")

    # 1. The SFT policy π_b.
    t = time.perf_counter()
    sft = syn.train_sft(lang, steps=cfg.sft_steps, seed=cfg.seed, progress=cfg.progress)
    gkl = syn.grammar_kl(lang, sft.graphdef, sft.params)
    t_sft = time.perf_counter() - t
    say(f"[demo] SFT: {cfg.sft_steps} steps in {t_sft:.1f}s, final NLL {sft.losses[-10:].mean():.3f} "
        f"nats/token, KL(grammar ‖ π_b) = {gkl.mean():.4f} nats per response")

    # 2. Save as a Hugging Face checkpoint and load it back as a user would.
    hf_dir = out / "sft-hf"
    with tempfile.TemporaryDirectory() as tok_dir:
        syn.save_tokenizer(lang, tok_dir)
        hf.save_hf(hf_dir, sft.config, sft.params, tokenizer_dir=tok_dir,
                   hf_config={"pad_token_id": syn.PAD_ID}, overwrite=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    key = jax.random.key(cfg.seed + 1)
    _, graphdef, params = load_model(str(hf_dir), key=key, value_head=True)
    _, ref_graphdef, ref_params = load_model(str(hf_dir), key=key)
    say(f"[demo] saved π_b to {hf_dir} (transformers-loadable) and loaded it back with a fresh value head")

    def decode(ids) -> str:
        return tokenizer.decode([int(i) for i in ids])

    # 3. Exact baseline and optimum.
    ref_logp = task.sequence_logprobs(ref_graphdef, ref_params)
    mem_logp = task.sequence_logprobs(sft.graphdef, sft.params)
    roundtrip = float(np.max(np.abs(np.exp(ref_logp) - np.exp(mem_logp))))
    base = task.exact(None, None, None, None, pol_logp=ref_logp, ref_logp=ref_logp)  # π = π_b
    j_star, j_ref = base["j_star"], base["J"]
    say(f"[demo] exact: J(π_b) = {j_ref:.4f}, J* = {j_star:.4f} (max |Δπ_b(y|x)| after the HF round trip: "
        f"{roundtrip:.1e})")

    # 4. KLQ and PPO with the same budget.
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    task.sequence_logprobs(graphdef, params)  # compile the exact evaluation of the policy network once
    records: list[dict] = []
    results, times = {}, {}
    for algo in ("klq", "ppo"):
        run_dir = out / algo  # the previous demo's run is replaced (overwrite), never a live one (locked)
        tcfg = train.TrainConfig(
            algo=AlgoConfig(name=algo, tau=cfg.tau, gamma=1.0, lam=0.95),
            optim=train.OptimConfig(learning_rate=cfg.learning_rate, schedule="linear"),
            rollouts_per_batch=cfg.rollouts_per_batch,
            minibatch_size=cfg.rollouts_per_batch,
            micro_batch_size=cfg.rollouts_per_batch,
            epochs=cfg.epochs,
            total_episodes=cfg.iterations * cfg.rollouts_per_batch,
            max_new_tokens=lang.t_max,
            temperature=1.0,
            omega=cfg.omega,
            seed=cfg.seed,
            out_dir=str(run_dir),
            save_every=cfg.iterations,
            log_samples_every=max(1, cfg.iterations // 5),
            progress=cfg.progress,
            tensorboard=False,
            overwrite=True,
        )
        exp = task.experiment(graphdef, params, batch_size=tcfg.rollouts_per_batch, seed=cfg.seed,
                              ref_graphdef=ref_graphdef, ref_params=ref_params, decode=decode)
        records.append({"algo": algo, "iteration": 0, "episodes": 0, **_exact_fields(base)})
        n_it = tcfg.num_iterations

        eval_s = [0.0]

        def on_iteration(it, rec, state, algo=algo, n_it=n_it, eval_s=eval_s):
            r = dict(rec, algo=algo)
            if it % cfg.eval_every == 0 or it == n_it:
                te = time.perf_counter()
                r.update(_exact_fields(task.exact(graphdef, state.params, None, None, ref_logp=ref_logp)))
                eval_s[0] += time.perf_counter() - te
            records.append(r)

        t = time.perf_counter()
        res = train.train(tcfg, exp, mesh=mesh, on_iteration=on_iteration)
        times[algo] = time.perf_counter() - t - eval_s[0]  # training only (compilation included)
        results[algo] = jax.device_get(res.state.params)

    for r in records:
        r.update(tau=cfg.tau, j_star=j_star)
    with open(out / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    # 5. The figure.
    png = plot_training_curves(
        records, out / "training_curves.png", tau=cfg.tau, j_star=j_star, j_ref=j_ref,
        title=f"KLQ vs PPO on the synthetic language (same budget: {cfg.iterations}×{cfg.rollouts_per_batch} "
              f"episodes, lr {cfg.learning_rate:g}, τ = {cfg.tau:g})",
    )

    # 6. Exact end points, samples, summary.
    pol_logp = {a: task.sequence_logprobs(graphdef, results[a]) for a in results}
    final = {a: task.exact(None, None, None, None, pol_logp=pol_logp[a], ref_logp=ref_logp) for a in results}
    opt_logp = task.optimal_logprobs(ref_logp)
    table = task._table
    opt_rows = [evaluate.exact_objective(opt_logp[i], ref_logp[i], table[i], cfg.tau) for i in range(len(lang.prompts))]
    optimum = {k: float(np.mean([r[k] for r in opt_rows])) for k in opt_rows[0]}
    gap0 = j_star - j_ref

    def row(e, algo=None):
        per_it = None
        if algo is not None:  # median wall time of one iteration (sample + update), compilation excluded
            times_it = [r["time_iteration"] for r in records if r["algo"] == algo and r["iteration"] > 1]
            per_it = float(np.median(times_it)) if times_it else None  # a 1-iteration demo: none
        return {"reward": e["reward"], "kl_to_ref": e["kl_to_ref"], "J": e["J"],
                "gap_closed": (e["J"] - j_ref) / gap0, "kl_to_opt": e["kl_to_opt"],
                "train_s": times.get(algo), "iteration_s": per_it}

    summary = {
        "sft": row(base),
        "klq": row(final["klq"], "klq"),
        "ppo": row(final["ppo"], "ppo"),
        "optimum": row(optimum),
    }
    sample_md = _samples_markdown(cfg, lang, task, decode, graphdef, results, ref_graphdef, ref_params,
                                  ref_logp, opt_logp, pol_logp, sampling)
    (out / "samples.md").write_text(sample_md)
    total = time.perf_counter() - t0
    text = format_summary(summary, cfg, j_star=j_star, total_s=total, sft_s=t_sft, grammar_kl=float(gkl.mean()))
    (out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"[demo] wrote {out / 'metrics.jsonl'}, {png}, {out / 'samples.md'}, {out / 'summary.md'}")
    return {"summary": summary, "j_star": j_star, "j_ref": j_ref, "png": png, "out_dir": str(out),
            "total_s": total, "train_s": times, "records": records}


def _fmt(x, spec=".4f"):
    return "—" if x is None else format(x, spec)


def format_summary(summary: dict, cfg: DemoConfig, *, j_star: float, total_s: float, sft_s: float,
                   grammar_kl: float) -> str:
    """The markdown summary table (printed at the end of the demo and saved as ``summary.md``).

    Example:
      >>> row = dict(reward=0.5, kl_to_ref=1.0, J=0.3, gap_closed=0.9, kl_to_opt=0.1, train_s=None,
      ...            iteration_s=None)
      >>> s = format_summary({"sft": row, "klq": row, "ppo": row, "optimum": row}, DemoConfig(),
      ...                    j_star=0.32, total_s=60.0, sft_s=9.0, grammar_kl=0.01)
      >>> "| KLQ |" in s and "J* = 0.3200" in s
      True
    """
    names = {"sft": "π_b (SFT, start)", "klq": "KLQ", "ppo": "PPO", "optimum": "π* (exact optimum)"}
    lines = [
        f"## Demo summary (τ = {cfg.tau:g}, ω = {cfg.omega:g}, {cfg.iterations} iterations × "
        f"{cfg.rollouts_per_batch} episodes, {cfg.epochs} epochs, lr {cfg.learning_rate:g}, seed {cfg.seed})",
        "",
        "Exact values: every response enumerated (19,608 per prompt), averaged over the 4 prompts. "
        f"J* = {j_star:.4f}.",
        "",
        "| policy | E[R] | KL(π‖π_b) | J = E[R] − τ·KL | gap closed | KL(π‖π*) | train time¹ | time / iteration² |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ("sft", "klq", "ppo", "optimum"):
        r = {n: (0.0 if isinstance(v, float) and abs(v) < 5e-7 else v) for n, v in summary[k].items()}
        lines.append(
            f"| {names[k]} | {r['reward']:.4f} | {r['kl_to_ref']:.4f} | {r['J']:.4f} | "
            f"{100 * r['gap_closed']:.1f}% | {r['kl_to_opt']:.4f} | "
            f"{'—' if r.get('train_s') is None else format(r['train_s'], '.1f') + ' s'} | "
            f"{'—' if r.get('iteration_s') is None else format(1000 * r['iteration_s'], '.0f') + ' ms'} |"
        )
    lines += [
        "",
        f"gap closed = (J(π) − J(π_b)) / (J* − J(π_b)); J* − J(π) = τ·KL(π‖π*). SFT fit: {sft_s:.1f} s, "
        f"KL(grammar ‖ π_b) = {grammar_kl:.4f}. Whole demo: {total_s:.0f} s. ¹ Wall time of "
        "`train.train` (JIT compilation included, exact evaluations excluded; KLQ runs first and also "
        "compiles the sampler both share). ² Median over iterations 2.. of sampling + scoring + "
        "update.",
        "",
    ]
    return "\n".join(lines)


def _samples_markdown(cfg, lang, task, decode, graphdef, results, ref_graphdef, ref_params, ref_logp,
                      opt_logp, pol_logp, sampling) -> str:
    import jax
    import jax.numpy as jnp

    from klq_jax import evaluate
    from experiments import synthetic as syn

    p_ids, p_mask = lang.prompt_arrays()
    k = cfg.samples_per_prompt
    ids = np.repeat(p_ids, k, axis=0)
    mask = np.repeat(p_mask, k, axis=0)
    scfg = sampling.SamplingConfig(max_new_tokens=lang.t_max, temperature=1.0,
                                   stop_token_ids=(syn.EOS_ID,), pad_token_id=syn.PAD_ID)
    policies = {"π_b (SFT, before)": (ref_graphdef, ref_params)}
    policies.update({f"{a.upper()} (after)": (graphdef, results[a]) for a in results})
    samples = {}
    for name, (gd, p) in policies.items():
        res = sampling.sample(gd, p, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(cfg.seed + 7), scfg)
        toks, m = np.asarray(res.tokens), np.asarray(res.mask)
        scores = np.asarray(task.reward(ids, mask, toks, m)) - cfg.omega * np.asarray(res.truncated)
        samples[name] = [(decode(toks[i][m[i] > 0]), float(scores[i])) for i in range(len(ids))]

    responses, rmask, _ = evaluate.enumerate_responses(lang.vocab_size, syn.EOS_ID, lang.t_max, syn.PAD_ID)
    texts = [decode(responses[j][rmask[j] > 0]) for j in range(len(responses))]
    dists = {"π_b": ref_logp, "π* (optimum)": opt_logp}
    dists.update({a.upper(): pol_logp[a] for a in pol_logp})
    table = task._table

    lines = [
        "# Sampled responses, before and after RL",
        "",
        "Reward: +1 if the response says *runs fast*, −0.5 if it rambles on with *and* "
        f"(−{cfg.omega:g} without `<eos>`). Sampled at temperature 1 with the same key for every policy.",
        "",
    ]
    names = list(policies)
    for i, prompt in enumerate(lang.prompts):
        lines += [f"## Prompt: *{prompt}*", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        for j in range(k):
            cells = [f"`{samples[n][i * k + j][0]}` ({samples[n][i * k + j][1]:+.1f})" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Most likely responses (exact probabilities):", "",
                  "| " + " | ".join(dists) + " |", "|" + "---|" * len(dists)]
        tops = {n: np.argsort(-lp[i])[:3] for n, lp in dists.items()}
        for r in range(3):
            cells = []
            for n, lp in dists.items():
                j = tops[n][r]
                cells.append(f"`{texts[j]}` {np.exp(lp[i, j]):.3f} (R {table[i, j]:+.1f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    """``[--quick] [--config FILE] [--field value ...]`` → a :class:`DemoConfig` (tyro).

    ``--quick`` starts from :meth:`DemoConfig.quick`, ``--config`` from a recorded demo's
    ``config.json``; any field can then be overridden (``--iterations 50 --learning-rate 1e-3``).
    """
    import tyro

    from experiments import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    quick, argv = cli.pop_flag(argv, "--quick")
    config_path, argv = cli.pop_option(argv, "--config")
    if config_path:
        # A recorded overwrite=true never carries over: only this command line sets it.
        default = dataclasses.replace(cli.load_config(DemoConfig, config_path), overwrite=False)
    else:
        default = DemoConfig.quick() if quick else DemoConfig()
    description = (
        "The offline demo: KLQ vs PPO on a synthetic language, against the exact optimum J*. "
        "--quick: a shortened run (about a minute on 2 cores). " + cli.COMMON_HELP
    )
    return tyro.cli(DemoConfig, default=default, args=argv, prog="klq demo", description=description)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point (``python -m experiments.demo``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
