"""The data-parallel rollout (issue 13): on a data 4 × fsdp 2 mesh of 8 simulated CPU devices every
device samples and scores only its own B/8 rows, and the rollout, targets and a full iteration
equal the single-device ones."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import presets, tasks
from klq_jax import algorithms, rollout, sharding, train
from klq_jax.models import critic as critic_lib
from klq_jax.models import gpt_neox
from klq_jax.models.load import load_model
from klq_jax.rewards import make_rm_reward_fn, programmatic_reward
from klq_jax.sampling import SamplingConfig
from klq_jax.types import DeviceReward, Rollout
from tests.helpers import testing

B, TQ, T_MAX = 16, 6, 5


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    testing.tiny_hf_gpt_neox_reward(d, seed=5, vocab_size=64)
    return d


def _mesh8():
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    return sharding.make_mesh(4, 2, 1, devices=jax.devices()[:8])


def _assert_batch_sharded(tree, rows: int, n_dev: int):
    """Every array of ``tree``: each device holds exactly ``rows / n_dev`` distinct rows."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shards = x.addressable_shards
        assert len(shards) == n_dev, (jax.tree_util.keystr(path), len(shards))
        starts = set()
        for s in shards:
            assert s.data.shape[0] == rows // n_dev, (jax.tree_util.keystr(path), s.data.shape)
            starts.add(s.index[0].start or 0)
        assert len(starts) == n_dev, (jax.tree_util.keystr(path), sorted(starts))  # no duplicate rows


def _close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "iub":
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_rollout_is_batch_sharded_and_equals_single_device(rm_dir):
    """Policy with a separate critic, a reward model scored on device, micro-batched scoring:
    tokens, log-probs, values, rewards and both algorithms' targets equal the one-device rollout."""
    key = jax.random.key(0)
    cfg = gpt_neox.GPTNeoXConfig.tiny(vocab_size=64)
    gd, params = gpt_neox.init(cfg, key)
    _, rm_gd, rm_params = load_model(str(rm_dir), key=key)
    pol_gd, pol_params = critic_lib.with_critic_from_reward_model(gd, params, rm_gd, rm_params)
    reward = make_rm_reward_fn(rm_gd, rm_params, micro_batch_size=4)
    assert isinstance(reward, DeviceReward)
    rng = np.random.default_rng(0)
    p_ids, p_mask = testing.make_left_padded_batch(rng, B, TQ, 64, rng.integers(1, TQ + 1, B))
    sc = SamplingConfig(max_new_tokens=T_MAX, temperature=0.9, stop_token_ids=(3,))
    klq, ppo = algorithms.AlgoConfig(name="klq"), algorithms.AlgoConfig(name="ppo")

    def finish(ro: Rollout):
        b = ro.to_batch()
        return (algorithms.KLQ.targets(klq, b).targets, algorithms.PPO.targets(ppo, b),
                rollout.rollout_metrics(ro, 0.05))

    run = functools.partial(rollout.make_rollout, omega=1.0, micro_batch_size=4, finish=finish)
    single, single_out = run(pol_gd, pol_params, gd, params, reward, p_ids, p_mask, key, sc)

    mesh = _mesh8()
    put = lambda p: jax.device_put(p, sharding.param_shardings(p, mesh))  # noqa: E731
    sh_pol, sh_ref, sh_rm = put(pol_params), put(params), put(rm_params)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree_util.tree_leaves(sh_pol))
    reward_sh = make_rm_reward_fn(rm_gd, sh_rm, micro_batch_size=4)
    ro, out = run(pol_gd, sh_pol, gd, sh_ref, reward_sh, p_ids, p_mask, key, sc, mesh=mesh)

    _assert_batch_sharded(ro, B, 8)
    klq_targets, ppo_batch, metrics = out
    _assert_batch_sharded((klq_targets, ppo_batch), B, 8)
    assert ro.values is not None and float(np.abs(np.asarray(ro.rewards)).sum()) > 0
    assert 0 < float(np.asarray(ro.response_mask).sum()) < B * T_MAX  # some rows stopped early
    _close(ro, single)
    _close(out, single_out)
    # The parameters kept their shardings (FSDP gathers weights inside, never the batch).
    same = jax.tree_util.tree_map(lambda a, b: a.sharding == b.sharding, sh_pol, sh_pol)
    assert all(jax.tree_util.tree_leaves(same))


