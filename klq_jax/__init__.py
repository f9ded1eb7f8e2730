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

import importlib

# name -> the submodule that defines it. Loaded on first use (PEP 562), so that importing a light
# submodule (klq_jax.config: the run configs behind the command-line help) does not load JAX.
_EXPORTS = {
    "klq_jax.losses": ("entropy_from_logits", "kl_estimate", "klq_loss", "ppo_loss",
                       "ppo_policy_loss", "ppo_value_loss", "token_logprobs"),
    "klq_jax.masked": ("explained_variance", "masked_mean", "masked_sum", "masked_var",
                       "masked_whiten"),
    "klq_jax.returns": ("discounted_returns", "discounted_returns_single", "gae", "gae_single",
                        "kl_shaped_rewards", "klq_targets", "klq_targets_single", "ppo_targets",
                        "ppo_value_targets", "whiten_advantages"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "klq_targets", "klq_targets_single", "gae", "gae_single", "kl_shaped_rewards",
    "discounted_returns", "discounted_returns_single", "ppo_value_targets", "whiten_advantages",
    "ppo_targets", "token_logprobs", "entropy_from_logits", "kl_estimate", "masked_sum",
    "masked_mean", "masked_var", "masked_whiten", "explained_variance", "klq_loss",
    "ppo_policy_loss", "ppo_value_loss", "ppo_loss",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:  # a submodule: klq_jax.losses after a bare ``import klq_jax``
        try:
            value = importlib.import_module(f"klq_jax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"klq_jax.{name}":
                raise
            raise AttributeError(f"module 'klq_jax' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
