"""`python -m cispo COMMAND ...`, the same as the `cispo` command (cispo/cli.py)."""

import sys

from cispo.cli import main

if __name__ == "__main__":
    sys.exit(main())
