"""Jitted autoregressive sampling from a GPT-NeoX policy with a KV cache.

This is the "generate rollouts" step of Algorithms 1 and 2 (Appendix B): starting at each prompt
``x``, sample ``y_1, y_2, …`` from the current policy until a stop token or ``T_max`` tokens.

One call of :func:`sample` is one compiled XLA program (one compile per batch size, prompt length,
``T_max`` and :class:`SamplingConfig`):

1. **prefill**: one forward pass over the left-padded prompts writes their keys/values into a
   cache of ``Tq + T_max - 1`` slots and gives the logits of the last prompt position
   (``GPTNeoX(..., prefill=True)``: attention among the ``Tq`` prompt tokens only, and the last
   layer's attention output, MLP, final norm and unembedding at the last position only);
2. **decode**: a ``lax.while_loop`` feeds back one token per step and stops as soon as every row has
   emitted a stop token (or after ``T_max`` tokens). The cache is loop state, so XLA updates it in
   place (it is created inside the program and never copied between steps: the donation happens
   inside the compiled loop rather than through ``donate_argnums``).

Sampling distribution
---------------------
With logits ``l`` and temperature ``T``, the sampling distribution is ``p = softmax(l / T)``
(``π(·|s)^{1/T}`` normalised). ``top_k`` keeps the ``k`` most likely tokens (and any tied with the
``k``-th, as Hugging Face does), then ``top_p`` keeps the
smallest set of the remaining (renormalised) most likely tokens whose mass reaches ``top_p``, and
the token is drawn from ``p`` restricted to the kept set and renormalised (the order of Hugging
Face's warpers: temperature, top-k, top-p). ``greedy`` takes ``argmax l`` (the first maximum).

The returned ``logprobs`` are always ``log softmax(l / T)[token]``, the log-prob under the
temperature-scaled *full* softmax, whatever top-k/top-p did: that is the distribution ``π`` that
the RLHF losses and the KL refer to (as TRL, which samples with top_k=0, top_p=1). With top-k or
top-p active the token was drawn from the truncated distribution, whose log-prob is larger by
``-log(kept mass)``; with ``greedy`` it is the log-prob of the argmax token.

Random numbers: each decode step ``t`` uses ``jax.random.fold_in(key, t)`` and draws ONE uniform
per row; the token is found by inverse-CDF sampling over the vocabulary in two levels (blocks of
``_BLOCK`` tokens, then inside the chosen block), which is exact up to float32 rounding and several
times cheaper on CPU than Gumbel-max over the full vocabulary. Tokens of probability zero (filtered
by top-k/top-p) are never drawn. The same key always gives the same tokens.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from klq_jax.models import gpt_neox
  >>> from klq_jax.sampling import SamplingConfig, sample
  >>> graphdef, params = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(), jax.random.key(0))
  >>> prompts = jnp.array([[0, 0, 5, 6], [7, 8, 9, 10]]); pmask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  >>> out = sample(graphdef, params, prompts, pmask, jax.random.key(1),
  ...              SamplingConfig(max_new_tokens=5, stop_token_ids=(3,)))
  >>> out.tokens.shape, out.mask.shape, out.logprobs.dtype
  ((2, 5), (2, 5), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax import sharding
from klq_jax.config import sampling_problems
from klq_jax.errors import PromptTooLongError
from klq_jax.models import gpt_neox

Array = jax.Array

__all__ = ["SamplingConfig", "SampleResult", "kept_tokens", "sample", "sample_from_logits"]

# Block size of the two-level inverse-CDF sampler.
_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (hashable: it is a static argument of the compiled sampler).

    Attributes:
      max_new_tokens: ``T_max``, the most response tokens per row (>= 1).
      temperature: ``T > 0``; the sampling distribution is ``softmax(logits / T)``. Also used for the
        returned log-probs when ``greedy``.
      top_k: keep only the ``k`` most likely tokens, and those tied with the ``k``-th (0 = off).
      top_p: nucleus sampling, keep the smallest top set with mass ``>= top_p`` (1.0 = off).
      greedy: take the argmax of the logits instead of sampling (ignores top_k/top_p and the key).
      stop_token_ids: token ids that end a response (kept as its last real token). Empty: never
        stop early (every row runs ``T_max`` tokens). Pythia's EOS is 0.
      pad_token_id: id written after a row's stop token.

    Example:
      >>> from klq_jax.sampling import SamplingConfig
      >>> SamplingConfig(max_new_tokens=53, temperature=0.7).stop_token_ids
      (0,)
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = (0,)
    pad_token_id: int = 0

    def __post_init__(self):
        problems = []

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        for problem in sampling_problems(self.temperature, self.top_k, self.top_p):
            hint = " (use greedy=True for argmax decoding)" if problem.startswith("temperature=") else ""
            problems.append(problem + hint)
        if not isinstance(self.greedy, bool):
            problems.append(f"greedy={self.greedy!r} must be a bool")
        stops = self.stop_token_ids
        if is_int(stops):
            stops = (stops,)
        try:
            stops = tuple(stops)
        except TypeError:
            stops = None
        if stops is None or not all(is_int(s) and s >= 0 for s in stops):
            problems.append(
                f"stop_token_ids={self.stop_token_ids!r} must be a tuple of non-negative token ids "
                "(() to never stop early)"
            )
        else:
            object.__setattr__(self, "stop_token_ids", tuple(int(s) for s in stops))
        if not is_int(self.pad_token_id) or self.pad_token_id < 0:
            problems.append(f"pad_token_id={self.pad_token_id!r} must be a non-negative token id")
        if problems:
            raise ValueError("Invalid SamplingConfig: " + "; ".join(problems))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "pad_token_id", int(self.pad_token_id))

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


class SampleResult(NamedTuple):
    """What :func:`sample` returns (``T_max = config.max_new_tokens``).

    Attributes:
      tokens: ``[B, T_max]`` int32 response tokens; ``pad_token_id`` after a row's stop token.
      mask: ``[B, T_max]`` float32, 1 on real response tokens (the stop token included), 0 after.
      lengths: ``[B]`` int32 number of real response tokens (``mask.sum(-1)``).
      stopped: ``[B]`` bool, the row ended on a stop token.
      truncated: ``[B]`` bool, ``~stopped``: the row reached ``T_max`` without a stop token.
      logprobs: ``[B, T_max]`` float32 ``log softmax(logits / temperature)[token]`` of each sampled
        token (the full temperature-scaled softmax, see the module docstring); 0 on padding.
    """

    tokens: Array
    mask: Array
    lengths: Array
    stopped: Array
    truncated: Array
    logprobs: Array


class SamplerState(NamedTuple):
    """The decode loop's carry (``lax.while_loop`` state) after ``t`` tokens per row.

    Attributes:
      t: ``[]`` int32, the response slot the next step writes (1 after the prefill).
      cache: the model's KV cache (``gpt_neox.KVCache``, ``B`` rows of ``Tq + T_max - 1`` slots).
      prev: ``[B]`` int32, the token sampled last (fed back at the next step).
      done: ``[B]`` bool, the row has emitted a stop token.
      tokens: ``[B, T_max]`` int32 tokens so far (``pad_token_id`` elsewhere).
      logps: ``[B, T_max]`` float32 log-probs of those tokens (0 elsewhere).
      mask: ``[B, T_max]`` float32, 1 on real response tokens so far.
    """

    t: Array
    cache: object
    prev: Array
    done: Array
    tokens: Array
    logps: Array
    mask: Array


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


def _inverse_cdf(u: Array, weights: Array, *, return_total: bool = False):
    """Index ``i`` with ``C_{i-1} < u·C_n <= C_i`` for ``C`` the cumulative sum of ``weights [B, n]``.

    ``u [B]`` in ``(0, 1]``; ``weights >= 0`` (unnormalised) with a positive sum. Two levels (block
    sums, then inside the block) keep the cumulative sums short, which is fast and accurate in
    float32. An entry of weight 0 is never returned. With ``return_total`` also returns the total
    ``C_n [B]`` (the normaliser, so the caller needs no second pass over the weights).
    """
    B, n = weights.shape
    block = min(_BLOCK, n)
    nb = -(-n // block)
    if nb * block != n:
        weights = jnp.pad(weights, ((0, 0), (0, nb * block - n)))
    w = weights.reshape(B, nb, block)
    block_sums = w.sum(-1)  # [B, nb]
    cb = jnp.cumsum(block_sums, axis=-1)
    thr = u * cb[:, -1]  # [B]
    last_block = jnp.max(jnp.where(block_sums > 0, jnp.arange(nb), 0), axis=-1)
    blk = jnp.minimum(jnp.sum(cb < thr[:, None], axis=-1), last_block)
    before = jnp.where(blk > 0, jnp.take_along_axis(cb, jnp.maximum(blk - 1, 0)[:, None], 1)[:, 0], 0.0)
    wb = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    ci = jnp.cumsum(wb, axis=-1)
    last_in = jnp.max(jnp.where(wb > 0, jnp.arange(block), 0), axis=-1)
    j = jnp.minimum(jnp.sum(ci < (thr - before)[:, None], axis=-1), last_in)
    idx = (blk * block + j).astype(jnp.int32)
    return (idx, cb[:, -1]) if return_total else idx


def _argmax(x: Array) -> Array:
    """First index of the maximum along the last axis (like ``jnp.argmax``, faster on CPU)."""
    n = x.shape[-1]
    m = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == m, jnp.arange(n, dtype=jnp.int32), n), axis=-1).astype(jnp.int32)


def _ranked(z: Array, k: int) -> tuple[Array, Array]:
    """The ``k`` largest of ``z [B, V]`` in descending order, ``(values [B, k], indices [B, k])``.

    Equal values rank the HIGHER vocabulary index first: the order in which Hugging Face's top-p
    filter (a stable ascending sort, removed from the bottom) drops tied tokens last.
    """
    V = z.shape[-1]
    vals, ridx = jax.lax.top_k(z[:, ::-1], k)  # ties: lowest index of the reversed row first
    return vals, (V - 1 - ridx).astype(jnp.int32)


# Masses within this of ``top_p`` count as reaching it: float32 rounding of a softmax and of a
# cumulative sum (a few ulps of 1.0) must not decide an exact boundary.
_TOP_P_TOLERANCE = 1e-6


def _nucleus_keep(sorted_logits: Array, top_p: float) -> Array:
    """Keep-mask of descending-sorted logits ``[B, n]``: the smallest top set with mass ``>= top_p``.

    Entry ``i`` is kept while the mass of the entries ranked before it is below ``top_p``. That
    mass is ``1 − tail_i`` with ``tail_i`` the mass from ``i`` down to the least likely entry (an
    ascending cumulative sum of the small probabilities, as Hugging Face's ``TopPLogitsWarper``
    forms it), and "below" means by more than :data:`_TOP_P_TOLERANCE`, so that a set whose mass
    is ``top_p`` exactly (``[0.6, 0.05, 0.3, 0.05]`` at 0.9, ten tokens of 0.1 at 0.3) is the
    nucleus whichever way float32 rounds. (``cumsum(p) − p`` rounded below 0.9 there and kept a
    third token.) The most likely entry is always kept.
    """
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    tail = jnp.cumsum(probs[:, ::-1], axis=-1)[:, ::-1]
    keep = tail > jnp.float32(1.0 - top_p + _TOP_P_TOLERANCE)
    return keep.at[:, 0].set(True)


def _top_p_keep(vals: Array, top_p: float) -> Array:
    """``[B, n]`` bool: which of the descending candidates ``vals [B, n]`` top-p keeps."""
    return _nucleus_keep(vals, top_p) if top_p < 1.0 else jnp.ones(vals.shape, bool)


def _keeping_kth_ties(z: Array, k: int, fn) -> tuple[Array, Array | None]:
    """``(fn(vals, idx), kth)``: ``fn`` (a ``[B, ...]`` result per row) of the descending
    candidates of ``z [B, V]`` (:func:`_ranked`: its ``k`` largest, all ``V`` when ``k = 0``),
    except in the rows where more than ``k`` tokens reach the ``k``-th largest value: there ``fn``
    of all ``V`` candidates of ``z'`` = ``z`` where ``z >= kth``, else ``-inf``; every token tied
    with the ``k``-th survives, as Hugging Face's ``TopKLogitsWarper`` keeps them. Rows without such
    ties (and ``k = 0``) are exactly ``fn`` of the ``k`` largest; the full-vocabulary path runs only
    when some row has ties (``lax.cond``). ``kth [B, 1]`` is the ``k``-th largest value (None when
    ``k = 0``), read from the same ranking."""
    V = z.shape[-1]
    vals, idx = _ranked(z, k or V)
    out = fn(vals, idx)
    if not k:
        return out, None
    kth = vals[:, -1:]
    tied = jnp.sum(z >= kth, axis=-1) > k  # [B]

    def with_ties():
        full = fn(*_ranked(jnp.where(z >= kth, z, -jnp.inf), V))
        return jnp.where(tied.reshape(tied.shape + (1,) * (out.ndim - 1)), full, out)

    return jax.lax.cond(jnp.any(tied), with_ties, lambda: out), kth


def kept_tokens(logits: Array, config: SamplingConfig) -> Array:
    """``[B, V]`` bool: the tokens ``config`` may draw from ``logits [B, V]`` (top-k, then top-p).

    The support of :func:`sample_from_logits`'s draw: the ``top_k`` most likely tokens (with every
    token tied with the ``k``-th: values ``>=`` the ``k``-th largest, as Hugging Face's
    ``TopKLogitsWarper``), then of those (renormalised) the smallest most-likely set whose mass
    reaches ``top_p`` (Holtzman et al.; Hugging Face's warpers, ties at the crossing kept by the
    higher index as HF does). Every token when both are off; the argmax when ``greedy``.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.sampling import SamplingConfig, kept_tokens
      >>> p = jnp.array([[0.6, 0.05, 0.3, 0.05]])
      >>> kept_tokens(jnp.log(p), SamplingConfig(max_new_tokens=1, top_p=0.9)).tolist()
      [[True, False, True, False]]
    """
    chex.assert_rank(logits, 2)
    B, V = logits.shape
    z = logits.astype(jnp.float32) / config.temperature
    if config.greedy:
        return jax.nn.one_hot(_argmax(z), V, dtype=bool)
    k = config.top_k if 0 < config.top_k < V else 0
    if not k and config.top_p == 1.0:
        return jnp.ones((B, V), bool)

    def kept(vals, idx):
        return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], idx].set(_top_p_keep(vals, config.top_p))

    out, kth = _keeping_kth_ties(z, k, kept)
    return out & (z >= kth) if k else out  # (the masked -inf of tied rows are not kept)


def sample_from_logits(key: Array, logits: Array, config: SamplingConfig) -> tuple[Array, Array]:
    """Draw one token per row from ``logits [B, V]`` as ``config`` says.

    Returns ``(tokens [B] int32, logprobs [B] float32)`` with ``logprobs = log softmax(logits /
    temperature)[tokens]`` (the full, untruncated softmax; see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.sampling import SamplingConfig, sample_from_logits
      >>> tok, lp = sample_from_logits(jax.random.key(0), jnp.array([[0.0, 5.0, 1.0]]),
      ...                              SamplingConfig(max_new_tokens=1, greedy=True))
      >>> int(tok[0])
      1
    """
    chex.assert_rank(logits, 2)
    B, V = logits.shape
    z = logits.astype(jnp.float32) / config.temperature
    k = config.top_k if 0 < config.top_k < V else 0
    if not config.greedy and not k and config.top_p == 1.0:
        # Full-vocabulary sampling: one exp pass gives both the sampling weights and the normaliser
        # (log-sum-exp = max + log(sum of the weights)), on CPU the cost of a decode step's sampling.
        u = 1.0 - jax.random.uniform(key, (B,), jnp.float32)  # (0, 1]
        mx = jnp.max(z, axis=-1)
        tokens, total = _inverse_cdf(u, jnp.exp(z - mx[:, None]), return_total=True)
        picked = jnp.take_along_axis(z, tokens[:, None], axis=1)[:, 0]
        return tokens, picked - (mx + jnp.log(total))
    lse = jax.nn.logsumexp(z, axis=-1)
    if config.greedy:
        tokens = _argmax(logits.astype(jnp.float32))
    else:  # top-k (ties with the k-th kept, see kept_tokens) and/or top-p
        u = 1.0 - jax.random.uniform(key, (B,), jnp.float32)  # (0, 1]

        def draw(vals, idx):  # descending candidates; a full sort only for top-p alone (or k-th ties)
            w = jnp.where(_top_p_keep(vals, config.top_p), jnp.exp(vals - vals[:, :1]), 0.0)
            j = _inverse_cdf(u, w)
            return jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0].astype(jnp.int32)

        tokens, _ = _keeping_kth_ties(z, k, draw)
    picked = jnp.take_along_axis(z, tokens[:, None], axis=1)[:, 0]
    return tokens, picked - lse


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


def check_model_for_sampling(model_cfg, config: "SamplingConfig", prompt_width: int | None = None) -> None:
    """The checks of :func:`sample` that need no prompts: the model has an LM head, the stop and
    pad token ids are in its vocabulary, and ``prompt_width`` (``Tq``, when given) plus
    ``config.max_new_tokens`` fit its positions. The trainer calls it before it creates the run
    directory. Raises ValueError (PromptTooLongError) with one line saying what to change."""
    if not model_cfg.lm_head:
        raise ValueError("sample() needs a model with an LM head (config.lm_head=True).")
    limit = model_cfg.max_position_embeddings
    m = config.max_new_tokens
    if prompt_width is not None and prompt_width + m > limit:
        if m >= limit:  # no prompt fits beside the responses: only max_new_tokens can change
            fix = f"max_new_tokens must be <= {max(limit - prompt_width, 1)}" + (
                "" if prompt_width < limit else f" and the prompts at most {limit - 1} tokens") + "."
        else:
            fix = (f"Truncate (or left-trim the padding of) the prompts to at most {limit - m} tokens, "
                   "or lower max_new_tokens.")
        raise PromptTooLongError(
            f"Prompt length {prompt_width} + max_new_tokens {m} = {prompt_width + m} exceeds the "
            f"model's max_position_embeddings={limit}. {fix}"
        )
    V = model_cfg.vocab_size
    bad = [s for s in config.stop_token_ids if s >= V]
    if bad or config.pad_token_id >= V:
        raise ValueError(
            f"stop_token_ids {bad or ''} / pad_token_id {config.pad_token_id} must be < vocab_size={V}."
        )


def _concrete(x) -> bool:
    """Whether ``x``'s values can be read on this host (not traced, not another process's rows)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_token_ids(ids, vocab_size: int, name: str, fn: str | None = None) -> None:
    """Refuse concrete token ``ids`` outside ``[0, vocab_size)`` in one line, at every position:
    padding slots included, since an out-of-range id embeds as NaN and the attention's zero
    weights times NaN spread it to the real positions. Traced ids cannot be looked at and pass."""
    if not _concrete(ids):
        return
    ids = np.asarray(ids)
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        rows = np.nonzero(outside.any(axis=1))[0].tolist()
        raise ValueError(
            f"{fn + ': ' if fn else ''}{name} hold token ids outside the model's vocabulary [0, {vocab_size}) "
            f"(rows {rows[:10]}, e.g. {int(ids[outside][0])}; padding slots too): tokenize with the "
            "policy's tokenizer and pad with a valid id (e.g. the pad token), or check that the "
            "model's vocab_size covers it."
        )


