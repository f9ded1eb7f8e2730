"""``klq train PRESET [--field value ...]``: one KLQ / PPO run from a preset and overrides.

Nested fields are dotted: ``--algo.tau 0.1``, ``--task.policy path/to/hf_dir``,
``--optim.learning-rate 1e-5``, ``--mesh.fsdp 2``. ``klq train PRESET --help`` lists every field.
"""

from __future__ import annotations

import sys

from experiments import presets
from experiments.tasks import RunConfig, build_experiment
from klq_jax import sharding
from klq_jax.train import TrainResult, train

PROG = "klq train"


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """``<preset> [--field value ...]`` → a validated :class:`experiments.tasks.RunConfig`."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(
                f"usage: {PROG} PRESET [--field value ...]\n\n"
                "Presets: " + ", ".join(sorted(presets.PRESETS)) + "\n"
                f"Run `{PROG} PRESET --help` to list every field of a preset."
            )
            raise SystemExit(0)
        raise SystemExit(
            f"error: name a preset first: {PROG} PRESET [--field value ...]\n"
            "Presets: " + ", ".join(sorted(presets.PRESETS))
        )
    name, rest = argv[0], argv[1:]
    try:
        default = presets.get(name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return tyro.cli(RunConfig, default=default, args=rest, prog=f"{PROG} {name}")
    except ValueError as e:  # a config __post_init__ rejected the overrides
        raise SystemExit(f"error: {e}") from None


def run(cfg: RunConfig, *, mesh=None) -> TrainResult:
    """Build the task's experiment on the configured mesh (or ``mesh``) and train it."""
    sharding.initialize_distributed()
    mesh = mesh if mesh is not None else sharding.mesh_from_config(cfg.mesh)
    exp = build_experiment(
        cfg.task,
        batch_size=cfg.rollouts_per_batch,
        seed=cfg.seed,
        score_micro_batch_size=cfg.score_micro_batch_size,
        mesh=mesh,
    )
    return train(cfg, exp, mesh=mesh)


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = parse_args(argv)
    result = run(cfg)
    if result.history:
        last = result.history[-1]
        print(
            f"done: {len(result.history)} iterations, score {last['score']:.4f}, "
            f"KL {last['kl']:.4f}, RLHF reward {last['rlhf_reward']:.4f} -> {cfg.out_dir}"
        )
    return result


if __name__ == "__main__":
    main()
