"""The `cispo` command (`cispo train`, `cispo eval`, `cispo import-gguf`, `cispo filter`, `cispo bench`) and the
entry-point glue: the composed Hydra config becomes the typed `Config` once, here, and bad input stops the run with
one message naming what is wrong, before any model is built.

The Hydra configs are read from `cispo/configs`: in a source checkout a link to the top-level `configs/` (the one
copy), in an installed wheel the same files shipped as package data (pyproject.toml). So `cispo train` composes the
same presets from a clone, an editable install or `pip install .`.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cispo.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parent / "configs"
HELP_FLAGS = ("-h", "--help")

COMMANDS = {
    "train": "train a policy (Hydra overrides of configs/train.yaml)",
    "eval": "evaluate a checkpoint or an OpenAI-compatible endpoint (overrides of configs/eval.yaml)",
    "import-gguf": "turn a GGUF file, or the one a pip package ships, into a Hugging Face folder",
    "filter": "keep the training prompts whose pass rate lies in a band (MiniMax-M1 §4)",
    "bench": "run a benchmark of a source checkout (scripts/bench_*.py); `cispo bench` lists them",
}


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore: `schema` (the first entry of configs/train.yaml) and
    `eval_schema` (configs/eval.yaml)."""
    from hydra.core.config_store import ConfigStore

    from cispo.eval_config import EvalRunConfig

    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and build the dataclasses (their __post_init__ checks run here)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        # omegaconf wraps errors raised by __post_init__; its own message carries the full key
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else err
        fail(cause, "config error")
    except ValueError as err:
        fail(err, "config error")


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---- what the configs hold: groups, presets, keys ------------------------------------------------------------


def schema_of(config_name: str) -> type:
    from cispo.eval_config import EvalRunConfig

    return EvalRunConfig if config_name == "eval" else Config


def config_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema dataclass, nested sections included (`rollout.server.port`)."""
    keys, hints = [], typing.get_type_hints(schema)
    for f in fields(schema):
        key = prefix + f.name
        keys.append(key)
        if is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], key + ".")
    return keys


def presets(config_name: str = "train") -> dict[str, list[str]]:
    """The config groups of a command (its defaults list) and the presets of each (configs/<group>/*.yaml)."""
    text = (CONFIGS / f"{config_name}.yaml").read_text()
    groups = re.findall(r"^\s*-\s*(?:optional\s+)?(\w+)\s*:", text, re.M)
    return {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in groups if (CONFIGS / g).is_dir()}


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


def nearest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def check_presets(config_name: str, overrides: list[str]) -> None:
    """GROUP=PRESET names a file of configs/GROUP/ (Hydra skips a missing one of an optional group silently)."""
    groups = presets(config_name)
    for override in overrides:
        m = re.fullmatch(r"[+~]?(\w+)=([\w.-]+)", override)
        if not m or m.group(1) not in groups or m.group(2) in ("null", "none"):
            continue
        group, value = m.groups()
        if value not in groups[group]:
            guess = nearest(value, groups[group])
            hint = f"did you mean {group}={guess}? " if guess else ""
            raise ConfigError(f"{group}={value}: no such preset in configs/{group}/; {hint}"
                              f"the {group} presets are {', '.join(groups[group])}")


def explain(err: Exception, config_name: str) -> str:
    """A Hydra composition error as one line: the key, what is wrong, and the nearest valid key or preset."""
    cause = err.__cause__ or err
    text = str(cause)
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None
    if key and re.search(r"Key '[^']+' (?:is )?not in", text):
        keys = config_keys(schema_of(config_name))
        parent = key.rpartition(".")[0]
        # a free-form dict (trainer.deepspeed) takes new keys, with Hydra's +
        if parent in keys and not any(k.startswith(parent + ".") for k in keys):
            return f"{key}: {parent} takes new keys with a +: +{key}=..."
        guess = nearest(key, keys) or nearest(key, [k for k in keys if k.rpartition(".")[0] == parent])
        groups = presets(config_name)
        guess = guess or (nearest(key, list(groups)) if "." not in key else None)
        hint = f"; did you mean {guess}?" if guess else ""
        return f"{key} is not a config key{hint} (`cispo {'eval' if config_name == 'eval' else 'train'} --help` " \
               "lists the sections; the docs' configuration reference lists every key)"
    missing = re.search(r"Could not find '(\w+)/([^']+)'", str(err))
    if missing:
        group, value = missing.groups()
        choices = presets(config_name).get(group, [])
        guess = nearest(value, choices)
        return f"{group}={value}: no such preset in configs/{group}/; " + \
            (f"did you mean {group}={guess}? " if guess else "") + f"the {group} presets are {', '.join(choices)}"
    if key:
        return f"{key}: {first_line(cause)}"
    return first_line(err).replace("\n", " ")


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose configs/<config_name>.yaml with the overrides; a bad key, value or preset is a ConfigError of one
    line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException as OmegaError

    register_configs()
    check_presets(config_name, overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            return hydra_compose(config_name, overrides=overrides)
    except (HydraException, OmegaError) as err:
        raise ConfigError(explain(err, config_name)) from None


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


def fail(err: BaseException, what: str = "error") -> typing.NoReturn:
    """Stop with one line on stderr and exit status 2: the user's input was wrong, not the code."""
    print(f"{what}: {first_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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
