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
from klq_jax import errors, sharding, train
from experiments.demo import DemoConfig
from experiments.config import TaskConfig
from klq_jax.config import AlgoConfig, MeshConfig, OptimConfig, TrainConfig
from tests.helpers import testing


def _klq(*args, cwd, devices=1):
    env = dict(os.environ, **testing.cpu_env(devices))
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
    env = dict(os.environ, **testing.cpu_env(8),
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
    (lambda: AlgoConfig(gamma=float("nan")), "gamma=nan must be in [0, 1]"),
    (lambda: AlgoConfig(vf_coef=float("nan")), "vf_coef=nan must be a finite number >= 0"),
    (lambda: AlgoConfig(value_clip=float("inf")), "value_clip=inf must be a finite number > 0 or None"),
    (lambda: OptimConfig(b2=float("nan")), "b2=nan must be in [0, 1)"),
    (lambda: OptimConfig(eps=float("inf")), "eps=inf must be a finite number > 0"),
    (lambda: OptimConfig(weight_decay=float("inf")), "weight_decay=inf must be a finite number >= 0"),
    (lambda: OptimConfig(end_lr_fraction=float("nan")), "end_lr_fraction=nan must be in [0, 1]"),
])
def test_nan_and_infinity_are_refused_by_name(make, message):
    # NaN compares False with everything: a check written as `x < 0` let it through to iteration 1.
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("make, message", [
    # Each trained silently with nonsense before (newcomer 3, finding 2).
    (lambda: OptimConfig(b1=1.5), "Invalid OptimConfig: b1=1.5 must be in [0, 1)"),
    (lambda: OptimConfig(b1=1.0), "b1=1.0 must be in [0, 1)"),  # Adam's bias correction: 1 - b1^t = 0
    (lambda: OptimConfig(b2=2.0), "b2=2.0 must be in [0, 1)"),
    (lambda: OptimConfig(eps=-1.0), "eps=-1.0 must be a finite number > 0"),
    (lambda: OptimConfig(eps=0.0), "eps=0.0 must be a finite number > 0"),  # 0/0 where a gradient is 0
    (lambda: OptimConfig(weight_decay=-5.0), "weight_decay=-5.0 must be a finite number >= 0"),
    (lambda: OptimConfig(end_lr_fraction=5.0), "end_lr_fraction=5.0 must be in [0, 1]"),
    (lambda: OptimConfig(warmup_steps=-3), "warmup_steps=-3 must be an integer >= 0"),
    (lambda: OptimConfig(schedule="step"), "schedule='step' must be 'linear', 'cosine' or 'constant'"),
    (lambda: AlgoConfig(vf_coef=-1.0), "Invalid AlgoConfig: vf_coef=-1.0 must be a finite number >= 0"),
    (lambda: AlgoConfig(value_clip=-0.2), "value_clip=-0.2 must be a finite number > 0 or None"),
    (lambda: AlgoConfig(name="klq", tau=0.0), "tau=0.0 must be a finite number > 0 (KLQ's Q = tau*log(pi/pi_b) "
                                              "+ V gives the policy no gradient at tau = 0; for no KL penalty "
                                              "use name='ppo' with tau=0)"),
    (lambda: TrainConfig(log_samples_every=-1), "log_samples_every=-1 must be an integer >= 0 (0: never)"),
    (lambda: TrainConfig(num_logged_samples=-1), "num_logged_samples=-1 must be an integer >= 0"),
    (lambda: TrainConfig(score_micro_batch_size=0), "score_micro_batch_size=0 must be an integer >= 1 or None"),
    (lambda: TrainConfig(seed=-1), "seed=-1 must be an integer in [0, 9223372036854775808)"),
    (lambda: TrainConfig(eval_seed=2**64), "eval_seed=18446744073709551616 must be an integer in [0, "),
    (lambda: MeshConfig(fsdp=0), "Invalid MeshConfig: fsdp=0 must be an integer >= 1"),
    (lambda: MeshConfig(data=0), "data=0 must be an integer >= 1 (or -1: every remaining device)"),
    (lambda: TaskConfig(target_token=-1), "Invalid TaskConfig: target_token=-1 must be an integer >= 0"),
    (lambda: TaskConfig(reward="low_tokens", target_token=1), "target_token=1 must be an integer >= 2 (the "
                                                             "low_tokens reward counts the ids in [1, target_token))"),
    (lambda: TaskConfig(stop_token_id=-1), "stop_token_id=-1 must be an integer >= 0"),
    (lambda: DemoConfig(seed=-1), "seed=-1 must be an integer in [0, "),
])
def test_out_of_range_settings_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_every_bad_field_is_named_in_one_error_and_the_edges_are_accepted():
    with pytest.raises(ValueError) as err:
        OptimConfig(b1=1.5, b2=2.0, eps=-1.0, weight_decay=-5.0, end_lr_fraction=5.0, warmup_steps=-3)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("Invalid OptimConfig: ")
    for field in ("b1=1.5", "b2=2.0", "eps=-1.0", "weight_decay=-5.0", "end_lr_fraction=5.0", "warmup_steps=-3"):
        assert msg.count(field) == 1, (field, msg)
    # The ends of each range that are allowed (a constant schedule is end_lr_fraction=1).
    OptimConfig(b1=0.0, b2=0.0, eps=1e-30, weight_decay=0.0, end_lr_fraction=1.0, warmup_steps=0)
    AlgoConfig(vf_coef=0.0, value_clip=None)
    assert AlgoConfig(name="ppo", tau=0.0).tau == 0.0  # PPO without a KL penalty is meaningful
    assert AlgoConfig(name="klq", tau=1e-6).tau == 1e-6
    TrainConfig(log_samples_every=0, num_logged_samples=0, seed=0, eval_seed=2**63 - 1)
    TaskConfig(reward="length", target_token=-1)  # the length reward has no target token
    MeshConfig(data=-1)


