"""The training and evaluation configs as Hydra composes them: configs/<name>.yaml with the command line's
overrides, onto the schema (cispo/config/, cispo/eval_config.py), built into the typed dataclasses once. A misspelt
key or preset and a value the schema refuses become one line naming the key and the nearest valid one.

Shared by the `cispo` command (cispo/cli.py) and the commands that compose a training config of their own
(cispo/commands/filter.py). Hydra is imported when a config is composed, not with this module.

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


# ---- composing, and its errors as one line ---------------------------------------------------------------------


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


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def fail(err: BaseException, what: str = "error") -> typing.NoReturn:
    """Stop with one line on stderr and exit status 2: the user's input was wrong, not the code."""
    print(f"{what}: {first_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(2)
