"""The ``klq`` command: plain-text help without JAX, one-line errors (``--debug``: the traceback),
the compile notice, the persistent compilation cache and the final line of a run."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import cli

# reStructuredText that must not reach a terminal: ``code``, :class:`x` and other roles.
RST = re.compile(r"``|:(class|func|mod|meth|attr|data|exc|obj|ref):`")


def _klq(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("args, needles", [
    (["--help"], ["train", "sweep", "demo", "convert", "--debug"]),
    (["train", "--help"], ["tiny-klq", "tldr-ppo", "--config"]),
    (["train", "tiny-klq", "--help"], ["--algo.tau", "--optim.learning-rate", "--task.policy"]),
    (["demo", "--help"], ["--quick", "--iterations", "--config"]),
    (["convert", "--help"], ["hf-to-flax", "flax-to-hf"]),
    (["sweep", "--help"], ["--taus"]),
])
def test_help_is_plain_text(tmp_path, args, needles):
    out = _klq(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    for needle in needles:
        assert needle in text, (args, needle)
    bad = RST.findall(out.stdout)
    assert not bad, f"RST markup in `klq {' '.join(args)}`: {[m for m in RST.finditer(out.stdout)][:3]}"


@pytest.mark.parametrize("command", [["train", "tiny-klq"], ["demo"], ["convert", "hf-to-flax"]])
def test_help_does_not_import_jax(tmp_path, command):
    code = (
        "import sys\nfrom experiments import cli\n"
        f"try:\n    cli.main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        "print('JAX LOADED:', [m for m in ('jax', 'flax', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "JAX LOADED: []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


def test_installed_klq_script_runs():
    exe = shutil.which("klq") or os.path.join(os.path.dirname(sys.executable), "klq")
    assert os.path.exists(exe), "the klq console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout, out.stderr[-2000:]


def _one_error_line(out, prog: str) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize("args, prog, needle", [
    (["train", "tiny-klq", "--config", "missing.json"], "klq train", "missing.json"),
    (["demo", "--config", "missing.json"], "klq demo", "missing.json"),
    # A ValueError of ours raised once the run starts (the mesh does not fit the devices).
    (["train", "tiny-klq", "--mesh.data", "3", "--out-dir", "run"], "klq train", "devices"),
    (["convert", "hf-to-flax", "no-such-dir", "out"], "klq convert", "no-such-dir"),
    (["sweep", "tiny-klq", "--taus", "0.1", "--out-dir", "sw", "--", "--mesh.data", "3"], "klq sweep", "devices"),
])
def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, args, prog, needle):
    line = _one_error_line(_klq(*args, cwd=tmp_path), prog)
    assert needle in line, line
    debug = _klq(*args, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_which_errors_are_ours():
    from klq_jax.train import NonFiniteError

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            return e

    assert cli._is_ours(raised(lambda: cli.load_config(dict, "/no/such/config.json")))
    assert cli._is_ours(NonFiniteError("Iteration 3: metric 'loss' is nan."))
    assert cli._is_ours(raised(lambda: open("/no/such/file")))  # a file the user named
    # A ValueError raised inside a library (not by our code) is a bug to see in full.
    assert not cli._is_ours(raised(lambda: np.zeros(3).reshape(2, 2)))


def test_no_compile_cache_leaves_jax_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("KLQ_COMPILE_CACHE_DIR", str(tmp_path / "cache"))
    rc = cli.run("train", ["tiny-klq", "--no-compile-cache", "--config", str(tmp_path / "none.json")])
    assert rc == 2 and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert not (tmp_path / "cache").exists()


def test_an_interrupted_train_says_how_to_continue(monkeypatch, tmp_path, capsys):
    """``klq train: interrupted`` (Ctrl-C) used to say nothing of ``--resume``, which continues
    the run from its newest checkpoint; with none written, --resume would fail: start again."""
    from experiments import train as train_cmd

    out = tmp_path / "run"
    written = {}

    def interrupted_run(cfg, **kw):  # the run writes what it wrote, then Ctrl-C arrives
        for rel, text in written.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "run", interrupted_run)
    args = ["tiny-klq", "--no-compile-cache", "--no-progress", "--out-dir", str(out)]
    for files, extra, advice in (
            ({}, [], "nothing was written yet: rerun the same command"),
            ({"metrics.jsonl": '{"iteration": 1}\n'}, [], "no checkpoint was written yet, so there is nothing "
                                                         f"to --resume: rerun with --overwrite to start {out} again"),
            ({"checkpoints/2/meta": "{}", "checkpoints/10/meta": "{}", "checkpoints/12.orbax-checkpoint-tmp/x": ""},
             [], f"rerun with --resume to continue from checkpoint 10 in {out}"),
            ({}, ["--overwrite"], f"rerun with --resume (instead of --overwrite) to continue from checkpoint 10")):
        written = files
        assert cli.run("train", args + extra) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"klq train: interrupted; {advice}"), err


@pytest.mark.parametrize("command", ["sweep", "demo", "judge", "convert"])
def test_every_interrupted_command_says_what_to_do(monkeypatch, capsys, command):
    import importlib

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(cli.COMMANDS[command][0]), "main", interrupted)
    assert cli.run(command, ["--no-compile-cache"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"klq {command}: interrupted; {cli.INTERRUPT_ADVICE[command]}"]
    assert "rerun the same command" in err[0]


def test_a_klq_process_drops_only_the_closed_event_loop_noise(monkeypatch, capsys):
    """A failed asynchronous checkpoint write printed ~90 orbax thread tracebacks of a closed
    event loop before its one-line error; a klq process drops exactly those."""
    import gc

    class RaisesWhenCollected:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", cli.quiet_unraisable)

    def report(exc):  # an exception Python cannot raise: it goes to sys.unraisablehook
        RaisesWhenCollected(exc)
        gc.collect()
        return capsys.readouterr().err

    assert report(RuntimeError("Event loop is closed")) == ""
    assert "ValueError: something else" in report(ValueError("something else"))
    assert "RuntimeError: Event loop is running" in report(RuntimeError("Event loop is running"))


def test_a_compiling_iteration_is_left_out_of_the_eta():
    from tqdm import tqdm

    from klq_jax.train.loop import count_without_timing

    clock = [1000.0]
    bar = tqdm(total=10, disable=False, file=open(os.devnull, "w"), mininterval=0, smoothing=0.3)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    clock[0] += 100.0  # iteration 1 compiles for 100 s
    count_without_timing(bar, 100.0)
    for _ in range(2):  # then 1 s per iteration
        clock[0] += 1.0
        bar.update(1)
    d = bar.format_dict
    assert d["n"] == 3
    assert d["elapsed"] == pytest.approx(2.0)
    rate = d["rate"] or (d["n"] - d["initial"]) / d["elapsed"]
    assert (d["total"] - d["n"]) / rate == pytest.approx(7.0)  # the ETA: 7 more seconds, not ~240
    bar.close()


def test_a_run_says_compiling_caches_programs_and_splits_off_the_omega_penalty(tmp_path):
    """One subprocess run of 2 tiny iterations, saved at each, with the compile cache on."""
    env = dict(os.environ, KLQ_COMPILE_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache every program, however fast
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
    out = _klq("train", "tiny-klq", "--total-episodes", "32", "--save-every", "1", "--out-dir", "run",
               "--no-tensorboard", "--log-samples-every", "0", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr.replace("\r", "\n")
    assert err.count("compiling the sampler, scoring and update step") == 1, err[-3000:]
    assert os.listdir(tmp_path / "cache"), "nothing in the compilation cache"
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 2 iterations") and "ω penalty" in last, last
    # No per-save warnings flood the log: nothing but the bar, the notice and the final line.
    others = [x for x in err.splitlines() if x.strip() and not x.startswith("klq:") and "compiling" not in x]
    assert not others, others[:5]


def test_convert_takes_a_config_file_and_flags_override_it(tmp_path):
    from convert import cli as convert_cli

    path = tmp_path / "convert.json"
    path.write_text('{"src": "a", "dst": "b", "dtype": "bfloat16", "value_head": true}')
    got = convert_cli.parse_args(["hf-to-flax", "x", "y", "--config", str(path), "--seed", "3"])
    assert got == convert_cli.HfToFlax(src="x", dst="y", dtype="bfloat16", value_head=True, seed=3)
    path.write_text('{"src": "a", "dst": "b", "no_such_field": 1}')
    with pytest.raises(ValueError, match="no_such_field"):
        convert_cli.parse_args(["hf-to-flax", "--config", str(path)])


def test_orbax_does_not_warn_at_every_synchronous_save(tmp_path):
    """orbax counts our own wait after a save as "waiting for the previous save" and warns at the
    next save once a write took over a second; the checkpoint module drops that warning."""
    import logging

    import jax.numpy as jnp

    from klq_jax import checkpoint

    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    absl_logger = logging.getLogger("absl")
    handler = Catch(level=logging.WARNING)
    absl_logger.addHandler(handler)
    try:
        ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=3)
        ck.save(1, {"w": jnp.ones(3)}, {"iteration": 1})
        # What a save that took 5 s to write leaves behind (orbax's own bookkeeping of our wait).
        ck.manager._wait_for_prev_save_duration = 5.0
        ck.save(2, {"w": jnp.ones(3)}, {"iteration": 2})
        assert not [m for m in seen if "Waiting for previous save" in m], seen
        absl_logger.removeFilter(checkpoint._SYNC_WAIT_FILTER)  # the check can fail: orbax warns
        ck.manager._wait_for_prev_save_duration = 5.0
        ck.save(3, {"w": jnp.ones(3)}, {"iteration": 3})
        assert [m for m in seen if "Waiting for previous save" in m], seen
        ck.close()
    finally:
        absl_logger.addFilter(checkpoint._SYNC_WAIT_FILTER)
        absl_logger.removeHandler(handler)


def test_config_file_values_are_type_checked_and_partial_files_keep_the_preset(tmp_path):
    """A recorded config with a wrong type is one clear error; a partial one fills from the preset."""
    from experiments import presets
    from experiments import train as train_cmd

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"total_episodes": "many"}))
    with pytest.raises(ValueError, match=r"total_episodes = 'many' must be an int"):
        train_cmd.parse_args(["tiny-klq", "--config", str(bad)])
    bad.write_text(json.dumps({"algo": {"tau": "x"}}))
    with pytest.raises(ValueError, match=rf"^--config {re.escape(str(bad))}: algo.tau = 'x' must be a number$"):
        train_cmd.parse_args(["tiny-klq", "--config", str(bad)])  # the file, then the field (not glued)
    # A list of the wrong length, or a string where a list goes, named by field (it used to be
    # "not enough values to unpack", and "sample" split into letters).
    for data, message in (({"task": {"prompt_length_range": [2]}}, "task.prompt_length_range = [2] must be a "
                                                                   "list of 2 values"),
                          ({"task": {"prompt_length_range": [2, 3, 4]}}, "task.prompt_length_range = [2, 3, 4] "
                                                                         "must be a list of 2 values"),
                          ({"eval_modes": "sample"}, 'eval_modes = "sample" must be a list (e.g. ["sample"])'),
                          ({"eval_modes": ["sample", "x"]}, "eval_modes[1] = 'x' must be one of 'sample', 'greedy'"),
                          ({"task": {"prompt_length_range": [5, 2]}}, "Invalid TaskConfig: prompt_length_range=(5, 2)")):
        bad.write_text(json.dumps(data))
        with pytest.raises(ValueError) as info:
            train_cmd.parse_args(["tiny-klq", "--config", str(bad)])
        assert str(info.value).startswith(f"--config {bad}: {message}"), (data, str(info.value))
    bad.write_text(json.dumps({"eval_modes": ["greedy"], "task": {"prompt_length_range": [3, 9]}}))
    cfg = train_cmd.parse_args(["tiny-klq", "--config", str(bad)])
    assert cfg.eval_modes == ("greedy",) and cfg.task.prompt_length_range == (3, 9)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"epochs": 3, "algo": {"tau": 0.2}}))
    cfg = train_cmd.parse_args(["tiny-klq", "--config", str(partial)])
    tiny = presets.get("tiny-klq")
    assert cfg.epochs == 3 and cfg.algo.tau == 0.2
    assert cfg.rollouts_per_batch == tiny.rollouts_per_batch and cfg.task == tiny.task
    assert cfg.algo.name == tiny.algo.name and cfg.optim == tiny.optim


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "tiny-klq", "--help"],
                                  ["demo", "--help"], ["sweep", "--help"], ["judge", "--help"],
                                  ["convert", "--help"], ["convert", "hf-to-flax", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(tmp_path, args):
    # `klq demo --help | head -1`: the reader has gone before klq writes (its read end closed
    # first, so every write fails, whatever the timing). Like any Unix tool: no message, status 0.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "experiments", *args], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (0, ""), (args, out.returncode, out.stderr[-2000:])


def test_a_closed_stdout_outside_help_stops_with_the_sigpipe_status(monkeypatch):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return fd

    fd = os.open(os.devnull, os.O_WRONLY)
    monkeypatch.setattr(cli, "_STDOUT_GONE", [])
    monkeypatch.setattr(sys, "stdout", Closed())
    monkeypatch.setattr(cli, "_main", lambda argv: print("a line of a run") or 0)
    try:
        assert cli.main(["train", "tiny-klq"]) == cli.EXIT_STDOUT_CLOSED == 141
    finally:
        os.close(fd)


@pytest.mark.parametrize("args, needle", [
    (["train", "tiny-klq", "--total-episodes", "-5"], "total_episodes=-5 must be positive"),
    (["train", "tiny-klq", "--temperature", "0"], "temperature=0.0 must be"),
    (["train", "tiny-klq", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["train", "tiny-klq", "--top-k", "-1"], "top_k=-1 must be an integer >= 0"),
    (["train", "tiny-klq", "--algo.tau", "-1"], "tau=-1.0 must be a finite number >= 0"),
    (["train", "tiny-klq", "--algo.tau", "nan"], "tau=nan must be a finite number >= 0"),  # NaN compares False
    (["train", "tiny-klq", "--optim.learning-rate", "0"], "learning_rate=0.0 must be a finite number > 0"),
    (["train", "tiny-klq", "--optim.b1", "1.5", "--optim.warmup-steps", "-3"],  # every bad field, one line
     "Invalid OptimConfig: warmup_steps=-3 must be an integer >= 0; b1=1.5 must be in [0, 1)"),
    (["train", "tiny-klq", "--task.dtype", "float8"], "dtype='float8'"),
    (["demo", "--tau", "-1"], "tau=-1.0 must be a finite number > 0"),
    (["sweep", "tiny-klq", "--taus", "-1"], "tau=-1.0 must be a finite number >= 0"),
])
def test_config_checks_fail_at_parse_time_in_one_line(tmp_path, args, needle):
    # A config's own check (__post_init__) is an error like any other: one line, status 2, and it
    # comes at parse time, before anything is written.
    out = _klq(*args, cwd=tmp_path)
    line = _one_error_line(out, f"klq {args[0]}")
    assert out.returncode == 2 and needle in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, needles", [
    (["train", "tiny-klq", "--epochs", "abc"], ["bad value for --epochs", "'abc'", "see klq train --help"]),
    (["train", "tiny-klq", "--no-such-flag"], ["unrecognized argument: --no-such-flag", "see klq train --help"]),
    (["train", "tiny-klq", "--epochs"], ["--epochs needs a value", "see klq train tiny-klq --help"]),
    (["train", "--epochs", "abc"], ["name a preset before the options", "tiny-klq", "see klq train --help"]),
    (["train", "no-such-preset"], ["unknown preset 'no-such-preset'", "tiny-klq"]),
    (["train"], ["name one of", "tiny-klq", "see klq train --help"]),
    (["demo", "--seed", "x"], ["bad value for --seed", "'x'", "see klq demo --help"]),
    (["sweep"], ["missing PRESET", "see klq sweep --help"]),
    (["convert"], ["name one of hf-to-flax, flax-to-hf", "see klq convert --help"]),
    (["convert", "hf-to-flax", "a"], ["missing DST", "see klq convert hf-to-flax --help"]),
    (["convert", "hf-to-flax", "a", "b", "--dtype", "int8"],
     ["invalid value 'int8' for --dtype: choose one of float32, bfloat16, float16"]),
])
def test_a_rejected_command_line_is_one_plain_line_naming_the_help(tmp_path, args, needles):
    # tyro's own parse errors (an unknown flag, a value of the wrong type, a missing argument) are
    # one plain line like our errors: no box, no traceback, status 2, and which --help to read.
    out = _klq(*args, cwd=tmp_path)
    line = _one_error_line(out, f"klq {args[0]}")
    assert out.returncode == 2, out.returncode
    for needle in needles:
        assert needle in line, (needle, line)
    assert not re.search("[╭╮╰╯│─]", out.stderr), out.stderr
    assert "--debug" not in line  # nothing to debug in a mistyped command line
    assert os.listdir(tmp_path) == []


def test_library_log_lines_print_once_and_no_torch_notice(tmp_path):
    """orbax's first log call through absl configures the root logger (absl's ``basicConfig``), after
    which huggingface_hub's and datasets' lines, printed by their own handlers and passed on to the
    root, printed twice. And in a venv without torch, importing transformers printed "PyTorch was not
    found..." at every start. Each line now prints once, the notice not at all, real warnings stay."""
    (tmp_path / "probe_cmd.py").write_text(
        "import logging\n"
        "from absl import logging as absl_logging\n"
        "def main(argv):\n"
        "    absl_logging.warning('line of absl')  # what orbax does at a checkpoint save\n"
        "    import datasets, huggingface_hub, transformers\n"
        "    for name in ('huggingface_hub.file_download', 'datasets.load', 'transformers.modeling_utils'):\n"
        "        logging.getLogger(name).warning('line of %s', name)\n"
        "    return 0\n"
    )
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as in a venv without torch\n"
        "from experiments import cli\n"
        "cli.COMMANDS['probe'] = ('probe_cmd', 'a command that logs through each library')\n"
        "sys.exit(cli.main(['probe']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("absl", "huggingface_hub.file_download", "datasets.load", "transformers.modeling_utils"):
        assert out.stderr.count(f"line of {name}") == 1, (name, out.stderr)
    assert "PyTorch was not found" not in out.stderr, out.stderr


