"""A Llama-family decoder as Flax NNX modules.

The model is used functionally: `graphdef, params = nnx.split(model)` once, then every step calls
`nnx.merge(graphdef, params)` inside a jitted function (the merge runs at trace time only).

Every parameter carries logical axis names in its `out_sharding` metadata (Flax's sharding
metadata, what `nnx.get_partition_spec` reads); `jaxalign.sharding` maps them to mesh axes.
Matmuls are written as flat 2-D products ([tokens, in] @ [in, out]), which is what XLA's CPU and
GPU backends run fastest (see docs/performance.md).

The family registers itself at the bottom (`FAMILY`); callers build it with
`jaxalign.models.build(cfg.model, rngs)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.hf.convert import LLAMA_CONVERTER
from jaxalign.metrics import train_flops_per_token
from jaxalign.models import auto, context_attention
from jaxalign.models.lora import embed_lookup, merged_weight, project
from jaxalign.models.params import dense as dense  # re-exported for callers
from jaxalign.models.params import logical_axes as logical_axes  # re-exported for callers
from jaxalign.models.params import param
from jaxalign.models.registry import ModelFamily, register_family
from jaxalign.models.splash import splash_causal_attention
from jaxalign.sharding import constrain, constrain_lookup

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return param(value.astype(dtype), axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return param(jnp.ones(shape, dtype), axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
    return param(jnp.zeros(shape, dtype), axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype. x: [..., D], scale: [D].

    `plus_one` scales by (1 + scale), Gemma's parameterization."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32)
    return (y * (1.0 + w if plus_one else w)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
    """Inverse frequencies [head_dim // 2], with optional Llama-3 frequency scaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face). x: [B, T, N, hd]; positions:
    [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    k_segment_ids: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention with causal and segment masking.

    q: [B, T, H, hd]; k, v: [B, S, KV, hd]; segment ids [B, T] / [B, S] (0 = padding);
    q_index [T], k_index [S]: sequence indices used for the causal mask (key index <= query index);
    with `sliding_window` W (a number, or a traced scalar under a scan over layers), only keys with
    index > query index - W are seen. Scores are q.k * `scale` (default head_dim**-0.5), then
    soft-capped to `soft_cap` * tanh(scores / soft_cap) when set (Gemma 2).
    Queries are grouped as [B, T, KV, H/KV, hd] so K/V heads are never repeated in memory.
    Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = cap_scores(scores, hd, soft_cap, scale)
    causal = k_index[None, :] <= q_index[:, None]
    if sliding_window is not None:
        causal &= k_index[None, :] > q_index[:, None] - sliding_window
    mask = (q_segment_ids[:, :, None] == k_segment_ids[:, None, :]) & causal[None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def cap_scores(scores: jax.Array, head_dim: int, soft_cap=None, scale=None) -> jax.Array:
    """Raw q.k scores (float32) scaled by `scale` (default head_dim**-0.5), then soft-capped to
    soft_cap * tanh(scores / soft_cap) when `soft_cap` is set."""
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    return scores


def attention_scale(cfg: ModelConfig) -> float | None:
    """The attention score scale: query_pre_attn_scalar**-0.5 (Gemma 2/3), else None
    (head_dim**-0.5)."""
    scalar = cfg.query_pre_attn_scalar
    return None if scalar is None else float(scalar) ** -0.5


def resolve_query_block(block: int | str, backend: str | None = None) -> int:
    """`model.attention_query_block` as a number: "auto" becomes its `models.auto` table value
    for `backend` (default: the platform being built for, `auto.current_platform()`)."""
    return int(auto.resolve("attention_query_block", block, backend))


def resolve_attention_kernel(kernel: str, backend: str | None = None) -> str:
    """`model.attention_kernel` as a kernel name: "auto" becomes its `models.auto` table value
    for `backend` (default: the platform being built for): splash attention on TPU (the Pallas
    kernel, which never builds the [T, T] scores); einsum elsewhere (on GPU, cudnn stays opt-in
    until a GPU run has checked it: docs/performance.md)."""
    return auto.resolve("attention_kernel", kernel, backend)


def cudnn_causal_attention(
    q, k, v, segment_ids, sliding_window=None, implementation="cudnn", scale=None
) -> jax.Array:
    """`blocked_causal_attention`'s result through `jax.nn.dot_product_attention` (cuDNN flash
    attention on GPU: the [T, T] scores never reach device memory and blocks above the diagonal
    are skipped). Same shapes and masking: causal, within a segment (the [B, 1, T, T] segment mask
    is broadcast over heads), keys with index > query index - sliding_window; grouped-query heads
    as they are. A traced `sliding_window` (per-layer windows under a scan over layers) is folded
    into the mask instead. `scale`: as in `attend`; cuDNN has no logit soft-cap (the config
    refuses attn_logit_softcap with this kernel). `implementation="xla"` runs the same call
    anywhere (tests compare it on CPU).
    """
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    window = None
    if isinstance(sliding_window, int):
        window = (sliding_window - 1, 0)
    elif sliding_window is not None:
        idx = jnp.arange(q.shape[1])
        mask &= (idx[None, :] > idx[:, None] - sliding_window)[None, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )


def causal_attention(q, k, v, segment_ids, cfg, window=None) -> jax.Array:
    """Self-attention over a whole sequence by `cfg.attention_kernel` (einsum, cudnn, splash;
    auto: see `resolve_attention_kernel`), with this layer's sliding `window` (see
    `layer_windows`) and cfg's score scale and soft-cap."""
    kernel = resolve_attention_kernel(cfg.attention_kernel)
    scale = attention_scale(cfg)
    if kernel == "cudnn":
        return cudnn_causal_attention(q, k, v, segment_ids, window, scale=scale)
    if kernel == "splash":
        return splash_with_scale(q, k, v, segment_ids, cfg, window, scale)
    return blocked_causal_attention(
        q,
        k,
        v,
        segment_ids,
        cfg.attention_query_block,
        window,
        soft_cap=cfg.attn_logit_softcap,
        scale=scale,
    )


def splash_with_scale(q, k, v, segment_ids, cfg, window, scale) -> jax.Array:
    """Splash attention with Gemma's options: queries pre-multiplied by scale * sqrt(head_dim)
    (the kernel scales by 1/sqrt(head_dim)), `cfg.attn_logit_softcap` as its soft-cap, and a
    traced per-layer window (scan over layers) as a `lax.switch` over the static windows of
    `layer_windows(cfg)` (the kernel's mask is static)."""
    if scale is not None:
        q = (q.astype(jnp.float32) * (scale * math.sqrt(q.shape[-1]))).astype(q.dtype)
    cap = cfg.attn_logit_softcap
    if window is None or isinstance(window, int):
        return splash_causal_attention(q, k, v, segment_ids, window, cap)
    options = sorted(set(layer_windows(cfg)), key=lambda w: NO_WINDOW if w is None else w)
    codes = jnp.array([NO_WINDOW if w is None else w for w in options], jnp.int32)
    branches = [
        functools.partial(splash_causal_attention, sliding_window=w, soft_cap=cap) for w in options
    ]
    return jax.lax.switch(jnp.argmax(codes == window), branches, q, k, v, segment_ids)


def blocked_causal_attention(
    q, k, v, segment_ids, block, sliding_window=None, soft_cap=None, scale=None
) -> jax.Array:
    """Causal self-attention computed in query blocks; block i only reads keys [0, end of i].

    Same result as one `attend` over the whole sequence, but the [T, T] score matrix is never
    built, and fully masked key blocks above the diagonal are never computed; with a static
    (Python int) `sliding_window` W, neither are keys before (start of i) - W + 1. `block`:
    positions per block (0: one block) or "auto" (see `resolve_query_block`). `soft_cap`,
    `scale`: as in `attend`.
    """
    block = resolve_query_block(block)
    t = q.shape[1]
    idx = jnp.arange(t)
    if block <= 0 or block >= t:
        return attend(q, k, v, segment_ids, segment_ids, idx, idx, sliding_window, soft_cap, scale)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        lo = max(0, start - sliding_window + 1) if isinstance(sliding_window, int) else 0
        outs.append(
            attend(
                q[:, start:end],
                k[:, lo:end],
                v[:, lo:end],
                segment_ids[:, start:end],
                segment_ids[:, lo:end],
                idx[start:end],
                idx[lo:end],
                sliding_window,
                soft_cap,
                scale,
            )
        )
    return jnp.concatenate(outs, axis=1)


def attend_cache(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention of a few new queries over a KV cache laid out for decoding.

    q: [B, T, H, hd]; k_cache: [B, KV, hd, S]; v_cache: [B, KV, S, hd]; q_segment_ids [B, T],
    kv_segment_ids [B, S] (0 = padding); q_index [T]: the queries' cache slots (causal: slot <=
    q_index). Both products are plain batched matmuls over the cache as it lies ([G*T, hd] @
    [hd, S], then [G*T, S] @ [S, hd] per batch row and KV head): no transposed copy of the cache
    per step, and keys in [hd, S] read about twice as fast as [S, hd] on CPU. Queries are
    grouped as [B, KV, H/KV * T, hd] so K/V heads are never repeated. `sliding_window`,
    `soft_cap`, `scale`: as in `attend`. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    kv, s = v_cache.shape[1], v_cache.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    scores = jnp.einsum(
        "bkqd,bkds->bkqs", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = cap_scores(scores, hd, soft_cap, scale)
    k_index = jnp.arange(s)
    causal = k_index[None, :] <= q_index[:, None]  # [T, S]
    if sliding_window is not None:
        causal &= k_index[None, :] > q_index[:, None] - sliding_window
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & causal[None]  # [B, T, S]
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache.astype(probs.dtype))
    return (
        out.reshape(b, kv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional QK-norm and biases."""

    lora_in_dims = {"wo": 2}  # wo [H, hd, D] contracts two dims (see models/lora.py)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pd, std = DTYPES[cfg.param_dtype], cfg.initializer_range
        self.cfg = cfg
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pd)
        self.wk = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std, pd)
        if cfg.attention_bias:
            self.bq = _zeros((h, hd), ("heads", "head_dim"), pd)
            self.bk = _zeros((kv, hd), ("kv_heads", "head_dim"), pd)
            self.bv = _zeros((kv, hd), ("kv_heads", "head_dim"), pd)
        if cfg.attention_out_bias:
            self.bo = _zeros((d,), ("embed",), pd)
        if cfg.qk_norm:
            norm_init = _zeros if cfg.norm_plus_one else _ones
            self.q_norm = norm_init((hd,), ("norm",), pd)
            self.k_norm = norm_init((hd,), ("norm",), pd)

    def qkv(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
        """Project and rotate. x: [B, T, D] -> q [B, T, H, hd], k, v [B, T, KV, hd]."""
        cfg = self.cfg
        q, k, v = project(self, "wq", x), project(self, "wk", x), project(self, "wv", x)
        if cfg.attention_bias:
            q = q + self.bq[...].astype(q.dtype)
            k = k + self.bk[...].astype(k.dtype)
            v = v + self.bv[...].astype(v.dtype)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps, cfg.norm_plus_one)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps, cfg.norm_plus_one)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def out(self, attn: jax.Array) -> jax.Array:
        """[B, T, H, hd] -> [B, T, D]."""
        out = project(self, "wo", attn, n_in=2)
        if self.cfg.attention_out_bias:
            out = out + self.bo[...].astype(out.dtype)
        return out

    def __call__(
        self,
        x,
        positions,
        segment_ids,
        inv_freq,
        cache=None,
        layer=None,
        index=None,
        kv_segment_ids=None,
        window=None,
    ):
        """x: [B, T, D] -> (out [B, T, D], cache). `window`: this layer's sliding window (None:
        none; see `layer_windows`). Without a cache (`cache=None`, returned as
        None) the T tokens attend to each other within their segment.

        With a cache (this layer's {'k': [B, KV, hd, S], 'v': [B, KV, S, hd]} with `layer=None`,
        or every layer's stacked on a leading [L] axis with `layer` selecting ours) the keys and
        values are also written into it. With `index=None` (prefill) the T tokens fill cache
        slots [0, T) and attend exactly as without a cache; otherwise (decode) they go to slots
        [index, index + T) and attend to every cache slot at or before their own whose
        `kv_segment_ids` [B, S] equal theirs.
        """
        q, k, v = self.qkv(x, positions, inv_freq)
        if cache is not None:
            cache = write_cache(cache, k, v, layer, index)
        context = context_attention.context_size()
        if index is None and context > 1 and x.shape[1] % context == 0:
            # A row split over the context axis: zig-zag order in training (see
            # `Transformer.forward`), sequence order in prefill (the cache's slots).
            order = (
                context_attention.zigzag_order(x.shape[1], context)
                if cache is None
                else jnp.arange(x.shape[1], dtype=jnp.int32)
            )
            attn = context_attention.context_attention(
                q,
                k,
                v,
                segment_ids,
                jnp.broadcast_to(order, segment_ids.shape),
                method=auto.resolve("context_attention", self.cfg.context_attention),
                window=window,
                soft_cap=self.cfg.attn_logit_softcap,
                scale=attention_scale(self.cfg),
            )
        elif index is None:
            attn = causal_attention(q, k, v, segment_ids, self.cfg, window)
        else:
            keys, values = cache["k"], cache["v"]
            if layer is not None:
                keys = jax.lax.dynamic_index_in_dim(keys, jnp.int32(layer), 0, keepdims=False)
                values = jax.lax.dynamic_index_in_dim(values, jnp.int32(layer), 0, keepdims=False)
            attn = attend_cache(
                q,
                keys,
                values,
                segment_ids,
                kv_segment_ids,
                jnp.asarray(index, jnp.int32) + jnp.arange(x.shape[1]),
                window,
                self.cfg.attn_logit_softcap,
                attention_scale(self.cfg),
            )
        return self.out(attn), cache


def write_cache(cache: dict, k: jax.Array, v: jax.Array, layer, index) -> dict:
    """`cache` with k, v [B, T, KV, hd] written at slots [index, index + T) (index None: 0) of
    layer `layer` (None: `cache` is one layer's). Keys as [B, KV, hd, S], values as
    [B, KV, S, hd]: see `attend_cache`."""
    start = jnp.zeros((), jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
    b, t, kv, hd = k.shape
    ones = (1,) * len(lead)
    return {
        "k": jax.lax.dynamic_update_slice(
            cache["k"],
            k.transpose(0, 2, 3, 1).astype(cache["k"].dtype).reshape(*ones, b, kv, hd, t),
            (*lead, zero, zero, zero, start),
        ),
        "v": jax.lax.dynamic_update_slice(
            cache["v"],
            v.transpose(0, 2, 1, 3).astype(cache["v"].dtype).reshape(*ones, b, kv, t, hd),
            (*lead, zero, zero, start, zero),
        ),
    }


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd, std = DTYPES[cfg.param_dtype], cfg.initializer_range
        self.cfg = cfg
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), std, pd)
        if cfg.mlp_bias:
            self.b_gate = _zeros((f,), ("mlp",), pd)
            self.b_up = _zeros((f,), ("mlp",), pd)
            self.b_down = _zeros((d,), ("embed",), pd)

    def activation(self, gate: jax.Array) -> jax.Array:
        """The gate's activation (`cfg.mlp_activation`); a family may override it."""
        return jax.nn.silu(gate) if self.cfg.mlp_activation == "silu" else jax.nn.gelu(gate)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(self, "w_gate", x), project(self, "w_up", x)
        if self.cfg.mlp_bias:
            gate = gate + self.b_gate[...].astype(x.dtype)
            up = up + self.b_up[...].astype(x.dtype)
        hidden = constrain(self.activation(gate) * up, ("batch", "length", "mlp"))
        out = project(self, "w_down", hidden)
        if self.cfg.mlp_bias:
            out = out + self.b_down[...].astype(x.dtype)
        return out


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn_out(attn(norm(x))), then x + mlp_out(norm(x)). A
    family changes a part by subclassing and setting `attention_class` / `mlp_class`, or what
    reaches the residual stream by overriding the hooks `attn_out` and `mlp_out`."""

    attention_class = Attention
    mlp_class = MLP

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = DTYPES[cfg.param_dtype]
        norm_init = _zeros if cfg.norm_plus_one else _ones
        self.cfg = cfg
        self.attn_norm = norm_init((cfg.hidden_size,), ("norm",), pd)
        self.attn = self.attention_class(cfg, rngs)
        self.mlp_norm = norm_init((cfg.hidden_size,), ("norm",), pd)
        self.mlp = self.mlp_class(cfg, rngs)

    def __call__(
        self,
        x,
        positions,
        segment_ids,
        inv_freq,
        cache=None,
        layer=None,
        index=None,
        kv_segment_ids=None,
        window=None,
    ):
        """x: [B, T, D] -> (x [B, T, D], cache), or (x, cache, stats) when `mlp_out` returns
        statistics; the cache arguments and `window` as in `Attention.__call__`."""
        eps, plus_one = self.cfg.rms_norm_eps, self.cfg.norm_plus_one
        h = rms_norm(x, self.attn_norm[...], eps, plus_one)
        attn, cache = self.attn(
            h, positions, segment_ids, inv_freq, cache, layer, index, kv_segment_ids, window
        )
        x = x + self.attn_out(attn)
        out, stats = self.mlp_out(rms_norm(x, self.mlp_norm[...], eps, plus_one), segment_ids)
        x = constrain(x + out, ("batch", "length", "embed"))
        return (x, cache) if stats is None else (x, cache, stats)

    def attn_out(self, attn: jax.Array) -> jax.Array:
        """The attention output [B, T, D] as it is added to the residual stream (Gemma
        normalizes it)."""
        return attn

    def mlp_out(self, h: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, dict | None]:
        """The MLP on the normalized residual h [B, T, D] (segment_ids [B, T], 0: padding) ->
        (what is added to the residual stream [B, T, D], the block's statistics or None; a
        block with statistics returns them for `Transformer.use_layer_stats`)."""
        return self.mlp(h), None


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only language model. `__call__` returns final hidden states; `logits` projects.
    A family changes the block by subclassing and setting `block_class`."""

    block_class = Block
    lora_embeddings = ("embed",)  # an adapter on it is looked up (see models/lora.py)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg = auto.resolve_auto(cfg)  # once, for the platform built for (its mesh's)
        pd, std = DTYPES[cfg.param_dtype], cfg.initializer_range
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std, pd)
        block_class = self.block_class
        if cfg.scan_layers:
            # `transform_metadata` puts the stacked `layers` axis into each parameter's
            # `out_sharding` names.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return block_class(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List(
                [self.layer_block_class(i)(cfg, rngs) for i in range(cfg.num_layers)]
            )
        norm_init = _zeros if cfg.norm_plus_one else _ones
        self.final_norm = norm_init((cfg.hidden_size,), ("norm",), pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std, pd
            )

    def layer_block_class(self, layer: int) -> type[Block]:
        """The block class of layer `layer` when layers are not scanned (a family may mix
        kinds: MoE and dense layers); scanned layers are all `block_class`."""
        return self.block_class

    def output_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding's transpose when tied)."""
        if self.cfg.tie_embeddings:
            return self.embed[...].T  # an embedding adapter adapts the input side only (PEFT)
        return merged_weight(self, "lm_head")

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D] embeddings in the compute dtype."""
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        # Rows are looked up in the table's own layout (see `constrain_lookup`), then resharded
        # like every activation. Left to XLA, with the batch split over more mesh axes than the
        # table, the lookup's gradient was a full [V, D] buffer per device and an all-reduce of
        # it (issue #26).
        names = ("batch", "length"), ("vocab", "embed")
        tokens = constrain_lookup(tokens, *names)
        x = constrain_lookup(embed_lookup(self, "embed", tokens), *names).astype(dtype)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        return constrain(x, ("batch", "length", "embed"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """tokens, positions, segment_ids: [B, T] int32 -> hidden states [B, T, D] (compute dtype).

        Tokens attend only within their segment; positions restart per segment (for RoPE).
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        return self.forward(tokens, positions, segment_ids)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] in the compute dtype, soft-capped by `final_logit_softcap` when set
        (the losses apply the same cap: `losses.target_logprobs(soft_cap=...)`)."""
        return softcap_logits(dense(hidden, self.output_weight()), self.cfg.final_logit_softcap)

    def with_cache(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache,
        index: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
    ):
        """The forward pass for generation: hidden states [B, T, D] and the updated KV cache.

        Prefill (`index=None`): tokens fill cache slots [0, T) and the result equals
        `__call__(tokens, positions, segment_ids)`. Decode: tokens go to slots [index, index + T)
        and attend to earlier slots with equal `kv_segment_ids` [B, S] (0 = padding). cache:
        `init_cache(...)`. `remat` does not apply here.
        """
        return self.forward(tokens, positions, segment_ids, cache, index, kv_segment_ids)

    def init_cache(self, batch: int, length: int):
        """An empty KV cache for `with_cache`: `init_cache(self.cfg, batch, length)`."""
        return init_cache(self.cfg, batch, length)

    def use_layer_stats(self, stats, decoding: bool) -> None:
        """What the model does with the statistics its blocks return besides (x, cache): a block
        may return (x, cache, stats), stats a dict of arrays, stacked here over those blocks
        ([L', ...]). A family with auxiliary losses sows them here (blocks run from split state,
        so a block's own sows would not reach the model). Llama's blocks return none."""

    def forward(self, tokens, positions, segment_ids, cache=None, index=None, kv_segment_ids=None):
        """The one forward pass behind `__call__` (cache=None) and `with_cache`: (hidden states
        [B, T, D], the updated cache or None)."""
        cfg = self.cfg
        windows = layer_windows(cfg)
        ropes = [layer_rope(cfg, kind) for kind in layer_types(cfg)]
        inv_freqs = {r: rope_frequencies_of(cfg.resolved_head_dim, r) for r in set(ropes)}
        freqs = [inv_freqs[r] for r in ropes]
        # Per-layer windows and RoPE frequencies are static per unrolled layer; under a scan over
        # layers they are the same static value for every layer, or (alternating local/global
        # layers) scanned [L] / [L, hd/2] arrays (a global layer's window is NO_WINDOW there).
        uniform = len(set(windows)) == 1 and len(inv_freqs) == 1
        # Context parallelism (a row's tokens split over devices) trains on rows in zig-zag order:
        # every device then has the same causal attention work (models/context_attention.py).
        zigzag = context_attention.context_size() if cache is None else 1
        if zigzag > 1:
            tokens, positions, segment_ids = (
                context_attention.to_zigzag(a, zigzag) for a in (tokens, positions, segment_ids)
            )
        x = self.embed_tokens(tokens)

        def apply_block(block_graphdef, block_state, x, cache, layer, inv_freq, window):
            block = nnx.merge(block_graphdef, block_state)
            return block(
                x, positions, segment_ids, inv_freq, cache, layer, index, kv_segment_ids, window
            )

        if cfg.remat != "none" and cache is None:
            static = (0,) if cfg.scan_layers and not uniform else (0, 6)
            apply_block = jax.checkpoint(
                apply_block, policy=REMAT_POLICIES[cfg.remat], static_argnums=static
            )
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            if cache is not None:
                cache = constrain_cache(cache)
            layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            if uniform:

                def body(carry, xs):
                    block_state, layer = xs
                    x, cache, *stats = apply_block(
                        graphdef, block_state, *carry, layer, freqs[0], windows[0]
                    )
                    return (x, pin_cache(cache)), stats

                (x, cache), stats = jax.lax.scan(body, (x, cache), (state, layers))
            else:
                window_l = jnp.array([NO_WINDOW if w is None else w for w in windows], jnp.int32)

                def body(carry, xs):
                    block_state, layer, inv_freq, window = xs
                    x, cache, *stats = apply_block(
                        graphdef, block_state, *carry, layer, inv_freq, window
                    )
                    return (x, pin_cache(cache)), stats

                xs = (state, layers, jnp.stack(freqs), window_l)
                (x, cache), stats = jax.lax.scan(body, (x, cache), xs)
            layer_stats = stats[0] if stats else None
        else:
            # With a cache, one array pair per layer: each layer's update is in place and its
            # attention reads its own buffer directly (no slice of a stacked cache per step).
            new_cache, stats = [], []
            for i, blk in enumerate(self.blocks):
                graphdef, state = nnx.split(blk)
                layer_cache = None if cache is None else constrain_cache(cache[i])
                x, layer_cache, *block_stats = apply_block(
                    graphdef, state, x, layer_cache, None, freqs[i], windows[i]
                )
                new_cache.append(None if cache is None else constrain_cache(layer_cache))
                stats.extend(block_stats)
            cache = None if cache is None else tuple(new_cache)
            layer_stats = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None
        if layer_stats is not None:
            self.use_layer_stats(layer_stats, cache is not None)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_plus_one)
        if zigzag > 1:  # back in sequence order for the losses
            x = constrain(context_attention.from_zigzag(x, zigzag), ("batch", "length", "embed"))
        return x, cache


# A global layer's window among scanned per-layer windows: longer than any sequence.
NO_WINDOW = 2**30


def layer_types(cfg: ModelConfig) -> list[str]:
    """Each layer's kind, "sliding_attention" or "full_attention": `cfg.layer_types`, else every
    layer sliding when `cfg.sliding_window` is set (Mistral), else every layer full."""
    if cfg.layer_types is not None:
        return list(cfg.layer_types)
    kind = "full_attention" if cfg.sliding_window is None else "sliding_attention"
    return [kind] * cfg.num_layers


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (None: the layer attends to every earlier position)."""
    return [cfg.sliding_window if t == "sliding_attention" else None for t in layer_types(cfg)]


def layer_rope(cfg: ModelConfig, kind: str) -> tuple:
    """The RoPE setting (theta, rope_scaling, linear factor) of a layer of `kind`: sliding layers
    use `rope_local_theta` when set (Gemma 3, unscaled); the others `rope_theta` with
    `rope_scaling` (Llama 3) and `rope_linear_factor`."""
    if kind == "sliding_attention" and cfg.rope_local_theta is not None:
        return (cfg.rope_local_theta, None, None)
    scaling = None if cfg.rope_scaling is None else tuple(sorted(cfg.rope_scaling.items()))
    return (cfg.rope_theta, scaling, cfg.rope_linear_factor)


def rope_frequencies_of(head_dim: int, rope: tuple) -> jax.Array:
    """Inverse frequencies [head_dim // 2] of a `layer_rope` setting (linear: divided by it)."""
    theta, scaling, linear = rope
    inv_freq = rope_frequencies(head_dim, theta, None if scaling is None else dict(scaling))
    return inv_freq if linear is None else inv_freq / linear


def softcap_logits(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    """soft_cap * tanh(logits / soft_cap) in the logits' dtype (unchanged when soft_cap is None)."""
    if soft_cap is None:
        return logits
    return (soft_cap * jnp.tanh(logits.astype(jnp.float32) / soft_cap)).astype(logits.dtype)


# Logical axes of one layer's KV cache arrays; stacked caches (scan over layers) have a leading
# `layers` axis.
CACHE_AXES = {
    "k": ("batch", "kv_heads", "head_dim", "cache_length"),
    "v": ("batch", "kv_heads", "cache_length", "head_dim"),
}


def pin_cache(cache: dict | None) -> dict | None:
    """`constrain_cache`, for a scan's carry (None: no cache). Pinned in the body as well, the
    carry keeps the cache's layout: else it may take that of the keys written into it (a
    prefill's keys split over `context`) and be gathered back at every decoding step."""
    return None if cache is None else constrain_cache(cache)


def constrain_cache(cache: dict) -> dict:
    """Pin a cache's {'k', 'v'} arrays (one layer's, or stacked) to their logical axes."""
    return {
        name: constrain(a, ("layers", *CACHE_AXES[name]) if a.ndim == 5 else CACHE_AXES[name])
        for name, a in cache.items()
    }


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """An empty KV cache for `batch` rows of `length` slots, in the compute dtype: a tuple of
    one dict per layer, {'k': [B, KV, hd, S], 'v': [B, KV, S, hd]}, or with `scan_layers` one
    such dict of arrays stacked on a leading [L] axis."""
    kv, hd = cfg.num_kv_heads, cfg.resolved_head_dim
    shapes = {"k": (batch, kv, hd, length), "v": (batch, kv, length, hd)}
    lead = (cfg.num_layers,) if cfg.scan_layers else ()
    dtype = DTYPES[cfg.dtype]

    def empty():
        return {name: jnp.zeros((*lead, *shape), dtype) for name, shape in shapes.items()}

    return empty() if cfg.scan_layers else tuple(empty() for _ in range(cfg.num_layers))


def stack_layers(params: dict) -> dict:
    """Convert unrolled params ({'blocks': {0: ..., 1: ...}}) to the scan-over-layers layout."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in sorted(blocks)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Inverse of `stack_layers`."""
    blocks = params["blocks"]
    return {
        **params,
        "blocks": {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)},
    }


FAMILY = register_family(
    ModelFamily(
        name="llama",
        module=Transformer,
        flops_per_token=train_flops_per_token,
        hf=LLAMA_CONVERTER,
    )
)
