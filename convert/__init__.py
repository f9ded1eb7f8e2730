"""Checkpoint conversion entry point: ``python -m convert`` (see :mod:`klq_jax.convert_cli`)."""
