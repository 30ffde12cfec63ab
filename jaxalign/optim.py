"""Optimizer: AdamW with warmup and decay, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from jaxalign.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio`, or constant."""
    warmup = max(cfg.warmup_steps, 0)
    decay_steps = max(cfg.steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.lr_schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(cfg.lr / max(warmup, 1), cfg.lr, warmup - 1 or 1), decay], [warmup]
    )


def _no_decay(name: str) -> bool:
    return name == "embed" or "norm" in name or name.startswith("b")


def weight_decay_mask(params) -> object:
    """True for parameters that get weight decay: matrices, but not norms, biases or embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not _no_decay(str(getattr(path[-1], "key", path[-1]))), params
    )


def make_optimizer(cfg: TrainConfig, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, masked) after global-norm clipping."""
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=weight_decay_mask(params),
        )
    )
    return optax.chain(*parts), schedule