def test_host_reward_gets_this_process_rows_and_matches(rm_dir):
    """A host-side reward_fn (the cross-tokenizer path) sees numpy rows; the result is sharded."""
    key = jax.random.key(1)
    cfg = gpt_neox.GPTNeoXConfig.tiny(vocab_size=64, value_head=True)
    gd, params = gpt_neox.init(cfg, key)
    seen = []

    def host_reward(pi, pm, ri, rm):
        seen.append(type(ri))
        return (np.asarray(ri) % 5 == 1).astype(np.float32).mean(-1)

    rng = np.random.default_rng(2)
    p_ids, p_mask = testing.make_left_padded_batch(rng, B, TQ, 64, rng.integers(1, TQ + 1, B))
    sc = SamplingConfig(max_new_tokens=T_MAX, stop_token_ids=(3,))
    single = rollout.make_rollout(gd, params, gd, params, host_reward, p_ids, p_mask, key, sc)
    mesh = _mesh8()
    sh = jax.device_put(params, sharding.param_shardings(params, mesh))
    ro = rollout.make_rollout(gd, sh, gd, sh, host_reward, p_ids, p_mask, key, sc, mesh=mesh)
    _assert_batch_sharded(ro, B, 8)
    _close(ro, single)
    assert seen == [np.ndarray, np.ndarray]


def _tiny_cfg(algo: str, out_dir, **kw) -> train.TrainConfig:
    cfg = presets.get(f"tiny-{algo}")
    return dataclasses.replace(
        cfg, out_dir=str(out_dir), progress=False, tensorboard=False, total_episodes=16,
        rollouts_per_batch=16, minibatch_size=8, micro_batch_size=8, save_every=100,
        optim=train.OptimConfig(learning_rate=1e-3, schedule="constant", eps=1e-3), **kw)


def test_ppo_with_separate_critic_iteration_equals_single_device(tmp_path, rm_dir):
    """One full PPO iteration (policy + a critic from the reward model) on 4×2 equals one device."""
    results = {}
    for name, mesh in {"single": sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                       "mesh": _mesh8()}.items():
        cfg = _tiny_cfg("ppo", tmp_path / name)
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, critic=str(rm_dir)))
        exp = tasks.build_experiment(cfg.task, batch_size=16, seed=cfg.seed, mesh=mesh)
        res = train.train(cfg, exp, mesh=mesh)
        results[name] = (nnx.to_pure_dict(jax.device_get(res.state.params)), res.history)
    (p1, h1), (p2, h2) = results["single"], results["mesh"]
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), p1, p2)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    assert "critic" in p1
    for k in ("score", "kl", "entropy", "train/loss", "train/value_loss"):
        if k in h1[0]:
            assert h1[0][k] == pytest.approx(h2[0][k], abs=1e-5), k


