"""The reward interface: one result type, the per-response protocol, and how `reward.custom` is found.

A RewardFn grades one response against one data row. Which grader scores a row is decided by its source
(rewards.registry.GRADERS: the built-in math and code graders run in worker pools, user graders registered
with register_grader in the trainer process). `reward.custom` names one RewardFn for every source with no
registered grader, looked up here by a registered name or by an import path "pkg.module:fn".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rewards.config import RewardConfig


@dataclass(frozen=True)
class RewardResult:
    """The grade of one response.

    score: the scalar reward (length shaping is applied on top by the scorer, not stored here).
    status: what happened, e.g. "correct" | "wrong" | "no_answer" | "rejected" | "timeout" |
        "gold_unparseable" | "bad_tests" | "error"; a user's function may add its own.
    info: details for logs, e.g. {"extracted": "82", "fast_path": True} or {"pass_fraction": 0.5, "tests": [...]}.
    """

    score: float
    status: str
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Grade:
    """A built-in grader's verdict before scoring (status and info as in RewardResult); the scorer turns
    it into a score from the config."""

    status: str
    info: dict


class RewardFn(Protocol):
    def __call__(self, response: str, row: Mapping[str, Any]) -> RewardResult: ...


RewardFnFactory = Callable[["RewardConfig"], RewardFn]
_REGISTRY: dict[str, RewardFnFactory] = {}


def register_reward_fn(name: str) -> Callable[[RewardFnFactory], RewardFnFactory]:
    """Decorator: make `factory(cfg) -> RewardFn` available as `reward.custom=<name>`."""

    def decorate(factory: RewardFnFactory) -> RewardFnFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a reward fn named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = factory
        return factory

    return decorate


def resolve_reward_fn(spec: str, cfg: RewardConfig) -> RewardFn:
    """A RewardFn from a registered name, or from "pkg.module:attr" (attr is the RewardFn itself)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward.custom={spec!r}: cannot import {attr!r} from {module_name!r} ({e})") from e
        if not callable(obj):
            raise TypeError(f"reward.custom={spec!r} is a {type(obj).__name__}, "
                            "not a callable (response, row) -> RewardResult")
        return obj
    if spec not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise ValueError(f"reward.custom={spec!r} is not a registered reward fn ({known}); "
                         f"use an import path 'pkg.module:fn' or register it with @register_reward_fn")
    return _REGISTRY[spec](cfg)
