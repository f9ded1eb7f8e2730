"""Proposition 4.1, checked numerically on a tabular token tree with exact expectations.

Claim (paper §4, proof in App. C). Start from any full-support (π_0, V_0) and Q_0 = Q[π_0, V_0]
(Eq. 12). Let Q_{k+1} minimise Eq. (15), E[(Q(s,a) - G^{λ,α}[Q_k](s,a))²], and let π_{k+1} maximise
Eq. (17) with β = τ(1-α)/α (Eq. 18) and V_{k+1} minimise Eq. (19) with targets Eq. (20). Then for
every k, (π_k, V_k) = (π[Q_k], V[Q_k]) (Eqs. 10-11) and Q_k = Q[π_k, V_k] (Eq. 12).

How it is checked here. The Q-space sequence is computed the way Algorithm 2 computes it: enumerate
every trajectory from ρ_0 under π[Q_k] with its exact probability, run the backward λ-return loop
along each trajectory (conservative, Eq. 7, TD error Eq. 14), and take the exact minimiser of the
probability-weighted ℓ² loss (the weighted mean of the targets of each (s, a)). The (π, V)
sequence is computed separately by ``tests.helpers.tabular.pv_step``: the closed-form maximiser of
Eq. (17) and the conditional mean of Eq. (20). The two sequences are iterated independently from
the same start and compared after every iteration, to 1e-5 (float64; the observed error is ~1e-12).

Conditions under which this holds (and under which it is checked):
  * Full support: π_b and π_0 give every action positive probability (so do all later iterates,
    which are softmaxes of finite values). Otherwise Eq. (12) takes log 0, and (s, a) pairs with
    zero probability have no loss term, so Eq. (15) leaves Q there undetermined.
  * On-policy data: the trajectories that define the regression in Eq. (15) follow π[Q_k] = π_k
    after (s, a), and every state has positive visitation probability (true with full support on a
    finite tree). The expectation of the λ-return given (s, a) is then [B^{λ,α}Q_k](s, a) (Eq. 88).
    The action at the regressed state itself may come from any full-support distribution for the
    V-update (checked below), because E[y | s, a] in Eq. (20) does not depend on a.
  * Exact expectations / exact minimisers: the statement is about the minimisers of the
    population losses, not about a finite-sample or finite-gradient-step fit.
  * Reading of Eqs. (16)-(17): Â[π_k, V_k] is the non-conservative (α = 1) λ-return of
    Q[π_k, V_k] minus V_k(s), i.e. GAE with KL-shaped rewards plus τ log(π_k(a|s)/π_b(a|s)) of the
    first action (not Algorithm 1's GAE alone, which breaks the equivalence:
    ``test_eq17_needs_the_advantage_of_eq16``). Eq. (17)'s ratio term E_{π_k}[π/π_k Â] is the on-policy
    importance-weighted form of Σ_a π(a|s) Â(s, a). For α = 1, β = 0 and Eq. (17) has no proximal term.
  * Reading of Eq. (20): G^{λ,α}[V_k, π_k] is the *conservative* return of Q[π_k, V_k], and the
    log-ratio uses the *new* policy π_{k+1}; ``test_eq20_needs_the_new_policy`` shows that π_k there
    breaks the equivalence.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from tests.helpers import tabular as tb

TOL = 1e-5  # the acceptance tolerance of issue #7; never loosened.
TAU = 0.7
ALPHAS = (0.25, 0.5, 1.0)
LAMBDAS = (0.0, 0.5, 0.9, 1.0)
N_ITERS = 5


def _mdp(gamma: float) -> tb.TreeMDP:
    if gamma == 1.0:  # the LM-RLHF setting: sequence reward only, ω penalty on truncation
        return tb.make_tree_mdp(n_actions=4, eos_id=0, horizon=4, gamma=1.0, n_prompts=2, seed=3,
                                truncation_penalty=0.5)
    # a general discounted MDP: dense per-token rewards as well
    return tb.make_tree_mdp(n_actions=4, eos_id=0, horizon=4, gamma=gamma, n_prompts=2, seed=4,
                            dense_reward_scale=0.3)


MDPS = {g: _mdp(g) for g in (1.0, 0.9)}


def _start(mdp, seed):
    rng = np.random.default_rng(seed)
    pi_b = tb.random_policy(mdp, rng, scale=1.0)
    pi_0 = tb.random_policy(mdp, rng, scale=1.5)
    v_0 = rng.standard_normal(mdp.num_states)
    return pi_b, pi_0, v_0


# ---------------------------------------------------------------- independent reference code


def _boltzmann_ref(q, pi_b, tau):
    """Eqs. (10)-(11) via scipy's logsumexp (independent of tabular.boltzmann)."""
    v = tau * logsumexp(np.log(pi_b) + q / tau, axis=-1)
    return pi_b * np.exp((q - v[:, None]) / tau), v


