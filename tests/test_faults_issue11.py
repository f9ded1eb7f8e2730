"""Issue 11, faults 3-5: the ω penalty, the optimiser defaults (clipping, LR unit, whitening) and
the exact evaluator's temperature. Each test asserts the right value against an independent
computation (plain numpy / a separate code path). Faults 1 and 2: test_load_dtype.py,
test_sampling_top_p.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import presets
from klq_jax import evaluate, rollout, train
from tests.helpers import tabular
from klq_jax.algorithms import AlgoConfig
from klq_jax.models import gpt_neox
from klq_jax.returns import ppo_targets, whiten_advantages
from klq_jax.sampling import SamplingConfig, sample

# ------------------------------------------------------------------------------------------
# Fault 3: ω penalises "no stop token" (TRL's missing_eos_penalty), not 1[T = T_max]
# ------------------------------------------------------------------------------------------

T_MAX = 4


@pytest.fixture(scope="module")
def tiny_policy():
    return gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))


def test_omega_penalises_no_stop_token_not_t_max(tiny_policy):
    gd, p = tiny_policy
    rng = np.random.RandomState(0)
    prompts = jnp.asarray(rng.randint(1, 64, size=(16, 3)), jnp.int32)
    pmask = jnp.ones((16, 3), jnp.float32)
    free = np.asarray(sample(gd, p, prompts, pmask, jax.random.key(1),
                             SamplingConfig(max_new_tokens=T_MAX, greedy=True, stop_token_ids=())).tokens)
    # A stop token that some row emits for the first time exactly at its T_max-th token.
    row, eos = next((i, int(r[-1])) for i, r in enumerate(free) if r[-1] not in r[:-1])
    cfg = SamplingConfig(max_new_tokens=T_MAX, greedy=True, stop_token_ids=(eos,))
    ro = rollout.make_rollout(gd, p, gd, p, lambda pi, pm, ri, rm: jnp.full((16,), 2.0), prompts, pmask,
                              jax.random.key(1), cfg, omega=1.0)
    R = np.asarray(ro.rewards).sum(1)
    # Independent: a row is penalised iff its (greedy, unstopped) tokens never contain the stop token.
    expected = np.where([(r == eos).any() for r in free], 2.0, 1.0)
    np.testing.assert_array_equal(R, expected)
    assert np.asarray(ro.response_mask)[row].sum() == T_MAX and R[row] == 2.0  # T = T_max, EOS: no ω


def test_empty_stop_tokens_with_omega_is_an_error(tiny_policy):
    gd, p = tiny_policy
    args = (gd, p, gd, p, lambda pi, pm, ri, rm: rm.sum(-1), jnp.array([[1, 2]]), jnp.array([[1, 1]]),
            jax.random.key(0), SamplingConfig(max_new_tokens=2, stop_token_ids=()))
    with pytest.raises(ValueError, match="stop_token_ids=\\(\\) names none"):
        rollout.make_rollout(*args, omega=1.0)
    ro = rollout.make_rollout(*args, omega=0.0)  # defined: no penalty without a stop token
    assert float(ro.rewards.sum()) == 2.0
    with pytest.raises(ValueError, match="omega=-1.0 must be a finite number >= 0"):
        rollout.make_rollout(*args, omega=-1.0)


def test_enumerator_and_tabular_mdp_use_the_same_penalty():
    r, m, truncated = evaluate.enumerate_responses(3, eos_id=0, t_max=2)
    for resp, mask, tr in zip(r, m, truncated):
        ends_in_eos = resp[int(mask.sum()) - 1] == 0
        assert tr == (not ends_in_eos)  # [1, 0]: T = T_max with EOS, not truncated
    base = tabular.make_tree_mdp(n_actions=3, eos_id=0, horizon=2, seed=0)
    pen = tabular.make_tree_mdp(n_actions=3, eos_id=0, horizon=2, seed=0, truncation_penalty=0.5)
    diff = base.reward - pen.reward
    last = base.depth == base.horizon - 1
    expected = np.zeros_like(diff)
    expected[last, 1:] = 0.5  # only non-EOS actions at the horizon; EOS at the horizon is free
    np.testing.assert_allclose(diff, expected)


# ------------------------------------------------------------------------------------------
# Fault 4: optimiser defaults
# ------------------------------------------------------------------------------------------


def test_paper_presets_match_trl_optimiser():
    for name in ("tldr-klq", "tldr-ppo", "hh-klq", "hh-ppo"):
        cfg = presets.get(name)
        assert cfg.optim.max_grad_norm is None and cfg.optim.lr_schedule_unit == "iteration"
        assert cfg.algo.whiten_groups == (4 if name.endswith("ppo") else 1)
    assert train.OptimConfig().max_grad_norm == 1.0  # the documented library default


def _numpy_adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    x = 0.0
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


def test_no_clipping_is_plain_adam_and_the_default_clip_is_active():
    grads = [np.array([60.0, 30.0]), np.array([3.0, -5.0])]  # norms 67 and 6, as on a tiny run
    for max_norm, g_seen in ((None, grads), (1.0, [g / max(np.linalg.norm(g), 1.0) for g in grads])):
        opt, _ = train.make_optimizer(train.OptimConfig(learning_rate=0.1, schedule="constant",
                                                        max_grad_norm=max_norm), total_steps=2)
        x = jnp.zeros(2)
        state = opt.init(x)
        for g in grads:
            upd, state = opt.update(jnp.asarray(g, jnp.float32), state, x)
            x = optax.apply_updates(x, upd)
        np.testing.assert_allclose(np.asarray(x), _numpy_adam(g_seen, 0.1), rtol=1e-5)
    clipped = _numpy_adam([g / np.linalg.norm(g) for g in grads], 0.1)
    assert np.abs(clipped - _numpy_adam(grads, 0.1)).max() > 1e-3  # the clip changes the result


def test_lr_schedule_unit():
    cfg = train.OptimConfig(learning_rate=1.0, schedule="linear")
    _, per_step = train.make_optimizer(cfg, total_steps=12, steps_per_iteration=4)
    np.testing.assert_allclose([float(per_step(s)) for s in range(12)], [1 - s / 12 for s in range(12)], rtol=1e-6)
    cfg = train.OptimConfig(learning_rate=1.0, schedule="linear", lr_schedule_unit="iteration")
    _, per_it = train.make_optimizer(cfg, total_steps=12, steps_per_iteration=4)
    # TRL: lr_scheduler.step() at the top of iteration k = 1..3 of 3: lr = 1 - k/3 for its 4 steps.
    np.testing.assert_allclose([float(per_it(s)) for s in range(12)], np.repeat([2 / 3, 1 / 3, 0.0], 4),
                               atol=1e-7)
    with pytest.raises(ValueError, match="lr_schedule_unit"):
        train.OptimConfig(lr_schedule_unit="epoch")


def _numpy_whiten(a, m):
    x = a[m > 0]
    return np.where(m > 0, (a - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0)


def test_whitening_global_and_per_group():
    rng = np.random.RandomState(0)
    adv = rng.randn(8, 5).astype(np.float32) * 3 + np.arange(8)[:, None]  # groups differ in mean
    mask = (rng.rand(8, 5) > 0.3).astype(np.float32)
    mask[:, 0] = 1
    np.testing.assert_allclose(whiten_advantages(adv, mask), _numpy_whiten(adv, mask), rtol=1e-4, atol=1e-5)
    per4 = np.concatenate([_numpy_whiten(adv[i:i + 2], mask[i:i + 2]) for i in range(0, 8, 2)])
    np.testing.assert_allclose(whiten_advantages(adv, mask, groups=4), per4, rtol=1e-4, atol=1e-5)
    assert np.abs(per4 - _numpy_whiten(adv, mask)).max() > 0.1
    z = jnp.zeros((8, 5))
    a_g, _ = ppo_targets(jnp.asarray(adv) * mask, z, z, z, mask, tau=0.0, lam=1.0, whiten_groups=4)
    a_raw, _ = ppo_targets(jnp.asarray(adv) * mask, z, z, z, mask, tau=0.0, lam=1.0, whiten=False)
    np.testing.assert_allclose(a_g, whiten_advantages(a_raw, mask, groups=4), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divide"):
        whiten_advantages(adv, mask, groups=3)
    with pytest.raises(ValueError, match="whiten_groups"):
        train.TrainConfig(algo=AlgoConfig(name="ppo", whiten_groups=5), rollouts_per_batch=8,
                          minibatch_size=8, micro_batch_size=8, total_episodes=8)


# ------------------------------------------------------------------------------------------
# Fault 5: the exact evaluator scores π and π_b at the training temperature
# ------------------------------------------------------------------------------------------


def test_exact_evaluation_defaults_to_the_training_temperature():
    from experiments import synthetic as syn

    lang = syn.SyntheticLanguage()
    task = syn.SyntheticTask(lang, tau=0.2, omega=1.0, temperature=0.7)
    gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(vocab_size=lang.vocab_size), jax.random.key(0))
    logp = task.sequence_logprobs(gd, p)  # default: the task's training temperature 0.7
    # Independent: one forward over prompt + response, log-softmax(logits / 0.7), summed.
    responses, rmask, _ = evaluate.enumerate_responses(lang.vocab_size, syn.EOS_ID, lang.t_max, syn.PAD_ID)
    p_ids, p_mask = lang.prompt_arrays()
    pick = np.array([0, 1, 777, len(responses) - 1])
    for temperature in (0.7, 1.0):
        lp, _ = rollout.response_logprobs(gd, p, jnp.repeat(p_ids[:1], len(pick), 0),
                                          jnp.repeat(p_mask[:1], len(pick), 0), responses[pick],
                                          rmask[pick], temperature=temperature)
        direct = np.asarray((lp * rmask[pick]).sum(1), np.float64)
        if temperature == 0.7:
            np.testing.assert_allclose(logp[0, pick], direct, rtol=1e-4, atol=1e-4)
        else:
            assert np.abs(logp[0, pick] - direct).max() > 1e-2  # 1.0 would be another objective
