"""Entry point of the data-parallel equivalence tests (tests/test_distributed.py), run under torchrun.

Runs the trainer's own `update_policy` (pi_old, mini-batches of prompt groups, token-budget micro-batches, CISPO
loss, optimizer steps) on fixed synthetic batches with variable-length responses, and writes what it saw: the
metrics of every update_policy call, the pre-clip gradient norm of every optimizer step, and the final weights.
`run_case` with `zero_stage=None` in one process is the reference (plain torch).

    torchrun --nproc_per_node 2 tests/dist_worker.py --model DIR --out DIR --stage 3 [--variants ok,rank_mean]

Variants (run one after another in the same processes, each from the initial weights):
  ok              the trainer as it is
  rank_mean       a deliberately wrong normaliser: coefficients computed over each rank's share instead of
                  the whole mini-batch (the per-rank token mean); the tests assert that it is caught
  no_world_scale  the loss is not multiplied by the world size (DeepSpeed's rank averaging left in place): the
                  update hardly changes (Adam is scale invariant), but the gradient norm is halved
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cispo.algo.batch import Sample, micro_batches, split_groups  # noqa: E402
from cispo.config import AlgoConfig, Config, ModelConfig, RolloutConfig, TrainerConfig  # noqa: E402

STEPS = 2  # update_policy calls (rollout batches); each makes UPDATES optimizer steps
UPDATES = 2
GROUPS, GROUP_SIZE = 6, 3


def make_samples(step: int, vocab: int) -> list[Sample]:
    """A rollout batch: GROUPS prompts x GROUP_SIZE responses of 1..40 tokens, random advantages and engine
    logprobs; one response per batch is left out of the loss (loss_len 0) and one keeps only part of its tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    drawn = []  # (prompt, response, group)
    for group in range(GROUPS):
        prompt = torch.randint(3, vocab, (rand(3, 10),), generator=g).tolist()
        for _ in range(GROUP_SIZE):
            drawn.append((prompt, torch.randint(3, vocab, (rand(1, 40),), generator=g).tolist(), group))
    keep = [len(response) for _, response, _ in drawn]
    keep[4], keep[7] = 0, max(1, len(drawn[7][1]) // 2)
    samples = []
    for (prompt, response, group), n in zip(drawn, keep):
        logp = -torch.rand(n, generator=g) * 3
        samples.append(Sample.leading(prompt, response, n, logp, float(torch.randn(1, generator=g)), group))
    return samples


def case_config(model_dir: str, zero_stage, *, budget: int, gradient_checkpointing: bool = False) -> Config:
    deepspeed = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if zero_stage == 3 else {}
    return Config(
        model=ModelConfig(path=model_dir, gradient_checkpointing=gradient_checkpointing),
        algo=AlgoConfig(loss="cispo", is_weight_max=1.05, loss_agg="token_group", group_size=GROUP_SIZE,
                        prompts_per_step=GROUPS, updates_per_step=UPDATES),
        rollout=RolloutConfig(temperature=1.0, max_tokens=64, max_model_len=128),
        trainer=TrainerConfig(lr=3e-3, adam_betas=(0.9, 0.95), adam_eps=1e-6, grad_clip=0.5, warmup_steps=1,
                              max_tokens_per_micro=budget, zero_stage=zero_stage, optimizer_impl="torch",
                              deepspeed=deepspeed, threads=1),
    )


def run_case(cfg: Config, dist, variant: str = "ok") -> dict:
    """update_policy for STEPS batches from the model's initial weights; metrics, grad norms, final weights."""
    import cispo.train.update as update
    from cispo.train.distributed import build_policy
    from cispo.model.policy import shares_prompts

    torch.manual_seed(0)
    policy, _, updater = build_policy(cfg.model.path, cfg, dist)
    update.micro_batches = micro_batches
    if variant == "rank_mean":  # the bug the tests must catch: each rank normalises over its own share
        update.micro_batches = lambda samples, mine, budget, agg, norm_over=None, **packing: micro_batches(
            samples, mine, budget, agg, **packing)
    if variant == "no_world_scale":
        updater.backward = lambda loss: updater.engine.backward(loss)
    norms, step = [], updater.step
    updater.step = lambda lr: norms.append(step(lr)) or norms[-1]
    metrics, micro = [], []
    vocab = policy.config.vocab_size
    for k in range(STEPS):
        samples = make_samples(k, vocab)
        kept = [s for s in samples if s.loss_len > 0]
        for mini in split_groups(kept, UPDATES):  # this rank's micro-batches (gradient accumulation steps)
            micro.append(len(micro_batches(kept, dist.shard_groups(kept, mini), cfg.trainer.max_tokens_per_micro,
                                           cfg.algo.loss_agg, norm_over=mini, share_prompts=shares_prompts(policy))))
        metrics.append(update.update_policy(cfg, k + 1, updater, samples))
    weights = {name: t.detach().to("cpu", copy=True) for name, t in updater.named_weights()}
    update.micro_batches = micro_batches
    return {"metrics": metrics, "norms": norms, "weights": weights, "micro_batches": micro,
            "updater": updater, "policy": policy}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--variants", default="ok")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--export", action="store_true", help="also export the ok variant's policy in HF format")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank
    from cispo.train.checkpoint import export_hf
    from cispo.train.distributed import init_distributed

    out = Path(args.out)
    cfg = case_config(args.model, args.stage, budget=args.budget, gradient_checkpointing=args.gradient_checkpointing)
    start = time.perf_counter()
    dist = init_distributed(cfg.trainer)
    report = {"world_size": dist.world_size, "variants": {}}
    for variant in args.variants.split(","):
        result = run_case(cfg, dist, variant)
        if args.export and variant == "ok":
            from transformers import AutoTokenizer

            export_hf(result["updater"], out / "hf", AutoTokenizer.from_pretrained(args.model))
        if dist.is_main:
            torch.save(result["weights"], out / f"{variant}.pt")
        report["variants"][variant] = {"metrics": result["metrics"], "norms": result["norms"],
                                       "micro_batches": result["micro_batches"]}
        del result
    report["seconds"] = time.perf_counter() - start
    if dist.is_main:
        (out / "report.json").write_text(json.dumps(report))
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
