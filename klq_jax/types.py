"""Typed pytrees of the experience that flows rollout → targets → update.

:class:`Rollout` is what the experience phase (:func:`klq_jax.rollout.make_rollout`) returns for a
batch of ``B`` prompts; :class:`Batch` is what the update phase (:mod:`klq_jax.train.step`) consumes:
the rollout's per-token arrays plus the algorithm's fixed targets
(:mod:`klq_jax.algorithms`). Both are frozen dataclasses registered as JAX pytrees
(:func:`jax.tree_util.register_dataclass`): they pass through ``jax.jit``, ``tree_map``,
``device_put`` and sharding like a dict of arrays, with named, documented fields. A field that
does not apply is ``None`` (an empty subtree), e.g. ``values`` without a value head or ``targets``
under PPO.

Shapes: ``B`` rows (prompts), ``Tq`` prompt slots (left-padded), ``Tr = T_max`` response slots
(right-padded). Position ``t`` of a ``[B, Tr]`` array refers to the state ``s_t = (x, y_1..y_t)``
and the action ``a_t = y_{t+1}`` (the paper's time index).

:class:`DeviceReward` marks a reward function that runs on the device (inside the rollout's jit).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from klq_jax.types import Batch
  >>> z = jnp.zeros((2, 3))
  >>> b = Batch(prompt_ids=jnp.zeros((2, 4), jnp.int32), prompt_mask=jnp.ones((2, 4)),
  ...           response_ids=jnp.zeros((2, 3), jnp.int32), response_mask=jnp.ones((2, 3)),
  ...           logp=z, ref_logp=z, values=z, rewards=z)
  >>> jax.tree_util.tree_map(lambda x: x.shape[0], b).logp, b.targets is None
  (2, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

Array = jax.Array

__all__ = ["Rollout", "Batch", "DeviceReward"]


def _replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One batch of experience (``B`` prompts, ``Tq`` prompt slots, ``Tr = T_max`` response slots).

    Attributes:
      prompt_ids: ``[B, Tq]`` int32 left-padded prompts.
      prompt_mask: ``[B, Tq]`` their mask (1 on real tokens).
      response_ids: ``[B, Tr]`` int32 sampled responses, pad after the stop token.
      response_mask: ``[B, Tr]`` float32, 1 on real response tokens (stop token included).
      stopped: ``[B]`` bool, the row ended on a stop token (else truncated at ``T_max``).
      sample_logp: ``[B, Tr]`` float32 log-probs reported by the sampler (checks only).
      logp: ``[B, Tr]`` float32 ``log π(a_t|s_t)`` of the policy, recomputed by one forward pass.
      ref_logp: ``[B, Tr]`` float32 ``log π_b(a_t|s_t)`` of the frozen reference policy.
      values: ``[B, Tr]`` float32 ``V(s_t)`` of the policy's value head (None without one).
      scores: ``[B]`` float32 ``R_φ(x, y)`` from the reward function (no penalty).
      rewards: ``[B, Tr]`` float32, ``R_φ − ω·1[no stop token]`` on the last real token, 0 elsewhere.
    """

    prompt_ids: Array
    prompt_mask: Array
    response_ids: Array
    response_mask: Array
    stopped: Array
    sample_logp: Array
    logp: Array
    ref_logp: Array
    values: Optional[Array]
    scores: Array
    rewards: Array

    replace = _replace

    def to_batch(self) -> "Batch":
        """The :class:`Batch` the update needs (the ``[B, …]`` per-token arrays; no targets yet)."""
        return Batch(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            response_ids=self.response_ids,
            response_mask=self.response_mask,
            logp=self.logp,
            ref_logp=self.ref_logp,
            values=self.values,
            rewards=self.rewards,
        )


@dataclasses.dataclass(frozen=True)
class Batch:
    """The update phase's input: θ_old's experience and the algorithm's fixed targets, ``[N, …]``.

    ``N`` rows (the whole rollout batch; the update shuffles it into minibatches and
    micro-batches, which are again :class:`Batch`\\ es with fewer rows).

    Attributes:
      prompt_ids, prompt_mask: ``[N, Tq]`` left-padded prompts (int32) and their mask.
      response_ids, response_mask: ``[N, Tr]`` responses (int32) and their float32 mask.
      logp: ``[N, Tr]`` ``log π_θold(a_t|s_t)`` (PPO's ratio denominator).
      ref_logp: ``[N, Tr]`` ``log π_b(a_t|s_t)``.
      values: ``[N, Tr]`` ``V_θold(s_t)`` (PPO's value clipping; KLQ's λ-returns), or None.
      rewards: ``[N, Tr]`` per-token rewards ``r_{t+1}`` (the terminal score at the last token).
      targets: ``[N, Tr]`` KLQ's λ-returns ``Ĝ_t`` (Eq. 7), None until computed / under PPO.
      advantages: ``[N, Tr]`` PPO's GAE advantages, None under KLQ.
      returns: ``[N, Tr]`` PPO's value targets, None under KLQ.
    """

    prompt_ids: Array
    prompt_mask: Array
    response_ids: Array
    response_mask: Array
    logp: Array
    ref_logp: Array
    values: Optional[Array]
    rewards: Array
    targets: Optional[Array] = None
    advantages: Optional[Array] = None
    returns: Optional[Array] = None

    replace = _replace


jax.tree_util.register_dataclass(Rollout)
jax.tree_util.register_dataclass(Batch)


@dataclasses.dataclass(frozen=True)
class DeviceReward:
    """A reward ``R_φ(x, y)`` computed on the device, inside the rollout's ``jit``.

    ``fn(params, prompt_ids [B, Tq], prompt_mask [B, Tq], response_ids [B, Tr],
    response_mask [B, Tr], groups) -> scores [B]`` float32 must be traceable (pure ``jnp``);
    ``params`` is any pytree of arrays it reads (a reward model's parameters, or None) and
    travels as a jit argument (sharded as it lies); ``groups`` is the number of batch shards (for
    :func:`klq_jax.rollout.map_micro_batches`; a function that does not micro-batch ignores it).
    :func:`klq_jax.rollout.make_rollout` fuses such a reward with sampling, scoring and the
    targets into one compiled program; any other callable ``reward_fn`` runs on the host.
    Calling the object scores a batch directly (jitted, one compile per shape).

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.types import DeviceReward
      >>> length = DeviceReward(lambda params, pi, pm, ri, rm, groups: rm.sum(-1))
      >>> length(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), jnp.zeros((1, 3), jnp.int32),
      ...        jnp.array([[1.0, 1.0, 0.0]])).tolist()
      [2.0]
    """

    fn: Callable
    params: Any = None

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> Array:
        return _call_device_reward(self, prompt_ids, prompt_mask, response_ids, response_mask)


@jax.jit
def _call_device_reward(reward, prompt_ids, prompt_mask, response_ids, response_mask):
    return reward.fn(reward.params, prompt_ids, prompt_mask, response_ids, response_mask, 1)


jax.tree_util.register_dataclass(DeviceReward, data_fields=["params"], meta_fields=["fn"])