def check_shared_vocab(policy_cfg, graphdef, params, what: str, fn: str) -> None:
    """Refuse a model that is to read the policy's token ids (π_b, a same-tokenizer reward model)
    but has another ``vocab_size``: its embedding lookups of the policy's ids would be NaN."""
    other = getattr(nnx.merge(graphdef, params).config, "vocab_size", None)
    if other is not None and other != policy_cfg.vocab_size:
        raise ValueError(
            f"{fn}: {what} has vocab_size {other} != the policy's vocab_size {policy_cfg.vocab_size}: "
            "π and π_b (and a same-tokenizer reward model) must share a tokenizer; load them from "
            "checkpoints of one model family (π_b is normally the policy's SFT checkpoint)."
        )


def check_sampling_inputs(graphdef, params, prompt_ids, prompt_mask, config) -> gpt_neox.GPTNeoXConfig:
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    model_cfg = nnx.merge(graphdef, params).config
    shape_ids, shape_mask = jnp.shape(prompt_ids), jnp.shape(prompt_mask)
    if len(shape_ids) != 2 or shape_ids != shape_mask:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, Tq]; got {shape_ids} and {shape_mask}. "
            "Pass a left-padded batch with a 0/1 mask of the same shape."
        )
    if shape_ids[1] == 0:
        raise ValueError(
            f"The prompts are empty ({list(shape_ids)}): each prompt needs at least one token "
            "(the first response token is predicted from the last prompt slot); pass left-padded "
            "[B, Tq] prompts with Tq >= 1, e.g. a BOS token."
        )
    if not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {jnp.result_type(prompt_ids)}")
    check_model_for_sampling(model_cfg, config, prompt_width=shape_ids[1])
    check_token_ids(prompt_ids, model_cfg.vocab_size, "prompt_ids")
    if _concrete(prompt_mask):
        m = np.asarray(prompt_mask) != 0
        if m.size and not m[:, -1].all():
            rows = np.nonzero(~m[:, -1])[0].tolist()
            raise ValueError(
                f"Prompts must be left-padded with at least one real token: rows {rows[:10]} have "
                "padding (mask 0) at the last position. Left-pad the prompts (pad at the start)."
            )
        if m.size and (np.diff(m.astype(np.int8), axis=1) < 0).any():
            raise ValueError(
                "prompt_mask has a 0 after a 1 in some row: prompts must be left-padded "
                "(all padding before the first real token)."
            )
    return model_cfg


