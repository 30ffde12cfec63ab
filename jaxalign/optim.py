"""Optimizer: AdamW with warmup and decay, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxalign.config import Config, TrainConfig
from jaxalign.errors import ConfigError


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


def _adamw(cfg: TrainConfig, schedule: optax.Schedule, params) -> list:
    """AdamW (decoupled weight decay, masked) as a list of transformations."""
    return [
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,  # a function: under `train.freeze` it sees the trained part
        )
    ]


def clip_by_global_norm_per_role(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` applied to each top-level entry of the update dict on its own
    (PPO: the policy's and the value model's norms). Stateless."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        return {role: clip.update(u, optax.EmptyState())[0] for role, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_role(role: str, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of `updates[role]` by `factor` (the others unchanged). Stateless."""

    def update(updates, state, params=None):
        out = dict(updates)
        out[role] = jax.tree.map(lambda u: u * factor, updates[role])
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def param_path(path) -> str:
    """A parameter's '/'-joined path in the parameter dict, as `train.freeze` matches it:
    'embed', 'blocks/0/attn/wq' (PPO: 'policy/embed', 'value/score')."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def frozen_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate on `param_path` strings: whether any of `patterns` (regular expressions,
    searched) matches."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"train.freeze: {pattern!r} is not a regular expression: {e}") from e
    return lambda path: any(c.search(path) for c in compiled)


def freeze_labels(
    patterns: Sequence[str], params, trainable: Callable[[str], bool] | None = None
) -> object:
    """'frozen' or 'trained' per leaf of `params`: frozen where a pattern matches, or where
    `trainable` (LoRA's: the adapters and what trains beside them) says no. Every pattern must
    match some parameter and some parameter must stay trained (a ConfigError names the pattern
    otherwise)."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in patterns:
        if not any(frozen_matcher([pattern])(path) for path in paths):
            shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ConfigError(f"train.freeze: {pattern!r} matches no parameter (paths: {shown})")
    matched = frozen_matcher(patterns)

    def is_frozen(path: str) -> bool:
        return matched(path) or (trainable is not None and not trainable(path))

    if all(is_frozen(path) for path in paths):
        raise ConfigError(f"train.freeze: {list(patterns)} freezes every parameter")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if is_frozen(param_path(path)) else "trained", params
    )


def freeze_patterns(cfg: Config) -> list[str]:
    """`train.freeze` and what the trainer freezes on its own: parameters it holds but no loss
    reads (`Algorithm.unused_params`, e.g. the untied LM head of a reward model)."""
    from jaxalign.trainers.registry import get_trainer

    return [*cfg.train.freeze, *get_trainer(cfg.trainer).unused_params(cfg)]


def trained_part(tree, labels):
    """The leaves of `tree` (a nested dict: parameters, their shardings, ...) that `labels`
    marks 'trained', as a nested dict without the others (empty dicts dropped); `tree` itself
    when `labels` is None (nothing frozen)."""
    if labels is None:
        return tree
    if isinstance(labels, dict):
        out = {}
        for key, sub in labels.items():
            part = trained_part(tree[key], sub)
            if part is not None:
                out[key] = part
        return out or None
    return tree if labels == "trained" else None


def with_trained(tree, trained):
    """`tree` with the leaves of `trained` (a `trained_part` of it) put in place; keys that
    `tree` lacks (adapters onto a base tree) are added."""
    if isinstance(trained, dict) and isinstance(tree, dict):
        return {**tree, **{key: with_trained(tree.get(key), sub) for key, sub in trained.items()}}
    return trained


def trained_labels(cfg: Config, params) -> object | None:
    """`freeze_labels` for a run (`freeze_patterns(cfg)`, and with `model.lora` everything but
    the adapters, `model.lora.train` and what the trainer trains beside them), or None when
    every parameter trains."""
    from jaxalign.trainers.registry import get_trainer

    trainable = None
    if cfg.model.lora is not None:
        from jaxalign.models.lora import trainable as lora_trainable

        trainable = lora_trainable(cfg.model.lora, get_trainer(cfg.trainer).lora_trained(cfg))
    patterns = freeze_patterns(cfg)
    if not patterns and trainable is None:
        return None
    return freeze_labels(patterns, params, trainable)


