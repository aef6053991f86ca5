"""The starting policy: a user's model as is, or the tiny model after a short supervised warm start.

RL needs a non-zero success rate to learn from, and a random tiny model never writes `\\boxed{82}`. The warm
start teaches the answer format and some arithmetic on the training split, and stops at the first check whose
greedy accuracy (on training problems the SFT batches never use) reaches `target_accuracy`. The check is one
teacher-forced forward, exact because greedy decoding reproduces the gold answer token for token if and only if
every gold token is the argmax given the gold prefix.

The schedule (lr 1e-3, 128 problems a step) was chosen for its spread, not its best case: accuracy creeps up and
then jumps once the model finds the carry, and with lr 3e-3 / 64 problems when that jump came depended on the
machine (the floating-point reduction order), from step ~800 to never within 3000. With the defaults the target
is reached after 210-250 steps for model seeds 0-4 at 1 and 2 threads (README, "The default run"); `max_steps`
is 4x that. A warm start that misses its target says so, then continues or stops (`on_miss`).

With env.name set (multi-turn tool use) the gold is a tool trace instead (cispo.start.tool_traces: a calculator call,
its result, the boxed answer; loss on the model's tokens only), and every second training row is a direct answer
to the plain prompt, so that the model answers with and without the tool; the check is on traces (the greedy
accuracy with the tool), and the env group is part of the cache key.

The result is cached under a key of everything that determines it, and written atomically; `warm_start.json`
beside the weights records how it ended.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.config import Config, ConfigError
from cispo.data.prompts import encode_prompts
from cispo.train.optim import warmup_lambda
from cispo.model.policy import resolve_model_path
from cispo.model.tiny_model import config_key, make_tiny_model, save_atomically

RESULT_FILE = "warm_start.json"


def prepare_model(cfg: Config, train_rows: list[dict]) -> str:
    """The HF directory (or hub name) the run starts from."""
    if cfg.model.path != "tiny":
        return resolve_model_path(cfg.model.path, cfg.model.cache_dir, dtype=cfg.model.dtype)
    ws = cfg.model.warm_start
    if ws.enabled:
        check_row_count(cfg, len(train_rows))
    base = make_tiny_model(cfg.model.tiny, cfg.model.cache_dir)
    if not ws.enabled:
        return str(base)
    key = config_key({"tiny": asdict(cfg.model.tiny), "warm_start": asdict(ws), "data": asdict(cfg.data),
                      "max_tokens": cfg.rollout.max_tokens} | ({"env": asdict(cfg.env)} if cfg.env.name else {}))
    out = base.with_name(f"{base.name}-warm-{key}")
    if (out / "config.json").exists():
        result = json.loads((out / RESULT_FILE).read_text()) if (out / RESULT_FILE).exists() else {}
        print(f"warm start: cached in {out} (greedy accuracy {result.get('accuracy', float('nan')):.3f} after "
              f"{result.get('steps', '?')} steps)", flush=True)
    else:
        warm_start(base, out, cfg, train_rows)
    return str(out)


def check_row_count(cfg: Config, rows: int) -> None:
    """The warm start checks on the first `eval_problems` training rows and samples its batches from the others,
    without replacement: fewer rows than both is a ConfigError naming the keys, before anything is built."""
    ws = cfg.model.warm_start
    need = ws.eval_problems + ws.batch_size
    if rows < need:
        raise ConfigError(
            f"model.warm_start.eval_problems={ws.eval_problems} (the check) and model.warm_start.batch_size="
            f"{ws.batch_size} (the batches, from the other rows) need {need} training rows, but "
            f"data.source={cfg.data.source!r} has {rows}: lower model.warm_start.eval_problems or "
            "model.warm_start.batch_size, train on more rows, or set model.warm_start.enabled=false")


def answer_sequences(tokenizer, rows: list[dict], cfg: Config) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each row: the prompt followed by its gold completion `\\boxed{answer}<eos>`, labels -100
    on the prompt."""
    prompts = encode_prompts(tokenizer, rows, cfg.data)
    answers = [tokenizer.encode(f"\\boxed{{{r['answer']}}}", add_special_tokens=False) + [tokenizer.eos_token_id]
               for r in rows]
    return [(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers)]


