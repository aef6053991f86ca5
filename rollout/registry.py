"""The table of rollout engines: `rollout.engine` names a row of `ENGINES`, or is an import path to one.

A row (`EngineSpec`) holds the engine's builder, `(model_dir, rollout_cfg, model_cfg, seed) -> RolloutEngine`,
and the `rollout.*` knobs the engine honours. Knobs that reach every engine through `SamplingParams` on each call
(`COMMON_KNOBS`) need no declaration; every other field of RolloutConfig is an engine knob, and a value other than
its default that the chosen engine does not honour stops the run before any weights load (`check_engine_knobs`),
naming the key, the engine and the engines that do honour it. A RolloutConfig field added later is therefore an
error on every engine until an engine declares it: nothing is silently ignored.

Adding an engine: `register_engine("name", builder, honours=...)` from any module (the built-ins are registered in
rollout/__init__.py, with import-path builders so that e.g. vllm is imported only when its engine is built), or no
registration at all: `rollout.engine=pkg.module:attr`, where attr is an EngineSpec, or a builder (a class or
factory with the builder signature) whose optional `honours` attribute lists its knobs.

This module imports neither torch nor cispo (rollout/ reads its configs duck-typed).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.base import RolloutEngine

Builder = Callable[[str, Any, Any, int], "RolloutEngine"]  # (model_dir, rollout_cfg, model_cfg, seed)

# RolloutConfig fields every engine honours: they reach it as SamplingParams on every generate() call
COMMON_KNOBS = frozenset({"engine", "mode", "max_tokens", "temperature", "top_p", "seed"})  # not engine knobs
PROTOCOL = ("generate", "load_weights", "sleep", "wake", "close")  # rollout.base.RolloutEngine, in process
REMOTE_PROTOCOL = ("generate", "close")  # an engine in other processes: its weights travel through its own sink


class EngineConfigError(ValueError):
    """rollout.engine or a rollout knob that no engine build can honour (cispo.config turns it into ConfigError)."""


@dataclass(frozen=True)
class EngineSpec:
    """One row of the engine table.

    `builder`: the builder, or its import path "pkg.module:attr", imported on the first build.
    `honours`: the RolloutConfig fields beyond COMMON_KNOBS that the engine acts on."""

    builder: Builder | str
    honours: frozenset[str] = frozenset()

    def build(self, model_dir: str, rollout_cfg, model_cfg, seed: int) -> RolloutEngine:
        builder = load_object(self.builder) if isinstance(self.builder, str) else self.builder
        return builder(model_dir, rollout_cfg, model_cfg, seed)


ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, builder: Builder | str, honours: Iterable[str] = ()) -> EngineSpec:
    """Add (or replace) the engine `rollout.engine=<name>`; returns its row."""
    if name == "auto" or ":" in name or not name:
        raise ValueError(f"engine name {name!r} is reserved: 'auto' picks an engine, 'pkg.module:attr' imports one")
    spec = EngineSpec(builder, frozenset(honours) - COMMON_KNOBS)
    ENGINES[name] = spec
    return spec


def load_object(path: str) -> Any:
    """The object an import path "pkg.module:attr" names."""
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise EngineConfigError(f"rollout.engine={path!r}: cannot import {attr!r} from {module_name!r} ({err})") \
            from err


def engine_spec(kind: str) -> EngineSpec:
    """The row for `kind`: a registered name, or an import path to an EngineSpec or a builder."""
    if ":" not in kind:
        if kind not in ENGINES:
            known = ", ".join(sorted(ENGINES))
            raise EngineConfigError(f"rollout.engine={kind!r} is not a registered engine ({known}, or auto) nor an "
                                    "import path 'pkg.module:attr'")
        return ENGINES[kind]
    obj = load_object(kind)
    if isinstance(obj, EngineSpec):
        return obj
    if not callable(obj):
        raise EngineConfigError(f"rollout.engine={kind!r} is a {type(obj).__name__}, not an EngineSpec or a builder "
                                "(model_dir, rollout_cfg, model_cfg, seed) -> RolloutEngine")
    return EngineSpec(obj, frozenset(getattr(obj, "honours", ())) - COMMON_KNOBS)


def unhonoured_knobs(spec: EngineSpec, rollout_cfg) -> dict[str, tuple[Any, Any]]:
    """The engine knobs of `rollout_cfg` (a RolloutConfig) set away from their default that `spec` ignores:
    dotted key -> (value, default). A knob group (rollout.server) is honoured or not as a whole and reported by
    its changed keys."""
    return {key: change for f in dataclasses.fields(rollout_cfg) if f.name not in COMMON_KNOBS | spec.honours
            for key, change in _changes(f.name, getattr(rollout_cfg, f.name), _default(f)).items()}


def _changes(key: str, value: Any, default: Any) -> dict[str, tuple[Any, Any]]:
    if dataclasses.is_dataclass(value):
        return {k: c for f in dataclasses.fields(value)
                for k, c in _changes(f"{key}.{f.name}", getattr(value, f.name), getattr(default, f.name)).items()}
    return {} if value == default else {key: (value, default)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_engine_knobs(kind: str, rollout_cfg) -> None:
    """EngineConfigError naming every non-default knob of `rollout_cfg` that engine `kind` cannot honour.

    `kind`: what rollout.engine resolved to (rollout.resolve_engine); call it before the engine loads weights."""
    spec = engine_spec(kind)
    ignored = unhonoured_knobs(spec, rollout_cfg)
    if not ignored:
        return
    via = f" (rollout.engine={rollout_cfg.engine} resolved to {kind})" if rollout_cfg.engine != kind else ""
    needs = "; ".join(f"rollout.{key}={value!r} needs {_honoured_by(key.split('.')[0])} (default {default!r})"
                      for key, (value, default) in ignored.items())
    it, default = ("it", "it at its default") if len(ignored) == 1 else ("them", "them at their defaults")
    raise EngineConfigError(f"{needs}; the {kind} engine{via} cannot honour {it}. Set rollout.engine to such an "
                            f"engine, or leave {default}.")


def _honoured_by(key: str) -> str:
    names = sorted(name for name, spec in ENGINES.items() if key in spec.honours)
    return f"the {' or '.join(names)} engine" if names else "an engine that honours it (none registered does)"


def check_protocol(engine: Any, kind: str, methods: tuple[str, ...] = PROTOCOL) -> Any:
    """`engine`, after checking that it has the RolloutEngine `methods` (a user builder may return anything)."""
    missing = [m for m in methods if not callable(getattr(engine, m, None))]
    if missing:
        raise TypeError(f"rollout.engine={kind!r} built a {type(engine).__name__} without {', '.join(missing)} "
                        "(rollout.base.RolloutEngine)")
    return engine
