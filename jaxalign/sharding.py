"""Device mesh, logical-axis rules, and their validation.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`, ...). Two rules
tables map each logical name to mesh axes: one for parameters, one for activations (batches, KV
caches, the values `constrain` pins), so "parameters FSDP over X, activations over Y" can be said
directly. `logical_to_sharding` turns a pytree of logical names into `NamedSharding`s. Users change
sharding by editing the tables (config `sharding.*`), never the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.config import AXIS_NAMES, MeshConfig, ShardingConfig
from jaxalign.errors import ConfigError

LOGICAL_AXES = (
    "batch",
    "length",
    "cache_length",
    "embed",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "vocab",
    "layers",
    "norm",
    "expert",
    "lora_rank",
)

# The default: FSDP over `fsdp`, tensor parallelism over `tensor`, batch over data and fsdp.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ["data", "fsdp"],
    "length": "context",  # a row's tokens: split over `context` (context parallelism)
    # A KV cache's slots: whole on every device (decoding reads all of them per token; a long
    # prompt's prefill gathers its keys and values into the cache: docs/context.md).
    "cache_length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "expert": "expert",  # a MoE layer's experts (jaxalign/models/moe.py)
    "lora_rank": None,  # LoRA's rank axis: always replicated (A and B follow their base weight)
}

# Names only activations have: `logical_to_spec` reads them from the activation table whichever
# table it is given (a batch's sharding is the same in every context).
ACTIVATION_ONLY_AXES = ("batch", "length", "cache_length")


class Rules(dict):
    """The resolved parameter table (logical name -> tuple of mesh axes) with the activation
    table as `.activations`. A plain dict works wherever a `Rules` does: it serves as both."""

    def __init__(self, params: dict, activations: dict | None = None):
        super().__init__(params)
        self.activations: dict[str, tuple[str, ...]] = dict(
            params if activations is None else activations
        )

    def __repr__(self) -> str:
        return f"Rules(params={dict(self)!r}, activations={self.activations!r})"


def activation_table(rules: dict) -> dict[str, tuple[str, ...]]:
    """The activation rules of `rules` (a plain dict is its own activation table)."""
    return getattr(rules, "activations", rules)


def _normalize_rule(logical: str, value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else tuple(value)
    for axis in axes:
        if axis not in AXIS_NAMES:
            raise ConfigError(
                f"{where}: rule '{logical}' names unknown mesh axis '{axis}' "
                f"(mesh axes: {', '.join(AXIS_NAMES)})"
            )
    return axes


RULES_FILE_SECTIONS = ("rules", "activation_rules")


def resolve_rules(cfg: ShardingConfig) -> Rules:
    """Parameter table: the defaults, then `rules_file`'s `rules:`, then `rules`. Activation
    table: the parameter table, then the file's `activation_rules:`, then `activation_rules`.
    Both validated."""
    file_tables: dict[str, dict] = {}
    if cfg.rules_file:
        path = Path(cfg.rules_file)
        if not path.is_file():
            raise ConfigError(f"sharding.rules_file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with a 'rules:' section")
        for section, table in raw.items():
            if section not in RULES_FILE_SECTIONS:
                raise ConfigError(
                    f"{path}: unknown section '{section}' "
                    f"(expected: {', '.join(RULES_FILE_SECTIONS)})"
                )
            if not isinstance(table or {}, dict):
                raise ConfigError(f"{path}: '{section}:' must be a mapping of logical axes")
            file_tables[section] = table or {}
    where = str(cfg.rules_file)
    params = _apply(
        dict(DEFAULT_RULES),
        [(where, file_tables.get("rules", {})), ("sharding.rules", cfg.rules)],
    )
    activations = _apply(
        dict(params),
        [
            (f"{where} activation_rules", file_tables.get("activation_rules", {})),
            ("sharding.activation_rules", cfg.activation_rules),
        ],
    )
    return Rules(
        {k: _normalize_rule(k, v, "sharding.rules") for k, v in params.items()},
        {k: _normalize_rule(k, v, "sharding.activation_rules") for k, v in activations.items()},
    )


def _apply(merged: dict[str, Any], layers: list[tuple[str, dict]]) -> dict[str, Any]:
    """`merged` with each layer's entries on top, in order; unknown logical names are errors."""
    for where, rules in layers:
        for logical, value in rules.items():
            if logical not in LOGICAL_AXES:
                raise ConfigError(
                    f"{where}: unknown logical axis '{logical}' (known: {', '.join(LOGICAL_AXES)})"
                )
            if logical == "lora_rank" and value not in (None, [], ()):
                raise ConfigError(
                    f"{where}: 'lora_rank' is always replicated (LoRA's A and B are sharded "
                    f"like their base weight); remove it or set it to null"
                )
            merged[logical] = value
    return merged


def axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve per-axis sizes (ICI size x DCN size), filling one -1 axis."""
    ici = {a: getattr(cfg, a) for a in AXIS_NAMES}
    dcn = {a: getattr(cfg, f"dcn_{a}") for a in AXIS_NAMES}
    dcn_total = math.prod(dcn.values())
    if num_devices % dcn_total:
        raise ConfigError(f"mesh: {num_devices} devices do not divide into {dcn_total} DCN slices")
    per_slice = num_devices // dcn_total
    fixed = math.prod(v for v in ici.values() if v != -1)
    if -1 in ici.values():
        if per_slice % fixed:
            raise ConfigError(
                f"mesh: cannot fill the -1 axis: {per_slice} devices per slice do not divide by "
                f"the product of the other axes ({fixed})"
            )
        ici = {a: (per_slice // fixed if v == -1 else v) for a, v in ici.items()}
    if math.prod(ici.values()) != per_slice:
        sizes = " x ".join(f"{a}={v}" for a, v in ici.items())
        raise ConfigError(
            f"mesh: {sizes} needs {math.prod(ici.values())} devices per slice, "
            f"but {per_slice} are available"
        )
    return {a: ici[a] * dcn[a] for a in AXIS_NAMES}


def slice_groups(devices: Sequence[jax.Device], num_slices: int) -> list[list[jax.Device]]:
    """`devices` split into `num_slices` slices (the units of the DCN axes), each in its given
    order: by `slice_index` where the devices name several (multi-slice TPU); otherwise by process
    when the processes divide evenly into slices (multi-host GPU or CPU: hosts are the slices);
    otherwise contiguous groups of the device list (one process simulating slices, as in tests).
    """
    devices = list(devices)
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        keys = [d.slice_index for d in devices]
        source = "slice_index"
    else:
        processes = sorted({d.process_index for d in devices})
        if len(processes) > 1 and len(processes) % num_slices == 0:
            per_slice = len(processes) // num_slices
            keys = [processes.index(d.process_index) // per_slice for d in devices]
            source = "process"
        else:
            if len(devices) % num_slices:
                raise ConfigError(
                    f"mesh: {len(devices)} devices do not divide into {num_slices} DCN slices"
                )
            per_slice = len(devices) // num_slices
            keys = [i // per_slice for i in range(len(devices))]
            source = "position"
    groups: dict[int, list[jax.Device]] = {}
    for key, device in zip(keys, devices):
        groups.setdefault(key, []).append(device)
    if len(groups) != num_slices or len({len(g) for g in groups.values()}) != 1:
        counts = ", ".join(f"{k}: {len(g)}" for k, g in sorted(groups.items()))
        raise ConfigError(
            f"mesh: the dcn_* sizes make {num_slices} slices, but the devices form "
            f"{len(groups)} slice(s) by {source} (devices per slice: {counts})"
        )
    return [groups[k] for k in sorted(groups)]


def _slice_mesh(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """One slice's devices arranged as `shape`, topology-aware where JAX knows the topology."""
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_device_mesh(list(shape), devices=list(devices))
    except Exception:  # noqa: BLE001 - CPU/odd topologies: plain order is fine
        return np.asarray(devices).reshape(shape)


def hybrid_device_array(
    ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device]
) -> np.ndarray:
    """Devices shaped `ici * dcn` per axis: slice `s` (at DCN coordinates `unravel(s, dcn)`)
    fills the block of ICI shape at those coordinates, so each slice's devices are contiguous
    along every DCN axis and only the DCN part of an axis crosses slices (as
    `mesh_utils.create_hybrid_device_mesh`, which needs `slice_index` on the devices)."""
    slices = slice_groups(devices, math.prod(dcn))
    blocks = np.empty(len(slices), dtype=object)
    for i, group in enumerate(slices):  # one by one: numpy would broadcast a list of arrays
        blocks[i] = _slice_mesh(ici, group)
    return np.block(blocks.reshape(tuple(dcn)).tolist())


