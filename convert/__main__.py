"""``python -m convert``: the checkpoint conversion CLI (same as ``klq-convert``).

The mapping lives in :mod:`klq_jax.models.hf`; the arguments in :mod:`klq_jax.convert_cli`.
Run ``python -m convert --help`` for both directions.
"""

import sys

from klq_jax.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
