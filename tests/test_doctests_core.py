"""The runnable examples in the docstrings of the core modules run and print what they say."""
import doctest
import importlib

import pytest

MODULES = [
    "klq_jax.models.gpt_neox",
    "klq_jax.models.gpt2",
    "klq_jax.models.llama",
    "klq_jax.models.distilbert",
    "klq_jax.models.hf",
    "klq_jax.models.hf.convert",
    "klq_jax.models.critic",
    "klq_jax.sharding",
    "klq_jax.algorithms",
    "klq_jax.checkpoint",
    "klq_jax.presets",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
