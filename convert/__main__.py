"""``python -m convert``: the checkpoint conversion CLI (the same as ``klq convert``)."""

import sys

from experiments.cli import klq_convert

if __name__ == "__main__":
    sys.exit(klq_convert())
