"""τ sweep of KLQ against PPO: ``python experiments/tau_sweep.py PRESET --taus ... [-- overrides]``.

A thin wrapper around :func:`klq_jax.sweep.main` (the same as ``python -m klq_jax.sweep``).
"""

from klq_jax.sweep import main

if __name__ == "__main__":
    main()
