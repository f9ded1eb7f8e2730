"""The experience phase of Algorithms 1 and 2 (Appendix B) as pure functions over params.

For a batch of prompts ``x`` (left-padded ``[B, Tq]``):

1. sample responses ``y`` from the current policy until a stop token or ``T_max``
   (:func:`klq_jax.sampling.sample`);
2. one forward pass of the policy over ``x ⧺ y`` gives ``log π(a_t|s_t)`` and ``V(s_t)`` for every
   response token (:func:`response_logprobs`), one of the frozen reference policy gives
   ``log π_b(a_t|s_t)``;
3. the reward model scores ``(x, y)`` (:func:`klq_jax.rewards.reward_model_scores`, or any ``reward_fn``);
4. ``R = R_φ(x, y) − ω·1[no stop token in y]`` is placed at the last real response token
   (:func:`sequence_rewards`).

The ω penalty (one definition, used everywhere in klq_jax): ω is subtracted when the response
contains **no stop token**, TRL's ``missing_eos_penalty``, which the paper's TRL fork ran. Algorithms
1-2 write ``ω·1[T = T_max]``; the two differ only for a response of exactly ``T_max`` tokens whose
last token is the stop token, which is penalised by the literal pseudocode and not here. A rollout
with ``ω > 0`` therefore needs a stop token: ``stop_token_ids=()`` would penalise every response,
and :func:`make_rollout` rejects it (with ``ω = 0`` an empty ``stop_token_ids`` is fine).

Time index (the paper's): ``s_t = (x, y_1..y_t)``, ``a_t = y_{t+1}``. Position ``t`` of every
``[B, Tr]`` array refers to ``s_t`` / ``a_t``: ``logp[:, t] = log π(y_{t+1} | x, y_1..y_t)`` is read
from the hidden state of the token just before ``y_{t+1}`` (the last prompt token for ``t = 0``),
and ``values[:, t] = V(s_t)`` from the same hidden state.

Temperature: with a sampling temperature ``T``, ``π`` and ``π_b`` are both the temperature-scaled
distributions ``softmax(logits / T)``, as in TRL, so the sampler's log-probs, the KL and ``Q``
all refer to the distribution that sampled.

Responses are right-padded ``[B, Tr]`` with a float ``response_mask`` (1 on real tokens, the stop
token included), exactly what :func:`klq_jax.sampling.sample` returns.
"""

from __future__ import annotations

import functools
import numbers
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax import masked, sharding
from klq_jax.config import range_problems
from klq_jax.losses import check_temperature, token_logprobs
from klq_jax.models import gpt_neox
from klq_jax.sampling import (
    SamplingConfig,
    _concrete,
    _sample_jit,
    check_sampling_inputs,
    check_shared_vocab,
    check_token_ids,
    sample_traced,
)
from klq_jax.types import DeviceReward, Rollout

Array = jax.Array

__all__ = [
    "Rollout",
    "response_logprobs",
    "sequence_rewards",
    "make_rollout",
    "rollout_metrics",
]


def check_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, fn: str):
    pi, pm, ri, rm = (jnp.shape(a) for a in (prompt_ids, prompt_mask, response_ids, response_mask))
    if len(pi) != 2 or pi != pm or len(ri) != 2 or ri != rm or pi[0] != ri[0]:
        raise ValueError(
            f"{fn}: expected prompt_ids/prompt_mask [B, Tq] and response_ids/response_mask [B, Tr] "
            f"with one batch size B; got prompt_ids {pi}, prompt_mask {pm}, response_ids {ri}, "
            f"response_mask {rm}."
        )
    for name, a in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
        if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            raise ValueError(f"{fn}: {name} must be integer token ids, got {jnp.result_type(a)}.")


