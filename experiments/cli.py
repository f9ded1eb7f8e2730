"""The ``klq`` command: ``klq {train,sweep,demo,convert} ...`` (also ``python -m experiments``).

Each subcommand is a module with a ``main(argv)`` whose arguments tyro builds from a config
dataclass; only the chosen one is imported, and the configs import no JAX, so ``--help`` is fast.

Options every command takes (anywhere on its line):

* ``--config FILE``: start from a recorded config (a run's ``config.json``) instead of the
  defaults; flags still override it (handled by each command, see :func:`load_config`);
* ``--debug``: show the traceback of an error (otherwise: one line and a non-zero exit);
* ``--no-compile-cache``: do not use the persistent JAX compilation cache
  (default ``~/.cache/klq_jax/jax``, or ``$KLQ_COMPILE_CACHE_DIR``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import sys
import traceback

from klq_jax import hostmem, without_torch

COMMANDS = {
    "train": ("experiments.train", "train KLQ or PPO from a preset (klq train PRESET --help)"),
    "sweep": ("experiments.sweep", "train over a grid (τ, λ, lr, ...) and plot validation reward against KL"),
    "judge": ("experiments.judge", "LLM-as-a-judge win rates of two runs' completions (Jeffreys intervals)"),
    "demo": ("experiments.demo", "the offline demo: KLQ vs PPO against the exact optimum"),
    "convert": ("convert.cli", "convert checkpoints between Hugging Face and klq_jax"),
}

COMMON_HELP = (
    "Options of every klq command: --config FILE starts from a recorded config.json (flags "
    "after it still override); --debug shows the traceback of an error; --no-compile-cache "
    "turns off the persistent compilation cache (default ~/.cache/klq_jax/jax, or "
    "$KLQ_COMPILE_CACHE_DIR)."
)

# Packages whose exceptions (and whose raised ValueErrors) are ours: one line, no traceback.
_OUR_PACKAGES = ("klq_jax", "experiments", "convert")


def _usage() -> str:
    lines = ["usage: klq COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `klq COMMAND --help` for the arguments of a command.", "", COMMON_HELP]
    return "\n".join(lines)


def pop_flag(argv: list[str], flag: str) -> tuple[bool, list[str]]:
    """``(present, argv without it)`` for a boolean flag such as ``--debug``."""
    return flag in argv, [a for a in argv if a != flag]


def pop_option(argv: list[str], option: str) -> tuple[str | None, list[str]]:
    """``(value, argv without it)`` for ``option VALUE`` or ``option=VALUE`` (the last one wins)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == option:
            if i + 1 >= len(argv):
                raise ValueError(f"{option} needs a value: {option} FILE")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(option + "="):
            value = a[len(option) + 1:]
        else:
            rest.append(a)
        i += 1
    return value, rest


def load_config(cls: type, path: str, base=None):
    """The config dataclass ``cls`` from the JSON file ``path`` (a run's recorded ``config.json``).

    Fields the file leaves out keep their value in ``base`` (e.g. the preset named beside
    ``--config``), or the defaults without one.
    """
    from klq_jax.config import from_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file; pass a run's config.json")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path} is not valid JSON ({e})") from None
    return from_dict(cls, data, where=f"--config {path}", base=base)


