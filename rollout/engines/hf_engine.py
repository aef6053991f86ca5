"""Rollouts with transformers `generate()`: for machines without vLLM and architectures vLLM cannot load
(MiniMax's lightning attention in vLLM 0.32).

The engine owns its own copy of the weights, like vLLM does, so the trainer syncs it the same way.

Reach-in (written against transformers 5.19): MiniMaxCache takes the attention-mask size from layer 0, a
lightning layer whose key/value slot stays empty, so in every decode step the softmax layers get a 1-wide mask
and attend to the left padding of shorter prompts (on the tiny model: sampling logprobs off by up to ~0.01 from
a forward of the same tokens). `generation_cache` returns a cache that sizes the mask from a softmax layer. Its
`batch_select_indices` (how `shared_prefill` gives each group's rows its prompt's cache) fills MiniMaxCache's
linear-state list out to every layer first: transformers' own indexes past its end when softmax layers come last.

M1's repetition early stop (rollout.engines.early_stop) runs as a transformers logits processor (`HFRepetitionEarlyStop`)
with the vLLM engine's semantics: same trigger, forced EOS with log-probability 0, finish_reason "early_stop".
Honoured knobs: rollout.max_model_len, early_stop_k, early_stop_p (rollout/__init__.py).

LoRA (model.lora.rank > 0): the engine's copy gets the same PEFT layers as the policy (rollout.engines.lora) and
serves the trainer's adapter through rollout.engines.adapter_sink.AdapterSink: `write_adapter` keeps the tensors of a
version, `serve_adapter` copies them into the PEFT layers; the base weights stay those of the model folder.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessor
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from rollout.base import Completion, Rollout, SamplingParams
from rollout.engines.checks import check_request
from rollout.engines.early_stop import EarlyStopRule, force_eos, top_token
from rollout.engines import lora as adapters


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

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # MiniMaxCache's own walks every layer's linear_cache slot, which ends at the last linear layer
        self.linear_cache += [[]] * (len(self.layers) - len(self.linear_cache))
        super().batch_select_indices(indices)


def generation_cache(model) -> DynamicCache:
    """A fresh cache for one generate call: MaskedMiniMaxCache for a MiniMax model with softmax layers, else
    transformers' DynamicCache."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "minimax":
        return DynamicCache()
    full = [i for i, kind in enumerate(config.layer_types or []) if kind != "linear_attention"]
    return MaskedMiniMaxCache(full[0]) if full else MiniMaxCache()


def shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> DynamicCache:
    """The cache of every unique prompt but its last token, prefilled once and gathered to one entry per row.

    input_ids, attention_mask [U, W] the unique prompts, left-padded; rows [B] the unique prompt of each sequence
    (a group's n samples share one). `generate(input_ids[rows], attention_mask[rows], past_key_values=cache)`
    then runs only each row's last prompt token and the decode: a group's prompt is prefilled once, not n times
    (what vLLM's prefix cache does), which on the tiny models halves generate."""
    cache = generation_cache(model)
    if input_ids.shape[1] > 1:
        mask = attention_mask[:, :-1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        model(input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache,
              use_cache=True)
        cache.batch_select_indices(rows)
    return cache


class HFRepetitionEarlyStop(LogitsProcessor):
    """`rule` (rollout.engines.early_stop) for one `generate()` call on a batch left-padded to `prompt_width` columns.

    Passed as `generate(logits_processor=[...])`, it runs before transformers' temperature and top-p warpers, so
    it sees the raw logits. Each step stores every row's argmax and its probability; at the next step the token
    sampled from that distribution is `input_ids[:, -1]`, a hit when it is that argmax and the probability was
    > p. A row with k hits in a row gets only its EOS allowed; `forced_at` keeps the output position of the
    first EOS forced in each row (-1: none)."""

    def __init__(self, rule: EarlyStopRule, prompt_width: int, rows: int, device: torch.device):
        self.rule = rule
        self.width = prompt_width
        self.run = torch.zeros(rows, dtype=torch.long, device=device)  # consecutive hits so far
        self.forced_at = torch.full((rows,), -1, dtype=torch.long, device=device)
        self._top: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's (argmax, its probability)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._top is not None:
            top_tok, top_p = self._top
            hit = (input_ids[:, -1] == top_tok) & (top_p > self.rule.p)
            self.run = torch.where(hit, self.run + 1, 0)
        self._top = top_token(scores)
        force = self.run >= self.rule.k
        if force.any():
            step = input_ids.shape[1] - self.width
            self.forced_at = torch.where(force & (self.forced_at < 0), step, self.forced_at)
            force_eos(scores, force.nonzero().squeeze(1), self.rule.eos)
        return scores

    def forced(self, row: int, eos_position: int) -> bool:
        """Whether the EOS at output position `eos_position` of `row` is the one this processor forced."""
        return int(self.forced_at[row]) == eos_position


class HFEngine:
    """rollout.base.RolloutEngine on transformers `generate()`.

    `early_stop`: M1's repetition early stop (None = off). `max_model_len`: prompt + max_tokens limit checked
    before generating (None = unchecked). `batch_size`: sequences per generate() call (bounds the KV cache)."""

    def __init__(self, model, tokenizer, *, fp32_lm_head: bool = False, batch_size: int = 256,
                 early_stop: EarlyStopRule | None = None, max_model_len: int | None = None, lora=None):
        """`lora`: serve a LoRA adapter of this spec (cispo.config.LoraConfig; None or rank 0: full weights)."""
        if lora is not None and lora.rank:
            adapters.inject(model, lora)  # lora_B = 0: the base's outputs until the first adapter is served
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.early_stop = early_stop
        self.max_model_len = max_model_len
        self._adapter = adapters.adapter_parameters(model) if lora is not None and lora.rank else None
        self._staged: tuple[int, dict[str, torch.Tensor]] | None = None
        if fp32_lm_head:
            upcast_lm_head(self.model)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", fp32_lm_head: bool = False,
                        trust_remote_code: bool = False, early_stop_k: int = 0, early_stop_p: float = 0.99,
                        max_model_len: int | None = None, lora=None) -> "HFEngine":
        """Tokenizer and early-stop rule first: a rule that cannot run fails before the weights load."""
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        early_stop = EarlyStopRule.from_settings(early_stop_k, early_stop_p, tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, fp32_lm_head=fp32_lm_head, early_stop=early_stop, max_model_len=max_model_len,
                   lora=lora)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollout:
        if self.max_model_len is not None:
            check_request(prompts, sampling, self.max_model_len)
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
        prompts = dict(rows)  # a group's rows share their prompt index
        unique = list(prompts)
        width = max(len(p) for p in prompts.values())
        # left padding: every row's next token lands in the same column
        input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in unique])
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in unique])
        position = {i: k for k, i in enumerate(unique)}
        index = torch.tensor([position[i] for i, _ in rows])
        cache = shared_prefill(self.model, input_ids, attention_mask, index)
        input_ids, attention_mask = input_ids[index], attention_mask[index]
        greedy = sampling.temperature == 0
        early_stop = None
        if self.early_stop:
            early_stop = HFRepetitionEarlyStop(self.early_stop, width, len(rows), self.model.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens or None,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # else transformers applies its default top-k=50: not the distribution we train on
            pad_token_id=pad,
            eos_token_id=eos,
            past_key_values=cache,
            logits_processor=[early_stop] if early_stop else None,
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
            reason = "length" if not stop else "early_stop" if early_stop and early_stop.forced(b, stop - 1) else "stop"
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    token_ids=ids,
                    logprobs=token_logp[b, : len(ids)].tolist(),  # a forced EOS: 0.0, as in the vLLM engine
                    finish_reason=reason,
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

    # ------------------------------------------------------------------------------------------------ LoRA
    def write_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Keep the adapter of policy `version` (PEFT keys); `serve_adapter` switches to it."""
        if self._adapter is None:
            raise ValueError("write_adapter: this engine was built without LoRA (model.lora.rank=0)")
        self._staged = (version, {key: t.detach().to("cpu", copy=True) for key, t in named_tensors})

    def serve_adapter(self, version: int) -> None:
        if self._staged is None or self._staged[0] != version:
            raise ValueError(f"serve_adapter(v{version}): no adapter of that version was written")
        adapters.load_into(self._adapter, self._staged[1].items(), "HF engine")
        self._staged = None

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 under the weights (and adapter) served, at temperature 1."""
        x = torch.tensor([ids], device=self.model.device)
        logp = self.model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
        return logp.gather(-1, x[0, 1:, None]).squeeze(-1).tolist()

    def sleep(self) -> None:
        """Nothing to free: the HF engine has no KV cache between calls."""

    def wake(self) -> None:
        """Nothing to reallocate (see sleep)."""

    def close(self) -> None:
        self.model = None


def build(model_dir: str, rollout_cfg, model_cfg, seed: int = 0) -> HFEngine:
    """The builder of rollout.engine=hf (rollout/__init__.py). `seed` is not used: unseeded requests draw from
    torch's global generator, which the trainer seeds."""
    return HFEngine.from_pretrained(
        model_dir, dtype=model_cfg.dtype, fp32_lm_head=model_cfg.fp32_lm_head,
        trust_remote_code=model_cfg.trust_remote_code, early_stop_k=rollout_cfg.early_stop_k,
        early_stop_p=rollout_cfg.early_stop_p, max_model_len=rollout_cfg.max_model_len,
        lora=getattr(model_cfg, "lora", None),
    )
