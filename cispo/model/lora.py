"""LoRA on the trainer's side (model.lora.*, docs/guides/lora.md): the policy with adapters, what the updaters,
checkpoints and exports do with them, and the checks that stop a run the engine cannot serve.

With model.lora.rank > 0 the policy is the same Hugging Face model, with PEFT's LoRA layers injected into
model.lora.target_modules (rollout/engines/lora.py, the PEFT reach-in): everything that runs the policy (the packed
forward, the loss, the probe) runs it unchanged. Only the adapter tensors require a gradient, so the optimizer (torch
AdamW or DeepSpeed ZeRO 0-3) holds their state only. The updater's `named_weights()` then yields the adapter alone,
in PEFT's key format, and that is what every weight sync sends (rollout/engines/adapter_sink.py) and what
checkpoints and exports hold: the base weights never change, and are read again from the model folder.

The adapter's initial lora_A is drawn from a generator seeded with trainer.seed (lora_B starts at zero), so every
rank of a data-parallel run and every resumed run build the same adapter.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cispo.config import ConfigError
from rollout.engines import lora as fmt

ADAPTER_DIR = "adapter"  # in a checkpoint's policy/ folder: the adapter, PEFT format
MERGED_SUFFIX = "-merged"  # model.lora.export_merged: the merged model beside the adapter folder
# modules vLLM 0.32 serves LoRA on for the dense Llama / Qwen2 / Mistral families (its packed qkv_proj and
# gate_up_proj take their parts' adapters); embeddings and the LM head are not served with LoRA there
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                          "gate_up_proj"})
VLLM_MAX_RANK = 512  # vLLM 0.32's largest max_lora_rank
# the engines that serve an adapter: in process (AdapterSink), and the server fleet (ServerAdapterSink)
LORA_ENGINES = ("hf", "vllm", "vllm-server")


@dataclass
class LoraPolicy:
    """The adapter of a policy: the PeftModel around it (its config and save format), and the adapter's
    parameters by PEFT key. `base_dir`: the model folder the base weights come from."""

    peft: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    spec: object  # cispo.config.LoraConfig
    base_dir: str

    def named_tensors(self):
        for key, p in self.params.items():
            yield key, p.detach()

    def state(self) -> dict[str, torch.Tensor]:
        return {key: p.detach().to("cpu", copy=True) for key, p in self.params.items()}

    def load(self, state: dict[str, torch.Tensor], where: str) -> None:
        fmt.load_into(self.params, state.items(), where)

    def write(self, out: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The adapter (or `state`, the same keys) as a PEFT folder at `out`."""
        return fmt.write_folder(out, self.state() if state is None else state, self.spec, self.base_dir)


def apply_lora(policy, model_cfg, model_dir: str, seed: int) -> LoraPolicy:
    """Inject model.lora's adapters into `policy` (in place; its own parameters frozen). The policy stays the
    Hugging Face model; the returned LoraPolicy holds the PeftModel and the adapter parameters."""
    spec = model_cfg.lora
    try:
        peft = fmt.inject(policy, spec, seed=seed)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora.target_modules={list(spec.target_modules)}: {err}") from None
    if model_cfg.gradient_checkpointing:
        policy.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still need an input grad
    params = fmt.adapter_parameters(policy)
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    if trainable != {id(p) for p in params.values()}:
        raise RuntimeError("PEFT left parameters other than the adapter trainable")
    return LoraPolicy(peft, params, spec, str(model_dir))


# --------------------------------------------------------------------------------------------------------------
# Checks before any weights load
# --------------------------------------------------------------------------------------------------------------


