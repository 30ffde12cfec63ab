"""RL rows: a rollout's sequences as training rows ([prompt, left padded | response]), the
response tokens' log-probs, entropies and values on them (the same functions in the rollout's
forwards and in the losses), and packing several sequences into one row (`rl.pack_rows`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import Config
from jaxalign.models.llama import Transformer
from jaxalign.rl import entropy_from_logits

# ---------------------------------------------------------------------------------------------
# The row layout and the response tokens' log-probs (the same functions in rollout and loss).


def prompt_width(batch: dict) -> int:
    """P of rows [B, P + N] whose response mask is [B, N] (static: read from the shapes, so one
    function serves every trimmed width; see `response_width`)."""
    return batch["tokens"].shape[-1] - batch["mask"].shape[-1]


def response_width(longest: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (sorted; the last is sampling.max_new_tokens) that fits the
    longest response of a rollout."""
    return next(b for b in buckets if b >= longest)


def response_buckets(cfg: Config) -> list[int]:
    """rl.response_buckets, sorted, capped at and ending with sampling.max_new_tokens; by
    default 16, 32, 64, ... below it."""
    n = cfg.sampling.max_new_tokens
    given = cfg.rl.response_buckets
    if given is None:
        given = [16 << k for k in range(max(n.bit_length() - 4, 0))]
    return sorted({b for b in given if b < n} | {n})


