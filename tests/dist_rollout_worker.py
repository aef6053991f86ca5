"""Entry point of the multi-rank rollout test (tests/test_distributed.py), run under torchrun.

Every rank owns a rollout engine (vLLM in-process, or HF) and the policy is trained with DeepSpeed ZeRO-3. One
real `rl_step` runs: each rank generates and grades its share of the prompts, the results are gathered, the
policy is updated, and the new weights are gathered bucket by bucket and pushed to every rank's engine. Before
and after, each engine decodes the same probe prompts greedily; rank 0 also decodes them with transformers
from the trainer's gathered weights. The report (rank 0) holds all of it.

    torchrun --nproc_per_node 2 tests/dist_rollout_worker.py --model DIR --out DIR [--engine vllm|hf]
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

PROBES = ["What is 12+7?", "Compute 3*4.", "Say something.", "What is 99-1?"]


def length_reward(response: str, row) -> float:
    """The test's reward (reward.custom): varies within every group, so every group enters the loss."""
    return float(len(response) % 7)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="vllm")
    args, _ = parser.parse_known_args()

    from cispo.config import AlgoConfig, Config, DataConfig, ModelConfig, RolloutConfig, TrainerConfig
    from cispo.sampling.curriculum import Curriculum
    from cispo.data.prompts import PromptStream, encode_prompts
    from cispo.train.distributed import build_policy, init_distributed
    from cispo.phases import PhaseMonitor
    from cispo.sampling.pipeline import Synchronous
    from cispo.sampling.sampler import EngineSampler
    from rollout.base import EngineSink
    from cispo.trainer import rl_step
    from rewards import RewardScorer
    from rewards.config import RewardConfig
    from rollout import build_engine
    from rollout.base import SamplingParams

    cfg = Config(
        model=ModelConfig(path=args.model),
        algo=AlgoConfig(group_size=4, prompts_per_step=4, updates_per_step=1),
        rollout=RolloutConfig(engine=args.engine, max_tokens=8, max_model_len=96,
                              **({"kv_cache_gb": 0.1} if args.engine == "vllm" else {})),
        reward=RewardConfig(custom="dist_rollout_worker:length_reward", num_workers=1),
        data=DataConfig(),
        trainer=TrainerConfig(lr=5e-2, grad_clip=1.0, zero_stage=3, optimizer_impl="torch", threads=1,
                              sync_bucket_mb=1,  # several buckets even for the tiny model
                              deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}}),
    )
    dist = init_distributed(cfg.trainer)
    torch.manual_seed(0)
    policy, tokenizer, updater = build_policy(args.model, cfg, dist)
    engine = build_engine(args.engine, args.model, cfg.rollout, cfg.model, seed=0)
    probes = encode_prompts(tokenizer, [{"prompt": p} for p in PROBES], cfg.data)
    greedy = SamplingParams(n=1, max_tokens=8, temperature=0.0)
    before = [c.token_ids for c in engine.generate(probes, greedy).completions]
    rows = [{"prompt": f"Tell me about {i}.", "answer": "", "source": "length", "id": i} for i in range(16)]
    with RewardScorer(cfg.reward) as scorer:
        curriculum = Curriculum(cfg.curriculum, PromptStream(rows, 0), cfg.rollout.max_tokens)
        sink = EngineSink(engine)
        rollouts = Synchronous(EngineSampler(cfg, engine, sink, scorer, tokenizer, dist), sink, curriculum,
                               cfg.algo.prompts_per_step)
        metrics, _ = rl_step(cfg, 1, rollouts, updater, PhaseMonitor())
    after = [c.token_ids for c in engine.generate(probes, greedy).completions]
    weights = {name: t.to("cpu", copy=True) for name, t in updater.named_weights()}  # collective under ZeRO-3
    seen = dist.all_gather_object({"rank": dist.rank, "before": before, "after": after,
                                   "sync": getattr(engine, "last_sync", None)})
    if dist.is_main:
        from transformers import AutoModelForCausalLM

        from rollout.engines.hf_engine import HFEngine

        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        reference.load_state_dict(weights, strict=False)
        hf = HFEngine(reference, tokenizer)
        expected = [c.token_ids for c in hf.generate(probes, greedy).completions]
        report = {"world_size": dist.world_size, "ranks": seen, "hf_after": expected, "metrics": metrics}
        Path(args.out, "report.json").write_text(json.dumps(report, default=str))
    engine.close()
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
