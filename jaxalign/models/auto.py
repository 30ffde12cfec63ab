"""`auto` model settings, resolved for the platform the model is compiled for.

The platform is the one of the mesh the program is built on (`target_platform(mesh)`), not
JAX's default backend: `jaxalign plan --compile --topology v5p-64` builds TPU programs in a
process whose default backend is the CPU. Outside such a context, the default backend.

A new `auto` setting is one entry of `AUTO_SETTINGS`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax

# model.<setting>: "auto" -> {platform: value}, "default" for platforms not listed.
AUTO_SETTINGS: dict[str, dict[str, Any]] = {
    # CPU: blocks of 64 queries keep each block's scores in cache (docs/performance.md); GPU
    # and TPU run one fused attention.
    "attention_query_block": {"cpu": 64, "default": 0},
    # TPU: splash attention (jaxalign/models/splash.py); elsewhere jaxalign's einsum attention.
    "attention_kernel": {"tpu": "splash", "default": "einsum"},
    # The dropless experts' grouped matmul (jaxalign/models/moe.py). TPU: the megablox Pallas
    # kernel (XLA's compiled cost of a Qwen3-30B-A3B expert layer: 6x fewer FLOPs than
    # ragged_dot's lowering, a 1.8x better roofline; docs/performance.md, "Megablox"); CPU:
    # whole tiles per expert in batched matmuls (XLA's CPU ragged_dot multiplies every row by
    # every expert); GPU: ragged_dot.
    "moe_kernel": {"tpu": "megablox", "cpu": "tiled", "default": "ragged_dot"},
    # Context parallelism's attention (models/context_attention.py, docs/context.md): on CPU
    # all-gather (bench/context_step.py: 1.19x context=1's step time, ring 1.92x); elsewhere
    # ring, which holds one remote K/V block at a time (not yet timed on a TPU or GPU).
    "context_attention": {"cpu": "allgather", "default": "ring"},
}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxalign_target_platform", default=None
)


def mesh_platform(mesh: Any) -> str:
    """The platform ("cpu", "gpu", "tpu") of a Mesh's (or a device list's) devices."""
    devices = mesh.devices.flat if hasattr(mesh, "devices") else mesh
    platform = next(iter(devices)).platform
    return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def target_platform(mesh: Any) -> Iterator[str]:
    """Within this context, `auto` settings resolve for the platform of `mesh`'s devices."""
    with platform_named(mesh_platform(mesh)) as platform:
        yield platform


@contextlib.contextmanager
def platform_named(platform: str) -> Iterator[str]:
    """Within this context, `auto` settings resolve for `platform` ("cpu", "gpu", "tpu"): what
    `jaxalign plan --platform` estimates for, with no such device at hand."""
    token = _TARGET.set(platform)
    try:
        yield platform
    finally:
        _TARGET.reset(token)


def current_platform() -> str:
    """The platform being built for: the innermost `target_platform`, else JAX's default
    backend."""
    return _TARGET.get() or jax.default_backend()


def resolve(setting: str, value: Any, platform: str | None = None) -> Any:
    """`value` of model.`setting`, with "auto" replaced by its AUTO_SETTINGS entry for
    `platform` (default: `current_platform()`)."""
    if value != "auto":
        return value
    table = AUTO_SETTINGS[setting]
    return table.get(platform or current_platform(), table["default"])


def resolve_auto(cfg: Any, platform: str | None = None) -> Any:
    """A ModelConfig with every `auto` setting of AUTO_SETTINGS resolved for `platform`."""
    changes = {
        name: resolve(name, getattr(cfg, name), platform)
        for name in AUTO_SETTINGS
        if getattr(cfg, name, None) == "auto"
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg
