"""A reward model: a backbone of the configured model family plus a scalar head on the last real
token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.models.params import param
from jaxalign.models.registry import build


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of the last real (segment id > 0) position of each row, [B, T] -> [B] int32.

    Correct for right padding, left padding or none; a row with no real token gives 0.
    """
    positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids > 0, positions, 0), axis=-1)


def segment_last_index(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Index of the last position of each segment 1..num_segments of each row (packed rows),
    [B, T] -> [B, num_segments] int32; a segment absent from a row gives 0."""
    rows = jnp.arange(segment_ids.shape[0])[:, None]
    positions = jnp.broadcast_to(
        jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape
    )
    last = jnp.zeros((segment_ids.shape[0], num_segments + 1), jnp.int32)
    return last.at[rows, segment_ids].max(positions)[:, 1:]


class RewardModel(nnx.Module):
    """`backbone` (`cfg.family`'s module, loadable from a policy checkpoint) and `score`, a [D]
    head.

    reward = <final hidden state of the last real token, score>, in float32.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.backbone = build(cfg, rngs)
        std = cfg.initializer_range
        value = std * jax.random.normal(rngs.params(), (cfg.hidden_size,), jnp.float32)
        self.score = param(value.astype(jnp.dtype(cfg.param_dtype)), ("embed",))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """tokens, positions, segment_ids: [B, T] (segment id 0 = padding) -> rewards [B]."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        hidden = self.backbone(tokens, positions, segment_ids)  # [B, T, D]
        last = last_token_index(segment_ids)
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return final.astype(jnp.float32) @ self.score[...].astype(jnp.float32)

    def segment_rewards(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        num_segments: int,
    ) -> jax.Array:
        """Rewards of every segment of packed rows: tokens, positions, segment_ids [B, T] ->
        [B, num_segments] (segment s at column s - 1; read at its last token)."""
        hidden = self.backbone(tokens, positions, segment_ids)  # [B, T, D]
        last = segment_last_index(segment_ids, num_segments)
        final = jnp.take_along_axis(hidden, last[..., None], axis=1)  # [B, S, D]
        return final.astype(jnp.float32) @ self.score[...].astype(jnp.float32)
