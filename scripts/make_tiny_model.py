"""Build the tiny model and tokenizer in Hugging Face format: `python scripts/make_tiny_model.py OUT_DIR`.

The trainer builds (and caches) it by itself for `model.path=tiny`; this script is for using it elsewhere
(a `vllm serve`, a test, a notebook)."""

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.config import ModelConfig, TinyModelConfig  # noqa: E402
from cispo.model.tiny_model import make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama", "minimax"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    built = make_tiny_model(TinyModelConfig(arch=args.arch, seed=args.seed), ModelConfig().cache_dir)
    shutil.copytree(built, args.out, dirs_exist_ok=True)
    print(args.out)


if __name__ == "__main__":
    main()
