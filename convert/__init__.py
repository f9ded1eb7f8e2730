"""Checkpoint conversion entry point: ``python -m convert`` (see :mod:`convert.cli`)."""
