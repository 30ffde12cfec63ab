"""Mixture-of-experts decoders: the `qwen3_moe` and `mixtral` families (Hugging Face model_type
names). Llama's attention and blocks with a routed SwiGLU MLP in place of the dense one.

Routing (`route`): softmax over the router logits in float32, the top-k experts per token
(`jax.lax.top_k`: of equal probabilities the lower expert index wins, so equal inputs always
route alike), optionally renormalized to sum to 1 (`norm_topk_prob`; Mixtral always does).

Experts run dropless by default (`dropless_experts`): the token-expert assignments are sorted by
expert and each projection is one grouped matmul (`model.moe_kernel`): `jax.lax.ragged_dot`, the
megablox Pallas kernel on TPU (`megablox_matmul`), or on CPU whole tiles of each expert's rows in
batched matmuls (`_tiled_swiglu`). With
`model.moe_capacity_factor` > 0 (`capacity_experts`) each expert has a fixed number of slots,
filled first choices first, in token order; assignments past it are dropped (the token keeps its
residual). Both are deterministic: no scatter-adds, each token's expert outputs are gathered back
and summed in a fixed order.

Each MoE block returns its router statistics; the model turns them into the load-balancing loss
as transformers' `load_balancing_loss_func` computes it (over every MoE layer's tokens at once:
num_experts x sum_e f_e P_e, f_e the fraction of top-k assignments to e, P_e its mean router
probability; padding excluded), plus the optional router z-loss, and sows them (`AuxLoss`, added
by the train step) with the metrics `moe/aux_loss`, `moe/z_loss`, `moe/expert_load` (per-expert
fraction of assignments) and `moe/dropped_tokens` (fraction of assignments dropped).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.config import ModelConfig
from jaxalign.hf.convert import MIXTRAL_CONVERTER, QWEN3_MOE_CONVERTER
from jaxalign.metrics import moe_param_count, param_count
from jaxalign.models import auto, llama
from jaxalign.models.llama import DTYPES, _param, dense
from jaxalign.models.params import AuxLoss, AuxMetric
from jaxalign.models.registry import ModelFamily, register_family


class RouterLogits(nnx.Variable):
    """Each MoE layer's router logits [L', N, E], sown only when `capture_router_logits` is set
    (parity tests and analysis; never in training)."""


def route(logits: jax.Array, k: int, normalize: bool):
    """Top-k softmax routing. logits: [N, E] -> (weights [N, k] float32, experts [N, k] int32,
    probs [N, E] float32). Ties go to the lower expert index."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def dropless_experts(
    x, experts, weights, w_gate, w_up, w_down, activation, kernel: str = "auto"
) -> jax.Array:
    """Every assignment computed: x [N, D], experts / weights [N, k], w_gate / w_up [E, D, F],
    w_down [E, F, D] -> [N, D] = sum_j weights[n, j] * expert_{experts[n, j]}(x[n]), through
    the grouped matmul `kernel` (`model.moe_kernel`)."""
    n, k = experts.shape
    rows = jnp.take(x, jnp.arange(n * k) // k, axis=0)  # assignment a: token a // k
    y = _grouped_swiglu(rows, experts.reshape(-1), w_gate, w_up, w_down, activation, kernel)
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1), weights.astype(x.dtype))


def _grouped_swiglu(rows, groups, w_gate, w_up, w_down, activation, kernel) -> jax.Array:
    """rows [M, D] through expert `groups[m]` ([M]; groups >= E give zeros) -> [M, D] with the
    grouped matmul `kernel` ("auto": `models.auto`'s table for the platform built for): tiled
    (`_tiled_swiglu`), or ragged_dot / megablox over the rows sorted by expert."""
    kernel = auto.resolve("moe_kernel", kernel, _platform())
    if kernel == "tiled":
        return _tiled_swiglu(rows, groups, w_gate, w_up, w_down, activation)
    matmul = megablox_matmul if kernel == "megablox" else jax.lax.ragged_dot
    return _sorted_swiglu(rows, groups, w_gate, w_up, w_down, activation, matmul)


def _platform() -> str:
    """The platform traced for: the active mesh's devices', else `auto.current_platform()`."""
    active = shd.active_sharding()
    return auto.mesh_platform(active[0]) if active else auto.current_platform()


def _sorted_swiglu(rows, groups, w_gate, w_up, w_down, activation, matmul) -> jax.Array:
    """`_grouped_swiglu` with the rows sorted by expert and a grouped matmul
    `matmul(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]` (rows past the groups: 0)."""
    num_experts = w_gate.shape[0]
    order = jnp.argsort(groups, stable=True)
    sizes = jnp.bincount(groups, length=num_experts).astype(jnp.int32)  # drops groups >= E
    xs = jnp.take(rows, order, axis=0)
    dt = rows.dtype
    gate = matmul(xs, w_gate.astype(dt), sizes)
    up = matmul(xs, w_up.astype(dt), sizes)
    ys = matmul(activation(gate) * up, w_down.astype(dt), sizes)
    return jnp.take(ys, jnp.argsort(order), axis=0)


# Megablox tiles: rows, then both contracted and output widths (one size, since the backward
# pass reuses it with the two swapped). MaxText's defaults are (512, 1024, 1024); 512 keeps a
# bfloat16 step's double-buffered blocks well inside v5e's 16 MiB of scoped VMEM.
MEGABLOX_TILE = 512
_LANES = 128  # a TPU vreg's lane count: Mosaic blocks' last dimension is a multiple of it


