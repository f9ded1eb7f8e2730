"""klq_jax: KL-regularised Q-learning (KLQ) and PPO for token-level online RLHF in JAX.

The pure functions (the maths of the paper) are re-exported here::

    from klq_jax import klq_targets, klq_loss, gae, ppo_loss, token_logprobs

Sub-modules: ``masked``, ``returns`` and ``losses`` (the maths), ``algorithms`` (KLQ / PPO as
targets + loss), ``models`` (GPT-NeoX, GPT-2, the critic, Hugging Face conversion, model sources),
``types`` (the typed ``Rollout``/``Batch`` pytrees), ``sampling`` (KV-cache sampler), ``rollout`` (experience), ``rewards`` (reward models and
programmatic rewards), ``train`` (config, the sharded update step, the loop), ``sharding``,
``checkpoint``, ``data`` (prompt datasets) and ``evaluate`` (exact evaluation). The experiment
code (presets, task builders, demo, sweeps) lives in the ``experiments`` package beside it.
"""

from klq_jax.losses import (
    entropy_from_logits,
    kl_estimate,
    klq_loss,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
from klq_jax.masked import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
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
