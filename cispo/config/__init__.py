"""The config schema: the one home of every default.

Each group of `configs/` (model, algo, rollout, reward, data, trainer, logger, curriculum, env) is typed by one
dataclass in a module of this package, named after its group (the reward group's lives in `rewards/config.py`,
next to the graders, which must not import `cispo`); `Config`, here, holds them all and checks the rules that span
groups. Yaml files only pick presets. Hydra composes the yaml onto this schema in struct mode, so an unknown key or
a wrong type fails at start-up naming the key; `__post_init__` checks the values and cross-field rules before
any model is built. Every name is importable from `cispo.config`.

This package imports no hydra: `cispo.compose.register_configs()` does, when the entry point asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cispo.config.algo import AlgoConfig
from cispo.config.base import ConfigError, _one_of, _positive
from cispo.config.curriculum import CurriculumConfig
from cispo.config.data import DataConfig
from cispo.config.env import EnvConfig
from cispo.config.model import LoraConfig, ModelConfig, TinyModelConfig, WarmStartConfig
from cispo.config.rollout import RolloutConfig, ServerConfig
from cispo.config.trainer import LoggerConfig, TrainerConfig
from rewards.config import RewardConfig

__all__ = [
    "AlgoConfig", "Config", "ConfigError", "CurriculumConfig", "DataConfig", "EnvConfig", "LoggerConfig", "LoraConfig",
    "ModelConfig", "RewardConfig", "RolloutConfig", "ServerConfig", "TinyModelConfig", "TrainerConfig",
    "WarmStartConfig", "_one_of", "_positive",
]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self):
        self._check_off_policy()
        self._check_lora()
        if self.algo.pi_old == "engine":
            if self.model.routing_replay:
                raise ConfigError("model.routing_replay replays the experts of the trainer's pi_old pass, which "
                                  "algo.pi_old=engine skips: set algo.pi_old=trainer")
            if self.rollout.top_p < 1:
                raise ConfigError(f"algo.pi_old=engine takes the engine's logprobs under top_p={self.rollout.top_p}, "
                                  "a truncated distribution the trainer's pi_theta is not: set rollout.top_p=1.0, "
                                  "or algo.pi_old=trainer")
            if self.rollout.min_tokens:
                raise ConfigError(f"algo.pi_old=engine takes the engine's logprobs, which under rollout.min_tokens="
                                  f"{self.rollout.min_tokens} come from a distribution with the end of sequence "
                                  "masked out (the trainer's pi_theta is not): set rollout.min_tokens=0, or "
                                  "algo.pi_old=trainer")
        if self.model.path == "tiny" and self.rollout.max_model_len > self.model.tiny.max_positions:
            raise ConfigError(f"rollout.max_model_len={self.rollout.max_model_len} is beyond the tiny model's "
                              f"{self.model.tiny.max_positions} positions: raise model.tiny.max_positions to at "
                              "least rollout.max_model_len")

    def _check_lora(self) -> None:
        """LoRA (model.lora.rank > 0) against the rollout settings that cannot serve it; the engine and the model
        are checked once known (cispo.model.lora.check_lora)."""
        if not self.model.lora.rank:
            return
        if self.rollout.sleep_level == 2:
            raise ConfigError("rollout.sleep_level=2 drops the engine's weights while the policy trains, and with "
                              "model.lora.rank set a weight sync sends the adapters only, never the base again: set "
                              "rollout.sleep_level to 0 or 1")

    def _check_off_policy(self) -> None:
        """The rule for samples of older policies (algo.max_staleness > 0), stated once: they run on servers, and
        their weight against the policy that generated them is bounded. With algo.pi_old=trainer the bound is
        algo.tis_cap; with algo.pi_old=engine the ratio itself is that weight, so the loss must cap it."""
        algo, in_flight = self.algo, self.rollout.server.in_flight
        if in_flight != "off":
            if not algo.max_staleness:
                raise ConfigError(f"rollout.server.in_flight={in_flight} generates while the trainer updates: set "
                                  "algo.max_staleness >= 1 (how many batches the servers may run ahead)")
            if self.env.name:
                raise ConfigError(f"rollout.server.in_flight={in_flight} is not built for multi-turn episodes "
                                  f"(env.name={self.env.name}): set rollout.server.in_flight=off")
            if self.model.lora.rank:
                raise ConfigError(f"rollout.server.in_flight={in_flight} keeps requests running across a sync, and "
                                  "a LoRA sync serves each version under its own adapter name: set "
                                  "rollout.server.in_flight=off with model.lora.rank")
        if not algo.max_staleness:
            return
        if self.rollout.mode != "server":
            raise ConfigError("algo.max_staleness > 0 overlaps generation with the update, which needs "
                              "rollout.mode=server (a colocated engine shares the trainer's devices)")
        if algo.pi_old == "trainer":
            if not algo.tis_cap:
                raise ConfigError(f"algo.max_staleness={algo.max_staleness} trains on samples of older policies: "
                                  "set algo.tis_cap (e.g. 2.0), the capped weight that corrects for them, or "
                                  "algo.pi_old=engine with a loss that caps its IS weight (cispo/sampling/pipeline.py)")
            return
        from cispo.algo.loss import weight_cap  # torch, as in AlgoConfig's own checks

        cap = weight_cap(algo.loss)
        fix = "or use algo.pi_old=trainer with algo.tis_cap (e.g. 2.0)"
        if cap is None:
            uses = "does not cap its IS weight" if algo.loss in ("dapo", "grpo") else "does not weight tokens by the ratio"
            raise ConfigError(f"algo.loss={algo.loss} {uses}, so with algo.pi_old=engine nothing bounds the "
                              f"correction of samples up to algo.max_staleness={algo.max_staleness} policies old: "
                              f"use algo.loss=cispo, {fix}")
        if getattr(algo, cap) is None:
            raise ConfigError(f"algo.{cap}=null leaves the weight of stale samples unbounded with algo.pi_old=engine "
                              f"(a token with log-ratio 5 weighs 148): set algo.{cap} (e.g. 5.0), {fix}")
