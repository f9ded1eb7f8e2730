"""Exact tabular KL-regularised RL on a token tree: the maths of §3-4 and App. C, enumerated.

This module is a *reference*, not a training path: numpy float64, no sampling, every expectation
computed exactly by walking a small prefix tree. It exists to check Proposition 4.1 (KLQ's
Q-space update, Eq. (15), equals a proximal (π, V)-space update, Eqs. (17)-(20)) and to give the
rest of the library an exact oracle on toy problems.

The MDP (token generation). A state is ``(x, y_1..y_t)``: a prompt id ``x`` (one of
``n_prompts`` initial states, drawn from ``init_probs``) followed by the ``t`` tokens generated
so far; the action ``a_t = y_{t+1}`` appends one token from a vocabulary of ``n_actions`` tokens.
Transitions are deterministic. The episode ends after the EOS action or when ``t + 1 = horizon``
(truncation). The reward ``r_{t+1} = reward[s_t, a_t]`` is a terminal sequence reward
``R(x, y)`` on the terminating action plus an optional dense per-token reward. ``V(s_T) = 0`` at a
terminal state (terminal states are not stored: ``child[s, a] = -1`` marks them).

Arrays: ``S`` non-terminal states indexed in order of depth (a parent before its children),
``A = n_actions``; a policy is ``pi [S, A]`` (rows sum to 1), a state-value ``v [S]``, an
action-value ``q [S, A]``.

Maps between Q and (π, V) (§3.2), for a reference policy ``pi_b`` and temperature τ:

    π[Q](a|s) = π_b(a|s) exp((Q(s,a) - V[Q](s)) / τ)                       (10)
    V[Q](s)   = τ log Σ_a π_b(a|s) exp(Q(s,a)/τ)                            (11)
    Q[π,V](s,a) = τ log(π(a|s)/π_b(a|s)) + V(s)                             (12)

Conservative λ-returns (Eqs. (7)-(8)), in expectation: App. C's operator

    [B^λ Q](s,a)   = E_{π[Q]}[G^λ_t[Q] | s_t=s, a_t=a]                       (88)
    [B^{λ,α} Q]    = α B^λ Q + (1-α) Q                                       (89)

is computed by the backward recursion of the λ-return over the tree: with the TD error of
Eq. (8) at a (state, action) pair, δ(s,a) = r(s,a) + γ (Σ_a' π(a'|s')Q(s',a') - τ D(s')) - Q(s,a)
(the bracket is 0 when s' is terminal), the expected discounted sum of TD errors is

    Δ(s,a) = δ(s,a) + λγ Σ_a' π(a'|s') Δ(s',a')        (0 past a terminal state)

and B^{λ,α}Q = Q + α Δ. This is exact because transitions are deterministic and future actions
are drawn from π[Q] (on-policy continuation).

Example:
    >>> import numpy as np
    >>> from tests.helpers import tabular as tb
    >>> mdp = tb.make_tree_mdp(n_actions=3, eos_id=0, horizon=3, gamma=1.0, seed=0)
    >>> pi_b = tb.random_policy(mdp, np.random.default_rng(1))
    >>> q0 = np.zeros((mdp.num_states, mdp.n_actions))
    >>> q1 = tb.klq_step(mdp, q0, pi_b, tau=0.5, lam=0.9, alpha=0.5)
    >>> pi1, v1 = tb.boltzmann(q1, pi_b, tau=0.5)
    >>> bool(np.allclose(pi1.sum(-1), 1.0))
    True
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

__all__ = [
    "TreeMDP",
    "make_tree_mdp",
    "random_policy",
    "boltzmann",
    "q_from_policy_value",
    "kl_per_state",
    "state_visitation",
    "expected_lambda_return_q",
    "klq_step",
    "beta_from_alpha",
    "lambda_advantage_pv",
    "proximal_policy_closed_form",
    "proximal_policy_objective",
    "pv_value_targets",
    "pv_step",
    "soft_q_of_policy",
]


@dataclasses.dataclass(frozen=True, eq=False)
class TreeMDP:
    """A deterministic prefix-tree MDP (token generation); see the module docstring.

    Attributes:
      n_actions: vocabulary size ``A``.
      eos_id: the token that ends an episode.
      horizon: maximum number of generated tokens ``T_max`` (states have depth 0..horizon-1).
      gamma: discount γ in [0, 1].
      states: ``S`` tuples ``(prompt_id, y_1, .., y_t)`` in order of depth.
      depth: ``[S]`` int, ``t`` of each state.
      child: ``[S, A]`` int, index of the next state, ``-1`` when the action ends the episode.
      reward: ``[S, A]`` float64, ``r_{t+1}`` for taking ``a`` in ``s``.
      init_probs: ``[S]`` float64, the initial-state (prompt) distribution ρ_0 (zero off the roots).
    """

    n_actions: int
    eos_id: int
    horizon: int
    gamma: float
    states: tuple
    depth: np.ndarray
    child: np.ndarray
    reward: np.ndarray
    init_probs: np.ndarray

    @property
    def num_states(self) -> int:
        return len(self.states)

    @property
    def terminal(self) -> np.ndarray:
        """``[S, A]`` bool: taking ``a`` in ``s`` ends the episode."""
        return self.child < 0


def make_tree_mdp(
    n_actions: int = 3,
    eos_id: int = 0,
    horizon: int = 3,
    gamma: float = 1.0,
    n_prompts: int = 1,
    seed: int = 0,
    dense_reward_scale: float = 0.0,
    truncation_penalty: float = 0.0,
) -> TreeMDP:
    """Build a random tree MDP over all prefixes of a tiny vocabulary.

    The terminal reward ``R(x, y)`` of every complete response is an independent N(0, 1) draw
    (minus ``truncation_penalty`` ω when the response contains no EOS, i.e. ran to ``horizon``
    without one: the ω penalty of :mod:`klq_jax.rollout`, TRL's ``missing_eos_penalty``; a response
    of exactly ``horizon`` tokens ending in EOS is not penalised, unlike the literal
    ``1[T = T_max]`` of Algorithms 1-2); ``dense_reward_scale > 0`` adds N(0, scale²) rewards on every action so that
    the check does not rely on the reward being sparse.

    Args:
      n_actions: vocabulary size (>= 2).
      eos_id: id of the EOS token, in ``[0, n_actions)``.
      horizon: maximum response length (>= 1).
      gamma: discount in [0, 1].
      n_prompts: number of initial states; ρ_0 is a random full-support distribution over them.
      seed: numpy seed for the rewards and ρ_0.
      dense_reward_scale: standard deviation of the per-token rewards (0 = sequence reward only).
      truncation_penalty: ω subtracted from ``R`` when the response contains no EOS.

    Returns:
      A ``TreeMDP``.

    Example:
      >>> mdp = make_tree_mdp(n_actions=3, eos_id=0, horizon=2)
      >>> mdp.num_states   # root, and the two non-EOS children
      3
    """
    if n_actions < 2:
        raise ValueError(f"make_tree_mdp: n_actions must be >= 2 (one EOS and one other token), got {n_actions}.")
    if not 0 <= eos_id < n_actions:
        raise ValueError(f"make_tree_mdp: eos_id={eos_id} must lie in [0, n_actions={n_actions}).")
    if horizon < 1:
        raise ValueError(f"make_tree_mdp: horizon must be >= 1, got {horizon}.")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"make_tree_mdp: gamma must lie in [0, 1], got {gamma}.")
    rng = np.random.default_rng(seed)
    states = [(p,) for p in range(n_prompts)]
    frontier = list(states)
    for _ in range(horizon - 1):
        frontier = [s + (a,) for s in frontier for a in range(n_actions) if a != eos_id]
        states.extend(frontier)
    index = {s: i for i, s in enumerate(states)}
    S, A = len(states), n_actions
    depth = np.array([len(s) - 1 for s in states], dtype=np.int64)
    child = -np.ones((S, A), dtype=np.int64)
    reward = np.zeros((S, A), dtype=np.float64)
    for i, s in enumerate(states):
        for a in range(A):
            nxt = s + (a,)
            if a != eos_id and nxt in index:
                child[i, a] = index[nxt]
            else:  # EOS, or the horizon is reached: a complete response.
                reward[i, a] = rng.standard_normal()
                if a != eos_id:
                    reward[i, a] -= truncation_penalty
            if dense_reward_scale > 0:
                reward[i, a] += dense_reward_scale * rng.standard_normal()
    init = np.zeros(S, dtype=np.float64)
    init[:n_prompts] = rng.dirichlet(np.ones(n_prompts)) if n_prompts > 1 else 1.0
    return TreeMDP(A, eos_id, horizon, float(gamma), tuple(states), depth, child, reward, init)


def random_policy(mdp: TreeMDP, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A random full-support policy ``[S, A]``: softmax of N(0, scale²) logits.

    Example:
      >>> mdp = make_tree_mdp(horizon=2)
      >>> random_policy(mdp, np.random.default_rng(0)).shape
      (3, 3)
    """
    logits = scale * rng.standard_normal((mdp.num_states, mdp.n_actions))
    return _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _check_policy(pi: np.ndarray, name: str) -> None:
    if np.any(pi <= 0):
        raise ValueError(
            f"{name} must have full support (every π(a|s) > 0): Eqs. (10)-(12) take log π, and "
            "Prop. 4.1 needs every (s, a) visited. Mix in a little of a uniform policy."
        )
    if not np.allclose(pi.sum(-1), 1.0, atol=1e-10):
        raise ValueError(f"{name}: every row must sum to 1 (got sums {pi.sum(-1)}).")


