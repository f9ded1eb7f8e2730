"""Small faults (issue "small"): refused runs leave nothing behind; the sampler and the rollout
refuse out-of-range inputs; presets across device counts. Tiny models only."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import pytest

from experiments import presets, tasks
from klq_jax import sharding, train
from experiments.demo import DemoConfig
from klq_jax.config import AlgoConfig, OptimConfig, TrainConfig
from tests.helpers import testing


def _klq(*args, cwd, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


# ------------------------------------------------------------------------------------------
# A refused run leaves nothing behind
# ------------------------------------------------------------------------------------------


def test_a_stop_token_outside_the_vocabulary_is_refused_before_the_run_directory(tmp_path):
    out = _klq("train", "tiny-klq", "--task.stop-token-id", "99999", "--out-dir", "run", cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("klq train: error: ") and "99999" in lines[0] and "vocab_size=64" in lines[0]
    assert not (tmp_path / "run").exists(), sorted(os.listdir(tmp_path / "run"))


class _FailingPrompts:
    """A prompt iterator that fails at the first batch (after the trainer wrote config.json)."""

    def __next__(self):
        raise RuntimeError("no prompts today")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _tiny(out_dir):
    cfg = dataclasses.replace(presets.get("tiny-klq"), out_dir=str(out_dir), total_episodes=16,
                              progress=False)
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    return cfg, dataclasses.replace(exp, prompts=_FailingPrompts())


def test_a_run_failing_before_any_result_removes_only_a_directory_it_created(tmp_path):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, exp = _tiny(tmp_path / "new" / "run")
    with pytest.raises(RuntimeError, match="no prompts today"):
        train.train(cfg, exp, mesh=mesh)
    assert not (tmp_path / "new" / "run").exists()
    assert (tmp_path / "new").is_dir()  # its parent existed before the run: it stays

    # A directory the user made stays, with what the trainer wrote (config.json, ...).
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(RuntimeError, match="no prompts today"):
        train.train(dataclasses.replace(cfg, out_dir=str(mine)), exp, mesh=mesh)
    assert (mine / "config.json").is_file()

    # One the trainer created but in which something else is now (a user's file): kept.
    from klq_jax.train import run_dir

    run = run_dir.RunDir.open(str(tmp_path / "other"), resume=False, overwrite=False)
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run.created and not run.discard_if_new()
    run.close()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------
# The sampler refuses prompt ids outside the vocabulary (JAX would clamp the gather)
# ------------------------------------------------------------------------------------------


def test_sample_refuses_prompt_ids_outside_the_vocabulary():
    import jax.numpy as jnp

    from klq_jax.models import gpt_neox
    from klq_jax.sampling import SamplingConfig, sample

    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(), jax.random.key(0))  # vocab 64
    mask = jnp.array([[0, 1, 1], [1, 1, 1]])
    scfg = SamplingConfig(max_new_tokens=2, stop_token_ids=())
    for bad in (64, -1, 10_000):
        ids = jnp.array([[0, 5, 6], [7, bad, 9]])
        with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 64\) \(rows \[1\]"):
            sample(gd, p, ids, mask, jax.random.key(1), scfg)
    ok = sample(gd, p, jnp.array([[0, 5, 6], [7, 63, 0]]), mask, jax.random.key(1), scfg)
    assert ok.tokens.shape == (2, 2)


# ------------------------------------------------------------------------------------------
# Batch sizes and device counts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-klq", "tiny-ppo"])
def test_the_tiny_presets_split_over_1_2_4_and_8_devices(name):
    from klq_jax.train.loop import check_batch_sizes

    cfg = presets.get(name)
    for n in (1, 2, 4, 8):
        mesh = sharding.make_mesh(n, 1, 1, devices=jax.devices()[:n])
        check_batch_sizes(cfg, mesh)
        for size in (cfg.rollouts_per_batch, cfg.minibatch_size, cfg.micro_batch_size):
            assert size % n == 0


def test_tiny_klq_starts_on_8_devices_and_a_misfit_names_what_to_set(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               KLQ_PHASE_MARKERS="1")
    cmd = [sys.executable, "-m", "experiments", "train", "tiny-klq", "--out-dir", "run", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:  # past the batch-size checks: the first iteration starts sampling
        testing.wait_for_stderr_line(proc, "klq-phase sample 1")
    finally:
        proc.kill()
        proc.wait()
    out = subprocess.run(cmd + ["--micro-batch-size", "2", "--out-dir", "run2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("klq-phase")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert "micro_batch_size=2 must be a multiple of the 8" in lines[0] and "--micro-batch-size" in lines[0]
    assert not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------------------------
# One set of model-config checks (klq_jax.models.checks) for the four networks
# ------------------------------------------------------------------------------------------


def test_every_model_config_checks_both_dtypes_and_its_sizes_alike():
    from klq_jax.models import distilbert, gpt2, gpt_neox, llama

    configs = {"GPTNeoXConfig": gpt_neox.GPTNeoXConfig.tiny, "LlamaConfig": llama.LlamaConfig.tiny,
               "GPT2Config": gpt2.GPT2Config.tiny, "DistilBertConfig": distilbert.DistilBertConfig.tiny}
    for name, tiny in configs.items():
        for field in ("dtype", "param_dtype"):
            with pytest.raises(ValueError, match=rf"^Invalid {name}: {field}='float8' must be 'float32', "
                                                 r"'bfloat16' or 'float16'$"):
                tiny(**{field: "float8"})
        tiny()  # the tiny sizes are valid
        vocab = "vocab_size"
        with pytest.raises(ValueError, match=rf"^Invalid {name}: {vocab}=0 must be positive"):
            tiny(**{vocab: 0})


@pytest.mark.parametrize("make, message", [
    (lambda: AlgoConfig(tau=float("nan")), "tau=nan must be a finite number >= 0"),
    (lambda: AlgoConfig(clip_eps=float("nan")), "clip_eps=nan must be a finite number > 0"),
    (lambda: OptimConfig(learning_rate=float("inf")), "learning_rate=inf must be a finite number > 0"),
    (lambda: OptimConfig(max_grad_norm=float("nan")), "max_grad_norm=nan must be a finite number > 0"),
    (lambda: TrainConfig(omega=float("inf")), "omega=inf must be a finite number >= 0"),
    (lambda: DemoConfig(tau=float("nan")), "tau=nan must be a finite number > 0"),
    (lambda: DemoConfig(omega=float("nan")), "omega=nan must be a finite number >= 0"),
])
def test_nan_and_infinity_are_refused_by_name(make, message):
    # NaN compares False with everything: a check written as `x < 0` let it through to iteration 1.
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
