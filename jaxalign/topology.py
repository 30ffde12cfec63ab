"""TPU slices by name ("v5p-64", "v5e-256", "2xv6e-256") and what their chips can do.

`topology_devices(name)` gives the devices of a slice (or several) as XLA's TPU compiler sees
them, on any host: `jax.experimental.topologies.get_topology_desc` with the arguments MaxText's
`accelerator_to_spec_map.py` uses. No TPU is needed, only the `libtpu` package
(`pip install "jax[tpu]==<jax version>"`); the devices can be compiled for, never run on.

`CHIPS` holds each chip's HBM, peak bf16 FLOP/s and HBM bandwidth: what `fits` compares a
compiled peak with, and what a roofline step time divides by.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from jaxalign.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Chip:
    """One TPU chip (one JAX device: v4 and v5p run their two TensorCores as one megacore)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s, dense bf16 matmuls
    hbm_bandwidth: float  # bytes/s


# Per-chip figures from Google Cloud's system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, read 2026-12):
#   v4:  32 GiB HBM2, 275 TFLOP/s bf16, 1,228 GB/s
#   v5e: 16 GiB HBM2, 197 TFLOP/s bf16,   819 GB/s
#   v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s
#   v6e (Trillium): 32 GiB HBM, 918 TFLOP/s bf16, 1,640 GB/s
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}

# Chip generation -> (libtpu topology prefix, chip config, chips in the slice -> chip grid).
# v4/v5p slices are 3-D tori named by TensorCores (v5p-64 = 32 chips); v5e/v6e slices are 2-D
# and named by chips. Grids and wrap-around as in MaxText's accelerator_to_spec_map.py.
_GRID_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    192: "4x4x12",
    256: "4x8x8",
    384: "4x8x12",
    512: "8x8x8",
    768: "8x8x12",
    1024: "8x8x16",
    2048: "8x16x16",
}
_GRID_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_GENERATIONS = {
    # generation: (topology prefix, chip config, grids, name counts TensorCores)
    "v4": ("v4", "megacore", _GRID_3D, True),
    "v5p": ("v5", "megacore", _GRID_3D, True),
    "v5e": ("v5e", "default", _GRID_2D, False),
    "v6e": ("v6e", "default", _GRID_2D, False),
}


@dataclass(frozen=True)
class Topology:
    """The `get_topology_desc` arguments of one named slice, times `num_slices`."""

    name: str
    chip: Chip
    topology_name: str  # e.g. "v5:2x4x4"
    chip_config_name: str  # "megacore" (v4, v5p) or "default"
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        grid = self.topology_name.split(":")[1]
        return math.prod(int(n) for n in grid.split("x")) * self.num_slices


def _wrap(grid: str) -> tuple[bool, bool, bool]:
    """A dimension wraps around (a torus ring) when it spans a whole 4- (3-D) or 16-chip
    (2-D) ring: v5p-128 and larger, v5e-128's long side, v5e/v6e-256."""
    dims = [int(n) for n in grid.split("x")]
    full = 4 if len(dims) == 3 else 16
    if len(dims) == 3:
        wrap = [all(d >= full for d in dims)] * 3
    else:
        wrap = [d >= full for d in dims] + [False]
    return tuple(wrap)  # type: ignore[return-value]


def known_topologies() -> list[str]:
    """Every slice name `parse_topology` accepts (besides an `Nx` multi-slice prefix)."""
    names = []
    for generation, (_, _, grids, by_cores) in _GENERATIONS.items():
        names += [f"{generation}-{chips * 2 if by_cores else chips}" for chips in grids]
    return names


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """A slice by name ("v5p-64", "v5e-4", "v6e-256") or several ("2xv5p-64": two slices over
    the data-center network, like `num_slices=2`). ConfigError listing the known names."""
    match = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    grid = None
    if match:
        slices, generation, count = match.group(1), match.group(2), int(match.group(3))
        prefix, chip_config, grids, by_cores = _GENERATIONS[generation]
        chips = count // 2 if by_cores else count
        grid = grids.get(chips) if not by_cores or count % 2 == 0 else None
    if grid is None:
        raise ConfigError(
            f"topology: unknown TPU slice '{name}'; known: {', '.join(known_topologies())} "
            f"(prefix 'Nx' for N slices, e.g. 2xv5p-64)"
        )
    num_slices *= int(slices) if slices else 1
    host = (1, 1, 1) if chips == 1 else (2, 2, 1)
    return Topology(
        name=name,
        chip=CHIPS[generation],
        topology_name=f"{prefix}:{grid}",
        chip_config_name=chip_config,
        chips_per_host_bounds=host,
        wrap=_wrap(grid),
        num_slices=num_slices,
    )


def prepare_host() -> None:
    """Environment for compiling TPU programs on a host without TPUs: skip the metadata-server
    query, and let several processes load libtpu at once (its lock file is for a real TPU).
    Effective only before libtpu is first loaded; existing settings are kept."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
    """Whether the TPU compiler (the `libtpu` package) is installed."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology | str, num_slices: int = 1) -> Sequence:
    """The devices of a TPU topology, for meshes to compile on (never to run on)."""
    if isinstance(topology, str):
        topology = parse_topology(topology, num_slices)
    if not libtpu_available():
        raise ConfigError(
            f"topology {topology.name}: compiling for a TPU needs libtpu: "
            'pip install "jax[tpu]==<your jax version>" (or: pip install -e ".[test]")'
        )
    prepare_host()
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.topology_name,
        chip_config_name=topology.chip_config_name,
        chips_per_host_bounds=topology.chips_per_host_bounds,
        num_slices=topology.num_slices,
        wrap=topology.wrap,
    )
    return desc.devices


def chip_of(device) -> Chip | None:
    """The `CHIPS` entry of a TPU device (by its device_kind, e.g. "TPU v5 lite"), else None."""
    kind = getattr(device, "device_kind", "").lower()
    if getattr(device, "platform", "") != "tpu":
        return None
    for key, generation in (
        ("v6", "v6e"),
        ("v5 lite", "v5e"),
        ("v5e", "v5e"),
        ("v5", "v5p"),
        ("v4", "v4"),
    ):
        if key in kind:
            return CHIPS[generation]
    return None
