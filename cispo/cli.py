"""The `cispo` command (`cispo train`, `cispo eval`, `cispo import-gguf`, `cispo filter`, `cispo bench`) and the
entry-point glue: the composed Hydra config (cispo/compose.py) becomes the typed `Config` once, here, and bad input
stops the run with one message naming what is wrong, before any model is built.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig

from cispo.compose import CONFIGS, compose, fail, nearest, presets, register_configs, schema_of, to_config
from cispo.compose import config_keys  # noqa: F401  (`from cispo.cli import config_keys` keeps working)
from cispo.config import ConfigError

HELP_FLAGS = ("-h", "--help")

COMMANDS = {
    "train": "train a policy (Hydra overrides of configs/train.yaml)",
    "eval": "evaluate a checkpoint or an OpenAI-compatible endpoint (overrides of configs/eval.yaml)",
    "import-gguf": "turn a GGUF file, or the one a pip package ships, into a Hugging Face folder",
    "filter": "keep the training prompts whose pass rate lies in a band (MiniMax-M1 §4)",
    "bench": "run a benchmark of a source checkout (scripts/bench_*.py); `cispo bench` lists them",
}


def config_help(command: str, config_name: str) -> str:
    groups = presets(config_name)
    schema = schema_of(config_name)
    sections = [f.name for f in fields(schema)]
    lines = [f"usage: cispo {command} [KEY=VALUE ...] [GROUP=PRESET ...]", "",
             COMMANDS[command] + ".", "",
             "Config groups (GROUP=PRESET picks a file of configs/GROUP/):"]
    width = max(map(len, groups))
    lines += [f"  {g:<{width}}  {', '.join(p) or '-'}" for g, p in groups.items()]
    lines += ["", f"Sections of keys (SECTION.KEY=VALUE): {', '.join(sections)}",
              f"  e.g. cispo {command} " + ("algo=dapo trainer.steps=20 algo.is_weight_max=4" if command == "train"
                                           else "model.path=runs/X/final eval.k=8"),
              "  every key, its type, default and meaning: the configuration reference of the docs",
              "  (docs/reference/configuration.md), generated from cispo/config/", "",
              "Hydra's own flags work too: --cfg job (print the composed config and exit), -m (a sweep),",
              "--hydra-help. Errors in a key or preset stop before anything is built, naming the nearest key."]
    return "\n".join(lines)


# ---- one-line errors for the command line ----------------------------------------------------------------------


def user_errors() -> tuple[type[BaseException], ...]:
    """The project's errors that mean bad input (a config value, a file, a package, a key): one line, no
    traceback. Anything else is a bug or a failure of the machine, and keeps its traceback."""
    from cispo.model.gguf import GGUFImportError
    from rewards.registry import UnknownSource
    from rewards.sandbox import SandboxUnavailable
    from rollout.openai_client import EndpointError
    from rollout.registry import EngineConfigError

    return (ConfigError, FileNotFoundError, GGUFImportError, EngineConfigError, UnknownSource, SandboxUnavailable,
            EndpointError)


# ---- the commands ------------------------------------------------------------------------------------------


def report_saved(run_dir: Path) -> None:
    """After a failure: one line on what the run had saved, so nothing saved is taken for lost."""
    from cispo.train.checkpoint import list_checkpoints

    saved = list_checkpoints(run_dir / "checkpoints")
    parts = [f"newest checkpoint {saved[-1]} (trainer.resume=auto continues from it)"] if saved else []
    parts += [f"the HF policy {run_dir / 'final'}"] if (run_dir / "final" / "config.json").exists() else []
    parts += [f"metrics {run_dir / 'metrics.jsonl'}"] if (run_dir / "metrics.jsonl").exists() else []
    print(f"the run failed; saved: {', '.join(parts) if parts else 'nothing yet'}", file=sys.stderr, flush=True)


def run_training(cfg: DictConfig) -> None:
    from cispo.trainer import train

    config = to_config(cfg)
    try:
        result = train(config)
    except user_errors() as err:
        fail(err)
    except BaseException:
        report_saved(Path(config.trainer.output_dir))
        raise
    before, after = result.eval_before["eval/accuracy"], result.eval_after["eval/accuracy"]
    print(f"held-out accuracy: {before:.3f} before RL -> {after:.3f} after RL ({after - before:+.3f})")
    print(f"boxed-answer rate after RL: {result.eval_after['eval/boxed_rate']:.3f}")
    print(f"run directory: {result.run_dir}  (metrics.jsonl, reward.png, final/)")


def run_evaluation(cfg: DictConfig) -> None:
    import logging

    from cispo.commands.evaluate import evaluate
    from rollout.openai_client import EndpointError

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai SDK's HTTP client: one INFO line per request
    config = to_config(cfg)
    try:
        evaluate(config)
    except user_errors() as err:
        if type(err) is EndpointError:  # a failed request, not a missing key or model: nothing received is lost
            print(f"the answers received so far are in {config.eval.output_dir}/answers.jsonl; "
                  "the same command resumes from them", file=sys.stderr)
        fail(err)


def hydra_command(command: str, config_name: str, task, argv: list[str]) -> int:
    """Run `task` under hydra.main on configs/<config_name>.yaml with `argv` as its command line, after composing
    it once here so that a misspelt key or preset stops with one line."""
    import hydra

    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's; also in LOCAL_RANK
    if any(a in HELP_FLAGS for a in argv):
        print(config_help(command, config_name))
        return 0
    argv = ["--help" if a == "--hydra-help" else a for a in argv]
    if not any(a.startswith("-") for a in argv):  # flags (-m sweeps, --cfg, --info) are Hydra's to handle
        try:
            compose(config_name, argv)
        except ConfigError as err:
            fail(err)
    register_configs()
    main = hydra.main(version_base=None, config_path=str(CONFIGS), config_name=config_name)(task)
    saved = sys.argv
    # the job's name names its log file (train.log, evaluate.log); set next to the overrides, since argparse takes
    # Hydra's positional overrides only as one run (`a=1 --cfg job b=2` is an error)
    first = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    name = {"train": "train", "eval": "evaluate"}[config_name]
    sys.argv = [f"cispo {command}", *argv[:first], f"hydra.job.name={name}", *argv[first:]]
    try:
        main()
    finally:
        sys.argv = saved
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cispo COMMAND [ARGS ...]      (also: python -m cispo COMMAND ...)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Config groups of `cispo train` (GROUP=PRESET):"]
    lines += [f"  {g:<10} {', '.join(p)}" for g, p in presets("train").items()]
    lines += ["", "`cispo COMMAND --help` says more. With no arguments, `cispo train` runs the default run: a tiny",
              "model learns 2-digit additions on a CPU in a few minutes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return hydra_command("train", "train", run_training, rest)
    if command == "eval":
        return hydra_command("eval", "eval", run_evaluation, rest)
    if command == "import-gguf":
        from cispo.commands.import_gguf import main as import_main

        return import_main(rest)
    if command == "filter":
        from cispo.commands.filter import main as filter_main

        try:
            filter_main(rest)
        except user_errors() as err:
            fail(err)
        return 0
    if command == "bench":
        from cispo.commands.bench import main as bench_main

        return bench_main(rest)
    guess = nearest(command, list(COMMANDS))
    print(f"error: no command {command!r}" + (f"; did you mean `cispo {guess}`?" if guess else "") +
          f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