def map_micro_batches(fn: Callable, arrays: tuple, micro_batch_size: int | None, *, groups: int = 1):
    """``fn(*arrays)`` over the leading (batch) axis in chunks of ``micro_batch_size`` rows (``lax.map``).

    ``groups``: the batch is ``groups`` contiguous blocks of rows (the data-parallel shards of a
    batch-sharded array); every chunk takes ``ceil(micro_batch_size / groups)`` rows from each
    block, so each device's rows stay on it and every device works on every chunk. Each block is
    padded (fully masked rows) up to a multiple of its chunk share and the results are un-padded.
    ``groups=1`` chunks the batch in order. ``None`` (or a size >= B) runs ``fn`` once on the whole
    batch. ``fn`` must treat rows independently (the result does not depend on the chunking).
    """
    B = arrays[0].shape[0]
    if micro_batch_size is None or micro_batch_size >= B:
        return fn(*arrays)
    G = groups if groups >= 1 and B % groups == 0 else 1
    per = B // G  # rows per block
    m = -(-int(micro_batch_size) // G)  # rows of each block in one chunk
    n = -(-per // m)  # chunks
    pad = n * m - per

    def prep(a):  # [B, ...] -> [n, G*m, ...]
        a = a.reshape((G, per) + a.shape[1:])
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = jnp.moveaxis(a.reshape((G, n, m) + a.shape[2:]), 1, 0)
        return a.reshape((n, G * m) + a.shape[3:])

    def unprep(o):  # [n, G*m, ...] -> [B, ...]
        o = jnp.moveaxis(o.reshape((n, G, m) + o.shape[2:]), 0, 1)
        o = o.reshape((G, n * m) + o.shape[3:])[:, :per]
        return o.reshape((B,) + o.shape[2:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(prep(a) for a in arrays))
    return jax.tree_util.tree_map(unprep, out)


def check_omega(omega, fn: str) -> None:
    """Refuse a concrete missing-stop-token penalty ω that is not a finite number >= 0 in one line
    (a traced ω cannot be looked at and passes)."""
    if not isinstance(omega, numbers.Real):
        if not (_concrete(omega) and np.ndim(omega) == 0):
            return
        omega = float(np.asarray(omega))
    for problem in range_problems("omega", omega, 0):
        raise ValueError(f"{fn}: {problem} (the missing-stop-token penalty; 0.0 turns it off).")


def check_micro_batch_size(micro_batch_size):
    if micro_batch_size is not None and (
        not isinstance(micro_batch_size, int) or micro_batch_size < 1
    ):
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int or None.")


def response_logprobs_traced(
    graphdef, params, prompt_ids, prompt_mask, response_ids, response_mask, temperature,
    micro_batch_size=None, groups=1, with_logp=True,
):
    """The body of :func:`response_logprobs` (no checks), to trace inside a larger ``jit``;
    ``groups``: see :func:`map_micro_batches`. ``with_logp=False``: only the values (``logp`` comes
    back None): the unembedding is skipped, and a separate critic runs without the policy."""
    Tq = prompt_ids.shape[1]
    Tr = response_ids.shape[1]

    def forward(p_ids, p_mask, r_ids, r_mask):
        model = nnx.merge(graphdef, params)
        if not with_logp:
            model = model.value_network()
        tokens = jnp.concatenate([p_ids, r_ids], axis=1).astype(jnp.int32)
        mask = jnp.concatenate([p_mask.astype(bool), r_mask != 0], axis=1)
        # Outputs only from the last prompt token on (the last layer skips the rest of the prompt).
        out = model(tokens, mask, logits=False, queries_from=Tq - 1)
        real = r_mask != 0
        logp = None
        if with_logp:
            h = out.hidden[:, :Tr]  # the hidden state that predicts each response token
            logits = model.logits(h)
            logp = jnp.where(real, token_logprobs(logits, r_ids.astype(jnp.int32), temperature=temperature), 0.0)
        # V(s_t) from the model's own output: a head on the policy's body, or a separate critic
        # (klq_jax.models.critic.PolicyWithCritic) with its own trunk.
        values = None
        if out.values is not None:
            values = jnp.where(real, out.values[:, :Tr], 0.0)
        return logp, values

    return map_micro_batches(
        forward, (prompt_ids, prompt_mask, response_ids, response_mask), micro_batch_size,
        groups=groups,
    )


_response_logprobs = jax.jit(
    response_logprobs_traced, static_argnames=("graphdef", "micro_batch_size", "groups")
)


def response_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: Array,
    prompt_mask: Array,
    response_ids: Array,
    response_mask: Array,
    *,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
) -> tuple[Array, Array | None]:
    """``log π(a_t|s_t)`` and ``V(s_t)`` of every response token from ONE forward over prompt+response.

    ``logp[:, t] = log softmax(logits(h_{t}) / temperature)[y_{t+1}]`` and ``values[:, t] = V(h_t)``
    where ``h_t`` is the final hidden state at the token preceding response token ``t`` (the last
    prompt token for ``t = 0``): the quantities ``log π(a_t|s_t)`` and ``V(s_t)`` of Algorithms 1-2
    (Eqs. 12-13 build ``Q`` from them). Only the ``Tr`` response positions are unembedded.
    Differentiable (the trainer calls it inside its loss) and jitted (one compile per shape).

    Args:
      graphdef, params: a GPT-NeoX with an LM head (and optionally a value head).
      prompt_ids, prompt_mask: ``[B, Tq]`` left-padded prompts.
      response_ids, response_mask: ``[B, Tr]`` right-padded responses (mask 1 on real tokens).
      temperature: the sampling temperature ``T`` (the distributions are ``softmax(logits / T)``,
        as in TRL): a finite number > 0.
      micro_batch_size: run the forward in ``lax.map`` chunks of this many rows (bounds the
        ``[mb, Tr, V]`` logits in memory); ``None`` = the whole batch at once.

    Returns:
      ``(logp [B, Tr] float32, values [B, Tr] float32 or None when there is no value head)``,
      both 0 on padding.

    Raises:
      ValueError: mismatched shapes, empty prompts, a concrete temperature that is not a finite
        number > 0, or (concrete inputs) response ids outside ``[0, vocab_size)`` at any position
        (an out-of-range id on padding would spread NaN to the real positions through attention).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.models import gpt_neox
      >>> from klq_jax.rollout import response_logprobs
      >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))
      >>> logp, v = response_logprobs(gd, p, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]),
      ...                             jnp.array([[7, 0]]), jnp.array([[1.0, 0.0]]))
      >>> logp.shape, v.shape, float(logp[0, 1])
      ((1, 2), (1, 2), 0.0)
    """
    check_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, "response_logprobs")
    if jnp.shape(prompt_ids)[1] == 0:
        raise ValueError(
            "response_logprobs: the prompts are empty (Tq = 0); the first response token is predicted "
            "at the last prompt slot, so pass prompts of at least one (left-padded) token."
        )
    check_micro_batch_size(micro_batch_size)
    check_temperature(temperature, "response_logprobs")
    check_token_ids(response_ids, nnx.merge(graphdef, params).config.vocab_size, "response_ids",
                    fn="response_logprobs")
    return _response_logprobs(
        graphdef, params, prompt_ids, prompt_mask, response_ids, response_mask,
        jnp.asarray(temperature, jnp.float32), micro_batch_size,
    )


def sequence_rewards(scores: Array, response_mask: Array, stopped: Array, *, omega: float) -> Array:
    """Per-token rewards of Algorithms 1-2: ``r_T = R_φ(x, y) − ω·1[no stop token]``, 0 elsewhere.

    ``R_i = R_φ(x_i, y_i) − ω·1[not stopped_i]`` (the ω penalty of the module docstring: no stop
    token, TRL's ``missing_eos_penalty``, not the pseudocode's ``1[T_i = T_max]``) is placed on the
    **last real response token** of each
    row (``rewards[:, t]`` holds ``r_{t+1}``, the reward following action ``a_t``), as Algorithms 1
    and 2 write ``r_{T} = R`` (Appendix B). TRL instead adds the score one slot later (the first
    padding slot after the EOS, falling back to the last slot); for returns with ``V(s_T) = 0`` and
    a mask that ends at the stop token, this library's placement is the paper's. A row with no
    real response token gets no reward.

    Args:
      scores: ``[B]`` reward-model scores ``R_φ``.
      response_mask: ``[B, Tr]`` 1 on real response tokens.
      stopped: ``[B]`` bool, the response ended on a stop token (``SampleResult.stopped``);
        rows with ``stopped = False`` have no stop token (truncated at ``T_max``) and get ``−ω``;
        a row of exactly ``T_max`` tokens ending in a stop token is stopped and gets no penalty.
      omega: the missing-stop-token penalty ω >= 0 (TRL's ``missing_eos_penalty``); a concrete
        ω that is negative or not finite is refused (a traced one is not checked).

    Returns:
      ``[B, Tr]`` float32 rewards.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.rollout import sequence_rewards
      >>> sequence_rewards(jnp.array([2.0, 2.0]), jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
      ...                  jnp.array([True, False]), omega=1.0).tolist()
      [[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    """
    check_omega(omega, "sequence_rewards")
    scores = jnp.asarray(scores).astype(jnp.float32)
    response_mask = jnp.asarray(response_mask)
    stopped = jnp.asarray(stopped).astype(bool)
    chex.assert_rank([scores, response_mask, stopped], [1, 2, 1])
    chex.assert_equal_shape_prefix([scores, response_mask, stopped], 1)
    R = scores - jnp.float32(omega) * (~stopped).astype(jnp.float32)
    real = response_mask != 0
    idx = gpt_neox.last_token_index(real)
    Tr = response_mask.shape[1]
    at_end = (jnp.arange(Tr)[None, :] == idx[:, None]) & jnp.any(real, axis=1, keepdims=True)
    return jnp.where(at_end, R[:, None], 0.0).astype(jnp.float32)


def _check_scores(scores, rows: int):
    if scores.shape != (rows,):
        raise ValueError(f"reward_fn must return one score per row, shape ({rows},); got {scores.shape}.")


def _score(policy_graphdef, policy_params, ref_graphdef, ref_params, prompt_ids, prompt_mask,
           res, config, micro_batch_size, mesh, logp_from_sampler=False):
    """One forward of π and one of π_b over ``x ⧺ y`` (traced; rows stay sharded).

    ``logp_from_sampler``: ``log π`` is the sampler's own (``res.logprobs``) and the policy's
    forward computes only the values (the critic alone, or the trunk without the unembedding)."""
    groups = 1 if mesh is None else sharding.data_parallel_size(mesh)
    policy_params = sharding.gather_fsdp(policy_params, mesh)  # gather weights, never the batch
    ref_params = sharding.gather_fsdp(ref_params, mesh)
    t = config.temperature
    logp, values = response_logprobs_traced(
        policy_graphdef, policy_params, prompt_ids, prompt_mask, res.tokens, res.mask, t,
        micro_batch_size, groups, with_logp=not logp_from_sampler,
    )
    if logp_from_sampler:
        logp = jnp.where(res.mask != 0, res.logprobs, 0.0)
    ref_logp, _ = response_logprobs_traced(
        ref_graphdef, ref_params, prompt_ids, prompt_mask, res.tokens, res.mask, t,
        micro_batch_size, groups,
    )
    return sharding.constrain_batch((prompt_ids, prompt_mask, res, logp, values, ref_logp), mesh)


def _generate_and_score(policy_graphdef, policy_params, ref_graphdef, ref_params, prompt_ids,
                        prompt_mask, key, config, micro_batch_size, mesh, logp_from_sampler):
    """Sample, then score (traced; rows stay sharded)."""
    prompt_ids, prompt_mask = sharding.constrain_batch((prompt_ids, prompt_mask), mesh)
    policy_params = sharding.gather_fsdp(policy_params, mesh)  # once, for sampling and scoring
    ref_params = sharding.gather_fsdp(ref_params, mesh)
    res = sample_traced(policy_graphdef, policy_params, prompt_ids, prompt_mask, key, config, mesh)
    return _score(policy_graphdef, policy_params, ref_graphdef, ref_params, prompt_ids, prompt_mask,
                  res, config, micro_batch_size, mesh, logp_from_sampler)


def _device_scores(reward, prompt_ids, prompt_mask, response_ids, response_mask, mesh):
    """``R_φ`` of a :class:`DeviceReward` on the (sharded) rows (traced)."""
    groups = 1 if mesh is None else sharding.data_parallel_size(mesh)
    params = sharding.gather_fsdp(reward.params, mesh)
    scores = reward.fn(params, prompt_ids, prompt_mask, response_ids, response_mask, groups)
    scores = sharding.constrain_batch(jnp.asarray(scores).astype(jnp.float32), mesh)
    _check_scores(scores, response_ids.shape[0])
    return scores


def _assemble(scored, scores, omega, finish, mesh):
    """The :class:`Rollout` from the scored samples and ``R_φ`` (traced), then ``finish(rollout)``."""
    prompt_ids, prompt_mask, res, logp, values, ref_logp = scored
    rewards = sequence_rewards(scores, res.mask, res.stopped, omega=omega)
    ro = sharding.constrain_batch(Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=res.tokens,
        response_mask=res.mask, stopped=res.stopped, sample_logp=res.logprobs, logp=logp,
        ref_logp=ref_logp, values=values, scores=scores, rewards=rewards,
    ), mesh)
    return ro, (finish(ro) if finish is not None else None)


