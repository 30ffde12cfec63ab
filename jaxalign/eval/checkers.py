"""The task checkers, which live in `jaxalign.rewards.checkers`; this name stays importable
because configs name the RL reward `jaxalign.eval.checkers:reward`."""

from jaxalign.rewards.checkers import (
    SAFETY_FAMILIES,
    TASK_FAMILIES,
    check,
    count_words,
    is_refusal,
    reward,
)

__all__ = ["SAFETY_FAMILIES", "TASK_FAMILIES", "check", "count_words", "is_refusal", "reward"]
