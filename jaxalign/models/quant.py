"""Blockwise quantization of frozen base weights (QLoRA): int8 and NF4, with double quantization.

A quantized weight is a plain dict of arrays, so it jits, shards and checkpoints like any other
parameter subtree, and everything about it is read back from its arrays' shapes and dtypes:

    codes          nf4: uint8, shape[:-1] + (shape[-1] // 2,), two 4-bit codes per byte
                   int8: int8, the weight's shape
    scales         the blocks' absmax: float32, or int8 with double quantization
    scale_scales   double quantization only: float32 absmax of each block of scales
    scale_offset   double quantization only: float32 mean of the scales, all dims 1

Every array keeps the weight's rank, so each carries the weight's logical axes (`logical_axes`).
A block is a tile of `block_size` consecutive elements in row-major order: along the last axis
when `block_size` divides it (every real projection with blocks of 64), else the tile also spans
the trailing axes before it (e.g. a [32, 4, 8] weight in blocks of 64: tiles of [2, 4, 8]). The
tile along each axis is `weight.shape[i] // scales.shape[i]`. Input axes therefore never cut a
block: any sharding of the leading (input) axes splits whole blocks, and a sharded last axis
splits whole blocks when each shard's length divides by the block (scales' dimension divides by
the mesh axes; `jaxalign.sharding.validate_shardings` names the parameter otherwise).

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, appendix E): each weight is divided by
its block's absmax and rounded to the nearest of 16 values. Double quantization (as QLoRA and
bitsandbytes) subtracts the mean of the scales and stores them in 8 bits per value, with one
float32 absmax per tile of 256 scales (fewer where the scales' trailing dims do not tile 256).
Where bitsandbytes stores those 8-bit values in its dynamic (log-spaced) float format, we store
symmetric linear int8, whose error on the mean-centred scales is bounded by absmax / 254.

Why not `qwix` (docs/lora.md): it has no double quantization, its NF4 values are `uint4` arrays,
which take one byte each on CPU, and its model integration intercepts module calls; this module
is what QLoRA needs for plain parameter pytrees.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")

# QLoRA appendix E: the 16 NF4 values (quantiles of N(0, 1), normalized to [-1, 1], with an
# exact zero), as bitsandbytes' float32 table.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Rounding to the nearest value = counting the midpoints below.
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2
DOUBLE_QUANT_BLOCK = 256
_INT8_MAX = 127.0


def block_tile(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The tile of `block_size` row-major consecutive elements of an array of `shape`: whole
    trailing axes, then a divisor of the next one. ValueError when `block_size` does not tile
    `shape` that way."""
    tile = [1] * len(shape)
    left = block_size
    for axis in reversed(range(len(shape))):
        if left == 1:
            break
        dim = shape[axis]
        if left >= dim and left % dim == 0:
            tile[axis], left = dim, left // dim
        elif left < dim and dim % left == 0:
            tile[axis], left = left, 1
        else:
            break
    if left != 1:
        raise ValueError(
            f"cannot quantize shape {tuple(shape)} in blocks of {block_size}: the block must "
            "divide the last axis, or be a whole number of trailing rows that tiles the axis "
            "before them"
        )
    return tuple(tile)