_STATIC = ("policy_graphdef", "ref_graphdef", "config", "micro_batch_size", "mesh",
           "logp_from_sampler", "finish")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _rollout_on_device(policy_graphdef, policy_params, ref_graphdef, ref_params, reward,
                       prompt_ids, prompt_mask, key, omega, config, micro_batch_size, mesh,
                       logp_from_sampler, finish):
    """Sample → score → R_φ → rewards → ``finish`` as ONE program (a :class:`DeviceReward`)."""
    scored = _generate_and_score(policy_graphdef, policy_params, ref_graphdef, ref_params,
                                 prompt_ids, prompt_mask, key, config, micro_batch_size, mesh,
                                 logp_from_sampler)
    res = scored[2]
    scores = _device_scores(reward, scored[0], scored[1], res.tokens, res.mask, mesh)
    return _assemble(scored, scores, omega, finish, mesh)


_score_jit = jax.jit(_score, static_argnames=_STATIC[:-1])
_device_scores_jit = jax.jit(_device_scores, static_argnames=("mesh",))
_assemble_jit = jax.jit(_assemble, static_argnames=("finish", "mesh"))


def make_rollout(
    policy_graphdef: nnx.GraphDef,
    policy_params: nnx.State,
    ref_graphdef: nnx.GraphDef,
    ref_params: nnx.State,
    reward_fn: Callable[[Array, Array, Array, Array], Array] | DeviceReward,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    sampling_config: SamplingConfig,
    *,
    omega: float = 1.0,
    micro_batch_size: int | None = None,
    timings: dict | None = None,
    mesh=None,
    finish: Callable[[Rollout], Any] | None = None,
    fuse: bool = True,
    logp_from_sampler: bool = False,
):
    """The experience phase of Algorithms 1-2: sample, score with π, π_b and R_φ, place rewards.

    With a :class:`~klq_jax.types.DeviceReward` (a same-tokenizer reward model, a programmatic
    reward) the whole phase — sampling, the π / π_b forwards, ``R_φ``, the rewards and ``finish``
    — is ONE compiled program, with no host round trip. Any other ``reward_fn`` (e.g. a reward
    model with another tokenizer, which needs text) runs on the host between the compiled
    sample / score programs and the program that places the rewards, on THIS process's rows only.

    With a ``mesh`` every array is batch-sharded over ``(data, fsdp)``: the prompts are placed on
    the mesh (host arrays are this process's rows, joined with
    ``jax.make_array_from_process_local_data``), each device samples and scores only its
    ``B / (data·fsdp)`` rows (FSDP gathers weights, never the batch), parameters keep the
    shardings they carry (:mod:`klq_jax.sharding`'s rules), and the returned rollout is
    batch-sharded. ``mesh=None`` is the same code on whatever device the inputs live on.

    Args:
      policy_graphdef, policy_params: the current policy (LM head + value head).
      ref_graphdef, ref_params: the frozen reference policy π_b (π_SFT).
      reward_fn: a :class:`~klq_jax.types.DeviceReward`, or a host callable
        ``(prompt_ids, prompt_mask, response_ids, response_mask) -> scores [B]`` (it receives
        this process's rows, numpy or device arrays).
      prompt_ids, prompt_mask: ``[B, Tq]`` left-padded prompts (with a mesh in a multi-process
        run: this process's rows, or a global ``jax.Array``).
      key: PRNG key of the sampler.
      sampling_config: :class:`klq_jax.sampling.SamplingConfig`; its temperature also scales the
        recomputed ``logp`` and ``ref_logp``.
      omega: missing-stop-token penalty ω (see the module docstring); ``ω > 0`` needs
        ``sampling_config.stop_token_ids`` to name the stop token.
      micro_batch_size: global rows per scoring forward (``None``: the whole batch at once).
      timings: if a dict, the wall-clock seconds are stored in it: ``"rollout"`` (the whole
        phase), and unless the phase is one fused program also ``"sample"``, ``"score"`` (the π /
        π_b forwards) and ``"reward"`` (R_φ; 0 when fused). This waits for the device.
      mesh: a ``(data, fsdp, tensor)`` mesh (:func:`klq_jax.sharding.make_mesh`) or None.
      finish: an optional traceable ``rollout -> pytree`` (e.g. targets and metrics) computed in
        the same compiled program as the rollout's last step; it must be the same object on every
        call (it is a static argument: a new function recompiles).
      fuse: run a :class:`~klq_jax.types.DeviceReward` rollout as one program (the fastest);
        ``False`` runs sample, score, reward and the rest as separate programs (the same results;
        to time the phases, e.g. ``experiments/bench_iteration.py``).
      logp_from_sampler: take ``logp`` (θ_old's ``log π``) from the sampler's own log-probs, as
        TRL does, instead of recomputing it with a forward over ``x ⧺ y``: the scoring forward
        then computes only the values (a separate critic runs alone; a value head's trunk runs
        without the unembedding). The two agree up to float rounding (the KV-cache decode and
        the full forward round differently: ~1e-6 in float32, more in bf16), so the first
        epoch's PPO ratio is 1 only up to that rounding. Default False: the exact recomputation.

    Returns:
      :class:`klq_jax.types.Rollout`, or ``(rollout, finish(rollout))`` when ``finish`` is given.

    Raises:
      ValueError: ``omega < 0``, or ``omega > 0`` with ``sampling_config.stop_token_ids=()`` (every
        response would be penalised); a reference model whose ``vocab_size`` is not the policy's
        (π and π_b must share a tokenizer); a ``reward_fn`` that does not return one score per row.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.models import gpt_neox
      >>> from klq_jax.rollout import make_rollout
      >>> from klq_jax.sampling import SamplingConfig
      >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))
      >>> reward_fn = lambda pi, pm, ri, rm: rm.sum(-1)  # a toy host-side reward: the length
      >>> ro = make_rollout(gd, p, gd, p, reward_fn, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]),
      ...                   jax.random.key(1), SamplingConfig(max_new_tokens=4, stop_token_ids=()),
      ...                   omega=0.0)
      >>> float(ro.rewards.sum()), float(jnp.abs(ro.logp - ro.ref_logp).max())
      (4.0, 0.0)
    """
    check_omega(omega, "make_rollout")
    if omega > 0 and not sampling_config.stop_token_ids:
        raise ValueError(
            f"make_rollout: omega={omega} penalises responses without a stop token, but "
            "sampling_config.stop_token_ids=() names none, so every response would be penalised; "
            "pass the EOS id in stop_token_ids, or omega=0.0."
        )
    check_micro_batch_size(micro_batch_size)
    policy_cfg = check_sampling_inputs(policy_graphdef, policy_params, prompt_ids, prompt_mask,
                                       sampling_config)
    check_shared_vocab(policy_cfg, ref_graphdef, ref_params, "the reference model π_b", "make_rollout")
    if mesh is not None:
        prompt_ids, prompt_mask = sharding.shard_batch((prompt_ids, prompt_mask), mesh)
    else:
        prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    omega = jnp.float32(omega)
    t0 = time.perf_counter()
    common = dict(config=sampling_config, micro_batch_size=micro_batch_size, mesh=mesh,
                  logp_from_sampler=bool(logp_from_sampler))
    if fuse and isinstance(reward_fn, DeviceReward):
        ro, out = _rollout_on_device(
            policy_graphdef, policy_params, ref_graphdef, ref_params, reward_fn, prompt_ids,
            prompt_mask, key, omega, finish=finish, **common,
        )
        if timings is not None:
            jax.block_until_ready((ro, out))
            timings.update(rollout=time.perf_counter() - t0, reward=0.0)
        return ro if finish is None else (ro, out)

    def lap(name, value):  # the phase's seconds, when timed
        if timings is not None:
            jax.block_until_ready(value)
            now = time.perf_counter()
            timings[name] = now - lap.t
            lap.t = now
        return value

    lap.t = t0
    res = lap("sample", _sample_jit(policy_graphdef, policy_params, prompt_ids, prompt_mask, key,
                                    sampling_config, mesh))
    scored = lap("score", _score_jit(policy_graphdef, policy_params, ref_graphdef, ref_params,
                                     prompt_ids, prompt_mask, res, **common))
    if isinstance(reward_fn, DeviceReward):
        scores = _device_scores_jit(reward_fn, prompt_ids, prompt_mask, res.tokens, res.mask, mesh)
    else:  # on the host, this process's rows only
        local = sharding.process_rows((prompt_ids, prompt_mask, res.tokens, res.mask), mesh)
        scores = np.asarray(reward_fn(*local), np.float32)
        _check_scores(scores, local[0].shape[0])
        scores = sharding.shard_batch(scores, mesh) if mesh is not None else jnp.asarray(scores)
    lap("reward", scores)
    ro, out = _assemble_jit(scored, scores, omega, finish=finish, mesh=mesh)
    if timings is not None:
        jax.block_until_ready((ro, out))
        timings["rollout"] = time.perf_counter() - t0
    return ro if finish is None else (ro, out)


