"""`cispo eval` as a script: evaluate a checkpoint or an OpenAI-compatible endpoint on the held-out split (the
work is cispo/commands/evaluate.py; its docstring says how answers are cached and resumed).

    python scripts/evaluate.py model.path=runs/X/final eval.k=8
    python scripts/evaluate.py endpoint=local_vllm endpoint.model=NAME
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.cli import main  # noqa: E402
from cispo.commands.evaluate import Answer, evaluate, format_table, summarize  # noqa: E402,F401  (tests import them)

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
