"""Rollouts with transformers `generate()`: for machines without vLLM and architectures vLLM cannot load
(MiniMax's lightning attention in vLLM 0.32).

The engine owns its own copy of the weights, like vLLM does, so the trainer syncs it the same way.

Reach-in (written against transformers 5.19): MiniMaxCache takes the attention-mask size from layer 0, a
lightning layer whose key/value slot stays empty, so in every decode step the softmax layers get a 1-wide mask
and attend to the left padding of shorter prompts (on the tiny model: sampling logprobs off by up to ~0.01 from
a forward of the same tokens). `generation_cache` returns a cache that sizes the mask from a softmax layer.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from rollout.base import Completion, Rollout, SamplingParams


def upcast_lm_head(model) -> None:
    """Run the LM head in fp32 (M1 §3.2): fp32 weight, and its input cast up on the way in."""
    head = model.get_output_embeddings()
    head.float()
    head.register_forward_pre_hook(lambda _m, args: (args[0].float(),) + args[1:])


class MaskedMiniMaxCache(MiniMaxCache):
    """MiniMaxCache whose attention-mask sizes come from a softmax-attention layer, so that decode steps of a
    left-padded batch mask the padding (see the module docstring)."""

    def __init__(self, full_layer: int):
        super().__init__()
        self.full_layer = full_layer

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self.full_layer if layer_idx == 0 else layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # also the query offset of the causal mask
        return super().get_seq_length(self.full_layer if layer_idx == 0 else layer_idx)


def generation_cache(model) -> MiniMaxCache | None:
    """A fresh cache to pass as `generate(past_key_values=...)`: MaskedMiniMaxCache for a MiniMax model with
    softmax layers, None (transformers' default) for every other model. One per generate call."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "minimax":
        return None
    full = [i for i, kind in enumerate(config.layer_types or []) if kind != "linear_attention"]
    return MaskedMiniMaxCache(full[0]) if full else None


class HFEngine:
    def __init__(self, model, tokenizer, *, fp32_lm_head: bool = False, batch_size: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per generate() call: bounds the KV cache
        if fp32_lm_head:
            upcast_lm_head(self.model)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", fp32_lm_head: bool = False,
                        trust_remote_code: bool = False) -> "HFEngine":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, fp32_lm_head=fp32_lm_head)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        start = time.perf_counter()
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        rng = torch.random.fork_rng() if sampling.seed is not None else contextlib.nullcontext()
        completions = []
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for lo in range(0, len(rows), self.batch_size):
                completions += self._generate_batch(rows[lo : lo + self.batch_size], sampling)
        return Rollout(completions, time.perf_counter() - start)

    def _generate_batch(self, rows: list[tuple[int, list[int]]], sampling: SamplingParams) -> list[Completion]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for _, p in rows)
        # left padding: every row's next token lands in the same column
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for _, p in rows])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in rows])
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # else transformers applies its default top-k=50: not the distribution we train on
            pad_token_id=pad,
            eos_token_id=eos,
            past_key_values=generation_cache(self.model),  # None except for MiniMax
            return_dict_in_generate=True,
            output_scores=True,
        )
        new_tokens = out.sequences[:, width:]  # [B, steps]
        # processed scores = the distribution actually sampled from (after temperature / top-p)
        logprobs = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1)  # [B, steps, V]
        token_logp = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)  # [B, steps]
        completions = []
        for b, (prompt_index, _) in enumerate(rows):
            ids = new_tokens[b].tolist()
            stop = ids.index(eos) + 1 if eos in ids else None
            ids = ids[:stop] if stop else ids
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    token_ids=ids,
                    logprobs=token_logp[b, : len(ids)].tolist(),
                    finish_reason="stop" if stop else "length",
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                )
            )
        return completions

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"load_weights: the rollout model has no parameter {name!r}")
            params[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the HF engine has no KV cache between calls."""

    def wake(self) -> None:
        """Nothing to reallocate (see sleep)."""

    def close(self) -> None:
        self.model = None
