"""The recipe: generate, score, compute advantages, update the policy, sync the engine, log (DESIGN.md §1).

Deviations from the M1 paper, on purpose:
1. pi_old is recomputed by the trainer after generation (not taken from the engine), so the CISPO ratio
   measures staleness only; the engine's own logprobs feed the mismatch metrics and the optional TIS weight.
2. Groups whose rewards are all equal are left out of the loss and out of its normaliser
   (`algo.drop_zero_variance`, as DAPO's dynamic sampling and ScaleRL do); without refill the batch shrinks.
3. An early stop's forced EOS is not in the loss: it was not sampled from the policy.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cispo.advantages import group_advantages
from cispo.batch import Sample, micro_batches, split_groups
from cispo.config import Config
from cispo.data import PromptStream, encode_prompts, load_splits
from cispo.evaluation import greedy_accuracy
from cispo.logging import RunLogger
from cispo.loss import loss_metrics, mismatch_metrics, policy_loss, tis_weights
from cispo.optim import TorchUpdater
from cispo.policy import load_policy, micro_batch_logprobs
from cispo.warm_start import prepare_model
from rewards import RewardScorer
from rollout import build_engine, resolve_engine
from rollout.base import SamplingParams
from rollout.metrics import rollout_metrics


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path  # the final policy in HF format
    eval_before: dict
    eval_after: dict


def train(cfg: Config) -> TrainResult:
    seed_everything(cfg.trainer.seed, cfg.trainer.threads)
    run_dir = Path(cfg.trainer.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    train_rows, eval_rows = load_splits(cfg.data)
    scorer = RewardScorer(cfg.reward)
    with scorer:
        model_dir = prepare_model(cfg, train_rows, scorer)
        policy, tokenizer = load_policy(model_dir, cfg.model)
        updater = TorchUpdater(policy, cfg.trainer)
        engine = build_engine(resolve_engine(cfg.rollout.engine, model_dir), model_dir, cfg.rollout, cfg.model, cfg.trainer.seed)
        logger = RunLogger(cfg.logger, run_dir, asdict(cfg), total_steps=cfg.trainer.steps)
        stream = PromptStream(train_rows, cfg.data.seed)
        eval_prompts = encode_prompts(tokenizer, eval_rows, cfg.data)
        evaluate = lambda: greedy_accuracy(engine, eval_prompts, eval_rows, scorer, cfg.rollout.max_tokens)  # noqa: E731
        try:
            eval_before = evaluate()
            logger.log(0, eval_before)
            eval_after = eval_before
            for step in range(1, cfg.trainer.steps + 1):
                metrics = rl_step(cfg, step, stream, tokenizer, engine, scorer, policy, updater)
                if step == cfg.trainer.steps or (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0):
                    eval_after = evaluate()
                    metrics |= eval_after
                logger.log(step, metrics)
        finally:
            engine.close()
            logger.finish()
    final = run_dir / "final"
    policy.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return TrainResult(run_dir, final, eval_before, eval_after)


def rl_step(cfg: Config, step, stream, tokenizer, engine, scorer, policy, updater) -> dict:
    algo = cfg.algo
    rows = stream.take(algo.prompts_per_step)
    prompts = encode_prompts(tokenizer, rows, cfg.data)
    sampling = SamplingParams(
        n=algo.group_size, max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, seed=cfg.rollout.seed + step,
    )
    rollout = engine.generate(prompts, sampling)
    done = rollout.completions
    graded = scorer.score(
        [c.text for c in done], [rows[c.prompt_index] for c in done],
        response_lengths=[len(c.token_ids) for c in done], max_tokens=cfg.rollout.max_tokens,
        truncated=[c.finish_reason == "length" for c in done],
    )
    adv = group_advantages(
        torch.tensor(graded.scores).view(len(rows), algo.group_size), std_norm=algo.adv_std_norm, level=algo.adv_norm
    )
    samples = [
        Sample(
            prompt_ids=prompts[c.prompt_index], response_ids=c.token_ids,
            loss_len=c.loss_tokens if graded.loss_mask[k] else 0,
            rollout_logp=torch.tensor(c.logprobs[: c.loss_tokens] if graded.loss_mask[k] else [], dtype=torch.float32),
            adv=float(adv.adv.view(-1)[k]), group=c.prompt_index,
        )
        for k, c in enumerate(done)
        if not (algo.drop_zero_variance and adv.zero_variance[c.prompt_index])
    ]
    stats = update_policy(cfg, policy, updater, samples)
    engine.load_weights(policy.named_parameters())
    return rollout_metrics(rollout) | graded.metrics | stats | {
        "adv/zero_variance_frac": adv.zero_variance.float().mean().item(),
        "train/samples": len(samples),
    }


def update_policy(cfg: Config, policy, updater, samples: list[Sample]) -> dict:
    """pi_old for every sample, then `algo.updates_per_step` optimizer steps over mini-batches of prompt groups."""
    algo, budget = cfg.algo, cfg.trainer.max_tokens_per_micro
    head = dict(temperature=cfg.rollout.temperature, fp32_head=cfg.model.fp32_lm_head)
    samples = [s for s in samples if s.loss_len > 0]
    if not samples:
        return {"train/updates": 0}
    with torch.no_grad():
        for mb in micro_batches(samples, list(range(len(samples))), budget, None):
            for i, logp in zip(mb.sample_ids, mb_split(micro_batch_logprobs(policy, mb, **head).logp, mb.lengths)):
                samples[i].old_logp = logp
    old = torch.cat([s.old_logp for s in samples])
    metrics = mismatch_metrics(old, torch.cat([s.rollout_logp for s in samples]))
    outs, losses, norms, entropy = [], [], [], []
    for mini in split_groups(samples, algo.updates_per_step):
        total = 0.0
        for mb in micro_batches(samples, mini, budget, algo.loss_agg):
            tl = micro_batch_logprobs(policy, mb, **head)
            out = policy_loss(
                tl.logp, mb.old_logp, mb.adv, mb.coef, loss=algo.loss, is_weight_max=algo.is_weight_max,
                is_weight_min=algo.is_weight_min, unified_mask=algo.unified_mask, clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                tis_weight=tis_weights(mb.old_logp, mb.rollout_logp, algo.tis_cap) if algo.tis_cap else None,
            )
            updater.backward(out.loss)
            total += out.loss.item()
            outs.append(out)
            entropy.append(tl.entropy)
        norms.append(updater.step())
        losses.append(total)
    return metrics | loss_metrics(outs) | {
        "loss/value": sum(losses) / len(losses),
        "loss/entropy": torch.cat(entropy).mean().item(),
        "train/grad_norm": sum(norms) / len(norms),
        "train/lr": updater.lr,
        "train/updates": len(norms),
        "train/tokens": int(old.numel()),
    }


def mb_split(values: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Split a micro-batch's flat per-token values [N] back into one tensor per sample."""
    return list(values.detach().split(lengths))


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
