"""KLQ λ-return targets and PPO GAE/returns against plain Python loops of Algorithms 1 and 2.

References are written straight from the paper (Appendix B pseudocode, Eq. 7 summed term by term)
in float64 NumPy, one trajectory at a time, looping over the real tokens only (t = T-1 .. 0).
"""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klq_jax.returns as R
from klq_jax.returns import (
    discounted_returns,
    discounted_returns_single,
    gae,
    gae_single,
    kl_shaped_rewards,
    klq_targets,
    klq_targets_single,
    ppo_targets,
    ppo_value_targets,
    whiten_advantages,
)

TOL = dict(rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- references (float64 NumPy) --


def ref_klq_alg2(logp, ref_logp, v, r, T, tau, gamma, lam):
    """Algorithm 2, line by line, on one trajectory of T real tokens (arrays indexed by t)."""
    G = np.zeros(T)
    big_delta_next = 0.0  # Δ_T = 0
    for t in range(T - 1, -1, -1):
        q = tau * (logp[t] - ref_logp[t]) + v[t]
        v_next = v[t + 1] if t + 1 < T else 0.0  # V(s_T) = 0
        delta = r[t] + gamma * v_next - q  # r[t] holds r_{t+1}
        big_delta = delta + lam * gamma * big_delta_next
        G[t] = big_delta + q
        big_delta_next = big_delta
    return G


def ref_klq_eq7(logp, ref_logp, v, r, T, tau, gamma, lam, alpha):
    """Eq. (7) summed explicitly: G_t = α Σ_{k=t}^{T-1} (λγ)^{k-t} δ_k + Q_t, δ from Eq. (14)."""
    q = [tau * (logp[t] - ref_logp[t]) + v[t] for t in range(T)]
    vv = [v[t] for t in range(T)] + [0.0]
    delta = [r[k] + gamma * vv[k + 1] - q[k] for k in range(T)]
    return np.array(
        [alpha * sum((lam * gamma) ** (k - t) * delta[k] for k in range(t, T)) + q[t] for t in range(T)]
    )


def ref_gae_alg1(rbar, v, T, gamma, lam):
    """Algorithm 1's GAE loop on one trajectory (rbar[t] holds r̄_{t+1})."""
    A = np.zeros(T)
    a_next = 0.0
    for t in range(T - 1, -1, -1):
        v_next = v[t + 1] if t + 1 < T else 0.0
        delta = rbar[t] + gamma * v_next - v[t]
        a_next = delta + lam * gamma * a_next
        A[t] = a_next
    return A


def ref_mc(r, T, gamma):
    return np.array([sum(gamma ** (k - t) * r[k] for k in range(t, T)) for t in range(T)])


def pad_to(x, T_max):
    out = np.zeros(T_max)
    out[: len(x)] = x
    return out


def make_batch(seed, B=7, T_max=9, garbage=np.nan):
    """Random trajectories of random lengths (0 and T_max included), garbage in the padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T_max + 1, size=B)
    lengths[0], lengths[1] = 0, T_max
    mask = (np.arange(T_max)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.1, 3.0, size=(B, T_max))
    ref_logp = -rng.uniform(0.1, 3.0, size=(B, T_max))
    values = rng.normal(size=(B, T_max))
    rewards = np.zeros((B, T_max))
    for b, L in enumerate(lengths):
        if L > 0:
            rewards[b, L - 1] = rng.normal() * 2
    arrs = [a.astype(np.float32) for a in (logp, ref_logp, values, rewards)]
    for a in arrs:
        a[mask == 0] = garbage
    return (*arrs, mask, lengths)


# ----------------------------------------------------------------------------- KLQ targets ---


@pytest.mark.parametrize(
    "tau,gamma,lam",
    [(0.05, 1.0, 0.95), (0.3, 0.9, 0.7), (1.0, 1.0, 1.0), (0.1, 0.0, 0.95), (0.1, 0.99, 0.0)],
)
def test_klq_targets_match_algorithm2_loop(tau, gamma, lam):
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=int(100 * tau + 10 * lam))
    G = np.asarray(klq_targets(logp, ref_logp, values, rewards, mask, tau=tau, gamma=gamma, lam=lam))
    assert G.dtype == np.float32 and np.all(np.isfinite(G))
    for b, L in enumerate(lengths):
        f64 = [a[b].astype(np.float64) for a in (logp, ref_logp, values, rewards)]
        want = ref_klq_alg2(*f64, L, tau, gamma, lam)
        np.testing.assert_allclose(G[b, :L], want, **TOL)
        np.testing.assert_array_equal(G[b, L:], 0.0)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_klq_targets_match_eq7_explicit_sum(alpha):
    tau, gamma, lam = 0.2, 0.97, 0.8
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=7)
    G = np.asarray(
        klq_targets(logp, ref_logp, values, rewards, mask, tau=tau, gamma=gamma, lam=lam, alpha=alpha)
    )
    for b, L in enumerate(lengths):
        f64 = [a[b].astype(np.float64) for a in (logp, ref_logp, values, rewards)]
        np.testing.assert_allclose(G[b, :L], ref_klq_eq7(*f64, L, tau, gamma, lam, alpha), **TOL)
        if alpha == 1.0:  # Eq. (7) with α = 1 and Algorithm 2 agree
            np.testing.assert_allclose(G[b, :L], ref_klq_alg2(*f64, L, tau, gamma, lam), **TOL)
        np.testing.assert_array_equal(G[b, L:], 0.0)


def test_klq_lambda_one_is_kl_regularised_return():
    """λ = γ = α = 1: G_t = Σ_{k≥t} r_{k+1} − Σ_{k>t} τ log(π/π_b)(a_k|s_k), for any V."""
    tau = 0.37
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=11)
    G = np.asarray(klq_targets(logp, ref_logp, values, rewards, mask, tau=tau, gamma=1.0, lam=1.0))
    for b, L in enumerate(lengths):
        lr = logp[b].astype(np.float64) - ref_logp[b]
        r = rewards[b].astype(np.float64)
        want = [sum(r[t:L]) - tau * sum(lr[t + 1 : L]) for t in range(L)]
        np.testing.assert_allclose(G[b, :L], want, **TOL)


def test_klq_gamma_zero_and_lambda_zero_one_step():
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=3)
    # γ = 0: G_t = α (r_{t+1} − Q_t) + Q_t; with α = 1 that is r_{t+1}.
    G0 = np.asarray(klq_targets(logp, ref_logp, values, rewards, mask, tau=0.1, gamma=0.0))
    np.testing.assert_allclose(G0, np.where(mask > 0, rewards, 0.0), **TOL)
    # λ = 0: the one-step target r_{t+1} + γ V(s_{t+1}) with V(s_T) = 0.
    G1 = np.asarray(klq_targets(logp, ref_logp, values, rewards, mask, tau=0.1, gamma=0.9, lam=0.0))
    for b, L in enumerate(lengths):
        v_next = np.append(values[b, 1:L], 0.0) if L > 0 else np.zeros(0)
        np.testing.assert_allclose(G1[b, :L], rewards[b, :L] + 0.9 * v_next, **TOL)


def test_klq_single_token_trajectory():
    G = klq_targets_single(
        jnp.array([-1.0]), jnp.array([-1.5]), jnp.array([0.7]), jnp.array([2.0]), jnp.array([1.0]),
        tau=0.2,
    )
    # Q = 0.2*0.5 + 0.7 = 0.8; δ = 2 − 0.8; G = δ + Q = 2.
    np.testing.assert_allclose(np.asarray(G), [2.0], **TOL)
    Ga = klq_targets_single(
        jnp.array([-1.0]), jnp.array([-1.5]), jnp.array([0.7]), jnp.array([2.0]), jnp.array([1.0]),
        tau=0.2, alpha=0.25,
    )
    np.testing.assert_allclose(np.asarray(Ga), [0.25 * 1.2 + 0.8], **TOL)


def test_fully_padded_rows_are_zero_without_nan():
    B, T = 3, 5
    nan = jnp.full((B, T), jnp.nan)
    mask = jnp.zeros((B, T))
    G = klq_targets(nan, nan, nan, nan, mask, tau=0.1)
    A = gae(nan, nan, mask)
    Rm = discounted_returns(nan, mask)
    for x in (G, A, Rm):
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), 0.0)
    # and gradients through the targets stay finite when padding holds NaN
    g = jax.grad(lambda v: klq_targets(nan, nan, v, nan, mask, tau=0.1).sum())(nan)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_klq_single_vmap_jit_and_traced_coefficients():
    logp, ref_logp, values, rewards, mask, _ = make_batch(seed=5)
    args = [jnp.asarray(a) for a in (logp, ref_logp, values, rewards, mask)]
    want = klq_targets(*args, tau=0.2, gamma=0.95, lam=0.9, alpha=0.7)

    @jax.jit
    def f(coefs, *a):
        tau, gamma, lam, alpha = coefs
        single = lambda *x: klq_targets_single(*x, tau=tau, gamma=gamma, lam=lam, alpha=alpha)
        return jax.vmap(single)(*a)

    got = f(jnp.array([0.2, 0.95, 0.9, 0.7]), *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    # vmap over an extra leading axis of the batched function
    stacked = [jnp.stack([a, a[::-1]]) for a in args]
    got2 = jax.vmap(lambda *a: klq_targets(*a, tau=0.2, gamma=0.95, lam=0.9, alpha=0.7))(*stacked)
    np.testing.assert_allclose(np.asarray(got2[0]), np.asarray(want), **TOL)
    np.testing.assert_allclose(np.asarray(got2[1]), np.asarray(want)[::-1], **TOL)


def test_klq_targets_gradient_matches_finite_differences():
    """The targets are differentiable (e.g. w.r.t. V): dG_0/dV_t equals the analytic form."""
    T, tau, gamma, lam = 4, 0.1, 0.9, 0.8
    z = jnp.zeros(T)
    m = jnp.ones(T)
    r = jnp.array([0.0, 0.0, 0.0, 1.0])
    g = jax.grad(lambda v: klq_targets_single(z, z, v, r, m, tau=tau, gamma=gamma, lam=lam)[0])(z)
    # G_0 = Σ_k (γλ)^k (r_{k+1} + γ V_{k+1} − V_k) + V_0 ⇒ dG_0/dV_j = (γλ)^{j-1} γ (1 − λ) for j ≥ 1
    want = [0.0] + [(gamma * lam) ** (j - 1) * gamma * (1 - lam) for j in range(1, T)]
    np.testing.assert_allclose(np.asarray(g), want, **TOL)


def test_bf16_inputs_give_float32_close_to_f32():
    logp, ref_logp, values, rewards, mask, _ = make_batch(seed=9, garbage=0.0)
    f32 = klq_targets(logp, ref_logp, values, rewards, mask, tau=0.1)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (logp, ref_logp, values, rewards, mask)]
    out = klq_targets(*bf, tau=0.1)
    assert out.dtype == jnp.float32
    # exactly the f32 computation on the bf16-rounded inputs ...
    rounded = [np.asarray(a, np.float32) for a in bf]
    np.testing.assert_allclose(np.asarray(out), np.asarray(klq_targets(*rounded, tau=0.1)), **TOL)
    # ... and within bf16 rounding (rel. 2^-8 per input, ~10 inputs summed) of the f32 one
    np.testing.assert_allclose(np.asarray(out), np.asarray(f32), rtol=0, atol=0.1)
    assert gae(bf[3], bf[2], bf[4]).dtype == jnp.float32


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match="klq_targets_single"):
        klq_targets_single(jnp.zeros(3), jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), jnp.ones(3), tau=0.1)
    with pytest.raises(ValueError, match=r"use klq_targets_single"):
        klq_targets(*(jnp.zeros(3),) * 5, tau=0.1)
    with pytest.raises(ValueError, match="gae"):
        gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="mode"):
        ppo_value_targets(*(jnp.zeros((1, 2)),) * 4, mode="td")


def test_errors_name_existing_functions_and_missing_values():
    z3, z2 = jnp.zeros((2, 3, 1)), jnp.zeros((2, 3))
    # kl_shaped_rewards takes [B, T] or [T]; there is no kl_shaped_rewards_single to point at
    with pytest.raises(ValueError, match=r"^kl_shaped_rewards: .*\[B, T\] batches or one \[T\]") as e:
        kl_shaped_rewards(z3, z3, z3, z3, tau=0.1)
    assert "_single" not in str(e.value)
    # ppo_targets on [T] inputs: its own name and an alternative that exists (no gae_single)
    with pytest.raises(ValueError, match=r"^ppo_targets: .*x\[None\]") as e:
        ppo_targets(*(jnp.zeros(3),) * 4, jnp.ones(3), tau=0.1)
    assert "gae" not in str(e.value)
    # values=None (a rollout of a policy without a value head): said by name, with the fix
    for call in (lambda: klq_targets(z2, z2, None, z2, z2 + 1, tau=0.1),
                 lambda: ppo_targets(z2, z2, z2, None, z2 + 1, tau=0.1),
                 lambda: gae(z2, None, z2 + 1)):
        with pytest.raises(ValueError, match=r"values is None .*no value head.*value_head=True.*PolicyWithCritic"):
            call()
    # nested Python lists are arrays of their shape (not rank-0 pytrees)
    np.testing.assert_allclose(np.asarray(klq_targets([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]],
                                                      [[1.0, 1.0]], tau=0.1, lam=1.0)), [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^whiten_advantages: .*same shape"):
        whiten_advantages(z2, jnp.ones((2, 2)))


# ---------------------------------------------------------------------------- PPO targets ---


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.0, 0.95), (1.0, 0.0)])
def test_gae_matches_algorithm1_loop(gamma, lam):
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=21)
    rbar = kl_shaped_rewards(rewards, logp, ref_logp, mask, tau=0.05)
    A = np.asarray(gae(rbar, values, mask, gamma=gamma, lam=lam))
    assert np.all(np.isfinite(A))
    for b, L in enumerate(lengths):
        rb = rewards[b].astype(np.float64) - 0.05 * (logp[b].astype(np.float64) - ref_logp[b])
        np.testing.assert_allclose(np.asarray(rbar)[b, :L], rb[:L], **TOL)
        np.testing.assert_allclose(A[b, :L], ref_gae_alg1(rb, values[b].astype(np.float64), L, gamma, lam), **TOL)
        np.testing.assert_array_equal(A[b, L:], 0.0)
    single = np.asarray(gae_single(rbar[2], values[2], mask[2], gamma=gamma, lam=lam))
    np.testing.assert_allclose(single, A[2], **TOL)


def test_gae_matches_trl_full_length_loop():
    """TRL's loop runs over all T positions with nextvalues = values[t+1]; with rewards and
    values zero on padding it gives the same advantages on real tokens."""
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=22, garbage=0.0)
    gamma, lam = 1.0, 0.95
    Bn, T = values.shape
    adv = np.zeros((Bn, T))
    last = np.zeros(Bn)
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    got = np.asarray(gae(rewards, values, mask, gamma=gamma, lam=lam))
    np.testing.assert_allclose(got, adv * mask, **TOL)


def test_discounted_returns_and_value_targets():
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=31)
    rbar = kl_shaped_rewards(rewards, logp, ref_logp, mask, tau=0.1)
    for gamma in (1.0, 0.8):
        Rm = np.asarray(discounted_returns(rbar, mask, gamma=gamma))
        for b, L in enumerate(lengths):
            np.testing.assert_allclose(Rm[b, :L], ref_mc(np.asarray(rbar[b], np.float64), L, gamma), **TOL)
            np.testing.assert_array_equal(Rm[b, L:], 0.0)
        np.testing.assert_allclose(
            np.asarray(discounted_returns_single(rbar[1], mask[1], gamma=gamma)), Rm[1], **TOL
        )
    # trl: advantages + values; mc: Monte-Carlo. Equal at λ = 1, different for λ < 1.
    A1 = gae(rbar, values, mask, gamma=0.9, lam=1.0)
    trl1 = ppo_value_targets(A1, values, rbar, mask, gamma=0.9, mode="trl")
    mc1 = ppo_value_targets(A1, values, rbar, mask, gamma=0.9, mode="mc")
    np.testing.assert_allclose(np.asarray(trl1), np.asarray(mc1), rtol=1e-5, atol=1e-5)
    A = gae(rbar, values, mask, gamma=1.0, lam=0.95)
    trl = np.asarray(ppo_value_targets(A, values, rbar, mask, mode="trl"))
    np.testing.assert_allclose(trl, np.where(mask > 0, np.asarray(A) + np.nan_to_num(values), 0.0), **TOL)
    mc = np.asarray(ppo_value_targets(A, values, rbar, mask, mode="mc"))
    assert not np.allclose(trl, mc)


def test_whiten_advantages_is_trl_masked_whiten():
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=41, garbage=0.0)
    A = np.asarray(gae(rewards, values, mask))
    real = A[mask > 0].astype(np.float64)
    mean = real.mean()
    var = real.var(ddof=1)  # TRL: Bessel-corrected
    want = np.where(mask > 0, (A - mean) / np.sqrt(var + 1e-8), 0.0)
    np.testing.assert_allclose(np.asarray(whiten_advantages(A, mask)), want, rtol=1e-5, atol=1e-5)
    want_b = np.where(mask > 0, (A - mean) / np.sqrt(real.var() + 1e-8), 0.0)
    np.testing.assert_allclose(
        np.asarray(whiten_advantages(A, mask, unbiased=False)), want_b, rtol=1e-5, atol=1e-5
    )
    # NaN in padded slots: the same values, and a finite gradient equal to the clean one
    dirty = np.where(mask > 0, A, np.nan).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(whiten_advantages(dirty, mask)), np.asarray(whiten_advantages(A, mask)))
    for groups in (1, 7):
        f = lambda a: jnp.sum(whiten_advantages(a, mask, groups=groups) * jnp.arange(9.0))  # noqa: E731
        g = np.asarray(jax.grad(f)(jnp.asarray(dirty)))
        assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0.0)
        np.testing.assert_array_equal(g, np.asarray(jax.grad(f)(jnp.asarray(np.where(mask > 0, A, 0.0)))))


def test_ppo_targets_pipeline():
    logp, ref_logp, values, rewards, mask, lengths = make_batch(seed=51)
    tau, gamma, lam = 0.05, 1.0, 0.95
    A, Rt = ppo_targets(rewards, logp, ref_logp, values, mask, tau=tau, gamma=gamma, lam=lam)
    A_raw = np.zeros_like(values, dtype=np.float64)
    for b, L in enumerate(lengths):
        rb = rewards[b].astype(np.float64) - tau * (logp[b].astype(np.float64) - ref_logp[b])
        A_raw[b, :L] = ref_gae_alg1(rb, values[b].astype(np.float64), L, gamma, lam)
    np.testing.assert_allclose(
        np.asarray(Rt), np.where(mask > 0, A_raw + np.nan_to_num(values), 0.0), **TOL
    )
    real = A_raw[mask > 0]
    want_A = np.where(mask > 0, (A_raw - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), 0.0)
    np.testing.assert_allclose(np.asarray(A), want_A, rtol=1e-5, atol=1e-5)
    A2, R2 = ppo_targets(rewards, logp, ref_logp, values, mask, tau=tau, whiten=False, value_target="mc")
    np.testing.assert_allclose(np.asarray(A2), A_raw * mask, **TOL)
    assert np.all(np.isfinite(np.asarray(R2)))


def test_docstring_examples_run():
    result = doctest.testmod(R, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20
    assert result.failed == 0
    for name in R.__all__:
        doc = getattr(R, name).__doc__
        assert doc and ">>>" in doc, f"{name} needs a runnable example"
        assert "Eq. (" in doc or "Algorithm" in doc or "Monte-Carlo" in doc, name
