"""Every runnable example in a docstring of the library, the experiments and the converter runs.

Examples may use the test helpers ``fixtures`` and ``testing`` (tests/helpers/), which this runner
provides: they build tiny tokenizers, datasets and checkpoints offline.
"""
import doctest
import importlib
import pathlib

import pytest

from tests.helpers import fixtures, testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Their examples run in their own test files (with extra checks on the docstrings).
ELSEWHERE = {"klq_jax.losses", "klq_jax.returns"}


def _modules_with_examples():
    names = []
    for pkg in ("klq_jax", "experiments", "convert"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if ">>>" not in path.read_text():
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name not in ELSEWHERE and not name.endswith("__main__"):
                names.append(name)
    return names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={"fixtures": fixtures, "testing": testing},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0
