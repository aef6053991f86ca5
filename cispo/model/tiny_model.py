"""A tiny causal LM and tokenizer, built locally and saved in Hugging Face format (transformers and vLLM load it).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the embedded task's text, with each
digit its own token (numbers then have one spelling, which is what makes arithmetic learnable at this size),
and a ChatML chat template. The model is a random Qwen2 / Llama / MiniMax config. Everything is determined by
the config and the seed, so a build is cached under a key derived from both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cispo.data.arithmetic import arithmetic_rows
from cispo.config import ConfigError, TinyModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def config_key(obj) -> str:
    """A short stable hash of a dataclass (or dict) for cache directory names."""
    data = asdict(obj) if not isinstance(obj, dict) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    corpus = [f"{r['prompt']} Put the final answer in \\boxed{{}}. \\boxed{{{r['answer']}}}" for r in arithmetic_rows(2, 1, 0)[0]]
    corpus += ["user", "assistant", "system", "The answer is", "Let me think step by step.", "</think>", "<think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, chat_template=CHAT_TEMPLATE
    )


def build_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import AutoConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if cfg.arch == "minimax":
        from cispo.model.minimax import tiny_minimax_config

        config = tiny_minimax_config(cfg, common)
    else:
        config = AutoConfig.for_model(cfg.arch, **common)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"model.tiny.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer ({len(tokenizer)})")
    return model


def check_cache_dir(cache_dir: str | os.PathLike) -> None:
    """Fail in one line, before any work, when the cache folder cannot be created or written."""
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"model.cache_dir={str(cache_dir)!r} is not writable ({err.strerror}): point "
                          "model.cache_dir at a folder you can write") from None


def make_tiny_model(cfg: TinyModelConfig, cache_dir: str | os.PathLike) -> Path:
    """Build (once) the tiny model and tokenizer; returns the cached HF directory."""
    out = Path(cache_dir).expanduser() / f"tiny-{cfg.arch}-{config_key(cfg)}"
    if (out / "config.json").exists():
        return out
    print(f"building the tiny model ({cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_layers} layers) in {out}",
          flush=True)
    tokenizer = build_tokenizer(cfg.vocab_size)
    save_atomically(build_model(cfg, tokenizer), tokenizer, out)
    return out


def save_atomically(model, tokenizer, out: Path, extra: dict[str, str] | None = None) -> None:
    """Save (and the `extra` text files, name -> content) into a private temporary directory, then rename: a
    crash mid-write never leaves a half-written cache entry, and two runs building the same entry at once both
    end with a complete one."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    try:
        tmp.rename(out)
    except OSError:  # another run finished the same entry first
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
