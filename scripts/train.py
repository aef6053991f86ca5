"""Train a policy with CISPO (or a comparison loss): `cispo train` as a script, for launchers that start a file
(torchrun, the deepspeed launcher). `python scripts/train.py` runs the default tiny run.

Overrides use Hydra's syntax: `python scripts/train.py algo=dapo trainer.steps=20 algo.is_weight_max=4`.
Data-parallel runs start this script under torchrun or the deepspeed launcher with trainer.zero_stage set
(docs: guides/distributed.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
