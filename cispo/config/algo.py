"""The algo group: the objective and the shape of one RL step (`algo.*`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cispo.config.base import ConfigError, _one_of, _positive


@dataclass
class AlgoConfig:
    """The objective and the shape of one RL step (DESIGN.md §3)."""

    # cispo | dapo | grpo | gspo | reinforce | a loss registered with cispo.algo.loss.register_loss | an import path
    # "package.module:function" to one (its keyword-only parameters are knobs, read from the fields below)
    loss: str = "cispo"
    # CISPO: absolute bounds on the stop-gradient importance-sampling weight pi/pi_old (M1 Eq. 5 with
    # is_weight_max = 1 + eps_high). None = no bound; M1 set no lower bound.
    is_weight_max: float | None = 5.0
    is_weight_min: float | None = None
    unified_mask: bool = False  # M1 Eq. 6-7: drop tokens outside the trust region [1 - clip_low, 1 + clip_high]
    # PPO-style trust region, relative to 1 as in those papers: grpo/dapo's ratio clip, and cispo's Eq. 7 mask
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token_group"  # token_group | token_batch | sequence | prompt (see cispo/algo/loss.py)
    tis_cap: float | None = None  # truncated IS correction min(pi_old / pi_rollout, tis_cap); None = off
    # GSPO (Zheng et al. 2025): the clip of its sequence ratio exp(mean_t log(pi / pi_old)), relative to 1 as
    # clip_low / clip_high are; the paper's 3e-4 and 4e-4
    seq_clip_low: float = 3e-4  # GSPO: the lower end, 1 - seq_clip_low
    seq_clip_high: float = 4e-4  # GSPO: the upper end, 1 + seq_clip_high
    # more corrections of the train/inference mismatch beside tis_cap, by name (cispo/algo/corrections.py):
    # icepop | mis | geo_mask, each a factor on a token's loss from r = pi_old / pi_rollout; [] = none
    corrections: list[str] = field(default_factory=list)
    icepop_low: float = 0.5  # icepop: a token with r outside [low, high] drops, the rest weigh r (IcePop: 0.5, 5)
    icepop_high: float = 5.0  # icepop: the upper end of the band
    mis_low: float = 0.5  # mis: a response whose prod_t r leaves [low, high] drops, the rest weigh it (verl seq_mis)
    mis_high: float = 2.0  # mis: the upper end of the band
    geo_mask_low: float = 0.999  # geo_mask: a response whose geometric mean of r leaves [low, high] drops (verl geo_rs)
    geo_mask_high: float = 1.001  # geo_mask: the upper end of the band
    # server mode: generation of step s may use the policy of step s - 1 - max_staleness (0 = synchronous); the
    # stale samples are corrected by the tis_cap weight, or are pi_old with pi_old=engine (cispo/sampling/pipeline.py)
    max_staleness: int = 0
    # in-flight updates (rollout.server.in_flight): a group with a token of a policy more than this many versions
    # older than pi_old is dropped, not trained on (async/dropped_groups; cispo/sampling/inflight.py)
    max_off_policy_steps: int = 8
    # where pi_old, the ratio's denominator, comes from. trainer: a forward after generation (the ratio sees the
    # updates only; the engine's logprobs feed tis_cap and the mismatch/* metrics) | engine: the engine's sampling
    # logprobs, as in M1 (no forward; the ratio carries the train/inference mismatch too; mismatch/* is measured
    # on the first mini-batch, whose training forward is the trainer's pi_old)
    pi_old: str = "trainer"
    group_size: int = 8  # completions per prompt
    prompts_per_step: int = 32
    updates_per_step: int = 4  # optimizer steps (mini-batches) per rollout batch; M1 used 16
    adv_std_norm: bool = True  # divide by the reward std (GRPO); False = mean-centring only (Dr. GRPO)
    adv_norm: str = "group"  # group: std of the prompt's group | batch: std of the whole batch (ScaleRL)
    drop_zero_variance: bool = True  # drop groups whose rewards are all equal from the loss

    def __post_init__(self):
        from cispo.algo.loss import AGGREGATIONS, loss_knobs  # torch, once an AlgoConfig is built: the schema needs none

        try:  # the loss is in cispo.algo.loss.LOSSES (an import path is registered here) and has all its knobs
            loss_knobs(self.loss, asdict(self))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"algo.loss: {err}") from None
        _one_of("algo.loss_agg", self.loss_agg, AGGREGATIONS)
        _one_of("algo.adv_norm", self.adv_norm, {"group", "batch"})
        for name in ("group_size", "prompts_per_step", "updates_per_step"):
            _positive(f"algo.{name}", getattr(self, name))
        if self.prompts_per_step % self.updates_per_step:
            raise ConfigError(
                f"algo.prompts_per_step ({self.prompts_per_step}) must be divisible by algo.updates_per_step "
                f"({self.updates_per_step}): each update takes whole prompt groups"
            )
        if self.is_weight_max is not None and self.is_weight_min is not None and self.is_weight_min > self.is_weight_max:
            raise ConfigError("algo.is_weight_min must be <= algo.is_weight_max")
        if self.tis_cap is not None:
            _positive("algo.tis_cap", self.tis_cap)
        if self.max_staleness < 0:
            raise ConfigError(f"algo.max_staleness must be >= 0 (0 = synchronous), got {self.max_staleness}")
        if self.max_off_policy_steps < self.max_staleness:
            raise ConfigError(f"algo.max_off_policy_steps={self.max_off_policy_steps} is below algo.max_staleness="
                              f"{self.max_staleness}: every group would be dropped; set it >= algo.max_staleness")
        _one_of("algo.pi_old", self.pi_old, {"trainer", "engine"})
        if self.pi_old == "engine" and self.tis_cap:
            raise ConfigError("algo.tis_cap weights pi_old against the engine's logprobs, which algo.pi_old=engine "
                              "makes the same: set algo.tis_cap=null, or algo.pi_old=trainer")
        from cispo.algo.corrections import check as check_corrections

        try:
            check_corrections(self.corrections, asdict(self))
        except ValueError as err:
            raise ConfigError(f"algo.corrections: {err}") from None
        if self.pi_old == "engine" and self.corrections:
            raise ConfigError(f"algo.corrections {list(self.corrections)} weigh pi_old against the engine's logprobs, "
                              "which algo.pi_old=engine makes the same (every ratio is 1): set algo.corrections=[], "
                              "or algo.pi_old=trainer")
