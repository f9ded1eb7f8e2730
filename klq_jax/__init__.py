"""klq_jax: KL-regularised Q-learning (KLQ) and PPO for token-level online RLHF in JAX."""

__version__ = "0.1.0"
