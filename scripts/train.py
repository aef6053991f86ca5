"""Train a policy with CISPO (or a comparison loss). `python scripts/train.py` runs the default tiny run.

Overrides use Hydra's syntax: `python scripts/train.py algo=dapo trainer.steps=20 algo.is_weight_max=4`.
Data-parallel runs start the same script under torchrun or the deepspeed launcher with trainer.zero_stage set
(README, "Distributed training").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cispo.cli import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from cispo.cli import run_training

    run_training(cfg)


if __name__ == "__main__":
    # the deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK); Hydra would take it for an override
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
