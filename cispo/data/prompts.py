"""Rows as prompts: chat messages, token ids, and the resumable prompt stream."""

from __future__ import annotations

import random

from cispo.config import ConfigError, DataConfig


def prompt_messages(row: dict, cfg: DataConfig) -> list[dict]:
    """The chat messages of a row: data.system_prompt (replacing the row's own system message), then the row's
    prompt with data.instruction appended to its last user message."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt + cfg.instruction}]
    else:
        messages = [dict(m) for m in prompt]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] += cfg.instruction
    if cfg.system_prompt:
        messages = [{"role": "system", "content": cfg.system_prompt}] + [m for m in messages if m["role"] != "system"]
    return messages


def encode_prompts(tokenizer, rows: list[dict], cfg: DataConfig) -> list[list[int]]:
    """Chat-template token ids of each row's prompt_messages, ending with the assistant turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; prompts "
                          "are sent as chat messages: use a tokenizer with one (e.g. the instruct model's)")
    return [
        tokenizer.apply_chat_template(prompt_messages(row, cfg), add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for row in rows
    ]


# ---- the stream ------------------------------------------------------------------------------------------------


class PromptStream:
    """Endless stream of rows, reshuffled each epoch with a seed derived from (seed, epoch), skipping retired rows
    (ScaleRL no-positive-resampling, cispo/sampling/curriculum.py).

    Its state is two integers and the retired ids, so a resumed run continues with exactly the prompts it would
    have seen."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self.retired: set[str] = set()
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        if n > 0 and self.retired and self.active() == 0:
            raise RuntimeError(f"all {len(self.rows)} training prompts are retired (curriculum.retire_pass_rate): "
                               "nothing is left to learn from")
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            row = self.rows[self._order[self.pos]]
            self.pos += 1
            if row["id"] not in self.retired:
                out.append(row)
        return out

    def retire(self, ids) -> None:
        """Never hand out these rows again."""
        self.retired.update(ids)

    def active(self) -> int:
        """Rows not retired."""
        return sum(row["id"] not in self.retired for row in self.rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "retired": sorted(self.retired)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.retired = state["epoch"], state["pos"], set(state["retired"])
        self._order = self._shuffle()