def test_a_klq_process_uses_transformers_without_importing_torch(tmp_path):
    """A klq process imports transformers with torch hidden (no klq command uses its PyTorch models;
    importing torch takes seconds): a conversion both ways then imports no torch, writes the same
    files as a process with torch imported, and a pytorch_model.bin is still read (torch.load)."""
    import torch

    from tests.helpers import testing

    model = testing.tiny_hf_gpt_neox(tmp_path / "st", seed=3)
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    code = (
        "import sys\n"
        "if sys.argv[1] == 'torch-first':\n"
        "    import torch\n"
        "from experiments import cli\n"
        "out = sys.argv[2]\n"
        "def klq(*args):\n"
        "    sys.argv = ['klq', 'convert', *args]\n"
        "    assert cli.main() == 0\n"
        "klq('hf-to-flax', 'st', out + '/flax')\n"
        "klq('flax-to-hf', out + '/flax', out + '/hf')\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "klq('hf-to-flax', 'bin', out + '/flax-bin')\n"
    )
    outs = {}
    for how in ("klq-process", "torch-first"):
        out = subprocess.run([sys.executable, "-c", code, how, how], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "PyTorch was not found" not in out.stderr, out.stderr
        outs[how] = out.stdout
    assert "torch imported: False" in outs["klq-process"], outs
    assert "torch imported: True" in outs["torch-first"], outs
    new, ref = tmp_path / "klq-process", tmp_path / "torch-first"
    for d in ("flax", "hf", "flax-bin"):
        assert _snapshot(new / d) == _snapshot(ref / d), d
    assert _snapshot(new / "flax-bin")["params.safetensors"] == _snapshot(new / "flax")["params.safetensors"]
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(_snapshot(new / "hf"))


def _snapshot(d):
    """Each file of ``d``: its bytes, or for a safetensors file (whose header lists its metadata in
    no fixed order) the metadata and each tensor's dtype, shape and bytes."""
    from safetensors import safe_open

    def content(p):
        if p.suffix != ".safetensors":
            return p.read_bytes()
        with safe_open(p, "np") as f:
            tensors = {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).shape, f.get_tensor(k).tobytes()) for k in f.keys()}
            return f.metadata(), tensors

    return {p.relative_to(d).as_posix(): content(p) for p in sorted(d.rglob("*")) if p.is_file()}
