"""Pure loss math over arrays. Shapes are in the docstrings; float64 references live in tests."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of `x` where `mask` is nonzero. x, mask: same shape."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over positions where `mask` is nonzero (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask > 0, axis=axis), 1)


def _target_logps_dense(hidden: jax.Array, w_out: jax.Array, targets: jax.Array, soft_cap=None):
    logits = (hidden @ w_out.astype(hidden.dtype)).astype(jnp.float32)
    if soft_cap is not None:  # Gemma 2's final logit soft-cap
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return target_logits - lse, lse


def target_logprobs(
    hidden: jax.Array,
    w_out: jax.Array,
    targets: jax.Array,
    *,
    chunks: int = 1,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token, and the log-partition, without full logits.

    hidden: [..., D]; w_out: [D, V]; targets: [...] int. Returns (logps, lse), each [...] float32.
    `soft_cap`: logits become soft_cap * tanh(logits / soft_cap) first (from the model config's
    `final_logit_softcap`).
    With `chunks > 1` the tokens are processed in that many chunks under `jax.checkpoint`, so at
    most one chunk's [tokens / chunks, V] logits exist at a time, forward and backward.

    Chunks are strided within each row of the leading (batch) axis: chunk i holds tokens i,
    i + chunks, i + 2 chunks, ... of every row (a row's length is padded to a multiple of
    `chunks`). Every chunk so keeps the batch's sharding and each device computes the logits of
    its own tokens only; contiguous blocks of the flattened tokens would each live on a few
    devices, and every device would compute (and all-reduce) every block (issue #26).
    """
    lead = targets.shape
    if chunks <= 1:
        logps, lse = _target_logps_dense(
            hidden.reshape(-1, hidden.shape[-1]), w_out, targets.reshape(-1), soft_cap
        )
        return logps.reshape(lead), lse.reshape(lead)
    rows = lead[0] if len(lead) > 1 else 1
    per_row = math.prod(lead) // rows
    size = -(-per_row // chunks)
    pad = size * chunks - per_row
    h = jnp.pad(hidden.reshape(rows, per_row, -1), ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets.reshape(rows, per_row), ((0, 0), (0, pad)))
    # [rows, size * chunks] -> [chunks, rows, size]: chunk i is every chunks-th token of a row.
    h = h.reshape(rows, size, chunks, -1).transpose(2, 0, 1, 3)
    t = t.reshape(rows, size, chunks).transpose(2, 0, 1)

    def chunk_fn(args):
        h_c, t_c = args
        logps, lse = _target_logps_dense(
            h_c.reshape(rows * size, -1), w_out, t_c.reshape(-1), soft_cap
        )
        return logps.reshape(rows, size), lse.reshape(rows, size)

    logps, lse = jax.lax.map(jax.checkpoint(chunk_fn), (h, t))

    def unchunk(x):  # [chunks, rows, size] -> lead
        return x.transpose(1, 2, 0).reshape(rows, size * chunks)[:, :per_row].reshape(lead)

    return unchunk(logps), unchunk(lse)


def token_cross_entropy_sum(
    hidden: jax.Array,
    w_out: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunks: int = 1,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over masked tokens, and the number of those tokens.

    hidden: [B, T, D]; targets, loss_mask: [B, T]. Returns (loss_sum, num_tokens), scalars. The
    caller divides by the token count of the whole (accumulated) batch. `soft_cap`: as in
    `target_logprobs`.
    """
    logps, lse = target_logprobs(hidden, w_out, targets, chunks=chunks, soft_cap=soft_cap)
    per_token = -logps + z_loss * jnp.square(lse)
    return masked_sum(per_token, loss_mask), jnp.sum(loss_mask > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Preference losses: Bradley-Terry reward models and the DPO family. Formulas: docs/trainers/.

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logprobs(
    hidden: jax.Array,
    w_out: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    chunks: int = 1,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed log-probability of the masked tokens of each sequence, and how many there are.
    `soft_cap`: as in `target_logprobs`.

    hidden: [B, T, D] hidden states of `tokens` [B, T]; mask: [B, T], true on tokens to score
    (completion tokens). Token t is scored from the hidden state at t - 1 (next-token shift), so
    mask[:, 0] is ignored. Returns (logps [B], num_tokens [B]), float32.
    """
    logps, _ = target_logprobs(
        hidden[:, :-1], w_out, tokens[:, 1:], chunks=chunks, soft_cap=soft_cap
    )
    target_mask = mask[:, 1:]
    return masked_sum(logps, target_mask, axis=-1), jnp.sum(target_mask > 0, axis=-1).astype(
        jnp.float32
    )


def segment_sums(x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Sum of `x` over the positions of each segment 1..num_segments of each row (packed rows).

    x: [B, T]; segment_ids: [B, T] int (0: padding, not summed). Returns [B, num_segments].
    """
    rows = jnp.arange(x.shape[0])[:, None]
    sums = jnp.zeros((x.shape[0], num_segments + 1), x.dtype).at[rows, segment_ids].add(x)
    return sums[:, 1:]


def segment_logprobs(
    hidden: jax.Array,
    w_out: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    *,
    chunks: int = 1,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`sequence_logprobs` of packed rows: per segment instead of per row.

    hidden: [B, T, D] of `tokens` [B, T]; mask: [B, T] (completion tokens; 0 on the first token
    of every segment, whose hidden state at t - 1 belongs to the segment before); segment_ids:
    [B, T]. Returns (logps [B, num_segments], num_tokens [B, num_segments]), float32; segment s
    is column s - 1. `soft_cap`: as in `target_logprobs`.
    """
    logps, _ = target_logprobs(
        hidden[:, :-1], w_out, tokens[:, 1:], chunks=chunks, soft_cap=soft_cap
    )
    target_mask = mask[:, 1:] > 0
    target_segments = segment_ids[:, 1:]
    return (
        segment_sums(jnp.where(target_mask, logps, 0.0), target_segments, num_segments),
        segment_sums(target_mask.astype(jnp.float32), target_segments, num_segments),
    )


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO-family losses and implicit rewards. Every input and output is [B].

    With D = (pi_c - pi_r) - (ref_c - ref_r) and eps = label_smoothing:
      sigmoid: -(1 - eps) log s(beta D) - eps log s(-beta D)            (DPO; conservative DPO)
      robust:  [-(1 - eps) log s(beta D) + eps log s(-beta D)] / (1 - 2 eps)
      hinge:   relu(1 - beta D)
      ipo:     (D - 1 / (2 beta))^2   (pass length-normalized log-probs, as in IPO)
    Rewards are beta * (policy_logps - ref_logps), without gradient.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * logits) - eps * jax.nn.log_sigmoid(
            -beta * logits
        )
    elif loss_type == "robust":
        losses = (
            -(1 - eps) * jax.nn.log_sigmoid(beta * logits)
            + eps * jax.nn.log_sigmoid(-beta * logits)
        ) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = jnp.square(logits - 1 / (2 * beta))
    else:
        known = ", ".join(DPO_LOSS_TYPES)
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (known: {known})")
    chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
    rejected_rewards = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps: jax.Array,
    rejected_avg_logps: jax.Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Reference-free SimPO loss per pair [B] from length-averaged log-probs [B]:
    -(1 - eps) log s(beta (avg_c - avg_r) - gamma) - eps log s(-(beta (avg_c - avg_r) - gamma)).
    """
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def log_odds(avg_logps: jax.Array) -> jax.Array:
    """log(p / (1 - p)) for p = exp(avg_logps) < 1, as avg_logps - log(-expm1(avg_logps)). [B]"""
    return avg_logps - jnp.log(-jnp.expm1(avg_logps))


def orpo_loss(
    chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, lam: float
) -> jax.Array:
    """ORPO loss per pair [B] from length-averaged log-probs [B]: the chosen answer's per-token
    NLL plus the odds-ratio term, -avg_c - lam * log s(log_odds(avg_c) - log_odds(avg_r))."""
    ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    return -chosen_avg_logps - lam * jax.nn.log_sigmoid(ratio)


def reward_model_pair_losses(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> jax.Array:
    """Bradley-Terry loss of each pair [B]:
    -log s(r_c - r_r - margin) + center_coef * (r_c + r_r)^2."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff) + center_coef * jnp.square(chosen_rewards + rejected_rewards)


def reward_model_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> jax.Array:
    """Scalar reward-model loss over [B] pairs:
    mean(-log s(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)."""
    return jnp.mean(
        reward_model_pair_losses(
            chosen_rewards, rejected_rewards, margin=margin, center_coef=center_coef
        )
    )
