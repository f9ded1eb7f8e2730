"""The trainer: gradient accumulation, sharding, end-to-end KLQ/PPO runs, presets, NaN stops."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import cli, presets, tasks
from experiments import train as train_cmd
from klq_jax import algorithms, sharding, train
from klq_jax.types import Batch
from klq_jax.models.load import load_model
from klq_jax.models import gpt_neox


def _fake_batch(cfg: train.TrainConfig, vocab: int, seed: int = 0) -> Batch:
    """A rollout-shaped batch with random tokens, log-probs, values and rewards."""
    rng = np.random.RandomState(seed)
    n, tq, tr = cfg.rollouts_per_batch, 5, cfg.max_new_tokens
    plen = rng.randint(1, tq + 1, n)
    pmask = (np.arange(tq)[None] >= tq - plen[:, None]).astype(np.float32)
    rlen = rng.randint(1, tr + 1, n)
    rmask = (np.arange(tr)[None] < rlen[:, None]).astype(np.float32)
    rewards = np.where(np.arange(tr)[None] == rlen[:, None] - 1, rng.randn(n, 1), 0.0)
    return Batch(
        prompt_ids=(rng.randint(1, vocab, (n, tq)) * pmask).astype(np.int32),
        prompt_mask=pmask,
        response_ids=(rng.randint(1, vocab, (n, tr)) * rmask).astype(np.int32),
        response_mask=rmask,
        logp=(-rng.rand(n, tr) * 3 * rmask).astype(np.float32),
        ref_logp=(-rng.rand(n, tr) * 3 * rmask).astype(np.float32),
        values=(rng.randn(n, tr) * rmask).astype(np.float32),
        rewards=rewards.astype(np.float32),
    )


def _run_update(cfg, graphdef, params, batch, mesh):
    algo = algorithms.get(cfg.algo.name)
    batch = jax.device_get(algo.targets(cfg.algo, jax.tree_util.tree_map(jnp.asarray, batch)))
    opt, _ = train.make_optimizer(cfg.optim, 10)
    state, sh = train.init_state(params, opt, 0, mesh)
    update = train.jit_update_fn(train.make_update_fn(graphdef, cfg, opt), sh, mesh)
    state, metrics = update(state, sharding.shard_batch(batch, mesh))
    return nnx.to_pure_dict(jax.device_get(state.params)), jax.device_get(metrics)


@pytest.fixture(scope="module")
def tiny_policy():
    cfg = gpt_neox.GPTNeoXConfig.tiny(value_head=True)
    graphdef, params = gpt_neox.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_gradient_accumulation_equals_full_minibatch(tiny_policy, algo):
    cfg_model, graphdef, params = tiny_policy
    base = presets.get(f"tiny-{algo}")
    # Adam's eps is raised above float32 summation noise: the key biases get an exactly-zero true
    # gradient (they cancel in the softmax), and with eps=1e-8 Adam would blow their ~1e-9 rounding
    # noise up to ±lr, whatever the accumulation order.
    base = dataclasses.replace(
        base,
        optim=train.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=None, eps=1e-3),
        rollouts_per_batch=16, minibatch_size=16, epochs=1, max_new_tokens=6,
    )
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = _fake_batch(base, cfg_model.vocab_size)
    full, m_full = _run_update(dataclasses.replace(base, micro_batch_size=16), graphdef, params, batch, mesh)
    acc, m_acc = _run_update(dataclasses.replace(base, micro_batch_size=4), graphdef, params, batch, mesh)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), full, acc)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    assert abs(m_full["loss"] - m_acc["loss"]) <= 1e-5
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), full, nnx.to_pure_dict(params))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the update did something


def _one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _tiny_cfg(algo: str, out_dir, **kw) -> train.TrainConfig:
    cfg = presets.get(f"tiny-{algo}")
    return dataclasses.replace(cfg, out_dir=str(out_dir), progress=False, tensorboard=False, **kw)


def test_sharded_training_matches_single_device(tmp_path):
    """Two full iterations (sample → score → targets → update) on a 4×2 data×FSDP mesh equal one device."""
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    results = {}
    for name, mesh in {
        "single": sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
        "mesh": sharding.make_mesh(4, 2, 1, devices=jax.devices()[:8]),
    }.items():
        cfg = _tiny_cfg("klq", tmp_path / name, total_episodes=32, rollouts_per_batch=16,
                        minibatch_size=8, micro_batch_size=8,
                        optim=train.OptimConfig(learning_rate=1e-3, schedule="constant", eps=1e-3))
        exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
        res = train.train(cfg, exp, mesh=mesh)
        results[name] = (nnx.to_pure_dict(jax.device_get(res.state.params)), res.history)
    (p1, h1), (p2, h2) = results["single"], results["mesh"]
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), p1, p2)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    assert [r["score"] for r in h1] == pytest.approx([r["score"] for r in h2], abs=1e-6)
    # FSDP really shards: some parameter is split over the fsdp axis.
    mesh = sharding.make_mesh(4, 2, 1, devices=jax.devices()[:8])
    sh = sharding.param_shardings(gpt_neox.abstract_params(gpt_neox.GPTNeoXConfig.tiny())[1], mesh)
    specs = [s.spec for s in jax.tree_util.tree_leaves(sh)]
    assert any("fsdp" in str(s) for s in specs)


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_tiny_end_to_end_run_improves_reward(tmp_path, algo):
    cfg = _tiny_cfg(algo, tmp_path, total_episodes=16 * 8, save_every=100)
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    res = train.train(cfg, exp, mesh=_one_device())
    hist = res.history
    assert len(hist) == 8
    for rec in hist:
        for k, v in rec.items():
            assert np.isfinite(v), (k, v)
    first = np.mean([r["score"] for r in hist[:2]])
    last = np.mean([r["score"] for r in hist[-2:]])
    assert last > first + 0.05, (first, last)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["iteration"] for l in lines] == list(range(1, 9))
    assert os.path.isdir(tmp_path / "checkpoints" / "8")  # saved at the end
    # `klq train PRESET --config <the recorded config.json>` gives this run's config back.
    assert train_cmd.parse_args([f"tiny-{algo}", "--config", str(tmp_path / "config.json")]) == cfg
    assert train_cmd.parse_args(["--config", str(tmp_path / "config.json")]) == cfg
    # The final line splits the reward into the score and the ω penalty (ω x share without a stop).
    last_rec = hist[-1]
    penalty = -cfg.omega * last_rec["truncated_frac"]
    assert last_rec["reward"] == pytest.approx(last_rec["score"] + penalty, abs=1e-5)
    assert f"ω penalty {penalty:+.4f}" in train_cmd.summary(cfg, hist)
    # The trained policy is exported as a Hugging Face directory, equal to the final state.
    from klq_jax.models import hf

    _, _, exported = hf.load_hf(tmp_path / "policy", value_head=True)
    same = jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)),
        nnx.to_pure_dict(exported), nnx.to_pure_dict(jax.device_get(res.state.params)),
    )
    assert all(jax.tree_util.tree_leaves(same))
    # ... and transformers loads it, with the trained policy's logits.
    import transformers

    from tests.helpers import testing

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    tokens, mask = testing.make_left_padded_batch(0, 2, 6, back.config.vocab_size, [6, 3])
    ours = np.asarray(gpt_neox.apply(res.graphdef, res.state.params, tokens, mask).logits)
    theirs = testing.hf_forward(back, tokens, mask)
    np.testing.assert_allclose(theirs * mask[..., None], ours * mask[..., None], atol=1e-4, rtol=0)
    assert (tmp_path / "policy" / "generation_config.json").is_file()
    keys = set(hist[0])
    for k in ("score", "kl", "rlhf_reward", "entropy", "response_length", "truncated_frac",
              "train/loss", "lr", "time_rollout", "time_reward", "time_update", "tokens_per_s"):
        assert k in keys
    if algo == "ppo":
        assert "train/clipfrac" in keys and "train/approx_kl" in keys


def test_every_preset_loads_and_validates():
    for name in presets.PRESETS:
        cfg = presets.get(name)
        assert cfg.rollouts_per_batch % cfg.minibatch_size == 0
        assert cfg.num_iterations >= 1
    paper = presets.get("tldr-klq")
    assert (paper.algo.gamma, paper.algo.tau, paper.algo.lam, paper.epochs) == (1.0, 0.05, 0.95, 4)
    assert (paper.rollouts_per_batch, paper.minibatch_size, paper.total_episodes) == (192, 192, 75_000)
    assert paper.max_new_tokens == 53 and paper.optim.learning_rate == 1.41e-5
    ppo = presets.get("tldr-ppo")
    assert (ppo.algo.clip_eps, ppo.algo.value_clip, ppo.algo.vf_coef, ppo.temperature) == (0.2, 0.2, 0.1, 0.7)


def test_cli_overrides_and_clear_errors(capsys):
    cfg = train_cmd.parse_args(["tiny-ppo", "--algo.tau", "0.1", "--total-episodes", "64"])
    assert cfg.algo.tau == 0.1 and cfg.total_episodes == 64 and cfg.algo.name == "ppo"
    with pytest.raises(cli.UsageError) as err:  # `klq` prints it in one line (tests/test_cli.py)
        train_cmd.parse_args(["nope"])
    assert "nope" in str(err.value) and "tiny-klq" in str(err.value)  # the unknown preset and the known ones
    for args, needle in [
        (["--minibatch-size", "5"], "must be a multiple of minibatch_size=5"),
        (["--algo.tau", "-1"], "tau=-1.0 must be a finite number >= 0"),
        (["--no-such-field", "1"], "--no-such-field"),
    ]:
        with pytest.raises(SystemExit) as err:
            train_cmd.parse_args(["tiny-klq", *args])
        assert err.value.code != 0
        out = capsys.readouterr()
        assert needle in " ".join((out.err + out.out).split()), (args, out.err[-500:])


def test_nan_stops_the_run_without_a_checkpoint(tmp_path):
    cfg = _tiny_cfg("klq", tmp_path, total_episodes=16 * 3, save_every=1)
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    good = exp.reward_fn
    calls = {"n": 0}

    def reward_fn(*args):
        calls["n"] += 1
        r = good(*args)
        return r * jnp.nan if calls["n"] >= 2 else r

    exp.reward_fn = reward_fn
    # the advice is one that works: a changed learning rate cannot --resume (the config differs)
    with pytest.raises(train.NonFiniteError, match="Iteration 2: metric .*Lower the learning rate .*"
                                                   "start again .*--resume takes only the same config"):
        train.train(cfg, exp, mesh=_one_device())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_a_non_finite_metric_at_a_tiny_temperature_names_the_temperature():
    """``--temperature 1e-9`` made the KL estimates inf and the error blamed the learning rate."""
    from klq_jax.train import loop

    inf = {"train/kl_k3_mean": float("inf"), "score": 0.5}
    with pytest.raises(train.NonFiniteError) as info:
        loop._check_finite(inf, 1, temperature=1e-9)
    msg = str(info.value)
    assert "metric 'train/kl_k3_mean' is inf" in msg and "\n" not in msg
    assert "At --temperature 1e-09 the log-probabilities are logits / 1e-09" in msg
    assert f"a logit difference of {88.7e-9:.3g} " in msg and "Raise --temperature" in msg
    # exp overflows float32 just past the logit difference named (0.887 at T = 0.01)
    with np.errstate(over="ignore"):
        assert np.isfinite(np.exp(np.float32(0.88 / 0.01))) and not np.isfinite(np.exp(np.float32(0.89 / 0.01)))
    for t in (0.7, loop.LOW_TEMPERATURE, None):  # an ordinary temperature: the learning rate first
        with pytest.raises(train.NonFiniteError, match=r"is inf\. The run was stopped .* Lower the learning "
                                                       r"rate or check the reward") as info:
            loop._check_finite(inf, 1, temperature=t)
        assert "temperature" not in str(info.value)
    loop._check_finite({"score": 0.5}, 1, temperature=1e-9)  # finite: nothing to say


def test_separate_critic_from_a_reward_model(tmp_path):
    """TRL's layout: values come from a separate network initialised from the reward model."""
    from klq_jax import rollout
    from tests.helpers import testing
    from klq_jax.models import critic as critic_lib

    rm_dir = tmp_path / "rm"
    testing.tiny_hf_gpt_neox_reward(rm_dir, vocab_size=64)
    cfg = _tiny_cfg("ppo", tmp_path / "run", total_episodes=16 * 2, save_every=100)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, critic=str(rm_dir)))
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    model = nnx.merge(exp.graphdef, exp.params)
    assert isinstance(model, critic_lib.PolicyWithCritic) and not model.policy.config.value_head
    # Before training, V(s_t) of the critic equals the reward model's score of the prefix s_t.
    rm_cfg, rm_gd, rm_params = load_model(str(rm_dir), key=jax.random.key(0))
    p_ids = jnp.array([[0, 0, 5, 6], [1, 2, 3, 4]])
    p_mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    r_ids = jnp.array([[7, 8, 0], [9, 0, 0]])
    r_mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    _, values = rollout.response_logprobs(exp.graphdef, exp.params, p_ids, p_mask, r_ids, r_mask)
    for t in range(3):
        toks = jnp.concatenate([p_ids, r_ids[:, :t]], 1)
        m = jnp.concatenate([p_mask, r_mask[:, :t]], 1)
        score = gpt_neox.apply(rm_gd, rm_params, toks, m).scores
        np.testing.assert_allclose(values[:, t] * r_mask[:, t], score * r_mask[:, t], atol=1e-5)
    res = train.train(cfg, exp, mesh=_one_device())
    assert all(np.isfinite(r["train/loss"]) for r in res.history)
    trained = nnx.to_pure_dict(jax.device_get(res.state.params))
    start = nnx.to_pure_dict(exp.params)
    assert np.abs(trained["critic"]["value_kernel"] - start["critic"]["value_kernel"]).max() > 0