def fsdp_everywhere(cfg: MeshConfig) -> MeshConfig:
    """`cfg` with its model-parallel axes (expert, context, tensor) kept and FSDP over every
    other device, in one slice: how a frozen model from another run (a reward model) is placed
    on whatever devices are here now."""
    dcn = {f"dcn_{axis}": 1 for axis in AXIS_NAMES}
    return dataclasses.replace(cfg, data=1, fsdp=-1, **dcn)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the device mesh with axes (data, fsdp, expert, context, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1 and all(getattr(cfg, f"dcn_{a}") == 1 for a in AXIS_NAMES):
        # Several slices and no DCN split given: data parallelism across slices by default.
        cfg = dataclasses.replace(cfg, dcn_data=slices)
    sizes = axis_sizes(cfg, len(devices))
    dcn = [getattr(cfg, f"dcn_{a}") for a in AXIS_NAMES]
    if math.prod(dcn) > 1:
        ici = [sizes[a] // d for a, d in zip(AXIS_NAMES, dcn)]
        arr = hybrid_device_array(ici, dcn, devices)
    else:
        arr = _slice_mesh([sizes[a] for a in AXIS_NAMES], devices)
    return Mesh(arr, AXIS_NAMES)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per spec.

    `rules` is the table to read (parameters: a `Rules`; activations: its `.activations`);
    `batch` and `length` always come from the activation table."""
    if names is None:
        return P()
    activations = activation_table(rules)
    used: set[str] = set()
    out = []
    for name in names:
        table = activations if name in ACTIVATION_ONLY_AXES else rules
        axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _is_names(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Pytree of logical-name tuples -> pytree of NamedSharding."""
    return jax.tree.map(
        lambda names: NamedSharding(mesh, logical_to_spec(names, rules)),
        logical_tree,
        is_leaf=_is_names,
    )


def spec_axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in axes)


def validate_shardings(shapes: Any, shardings: Any, mesh: Mesh) -> None:
    """Every sharded dimension must divide by its mesh axes; errors name the parameter path."""

    def check(path, shape, sharding):
        spec = sharding.spec
        dims = shape.shape if hasattr(shape, "shape") else shape
        for dim, (size, entry) in enumerate(zip(dims, tuple(spec) + (None,) * len(dims))):
            n = spec_axis_size(mesh, entry)
            if size % n:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                raise ConfigError(
                    f"sharding: parameter '{name}'"
                    f" dimension {dim} of size {size} does not divide by mesh axes {entry} "
                    f"(size {n}); shape {tuple(dims)}, spec {spec}"
                )

    jax.tree_util.tree_map_with_path(check, shapes, shardings)


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """Number of shards of the batch dimension."""
    return math.prod(mesh.shape[a] for a in activation_table(rules).get("batch", ()))


def validate_batch(
    batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules, key: str = "train.batch_size"
) -> None:
    """ConfigError naming `key` unless a micro-batch (batch_size / grad_accum rows) splits
    evenly over the batch mesh axes."""
    micro = batch_size // grad_accum
    n = batch_divisor(mesh, rules)
    if micro % n:
        axes = "x".join(activation_table(rules).get("batch", ()))
        raise ConfigError(
            f"{key}: micro-batch of {micro} rows ({batch_size} / grad_accum "
            f"{grad_accum}) does not divide by the batch mesh axes {axes} (size {n})"
        )


# ---------------------------------------------------------------------------------------------
# Activation sharding constraints, active only inside `activation_sharding(mesh, rules)`.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxalign_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh per the activation table
    of `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, dict[str, tuple[str, ...]]] | None:
    """The mesh and activation table of the enclosing `activation_sharding`, or None outside one
    (what a hand-partitioned kernel, wrapped in `shard_map`, needs to know)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` to the sharding its logical axis names map to (no-op outside
    `activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    table = activation_table(rules)
    if "length" in names:  # a few tokens (decoding) stay whole; the other axes keep their rules
        dim = list(names).index("length")
        axes = tuple(a for a in table.get("length", ()) if a not in table.get("batch", ()))
        if x.shape[dim] % math.prod(mesh.shape[a] for a in axes):
            names = tuple(None if n == "length" else n for n in names)
    return _constrain_spec(x, mesh, logical_to_spec(names, table))


def _constrain_spec(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    for size, entry in zip(x.shape, spec):
        if size % spec_axis_size(mesh, entry):
            return x  # e.g. a batch of 1 during generation: leave it to the compiler
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _spec_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain_lookup(
    x: jax.Array, lead: Sequence[str | None], table: Sequence[str | None]
) -> jax.Array:
    """Lay out a row lookup in a parameter as the parameter lies (no-op outside
    `activation_sharding`).

    `table`: the parameter's logical axes, the looked-up one first. x: the indices [*lead], or
    the rows looked up [*lead, *table's other dims]. Those other dims are sharded as in the
    parameter (parameter table); `lead` per the activation table, over the mesh axes the
    parameter leaves free. Each device then reads its own shard of the parameter, and the
    lookup's gradient, a scatter-add, adds into that shard: no full-size gradient per device,
    no all-reduce of one.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    table_spec = tuple(logical_to_spec(table, rules))
    taken = {axis for entry in table_spec for axis in _spec_axes(entry)}
    lead_spec = []
    for entry in logical_to_spec(lead, activation_table(rules)):
        axes = tuple(a for a in _spec_axes(entry) if a not in taken)
        lead_spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    rows = table_spec[1:] if x.ndim > len(lead) else ()
    return _constrain_spec(x, mesh, P(*lead_spec, *rows))


def describe_activation_rules(rules: Rules) -> str:
    """One line: the activation table, as the names that differ from the parameter table."""
    acts = activation_table(rules)
    params = dict(rules)
    differ = {k: v for k, v in acts.items() if params.get(k) != v}
    if not differ:
        return (
            "activation rules: the parameter rules (batch over "
            + (" x ".join(acts.get("batch", ())) or "nothing")
            + ")"
        )
    shown = ", ".join(f"{k}: {' x '.join(v) if v else 'replicated'}" for k, v in differ.items())
    return f"activation rules: the parameter rules except {shown}"


def describe(shapes: Any, shardings: Any, mesh: Mesh) -> str:
    """A table of every parameter: shape, PartitionSpec, per-device bytes."""
    lines = [f"mesh: {dict(mesh.shape)} ({mesh.size} devices)"]
    rows = []
    total = 0
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)
    ):
        shape = tuple(leaf.shape)
        shard = sharding.shard_shape(shape)
        nbytes = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        rows.append(
            (
                jax.tree_util.keystr(path, simple=True, separator="."),
                str(shape),
                str(sharding.spec),
                f"{nbytes:,}",
            )
        )
    widths = [
        max(len(r[i]) for r in rows + [("parameter", "shape", "spec", "bytes/device")])
        for i in range(4)
    ]
    header = ("parameter", "shape", "spec", "bytes/device")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"total parameter bytes per device: {total:,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Arrays in host memory: whole (results every process reads), or each process's own shards
# (models kept in host memory between uses, rl.offload_frozen).


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array as numpy, on every process: `np.asarray`
    where this process holds all of it, else gathered from every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class HostArray:
    """This process's part of a jax.Array in host memory: one NumPy copy per distinct shard
    (a replicated array is stored once, not once per device), with the array's sharding."""

    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    shards: dict[tuple, np.ndarray]


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def to_host(tree: Any) -> Any:
    """Each array of `tree` as a `HostArray`. Works where an array spans several processes
    (each keeps its own shards), unlike `jax.device_get`, which needs the whole array."""

    def one(x: jax.Array) -> HostArray:
        shards: dict[tuple, np.ndarray] = {}
        for shard in x.addressable_shards:
            key = _index_key(shard.index)
            if key not in shards:
                shards[key] = np.asarray(shard.data)
        return HostArray(tuple(x.shape), x.sharding, shards)

    return jax.tree.map(one, tree)


def to_device(tree: Any) -> Any:
    """The arrays `to_host` stored, back on their devices with their shardings."""

    def one(h: HostArray) -> jax.Array:
        return jax.make_array_from_callback(
            h.shape, h.sharding, lambda index: h.shards[_index_key(index)]
        )

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, HostArray))
