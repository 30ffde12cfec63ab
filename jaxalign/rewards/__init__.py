"""Rewards: what scores a completion, for RL rollouts, rejection sampling and evaluation.

- `answers.py`: built-in reward functions for verifiable tasks (`exact_answer`, `shaped_answer`,
  exported here, so configs name them `jaxalign.rewards:exact_answer`),
- `checkers.py`: programs that check an answer per task family, and `reward` over them,
- `functions.py`: Python reward functions loaded from `module:function` or `file.py:function`,
- `model.py`: trained reward models (`trainer: rm` run directories) and `jaxalign score`,
- `scorer.py`: the `Scorer`, a weighted sum of named rewards.

Every reward is `reward(prompts, completions, records, sequences=None) -> scores [N]`; see
docs/architecture.md, "Adding a reward".
"""

from jaxalign.rewards.answers import exact_answer, shaped_answer
from jaxalign.rewards.functions import FunctionReward, load_reward_function
from jaxalign.rewards.model import ModelReward
from jaxalign.rewards.scorer import Reward, Scorer, reward_names

__all__ = [
    "FunctionReward",
    "ModelReward",
    "Reward",
    "Scorer",
    "exact_answer",
    "load_reward_function",
    "reward_names",
    "shaped_answer",
]
