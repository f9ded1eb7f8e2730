"""The ``klq`` command: ``klq {train,sweep,demo,convert} ...``.

Each subcommand is a module with a ``main(argv)``; only the chosen one is imported.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("experiments.train", "train KLQ or PPO from a preset (klq train PRESET --help)"),
    "sweep": ("experiments.sweep", "train over a grid of τ and plot reward against KL"),
    "demo": ("experiments.demo", "the offline demo: KLQ vs PPO against the exact optimum"),
    "convert": ("convert.cli", "convert checkpoints between Hugging Face and klq_jax"),
}


def _usage() -> str:
    lines = ["usage: klq COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `klq COMMAND --help` for the arguments of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main(rest)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
