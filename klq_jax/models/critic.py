"""A policy with a separate value network (TRL's layout), behind the policy's own interface.

By default the value function is a head on the policy's body (the paper, §3.2). TRL instead trains a
separate critic, a full copy of the reward model's trunk with its score head as the value head.
:class:`PolicyWithCritic` bundles the two so that every function that takes a policy
``(graphdef, params)`` — the sampler, :func:`klq_jax.rollout.response_logprobs`, the trainer's
update — works unchanged:

* with a KV cache (sampling) only the policy runs;
* without one (scoring, training) the critic runs on the same tokens and its per-token values are
  returned as ``ModelOutput.values``.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from klq_jax.models import critic, gpt_neox
    >>> rm_cfg = gpt_neox.GPTNeoXConfig.tiny(lm_head=False, score_head=True)
    >>> rm_gd, rm_params = gpt_neox.init(rm_cfg, jax.random.key(1))
    >>> pol_gd, pol_params = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(), jax.random.key(0))
    >>> gd, params = critic.with_critic_from_reward_model(pol_gd, pol_params, rm_gd, rm_params)
    >>> out = gpt_neox.apply(gd, params, jnp.array([[3, 4, 5]]), jnp.array([[1, 1, 1]]))
    >>> out.logits.shape, out.values.shape
    ((1, 3, 64), (1, 3))
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from klq_jax.models import gpt_neox


class PolicyWithCritic(nnx.Module):
    """A GPT-NeoX policy (LM head) + a GPT-NeoX critic (value head) with the policy's interface."""

    def __init__(self, policy: gpt_neox.GPTNeoX, critic: gpt_neox.GPTNeoX):
        if not policy.config.lm_head:
            raise ValueError("PolicyWithCritic: the policy needs an LM head.")
        if not critic.config.value_head:
            raise ValueError("PolicyWithCritic: the critic needs a value head (config.value_head=True).")
        if critic.config.vocab_size < policy.config.vocab_size:
            raise ValueError(
                f"PolicyWithCritic: the critic's vocabulary ({critic.config.vocab_size}) is smaller than "
                f"the policy's ({policy.config.vocab_size}); they must share the tokenizer."
            )
        self.policy = policy
        self.critic = critic
        # The policy's config, marked as having values (the rollout asks for them).
        self.config = policy.config.replace(value_head=True)

    def __call__(
        self, tokens, mask, *, cache=None, logits: bool = True, prefill: bool = False,
        queries_from: int | None = None,
    ) -> gpt_neox.ModelOutput:
        out = self.policy(tokens, mask, cache=cache, logits=logits, prefill=prefill,
                          queries_from=queries_from)
        if cache is None:
            values = self.critic(tokens, mask, logits=False, queries_from=queries_from).values
            out = out._replace(values=values)
        return out

    def logits(self, hidden):
        return self.policy.logits(hidden)

    def value_network(self) -> gpt_neox.GPTNeoX:
        """The critic: a forward of it alone gives the values (scoring without ``log π``)."""
        return self.critic

    def values(self, hidden):
        raise ValueError(
            "PolicyWithCritic computes values with the critic's own trunk: read ModelOutput.values "
            "of a full forward pass instead of calling values(hidden)."
        )


def critic_from_reward_model(rm: gpt_neox.GPTNeoX) -> gpt_neox.GPTNeoX:
    """A value network initialised from a score-head reward model (its score head → value head)."""
    if not rm.config.score_head:
        raise ValueError("critic_from_reward_model needs a reward model with a score head.")
    cfg = rm.config.replace(score_head=False, value_head=True, lm_head=False, tie_word_embeddings=False)
    graphdef, params = nnx.split(type(rm)(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    pure = nnx.to_pure_dict(params)
    rm_pure = nnx.to_pure_dict(nnx.state(rm, nnx.Param))
    for k, v in rm_pure.items():
        if k in pure:
            pure[k] = v
    pure["value_kernel"] = rm_pure["score_kernel"]
    pure["value_bias"] = jnp.zeros_like(pure["value_bias"])
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params)


def with_critic_from_reward_model(policy_graphdef, policy_params, rm_graphdef, rm_params):
    """``(graphdef, params)`` of :class:`PolicyWithCritic`: the policy + a critic from the RM."""
    policy = nnx.merge(policy_graphdef, policy_params)
    if policy.config.value_head:  # the value comes from the critic: drop the policy's own head
        cfg = policy.config.replace(value_head=False)
        pure = nnx.to_pure_dict(policy_params)
        pure.pop("value_kernel", None)
        pure.pop("value_bias", None)
        gd, params = nnx.split(type(policy)(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        nnx.replace_by_pure_dict(params, pure)
        policy = nnx.merge(gd, params)
    critic = critic_from_reward_model(nnx.merge(rm_graphdef, rm_params))
    return nnx.split(PolicyWithCritic(policy, critic), nnx.Param)
