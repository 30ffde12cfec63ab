"""The two building blocks every model module and the LoRA adapters share: the flat 2-D
projection and a parameter carrying its logical axis names. No jaxalign imports, so any module
(model families, `models.lora`) can use them without an import cycle."""

from __future__ import annotations

import math

import jax
from flax import nnx


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract the last `n_in` dims of x with the first `n_in` dims of w, as one 2-D matmul."""
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    y = x.reshape(-1, math.prod(in_shape)) @ w.reshape(math.prod(in_shape), -1).astype(x.dtype)
    return y.reshape(*lead, *out_shape)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter whose logical axis names are Flax sharding metadata (`out_sharding`).

    `eager_sharding=False`: the names are logical, mapped to mesh axes by `jaxalign.sharding`'s
    rules when the state is placed, not by Flax at creation."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)
