"""Exact evaluation against the known optimum of the KL-regularised objective (enumerable tasks).

With γ = 1 and a sequence-level reward R(x, y) (the ω penalty included: ω when y contains no EOS,
TRL's ``missing_eos_penalty``, as in :mod:`klq_jax.rollout`; a response of exactly T_max tokens
ending in EOS is not penalised, unlike the literal ``1[T = T_max]`` of Algorithms 1-2), the
token-level KL-regularised problem of §2 is the contextual bandit

    J_x(π) = E_{y~π(.|x)}[R(x, y)] - τ KL(π(.|x) ‖ π_b(.|x))                     (Eq. 3, Remark 2.1)

whose maximiser and optimal value are known in closed form (App. A, Theorem A.4 at the sequence
level):

    π*(y|x) = π_b(y|x) exp(R(x, y)/τ) / Z(x),      J*_x = τ log Z(x) = τ log E_{y~π_b}[e^{R(x,y)/τ}],

and for any π,  J*_x - J_x(π) = τ KL(π(.|x) ‖ π*(.|x)) >= 0.

When the vocabulary and the response length are tiny (e.g. 4-8 tokens, T_max <= 5) every response
can be enumerated, so π(y|x) of a network is computed exactly by walking the prefix tree, one
batched call per depth. This module does that and reports J(π), J*, E_π[R], KL(π‖π_b) and
KL(π‖π*) exactly. π and π_b are whatever the callables give: for a trained run, both at the
run's sampling temperature (:func:`model_next_logprobs`), since that is the objective it optimises.
Everything here is numpy float64 (exact bookkeeping of small numbers); the
network itself is reached only through a callable.

The callable. ``next_logprobs_fn(tokens [N, L] int32, mask [N, L] float32) -> [N, V]`` returns
the log-probabilities of the next token after the last real token of each LEFT-padded row (real
tokens are the prompt followed by the response prefix; the last column is always real). It may be
a jitted JAX function or plain numpy. Its output is renormalised in float64 (a log-softmax), which
is a no-op up to float32 rounding for a true log-softmax and makes the enumerated probabilities
sum to 1 to float64 precision.

Example (a uniform "network"):
    >>> import numpy as np
    >>> uniform = lambda tokens, mask: np.zeros((tokens.shape[0], 3), np.float32)
    >>> responses, mask, truncated = enumerate_responses(3, eos_id=0, t_max=2)
    >>> logp = sequence_logprobs(uniform, np.array([1, 2]), np.ones(2), 2, 3, eos_id=0)
    >>> round(float(np.exp(logp).sum()), 12)
    1.0
    >>> rewards = truncated.astype(float)          # prefer running to t_max
    >>> j_star, log_pi_star = exact_optimum(logp, rewards, tau=1.0)
    >>> stats = exact_objective(logp, logp, rewards, tau=1.0)   # π = π_b
    >>> bool(stats["J"] <= j_star), round(stats["kl_to_ref"], 6)
    (True, 0.0)
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Optional, Union

import numpy as np

__all__ = [
    "enumerate_responses",
    "num_responses",
    "sequence_logprobs",
    "sequence_logprobs_batch",
    "exact_optimum",
    "exact_objective",
    "exact_evaluation",
    "model_next_logprobs",
]

NextLogprobsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

MAX_RESPONSES = 2_000_000


def num_responses(vocab_size: int, t_max: int) -> int:
    """Number of distinct responses: Σ_{t=0}^{t_max-1} (V-1)^t (ending in EOS) + (V-1)^{t_max} (truncated).

    Example:
      >>> num_responses(3, 2)   # [EOS], [a,EOS] x2, [a,b] x4
      7
    """
    k = vocab_size - 1
    return sum(k**t for t in range(t_max)) + k**t_max


def _check_sizes(vocab_size: int, eos_id: int, t_max: int, fn: str) -> None:
    if vocab_size < 2:
        raise ValueError(f"{fn}: vocab_size must be >= 2 (EOS and at least one other token), got {vocab_size}.")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"{fn}: eos_id={eos_id} must lie in [0, vocab_size={vocab_size}).")
    if t_max < 1:
        raise ValueError(f"{fn}: t_max must be >= 1, got {t_max}.")
    m = num_responses(vocab_size, t_max)
    if m > MAX_RESPONSES:
        raise ValueError(
            f"{fn}: vocab_size={vocab_size}, t_max={t_max} give {m} responses, too many to enumerate "
            f"(limit {MAX_RESPONSES}). Exact evaluation is for toy tasks: use a smaller vocabulary or t_max."
        )


def _prefixes(non_eos: np.ndarray, depth: int) -> np.ndarray:
    """All EOS-free prefixes of length ``depth`` in lexicographic order of ``non_eos``: ``[(V-1)^depth, depth]``."""
    if depth == 0:
        return np.zeros((1, 0), dtype=np.int32)
    return np.array(list(itertools.product(non_eos, repeat=depth)), dtype=np.int32).reshape(-1, depth)


def enumerate_responses(
    vocab_size: int, eos_id: int, t_max: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every possible response: sequences ending at their first EOS, or running to ``t_max`` without EOS.

    Order (shared with ``sequence_logprobs``): first the EOS-terminated responses by length
    1..t_max (within a length, lexicographic in the non-EOS token ids), then the truncated ones
    (length t_max, no EOS), lexicographic.

    Args:
      vocab_size: number of tokens V.
      eos_id: id of the EOS token.
      t_max: maximum response length T_max.
      pad_id: token written after the end of a response (masked out).

    Returns:
      ``responses [M, t_max] int32``, ``mask [M, t_max] float32`` (1 on real tokens, EOS
      included), ``truncated [M] bool`` (no EOS: the ω penalty applies, see :mod:`klq_jax.rollout`), with
      ``M = num_responses(vocab_size, t_max)``.

    Example:
      >>> r, m, tr = enumerate_responses(3, eos_id=0, t_max=2)
      >>> r.tolist()
      [[0, 0], [1, 0], [2, 0], [1, 1], [1, 2], [2, 1], [2, 2]]
      >>> m.sum(-1).tolist(), tr.tolist()
      ([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [False, False, False, True, True, True, True])
    """
    _check_sizes(vocab_size, eos_id, t_max, "enumerate_responses")
    non_eos = np.array([a for a in range(vocab_size) if a != eos_id], dtype=np.int32)
    rows, masks, trunc = [], [], []
    for depth in range(t_max):
        pre = _prefixes(non_eos, depth)
        n = pre.shape[0]
        r = np.full((n, t_max), pad_id, dtype=np.int32)
        r[:, :depth] = pre
        r[:, depth] = eos_id
        m = np.zeros((n, t_max), dtype=np.float32)
        m[:, : depth + 1] = 1.0
        rows.append(r), masks.append(m), trunc.append(np.zeros(n, dtype=bool))
    pre = _prefixes(non_eos, t_max)
    rows.append(pre), masks.append(np.ones(pre.shape, np.float32)), trunc.append(np.ones(pre.shape[0], bool))
    return np.concatenate(rows), np.concatenate(masks), np.concatenate(trunc)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def _logsumexp(x: np.ndarray, axis=-1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def sequence_logprobs_batch(
    next_logprobs_fn: NextLogprobsFn,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    t_max: int,
    vocab_size: int,
    eos_id: int,
    *,
    pad_id: int = 0,
    max_rows: Optional[int] = None,
) -> np.ndarray:
    """``log π(y|x)`` of every enumerated response for a batch of prompts, ``[P, M]`` float64.

    Walks the prefix tree level by level: at depth d = 0..t_max-1 the live prefixes are the
    (V-1)^d EOS-free prefixes of every prompt, sent in ONE call (``P·(V-1)^d`` rows of length
    ``Tq + d``; ``max_rows`` splits it into chunks if memory asks). Then

        log π(y|x) = Σ_t log π(y_t | x, y_<t),

    a response ending with EOS at depth d collecting ``log π(EOS|·)`` and a truncated one the
    log-prob of its last token at depth t_max-1.

    Args:
      next_logprobs_fn: ``(tokens [N, L] int32, mask [N, L] float32) -> [N, V]`` next-token
        log-probs of left-padded rows (see module docstring).
      prompt_ids: ``[P, Tq]`` int, left-padded prompts.
      prompt_mask: ``[P, Tq]`` float/bool, 1 on real prompt tokens (zeros only on the left).
      t_max: maximum response length.
      vocab_size: V (the callable must return ``[N, V]``).
      eos_id: EOS token id.
      pad_id: token id used for left padding.
      max_rows: optional cap on rows per call.

    Returns:
      ``[P, M]`` float64 in the order of ``enumerate_responses``; ``exp`` sums to 1 per prompt.

    Example:
      >>> fn = lambda tok, m: np.log(np.tile([[0.5, 0.25, 0.25]], (tok.shape[0], 1)))
      >>> lp = sequence_logprobs_batch(fn, np.array([[5], [6]]), np.ones((2, 1)), 2, 3, eos_id=0)
      >>> np.exp(lp[0]).round(4).tolist()   # EOS; a,EOS; b,EOS; then 4 truncated
      [0.5, 0.125, 0.125, 0.0625, 0.0625, 0.0625, 0.0625]
    """
    _check_sizes(vocab_size, eos_id, t_max, "sequence_logprobs")
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask, dtype=np.float32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"sequence_logprobs_batch: prompt_ids and prompt_mask must both be [P, Tq], got "
            f"{prompt_ids.shape} and {prompt_mask.shape}. For one prompt use sequence_logprobs."
        )
    if np.any(np.diff(prompt_mask, axis=-1) < 0):
        raise ValueError(
            "sequence_logprobs_batch: prompts must be LEFT-padded (mask zeros only before the first "
            "real token); re-pad them on the left."
        )
    if np.any(prompt_mask[:, -1] == 0) and prompt_ids.shape[1] > 0:
        raise ValueError("sequence_logprobs_batch: a prompt has no real token; every prompt needs >= 1 token.")
    P, Tq = prompt_ids.shape
    non_eos = np.array([a for a in range(vocab_size) if a != eos_id], dtype=np.int32)
    cum = np.zeros((P, 1), dtype=np.float64)  # log-prob of each live prefix, [P, (V-1)^d]
    eos_parts = []
    for depth in range(t_max):
        pre = _prefixes(non_eos, depth)  # [n, d]
        n = pre.shape[0]
        tokens = np.concatenate(
            [np.repeat(prompt_ids.astype(np.int32), n, axis=0), np.tile(pre, (P, 1))], axis=1
        )  # [P*n, Tq+d], prompt-major
        mask = np.concatenate(
            [np.repeat(prompt_mask, n, axis=0), np.ones((P * n, depth), np.float32)], axis=1
        )
        tokens = np.where(mask > 0, tokens, pad_id).astype(np.int32)
        logp = _call(next_logprobs_fn, tokens, mask, vocab_size, max_rows).reshape(P, n, vocab_size)
        eos_parts.append(cum + logp[:, :, eos_id])  # responses (prefix, EOS)
        # children: prefix-major then token, = lexicographic order of the next depth's prefixes
        cum = (cum[:, :, None] + logp[:, :, non_eos]).reshape(P, n * len(non_eos))
    return np.concatenate(eos_parts + [cum], axis=1)