def check_lora(cfg, kind: str, model_dir: str) -> None:
    """ConfigError naming the key when model.lora (rank > 0) cannot run with engine `kind` (what rollout.engine
    resolved to) on the model in `model_dir`. Reads the model's config only; call it before the policy loads."""
    spec = cfg.model.lora
    if not spec.rank:
        return
    if kind not in LORA_ENGINES:
        via = f" (rollout.engine={cfg.rollout.engine} resolved to {kind})" if cfg.rollout.engine != kind else ""
        raise ConfigError(f"model.lora.rank={spec.rank} needs an engine that serves LoRA adapters "
                          f"({', '.join(LORA_ENGINES)}); the {kind} engine{via} does not. Set rollout.engine "
                          "to hf or vllm, or model.lora.rank=0 for full fine-tuning")
    if cfg.rollout.mode == "server" and cfg.rollout.server.weight_transport != "file":
        raise ConfigError(f"model.lora.rank={spec.rank} on rollout servers sends each version's adapter as a file "
                          "(vLLM's runtime LoRA route): set rollout.server.weight_transport=file")
    if kind in ("vllm", "vllm-server"):
        outside = sorted(set(spec.target_modules) - VLLM_TARGETS)
        if outside:
            raise ConfigError(f"model.lora.target_modules has {outside}, which vLLM does not serve with LoRA (it "
                              f"adapts {sorted(VLLM_TARGETS)}): drop them, or set rollout.engine=hf")
        if spec.rank > VLLM_MAX_RANK:
            raise ConfigError(f"model.lora.rank={spec.rank} is above vLLM's largest LoRA rank ({VLLM_MAX_RANK}): "
                              "lower it, or set rollout.engine=hf")
    missing = _absent_targets(model_dir, spec.target_modules, cfg.model.trust_remote_code)
    if missing:
        raise ConfigError(f"model.lora.target_modules: the model in {model_dir} has no linear module named "
                          f"{missing}: name modules it has (e.g. q_proj, v_proj for Llama/Qwen2)")


def _absent_targets(model_dir: str, targets, trust_remote_code: bool) -> list[str]:
    """Target names no linear module of the model ends with (the model built on the meta device: no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(set(targets) - names)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and exports
# --------------------------------------------------------------------------------------------------------------


def save_adapter(lora: LoraPolicy, policy_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint's adapter: policy_dir/adapter, a PEFT folder."""
    return lora.write(Path(policy_dir) / ADAPTER_DIR, state)


def load_adapter(lora: LoraPolicy, policy_dir: Path) -> None:
    folder = Path(policy_dir) / ADAPTER_DIR
    if not (folder / fmt.WEIGHTS_FILE).exists():
        raise ConfigError(f"{policy_dir} holds no LoRA adapter ({ADAPTER_DIR}/{fmt.WEIGHTS_FILE}): the checkpoint "
                          "was written without model.lora.rank; resume it with the settings it was written with")
    lora.load(fmt.read_folder(folder), f"checkpoint {policy_dir}")


def is_adapter_checkpoint(policy_dir: Path) -> bool:
    return (Path(policy_dir) / ADAPTER_DIR / fmt.WEIGHTS_FILE).exists()


def export_adapter(state: dict[str, torch.Tensor], lora: LoraPolicy, out: Path, tokenizer, *, merged: bool) -> Path:
    """The adapter folder at `out` (PEFT format, with the tokenizer), written to out.tmp and renamed; with
    `merged`, also the base with the adapter merged in, in HF format, at <out>-merged. Returns `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.write(tmp, state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if merged:
        merge_adapter(out, out.with_name(out.name + MERGED_SUFFIX), lora.base_dir)
    return out


def merge_adapter(adapter_dir: Path, out: Path, base_dir: str | None = None) -> Path:
    """The base model with the adapter at `adapter_dir` merged into its weights (W + scale * B A), saved in
    Hugging Face format at `out` with the adapter folder's tokenizer. `base_dir`: the base model (default: the
    adapter's base_model_name_or_path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = fmt.import_peft()
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = json.loads((adapter_dir / fmt.CONFIG_FILE).read_text())
    base_dir = base_dir or config.get("base_model_name_or_path")
    if not base_dir:
        raise ValueError(f"{adapter_dir / fmt.CONFIG_FILE} names no base model: pass the base model folder")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if any(adapter_dir.glob("tokenizer*")):
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
