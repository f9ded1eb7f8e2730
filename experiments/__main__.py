"""``python -m experiments COMMAND ...``: the same as the installed ``klq`` command."""

import sys

from experiments.cli import main

sys.exit(main())