def _largest_tile(shape: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """The largest row-major tile of at most `limit` elements (double quantization's blocks)."""
    tile = [1] * len(shape)
    left = limit
    for axis in reversed(range(len(shape))):
        dim = shape[axis]
        size = max(d for d in range(1, min(dim, left) + 1) if dim % d == 0)
        tile[axis], left = size, left // size
        if size < dim or left == 1:
            break
    return tuple(tile)


def _blocks(x: jax.Array, tile: tuple[int, ...]) -> jax.Array:
    """x viewed as [n0, t0, n1, t1, ...] (block index, position in block, per axis)."""
    return x.reshape([d for n, t in zip(x.shape, tile) for d in (n // t, t)])


def _block_absmax(x: jax.Array, tile: tuple[int, ...]) -> jax.Array:
    """Per-block max |x|, shaped x.shape // tile."""
    return jnp.max(jnp.abs(_blocks(x, tile)), axis=tuple(range(1, 2 * x.ndim, 2)))


def _expand(scales: jax.Array, tile: tuple[int, ...]) -> jax.Array:
    """scales [n0, n1, ...] as [n0, 1, n1, 1, ...], to multiply `_blocks` views."""
    return scales.reshape([d for n in scales.shape for d in (n, 1)])


def _tile_of(shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // n for s, n in zip(shape, scales_shape))


def quantize(
    w: jax.Array, kind: str, block_size: int = 64, double_quant: bool = True
) -> dict[str, jax.Array]:
    """`w` (any float dtype, rank >= 1) quantized blockwise with absmax scales (see the module
    docstring for the arrays). Traceable: use it inside `jax.jit` with sharded inputs, or
    `jax.vmap` it to quantize scan-stacked layers one by one."""
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "nf4" and w.shape[-1] % 2:
        raise ValueError(f"cannot pack NF4 codes of shape {tuple(w.shape)}: last axis is odd")
    tile = block_tile(tuple(w.shape), block_size)
    wf = w.astype(jnp.float32)
    absmax = _block_absmax(wf, tile)
    safe = _expand(jnp.where(absmax > 0, absmax, 1.0), tile)
    normalized = (_blocks(wf, tile) / safe).reshape(w.shape)
    if kind == "int8":
        codes = jnp.clip(jnp.round(normalized * _INT8_MAX), -_INT8_MAX, _INT8_MAX)
        q = {"codes": codes.astype(jnp.int8)}
    else:
        index = (normalized[..., None] > jnp.asarray(_NF4_MIDPOINTS)).sum(-1).astype(jnp.uint8)
        pairs = index.reshape(*w.shape[:-1], w.shape[-1] // 2, 2)
        q = {"codes": (pairs[..., 0] << 4) | pairs[..., 1]}  # first element in the high nibble
    if not double_quant:
        return {**q, "scales": absmax}
    offset = jnp.mean(absmax).reshape((1,) * absmax.ndim)
    centred = absmax - offset
    tile2 = _largest_tile(tuple(absmax.shape), DOUBLE_QUANT_BLOCK)
    scale_scales = _block_absmax(centred, tile2)
    safe2 = _expand(jnp.where(scale_scales > 0, scale_scales, 1.0), tile2)
    scales = jnp.round(_blocks(centred, tile2) / safe2 * _INT8_MAX).reshape(absmax.shape)
    return {
        **q,
        "scales": scales.astype(jnp.int8),
        "scale_scales": scale_scales,
        "scale_offset": offset,
    }


def kind_of(q: dict) -> str:
    """'nf4' or 'int8', read from the codes' dtype."""
    return "nf4" if q["codes"].dtype == jnp.uint8 else "int8"


def weight_shape(q: dict) -> tuple[int, ...]:
    """The shape of the weight `q` holds."""
    shape = tuple(q["codes"].shape)
    return (*shape[:-1], 2 * shape[-1]) if kind_of(q) == "nf4" else shape


def block_scales(q: dict) -> jax.Array:
    """The blocks' absmax scales in float32 (double quantization undone)."""
    if "scale_scales" not in q:
        return q["scales"].astype(jnp.float32)
    scales = q["scales"].astype(jnp.float32) / _INT8_MAX
    tile2 = _tile_of(scales.shape, q["scale_scales"].shape)
    scaled = (_blocks(scales, tile2) * _expand(q["scale_scales"], tile2)).reshape(scales.shape)
    return scaled + q["scale_offset"]


def dequantize(q: dict, dtype=jnp.float32, shape: tuple[int, ...] | None = None) -> jax.Array:
    """The weight `q` approximates, in `dtype` (computed in float32). `shape`, when given, is
    checked against the shape the arrays encode."""
    full = weight_shape(q)
    if shape is not None and tuple(shape) != full:
        raise ValueError(f"quantized weight holds shape {full}, not {tuple(shape)}")
    codes = q["codes"]
    if kind_of(q) == "nf4":
        index = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(full)
        values = jnp.asarray(NF4_VALUES)[index.astype(jnp.int32)]
    else:
        values = codes.astype(jnp.float32) / _INT8_MAX
    scales = block_scales(q)
    tile = _tile_of(full, scales.shape)
    return (_blocks(values, tile) * _expand(scales, tile)).reshape(full).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _frozen_dense(x: jax.Array, q: dict, n_in: int) -> jax.Array:
    w = dequantize(q, x.dtype)
    in_size = math.prod(w.shape[:n_in])
    y = x.reshape(-1, in_size) @ w.reshape(in_size, -1)
    return y.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


def _frozen_dense_fwd(x, q, n_in):
    return _frozen_dense(x, q, n_in), (q, x.shape)


def _frozen_dense_bwd(n_in, residuals, dy):
    q, x_shape = residuals
    w = dequantize(q, dy.dtype)
    in_size = math.prod(w.shape[:n_in])
    dx = dy.reshape(-1, w.size // in_size) @ w.reshape(in_size, -1).T
    return dx.reshape(x_shape), None


_frozen_dense.defvjp(_frozen_dense_fwd, _frozen_dense_bwd)


def quant_dense(x: jax.Array, q: dict, n_in: int = 1) -> jax.Array:
    """`llama.dense(x, dequantize(q), n_in)`: contract the last `n_in` dims of x with the first
    `n_in` of the quantized weight, dequantizing it on the fly in x's dtype.

    The base is frozen: no gradient reaches `q`, and the backward pass dequantizes again rather
    than keeping the dequantized weight alive between the passes (what makes QLoRA's memory)."""
    return _frozen_dense(x, q, n_in)


def logical_axes(q: dict, axes: tuple[str | None, ...]) -> dict[str, tuple[str | None, ...]]:
    """The logical axes of each array of `q` (concrete or abstract), given the weight's `axes`.

    The codes and the scales carry the weight's names (the scales shard with their blocks);
    the double-quantization arrays keep a name only where their dimension is the weight's (a
    tiled dimension there is a few float32 values per thousands of weights: replicated)."""
    full = weight_shape(q)
    out = {}
    for name, array in q.items():
        if name in ("codes", "scales"):
            out[name] = tuple(
                a if n > 1 or d == 1 else None for a, n, d in zip(axes, array.shape, full)
            )
        else:
            out[name] = tuple(a if n == d else None for a, n, d in zip(axes, array.shape, full))
    return out


def bytes_per_param(
    kind: str, block_size: int = 64, double_quant: bool = True, dtype_bytes: int = 4
) -> float:
    """Storage bytes per weight of a quantized base (nominal: blocks of 256 for the scales).

    kind 'none' is the unquantized weight (`dtype_bytes`). NF4 in blocks of 64 with double
    quantization: 0.5 + 1/64 + 4/(64 * 256) = 0.5159 (QLoRA's 4.127 bits)."""
    if kind == "none":
        return float(dtype_bytes)
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r} is not one of none, {', '.join(KINDS)}")
    codes = 0.5 if kind == "nf4" else 1.0
    if not double_quant:
        return codes + 4 / block_size
    return codes + 1 / block_size + 4 / (block_size * DOUBLE_QUANT_BLOCK)


def nbytes(q: dict) -> int:
    """Bytes `q`'s arrays occupy."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in q.values())