def _call(fn, tokens, mask, vocab_size, max_rows) -> np.ndarray:
    n = tokens.shape[0]
    step = n if not max_rows else max(1, int(max_rows))
    outs = []
    for i in range(0, n, step):
        out = np.asarray(fn(tokens[i : i + step], mask[i : i + step]))
        if out.shape != (min(step, n - i), vocab_size):
            raise ValueError(
                f"next_logprobs_fn returned shape {out.shape} for {min(step, n - i)} rows; expected "
                f"[N, vocab_size={vocab_size}] next-token log-probs."
            )
        outs.append(out)
    out = np.concatenate(outs, axis=0)
    if not np.all(np.isfinite(out) | (out == -np.inf)) or np.any(out == np.inf):
        raise ValueError("next_logprobs_fn returned NaN or +inf log-probs; check the model and its inputs.")
    return _log_softmax64(out)


def sequence_logprobs(
    next_logprobs_fn: NextLogprobsFn,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    t_max: int,
    vocab_size: int,
    eos_id: int,
    *,
    pad_id: int = 0,
    max_rows: Optional[int] = None,
) -> np.ndarray:
    """``log π(y|x)`` of every enumerated response for one prompt ``[Tq]``: ``[M]`` float64.

    One call of ``next_logprobs_fn`` per depth (see ``sequence_logprobs_batch``).

    Example:
      >>> fn = lambda tok, m: np.log(np.tile([[0.5, 0.5]], (tok.shape[0], 1)))
      >>> np.exp(sequence_logprobs(fn, np.array([3]), np.array([1.0]), 2, 2, eos_id=0)).tolist()
      [0.5, 0.25, 0.25]
    """
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 1:
        raise ValueError(f"sequence_logprobs: prompt_ids must be [Tq], got {prompt_ids.shape}; use sequence_logprobs_batch for [P, Tq].")
    return sequence_logprobs_batch(
        next_logprobs_fn, prompt_ids[None], np.asarray(prompt_mask)[None], t_max, vocab_size, eos_id,
        pad_id=pad_id, max_rows=max_rows,
    )[0]


