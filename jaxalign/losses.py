"""Pure loss math over arrays. Shapes are in the docstrings; float64 references live in tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of `x` where `mask` is nonzero. x, mask: same shape."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over positions where `mask` is nonzero (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask > 0, axis=axis), 1)


def _target_logps_dense(hidden: jax.Array, w_out: jax.Array, targets: jax.Array):
    logits = (hidden @ w_out.astype(hidden.dtype)).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return target_logits - lse, lse


def target_logprobs(
    hidden: jax.Array, w_out: jax.Array, targets: jax.Array, *, chunks: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token, and the log-partition, without full logits.

    hidden: [..., D]; w_out: [D, V]; targets: [...] int. Returns (logps, lse), each [...] float32.
    With `chunks > 1` the tokens are processed in that many chunks under `jax.checkpoint`, so at
    most one chunk's [tokens / chunks, V] logits exist at a time, forward and backward.
    """
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n = t.shape[0]
    if chunks <= 1:
        logps, lse = _target_logps_dense(h, w_out, t)
        return logps.reshape(lead), lse.reshape(lead)
    size = -(-n // chunks)
    pad = size * chunks - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(chunks, size, -1)
    t = jnp.pad(t, (0, pad)).reshape(chunks, size)
    chunk_fn = jax.checkpoint(lambda args: _target_logps_dense(args[0], w_out, args[1]))
    logps, lse = jax.lax.map(chunk_fn, (h, t))
    return logps.reshape(-1)[:n].reshape(lead), lse.reshape(-1)[:n].reshape(lead)


def token_cross_entropy_sum(
    hidden: jax.Array,
    w_out: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunks: int = 1,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over masked tokens, and the number of those tokens.

    hidden: [B, T, D]; targets, loss_mask: [B, T]. Returns (loss_sum, num_tokens), scalars. The
    caller divides by the token count of the whole (accumulated) batch.
    """
    logps, lse = target_logprobs(hidden, w_out, targets, chunks=chunks)
    per_token = -logps + z_loss * jnp.square(lse)
    return masked_sum(per_token, loss_mask), jnp.sum(loss_mask > 0).astype(jnp.float32)