def make_optimizer(
    cfg: TrainConfig, params, freeze: Sequence[str] | None = None, labels=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`_make_optimizer` for the trained part of `params`: the tx updates and keeps state for
    `trained_part(params, labels)` only (labels default: `freeze_labels` of `freeze`, default
    `cfg.freeze`). Frozen parameters get no gradient, no update and no optimizer state."""
    if labels is None:
        freeze = cfg.freeze if freeze is None else freeze
        labels = freeze_labels(freeze, params) if freeze else None
    return _make_optimizer(cfg, trained_part(params, labels))


def _make_optimizer(
    cfg: TrainConfig, params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, masked) after global-norm clipping; returns it and the
    (policy's) schedule.

    With `cfg.value_lr` (PPO: `params` is `{"policy": ..., "value": ...}`), the policy and the
    value model are optimized as by two separate optimizers: each gets its own global-norm clip,
    and the value model's AdamW updates are scaled by `value_lr / lr`. AdamW is elementwise and
    its update is linear in the learning rate, so this is exactly AdamW at `value_lr` with the
    same warmup and decay shape, while the optimizer state keeps the layout of one AdamW (the
    loop's sharding of the state and checkpoints are unchanged).
    """
    schedule = learning_rate_schedule(cfg)
    if cfg.critic_warmup_steps:
        return _critic_warmup_optimizer(cfg, schedule, params)
    if cfg.value_lr is None:
        parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
        return optax.chain(*parts, *_adamw(cfg, schedule, params)), schedule
    _check_actor_critic(cfg, params, "train.value_lr")
    if cfg.value_lr <= 0:
        raise ConfigError(f"train.value_lr must be positive, got {cfg.value_lr}")
    parts = [clip_by_global_norm_per_role(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts += _adamw(cfg, schedule, params)
    parts.append(scale_role("value", cfg.value_lr / cfg.lr))
    return optax.chain(*parts), schedule


def _check_actor_critic(cfg: TrainConfig, params, key: str) -> None:
    if not (isinstance(params, dict) and set(params) == {"policy", "value"}):
        raise ConfigError(f"{key} needs a model with a value model (trainer: ppo)")


def _critic_warmup_optimizer(
    cfg: TrainConfig, schedule: optax.Schedule, params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`train.critic_warmup_steps` N: two optimizers, each with its own global-norm clip and
    AdamW. The value model's runs from step 0 at `value_lr` (or `lr`) on the usual schedule. The
    policy's sees no update and keeps its state untouched for N steps
    (`optax.transforms.conditionally_mask`), so its AdamW step count, bias correction and
    learning-rate schedule start at step N as from a fresh start; the returned schedule (the
    logged `lr`) is the policy's: 0 during the warmup, then the schedule shifted by N."""
    _check_actor_critic(cfg, params, "train.critic_warmup_steps")
    warmup = cfg.critic_warmup_steps
    if warmup < 0:
        raise ConfigError(f"train.critic_warmup_steps must be >= 0, got {warmup}")
    value_lr = cfg.lr if cfg.value_lr is None else cfg.value_lr
    if value_lr <= 0:
        raise ConfigError(f"train.value_lr must be positive, got {value_lr}")

    def role(lr_schedule):
        clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
        return optax.chain(*clip, *_adamw(cfg, lr_schedule, params))

    policy = optax.transforms.conditionally_mask(role(schedule), lambda step: step >= warmup)
    value = role(lambda step: schedule(step) * (value_lr / cfg.lr))
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    tx = optax.multi_transform({"policy": policy, "value": value}, labels)

    def policy_schedule(step):
        return jnp.where(step >= warmup, schedule(jnp.maximum(step - warmup, 0)), 0.0)

    return tx, policy_schedule
