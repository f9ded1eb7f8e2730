"""klq_jax: KL-regularised Q-learning (KLQ) and PPO for token-level online RLHF in JAX.

The pure functions (the maths of the paper) are re-exported here::

    from klq_jax import klq_targets, klq_loss, gae, ppo_loss, token_logprobs

Sub-modules: ``returns`` and ``losses`` (the maths), ``models.gpt_neox`` (the network),
``models.hf`` (Hugging Face conversion), ``sampling`` (KV-cache sampler), ``rollout`` (experience),
``algorithms`` (KLQ / PPO as targets + loss), ``train`` (the sharded trainer), ``sharding``,
``checkpoint``, ``presets``, ``tasks``, ``data``, ``evaluate`` (exact optimum), ``tabular``.
"""

from klq_jax.losses import (
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    klq_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
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

__version__ = "0.1.0"

__all__ = [
    "klq_targets", "klq_targets_single", "gae", "gae_single", "kl_shaped_rewards",
    "discounted_returns", "discounted_returns_single", "ppo_value_targets", "whiten_advantages",
    "ppo_targets", "token_logprobs", "entropy_from_logits", "kl_estimate", "masked_sum",
    "masked_mean", "masked_var", "masked_whiten", "explained_variance", "klq_loss",
    "ppo_policy_loss", "ppo_value_loss", "ppo_loss",
]
