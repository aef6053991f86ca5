"""Rewards for RL on reasoning tasks: math (math-verify in killable worker processes) and code (tests run
in a bubblewrap sandbox), plus user graders routed by each row's `source` (rewards.registry). Never imports
vllm, deepspeed, hydra, omegaconf or wandb.

    from rewards import RewardConfig, RewardScorer
    with RewardScorer(RewardConfig()) as scorer:
        batch = scorer.score(responses, rows)   # BatchRewards: scores, results, trainable, metrics
"""

from rewards.base import RewardFn, RewardResult, register_reward_fn, resolve_reward_fn
from rewards.code import CODE_GRADER
from rewards.config import RewardConfig
from rewards.math import MATH_GRADER
from rewards.registry import (GRADERS, Grader, PoolBacked, UnknownSource, add_grader, register_grader,
                              row_source)
from rewards.scorer import BatchRewards, RewardScorer

add_grader(MATH_GRADER)
add_grader(CODE_GRADER)

__all__ = ["GRADERS", "BatchRewards", "Grader", "PoolBacked", "RewardConfig", "RewardFn", "RewardResult",
           "RewardScorer", "UnknownSource", "add_grader", "register_grader", "register_reward_fn",
           "resolve_reward_fn", "row_source"]
