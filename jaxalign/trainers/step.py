"""The one generic train step: `(state, batch) -> (state, metrics)`.

An algorithm plugs in a loss function

    loss_fn(model, batch, rng, frozen) -> (loss_sum, denominator, metric_sums)

that returns an *unnormalized* sum over its examples (tokens, pairs, ...) and how many there were.
`frozen` is a pytree the loss reads but never trains (e.g. reference-policy params), or None.
Over `grad_accum` micro-batches the step sums losses, gradients and denominators, then divides
once by the total denominator: the loss is normalized by the number of targets in the whole batch,
not averaged over per-micro-batch means.

Metrics are sums divided the same way, except those whose name starts with `max:` or `min:`
(e.g. `max:reward/max`): these are reduced by max or min over micro-batches (and, in evals, over
batches), reported as they are under the name without the tag. A micro-batch without examples
returns the reduction's identity (-inf for max, +inf for min).

Auxiliary losses a model sows in its forward pass (a MoE router's balancing loss) are added to
every algorithm's loss here (`with_aux_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.models.lora import dropout_key
from jaxalign.models.params import pop_aux_loss, pop_aux_metrics
from jaxalign.optim import trained_part, with_trained

LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, jax.Array, dict]]

# Metric-name tags for max/min reduction instead of the default sum.
REDUCTIONS = {"max:": (jnp.maximum, -jnp.inf, max), "min:": (jnp.minimum, jnp.inf, min)}


def metric_reduction(name: str) -> str | None:
    """The tag (`"max:"` or `"min:"`) of a max/min-reduced metric name, None for a sum."""
    return next((tag for tag in REDUCTIONS if name.startswith(tag)), None)


def metric_name(name: str) -> str:
    """The reported name: without its `max:`/`min:` tag."""
    tag = metric_reduction(name)
    return name[len(tag) :] if tag else name


def combine_metrics(totals: dict, metrics: dict) -> dict:
    """Fold one (micro-)batch's metrics into running totals: sums add, tagged metrics take the
    max or min. Works on arrays (in a jitted step) and on Python floats (on the host)."""
    out = {}
    for name, value in metrics.items():
        tag = metric_reduction(name)
        if tag is None:
            out[name] = totals[name] + value
        else:
            reduce = REDUCTIONS[tag][0] if isinstance(value, jax.Array) else REDUCTIONS[tag][2]
            out[name] = reduce(totals[name], value)
    return out


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Held-out metrics from the totals of every eval batch (`combine_metrics` of
    `make_eval_step` outputs): sums divided by the total denominator, max/min as they are."""
    totals = dict(totals)
    denom = max(totals.pop("denominator", 0.0), 1.0)
    out = {}
    for name, value in totals.items():
        if metric_reduction(name) is None:
            out[name.removesuffix("_sum")] = value / denom
        else:
            out[metric_name(name)] = value
    return out


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, labels=None) -> dict:
    """Train state pytree: step, params, optimizer state (of the trained part of `params`, see
    `jaxalign.optim.trained_part`; labels None: all of it), RNG key."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(trained_part(params, labels)),
        "rng": jax.random.PRNGKey(seed),
        # Non-finite guard: the first step (1-based) whose loss or gradients were not finite
        # (0: none yet), and how many such steps came in a row.
        "first_bad_step": jnp.zeros((), jnp.int32),
        "consecutive_bad": jnp.zeros((), jnp.int32),
    }


def with_aux_loss(model: nnx.Module, loss_sum: jax.Array, denom: jax.Array) -> jax.Array:
    """`loss_sum` plus the auxiliary losses `model` sowed in the loss's forward passes (see
    `jaxalign.models.registry`), each a per-target mean, so it counts `denom` times."""
    aux = pop_aux_loss(model)
    return loss_sum if aux is None else loss_sum + aux * denom


def with_aux_metrics(model: nnx.Module, metric_sums: dict, denom: jax.Array) -> dict:
    """`metric_sums` plus the metrics `model` sowed (per-target means, so each counts `denom`
    times, as a sum the step divides by the batch's denominator)."""
    aux = pop_aux_metrics(model)
    return {**metric_sums, **{k: v * denom for k, v in aux.items()}}


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    params: Any,
    batch: dict,
    rng: jax.Array,
    frozen: Any = None,
    all_params: Any = None,
) -> tuple[Any, jax.Array, jax.Array, dict]:
    """Sum of gradients, loss sums, denominators and metric sums over the leading micro-batch
    axis of every array in `batch` ([A, micro_batch, ...]).

    Gradients are taken with respect to `params` only: with `all_params` (the whole tree, of
    which `params` is the trained part) the rest enters the loss as constants, so no gradient
    of a frozen parameter is ever computed or stored. LoRA dropout draws from `rng`."""

    def grads_of(micro_batch, micro_rng):
        def objective(p):
            model = nnx.merge(graphdef, p if all_params is None else with_trained(all_params, p))
            with dropout_key(jax.random.fold_in(micro_rng, 0x10A)):
                loss_sum, denom, metric_sums = loss_fn(model, micro_batch, micro_rng, frozen)
            metric_sums = with_aux_metrics(model, metric_sums, denom)
            return with_aux_loss(model, loss_sum, denom), (denom, metric_sums)

        return jax.value_and_grad(objective, has_aux=True)(params)

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    rngs = jax.random.split(rng, num_micro)
    if num_micro == 1:
        (loss_sum, (denom, metric_sums)), grads = grads_of(
            jax.tree.map(lambda x: x[0], batch), rngs[0]
        )
        return grads, loss_sum, denom, metric_sums

    first = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], batch), rngs[0])
    (_, (_, metric_shapes)), _ = first
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    metric_init = {
        name: jnp.full(shape.shape, REDUCTIONS[tag][1] if tag else 0, shape.dtype)
        for name, shape in metric_shapes.items()
        for tag in [metric_reduction(name)]
    }
    init = (zeros, jnp.zeros(()), jnp.zeros(()), metric_init)

    def body(carry, xs):
        micro_batch, micro_rng = xs
        g_acc, l_acc, d_acc, m_acc = carry
        (loss_sum, (denom, metric_sums)), grads = grads_of(micro_batch, micro_rng)
        g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
        m_acc = combine_metrics(m_acc, metric_sums)
        return (g_acc, l_acc + loss_sum, d_acc + denom, m_acc), None

    (grads, loss_sum, denom, metric_sums), _ = jax.lax.scan(body, init, (batch, rngs))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, loss_sum, denom, metric_sums


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    labels: Any = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The pure step function; the trainer jits it with shardings and donation. With `labels`
    ('trained'/'frozen' per parameter, see `jaxalign.optim.freeze_labels`) only the trained
    part is differentiated and updated (`tx` is built for it); the rest is read as it is."""

    def train_step(state: dict, batch: dict, frozen: Any = None) -> tuple[dict, dict]:
        rng, step_rng = jax.random.split(state["rng"])
        trained = trained_part(state["params"], labels)
        grads, loss_sum, denom, metric_sums = accumulate_gradients(
            graphdef,
            loss_fn,
            trained,
            batch,
            step_rng,
            frozen,
            None if labels is None else state["params"],
        )
        scale = 1.0 / jnp.maximum(denom, 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        new_trained = optax.apply_updates(trained, updates)
        # Never apply an update computed from a non-finite loss or gradient.
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_trained, opt_state = keep(new_trained, trained), keep(opt_state, state["opt_state"])
        params = new_trained if labels is None else with_trained(state["params"], new_trained)
        step = state["step"] + 1
        first_bad = jnp.where(finite | (state["first_bad_step"] > 0), state["first_bad_step"], step)
        consecutive = jnp.where(finite, 0, state["consecutive_bad"] + 1)
        metrics = {
            "loss": loss_sum * scale,
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.float32),
            "lr": schedule(state["step"]),
            "denominator": denom,
            **{
                metric_name(k): v if metric_reduction(k) else v * scale
                for k, v in metric_sums.items()
            },
        }
        new_state = {
            "step": step,
            "params": params,
            "opt_state": opt_state,
            "rng": rng,
            "first_bad_step": first_bad.astype(jnp.int32),
            "consecutive_bad": consecutive.astype(jnp.int32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn) -> Callable[[Any, dict], dict]:
    """Loss sums of one batch ([A, micro_batch, ...]) without gradients, for held-out evals:
    `loss_sum`, `denominator` and the metric sums, max/min-tagged metrics reduced over the
    micro-batches and still tagged (`eval_metrics` turns the totals of all batches into means)."""

    def eval_step(params: Any, batch: dict, frozen: Any = None) -> dict:
        def one(carry, micro_batch):
            model = nnx.merge(graphdef, params)
            rng = jax.random.PRNGKey(0)
            loss_sum, denom, metric_sums = loss_fn(model, micro_batch, rng, frozen)
            metric_sums = with_aux_metrics(model, metric_sums, denom)
            return carry, (with_aux_loss(model, loss_sum, denom), denom, metric_sums)

        _, (loss_sum, denom, metric_sums) = jax.lax.scan(one, None, batch)
        # over the micro-batch axis only: a metric may be a vector (a MoE's expert load)
        reduce = {
            None: lambda v: jnp.sum(v, 0),
            "max:": lambda v: jnp.max(v, 0),
            "min:": lambda v: jnp.min(v, 0),
        }
        return {
            "loss_sum": loss_sum.sum(),
            "denominator": denom.sum(),
            **{k: reduce[metric_reduction(k)](v) for k, v in metric_sums.items()},
        }

    return eval_step