def _check_normalised(seq_logp: np.ndarray, name: str) -> np.ndarray:
    seq_logp = np.asarray(seq_logp, dtype=np.float64)
    if seq_logp.ndim != 1:
        raise ValueError(f"{name} must be [M] (one prompt), got shape {seq_logp.shape}.")
    total = float(np.exp(_logsumexp(seq_logp)))
    if abs(total - 1.0) > 1e-4:
        raise ValueError(
            f"{name}: the probabilities of the responses sum to {total:.6f}, not 1. Pass log π(y|x) of "
            "EVERY response, as returned by sequence_logprobs for the enumerate_responses order."
        )
    return seq_logp


def exact_optimum(ref_seq_logp: np.ndarray, rewards: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
    """The optimum of E_π[R] - τ KL(π‖π_b) over sequence policies, for one prompt.

    ``J* = τ log Σ_y π_b(y|x) e^{R(x,y)/τ}`` and ``log π*(y|x) = log π_b(y|x) + R/τ - J*/τ``.

    Args:
      ref_seq_logp: ``[M]`` log π_b(y|x) of every response (sums to 1 in probability).
      rewards: ``[M]`` sequence rewards R(x, y) (ω penalty included where it applies).
      tau: KL coefficient τ > 0.

    Returns:
      ``(J* float, log π* [M] float64)``.

    Example:
      >>> j, lp = exact_optimum(np.log([0.5, 0.5]), np.array([0.0, 1.0]), tau=1.0)
      >>> round(j, 6), np.exp(lp).round(4).tolist()
      (0.620115, [0.2689, 0.7311])
    """
    if not tau > 0:
        raise ValueError(f"exact_optimum: tau must be > 0, got {tau}.")
    ref = _check_normalised(ref_seq_logp, "exact_optimum: ref_seq_logp")
    ref = ref - _logsumexp(ref)  # exact normalisation in float64
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != ref.shape:
        raise ValueError(f"exact_optimum: rewards {r.shape} must match ref_seq_logp {ref.shape}.")
    z = ref + r / tau
    log_z = _logsumexp(z)
    return float(tau * log_z), z - log_z


def _expect(p: np.ndarray, x: np.ndarray) -> float:
    """Σ p x with 0·anything = 0 (responses of probability 0 contribute nothing)."""
    return float(np.sum(np.where(p > 0, p * x, 0.0)))


def exact_objective(
    pol_seq_logp: np.ndarray, ref_seq_logp: np.ndarray, rewards: np.ndarray, tau: float
) -> dict:
    """Exact J(π), E_π[R], KL(π‖π_b) and KL(π‖π*) of a sequence policy, for one prompt.

    ``J(π) = E_π[R] - τ KL(π‖π_b)`` (Eq. 3 in expectation); ``J* - J(π) = τ KL(π‖π*)``.

    Args:
      pol_seq_logp: ``[M]`` log π(y|x) of every response.
      ref_seq_logp: ``[M]`` log π_b(y|x).
      rewards: ``[M]`` R(x, y).
      tau: τ > 0.

    Returns:
      dict of floats: ``J``, ``reward``, ``kl_to_ref``, ``kl_to_opt``, ``j_star``, ``gap`` (J* - J).

    Example:
      >>> ref = np.log([0.5, 0.5]); r = np.array([0.0, 1.0])
      >>> _, opt = exact_optimum(ref, r, 1.0)
      >>> s = exact_objective(opt, ref, r, 1.0)
      >>> round(s["J"], 6), round(s["kl_to_opt"], 9)
      (0.620115, 0.0)
    """
    pol = _check_normalised(pol_seq_logp, "exact_objective: pol_seq_logp")
    pol = pol - _logsumexp(pol)
    ref = _check_normalised(ref_seq_logp, "exact_objective: ref_seq_logp")
    ref = ref - _logsumexp(ref)
    r = np.asarray(rewards, dtype=np.float64)
    if not (pol.shape == ref.shape == r.shape):
        raise ValueError(
            f"exact_objective: pol_seq_logp {pol.shape}, ref_seq_logp {ref.shape} and rewards {r.shape} must all be [M]."
        )
    j_star, log_opt = exact_optimum(ref, r, tau)
    p = np.exp(pol)
    reward = _expect(p, r)
    kl_ref = _expect(p, pol - ref)
    kl_opt = _expect(p, pol - log_opt)
    j = reward - tau * kl_ref
    return {"J": j, "reward": reward, "kl_to_ref": kl_ref, "kl_to_opt": kl_opt, "j_star": j_star, "gap": j_star - j}


RewardsArg = Union[np.ndarray, Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]]


