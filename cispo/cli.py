"""Entry-point glue: the composed Hydra config becomes the typed `Config` once, here, and bad input stops the run
with one message naming what is wrong, before any model is built."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cispo.config import Config, ConfigError


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore: `schema` (the first entry of configs/train.yaml) and
    `eval_schema` (configs/eval.yaml)."""
    from hydra.core.config_store import ConfigStore

    from cispo.eval_config import EvalRunConfig

    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and build the dataclasses (their __post_init__ checks run here)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        # omegaconf wraps errors raised by __post_init__; its own message carries the full key
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else err
        raise SystemExit(f"config error: {cause}") from None
    except ValueError as err:
        raise SystemExit(f"config error: {err}") from None


def report_saved(run_dir: Path) -> None:
    """After a failure: one line on what the run had saved, so nothing saved is taken for lost."""
    from cispo.train.checkpoint import list_checkpoints

    saved = list_checkpoints(run_dir / "checkpoints")
    parts = [f"newest checkpoint {saved[-1]} (trainer.resume=auto continues from it)"] if saved else []
    parts += [f"the HF policy {run_dir / 'final'}"] if (run_dir / "final" / "config.json").exists() else []
    parts += [f"metrics {run_dir / 'metrics.jsonl'}"] if (run_dir / "metrics.jsonl").exists() else []
    print(f"the run failed; saved: {', '.join(parts) if parts else 'nothing yet'}", file=sys.stderr, flush=True)


def run_training(cfg: DictConfig) -> None:
    from cispo.trainer import train

    config = to_config(cfg)
    try:
        result = train(config)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        report_saved(Path(config.trainer.output_dir))
        raise
    before, after = result.eval_before["eval/accuracy"], result.eval_after["eval/accuracy"]
    print(f"held-out accuracy: {before:.3f} before RL -> {after:.3f} after RL ({after - before:+.3f})")
    print(f"boxed-answer rate after RL: {result.eval_after['eval/boxed_rate']:.3f}")
    print(f"run directory: {result.run_dir}  (metrics.jsonl, reward.png, final/)")
