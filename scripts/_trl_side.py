"""The TRL side of scripts/bench_vs_trl.py, run by the TRL environment's python (not the project's):

    python scripts/_trl_side.py SPEC.json OUT.json

TRL's GRPOTrainer with loss_type="cispo" on the spec's model folder and prompts (chat messages, in the order the
project's prompt stream takes them; shuffle_dataset=False keeps it), with the batch shape, budget and sampling of
the spec. TimedGRPOTrainer times each batch (one generation, then `updates` optimizer steps) by phase:

  generate  _generate_and_score_completions (generation, rewards, advantages) less the pi_old pass inside it
  pi_old    _get_per_token_logps_and_entropies called without gradient: old_per_token_logps of every completion
  update    the rest of the batch: the training forwards, backwards and optimizer steps
  step      the whole batch, on_step_begin of its first optimizer step to on_step_end of its last

OUT.json: {"versions": {...}, "batches": [{"step_s", "generate_s", "pi_old_s", "update_s", "sync_s",
"completions", "tokens"}, ...]}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from importlib.metadata import version

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def exact_answer(completions, answer, **_) -> list[float]:
    """1.0 where the completion's last \\boxed{} holds the gold answer, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(bool(found) and found[-1].strip() == gold) for found, gold in
            ((BOXED.findall(t), g) for t, g in zip(texts, answer))]


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that adds the generation phases of the batch in progress to `self.phases`."""

    phases: dict

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.phases["scored_s"] = time.perf_counter() - start
        self.phases["completions"] = int(out["completion_ids"].size(0))
        self.phases["tokens"] = int(out["completion_mask"].sum())
        return out

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if not torch.is_grad_enabled():  # the pi_old pass (beta=0: no reference model)
            self.phases["pi_old_s"] = self.phases.get("pi_old_s", 0.0) + time.perf_counter() - start
        return out


class BatchClock(TrainerCallback):
    """One row in `rows` per batch of `updates` optimizer steps, from the trainer's phases."""

    def __init__(self, trainer: TimedGRPOTrainer, updates: int, rows: list):
        self.trainer, self.updates, self.rows, self.start = trainer, updates, rows, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.updates == 0:
            self.trainer.phases, self.start = {}, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.updates == 0:
            p, step_s = self.trainer.phases, time.perf_counter() - self.start
            pi_old = p.get("pi_old_s", 0.0)
            self.rows.append({"step_s": step_s, "generate_s": p["scored_s"] - pi_old, "pi_old_s": pi_old,
                              "update_s": step_s - p["scored_s"], "sync_s": 0.0, "completions": p["completions"],
                              "tokens": p["tokens"]})
            print(f"batch {len(self.rows)}: {step_s:.2f} s, {p['completions'] / step_s:.1f} completions/s", flush=True)


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(open(spec_path).read())
    s = spec["shape"]
    config = GRPOConfig(
        output_dir=spec["work_dir"], loss_type="cispo", epsilon_high=spec["is_weight_max"], beta=0.0,
        num_generations=s["group_size"], per_device_train_batch_size=s["prompts"] * s["group_size"] // s["updates"],
        gradient_accumulation_steps=1, steps_per_generation=s["updates"], num_iterations=1,
        max_completion_length=spec["max_tokens"], generation_kwargs={"min_new_tokens": spec["min_tokens"]},
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=spec["lr"], lr_scheduler_type="constant",
        adam_beta2=0.95, max_grad_norm=1.0, max_steps=spec["steps"] * s["updates"], shuffle_dataset=False,
        # TRL's defaults differ from cispo-rl's here: bf16 autocast and gradient checkpointing are on by default
        bf16=False, gradient_checkpointing=False, use_cpu=True, seed=spec["seed"], report_to="none",
        save_strategy="no", logging_steps=s["updates"], disable_tqdm=True, dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": p["messages"], "answer": p["answer"]} for p in spec["prompts"]])
    trainer = TimedGRPOTrainer(model=spec["model_dir"], reward_funcs=exact_answer, args=config, train_dataset=dataset)
    first = trainer.processing_class.apply_chat_template(spec["prompts"][0]["messages"], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
    if first != spec["first_prompt_ids"]:
        raise SystemExit(f"TRL's chat template gives other prompt ids than the project's: {first} vs "
                         f"{spec['first_prompt_ids']}")
    rows: list[dict] = []
    trainer.add_callback(BatchClock(trainer, s["updates"], rows))
    trainer.train()
    versions = {name: version(name) for name in ("trl", "transformers", "torch", "accelerate", "datasets")}
    with open(out_path, "w") as f:
        json.dump({"versions": versions, "torch_threads": torch.get_num_threads(), "batches": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
