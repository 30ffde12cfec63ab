"""`jaxalign plan`: check a config against a device count without those devices.

Resolves the mesh for N devices, maps every parameter through the sharding rules, and prints the
bytes per device of parameters, optimizer state, gradients and an activation estimate; fails when
the total does not fit the given memory per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.errors import ConfigError
from jaxalign.models.llama import DTYPES, Transformer, logical_axes

GIB = 1024**3


@dataclass
class Plan:
    """Per-device memory estimate of one training configuration (`params` includes frozen
    copies such as a reference policy; `num_params` counts trained parameters)."""

    mesh: dict[str, int]
    params: int
    optimizer: int
    gradients: int
    activations: int
    num_params: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations


def _shard_elems(shape: tuple[int, ...], spec, sizes: dict[str, int], path: str) -> int:
    n = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * len(shape)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        div = math.prod(sizes[a] for a in axes)
        if dim % div:
            raise ConfigError(f"sharding: parameter '{path}' dimension of size {dim} does not "
                              f"divide by mesh axes {entry} (size {div})")
        n *= dim // div
    return n


def activation_bytes(cfg: Config, sizes: dict[str, int], rules: shd.Rules) -> int:
    """Activations kept for the backward pass, per device (an estimate, not a measurement).

    Per layer and token: with remat "full" only the layer input (D); "save_dots" the matmul
    outputs (q, k, v, attention output, gate, up, down); "none" those plus norms, activations and
    the attention probabilities (H x T per token, float32). Plus one layer's working set, and
    the float32 logits of the loss (divided by loss.vocab_chunks).
    """
    m, t = cfg.model, cfg.train
    batch_div = math.prod(sizes[a] for a in rules.get("batch", ()))
    tensor = sizes.get("tensor", 1) if rules.get("mlp") == ("tensor",) else 1
    rows = max(t.batch_size // t.grad_accum // batch_div, 1)
    tokens = rows * t.seq_len
    d, f, h, kv, hd = (m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads,
                       m.resolved_head_dim)
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    dots = (h * hd + 2 * kv * hd + 2 * d + 3 * f / tensor) * itemsize
    probs = h / tensor * t.seq_len * 4
    full_layer = dots + (4 * d + f / tensor) * itemsize + probs
    per_token_layer = {"full": d * itemsize, "save_dots": dots, "none": full_layer}[m.remat]
    logits = tokens * m.vocab_size / tensor * 4 / cfg.loss.vocab_chunks
    return int(tokens * (m.num_layers * per_token_layer + full_layer) + 2 * logits)


def make_plan(cfg: Config, num_devices: int) -> Plan:
    """The per-device memory plan of `cfg` on `num_devices` devices."""
    sizes = shd.axis_sizes(cfg.mesh, num_devices)
    rules = shd.resolve_rules(cfg.sharding)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    names = logical_axes(state).to_pure_dict()
    shapes = state.to_pure_dict()
    param_bytes = opt_bytes = grad_bytes = 0
    num_params = 0
    for (path, leaf), axes in zip(
        jax.tree_util.tree_leaves_with_path(shapes),
        jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)),
    ):
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        spec = shd.logical_to_spec(axes, rules)
        elems = _shard_elems(tuple(leaf.shape), spec, sizes, key)
        itemsize = np.dtype(leaf.dtype).itemsize
        param_bytes += elems * itemsize
        grad_bytes += elems * itemsize
        opt_bytes += elems * 4 * 2  # AdamW: two float32 moments per parameter
        num_params += math.prod(leaf.shape)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    batch_div = math.prod(sizes[a] for a in rules.get("batch", ()))
    if micro % batch_div:
        raise ConfigError(f"train.batch_size: micro-batch of {micro} rows does not divide by the "
                          f"batch mesh axes (size {batch_div})")
    # Trained copies (PPO trains a policy and a value model of the same shape) and frozen ones
    # (the reference policy for PPO/GRPO/RLOO, and for DPO unless its log-probs are precomputed).
    trained = 2 if cfg.trainer == "ppo" else 1
    frozen = int(cfg.trainer in ("ppo", "grpo", "rloo") and not cfg.rl.offload_frozen) + int(
        cfg.trainer == "dpo" and not cfg.dpo.precompute_ref)
    return Plan(mesh=sizes, params=param_bytes * (trained + frozen),
                optimizer=opt_bytes * trained, gradients=grad_bytes * trained,
                activations=activation_bytes(cfg, sizes, rules), num_params=num_params * trained)


def format_plan(plan: Plan, hbm_gib: float | None) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [f"mesh: {mesh} ({math.prod(plan.mesh.values())} devices); "
             f"{plan.num_params / 1e9:.2f}B parameters",
             "per device:"]
    for name in ("params", "optimizer", "gradients", "activations"):
        lines.append(f"  {name:<12} {getattr(plan, name) / GIB:8.2f} GiB")
    lines.append(f"  {'total':<12} {plan.total / GIB:8.2f} GiB"
                 + (f" of {hbm_gib:g} GiB" if hbm_gib else ""))
    return "\n".join(lines)


def check_fits(plan: Plan, hbm_gib: float) -> None:
    if plan.total > hbm_gib * GIB:
        raise ConfigError(f"plan: needs {plan.total / GIB:.1f} GiB per device but only "
                          f"{hbm_gib:g} GiB are available (params {plan.params / GIB:.1f}, "
                          f"optimizer {plan.optimizer / GIB:.1f}, gradients "
                          f"{plan.gradients / GIB:.1f}, activations {plan.activations / GIB:.1f})")
