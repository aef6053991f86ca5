"""Shared by the engine tests: a repetitive tiny model, the early-stop rule computed by hand, and a user's engine
registered from outside rollout/ (RecordingEngine: the HF engine behind a wrapper that records every call).

Importable without vllm (tests/test_hf_engine.py and tests/test_engines.py run where vllm is not installed).
"""

from __future__ import annotations

import torch

from rollout.engines import hf_engine
from rollout.trajectory import Trajectory

CALLS: list[tuple] = []  # RecordingEngine's log: (method, detail)


def loss_tokens(completion) -> int:
    """How many of a completion's tokens train: its one-turn trajectory's mask (an early stop's EOS is out)."""
    return sum(Trajectory.single_turn([], completion, 0).loss_mask)


def repetition_weights(originals: dict, scale: float) -> dict:
    """A model that repeats its last token: blocks write nothing (o_proj, down_proj = 0), so the final hidden state
    is norm(embedding of the current token), and lm_head = scale * embeddings scores that same token highest.
    On the tiny model, P(repeat the prompt's last token) is about 0.996 at scale 5 and 0.96 at scale 4; at scale 20
    the other tokens together get less than 1e-15 (sampling is then as deterministic as greedy decoding)."""
    w = dict(originals)
    for name, t in originals.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(t)
    w["lm_head.weight"] = scale * originals["model.embed_tokens.weight"]
    return w


def first_run_end(probs: list[float], k: int, p: float) -> int | None:
    """Index just after the first k consecutive tokens with probability > p (None if there is no such run)."""
    run = 0
    for i, q in enumerate(probs):
        run = run + 1 if q > p else 0
        if run == k:
            return i + 1
    return None


class RecordingEngine:
    """A user's engine with the builder signature: the HF engine, every call recorded in CALLS."""

    honours = frozenset({"max_model_len", "early_stop_k", "early_stop_p"})  # read by rollout.registry

    def __init__(self, model_dir: str, rollout_cfg, model_cfg, seed: int):
        CALLS.append(("build", seed))
        self.inner = hf_engine.build(model_dir, rollout_cfg, model_cfg, seed)

    def generate(self, prompts, sampling):
        CALLS.append(("generate", len(prompts)))
        return self.inner.generate(prompts, sampling)

    def load_weights(self, named_tensors):
        CALLS.append(("load_weights", None))
        self.inner.load_weights(named_tensors)

    def sleep(self):
        CALLS.append(("sleep", None))

    def wake(self):
        CALLS.append(("wake", None))

    def close(self):
        CALLS.append(("close", None))
        self.inner.close()


def not_an_engine(model_dir, rollout_cfg, model_cfg, seed):
    """A builder that returns something without the RolloutEngine methods."""
    return object()
