"""Held-out evaluation: task checkers, the eval suite, regression gates and reports."""

from jaxalign.eval.compare import compare_metrics, load_metrics
from jaxalign.eval.suite import evaluate, metric_direction, score_answers
from jaxalign.rewards.checkers import check, is_refusal, reward

__all__ = [
    "check",
    "compare_metrics",
    "evaluate",
    "is_refusal",
    "load_metrics",
    "metric_direction",
    "reward",
    "score_answers",
]