def test_bfloat16_compute_runs_and_starts_at_zero_kl(tmp_path):
    """bf16 activations/matmuls (the accelerator setting): finite metrics, float32 losses, and KL to
    π_b exactly 0 on the first iteration, where the policy still equals the reference."""
    cfg = _tiny_cfg("klq", tmp_path, total_episodes=16, save_every=100)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, dtype="bfloat16"))
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    assert nnx.merge(exp.graphdef, exp.params).config.dtype == "bfloat16"
    res = train.train(cfg, exp, mesh=_one_device())
    (rec,) = res.history
    assert rec["kl"] == 0.0
    assert all(np.isfinite(v) for v in rec.values())
    leaves = jax.tree_util.tree_leaves(res.state.params)
    assert all(x.dtype == jnp.float32 for x in leaves)  # parameters stay float32


def test_logp_from_sampler_reaches_every_rollout_of_a_run(tmp_path, monkeypatch):
    """TrainConfig.logp_from_sampler: the training rollouts and the validation ones (eval_every)
    take θ_old's log π from the sampler (logp equals the sampler's log-probs on real tokens)."""
    from klq_jax import rollout

    cfg = _tiny_cfg("ppo", tmp_path, total_episodes=16, save_every=100, logp_from_sampler=True, eval_every=1)
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed,
                                 validation_prompts=cfg.eval_prompts)
    seen, real = [], rollout.make_rollout

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        ro = out[0] if isinstance(out, tuple) else out
        real_tokens = np.asarray(ro.response_mask) != 0
        seen.append((np.asarray(ro.logp), np.where(real_tokens, np.asarray(ro.sample_logp), 0.0)))
        return out

    monkeypatch.setattr(rollout, "make_rollout", spy)
    res = train.train(cfg, exp, mesh=_one_device())
    assert len(res.history) == 1 and any(k.startswith("eval/") for k in res.history[0])
    assert len(seen) >= 2  # the training rollout and at least one validation rollout
    for logp, sampler_logp in seen:
        np.testing.assert_array_equal(logp, sampler_logp)