def response_logprobs(
    policy: Transformer,
    batch: dict,
    temperature: float,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs [B, N] of the response tokens and the policy's entropy at each of them.

    batch: tokens, positions, segment_ids [B, P + N] (prompt left-padded to P, response from P
    on) and the response mask [B, N]. Token P + t is scored from the hidden state at P + t - 1,
    with logits divided by `temperature` (the distribution the rollout sampled from). Packed
    rows (see `at_response`): [S, N] per slot, the logits computed at whichever is fewer, the
    slots' response positions or the rows' positions.
    """
    tokens = batch["tokens"]
    hidden = policy(tokens, batch["positions"], batch["segment_ids"])
    rows, width = tokens.shape
    slots, n = batch["mask"].shape
    if rows * width < slots * n:
        # Packed rows (rl.pack_rows): the row positions are fewer than the slots' response
        # positions, so score every position of the rows (position p predicts token p + 1)
        # and gather the response tokens' scores from there.
        targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        token_logp, entropy = _scores(policy, hidden, targets, temperature, with_entropy)
        token_logp = at_response(batch, token_logp)
        entropy = at_response(batch, entropy) if with_entropy else None
        return token_logp, entropy
    targets = at_response(batch, tokens, shift=1)
    return _scores(policy, at_response(batch, hidden), targets, temperature, with_entropy)


def _scores(policy, hidden, targets, temperature, with_entropy):
    """Log-probs of `targets` [..] under the logits of `hidden` [.., D] / temperature, and the
    entropy there (or None)."""
    logits = policy.logits(hidden).astype(jnp.float32) / temperature  # [.., V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = entropy_from_logits(logits) if with_entropy else None
    return token_logp, entropy


def response_values(model, batch: dict) -> jax.Array:
    """An ActorCritic's values [B, N]: V of the state before each response token (read at the
    same position as that token's logits); batch as for `response_logprobs`."""
    values = model.values(batch["tokens"], batch["positions"], batch["segment_ids"])
    return at_response(batch, values)


def at_response(batch: dict, array: jax.Array, shift: int = 0) -> jax.Array:
    """`array` [B, W, ...] (per row position) at the position scoring each response token
    (`shift` 1: at the token itself) -> [S, N, ...], S response rows (slots).

    Plain rows (S = B): response token t sits at P + t and is scored from P + t - 1. Packed rows
    (`rl.pack_rows`; see `pack_micro_batch`): each row holds up to K = S / B sequences and
    `response_index` [S, N] names, per slot, the row position scoring each response token; the
    gather stays within each row, so it is local to the row's shard."""
    n = batch["mask"].shape[-1]
    if "response_index" not in batch:
        width = prompt_width(batch)
        return array[:, width - 1 + shift : width - 1 + shift + n]
    index = batch["response_index"] + shift
    rows = array.shape[0]
    slots = index.shape[0]
    flat = index.reshape((rows, (slots // rows) * n) + (1,) * (array.ndim - 2))
    picked = jnp.take_along_axis(array, flat, axis=1)
    return picked.reshape((slots, n) + array.shape[2:])


# ---------------------------------------------------------------------------------------------
# Packing several sequences into one row (rl.pack_rows).


def pack_plan(lengths: np.ndarray, width: int, per_row: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most `per_row` sequences
    whose lengths sum to at most `width` (every length is <= width)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        ln = int(lengths[i])
        for r, free in enumerate(room):
            if free >= ln and len(rows[r]) < per_row:
                rows[r].append(i)
                room[r] -= ln
                break
        else:
            rows.append([i])
            room.append(width - ln)
    return rows


def packed_row_count(needed: int, devices: int, plain_rows: int) -> int:
    """Packed rows for `needed` rows of a pack plan: rounded up to a multiple of 8 and of the
    `devices` they are split over (few distinct shapes, so few compilations), never more than
    the `plain_rows` they replace (a multiple of `devices` too)."""
    step = math.lcm(8, devices)
    return min(-(-needed // step) * step, plain_rows)


ROW_KEYS = ("tokens", "positions", "segment_ids")


def sequence_spans(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the real tokens (prompt + response) of plain rollout rows [R, W]."""
    real = segment_ids > 0
    return real.argmax(axis=-1), real.sum(axis=-1)


def pack_micro_batch(
    micro: dict[str, np.ndarray], plan: list[list[int]], rows: int, per_row: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Plain rollout rows (tokens, positions, segment_ids [L, P + N]; per response token arrays
    [L, N]) -> `rows` packed rows [rows, P + N] (sequence j of a row is segment j + 1, its
    positions its own) and `rows * per_row` response slots [S, N] in row order (slot
    r * per_row + j is sequence j of row r; empty slots are all zero, mask included), plus
    `response_index` [S, N]: the packed row position scoring each response token."""
    tokens = micro["tokens"]
    width = tokens.shape[-1]
    n = micro["mask"].shape[-1]
    start, length = sequence_spans(micro["segment_ids"])
    out = {
        "tokens": np.full((rows, width), pad_id, tokens.dtype),
        "positions": np.zeros((rows, width), micro["positions"].dtype),
        "segment_ids": np.zeros((rows, width), micro["segment_ids"].dtype),
    }
    slot_keys = [k for k in micro if k not in ROW_KEYS]
    for k in slot_keys:
        out[k] = np.zeros((rows * per_row,) + micro[k].shape[1:], micro[k].dtype)
    index = np.zeros((rows * per_row, n), np.int32)
    t = np.arange(n)
    for r, seqs in enumerate(plan):
        offset = 0
        for j, i in enumerate(seqs):
            s0, ln = int(start[i]), int(length[i])
            for k in ROW_KEYS:
                out[k][r, offset : offset + ln] = micro[k][i, s0 : s0 + ln]
            out["segment_ids"][r, offset : offset + ln] = j + 1
            slot = r * per_row + j
            for k in slot_keys:
                out[k][slot] = micro[k][i]
            # Response token t is at plain column P + t, scored from P + t - 1.
            at = offset + (width - n) - s0 - 1 + t
            index[slot] = np.where(micro["mask"][i] > 0, at, 0)
            offset += ln
    out["response_index"] = index
    return out


# ---------------------------------------------------------------------------------------------
# Rows from a rollout's prompts and responses.


def build_rows(
    prompt_tokens: np.ndarray,
    prompt_lengths: np.ndarray,
    response: np.ndarray,
    response_lengths: np.ndarray,
    prompt_width: int,
    pad_id: int,
) -> dict:
    """Training rows [R, P + N] from left-padded prompts [R, L] (L <= P) and responses [R, N]:
    tokens, positions (0 at each row's first real token), segment_ids (1 on real tokens) and
    the response mask [R, N] (float32, 1 up to and including the stop token)."""
    r, width = prompt_tokens.shape
    n = response.shape[1]
    tokens = np.full((r, prompt_width + n), pad_id, np.int32)
    tokens[:, prompt_width - width : prompt_width] = prompt_tokens
    tokens[:, prompt_width:] = response
    idx = np.arange(prompt_width + n)
    start = prompt_width - prompt_lengths[:, None]
    end = prompt_width + response_lengths[:, None]
    real = (idx[None] >= start) & (idx[None] < end)
    positions = np.where(real, idx[None] - start, 0).astype(np.int32)
    mask = (np.arange(n)[None] < response_lengths[:, None]).astype(np.float32)
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": real.astype(np.int32),
        "mask": mask,
    }
