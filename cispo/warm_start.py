"""The starting policy: a user's model as is, or the tiny model after a short supervised warm start.

RL needs a non-zero success rate to learn from, and a random tiny model never writes `\\boxed{82}`. The warm
start teaches the answer format and a little arithmetic on the training split, and stops at the first check
whose greedy accuracy (on training problems the SFT batches never use) reaches `target_accuracy`. Accuracy
jumps within a few dozen steps once this model finds the carry, so the checks are frequent and cheap: one
teacher-forced forward, exact because greedy decoding reproduces the gold answer token for token if and only
if every gold token is the argmax given the gold prefix. The result is cached under a key of everything that
determines it, and written atomically.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.batch import MicroBatch, Sample, micro_batches
from cispo.config import Config
from cispo.data import encode_prompts
from cispo.loss import policy_loss
from cispo.minimax import packed_forward
from cispo.optim import warmup_lambda
from cispo.policy import check_model_path, micro_batch_logprobs
from cispo.tiny_model import config_key, make_tiny_model, save_atomically


def prepare_model(cfg: Config, train_rows: list[dict]) -> str:
    """The HF directory (or hub name) the run starts from."""
    if cfg.model.path != "tiny":
        check_model_path(cfg.model.path)
        return cfg.model.path
    base = make_tiny_model(cfg.model.tiny, cfg.model.cache_dir)
    ws = cfg.model.warm_start
    if not ws.enabled:
        return str(base)
    key = config_key({"tiny": asdict(cfg.model.tiny), "warm_start": asdict(ws), "data": asdict(cfg.data),
                      "max_tokens": cfg.rollout.max_tokens})
    out = base.with_name(f"{base.name}-warm-{key}")
    if not (out / "config.json").exists():
        warm_start(base, out, cfg, train_rows)
    return str(out)


def answer_samples(tokenizer, rows: list[dict], prompts: list[list[int]]) -> list[Sample]:
    """The gold completion `\\boxed{answer}<eos>` of each row as a sample with advantage 1."""
    samples = []
    for k, (row, prompt) in enumerate(zip(rows, prompts)):
        answer = tokenizer.encode(f"\\boxed{{{row['answer']}}}", add_special_tokens=False) + [tokenizer.eos_token_id]
        samples.append(Sample(prompt, answer, len(answer), torch.zeros(len(answer)), adv=1.0, group=k))
    return samples


@torch.no_grad()
def greedy_exact_match(model, mb: MicroBatch) -> float:
    """Share of the micro-batch's samples whose every target token is the model's argmax."""
    hidden = packed_forward(model, mb.input_ids, mb.position_ids)[0]
    hit = (model.get_output_embeddings()(hidden[mb.logit_pos]).argmax(-1) == mb.targets).float()
    return sum(bool(h.all()) for h in hit.split(mb.lengths)) / len(mb.lengths)


def warm_start(base: Path, out: Path, cfg: Config, train_rows: list[dict]) -> None:
    ws = cfg.model.warm_start
    torch.manual_seed(cfg.model.tiny.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    check_rows, sft_rows = train_rows[: ws.eval_problems], train_rows[ws.eval_problems :]
    (check,) = micro_batches(answer_samples(tokenizer, check_rows, encode_prompts(tokenizer, check_rows, cfg.data)),
                             list(range(len(check_rows))), 1 << 30, None)
    # warm-up and clipping matter here: without them this model sat near 5% accuracy for 2700 steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(ws.warmup_steps))
    rng = random.Random(cfg.model.tiny.seed)
    for step in range(1, ws.max_steps + 1):
        rows = rng.sample(sft_rows, ws.batch_size)
        samples = answer_samples(tokenizer, rows, encode_prompts(tokenizer, rows, cfg.data))
        (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 30, "token_batch")
        logp = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False).logp
        # mean token NLL: REINFORCE with advantage 1 on the gold answer is exactly supervised fine-tuning
        policy_loss(logp, logp.detach(), mb.adv, mb.coef, loss="reinforce").loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % ws.eval_every == 0:
            acc = greedy_exact_match(model, check)
            if acc >= ws.target_accuracy:
                print(f"warm start: greedy accuracy {acc:.3f} on {len(check_rows)} training problems after {step} steps")
                break
    save_atomically(model, tokenizer, out)
