"""The checks the model configs share (GPT-NeoX, Llama, GPT-2, DistilBERT), as phrases for each
config's one-line ``Invalid <Config>: ...; ...`` error, and the lookup of a named size.

Example::

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class C:
    ...     width: int = 6
    ...     heads: int = 4
    ...     dtype: str = "float8"
    ...     param_dtype: str = "float32"
    >>> positive(C(heads=0), ("width", "heads"))
    ['heads=0 must be positive']
    >>> divisible(C(), "width", "heads") + dtypes(C())
    ['width=6 is not divisible by heads=4', "dtype='float8' must be 'float32', 'bfloat16' or 'float16'"]
    >>> raise_if([], "C")
    >>> raise_if(["heads=0 must be positive"], "C")
    Traceback (most recent call last):
    ...
    ValueError: Invalid C: heads=0 must be positive
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

DTYPES = ("float32", "bfloat16", "float16")


def positive(config: Any, names: Iterable[str]) -> list[str]:
    """A phrase for each field of ``names`` that is not > 0."""
    return [f"{n}={getattr(config, n)} must be positive" for n in names if getattr(config, n) <= 0]


def divisible(config: Any, width: str, heads: str) -> list[str]:
    """The phrase for a ``width`` field that the ``heads`` field does not divide (or none)."""
    w, h = getattr(config, width), getattr(config, heads)
    return [f"{width}={w} is not divisible by {heads}={h}"] if w % h else []


def supported(config: Any, name: str, options: Iterable[str]) -> list[str]:
    """The phrase for a field whose value is not one of ``options`` (or none)."""
    value, options = getattr(config, name), sorted(options)
    return [] if value in options else [f"{name}={value!r} is not supported (supported: {options})"]


def dtypes(config: Any, names: Iterable[str] = ("dtype", "param_dtype")) -> list[str]:
    """A phrase for each dtype field that is not float32, bfloat16 or float16."""
    return [
        f"{n}={getattr(config, n)!r} must be 'float32', 'bfloat16' or 'float16'"
        for n in names if getattr(config, n) not in DTYPES
    ]


def hf_token_ids_field():
    """The ``hf_token_ids`` field every model config carries: the ``bos/eos/pad_token_id`` of the
    Hugging Face config the model was read from (``{}`` for a model built here), which
    :func:`klq_jax.models.hf.save_hf` writes back. Not part of the network: ``==`` and ``hash``
    ignore it."""
    return dataclasses.field(default_factory=dict, compare=False)


def raise_if(problems: list[str], config_name: str) -> None:
    """``ValueError("Invalid <config_name>: <problems joined by ; >")`` if there are any."""
    if problems:
        raise ValueError(f"Invalid {config_name}: " + "; ".join(problems))


def preset(presets: Mapping[str, Any], key: str, name: str, family: str, accepted: str, overrides):
    """``presets[key]`` with ``overrides`` (a size looked up by name); an unknown ``key`` is an
    error listing the known ones (``name``: what the user passed, ``accepted``: the spellings
    besides the keys that are accepted)."""
    if key not in presets:
        raise ValueError(
            f"Unknown {family} preset {name!r}. Known presets: {sorted(presets)} ({accepted})."
        )
    return dataclasses.replace(presets[key], **overrides)