def boltzmann(q: np.ndarray, pi_b: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Q -> (π[Q], V[Q]) by Eqs. (10)-(11).

    ``V[Q](s) = τ log Σ_a π_b(a|s) e^{Q(s,a)/τ}``, ``π[Q](a|s) = π_b(a|s) e^{(Q(s,a)-V[Q](s))/τ}``.

    Args:
      q: ``[S, A]`` action-values.
      pi_b: ``[S, A]`` reference policy (full support).
      tau: temperature τ > 0.

    Returns:
      ``(pi [S, A], v [S])``.

    Example:
      >>> pi, v = boltzmann(np.zeros((1, 2)), np.full((1, 2), 0.5), tau=1.0)
      >>> pi.tolist(), v.tolist()
      ([[0.5, 0.5]], [0.0])
    """
    logits = np.log(pi_b) + q / tau
    v = tau * _logsumexp(logits)
    pi = np.exp(logits - v[:, None] / tau)
    return pi, v


def q_from_policy_value(pi: np.ndarray, v: np.ndarray, pi_b: np.ndarray, tau: float) -> np.ndarray:
    """(π, V) -> Q by Eq. (12): ``Q(s,a) = τ log(π(a|s)/π_b(a|s)) + V(s)``; ``[S, A]``.

    Example:
      >>> q_from_policy_value(np.full((1, 2), 0.5), np.array([1.0]), np.full((1, 2), 0.5), 1.0).tolist()
      [[1.0, 1.0]]
    """
    return tau * (np.log(pi) - np.log(pi_b)) + v[:, None]


def kl_per_state(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``D(p‖q)(s) = Σ_a p(a|s) log(p(a|s)/q(a|s))`` (Eq. 2), ``[S]``.

    Example:
      >>> float(kl_per_state(np.array([[0.5, 0.5]]), np.array([[0.5, 0.5]]))[0])
      0.0
    """
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def state_visitation(mdp: TreeMDP, pi: np.ndarray) -> np.ndarray:
    """Probability ``P(s is visited)`` under ρ_0 and ``pi``, ``[S]`` (each state at most once a trajectory).

    Example:
      >>> mdp = make_tree_mdp(n_actions=2, eos_id=0, horizon=2)
      >>> state_visitation(mdp, np.full((mdp.num_states, 2), 0.5)).tolist()
      [1.0, 0.5]
    """
    d = mdp.init_probs.copy()
    for s in range(mdp.num_states):  # parents come before children
        for a in range(mdp.n_actions):
            c = mdp.child[s, a]
            if c >= 0:
                d[c] += d[s] * pi[s, a]
    return d


def _discounted_td_sum(mdp: TreeMDP, delta: np.ndarray, pi: np.ndarray, lam: float) -> np.ndarray:
    """Δ(s,a) = δ(s,a) + λγ Σ_a' π(a'|s')Δ(s',a'): the expected Σ_k (λγ)^{k-t} δ_k, ``[S, A]``."""
    out = delta.copy()
    for s in reversed(range(mdp.num_states)):  # children before parents
        for a in range(mdp.n_actions):
            c = mdp.child[s, a]
            if c >= 0:
                out[s, a] += lam * mdp.gamma * np.dot(pi[c], out[c])
    return out


def expected_lambda_return_q(
    mdp: TreeMDP, q: np.ndarray, pi_b: np.ndarray, tau: float, lam: float, alpha: float
) -> np.ndarray:
    """``[B^{λ,α} Q](s,a) = E_{π[Q]}[G^{λ,α}_t[Q] | s_t=s, a_t=a]`` (Eqs. (7), (8), (88), (89)); ``[S, A]``.

    Computed in Q-space only: π = π[Q] from Eq. (10); the TD error is Eq. (8) literally,
    ``δ(s,a) = r(s,a) + γ(Σ_a' π(a'|s')Q(s',a') - τ D(π‖π_b)(s')) - Q(s,a)`` (bracket 0 at a terminal
    s'), summed with weights (λγ)^{k-t} along the on-policy continuation, scaled by α and added to Q.

    Example:
      >>> mdp = make_tree_mdp(horizon=1)       # a bandit: B^{λ,α}Q = Q + α(r - Q)
      >>> q = np.zeros((1, 3)); pi_b = np.full((1, 3), 1 / 3)
      >>> bool(np.allclose(expected_lambda_return_q(mdp, q, pi_b, 1.0, 0.5, 0.5), 0.5 * mdp.reward))
      True
    """
    _check_policy(pi_b, "expected_lambda_return_q: pi_b")
    pi, _ = boltzmann(q, pi_b, tau)
    boot_s = np.sum(pi * q, axis=-1) - tau * kl_per_state(pi, pi_b)  # [S]
    nxt = np.where(mdp.child >= 0, boot_s[np.maximum(mdp.child, 0)], 0.0)
    delta = mdp.reward + mdp.gamma * nxt - q
    return q + alpha * _discounted_td_sum(mdp, delta, pi, lam)


def klq_step(mdp: TreeMDP, q_k: np.ndarray, pi_b: np.ndarray, tau: float, lam: float, alpha: float) -> np.ndarray:
    """One exact KLQ iteration ``Q_{k+1} = B^{λ,α} Q_k`` (Eq. (15) with exact expectations; App. C.1).

    The minimiser of ``E[(Q(s,a) - G^{λ,α}[Q_k](s,a))²]`` is the conditional mean of the return
    given (s, a), which is ``[B^{λ,α}Q_k](s,a)`` when every (s, a) has positive probability in the
    data and the continuation after (s, a) follows π[Q_k] (on-policy rollouts).

    Example:
      >>> mdp = make_tree_mdp(horizon=2)
      >>> pi_b = np.full((mdp.num_states, 3), 1 / 3)
      >>> klq_step(mdp, np.zeros((3, 3)), pi_b, tau=1.0, lam=1.0, alpha=1.0).shape
      (3, 3)
    """
    return expected_lambda_return_q(mdp, q_k, pi_b, tau, lam, alpha)


def soft_q_of_policy(mdp: TreeMDP, pi: np.ndarray, pi_b: np.ndarray, tau: float) -> np.ndarray:
    """The soft action-value ``Q^π`` of Eq. (21) by backward induction (Lemma A.1), ``[S, A]``.

    ``Q^π(s,a) = r(s,a) + γ(Σ_a' π(a'|s')Q^π(s',a') - τ D(π‖π_b)(s'))``.

    Example:
      >>> mdp = make_tree_mdp(horizon=1)
      >>> bool(np.allclose(soft_q_of_policy(mdp, np.full((1, 3), 1/3), np.full((1, 3), 1/3), 1.0), mdp.reward))
      True
    """
    q = np.zeros((mdp.num_states, mdp.n_actions))
    kl = kl_per_state(pi, pi_b)
    for s in reversed(range(mdp.num_states)):
        for a in range(mdp.n_actions):
            c = mdp.child[s, a]
            q[s, a] = mdp.reward[s, a]
            if c >= 0:
                q[s, a] += mdp.gamma * (np.dot(pi[c], q[c]) - tau * kl[c])
    return q


def beta_from_alpha(alpha: float, tau: float) -> float:
    """Eq. (18): ``β = τ (1 - α) / α`` (α in (0, 1]; β = 0 at α = 1).

    Example:
      >>> beta_from_alpha(0.5, 0.1)
      0.1
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"beta_from_alpha: alpha must lie in (0, 1], got {alpha}.")
    return tau * (1.0 - alpha) / alpha


def _pv_expected_returns(mdp, pi_k, v_k, pi_b, tau, lam):
    """(π, V)-space: Δ = E[Σ(λγ)^{k-t} δ_k] with δ from Eq. (14), and the log-ratio τ log(π_k/π_b)."""
    _check_policy(pi_k, "pi_k")
    _check_policy(pi_b, "pi_b")
    kl_term = tau * (np.log(pi_k) - np.log(pi_b))  # [S, A]
    v_next = np.where(mdp.child >= 0, v_k[np.maximum(mdp.child, 0)], 0.0)
    # Eq. (14), written as PPO writes its TD error (Algorithm 1): KL-shaped reward r̄ = r - τ log(π/π_b)
    # and δ = r̄ + γ V(s') - V(s); identical to r + γV(s') - Q[π,V](s,a).
    delta = (mdp.reward - kl_term) + mdp.gamma * v_next - v_k[:, None]
    return _discounted_td_sum(mdp, delta, pi_k, lam), kl_term


def lambda_advantage_pv(
    mdp: TreeMDP, pi_k: np.ndarray, v_k: np.ndarray, pi_b: np.ndarray, tau: float, lam: float
) -> np.ndarray:
    """Eq. (16) in expectation: ``Â[π_k,V_k](s,a) = E_{π_k}[G^λ[π_k,V_k] | s,a] - V_k(s)``, ``[S, A]``.

    With Q_k = Q[π_k, V_k] (Eq. 12), G^λ = Q_k + Σ(λγ)^{k-t} δ_k (Eq. (7) at α = 1, δ from Eq. (14)),
    so Â = τ log(π_k(a|s)/π_b(a|s)) + Δ(s,a): the GAE of Algorithm 1 (KL-shaped rewards) plus the
    log-ratio of the first action. Computed from (π_k, V_k) alone, never from a Q table.

    Example:
      >>> mdp = make_tree_mdp(horizon=1)
      >>> u = np.full((1, 3), 1 / 3)
      >>> bool(np.allclose(lambda_advantage_pv(mdp, u, np.zeros(1), u, 1.0, 0.9), mdp.reward))
      True
    """
    delta_sum, kl_term = _pv_expected_returns(mdp, pi_k, v_k, pi_b, tau, lam)
    return kl_term + delta_sum


def proximal_policy_closed_form(
    pi_k: np.ndarray, pi_b: np.ndarray, adv: np.ndarray, beta: float, tau: float
) -> np.ndarray:
    """The unique maximiser of Eq. (17) at every state, in closed form; ``[S, A]``.

    Per state, maximise over the simplex
        F(π) = Σ_a π(a) Â(a) - β Σ_a π log(π/π_k) - τ Σ_a π log(π/π_b)
    (``E_{π_k}[π/π_k Â] = Σ_a π Â`` with Â the conditional mean of the advantage). F is strictly
    concave (β + τ > 0); the stationarity condition Â(a) - β(log π(a)/π_k(a) + 1)
    - τ(log π(a)/π_b(a) + 1) = const gives

        π(a) ∝ π_k(a)^{β/(β+τ)} π_b(a)^{τ/(β+τ)} exp(Â(a)/(β+τ)),

    an interior point, hence the maximiser. With β = τ(1-α)/α (Eq. 18): β+τ = τ/α and
    π ∝ π_k^{1-α} π_b^α exp(αÂ/τ), the form App. C reaches from π[B^{λ,α}Q_k]. Averaging F over any
    state distribution with full support (Eq. (17) uses π_k's visitation) has the same maximiser.

    Example:
      >>> u = np.full((1, 2), 0.5)
      >>> proximal_policy_closed_form(u, u, np.array([[0.0, np.log(3.0)]]), beta=0.0, tau=1.0).round(3).tolist()
      [[0.25, 0.75]]
    """
    logits = (beta * np.log(pi_k) + tau * np.log(pi_b) + adv) / (beta + tau)
    return _softmax(logits)


def proximal_policy_objective(
    pi: np.ndarray, pi_k: np.ndarray, pi_b: np.ndarray, adv: np.ndarray, beta: float, tau: float
) -> np.ndarray:
    """Eq. (17) at every state: ``Σ_a π Â - β D(π‖π_k) - τ D(π‖π_b)``, ``[S]`` (any ``[..., A]`` batch).

    Example:
      >>> u = np.full((1, 2), 0.5)
      >>> proximal_policy_objective(u, u, u, np.array([[1.0, 3.0]]), 1.0, 1.0).tolist()
      [2.0]
    """
    ent = lambda p, r: np.sum(p * (np.log(p) - np.log(r)), axis=-1)  # noqa: E731
    return np.sum(pi * adv, axis=-1) - beta * ent(pi, pi_k) - tau * ent(pi, pi_b)


def pv_value_targets(
    mdp: TreeMDP,
    pi_k: np.ndarray,
    v_k: np.ndarray,
    pi_next: np.ndarray,
    pi_b: np.ndarray,
    tau: float,
    lam: float,
    alpha: float,
) -> np.ndarray:
    """Eq. (20) in expectation given (s, a): ``ȳ(s,a) = E[G^{λ,α}[V_k,π_k] | s,a] - τ log(π_{k+1}/π_b)``.

    ``G^{λ,α} = Q[π_k,V_k] + α Σ(λγ)^{k-t} δ_k`` (Eq. (7) with δ from Eq. (14)), continuation under
    π_k. Returns ``[S, A]``.

    Example:
      >>> mdp = make_tree_mdp(horizon=1)
      >>> u = np.full((1, 3), 1 / 3)
      >>> bool(np.allclose(pv_value_targets(mdp, u, np.zeros(1), u, u, 1.0, 0.5, 1.0), mdp.reward))
      True
    """
    delta_sum, kl_term = _pv_expected_returns(mdp, pi_k, v_k, pi_b, tau, lam)
    g_alpha = kl_term + v_k[:, None] + alpha * delta_sum
    return g_alpha - tau * (np.log(pi_next) - np.log(pi_b))


def pv_step(
    mdp: TreeMDP,
    pi_k: np.ndarray,
    v_k: np.ndarray,
    pi_b: np.ndarray,
    tau: float,
    lam: float,
    alpha: float,
    action_dist: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One (π, V)-space iteration of §4: π_{k+1} maximises Eq. (17), V_{k+1} minimises Eq. (19).

    - π_{k+1} = ``proximal_policy_closed_form(π_k, π_b, Â[π_k, V_k], β, τ)`` with β from Eq. (18).
    - V_{k+1}(s) = E[y | s] = Σ_a μ(a|s) ȳ(s,a) (the least-squares minimiser of Eq. (19) is the
      conditional mean of y given s), with ȳ from ``pv_value_targets`` and μ the action
      distribution at s in the regression data: π_k for on-policy rollouts (the default).

    App. C shows ȳ(s,a) does not depend on a (it equals V[Q_{k+1}](s)), so any full-support μ
    gives the same V_{k+1}; the continuation after (s, a) must still follow π_k.

    Returns:
      ``(pi_next [S, A], v_next [S])``.

    Example:
      >>> mdp = make_tree_mdp(horizon=2)
      >>> u = np.full((mdp.num_states, 3), 1 / 3)
      >>> pi1, v1 = pv_step(mdp, u, np.zeros(3), u, tau=1.0, lam=0.5, alpha=0.5)
      >>> bool(np.allclose(pi1.sum(-1), 1.0)), v1.shape
      (True, (3,))
    """
    beta = beta_from_alpha(alpha, tau)
    adv = lambda_advantage_pv(mdp, pi_k, v_k, pi_b, tau, lam)
    pi_next = proximal_policy_closed_form(pi_k, pi_b, adv, beta, tau)
    y_bar = pv_value_targets(mdp, pi_k, v_k, pi_next, pi_b, tau, lam, alpha)
    mu = pi_k if action_dist is None else action_dist
    return pi_next, np.sum(mu * y_bar, axis=-1)