@pytest.mark.parametrize("logp_from_sampler", [False, True])
def test_compiled_rollout_gathers_weights_never_the_batch(logp_from_sampler):
    """In the compiled rollout on 4×2, the only all-gathers are of weights (parameter shapes), no
    all-to-all moves rows between devices, and the only all-reduce is the decode loop's
    "every row has stopped" flag: each device decodes only its own rows."""
    import re

    cfg = gpt_neox.GPTNeoXConfig.tiny(vocab_size=64, value_head=True)
    gd, params = gpt_neox.init(cfg, jax.random.key(0))
    mesh = _mesh8()
    sh = jax.device_put(params, sharding.param_shardings(params, mesh))
    rng = np.random.default_rng(0)
    p_ids, p_mask = testing.make_left_padded_batch(rng, B, TQ, 64, rng.integers(1, TQ + 1, B))
    p_ids, p_mask = sharding.shard_batch((p_ids, p_mask), mesh)
    rollout_reward = programmatic_reward("length")
    hlo = rollout._rollout_on_device.lower(
        gd, sh, gd, sh, rollout_reward, p_ids, p_mask, jax.random.key(0), np.float32(1.0),
        config=SamplingConfig(max_new_tokens=T_MAX, stop_token_ids=(3,)), micro_batch_size=None,
        mesh=mesh, logp_from_sampler=logp_from_sampler, finish=None,
    ).compile().as_text()
    param_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params)}
    gathered = re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[0-9,]*\} all-gather\(", hlo)
    assert gathered, "FSDP weights are gathered"
    for dims in gathered:
        shape = tuple(int(d) for d in dims.split(","))
        assert shape in param_shapes or shape[::-1] in param_shapes or any(
            sorted(shape) == sorted(p) for p in param_shapes), shape
    assert " all-to-all(" not in hlo
    reduced = re.findall(r"= ([a-z0-9]+\[[0-9,]*\])\{?[0-9,]*\}? all-reduce\(", hlo)
    assert all(r.endswith("[]") for r in reduced), reduced


def _assert_on_mesh(params, mesh, what):
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves
    for x in leaves:
        assert len(x.sharding.device_set) == mesh.size, (what, x.shape, x.sharding)
    assert any("fsdp" in str(x.sharding.spec) for x in leaves), what  # really split, not replicated


def test_models_are_created_sharded(tmp_path, rm_dir):
    """random: policy, the critic and both reward-model kinds land on every mesh device, split
    per the rules table (no parameter has a single-device sharding)."""
    import transformers
    from experiments.tasks import TaskConfig, load_reward_model
    from klq_jax.models.load import attach_critic

    mesh = _mesh8()
    key = jax.random.key(0)
    _, gd, params = load_model("random:tiny", key=key, value_head=True, mesh=mesh)
    _assert_on_mesh(params, mesh, "random:tiny")
    crit_gd, crit_params, _, ref_params = attach_critic(gd, params, str(rm_dir), key=key, mesh=mesh)
    _assert_on_mesh(crit_params, mesh, "policy+critic")
    _assert_on_mesh(ref_params, mesh, "reference")
    arch, _, _, neox_rm = load_reward_model(TaskConfig(kind="tldr", reward_model=str(rm_dir)), mesh=mesh)
    assert arch == "GPTNeoXForSequenceClassification"
    _assert_on_mesh(neox_rm, mesh, "GPT-NeoX reward model")
    gpt2_dir = tmp_path / "gpt2_rm"
    transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=0,
    )).save_pretrained(gpt2_dir)
    arch, _, _, gpt2_rm = load_reward_model(TaskConfig(kind="hh", reward_model=str(gpt2_dir)), mesh=mesh)
    assert arch == "GPT2ForSequenceClassification"
    _assert_on_mesh(gpt2_rm, mesh, "GPT-2 reward model")
    # The same random policy built on one device has the same values.
    _, _, single = load_model("random:tiny", key=key, value_head=True)
    _close(nnx.to_pure_dict(params), nnx.to_pure_dict(single), atol=1e-7)  # jit vs eager: 1 ulp


def test_replicated_by_size_names_what_a_mesh_axis_does_not_divide():
    """Vocab 63, 6 query / 2 KV heads over tensor=4 (hand-counted): the embedding, q/out (6 % 4)
    and k/v (2 % 4) kernels stay whole along `tensor`; the MLP (48 % 4 == 0) and everything over
    fsdp=2 (hidden 48) split. The placed arrays agree: each listed one is whole on a device."""
    from klq_jax.models import llama

    cfg = llama.LlamaConfig.tiny(vocab_size=63, hidden_size=48, num_heads=6, num_kv_heads=2, num_layers=1)
    mesh = sharding.make_mesh(1, 2, 4, devices=jax.devices()[:8])
    _, params = sharding.build_sharded(llama.init, cfg, jax.random.key(0), mesh=mesh)
    found = sharding.replicated_by_size(params, mesh)
    assert {(n, axis, k, size) for n, _, axis, k, size in found} == {
        ("embed_in", "tensor", 4, 63),
        ("layers.0.attention.q_kernel", "tensor", 4, 6), ("layers.0.attention.out_kernel", "tensor", 4, 6),
        ("layers.0.attention.k_kernel", "tensor", 4, 2), ("layers.0.attention.v_kernel", "tensor", 4, 2),
    }
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(params)}
    for name, shape, _, _, size in found:  # the dim of that size is whole in every shard
        d = shape.index(size)
        assert flat[name].shape == shape and flat[name].sharding.shard_shape(shape)[d] == size
    assert flat["layers.0.mlp.up_kernel"].sharding.shard_shape((48, 48)) == (24, 12)
    note = sharding.replication_note(params, mesh)
    assert "\n" not in note and "embed_in [63, 48] (dim 63 over tensor=4)" in note
    assert "layers.*.attention.k_kernel [48, 2, 8] (dim 2 over tensor=4)" in note
    assert sharding.replication_note(params, sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])) is None