def exact_evaluation(
    policy_fn: NextLogprobsFn,
    ref_fn: NextLogprobsFn,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    rewards: RewardsArg,
    *,
    tau: float,
    t_max: int,
    vocab_size: int,
    eos_id: int,
    prompt_weights: Optional[np.ndarray] = None,
    pad_id: int = 0,
    max_rows: Optional[int] = None,
) -> dict:
    """``exact_objective`` for several prompts, averaged over the prompt distribution.

    Args:
      policy_fn, ref_fn: next-token log-prob callables of π and π_b.
      prompt_ids: ``[P, Tq]`` left-padded prompts; ``prompt_mask`` ``[P, Tq]``.
      rewards: ``[P, M]`` array of R(x, y) in ``enumerate_responses`` order, or a callable
        ``(prompt_ids [Tq], prompt_mask [Tq], responses [M, T], response_mask [M, T],
        truncated [M]) -> [M]`` called once per prompt (add the ω penalty there).
      tau, t_max, vocab_size, eos_id: as above.
      prompt_weights: ``[P]`` probabilities of the prompts (uniform by default).

    Returns:
      dict with the weighted means of ``J, reward, kl_to_ref, kl_to_opt, j_star, gap`` (floats) and
      ``per_prompt``: a dict of ``[P]`` arrays of the same keys.

    Example:
      >>> u = lambda tok, m: np.zeros((tok.shape[0], 2), np.float32)
      >>> out = exact_evaluation(u, u, np.array([[1], [1]]), np.ones((2, 1)), np.zeros((2, 3)),
      ...                        tau=1.0, t_max=2, vocab_size=2, eos_id=0)
      >>> round(out["J"], 9), round(out["j_star"], 9)
      (0.0, 0.0)
    """
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask, dtype=np.float32)
    P = prompt_ids.shape[0]
    kw = dict(pad_id=pad_id, max_rows=max_rows)
    pol = sequence_logprobs_batch(policy_fn, prompt_ids, prompt_mask, t_max, vocab_size, eos_id, **kw)
    ref = sequence_logprobs_batch(ref_fn, prompt_ids, prompt_mask, t_max, vocab_size, eos_id, **kw)
    if callable(rewards):
        responses, rmask, truncated = enumerate_responses(vocab_size, eos_id, t_max, pad_id)
        r = np.stack(
            [np.asarray(rewards(prompt_ids[i], prompt_mask[i], responses, rmask, truncated), np.float64) for i in range(P)]
        )
    else:
        r = np.asarray(rewards, dtype=np.float64)
    if r.shape != pol.shape:
        raise ValueError(f"exact_evaluation: rewards must be [P, M] = {pol.shape}, got {r.shape}.")
    w = np.full(P, 1.0 / P) if prompt_weights is None else np.asarray(prompt_weights, np.float64)
    if w.shape != (P,) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-8:
        raise ValueError(f"exact_evaluation: prompt_weights must be [P={P}] probabilities summing to 1.")
    rows = [exact_objective(pol[i], ref[i], r[i], tau) for i in range(P)]
    per_prompt = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    out = {k: float(np.dot(w, v)) for k, v in per_prompt.items()}
    out["per_prompt"] = per_prompt
    return out


