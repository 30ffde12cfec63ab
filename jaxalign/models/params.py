"""A model's parameters as the loop needs them: logical axes (read from Flax's sharding
metadata), abstract shapes and shardings, initialization straight into the shardings, and the
auxiliary losses a forward pass sowed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.models.auto import target_platform
from jaxalign.models.ops import dense as dense  # re-exported for callers
from jaxalign.models.ops import param as param  # re-exported for callers
from jaxalign.models.registry import build


class AuxLoss(nnx.Variable):
    """An auxiliary loss a module sows during its forward pass (already weighted), e.g.
    `self.sow(AuxLoss, "router_balance", coef * balance)`, a mean per target; the train step
    adds their sum times the loss's denominator. Sow in the model's own forward: blocks run from
    split state (layer scan, remat), so values sown inside a block do not reach the model."""


def pop_aux_loss(model: nnx.Module) -> jax.Array | None:
    """The float32 sum of the `AuxLoss` values `model` sowed since the last pop (None when it
    sowed none); clears them, so the next forward pass starts fresh."""
    values = jax.tree.leaves(nnx.pop(model, AuxLoss))
    if not values:
        return None
    return sum(jnp.sum(v, dtype=jnp.float32) for v in values)


class AuxMetric(nnx.Variable):
    """A metric a module sows during its forward pass (a MoE router's expert load), a mean per
    target: the train step reports it beside the loss's metrics, under its sown name."""


def pop_aux_metrics(model: nnx.Module) -> dict[str, jax.Array]:
    """The `AuxMetric` values `model` sowed since the last pop, by name (the mean of a name's
    values when several forward passes sowed it); clears them."""
    out: dict[str, list] = {}
    for path, var in nnx.to_flat_state(nnx.pop(model, AuxMetric)):
        values = var.get_value()
        out.setdefault(str(path[-1]), []).extend(values if isinstance(values, tuple) else [values])
    return {k: sum(v) / len(v) for k, v in out.items()}


def logical_axes(state: Any) -> Any:
    """The pytree of logical axis-name tuples of a model state (abstract or concrete), read from
    each variable's `out_sharding` metadata (what `nnx.get_partition_spec` reads; scanned blocks
    carry their leading `layers` axis there). None where a variable has none."""

    def names(var):
        axes = var.get_metadata().get("out_sharding")
        return tuple(axes) if axes is not None else None

    return jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def default_model(cfg: Config):
    """The model factory used unless an algorithm supplies `make_model`: `cfg.model`'s family."""
    return lambda rngs: build(cfg.model, rngs)


def build_model(cfg: Config, mesh: Mesh, rules: shd.Rules, make_model=None):
    """graphdef, abstract params, and parameter shardings for the model (validated)."""
    make_model = make_model or default_model(cfg)
    with target_platform(mesh):  # `auto` settings resolve for the mesh's devices
        abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    names = logical_axes(abstract_state).to_pure_dict()
    abstract_params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract_state.to_pure_dict()
    )
    shardings = shd.logical_to_sharding(names, mesh, rules)
    shd.validate_shardings(abstract_params, shardings, mesh)
    return graphdef, abstract_params, shardings


def init_params(cfg: Config, shardings: Any, seed: int, make_model=None) -> Any:
    """Initialize parameters directly into their shardings (never whole on one device)."""
    make_model = make_model or default_model(cfg)

    def init(key):
        return nnx.split(make_model(nnx.Rngs(params=key)))[1].to_pure_dict()

    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