def _trajectories(mdp, pi):
    """Every complete trajectory from ρ_0 under ``pi``: (probability, [(s_t, a_t, r_{t+1}, s_{t+1})])."""
    out = []

    def walk(s, prob, steps):
        for a in range(mdp.n_actions):
            p = prob * pi[s, a]
            c = int(mdp.child[s, a])
            step = steps + [(s, a, mdp.reward[s, a], c)]
            if c < 0:
                out.append((p, step))
            else:
                walk(c, p, step)

    for root in np.flatnonzero(mdp.init_probs):
        walk(int(root), mdp.init_probs[root], [])
    total = sum(p for p, _ in out)
    assert abs(total - 1.0) < 1e-12, total
    return out


def _alg2_targets(steps, q_of, v_of, lam, gamma, alpha):
    """Algorithm 2's backward loop (with the α of Eq. 7): G_t = αΔ_t + Q(s_t, a_t).

    Δ_T = 0; δ_t = r_{t+1} + γ V(s_{t+1}) - Q(s_t, a_t) (Eq. 14, V = 0 at the terminal state);
    Δ_t = δ_t + λγ Δ_{t+1}.
    """
    g = [0.0] * len(steps)
    acc = 0.0
    for t in reversed(range(len(steps))):
        s, a, r, c = steps[t]
        v_next = v_of(c) if c >= 0 else 0.0
        delta = r + gamma * v_next - q_of(s, a)
        acc = delta + lam * gamma * acc
        g[t] = alpha * acc + q_of(s, a)
    return g


def _eq15_minimiser(mdp, q_k, pi_b, tau, lam, alpha):
    """argmin_Q Σ_traj P(traj) Σ_t (Q(s_t,a_t) - G_t^{λ,α}[Q_k])², rollouts on-policy under π[Q_k]."""
    pi_k, v_k = _boltzmann_ref(q_k, pi_b, tau)
    num = np.zeros_like(q_k)
    den = np.zeros_like(q_k)
    for prob, steps in _trajectories(mdp, pi_k):
        g = _alg2_targets(steps, lambda s, a: q_k[s, a], lambda s: v_k[s], lam, mdp.gamma, alpha)
        for (s, a, _, _), g_t in zip(steps, g):
            num[s, a] += prob * g_t
            den[s, a] += prob
    assert np.all(den > 0), "every (s, a) must be visited for Eq. (15) to determine Q"
    return num / den


def _eq19_minimiser(mdp, pi_k, v_k, pi_next, pi_b, tau, lam, alpha):
    """argmin_V Σ_traj P(traj) Σ_t (V(s_t) - y_t)², y_t = G_t^{λ,α}[V_k, π_k] - τ log(π_{k+1}/π_b)(a_t|s_t)."""
    q_k = tau * np.log(pi_k / pi_b) + v_k[:, None]  # Eq. (13)
    num = np.zeros_like(v_k)
    den = np.zeros_like(v_k)
    for prob, steps in _trajectories(mdp, pi_k):
        g = _alg2_targets(steps, lambda s, a: q_k[s, a], lambda s: v_k[s], lam, mdp.gamma, alpha)
        for (s, a, _, _), g_t in zip(steps, g):
            num[s] += prob * (g_t - tau * np.log(pi_next[s, a] / pi_b[s, a]))
            den[s] += prob
    assert np.all(den > 0)
    return num / den


