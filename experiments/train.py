"""``klq train PRESET [--field value ...]``: one KLQ / PPO run from a preset and overrides.

Nested fields are dotted: ``--algo.tau 0.1``, ``--task.policy path/to/hf_dir``,
``--optim.learning-rate 1e-5``, ``--mesh.fsdp 2``. ``klq train PRESET --help`` lists every field.
``--config RUN_DIR/config.json`` starts from a recorded run's config instead of the preset's (the
preset name may then be left out). The arguments are parsed by tyro's overridable-config CLI (one
subcommand per preset); JAX is imported only once a run starts.
"""

from __future__ import annotations

import dataclasses
import sys

from experiments import cli, presets
from experiments.config import RunConfig

PROG = "klq train"


def describe(cfg: RunConfig) -> str:
    """One line about a preset: its task, algorithm, models and size."""
    t = cfg.task
    what = t.policy if t.kind == "synthetic" else f"{t.policy}, reward model {t.reward_model}"
    return (
        f"{cfg.algo.name.upper()} on the {t.kind} task ({what}): {cfg.num_iterations} iterations "
        f"of {cfg.rollouts_per_batch} rollouts, τ={cfg.algo.tau}."
    )


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """``[PRESET] [--config FILE] [--field value ...]`` → a validated :class:`RunConfig`."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = cli.pop_option(argv, "--config")
    preset = argv[0] if argv and argv[0] in presets.PRESETS else None
    recorded = None
    if config_path:
        base = presets.get(preset) if preset else None
        recorded = cli.load_config(RunConfig, config_path, base=base)
        # How the recorded run was started (--resume/--overwrite/--allow-fresh) is not part of what
        # it computes: a rerun starts as this command line says, never deletes a run by a recorded
        # overwrite=true.
        recorded = dataclasses.replace(recorded, resume=False, overwrite=False, allow_fresh=False)
        if base is not None and (recorded.task.kind, recorded.task.policy) != (base.task.kind, base.task.policy):
            print(
                f"note: {config_path} records the {recorded.task.kind} task with policy "
                f"{recorded.task.policy!r}, not preset {preset}'s ({base.task.kind}, "
                f"{base.task.policy!r}); the recorded values win.",
                file=sys.stderr,
            )
    description = (
        "Train KLQ or PPO. Name a preset, then override any field (--algo.tau 0.1, "
        "--task.policy DIR, --total-episodes 512); PRESET --help lists every field. "
        + cli.COMMON_HELP
    )
    if recorded is not None and (not argv or argv[0].startswith("-")):
        # No preset named: the recorded config is the starting point.
        return tyro.cli(RunConfig, default=recorded, args=argv, prog=PROG, description=description)
    asks_help = any(a in ("-h", "--help") or a.startswith("--tyro") for a in argv)
    if recorded is None and argv and argv[0] not in presets.PRESETS and not asks_help:
        names = ", ".join(presets.PRESETS)
        if argv[0].startswith("-"):
            raise cli.UsageError(f"name a preset before the options: klq train PRESET {' '.join(argv)} "
                                 f"(PRESET: one of {names}; see klq train --help)")
        raise cli.UsageError(f"unknown preset {argv[0]!r}: name one of {names} (see klq train --help)")
    more = " Also --config FILE, --debug, --no-compile-cache (see klq train --help)."
    configs = {name: (describe(cfg) + more, cfg) for name, cfg in presets.PRESETS.items()}
    if recorded is not None and argv[0] in configs:
        configs[argv[0]] = (f"The run recorded in {config_path}." + more, recorded)
    return tyro.extras.overridable_config_cli(
        configs, prog=PROG, description=description, args=argv
    )


def run(cfg: RunConfig, *, mesh=None):
    """Build the task's experiment on the configured mesh (or ``mesh``) and train it.

    The run directory is checked first (:func:`klq_jax.train.run_dir.preflight`), so a refused
    start (a run already there, ``--resume`` without a checkpoint, a live run) fails before any
    model is loaded.
    """
    import jax

    from experiments.tasks import build_experiment
    from klq_jax import sharding
    from klq_jax.train import run_dir, train

    sharding.initialize_distributed()
    if jax.process_index() == 0:  # the others would see process 0's lock and files
        run_dir.preflight(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                          allow_fresh=cfg.allow_fresh)
    mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
    exp = build_experiment(
        cfg.task,
        batch_size=cfg.rollouts_per_batch,
        seed=cfg.seed,
        score_micro_batch_size=cfg.score_micro_batch_size,
        mesh=mesh,
        validation_prompts=cfg.eval_prompts if cfg.eval_every else 0,
    )
    return train(cfg, exp, mesh=mesh)


def summary(cfg: RunConfig, history: list[dict]) -> str:
    """The final line of a run: its last iteration's score, ω penalty, KL and RLHF reward.

    ``reward = score - ω·(fraction of responses without a stop token)``, so the line says how
    much of the reward the ω penalty is.
    """
    last = history[-1]
    penalty = last["reward"] - last["score"]
    n, first = last.get("iteration", len(history)), history[0].get("iteration", 1)
    resumed = f" (resumed from checkpoint {first - 1}: {len(history)} trained now)" if first > 1 else ""
    return (
        f"done: {n} iteration{'' if n == 1 else 's'}{resumed} -> {cfg.out_dir}; last batch: score {last['score']:.4f}, "
        f"ω penalty {penalty:+.4f} (ω={cfg.omega:g} x {last['truncated_frac']:.0%} of responses "
        f"without a stop token), reward {last['reward']:.4f}, KL {last['kl']:.4f}, "
        f"RLHF reward {last['rlhf_reward']:.4f}"
    )


def after_interrupt(cfg: RunConfig) -> str:
    """What to do after Ctrl-C stopped the run ``cfg``: ``--resume`` from its newest checkpoint,
    or, with none written yet, start again."""
    from klq_jax.train import run_dir

    steps = run_dir.checkpoint_steps(cfg.out_dir)
    if steps:
        return (f"rerun with --resume{' (instead of --overwrite)' if cfg.overwrite else ''} to continue "
                f"from checkpoint {steps[-1]} in {cfg.out_dir}")
    if run_dir.describe_run(cfg.out_dir):
        return (f"no checkpoint was written yet, so there is nothing to --resume: rerun with --overwrite "
                f"to start {cfg.out_dir} again")
    return "nothing was written yet: rerun the same command"


def main(argv: list[str] | None = None):
    cfg = parse_args(argv)
    try:
        result = run(cfg)
    except KeyboardInterrupt as err:
        try:
            advice = after_interrupt(cfg)
        except Exception:  # never hide the interrupt behind a failure to advise
            raise err from None
        raise cli.Interrupted(advice) from err
    if result.history:
        print(summary(cfg, result.history))
    else:  # --resume of a finished run (or of one killed before its export, now written)
        print(f"nothing left to train: {cfg.out_dir} has all {cfg.num_iterations} iterations and "
              "its policy/ export.")
    return result


if __name__ == "__main__":
    main()