def model_next_logprobs(graphdef, params, *, temperature: float = 1.0) -> NextLogprobsFn:
    """The ``next_logprobs_fn`` of a GPT-NeoX network ``(graphdef, params)``: the adapter to this module.

    Returns ``fn(tokens [N, L] int32, mask [N, L] float32) -> [N, V]`` float32 numpy: the
    log-softmax of ``logits / temperature`` at the last (real) column of left-padded rows, i.e.
    ``log π(. | x, y_<t)`` of the policy that the trainer samples from at that temperature. Pass the
    run's training temperature (``TrainConfig.temperature``) for both π and π_b: the objective a
    run optimises, and whose exact optimum this module computes, is the one between the
    temperature-scaled policies (π and π_b both at T = 0.7 in the paper presets); 1.0 (the
    default) is the plain network, right only for a run trained at temperature 1. One jitted
    forward per row shape (the
    prefix-tree walk has ``t_max`` shapes); only the last position is unembedded.

    Example:
      >>> import jax
      >>> from klq_jax.models import gpt_neox
      >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(vocab_size=3), jax.random.key(0))
      >>> fn = model_next_logprobs(gd, p)
      >>> lp = sequence_logprobs(fn, np.array([1, 2]), np.ones(2, np.float32), 3, 3, eos_id=0)
      >>> round(float(np.exp(lp).sum()), 9)
      1.0
    """
    if not temperature > 0:
        raise ValueError(f"model_next_logprobs: temperature must be > 0, got {temperature}.")
    t = float(temperature)

    def fn(tokens, mask):
        tokens = np.asarray(tokens, np.int32)
        mask = np.asarray(mask, np.float32)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"model_next_logprobs: tokens and mask must be [N, L], got {tokens.shape}, {mask.shape}.")
        return np.asarray(_next_logprobs_jit(graphdef, params, tokens, mask, t))

    return fn


@functools.lru_cache(maxsize=None)
def _jitted_next_logprobs():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def next_logprobs(graphdef, params, tokens, mask, temperature):
        model = nnx.merge(graphdef, params)
        hidden = model(tokens, mask, logits=False, queries_from=tokens.shape[1] - 1).hidden[:, -1]
        logits = model.logits(hidden).astype(jnp.float32) / temperature
        return jax.nn.log_softmax(logits, axis=-1)

    return jax.jit(next_logprobs, static_argnames=("graphdef", "temperature"))


def _next_logprobs_jit(graphdef, params, tokens, mask, temperature):
    return _jitted_next_logprobs()(graphdef, params, tokens, mask, temperature)