# Parameters that the model only ever uses cast to the compute dtype (matmul weights, embeddings).
_MATRIX_PARAMS = frozenset({
    "embed_in", "embed_out", "qkv_kernel", "q_kernel", "k_kernel", "v_kernel", "out_kernel",
    "gate_kernel", "up_kernel", "down_kernel",
})


def _cast_matrices(params, dtype):
    """Cast the matmul weights to the compute dtype once, before the decode loop.

    The model casts them at every use anyway (``w.astype(dt)``), so the outputs are identical; with
    bfloat16 compute and float32 storage this halves the bytes each decode step reads. LayerNorm
    parameters, biases and heads stay as they are (the model reads them in float32).
    """
    def cast(path, x):
        names = {getattr(k, "key", None) for k in path}
        if names & _MATRIX_PARAMS and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def sample_traced(graphdef, params, prompt_ids, prompt_mask, key, config: SamplingConfig,
                  mesh=None) -> SampleResult:
    """The body of :func:`sample` (no input checks), to trace inside a larger ``jit``.

    With a ``mesh``, the rows stay batch-sharded over ``(data, fsdp)`` throughout (the prompts,
    the KV cache and the decode loop's state are pinned with sharding constraints), so each device
    decodes only its own ``B / (data·fsdp)`` rows; parameters keep their own shardings.
    """
    mcfg = nnx.merge(graphdef, params).config
    params = sharding.gather_fsdp(params, mesh)  # once, before the decode loop
    if jnp.dtype(mcfg.dtype) != jnp.dtype(mcfg.param_dtype):
        params = _cast_matrices(params, jnp.dtype(mcfg.dtype))
    model = nnx.merge(graphdef, params)
    B, Tq = prompt_ids.shape
    T = config.max_new_tokens
    pin = functools.partial(sharding.constrain_batch, mesh=mesh, batch_size=B)
    prompt_ids, prompt_mask = pin((prompt_ids, prompt_mask))
    S = Tq + T - 1  # the last sampled token is never fed back
    stop_ids = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)
    pad = jnp.int32(config.pad_token_id)

    def is_stop(tok):
        if not config.stop_token_ids:
            return jnp.zeros(tok.shape, bool)
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    # Prefill: one pass over the prompts, unembed only the last position.
    cache = pin(gpt_neox.init_cache(mcfg, B, S))
    out = model(prompt_ids.astype(jnp.int32), prompt_mask, cache=cache, logits=False, prefill=True)
    logits0 = model.logits(out.hidden[:, -1])
    tok0, lp0 = sample_from_logits(jax.random.fold_in(key, 0), logits0, config)
    done0 = is_stop(tok0)
    tokens = jnp.full((B, T), pad, jnp.int32).at[:, 0].set(tok0)
    logps = jnp.zeros((B, T), jnp.float32).at[:, 0].set(lp0)
    mask = jnp.zeros((B, T), jnp.float32).at[:, 0].set(1.0)
    ones = jnp.ones((B, 1), bool)

    def cond(s: SamplerState):
        return (s.t < T) & ~jnp.all(s.done)

    def body(s: SamplerState) -> SamplerState:
        m = nnx.merge(graphdef, params)
        o = m(s.prev[:, None], ones, cache=s.cache, logits=False)
        logits = m.logits(o.hidden[:, 0])
        tok, lp = sample_from_logits(jax.random.fold_in(key, s.t), logits, config)
        live = ~s.done
        tok = jnp.where(live, tok, pad)
        lp = jnp.where(live, lp, 0.0)
        return pin(SamplerState(
            t=s.t + 1,
            cache=o.cache,
            prev=tok,
            done=s.done | is_stop(tok),
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.t)),
            logps=jax.lax.dynamic_update_slice(s.logps, lp[:, None], (0, s.t)),
            mask=jax.lax.dynamic_update_slice(s.mask, live.astype(jnp.float32)[:, None], (0, s.t)),
        ))

    init = pin(SamplerState(t=jnp.int32(1), cache=out.cache, prev=tok0, done=done0, tokens=tokens,
                            logps=logps, mask=mask))
    final = jax.lax.while_loop(cond, body, init)
    return pin(SampleResult(
        tokens=final.tokens,
        mask=final.mask,
        lengths=final.mask.sum(-1).astype(jnp.int32),
        stopped=final.done,
        truncated=~final.done,
        logprobs=final.logps,
    ))


