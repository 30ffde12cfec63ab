"""Built-in reward functions for verifiable tasks: `fn(prompts, completions, **fields) -> scores`.

Use them in a config as `rl.reward_functions: ["jaxalign.rewards:exact_answer"]` (the package
exports them); every extra field of a prompt record (e.g. `answer`) arrives as a list aligned
with the completions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_NUMBER = re.compile(r"-?\d+")


def _normalize(text: str) -> str:
    return " ".join(str(text).split())


def exact_answer(
    prompts: Sequence, completions: Sequence[str], answer: Sequence[str], **_
) -> np.ndarray:
    """1.0 where the completion equals the record's `answer` (whitespace-normalized), else 0.0."""
    return np.asarray(
        [float(_normalize(c) == _normalize(a)) for c, a in zip(completions, answer, strict=True)],
        np.float64,
    )


def shaped_answer(
    prompts: Sequence, completions: Sequence[str], answer: Sequence[str], **_
) -> np.ndarray:
    """`exact_answer`, plus partial credit 0.2 when the completion is wrong but contains the
    answer's number (arithmetic, counting, largest) as its last number."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        if _normalize(c) == _normalize(a):
            scores.append(1.0)
            continue
        want, got = _NUMBER.findall(str(a)), _NUMBER.findall(str(c))
        scores.append(0.2 if want and got and got[-1] == want[-1] else 0.0)
    return np.asarray(scores, np.float64)
