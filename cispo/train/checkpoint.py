"""Checkpoints: save, resume, and export of the policy in Hugging Face format.

A checkpoint holds everything a run needs to continue exactly where it stopped: the model, the optimizer and
its schedule (the updater's own files: `TorchUpdater.save` / DeepSpeed's partitioned format), the position of
the prompt stream and any other registered trainer state, the step, and the RNG states of every rank.

Layout under `<output_dir>/checkpoints/`:

    step-000012/              a complete checkpoint; directories only get this name once complete
      trainer_state.json      step, world size, ZeRO stage, and `state`: {name: obj.state_dict()} of the
                              registered stateful objects (the prompt stream, ...; JSON-serialisable)
      rng/rank-00000.pt       python and torch (and CUDA) RNG states, one file per rank
      policy/                 plain torch: model.safetensors + optimizer.pt; DeepSpeed: deepspeed/ (ZeRO
                              partitions of every rank, the LR schedule); with LoRA (model.lora.rank) the
                              adapter instead of the model: adapter/ (PEFT format), and no frozen base weights
      hf/                     config.json + tokenizer, so `python -m cispo.train.checkpoint export` needs nothing else
    .tmp-step-000015/         a save in progress, or one interrupted by a crash (removed by the next save)
    latest                    the name of the newest complete checkpoint (informational)

Atomicity: every rank writes into `.tmp-step-N/`; after a barrier rank 0 renames it to `step-N/` (a rename is
atomic on POSIX filesystems) and only then deletes checkpoints beyond `trainer.keep_last`. A crash while
saving therefore leaves the previous checkpoint complete and usable. Multi-node runs need `output_dir` on a
filesystem every node sees (DeepSpeed writes each rank's partitions there).

Resuming (`trainer.resume`): `auto` takes the newest `step-*` under the run's checkpoints (starting fresh when
there is none), a path takes that checkpoint (or the newest one under a run directory), null starts fresh.
A DeepSpeed checkpoint resumes with the same number of ranks and ZeRO stage; to change either, export it to HF
format and start from that (optimizer state is then lost).

Export: `export_hf` writes the policy in HF format (ZeRO-3 parameters gathered bucket by bucket); `python -m
cispo.train.checkpoint export CHECKPOINT OUT` does it offline for a saved checkpoint, on CPU, without a launcher.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from cispo.config import ConfigError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names (see the module docstring), or None to start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if (path / STATE_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise ConfigError(f"trainer.resume={resume!r}: no checkpoint there (expected {STATE_FILE}, a step-* directory "
                      "or a run directory with checkpoints/)")


def checkpoint_step(path: Path) -> int:
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores checkpoints under `root` (collective calls: every rank calls save/load)."""

    def __init__(self, root: Path, keep_last: int, dist):
        self.root, self.keep_last, self.dist = Path(root), keep_last, dist

    def save(self, step: int, updater, stateful: dict, tokenizer=None) -> Path:
        """Write checkpoint `step` (see the module docstring). `stateful`: {name: object with state_dict() and
        load_state_dict()}; state_dict() must return JSON-serialisable data."""
        dist, name = self.dist, checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if dist.is_main:
            for stale in self.root.glob(".tmp-step-*"):  # interrupted saves
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        updater.save(tmp / "policy")
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{dist.rank:05d}.pt")
        if dist.is_main:
            meta = {"step": step, "world_size": dist.world_size, "zero_stage": updater.zero_stage,
                    "lora_rank": _lora_rank(updater),
                    "state": {key: obj.state_dict() for key, obj in stateful.items()}}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
            updater.policy.config.save_pretrained(tmp / "hf")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "hf")
        dist.barrier()
        if dist.is_main:
            if final.exists():  # the same step saved again (a run resumed from an older checkpoint)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(self.root / "latest", name + "\n")
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path, updater, stateful: dict) -> int:
        """Restore checkpoint `path` into the updater, the stateful objects and this rank's RNG; returns its
        step. Call it last before the loop: the RNG states are those of the moment the checkpoint was saved."""
        path, dist = Path(path), self.dist
        meta = json.loads((path / STATE_FILE).read_text())
        if meta["zero_stage"] != updater.zero_stage:
            raise ConfigError(f"checkpoint {path} was written with trainer.zero_stage={meta['zero_stage']}, this run "
                              f"has {updater.zero_stage}: resume with the same stage, or export it "
                              "(python -m cispo.train.checkpoint export) and start from the HF weights")
        if meta["zero_stage"] is not None and meta["world_size"] != dist.world_size:
            raise ConfigError(f"checkpoint {path} holds ZeRO partitions of {meta['world_size']} ranks, this run has "
                              f"{dist.world_size}: resume with the same number of ranks, or export it and start "
                              "from the HF weights")
        if meta.get("lora_rank", 0) != _lora_rank(updater):
            raise ConfigError(f"checkpoint {path} was written with model.lora.rank={meta.get('lora_rank', 0)}, this run "
                              f"has {_lora_rank(updater)}: resume with the same model.lora settings")
        updater.load(path / "policy")
        for key, obj in stateful.items():
            if key in meta["state"]:
                obj.load_state_dict(meta["state"][key])
            else:
                logger.warning("checkpoint %s has no state for %r: it starts fresh", path, key)
        rng = path / "rng" / f"rank-{dist.rank:05d}.pt"
        set_rng_state(torch.load(rng, weights_only=False))
        return int(meta["step"])


