"""The runnable examples in the data modules' docstrings."""
import doctest

import pytest

from klq_jax.data import common, fixtures, hh, imdb, iterator, tldr
import klq_jax.data as data_pkg


@pytest.mark.parametrize("module", [data_pkg, common, fixtures, hh, imdb, iterator, tldr], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
