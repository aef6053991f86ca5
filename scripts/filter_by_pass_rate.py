"""`cispo filter` as a script: keep the training prompts whose pass rate lies strictly inside a band (MiniMax-M1
§4); the work is cispo/commands/filter.py.

    python scripts/filter_by_pass_rate.py --k 8 --limit 64 --out runs/filtered [-- Hydra overrides]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.commands.filter import main  # noqa: E402,F401  (tests call main(argv) directly)
from cispo.cli import main as cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main(["filter", *sys.argv[1:]]))
