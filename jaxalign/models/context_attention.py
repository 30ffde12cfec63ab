"""Context parallelism: self-attention over rows whose tokens are split across devices.

With `mesh.context` C > 1 the activation rules map the `length` logical axis to the `context`
mesh axis, so every activation of a [B, T, ...] row holds T / C tokens per device. Everything but
attention is per token and needs nothing more. Attention runs here, as one function per device
under `jax.shard_map` over the whole mesh (the batch and query heads stay split as the rules
split them; only the `length` axes are collective):

- ring: K/V blocks, with their tokens' sequence indices and segment ids, pass around the context
  axis with `jax.lax.ppermute`; each device folds every block into its queries' online softmax
  (running max, normalizer and output, float32). One remote block in memory at a time.
- allgather: each device gathers the row's K/V (and indices and segment ids) at once, then folds
  the blocks in the same way. Fewer, larger transfers; C blocks in memory.

Masks come from the tokens' true sequence indices and segment ids, carried with every block:
causal (key index <= query index), within a segment (packing), sliding windows, soft-capped
scores and grouped-query heads work for any placement of tokens on devices. Each device's queries
and each key block are cut in two halves, and a (query half, key half) pair whose indices show it
fully masked (every key after every query, or before every query's window) is skipped with
`lax.cond`: the upper triangle is never computed. The block update is rematerialized in the
backward pass (flash attention's trade: scores are recomputed, never stored).

Causal attention over contiguous chunks would leave device 0 almost idle and device C-1 with the
most work. `Transformer.forward` therefore lays each row out in zig-zag order before the first
layer: the row is cut in 2C chunks and device i holds chunks i and 2C-1-i (`to_zigzag`), so
every device does the same work; RoPE gets the permuted true positions, and the final hidden
states are put back in order (`from_zigzag`) before the loss, which then counts every token once
whatever the layout. Prefill with a KV cache keeps the natural order (the cache's slots are the
sequence's); decoding reads a cache sharded over `context` through the compiler's partitioning.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd

METHODS = ("ring", "allgather")

# Each device's queries and each key block are cut in this many pieces for causal skipping: with
# the zig-zag layout, two halves make every ring step skip exactly the fully masked half.
SUB_BLOCKS = 2


def _rule_axes(rules: dict, name: str, used: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(a for a in rules.get(name, ()) if a not in used)


def context_axes() -> tuple[tuple[str, ...], int]:
    """The mesh axes a row's `length` is split over inside `sharding.activation_sharding`, and
    their total size: ((), 1) outside one, or where the rules leave `length` whole."""
    active = shd.active_sharding()
    if active is None:
        return (), 1
    mesh, rules = active
    table = shd.activation_table(rules)
    axes = _rule_axes(table, "length", _rule_axes(table, "batch"))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return axes, math.prod(mesh.shape[a] for a in axes)


def context_size() -> int:
    """How many devices share a row's tokens (1: no context parallelism)."""
    return context_axes()[1]


def check_length(length: int, context: int) -> None:
    """ValueError (one line) unless `length` tokens split into the zig-zag layout's 2 x `context`
    chunks."""
    if length % (2 * context):
        raise ValueError(
            f"context parallelism: a row of {length} tokens does not divide into 2 x the context "
            f"axis ({context}) chunks; pad rows to a multiple of {2 * context} (train.seq_len, "
            "rl.response_buckets)"
        )