def default_compile_cache_dir() -> str:
    """``$KLQ_COMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/klq_jax/jax`` (``~/.cache/klq_jax/jax``)."""
    if os.environ.get("KLQ_COMPILE_CACHE_DIR"):
        return os.environ["KLQ_COMPILE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "klq_jax", "jax")


def enable_compile_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_compile_cache_dir`).

    A second run of the same shapes then loads its compiled programs instead of compiling them
    (programs that compile in under a second are not stored: JAX's threshold). Before JAX is
    imported this only sets ``JAX_COMPILATION_CACHE_DIR`` (``--help`` stays fast); a directory the
    user set there already wins.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or path or default_compile_cache_dir()
    os.makedirs(path, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_compilation_cache_dir", path)
    return path


# Libraries that print their log lines through a handler of their own on their package logger.
_SELF_PRINTING_LOGGERS = ("huggingface_hub", "datasets", "transformers")


class _NoTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found. Models won't be available ..." notice: our
    commands use transformers for tokenizers, configs and files only, never its PyTorch models."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


_NO_TORCH_NOTICE = _NoTorchNotice()


def quiet_library_logs() -> None:
    """Each library log line printed once, and no notice that torch is missing.

    ``huggingface_hub`` and ``datasets`` print their lines with a handler on their package logger
    and still pass them on to the root logger; once something configures the root logger, every
    such line prints twice. absl does that at its first log call (orbax logs through absl at every
    checkpoint save: ``logging.basicConfig()`` when the root has no handler). Their loggers stop
    passing lines on (what their ``disable_propagation()`` does, set here without importing them;
    transformers' is off already, unless ``$CI`` is set). Nothing is imported, so ``--help`` stays
    fast; calling it again changes nothing.
    """
    for name in _SELF_PRINTING_LOGGERS:
        logging.getLogger(name).propagate = False
    logging.getLogger("transformers").addFilter(_NO_TORCH_NOTICE)  # the notice's own logger


def _is_ours(err: BaseException) -> bool:
    """An error to report in one line: one of our classes, an OSError (a file, a permission), or a
    ValueError / FloatingPointError raised by our code (a bad value the message names)."""
    if type(err).__module__.split(".")[0] in _OUR_PACKAGES:
        return True
    if isinstance(err, OSError):
        return True
    if isinstance(err, (ValueError, FloatingPointError)):
        tb = err.__traceback__
        last = None
        while tb is not None:
            last, tb = tb, tb.tb_next
        module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
        return module.split(".")[0] in _OUR_PACKAGES
    return False


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in msg:
        msg = f"{msg}: {err.filename}"
    return msg


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what to do next (one phrase: :func:`run` prints ``PROG: interrupted; PHRASE``)."""


# What to do after Ctrl-C, for the commands whose advice does not depend on what was written
# (``klq train`` raises :class:`Interrupted` with its own: which checkpoint --resume continues from).
INTERRUPT_ADVICE = {
    "sweep": "rerun the same command to continue: finished runs are skipped and the interrupted one "
             "resumes from its last checkpoint",
    "demo": "rerun the same command to start the demo again in its --out-dir",
    "judge": "nothing was written but the request cache: rerun the same command (an HTTP judge asks "
             "only for the answers it does not hold)",
    "convert": "DST was not written (a conversion writes a temporary directory and renames it when "
               "complete): rerun the same command",
}


class UsageError(ValueError):
    """The command line itself is wrong (an unknown option, a value of the wrong type, a missing
    argument): :func:`run` prints it in one line that names the ``--help`` to read."""


def _arg_name(arg) -> str:
    """How the user writes a tyro argument: its flag(s), or a positional's metavar."""
    if arg.is_positional():
        return str(arg.lowered.metavar or arg.display_name())
    return "/".join(arg.lowered.name_or_flags)


def _parse_error_line(event, errors) -> str | None:
    """One line for a tyro parse-error event: what was wrong and which ``--help`` to read; None
    for an event this tyro has that we do not know (tyro's own message then stands)."""
    if isinstance(event, errors.UnrecognizedArgs):
        s = "s" if len(event.tokens) > 1 else ""
        what = f"unrecognized argument{s}: {' '.join(event.tokens)}"
    elif isinstance(event, errors.InstantiationFailure):
        message = " ".join(str(event.message).split())
        what = f"bad value for {_arg_name(event.argument)}: {message}" if event.argument else message
    elif isinstance(event, errors.BadValue):
        name = _arg_name(event.argument)
        if event.reason == "too_few_values":
            what = f"{name} needs a value ({event.argument.lowered.metavar or 'VALUE'})"
        else:
            what = f"{name} takes no value (got {event.offending_value!r})"
    elif isinstance(event, errors.InvalidChoice):
        what = (f"invalid value {event.value!r} for {_arg_name(event.argument)}: "
                f"choose one of {', '.join(map(str, event.choices))}")
    elif isinstance(event, errors.MissingArgs):
        what = "missing " + ", ".join(_arg_name(a.arg) for a in event.missing_arguments)
    elif isinstance(event, errors.MissingSubcommand):
        what = "name one of " + ", ".join(event.subcommand_spec.parser_from_name)
    else:
        return None
    progs = event._help_progs() if hasattr(event, "_help_progs") else event.prog
    prog = progs if isinstance(progs, str) else (progs[0] if progs else event.prog)
    return f"{what} (see {prog} --help)"


@contextlib.contextmanager
def _parse_errors_in_one_line():
    """While tyro parses: a command line tyro rejects raises :class:`UsageError` (one line naming
    the ``--help`` to read) instead of tyro's boxed message, and a config's own check failing (its
    ``__post_init__`` raising a ValueError of ours, e.g. ``--temperature 0``) leaves tyro as that
    error; :func:`run` prints either in one line.

    tyro reports a rejected command line through its (private, versioned) parse-error hook, called
    just before it prints its box; a tyro without the hook, or an event this code does not know,
    keeps tyro's own message.
    """
    try:
        from tyro import _errors as tyro_errors

        on_parse_error, failure = tyro_errors.on_parse_error, tyro_errors.InstantiationFailure
    except (ImportError, AttributeError):
        yield
        return

    def one_line(event) -> None:
        if isinstance(event, failure):
            err = sys.exc_info()[1]
            while err is not None and not (isinstance(err, ValueError) and _is_ours(err)):
                err = err.__cause__ or err.__context__
            if err is not None:
                raise err
        try:
            line = _parse_error_line(event, tyro_errors)
        except Exception:  # noqa: BLE001 - a tyro whose events changed: its own message stands
            return
        if line is not None:
            raise UsageError(line) from None

    with on_parse_error(one_line):
        yield


def run(name: str, argv: list[str]) -> int:
    """Run command ``name`` with ``argv``; returns the exit status.

    Exit status 2: an error of ours, printed in one line (``--debug``: with its traceback), e.g. a
    bad value or a missing file; 1: an unexpected error (its traceback is printed); 130: Ctrl-C.
    """
    debug, argv = pop_flag(argv, "--debug")
    no_cache, argv = pop_flag(argv, "--no-compile-cache")
    prog = f"klq {name}"
    quiet_library_logs()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        if not no_cache and not any(a in ("-h", "--help") for a in argv):
            enable_compile_cache()
        with _parse_errors_in_one_line():
            rc = module.main(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt as err:
        if debug:
            raise
        advice = str(err) if isinstance(err, Interrupted) else INTERRUPT_ADVICE.get(name, "")
        print(f"{prog}: interrupted" + (f"; {advice}" if advice else ""), file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, BrokenPipeError) and _stdout_closed():
            raise
        if debug or not _is_ours(err):
            traceback.print_exc()
            if not debug:
                print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        hint = "" if isinstance(err, UsageError) else " (--debug shows the traceback)"
        print(f"{prog}: error: {_one_line(err)}{hint}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


_STDOUT_GONE = []  # [True] once the reader of stdout has gone and stdout writes to /dev/null


def _stdout_closed() -> bool:
    """Whether the reader of stdout has gone (``klq ... | head -1``); if so stdout now writes to
    ``/dev/null``, so that Python's final flush at exit does not fail once more."""
    if _STDOUT_GONE:
        return True
    try:
        fd = sys.stdout.fileno()
        sys.stdout.flush()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))  # a pipe without reader
    except BrokenPipeError:
        gone = True
    except (OSError, ValueError, AttributeError):  # stdout closed or replaced: nothing to flush
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        _STDOUT_GONE.append(True)
    return gone


# The exit status after the reader of stdout went away (128 + SIGPIPE, what a shell reports for
# a Unix tool stopped by a closed pipe); 0 when what was printed was the help the user asked for.
EXIT_STDOUT_CLOSED = 141


def main(argv: list[str] | None = None) -> int:
    """``klq COMMAND ARGS``; returns the exit status.

    A reader of stdout that goes away (``klq demo --help | head -1``) stops the command quietly,
    as any Unix tool: no message, status 0 after help, else :data:`EXIT_STDOUT_CLOSED` (an error's
    own status stays).
    """
    if argv is None:
        _a_klq_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    closed_rc = 0 if not argv or any(a in ("-h", "--help") for a in argv) else EXIT_STDOUT_CLOSED
    try:
        rc = _main(argv)
    except SystemExit as exit_:
        if _stdout_closed() and not exit_.code:
            exit_.code = closed_rc
        raise
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return closed_rc
    return closed_rc if _stdout_closed() and not rc else rc


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"klq: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run(name, rest)


def _a_klq_process() -> None:
    """Settings for a process that is one klq command (the console scripts, ``python -m
    experiments``), not for a caller of :func:`main` or :func:`run` in its own process.

    No klq command uses transformers' PyTorch models (only its tokenizers, configs and files): its
    first import skips torch's (:func:`klq_jax.without_torch.transformers_without_torch`), seconds
    of every run's start or export and of every conversion where torch is installed. And glibc
    keeps freed memory for reuse (:func:`klq_jax.hostmem.retain_freed_memory`, before JAX starts):
    XLA:CPU's runs no longer fault their buffers in afresh, 3-5 % of a CPU update. And a failed
    checkpoint write is one line, not a hundred (:func:`quiet_unraisable`).
    """
    hostmem.retain_freed_memory()
    without_torch.transformers_without_torch()
    sys.unraisablehook = quiet_unraisable


def quiet_unraisable(unraisable) -> None:
    """``sys.unraisablehook`` of a klq process: drops asyncio's "Event loop is closed", passes the rest on.

    When an asynchronous checkpoint write fails (the directory removed or unwritable mid-save),
    orbax's worker threads keep scheduling callbacks on the event loop its failed save closed, and
    each prints that RuntimeError as "Exception ignored in ..." with its traceback (about ninety)
    before the save's one-line :class:`klq_jax.errors.CheckpointError`, which says what happened."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def klq_convert() -> int:
    """The ``klq-convert`` script: the same as ``klq convert``."""
    _a_klq_process()
    return main(["convert", *sys.argv[1:]])


if __name__ == "__main__":  # python -m experiments.cli: run the importable module, not this __main__
    from experiments import cli as _cli  # copy (its error classes would not be the ones raised)

    sys.exit(_cli.main())
