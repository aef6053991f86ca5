"""Run logging behind one small interface: JSONL always, W&B (offline unless configured), a progress bar,
and a PNG of reward and held-out accuracy vs step at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from cispo.config import LoggerConfig


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, total_steps: int):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.history: list[dict] = []
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, desc="cispo", disable=not cfg.progress, dynamic_ncols=True)
        self.wandb = None
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.project, name=cfg.run_name, config=config, mode=cfg.wandb_mode, dir=str(self.run_dir)
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if step > 0:
            self.bar.update(1)
        shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k in ("reward/mean", "eval/accuracy")}
        self.bar.set_postfix(shown, refresh=True)
        if "eval/accuracy" in metrics:
            self.bar.write(f"step {step}: held-out accuracy {metrics['eval/accuracy']:.3f}")

    def finish(self) -> Path | None:
        """Close the sinks; returns the plot's path (when plotting is on and there is something to plot)."""
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_history(self.history, self.run_dir / "reward.png") if self.cfg.plot and self.history else None


def plot_history(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("reward/mean", "train reward (mean)"), ("eval/accuracy", "held-out accuracy (greedy)")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if key.startswith("eval") else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
