"""Trainers: one generic loop (`loop.Trainer`); each algorithm adds a loss and its data."""

from __future__ import annotations

from jaxalign.config import Config


def make_algorithm(cfg: Config):
    """The algorithm that `cfg.trainer` names."""
    if cfg.trainer == "sft":
        from jaxalign.trainers.sft import SFT

        return SFT(cfg)
    if cfg.trainer == "rm":
        from jaxalign.trainers.rm import RewardModelAlgorithm

        return RewardModelAlgorithm(cfg)
    if cfg.trainer == "dpo":
        from jaxalign.trainers.dpo import DPO

        return DPO(cfg)
    if cfg.trainer == "ppo":
        from jaxalign.trainers.ppo import PPO

        return PPO(cfg)
    if cfg.trainer in ("grpo", "rloo", "reinforce_pp"):
        from jaxalign.trainers.grpo import GRPO

        return GRPO(cfg, estimator=cfg.trainer)
    raise ValueError(f"unknown trainer {cfg.trainer!r}")
