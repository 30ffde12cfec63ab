"""The `Scorer`: a weighted sum of named rewards (Python reward functions, programmatic
checkers, reward models), the one scorer of RL rollouts, rejection sampling and the eval suite."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxalign.config import Config
from jaxalign.errors import ConfigError, UserError
from jaxalign.rewards.functions import FunctionReward
from jaxalign.rewards.model import ModelReward


def _tokenizer_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():  # a Hugging Face model directory
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
    return p


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two `data.tokenizer` values name the same tokenizer: the same file, or files with
    the same bytes (a Hugging Face reward model's directory carries its own copy)."""
    file_a, file_b = _tokenizer_file(a), _tokenizer_file(b)
    if file_a.resolve() == file_b.resolve():
        return True
    return file_a.is_file() and file_b.is_file() and file_a.read_bytes() == file_b.read_bytes()


class Reward(Protocol):
    """One reward: scores [N] of N rows. `needs_sequences`: whether it reads the rows' token
    `sequences` (a reward model) rather than only their texts and records."""

    needs_sequences: bool

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        records: Sequence[dict],
        sequences: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray: ...


class Scorer:
    """Scores of rows: the weighted sum (default weight 1 each) of named rewards, in order.

    Called as `scorer(prompts, completions, records[, sequences]) -> scores [N]`, so it is also
    the plain scoring callable that `rejection_sample` takes."""

    def __init__(
        self,
        rewards: Sequence[Reward],
        names: Sequence[str],
        weights: Sequence[float] | None = None,
    ):
        if not rewards:
            raise UserError("a scorer needs at least one reward")
        self.rewards = list(rewards)
        self.names = list(names)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.rewards)
        if not len(self.rewards) == len(self.names) == len(self.weights):
            raise UserError(
                f"{len(self.weights)} weights and {len(self.names)} names for "
                f"{len(self.rewards)} rewards"
            )

    @classmethod
    def from_rl_config(cls, cfg: Config, tokenizer) -> Scorer:
        """The RL run's scorer: `rl.reward_functions`, then `rl.reward_model` (normalized by its
        saved statistics with `rl.normalize_reward_model`, kept in host memory between rollouts
        with `rl.offload_frozen`), weighted by `rl.reward_weights`."""
        rl = cfg.rl
        rewards: list[Reward] = [
            FunctionReward.load(spec, f"rl.reward_functions[{i}]")
            for i, spec in enumerate(rl.reward_functions)
        ]
        if rl.reward_model:
            reward_model = ModelReward(
                rl.reward_model,
                "rl.reward_model",
                normalize=rl.normalize_reward_model,
                offload=rl.offload_frozen,
            )
            rm_tokenizer = reward_model.cfg.data.tokenizer
            if not same_tokenizer(rm_tokenizer, cfg.data.tokenizer):
                raise ConfigError(
                    f"rl.reward_model {rl.reward_model}: its tokenizer ({rm_tokenizer}) differs "
                    "from data.tokenizer"
                )
            rewards.append(reward_model)
        if not rewards:
            raise ConfigError("RL needs rl.reward_functions and/or rl.reward_model")
        return cls(
            rewards, reward_names(rl.reward_functions, bool(rl.reward_model)), rl.reward_weights
        )

    @classmethod
    def from_flags(cls, reward_fn: str | None, reward_model: str | None) -> Scorer:
        """The scorer of the command line's `--reward-fn` or `--reward-model` (exactly one)."""
        if (reward_fn is None) == (reward_model is None):
            raise UserError("give exactly one of --reward-fn and --reward-model")
        if reward_fn is not None:
            return cls([FunctionReward.load(reward_fn, "--reward-fn")], reward_names([reward_fn]))
        return cls([ModelReward(reward_model, "--reward-model")], ["reward_model"])

    @property
    def needs_sequences(self) -> bool:
        """Whether a reward reads token sequences (a reward model)."""
        return any(r.needs_sequences for r in self.rewards)

    def parts(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        records: Sequence[dict],
        sequences: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The scores [N] float64 and each reward's own, unweighted, by name ({name: [N]})."""
        parts = [r(prompts, completions, records, sequences) for r in self.rewards]
        scores = np.zeros(len(completions), np.float64)
        for part, weight in zip(parts, self.weights, strict=True):
            scores += weight * part
        return scores, dict(zip(self.names, parts, strict=True))

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        records: Sequence[dict],
        sequences: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """The scores [N] float64."""
        return self.parts(prompts, completions, records, sequences)[0]

    def without_sequences(
        self, prompts: Sequence, completions: Sequence[str], records: Sequence[dict]
    ) -> np.ndarray:
        """The weighted sum of the rewards that read no token sequences (the reward functions):
        the RL run's held-out pass rate."""
        scores = np.zeros(len(completions), np.float64)
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            if not reward.needs_sequences:
                scores += weight * reward(prompts, completions, records)
        return scores


def reward_names(functions: Sequence[str], reward_model: bool = False) -> list[str]:
    """Metric names of the rewards: each function's own name ("module:fn" -> "fn"; repeated
    names numbered), then "reward_model"."""
    names = [spec.rsplit(":", 1)[-1] for spec in functions]
    names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names + (["reward_model"] if reward_model else [])
