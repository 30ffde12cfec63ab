"""The config sections of the preference trainers: `preference` (how pairs become rows, for
`trainer: rm | dpo`), `rm` and `dpo`. Light (no jax): `jaxalign/config.py` loads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PreferenceConfig:
    """How preference pairs (prompt, chosen, rejected) become token rows (`trainer: rm | dpo`).

    Each of chosen and rejected is one row of at most `train.seq_len` tokens (prompt included);
    packed (`pack_pairs`), the two are consecutive segments of a row of 2 x `train.seq_len`.
    """

    # Prompts longer than this many tokens keep their last tokens (BOS stays first); None: no cap.
    max_prompt_length: int | None = None
    # Pairs still longer than train.seq_len: dropped (and counted), or truncated: the prompt keeps
    # its end, then the completions are cut at the end.
    too_long: Literal["drop", "truncate"] = "drop"
    # Pack whole pairs (chosen and rejected side by side, as segments) into rows of
    # 2 x train.seq_len tokens instead of one padded row per side. Same pairs per batch
    # (train.batch_size still counts pairs) and the same losses; fewer rows, whose count varies
    # per step (one compile per count). Measured in docs/performance.md.
    pack_pairs: bool = False

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.max_prompt_length is not None and self.max_prompt_length < 2:
            return "preference.max_prompt_length must be at least 2 (BOS and one prompt token)"
        return None


@dataclass
class RMConfig:
    """Bradley-Terry reward model (`trainer: rm`)."""

    # Adds center_coef * mean((r_chosen + r_rejected)^2), keeping rewards centered near 0.
    center_coef: float = 0.0
    # Reward statistics (mean, std) saved after training as RUN_DIR/reward_stats.json are computed
    # over this file (chosen and rejected responses); None: data.eval_file, else data.train_file.
    stats_file: str | None = None

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.center_coef < 0:
            return f"rm.center_coef must be >= 0, got {self.center_coef}"
        return None


@dataclass
class DPOConfig:
    """Direct preference optimization and variants (`trainer: dpo`); see docs/trainers/dpo.md."""

    # formulas of each: docs/trainers/dpo.md
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    beta: float = 0.1  # for orpo: the odds-ratio weight lambda
    label_smoothing: float = 0.0  # eps of conservative DPO (sigmoid), robust DPO and SimPO
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma
    rpo_alpha: float = 0.0  # weight of the chosen answer's per-token NLL added to the loss
    # Compute the reference log-probs once before training (stored in RUN_DIR/reference_logps)
    # instead of keeping a frozen reference model in memory.
    precompute_ref: bool = False

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.beta <= 0:
            return f"dpo.beta must be positive, got {self.beta}"
        if not 0 <= self.label_smoothing < 0.5:
            return f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
        if self.rpo_alpha < 0:
            return f"dpo.rpo_alpha must be >= 0, got {self.rpo_alpha}"
        return None