def megablox_matmul(lhs, rhs, group_sizes, interpret: bool | None = None) -> jax.Array:
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` (lhs [M, K] rows grouped in order, rhs
    [E, K, N], group_sizes [E] int32 -> [M, N], rows past the groups 0) with the megablox
    Pallas grouped matmul (its custom VJP: gmm for the input gradient, tgmm for the weights'),
    in Pallas interpret mode off TPU (`interpret=None`: unless the active mesh's devices, or
    the platform built for without one, are TPUs).

    The rows are padded to whole row tiles and, where K or N is not a multiple of 128 (small
    test models only), the widths too, with zeros. The rows past the groups form one more
    group that no expert owns (group_sizes gets an E+1-th entry), for which megablox writes
    zeros in the output and in the input gradient rather than leaving them unwritten."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    if interpret is None:
        interpret = _platform() != "tpu"
    m, k = lhs.shape
    n = rhs.shape[2]
    kp, np_ = -(-k // _LANES) * _LANES, -(-n // _LANES) * _LANES
    tm = min(MEGABLOX_TILE, -(-m // _LANES) * _LANES)
    mp = -(-m // tm) * tm
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    rhs = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    rest = mp - jnp.sum(group_sizes, dtype=jnp.int32)
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32), rest[None]])
    tile = min(MEGABLOX_TILE, kp, np_)
    out = gmm(lhs, rhs, sizes, lhs.dtype, (tm, tile, tile), None, None, False, interpret)
    return out[:m, :n]


def swiglu_tile(num_rows: int, num_experts: int) -> int:
    """Rows per tile of `_tiled_swiglu`: about a quarter of an expert's even share, a power of
    two in [8, 256] (padding costs at most one tile per expert)."""
    share = max(num_rows // (4 * num_experts), 1)
    return int(min(256, max(8, 1 << (share - 1).bit_length())))


def _tiled_swiglu(rows, groups, w_gate, w_up, w_down, activation, tile=None) -> jax.Array:
    """`_grouped_swiglu` as batched matmuls over tiles: each expert's rows (in row order) fill
    whole tiles of `tile` rows, the last one padded with zeros, so every tile belongs to one
    expert and multiplies by its weights ([tiles, tile, D] x [tiles, D, F]). At most
    ceil(M / tile) + E tiles (a static bound; tiles past the used ones hold zeros). Exact: each
    row meets only its expert's weights, as ragged_dot."""
    m, d = rows.shape
    e = w_gate.shape[0]
    tile = tile or swiglu_tile(m, e)
    num_tiles = -(-m // tile) + e
    valid = groups < e
    sizes = jnp.bincount(groups, length=e).astype(jnp.int32)  # drops groups >= E
    tiles_of = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_of)
    tile_start = tile_end - tiles_of
    group_start = jnp.cumsum(sizes) - sizes
    t = jnp.arange(num_tiles)
    tile_group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), e - 1)  # [T]
    rank = (t - tile_start[tile_group])[:, None] * tile + jnp.arange(tile)  # [T, tile]
    used = (rank < sizes[tile_group][:, None]) & (t < tile_end[-1])[:, None]
    order = jnp.argsort(jnp.where(valid, groups, e), stable=True)
    src = jnp.take(order, jnp.where(used, group_start[tile_group][:, None] + rank, 0))
    xs = jnp.where(used[..., None], jnp.take(rows, src, axis=0), 0)  # [T, tile, D]
    dt = rows.dtype

    def weights(w):
        return jnp.take(w.astype(dt), tile_group, axis=0)

    gate = jnp.einsum("tnd,tdf->tnf", xs, weights(w_gate))
    up = jnp.einsum("tnd,tdf->tnf", xs, weights(w_up))
    ys = jnp.einsum("tnf,tfd->tnd", activation(gate) * up, weights(w_down))
    # each row's slot: its rank among its expert's rows, in its expert's tiles
    g = jnp.where(valid, groups, 0)
    rank_of_row = jnp.argsort(order) - group_start[g]
    slot = (tile_start[g] + rank_of_row // tile) * tile + rank_of_row % tile
    out = jnp.take(ys.reshape(-1, d), jnp.where(valid, slot, 0), axis=0)
    return jnp.where(valid[:, None], out, 0)


def expert_parallel_experts(
    x, experts, weights, w_gate, w_up, w_down, activation, mesh, rules, kernel: str = "auto"
) -> jax.Array:
    """`dropless_experts` with the experts split over the mesh axes of the logical `expert`
    axis: each device keeps E / ep experts, and every token assignment travels to its expert's
    device and back with `jax.lax.all_to_all`. The expert MLP width may also be split over the
    `mlp` axes (partial outputs summed with psum); parameters stored over fsdp are gathered
    when the shard_map starts.

    The send buffers are padded to the worst case (every local assignment to one device:
    [ep, N_local * k, D]), so no assignment is ever dropped; rows of the padding go to no
    expert. x: [N, D] with N split over the `batch` axes, which must include the expert axes."""
    from jax.sharding import PartitionSpec as P

    from jaxalign.errors import ConfigError

    ep_axes = tuple(rules.get("expert", ()))
    batch_axes = tuple(rules.get("batch", ()))
    mlp_axes = tuple(a for a in rules.get("mlp", ()) if a not in ep_axes + batch_axes)
    if not set(ep_axes) <= set(batch_axes):
        raise ConfigError(
            f"sharding: the experts are split over mesh axes {list(ep_axes)}; the activation "
            f"rule 'batch' ({list(batch_axes)}) must include them, so tokens are split there too "
            "(configs/sharding/expert.yaml)"
        )
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    k = experts.shape[1]
    tokens = P(batch_axes, None)
    col = mlp_axes or None

    def body(x, experts, weights, w_gate, w_up, w_down):
        n, d = x.shape
        local = w_gate.shape[0]
        flat = experts.reshape(-1)
        to_device = flat[None, :] // local == jnp.arange(ep)[:, None]  # [ep, n * k]
        rows = jnp.take(x, jnp.arange(n * k) // k, axis=0)
        send = jnp.where(to_device[..., None], rows[None], 0)  # [ep, n * k, D]
        groups = jnp.where(to_device, flat[None, :] % local, local)
        recv = jax.lax.all_to_all(send, ep_axes, 0, 0, tiled=True)
        recv_groups = jax.lax.all_to_all(groups, ep_axes, 0, 0, tiled=True)
        y = _grouped_swiglu(
            recv.reshape(-1, d), recv_groups.reshape(-1), w_gate, w_up, w_down, activation, kernel
        )
        if mlp_axes:
            y = jax.lax.psum(y, mlp_axes)
        back = jax.lax.all_to_all(y.reshape(ep, n * k, d), ep_axes, 0, 0, tiled=True)
        out = jnp.sum(jnp.where(to_device[..., None], back, 0), axis=0).reshape(n, k, d)
        return jnp.einsum("nkd,nk->nd", out, weights.astype(x.dtype))

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            tokens,
            tokens,
            tokens,
            P(ep_axes, None, col),
            P(ep_axes, None, col),
            P(ep_axes, col, None),
        ),
        out_specs=tokens,
        check_vma=False,
    )(x, experts, weights, w_gate, w_up, w_down)


def expert_parallelism() -> tuple | None:
    """(mesh, activation table) when the active sharding splits the experts (the logical
    `expert` axis maps to mesh axes of total size > 1), else None."""
    active = shd.active_sharding()
    if active is None:
        return None
    mesh, rules = active
    if math.prod(mesh.shape[a] for a in rules.get("expert", ())) <= 1:
        return None
    return mesh, rules


def expert_capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor x tokens x k / experts)."""
    return max(1, math.ceil(factor * num_tokens * k / num_experts))


def capacity_experts(
    x, experts, weights, valid, w_gate, w_up, w_down, activation, capacity
) -> tuple[jax.Array, jax.Array]:
    """Fixed-capacity experts: (out [N, D], dropped assignments of valid tokens, a count).

    Slots go to first choices before second choices, each in token order (GShard's priority);
    padding tokens (`valid` [N] false) take none."""
    n, k = experts.shape
    num_experts = w_gate.shape[0]
    # choice-major order: a = j * N + token
    flat = jnp.where(valid[None, :], experts.T, num_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = jnp.bincount(flat, length=num_experts + 1)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(n * k) - starts[sorted_e]
    keep = (sorted_e < num_experts) & (pos < capacity)
    tokens = order % n
    buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[sorted_e, pos].set(jnp.take(x, tokens, axis=0), mode="drop")
    dt = x.dtype
    hidden = activation(jnp.einsum("ecd,edf->ecf", buffer, w_gate.astype(dt)))
    hidden = hidden * jnp.einsum("ecd,edf->ecf", buffer, w_up.astype(dt))
    out = jnp.einsum("ecf,efd->ecd", hidden, w_down.astype(dt))
    ys = out[jnp.minimum(sorted_e, num_experts - 1), jnp.minimum(pos, capacity - 1)]
    ys = jnp.where(keep[:, None], ys, 0)
    y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(k, n, -1)
    dropped = jnp.sum(valid) * k - jnp.sum(keep)
    return jnp.einsum("knd,nk->nd", y, weights.astype(dt)), dropped


class MoEMLP(nnx.Module):
    """Routed SwiGLU experts: router [D, E], w_gate / w_up [E, D, F], w_down [E, F, D]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.resolved_moe_intermediate_size, cfg.num_experts
        pd, std = DTYPES[cfg.param_dtype], cfg.initializer_range
        self.cfg = cfg
        self.router = _param(rngs, (d, e), ("embed", None), std, pd)
        self.w_gate = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_up = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_down = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, pd)

    def activation(self, gate: jax.Array) -> jax.Array:
        return jax.nn.silu(gate) if self.cfg.mlp_activation == "silu" else jax.nn.gelu(gate)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
        """x: [B, T, D], valid: [B, T] (false: padding) -> (out [B, T, D], router statistics:
        counts [E] (assignments of valid tokens), prob_sum [E], rows, z_sum, dropped, and
        router_logits [N, E])."""
        cfg = self.cfg
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        logits = dense(xf, self.router[...])
        weights, experts, probs = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        mask = valid.reshape(-1).astype(jnp.float32)
        w = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if cfg.moe_capacity_factor > 0:
            capacity = expert_capacity(
                b * t, cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_capacity_factor
            )
            out, dropped = capacity_experts(
                xf, experts, weights, valid.reshape(-1), *w, self.activation, capacity
            )
        elif (parallel := expert_parallelism()) is not None:
            out = expert_parallel_experts(
                xf, experts, weights, *w, self.activation, *parallel, cfg.moe_kernel
            )
            dropped = jnp.zeros((), jnp.int32)
        else:
            out = dropless_experts(xf, experts, weights, *w, self.activation, cfg.moe_kernel)
            dropped = jnp.zeros((), jnp.int32)
        one_hot = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.float32).sum(1)
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        stats = {
            "counts": mask @ one_hot,
            "prob_sum": mask @ probs,
            "rows": mask.sum(),
            "z_sum": jnp.sum(mask * z * z),
            "dropped": dropped.astype(jnp.float32),
            "router_logits": logits,
        }
        return out.reshape(b, t, d), stats


class MoEBlock(llama.Block):
    """Llama's pre-norm block with routed experts; returns (x, cache, router statistics)."""

    mlp_class = MoEMLP

    def mlp_out(self, h: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, dict]:
        return self.mlp(h, segment_ids > 0)


class MoETransformer(llama.Transformer):
    """A decoder whose MoE layers (`ModelConfig.is_moe_layer`) route tokens to experts."""

    block_class = MoEBlock
    capture_router_logits = False  # set on an instance to sow RouterLogits

    def layer_block_class(self, layer: int) -> type[llama.Block]:
        return MoEBlock if self.cfg.is_moe_layer(layer) else llama.Block

    def use_layer_stats(self, stats: dict, decoding: bool) -> None:
        if self.capture_router_logits:
            self.sow(RouterLogits, "router_logits", stats["router_logits"])
        if decoding:
            return
        cfg = self.cfg
        terms = router_losses(stats, cfg.num_experts, cfg.num_experts_per_tok)
        aux = jnp.zeros((), jnp.float32)
        if cfg.output_router_logits and cfg.router_aux_loss_coef:
            aux = aux + cfg.router_aux_loss_coef * terms["moe/aux_loss"]
        if cfg.router_z_loss_coef:
            aux = aux + cfg.router_z_loss_coef * terms["moe/z_loss"]
        self.sow(AuxLoss, "moe", aux)
        for name, value in terms.items():
            self.sow(AuxMetric, name, value)


def router_losses(stats: dict, num_experts: int, k: int) -> dict[str, jax.Array]:
    """The router terms from every MoE layer's statistics (each stacked [L', ...]):
    `moe/aux_loss` = E x sum_e f_e P_e over all layers' valid tokens (transformers'
    load_balancing_loss_func), `moe/z_loss` = mean logsumexp(logits)^2, `moe/expert_load` [E]
    (fractions of the assignments, summing to 1) and `moe/dropped_tokens` (fraction dropped)."""
    rows = jnp.maximum(stats["rows"].sum(), 1.0)
    counts = stats["counts"].sum(0)
    f, p = counts / rows, stats["prob_sum"].sum(0) / rows
    return {
        "moe/aux_loss": num_experts * jnp.sum(f * p),
        "moe/z_loss": stats["z_sum"].sum() / rows,
        "moe/expert_load": counts / (rows * k),
        "moe/dropped_tokens": stats["dropped"].sum() / (rows * k),
    }


def moe_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token over the active parameters: 6 x active, plus attention (as
    `jaxalign.metrics.train_flops_per_token`)."""
    dense_flops = llama.FAMILY.flops_per_token(cfg, seq_len)
    return (
        dense_flops - 6.0 * param_count(cfg)["non_embedding"] + 6.0 * moe_param_count(cfg)["active"]
    )


QWEN3_MOE = register_family(
    ModelFamily(
        name="qwen3_moe",
        module=MoETransformer,
        flops_per_token=moe_train_flops_per_token,
        hf=QWEN3_MOE_CONVERTER,
    )
)
MIXTRAL = register_family(
    ModelFamily(
        name="mixtral",
        module=MoETransformer,
        flops_per_token=moe_train_flops_per_token,
        hf=MIXTRAL_CONVERTER,
    )
)
