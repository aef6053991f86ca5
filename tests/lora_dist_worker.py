"""Entry point of the LoRA data-parallel tests (tests/test_lora.py), run under torchrun.

The trainer's update_policy on tests/dist_worker.py's fixed batches, with model.lora set: `run_case` trains STEPS
batches and reports metrics, gradient norms and the adapter (the updater's named_weights). The `resumed` case
trains one batch, saves a checkpoint (Checkpointer, DeepSpeed's format without the frozen base), builds the
policy and updater again, loads it and trains the second batch: it must end where the uninterrupted run ends.

    torchrun --nproc_per_node 2 tests/lora_dist_worker.py --model DIR --out DIR --stage 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dist_worker  # noqa: E402
from cispo.config import LoraConfig  # noqa: E402

LORA = dict(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])


def lora_config(model_dir: str, zero_stage):
    cfg = dist_worker.case_config(model_dir, zero_stage, budget=64)
    cfg.model.lora = LoraConfig(**LORA)
    cfg.trainer.lr = 3e-2  # the adapter moves visibly in two steps
    return cfg


def optimizer_elements(updater) -> int:
    """Elements of the optimizer state this rank holds (AdamW: exp_avg and exp_avg_sq per parameter element)."""
    opt = getattr(updater, "optimizer", None) or updater.engine.optimizer
    states = opt.state.values() if hasattr(opt, "state") and opt.state else []
    total = sum(v.numel() for s in states for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    if not total:  # ZeRO keeps the state on its flat partitions, in the wrapped optimizer
        inner = getattr(opt, "optimizer", opt)
        total = sum(v.numel() for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def resumed(cfg, dist, out: Path) -> dict:
    import cispo.train.update as update
    from cispo.train.checkpoint import Checkpointer
    from cispo.train.distributed import build_policy

    torch.manual_seed(0)
    _, _, updater = build_policy(cfg.model.path, cfg, dist)
    update.update_policy(cfg, 1, updater, dist_worker.make_samples(0, updater.policy.config.vocab_size))
    checkpoints = Checkpointer(out / "checkpoints", 2, dist)
    path = checkpoints.save(1, updater, {})
    del updater
    torch.manual_seed(1)  # a different RNG state: the adapter must come from the checkpoint
    _, _, updater = build_policy(cfg.model.path, cfg, dist)
    checkpoints.load(path, updater, {})
    metrics = update.update_policy(cfg, 2, updater, dist_worker.make_samples(1, updater.policy.config.vocab_size))
    weights = {name: t.detach().to("cpu", copy=True) for name, t in updater.named_weights()}
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return {"metrics": metrics, "weights": weights, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    args, _ = parser.parse_known_args()
    from cispo.train.distributed import init_distributed

    out = Path(args.out)
    cfg = lora_config(args.model, args.stage)
    dist = init_distributed(cfg.trainer)
    result = dist_worker.run_case(cfg, dist)
    report = {"world_size": dist.world_size, "metrics": result["metrics"], "norms": result["norms"],
              "optimizer_elements": dist.all_gather_object(optimizer_elements(result["updater"]))}
    if dist.is_main:
        torch.save(result["weights"], out / "ok.pt")
    del result
    again = resumed(cfg, dist, out)
    if dist.is_main:
        torch.save(again["weights"], out / "resumed.pt")
        report |= {"resumed_metrics": again["metrics"], "checkpoint_files": again["files"]}
        (out / "report.json").write_text(json.dumps(report))
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
