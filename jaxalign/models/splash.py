"""Splash attention: training and prefill self-attention as one Pallas TPU kernel.

`model.attention_kernel: splash` (what `auto` picks on TPU) sends `llama.causal_attention` here.
The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) is flash attention that reads its
mask block by block: blocks above the diagonal, and left of a sliding window, are never loaded or
computed, and the [T, T] scores never reach HBM. Packing is the kernel's segment ids; grouped-query
heads are its grouped path (query head h reads K/V head h // (H / KV); dK and dV are summed over
the group inside the kernel), so K/V heads are never repeated in memory.

Pallas kernels are not partitioned by XLA: inside `sharding.activation_sharding` (the train step,
generation, the Hugging Face forward) the kernel runs under `jax.shard_map`, one call per device
on its rows of the batch and its query heads, as the activation rules shard them. Off TPU it runs
in Pallas interpret mode: the same kernel code as plain XLA, exact but slow, for tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd

# The kernel tiles queries and keys in blocks that are multiples of the TPU's 128 lanes.
LANES = 128
# Block sizes tried, largest first. 512 is MaxText's default for v5e/v5p (`sa_block_*`): a block
# pair is 2 x 512 x head_dim inputs plus 512 x 512 f32 scores, well inside VMEM, and large blocks
# mean few grid steps. Shorter sequences take the largest that divides them.
BLOCKS = (512, 256, 128)


def splash_block_size(seq_len: int) -> int:
    """The query and key block (forward and backward kernels) for a sequence of `seq_len`
    positions, a multiple of 128: the largest of BLOCKS that divides it."""
    if seq_len % LANES:
        raise ValueError(f"splash attention: sequence length {seq_len} is not a multiple of 128")
    return next(b for b in BLOCKS if seq_len % b == 0)


def make_kernel(
    heads: int,
    seq_len: int,
    block: int,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
) -> kernels.SplashAttentionKernel:
    """The splash kernel for `heads` query heads over `seq_len` positions: causal, or with
    `sliding_window` W keys at index > query index - W; `soft_cap` C turns scores s into
    C * tanh(s / C) before the softmax. Called as kernel(q [H, T, hd], k, v [KV, T, hd],
    SegmentIds) -> [H, T, hd]; scores are q . k unscaled."""
    shape = (seq_len, seq_len)
    if sliding_window is None:
        mask = masks.CausalMask(shape)
    else:  # key index in [query index - (W - 1), query index]: causal and windowed
        mask = masks.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    sizes = kernels.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernels.make_splash_mha(
        masks.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        head_shards=1,  # each shard_map call builds the kernel for its own heads
        q_seq_shards=1,
        attn_logits_soft_cap=soft_cap,
        interpret=interpret,
    )


def _mesh_axes(rules: dict, name: str, size: int, mesh, used: tuple[str, ...] = ()) -> tuple:
    """The mesh axes the activation rule `name` shards a dimension of `size` over, or () where
    they do not divide it (as `sharding.constrain` leaves such a dimension alone)."""
    axes = tuple(a for a in rules.get(name, ()) if a not in used)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def splash_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`llama.blocked_causal_attention`'s result through the splash kernel.

    q: [B, T, H, hd]; k, v: [B, T, KV, hd]; segment_ids [B, T] (0 = padding; tokens attend
    within their segment); keys at index > query index - sliding_window; scores scaled by
    1/sqrt(hd), then soft-capped by `soft_cap`. Returns [B, T, H, hd] in q's dtype.

    T is padded to a multiple of 128 with padding segment ids at the end (causal: no real query
    sees them) and the result sliced back. `block`: the kernel's block (default
    `splash_block_size` of the padded length). `interpret`: Pallas interpret mode (default: unless
    the enclosing mesh's devices, or JAX's default backend without one, are TPUs).
    """
    b, t, h, hd = q.shape
    padded = -(-t // LANES) * LANES
    block = block or splash_block_size(padded)
    if block % LANES or padded % block:
        raise ValueError(f"splash attention: block {block} must be a multiple of 128 dividing T")
    active = shd.active_sharding()
    if interpret is None:
        platform = active[0].devices.flat[0].platform if active else jax.default_backend()
        interpret = platform != "tpu"

    def heads_major(x: jax.Array) -> jax.Array:  # [B, T, N, hd] -> [B, N, padded, hd]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    # Scaled in f32 and rounded once (a bf16 1/sqrt(hd) would add its own rounding error).
    q = heads_major((q.astype(jnp.float32) / math.sqrt(hd)).astype(q.dtype))
    k, v = heads_major(k), heads_major(v)
    segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)))

    def attend_local(q, k, v, segments):
        kernel = make_kernel(q.shape[1], padded, block, sliding_window, soft_cap, interpret)
        return jax.vmap(kernel)(q, k, v, kernels.SegmentIds(segments, segments))

    if active is None:
        out = attend_local(q, k, v, segments)
    else:
        mesh, rules = active
        batch = _mesh_axes(rules, "batch", b, mesh)
        heads = _mesh_axes(rules, "heads", h, mesh, used=batch)
        shards = math.prod(mesh.shape[a] for a in heads)
        # Each device's query heads must find their K/V heads on the same device: K/V heads are
        # sharded like the query heads, repeated (the fewest times) only where there are fewer
        # K/V heads than head shards.
        kv, group = k.shape[1], h // k.shape[1]
        repeat = next(r for r in range(1, group + 1) if group % r == 0 and (kv * r) % shards == 0)
        if repeat > 1:
            k, v = jnp.repeat(k, repeat, axis=1), jnp.repeat(v, repeat, axis=1)
        spec = P(batch or None, heads or None, None, None)
        out = jax.shard_map(
            attend_local,
            mesh=mesh,
            in_specs=(spec, spec, spec, P(batch or None, None)),
            out_specs=spec,
            check_vma=False,  # pallas_call has no replication rule
        )(q, k, v, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3)
