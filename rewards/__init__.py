"""Rewards for RL on reasoning tasks: math (math-verify in killable worker processes) and code (tests run
in a bubblewrap sandbox), plus user functions. Never imports vllm, deepspeed, hydra, omegaconf or wandb.

    from rewards import RewardConfig, RewardScorer
    with RewardScorer(RewardConfig()) as scorer:
        batch = scorer.score(responses, rows)   # BatchRewards: scores, results, loss_mask, metrics
"""

from rewards.base import RewardFn, RewardResult, register_reward_fn, resolve_reward_fn
from rewards.config import RewardConfig
from rewards.scorer import BatchRewards, RewardScorer

__all__ = ["BatchRewards", "RewardConfig", "RewardFn", "RewardResult", "RewardScorer", "register_reward_fn",
           "resolve_reward_fn"]