def zigzag_order(length: int, context: int) -> np.ndarray:
    """[length] int32: the original sequence index of each position of the zig-zag layout (the
    row cut in 2C chunks; device i holds chunks i and 2C - 1 - i)."""
    check_length(length, context)
    chunk = length // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def to_zigzag(x: jax.Array, context: int) -> jax.Array:
    """x [B, T, ...] in sequence order -> zig-zag order along T (`zigzag_order`). Written as a
    reshape and a reversal of chunks, which the compiler turns into point-to-point transfers
    between devices."""
    b, t = x.shape[:2]
    check_length(t, context)
    chunks = x.reshape(b, 2 * context, t // (2 * context), *x.shape[2:])
    first, second = chunks[:, :context], jnp.flip(chunks[:, context:], axis=1)
    return jnp.stack([first, second], axis=2).reshape(x.shape)


def from_zigzag(x: jax.Array, context: int) -> jax.Array:
    """The inverse of `to_zigzag`: x [B, T, ...] in zig-zag order -> sequence order."""
    b, t = x.shape[:2]
    pairs = x.reshape(b, context, 2, t // (2 * context), *x.shape[2:])
    first, second = pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)
    return jnp.concatenate([first, second], axis=1).reshape(x.shape)


def _cap(scores: jax.Array, head_dim: int, soft_cap, scale) -> jax.Array:
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    return scores


def _block_update(carry, q, k, v, q_seg, k_seg, q_idx, k_idx, window, soft_cap, scale):
    """One key block folded into the queries' online softmax. q: [b, tq, KV, G, hd]; k, v:
    [b, tk, KV, hd]; segment ids and indices [b, tq] / [b, tk]; carry: (max [b, KV, G, tq],
    normalizer [b, KV, G, tq], output [b, KV, G, tq, hd]), float32."""
    m, norm, acc = carry
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = _cap(scores, q.shape[-1], soft_cap, scale)
    mask = (k_idx[:, None, :] <= q_idx[:, :, None]) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window is not None:
        mask &= k_idx[:, None, :] > q_idx[:, :, None] - window
    mask = mask[:, None, None]  # [b, 1, 1, tq, tk]
    low = jnp.finfo(jnp.float32).min
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, scores, low), axis=-1))
    # Masked scores go to exp(low) = 0 inside the exp (outside it, a row with nothing seen yet
    # would be exp(s - low) = inf there, and its gradient 0 * inf = NaN).
    p = jnp.exp(jnp.where(mask, scores - m_new[..., None], low))
    correction = jnp.exp(m - m_new)
    norm = norm * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, norm, acc * correction[..., None] + pv


def _visible(q_idx, k_idx, window) -> jax.Array:
    """Whether any key of a block may be seen by any query (indices alone; segments aside)."""
    seen = jnp.min(k_idx) <= jnp.max(q_idx)
    if window is not None:
        seen &= jnp.max(k_idx) > jnp.min(q_idx) - window
    return seen