def test_a_target_token_outside_the_vocabulary_is_refused_before_the_run_directory(tmp_path):
    from experiments import train as train_cmd

    for reward, bad, message in (
            ("target_token", 64, "must be a token id of the policy, in [0, vocab_size=64) (the target_token "
                                 "reward; set --task.target-token)"),
            ("low_tokens", 65, "must be at most vocab_size=64 (the low_tokens reward counts the ids below it; "
                               "set --task.target-token)")):
        cfg = presets.get("tiny-klq")
        cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), progress=False,
                                  task=dataclasses.replace(cfg.task, reward=reward, target_token=bad))
        with pytest.raises(ValueError, match=re.escape(
                f"Invalid TaskConfig for the policy random:tiny: target_token={bad} {message}")):
            train_cmd.run(cfg, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        assert not (tmp_path / "run").exists()
    # The largest settings allowed: the last id (target_token), every id counted as low (low_tokens).
    for reward, good in (("target_token", 63), ("low_tokens", 64)):
        task = dataclasses.replace(cfg.task, reward=reward, target_token=good)
        assert tasks.build_experiment(task, batch_size=8, seed=0).reward_fn is not None


def test_fewer_prompts_than_a_batch_names_the_command_line_settings(tmp_path):
    """``--task.num-prompts 1`` used to advise ``drop_last=False``, which no flag sets."""
    from experiments import train as train_cmd

    cfg = presets.get("tiny-klq")
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), progress=False,
                              task=dataclasses.replace(cfg.task, num_prompts=1))
    with pytest.raises(errors.ConfigError) as info:
        train_cmd.run(cfg, mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert str(info.value) == (
        f"The task has 1 training prompt, fewer than one batch of {cfg.rollouts_per_batch} rollouts: lower "
        "--rollouts-per-batch (--minibatch-size and --micro-batch-size must divide it), or raise "
        "--task.num-prompts.")
    assert not (tmp_path / "run").exists()
    exp = tasks.build_experiment(dataclasses.replace(cfg.task, num_prompts=8), batch_size=8, seed=0)
    assert exp.prompts.num_rows == 8  # exactly one batch is enough