def rollout_metrics(ro: Rollout, tau: float) -> dict[str, Array]:
    """Statistics of one rollout batch as float32 scalars (traceable; jit it or fuse it as
    ``make_rollout``'s ``finish``), from :mod:`klq_jax.masked`.

    Per row ``i`` with mask ``m``: ``kl_i = Σ_t m·(logp − ref_logp)`` (the sampled-token KL
    estimate), ``reward_i = Σ_t m·rewards`` (the penalised score), ``len_i = Σ_t m``. Returns the
    batch means of ``score`` (``R_φ``, unpenalised), ``reward``, ``kl``, ``rlhf_reward`` (``reward −
    τ·kl``), ``response_length`` and ``truncated_frac`` (rows without a stop token), and
    ``entropy`` = ``−Σ m·logp / Σ m`` (the per-token sampled-entropy estimate).
    """
    m = ro.response_mask
    kl_seq = masked.masked_sum(ro.logp - ro.ref_logp, m, axis=1)
    rewards_seq = masked.masked_sum(ro.rewards, m, axis=1)
    lengths = masked.masked_sum(jnp.ones_like(m), m, axis=1)
    return {
        "score": jnp.mean(ro.scores.astype(jnp.float32)),
        "reward": jnp.mean(rewards_seq),
        "kl": jnp.mean(kl_seq),
        "rlhf_reward": jnp.mean(rewards_seq - jnp.float32(tau) * kl_seq),
        "entropy": masked.masked_mean(-ro.logp, m),
        "response_length": jnp.mean(lengths),
        "truncated_frac": 1.0 - jnp.mean(ro.stopped.astype(jnp.float32)),
    }