def _lora_rank(updater) -> int:
    lora = getattr(updater, "lora", None)
    return lora.spec.rank if lora is not None else 0


def export_hf(updater, out: Path, tokenizer) -> Path:
    """The policy in Hugging Face format at `out` (collective under ZeRO-3: every rank calls it; rank 0 writes
    `out.tmp` and renames it to `out`). With LoRA: the adapter folder (PEFT format) at `out`, and with
    model.lora.export_merged the merged model in HF format at <out>-merged (cispo.model.lora.export_adapter)."""
    dist, out = updater.dist, Path(out)
    if getattr(updater, "lora", None) is not None:
        state = {name: tensor.to("cpu", copy=True) for name, tensor in updater.named_weights()}
        if dist.is_main:
            from cispo.model.lora import export_adapter

            export_adapter(state, updater.lora, out, tokenizer, merged=updater.lora.spec.export_merged)
        dist.barrier()
        return out
    state = {}
    for name, tensor in updater.named_weights():
        if dist.is_main:
            state[name] = tensor.to("cpu", copy=True)
    if dist.is_main:
        state |= {name: b.to("cpu", copy=True) for name, b in persistent_buffers(updater.policy)}  # never partitioned
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        updater.policy.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def persistent_buffers(model):
    """(name, tensor) of the buffers that belong in a state dict (e.g. not rotary caches)."""
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def trim_metrics(path: Path, step: int) -> list[dict]:
    """Drop the rows logged after `step` (a resumed run logs them again); returns the rows kept."""
    path = Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("step", 0) <= step]
    _write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Offline HF export of a saved checkpoint (plain torch or DeepSpeed, any ZeRO stage), on CPU. A LoRA
    checkpoint: the base model with its adapter merged in (the adapter folder itself is policy/adapter)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    policy_dir = checkpoint / "policy"
    from cispo.model.lora import ADAPTER_DIR, is_adapter_checkpoint, merge_adapter

    if is_adapter_checkpoint(policy_dir):
        merge_adapter(policy_dir / ADAPTER_DIR, out)
        if any((checkpoint / "hf").glob("tokenizer*")):
            AutoTokenizer.from_pretrained(checkpoint / "hf").save_pretrained(out)
        return out
    if (policy_dir / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(policy_dir / "model.safetensors"))
    else:
        from cispo.train.distributed import consolidate_deepspeed_checkpoint

        state = consolidate_deepspeed_checkpoint(policy_dir)
    config = AutoConfig.from_pretrained(checkpoint / "hf")
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not fit its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.save_pretrained(out)
    with_tokenizer = any((checkpoint / "hf").glob("tokenizer*"))
    if with_tokenizer:
        AutoTokenizer.from_pretrained(checkpoint / "hf").save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cispo.train.checkpoint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a checkpoint's policy in Hugging Face format")
    exp.add_argument("checkpoint", help="a step-* directory, or a run directory (its newest checkpoint)")
    exp.add_argument("out")
    args = parser.parse_args(argv)
    path = resolve_resume(args.checkpoint, Path("."))
    print(f"exported {path} -> {export_checkpoint(path, Path(args.out))}")


if __name__ == "__main__":
    main()
