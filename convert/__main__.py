"""``python -m convert``: the checkpoint conversion CLI (the same as ``klq convert``)."""

import sys

from convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