def _split(x: jax.Array, n: int) -> list[jax.Array]:
    return jnp.split(x, n, axis=1) if n > 1 else [x]


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    index: jax.Array,
    *,
    axes: tuple[str, ...],
    size: int,
    method: str = "ring",
    window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """One device's part of context-parallel attention, inside `shard_map` over `axes` (of total
    size `size`). q: [b, t, H, hd]; k, v: [b, t, KV, hd]; segment_ids, index: [b, t] int (the
    tokens' segment ids, 0 = padding, and true sequence indices). Returns [b, t, H, hd], q's dtype.
    """
    if method not in METHODS:
        raise ValueError(f"context attention: unknown method {method!r} (known: {METHODS})")
    b, t, h, hd = q.shape
    kv = k.shape[2]
    g = h // kv
    n = SUB_BLOCKS if t % SUB_BLOCKS == 0 else 1
    queries = list(
        zip(
            _split(q.reshape(b, t, kv, g, hd), n),
            _split(segment_ids, n),
            _split(index, n),
        )
    )
    tq = t // n
    low = jnp.finfo(jnp.float32).min
    carries = [
        (
            jnp.full((b, kv, g, tq), low, jnp.float32),
            jnp.zeros((b, kv, g, tq), jnp.float32),
            jnp.zeros((b, kv, g, tq, hd), jnp.float32),
        )
        for _ in range(n)
    ]
    update = jax.checkpoint(
        functools.partial(_block_update, window=window, soft_cap=soft_cap, scale=scale)
    )

    def absorb(carries, block):
        carries = list(carries)
        out = []
        for carry, (qb, qs, qi) in zip(carries, queries):
            for kb, vb, ks, ki in zip(*(_split(x, n) for x in block)):
                carry = jax.lax.cond(
                    _visible(qi, ki, window),
                    lambda c, kb=kb, vb=vb, ks=ks, ki=ki, qb=qb, qs=qs, qi=qi: update(
                        c, qb, kb, vb, qs, ks, qi, ki
                    ),
                    lambda c: c,
                    carry,
                )
            out.append(carry)
        return out

    block = (k, v, segment_ids, index)
    # The steps run as a loop (one compiled body, whatever the context size), the last one apart.
    if method == "allgather":
        gathered = [jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in block]

        def source(i):
            return [jax.lax.dynamic_slice_in_dim(x, i * t, t, axis=1) for x in gathered]

        carries = jax.lax.fori_loop(
            0, size - 1, lambda i, carries: absorb(carries, source(i)), carries
        )
        carries = absorb(carries, source(size - 1))
    else:
        perm = [(i, (i + 1) % size) for i in range(size)]

        def step(_, state):
            carries, block = state
            # The next block travels while this one is folded in.
            arriving = tuple(jax.lax.ppermute(x, axes, perm) for x in block)
            return absorb(carries, block), arriving

        carries, block = jax.lax.fori_loop(0, size - 1, step, (carries, block))
        carries = absorb(carries, block)
    outs = []
    for _, norm, acc in carries:
        o = jnp.where(norm[..., None] > 0, acc / jnp.maximum(norm, 1e-30)[..., None], 0.0)
        outs.append(o.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, hd))
    return jnp.concatenate(outs, axis=1).astype(q.dtype)


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    index: jax.Array,
    *,
    method: str = "ring",
    window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Self-attention of rows split over the context axes of the enclosing
    `sharding.activation_sharding`, in any token layout.

    q: [B, T, H, hd]; k, v: [B, T, KV, hd]; segment_ids [B, T] (0 = padding; tokens attend within
    their segment); index [B, T] int: each token's true sequence index (causal: key index <= query
    index; with `window` W, also key index > query index - W). Scores are q.k * `scale` (default
    hd**-0.5), then soft-capped by `soft_cap`. `method`: "ring" or "allgather" (module docstring).
    Returns [B, T, H, hd] in q's dtype, laid out as q.
    """
    active = shd.active_sharding()
    if active is None:
        raise ValueError("context_attention runs inside sharding.activation_sharding(mesh, rules)")
    mesh, rules = active
    table = shd.activation_table(rules)
    b, t, h, hd = q.shape
    axes, size = context_axes()
    if t % size:
        raise ValueError(f"context attention: {t} tokens do not divide by the context axes {size}")

    def divides(names, dim):
        return names if dim % math.prod(mesh.shape[a] for a in names) == 0 else ()

    batch = divides(_rule_axes(table, "batch"), b)
    heads = divides(_rule_axes(table, "heads", batch + axes), h)
    shards = math.prod(mesh.shape[a] for a in heads)
    # A device's query heads must find their K/V heads on it: K/V heads are split like the query
    # heads, repeated (the fewest times) where there are fewer K/V heads than head shards.
    kv, group = k.shape[2], h // k.shape[2]
    repeat = next(r for r in range(1, group + 1) if group % r == 0 and (kv * r) % shards == 0)
    if repeat > 1:
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    length = axes or None
    spec = P(batch or None, length, heads or None, None)
    rows = P(batch or None, length)
    local = functools.partial(
        local_attention,
        axes=axes,
        size=size,
        method=method,
        window=window,
        soft_cap=soft_cap,
        scale=scale,
    )
    window_spec = () if window is None or isinstance(window, int) else (P(),)

    def run(q, k, v, segment_ids, index, *w):
        if w:
            return functools.partial(local, window=w[0])(q, k, v, segment_ids, index)
        return local(q, k, v, segment_ids, index)

    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, rows, rows, *window_spec),
        out_specs=spec,
        check_vma=False,  # the skipped blocks' carries (lax.cond) are not marked device-varying
    )(
        q,
        k,
        v,
        segment_ids.astype(jnp.int32),
        index.astype(jnp.int32),
        *((window,) if window_spec else ()),
    )