def _bellman_pi(mdp, q, pi, pi_b, tau):
    """One soft Bellman backup B^π Q (Eq. 22), plain loops."""
    out = np.zeros_like(q)
    for s in range(mdp.num_states):
        for a in range(mdp.n_actions):
            c = mdp.child[s, a]
            out[s, a] = mdp.reward[s, a]
            if c >= 0:
                kl = sum(pi[c, b] * np.log(pi[c, b] / pi_b[c, b]) for b in range(mdp.n_actions))
                out[s, a] += mdp.gamma * (sum(pi[c, b] * q[c, b] for b in range(mdp.n_actions)) - tau * kl)
    return out


# ---------------------------------------------------------------- the operator itself


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_lambda_operator_is_nstep_mixture(gamma, lam):
    """B^λ Q of Eq. (88) (tabular recursion) equals (1-λ)Σ_n λ^{n-1}(B^π)^n Q of Eq. (37), π = π[Q]."""
    mdp = MDPS[gamma]
    pi_b, pi_0, v_0 = _start(mdp, 0)
    q = tb.q_from_policy_value(pi_0, v_0, pi_b, TAU)
    pi, _ = _boltzmann_ref(q, pi_b, TAU)
    got = tb.expected_lambda_return_q(mdp, q, pi_b, TAU, lam, alpha=1.0)
    # (B^π)^n Q = Q^π for n >= horizon on a tree of depth horizon-1, so the tail weight is λ^H.
    powers, cur = [], q
    for _ in range(mdp.horizon):
        cur = _bellman_pi(mdp, cur, pi, pi_b, TAU)
        powers.append(cur)
    q_pi = powers[-1]
    want = sum((1 - lam) * lam ** (n - 1) * powers[n - 1] for n in range(1, mdp.horizon + 1))
    want = want + lam ** mdp.horizon * q_pi
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(tb.soft_q_of_policy(mdp, pi, pi_b, TAU), q_pi, rtol=0, atol=1e-10)
    # the conservative operator, Eq. (89)
    np.testing.assert_allclose(
        tb.expected_lambda_return_q(mdp, q, pi_b, TAU, lam, alpha=0.25), 0.25 * got + 0.75 * q, atol=1e-10
    )


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("alpha,lam", [(0.25, 0.9), (0.5, 0.0), (1.0, 1.0), (1.0, 0.5)])
def test_eq15_minimiser_is_conservative_operator(gamma, alpha, lam):
    """App. C.1: the exact on-policy minimiser of Eq. (15) is B^{λ,α} Q_k (tabular.klq_step)."""
    mdp = MDPS[gamma]
    pi_b, pi_0, v_0 = _start(mdp, 1)
    q_k = tb.q_from_policy_value(pi_0, v_0, pi_b, TAU)
    np.testing.assert_allclose(
        _eq15_minimiser(mdp, q_k, pi_b, TAU, lam, alpha),
        tb.klq_step(mdp, q_k, pi_b, TAU, lam, alpha),
        rtol=0, atol=1e-10,
    )


# ---------------------------------------------------------------- the (π, V) updates


