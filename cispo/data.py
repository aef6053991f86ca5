"""Prompts: loading the train / held-out rows, turning them into token ids, and a resumable prompt stream."""

from __future__ import annotations

import random

from cispo.arithmetic import arithmetic_rows
from cispo.config import ConfigError, DataConfig


def load_splits(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows). Each row has at least `prompt`, `answer`, `source`, `id`."""
    if cfg.source == "arithmetic":
        return arithmetic_rows(cfg.digits, cfg.eval_size, cfg.seed)
    raise ConfigError(f"data.source: unknown source {cfg.source!r}; the built-in task is 'arithmetic'")


def encode_prompts(tokenizer, rows: list[dict], cfg: DataConfig) -> list[list[int]]:
    """Chat-template token ids of each row's prompt (+ cfg.instruction), ending with the assistant turn."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [
        tokenizer.apply_chat_template(
            system + [{"role": "user", "content": row["prompt"] + cfg.instruction}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for row in rows
    ]


class PromptStream:
    """Endless stream of rows, reshuffled each epoch with a seed derived from (seed, epoch).

    Its state is two integers, so a resumed run continues with exactly the prompts it would have seen."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()
