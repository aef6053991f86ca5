"""The LoRA adapter as it travels between the trainer and the engines: PEFT's format (tensor keys, the
adapter_config.json / adapter_model.safetensors folder) and PEFT's injection of LoRA layers into a Hugging Face
model. The trainer (cispo/model/lora.py), the HF engine, the vLLM engine and the adapter sink all go through here.

Written against **peft 0.22.0**, the project's only reach into PEFT. What it relies on:
- `peft.get_peft_model(model, peft.LoraConfig(...))` replaces each target `nn.Linear` of `model` in place by a
  `peft.tuners.lora.Linear` whose adapter weights are parameters named `<module>.lora_A.default.weight` and
  `<module>.lora_B.default.weight`; lora_B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
  The returned PeftModel's `.base_model.model` is `model` itself, still a transformers PreTrainedModel.
- PEFT's saved format: keys `base_model.model.<module>.lora_A.weight` (the adapter name dropped), the config as
  `adapter_config.json`, the tensors as `adapter_model.safetensors`. vLLM's LoRA loader and
  `peft.PeftModel.from_pretrained` both read this folder.

`spec` arguments are read duck-typed (rank, alpha, dropout, target_modules, rslora: cispo.config.LoraConfig), so
rollout/ does not import cispo/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

PEFT_WRITTEN_AGAINST = "0.22.0"
ADAPTER = "default"  # PEFT's adapter name: the trainer and the engines hold one adapter each
PREFIX = "base_model.model."  # PEFT's saved keys: the HF model's parameter names under this prefix
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PARTS = (".lora_A.", ".lora_B.")


def import_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"model.lora.rank > 0 needs PEFT (pip install 'cispo-rl[lora]', peft=={PEFT_WRITTEN_AGAINST}): "
                          f"{err}") from None
    return peft


def peft_config(spec, base_model: str | None = None):
    """peft.LoraConfig of `spec` (bias untouched, no modules saved whole: the adapters are all that trains)."""
    peft = import_peft()
    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=list(spec.target_modules), use_rslora=spec.rslora, bias="none",
                           base_model_name_or_path=base_model)


def scaling(spec) -> float:
    """The factor on B A x: alpha / rank, or alpha / sqrt(rank) with rslora."""
    return spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)


def inject(model: torch.nn.Module, spec, *, seed: int | None = None):
    """Add LoRA layers to `model` in place (its own parameters frozen) and return the PeftModel around it.
    `seed`: lora_A's initialisation is drawn from a generator seeded with it, without touching torch's global RNG,
    so every rank and every run with the same seed starts from the same adapter (None: the global RNG)."""
    peft = import_peft()
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if seed is None:
        return peft.get_peft_model(model, peft_config(spec, base))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_config(spec, base))


def is_adapter_param(name: str) -> bool:
    """Whether `name` (a parameter name of an injected model) is a LoRA weight."""
    return any(part in name for part in _PARTS)


def adapter_key(param_name: str) -> str:
    """The PEFT-format key of an injected model's adapter parameter:
    `model.layers.0.self_attn.q_proj.lora_A.default.weight` -> `base_model.model.model.layers.0.self_attn.q_proj
    .lora_A.weight`."""
    if not is_adapter_param(param_name):
        raise KeyError(f"{param_name!r} is not a LoRA parameter")
    return PREFIX + param_name.replace(f".{ADAPTER}.", ".")


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{PEFT key: parameter} of an injected model's adapter, in named_parameters order."""
    return {adapter_key(name): p for name, p in model.named_parameters() if is_adapter_param(name)}


def check_adapter_keys(named: Iterable[tuple[str, torch.Tensor]], where: str):
    """`named` unchanged, raising on the first tensor that is not an adapter tensor in PEFT format: a sink that
    takes the adapter must never be handed base weights (model.lora.rank set: the updater yields the adapter)."""
    for key, tensor in named:
        if not (key.startswith(PREFIX) and is_adapter_param(key)):
            raise ValueError(f"{where}: {key!r} is not a LoRA adapter tensor (PEFT key {PREFIX}...lora_A/B.weight); "
                             "with model.lora.rank set the updater yields the adapter only")
        yield key, tensor


@torch.no_grad()
def load_into(params: dict[str, torch.nn.Parameter], named: Iterable[tuple[str, torch.Tensor]], where: str) -> int:
    """Copy adapter tensors (PEFT keys) into `params` (adapter_parameters of a model); every adapter parameter
    must be given. Returns the bytes copied."""
    seen, size = set(), 0
    for key, tensor in named:
        if key not in params:
            raise KeyError(f"{where}: the adapter has no tensor {key!r} (check model.lora.target_modules)")
        params[key].copy_(tensor)
        seen.add(key)
        size += tensor.numel() * tensor.element_size()
    missing = params.keys() - seen
    if missing:
        raise ValueError(f"{where}: {len(missing)} adapter tensors were not sent, e.g. {sorted(missing)[:2]}")
    return size


def write_folder(out: Path, state: dict[str, torch.Tensor], spec, base_model: str | None = None) -> Path:
    """The adapter `state` (PEFT keys) as a PEFT folder at `out`: adapter_config.json + adapter_model.safetensors,
    what vLLM's LoRA loader and peft.PeftModel.from_pretrained read."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_config(spec, base_model).save_pretrained(str(out))  # adapter_config.json
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    return out


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder (PEFT keys)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS_FILE))