_sample_jit = jax.jit(sample_traced, static_argnames=("graphdef", "config", "mesh"))


def sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    config: SamplingConfig,
    *,
    mesh=None,
) -> SampleResult:
    """Sample responses to left-padded prompts with a KV cache (Algorithms 1-2, "generate rollouts").

    One jitted program per ``(B, Tq, T_max)`` and ``config``: a prefill over the prompts, then a
    ``lax.while_loop`` of one-token decode steps that exits as soon as every row has emitted a
    stop token. Token ``t`` of a row is drawn from ``softmax(logits_t / T)`` (with top-k/top-p, or the
    argmax when ``greedy``; see the module docstring) with the key ``fold_in(key, t)``.

    Args:
      graphdef, params: a GPT-NeoX with an LM head (``gpt_neox.init`` or ``load_hf``).
      prompt_ids: ``[B, Tq]`` int token ids, **left-padded** (every row's last slot is real).
      prompt_mask: ``[B, Tq]`` 1 on real prompt tokens, 0 on the left padding.
      key: a ``jax.random`` key; the same key gives the same tokens.
      config: :class:`SamplingConfig` (``max_new_tokens = T_max``).
      mesh: a :mod:`klq_jax.sharding` mesh: the prompts are placed batch-sharded over
        ``(data, fsdp)`` and every device decodes only its own rows (the result is batch-sharded
        too); ``None``: wherever the inputs are (one device).

    Returns:
      :class:`SampleResult` with ``[B, T_max]`` tokens / mask / logprobs and ``[B]`` lengths,
      stopped and truncated flags.

    Raises:
      ValueError: bad shapes, empty prompts (``Tq = 0``), right-padded prompts, prompt ids
        outside the vocabulary, ``Tq + T_max > max_position_embeddings``, or stop/pad ids outside
        the vocabulary.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.models import gpt_neox
      >>> from klq_jax.sampling import SamplingConfig, sample
      >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(), jax.random.key(0))
      >>> res = sample(gd, p, jnp.array([[0, 4, 5]]), jnp.array([[0, 1, 1]]), jax.random.key(0),
      ...              SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=10, stop_token_ids=()))
      >>> res.tokens.shape, bool(res.truncated[0]), int(res.lengths[0])
      ((1, 4), True, 4)
    """
    check_sampling_inputs(graphdef, params, prompt_ids, prompt_mask, config)
    if mesh is not None:
        prompt_ids, prompt_mask = sharding.shard_batch((prompt_ids, prompt_mask), mesh)
    return _sample_jit(
        graphdef, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key, config, mesh
    )
