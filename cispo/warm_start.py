"""The starting policy: a user's model as is, or the tiny model after a short supervised warm start.

RL needs a non-zero success rate to learn from, and a random tiny model never writes `\\boxed{82}`. The warm
start teaches the answer format and a little arithmetic on the training split, and stops at the first check
whose greedy accuracy (on training problems the SFT batches never use) reaches `target_accuracy`. The result
is cached under a key of everything that determines it, and written atomically.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.batch import Sample, micro_batches
from cispo.config import Config
from cispo.data import encode_prompts
from cispo.evaluation import greedy_accuracy
from cispo.loss import policy_loss
from cispo.optim import warmup_lambda
from cispo.policy import check_model_path, micro_batch_logprobs
from cispo.tiny_model import config_key, make_tiny_model
from rollout.hf_engine import HFEngine


def prepare_model(cfg: Config, train_rows: list[dict], scorer) -> str:
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
        warm_start(base, out, cfg, train_rows, scorer)
    return str(out)


def warm_start(base: Path, out: Path, cfg: Config, train_rows: list[dict], scorer) -> None:
    ws = cfg.model.warm_start
    torch.manual_seed(cfg.model.tiny.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    check_rows, sft_rows = train_rows[: ws.eval_problems], train_rows[ws.eval_problems :]
    check_prompts = encode_prompts(tokenizer, check_rows, cfg.data)
    engine = HFEngine(model, tokenizer)
    # warm-up and clipping matter here: without them this model sat near 5% accuracy for 2700 steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(ws.warmup_steps))
    rng = random.Random(cfg.model.tiny.seed)
    for step in range(1, ws.max_steps + 1):
        model.train()
        rows = rng.sample(sft_rows, ws.batch_size)
        prompts = encode_prompts(tokenizer, rows, cfg.data)
        samples = []
        for k, (row, prompt) in enumerate(zip(rows, prompts)):
            answer = tokenizer.encode(f"\\boxed{{{row['answer']}}}", add_special_tokens=False) + [tokenizer.eos_token_id]
            samples.append(Sample(prompt, answer, len(answer), torch.zeros(len(answer)), adv=1.0, group=k))
        (mb,) = micro_batches(samples, list(range(len(samples))), 1 << 30, "token_batch")
        logp = micro_batch_logprobs(model, mb, temperature=1.0, fp32_head=False).logp
        # mean token NLL: REINFORCE with advantage 1 on the gold answer is exactly supervised fine-tuning
        policy_loss(logp, logp.detach(), mb.adv, mb.coef, loss="reinforce").loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % ws.eval_every == 0:
            acc = greedy_accuracy(engine, check_prompts, check_rows, scorer, cfg.rollout.max_tokens)["eval/accuracy"]
            print(f"warm start step {step}: accuracy {acc:.3f} on {len(check_rows)} training problems", flush=True)
            if acc >= ws.target_accuracy:
                break
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