@pytest.mark.parametrize("alpha", ALPHAS)
def test_closed_form_policy_maximises_eq17(alpha):
    """The closed form π ∝ π_k^{β/(β+τ)} π_b^{τ/(β+τ)} e^{Â/(β+τ)} is the argmax of Eq. (17) per state.

    Three independent checks: (i) KKT — ∂F/∂π(a) is the same for every a (interior stationary
    point of a strictly concave function on the simplex); (ii) no random simplex point, nor any
    small perturbation, has a higher objective; (iii) a generic optimiser (BFGS on softmax logits)
    finds the same policy.
    """
    mdp = MDPS[1.0]
    rng = np.random.default_rng(7)
    pi_b, pi_k, v_k = _start(mdp, 2)
    beta = tb.beta_from_alpha(alpha, TAU)
    assert beta == pytest.approx(TAU * (1 - alpha) / alpha)
    adv = tb.lambda_advantage_pv(mdp, pi_k, v_k, pi_b, TAU, lam=0.9)
    pi = tb.proximal_policy_closed_form(pi_k, pi_b, adv, beta, TAU)
    np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
    # (i) KKT
    grad = adv - beta * (np.log(pi / pi_k) + 1) - TAU * (np.log(pi / pi_b) + 1)
    assert np.max(grad.max(-1) - grad.min(-1)) < 1e-10
    # (ii) perturbations
    f_star = tb.proximal_policy_objective(pi, pi_k, pi_b, adv, beta, TAU)
    for scale in (1e-3, 1e-1, 10.0):
        for _ in range(50):
            other = tb._softmax(np.log(pi) + scale * rng.standard_normal(pi.shape))
            f = tb.proximal_policy_objective(other, pi_k, pi_b, adv, beta, TAU)
            assert np.all(f <= f_star + 1e-12)
    # (iii) generic optimiser
    for s in range(mdp.num_states):
        def neg_f(z, s=s):
            p = tb._softmax(z[None])
            return -tb.proximal_policy_objective(p, pi_k[s:s + 1], pi_b[s:s + 1], adv[s:s + 1], beta, TAU)[0]

        res = minimize(neg_f, np.zeros(mdp.n_actions), method="BFGS", options={"gtol": 1e-11})
        np.testing.assert_allclose(tb._softmax(res.x[None])[0], pi[s], atol=1e-6)
        assert -res.fun <= f_star[s] + 1e-12


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("alpha,lam", [(0.25, 0.5), (0.5, 1.0), (1.0, 0.0)])
def test_eq19_minimiser_is_conditional_mean(gamma, alpha, lam):
    """The exact on-policy minimiser of Eq. (19) equals pv_step's V_{k+1}, for any action distribution μ."""
    mdp = MDPS[gamma]
    pi_b, pi_k, v_k = _start(mdp, 3)
    pi_next, v_next = tb.pv_step(mdp, pi_k, v_k, pi_b, TAU, lam, alpha)
    np.testing.assert_allclose(
        _eq19_minimiser(mdp, pi_k, v_k, pi_next, pi_b, TAU, lam, alpha), v_next, rtol=0, atol=1e-10
    )
    # E[y | s, a] does not depend on a, so the action distribution at s is irrelevant.
    y_bar = tb.pv_value_targets(mdp, pi_k, v_k, pi_next, pi_b, TAU, lam, alpha)
    assert np.max(y_bar.max(-1) - y_bar.min(-1)) < 1e-10
    uniform = np.full_like(pi_k, 1.0 / mdp.n_actions)
    _, v_uniform = tb.pv_step(mdp, pi_k, v_k, pi_b, TAU, lam, alpha, action_dist=uniform)
    np.testing.assert_allclose(v_uniform, v_next, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- Proposition 4.1


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("alpha,lam", list(itertools.product(ALPHAS, LAMBDAS)))
def test_proposition_4_1(gamma, alpha, lam):
    """Q-space iterates (Eq. 15, on-policy, exact) and (π, V) iterates (Eqs. 17-20) agree for k = 0..5."""
    mdp = MDPS[gamma]
    pi_b, pi_0, v_0 = _start(mdp, 10)
    q = tb.q_from_policy_value(pi_0, v_0, pi_b, TAU)  # Q_0 = Q[π_0, V_0], Eq. (12)
    pi, v = pi_0, v_0
    # the start is not optimal: one step moves it
    assert np.max(np.abs(tb.klq_step(mdp, q, pi_b, TAU, lam, alpha) - q)) > 1e-2
    for k in range(N_ITERS):
        q_next = _eq15_minimiser(mdp, q, pi_b, TAU, lam, alpha)
        pi_next, v_next = tb.pv_step(mdp, pi, v, pi_b, TAU, lam, alpha)
        moved = np.max(np.abs(q_next - q))
        q, pi, v = q_next, pi_next, v_next
        # Q_{k+1} -> (π, V) by Eqs. (10)-(11)
        pi_from_q, v_from_q = _boltzmann_ref(q, pi_b, TAU)
        err_pi = np.max(np.abs(pi_from_q - pi))
        err_v = np.max(np.abs(v_from_q - v))
        # (π_{k+1}, V_{k+1}) -> Q by Eq. (12)
        err_q = np.max(np.abs(tb.q_from_policy_value(pi, v, pi_b, TAU) - q))
        assert max(err_pi, err_v, err_q) <= TOL, (k, err_pi, err_v, err_q)
        if k == 0:
            assert moved > 1e-2  # a real update, not a fixed point


def test_eq20_needs_the_new_policy():
    """Sensitivity: with π_k instead of π_{k+1} in Eq. (20) the V-update no longer matches V[Q_{k+1}]."""
    mdp = MDPS[1.0]
    pi_b, pi_k, v_k = _start(mdp, 11)
    alpha, lam = 0.5, 0.9
    q_next = tb.klq_step(mdp, tb.q_from_policy_value(pi_k, v_k, pi_b, TAU), pi_b, TAU, lam, alpha)
    _, v_want = _boltzmann_ref(q_next, pi_b, TAU)
    v_wrong = _eq19_minimiser(mdp, pi_k, v_k, pi_k, pi_b, TAU, lam, alpha)
    assert np.max(np.abs(v_wrong - v_want)) > 1e-2
    pi_next, _ = tb.pv_step(mdp, pi_k, v_k, pi_b, TAU, lam, alpha)
    v_right = _eq19_minimiser(mdp, pi_k, v_k, pi_next, pi_b, TAU, lam, alpha)
    assert np.max(np.abs(v_right - v_want)) <= TOL


def test_iterates_reach_the_sequence_level_optimum():
    """With γ = 1, α = λ = 1 the iteration is soft policy iteration; on a tree of depth H it reaches
    π*(y|x) ∝ π_b(y|x) e^{R(x,y)/τ} after H steps, and V(x) = τ log E_{π_b}[e^{R/τ}] = J*(x) (§2, App. A)."""
    mdp = MDPS[1.0]
    pi_b, pi_0, v_0 = _start(mdp, 12)
    q = tb.q_from_policy_value(pi_0, v_0, pi_b, TAU)
    for _ in range(mdp.horizon + 1):
        q = tb.klq_step(mdp, q, pi_b, TAU, lam=1.0, alpha=1.0)
    pi, v = _boltzmann_ref(q, pi_b, TAU)
    for root in np.flatnonzero(mdp.init_probs):
        trajs = [(steps) for _, steps in _trajectories(mdp, pi) if steps[0][0] == root]
        log_b = np.array([sum(np.log(pi_b[s, a]) for s, a, _, _ in st) for st in trajs])
        log_p = np.array([sum(np.log(pi[s, a]) for s, a, _, _ in st) for st in trajs])
        ret = np.array([sum(r for _, _, r, _ in st) for st in trajs])
        log_star = log_b + ret / TAU - logsumexp(log_b + ret / TAU)
        np.testing.assert_allclose(log_p, log_star, atol=1e-10)
        np.testing.assert_allclose(v[root], TAU * logsumexp(log_b + ret / TAU), atol=1e-10)


def test_eq17_needs_the_advantage_of_eq16():
    """Sensitivity: Algorithm 1's GAE (KL folded into the rewards, without the τ log(π_k/π_b) of the
    first action that Eq. (16)'s G^λ[π_k, V_k] - V_k contains) in Eq. (17) breaks the equivalence."""
    mdp = MDPS[1.0]
    pi_b, pi_k, v_k = _start(mdp, 13)
    alpha, lam = 0.5, 0.9
    q_next = tb.klq_step(mdp, tb.q_from_policy_value(pi_k, v_k, pi_b, TAU), pi_b, TAU, lam, alpha)
    pi_want, _ = _boltzmann_ref(q_next, pi_b, TAU)
    beta = tb.beta_from_alpha(alpha, TAU)
    adv = tb.lambda_advantage_pv(mdp, pi_k, v_k, pi_b, TAU, lam)
    gae = adv - TAU * np.log(pi_k / pi_b)
    pi_gae = tb.proximal_policy_closed_form(pi_k, pi_b, gae, beta, TAU)
    assert np.max(np.abs(pi_gae - pi_want)) > 1e-2
    assert np.max(np.abs(tb.proximal_policy_closed_form(pi_k, pi_b, adv, beta, TAU) - pi_want)) <= TOL