def padded(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) pairs right-padded: input_ids and attention_mask [B, T], and labels [B, T] (-100 on padding),
    as transformers' loss takes them."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, :len(seq)] = torch.tensor(lab)
        mask[i, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_batch(tokenizer, rows: list[dict], cfg: Config) -> dict[str, torch.Tensor]:
    """The rows' prompts and gold completions, padded (answer_sequences, padded)."""
    return padded(answer_sequences(tokenizer, rows, cfg), tokenizer.pad_token_id)


def gold_batch(tokenizer, rows: list[dict], cfg: Config, mixed: bool) -> dict[str, torch.Tensor]:
    """The warm start's batch: gold answers, or with env.name set gold tool traces (every second row a direct
    answer instead when `mixed`)."""
    if not cfg.env.name:
        return answer_batch(tokenizer, rows, cfg)
    from cispo.start.tool_traces import tool_sequences

    direct = rows[1::2] if mixed else []
    traced = rows[0::2] if mixed else rows
    return padded(tool_sequences(tokenizer, traced, cfg) + answer_sequences(tokenizer, direct, cfg),
                  tokenizer.pad_token_id)


@torch.no_grad()
def greedy_exact_match(model, batch: dict[str, torch.Tensor]) -> float:
    """Share of the batch's rows whose every gold completion token is the model's argmax."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    hit = (logits.argmax(-1) == target) | (target == -100)
    return hit.all(-1).float().mean().item()


def warm_start(base: Path, out: Path, cfg: Config, train_rows: list[dict]) -> None:
    ws = cfg.model.warm_start
    torch.manual_seed(cfg.model.tiny.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    check_rows, sft_rows = train_rows[: ws.eval_problems], train_rows[ws.eval_problems :]
    check = gold_batch(tokenizer, check_rows, cfg, mixed=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.98))
    # warm-up and clipping matter here: without them this model sat near 5% accuracy for 2700 steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(ws.warmup_steps))
    rng = random.Random(cfg.model.tiny.seed)
    accuracy, start = 0.0, time.perf_counter()
    said = start  # without the bar (logger.progress=false), a line every 10 s instead
    bar = tqdm(total=ws.max_steps, desc=f"warm start (target {ws.target_accuracy:.2f})", dynamic_ncols=True,
               file=sys.stdout, disable=not cfg.logger.progress, mininterval=2.0)
    for step in range(1, ws.max_steps + 1):
        # mean token NLL of the gold answers: supervised fine-tuning (REINFORCE with advantage 1)
        model(**gold_batch(tokenizer, rng.sample(sft_rows, ws.batch_size), cfg, mixed=True)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step % ws.eval_every == 0 or step == ws.max_steps:
            accuracy = greedy_exact_match(model, check)
            bar.set_postfix(accuracy=f"{accuracy:.3f}")
            if accuracy >= ws.target_accuracy:
                break
        if bar.disable and time.perf_counter() - said >= 10:
            said = time.perf_counter()
            print(f"warm start: step {step}/{ws.max_steps} ({said - start:.0f} s), greedy accuracy {accuracy:.3f} at "
                  f"the last check", flush=True)
    bar.close()
    seconds = time.perf_counter() - start
    reached = accuracy >= ws.target_accuracy
    print(f"warm start: greedy accuracy {accuracy:.3f} on {len(check_rows)} training problems after {step} steps "
          f"({seconds:.0f} s)", flush=True)
    if not reached:
        message = (f"the warm start stopped at model.warm_start.max_steps={ws.max_steps} with greedy accuracy "
                   f"{accuracy:.3f}, below model.warm_start.target_accuracy={ws.target_accuracy}. RL learns only "
                   f"from groups with a correct answer, so it will start slowly or not at all. Raise "
                   f"model.warm_start.max_steps, lower the target, or try model.warm_start.lr")
        if ws.on_miss == "error":
            raise ConfigError(message + "; nothing was cached")
        print(f"warning: {message}. Continuing (model.warm_start.on_miss=continue).", file=sys.stderr, flush=True)
    save_atomically(model, tokenizer, out, extra={RESULT_FILE: json.dumps(
        {"steps": step, "accuracy": accuracy, "seconds": round(seconds, 1), "reached_target": reached})})
