"""Safetensors checkpoints streamed one tensor at a time, in both directions.

Reading memory-maps each shard and hands every device only its slice of each tensor
(`jax.make_array_from_callback`), so the model is never whole on one host. Writing fetches one
parameter at a time and appends its bytes to the current shard file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxalign import sharding as shd
from jaxalign.errors import ConfigError, UserError
from jaxalign.hf.convert import IGNORED_TENSOR_SUFFIXES, TensorMap
from jaxalign.paths import run_path

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte offset of its data."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{file}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file}: not a safetensors file (bad header)") from None
    return header, 8 + size


class SafetensorsCheckpoint:
    """All tensors of a model directory (one `model.safetensors`, or shards with an index).

    `get(name)` returns a read-only memory map: only the slices that are indexed get read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.directory / f for f in weight_map.values()})
        elif (self.directory / SINGLE_FILE).is_file():
            files = [self.directory / SINGLE_FILE]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{self.directory}: no *.safetensors weights found (PyTorch .bin "
                "checkpoints are not supported; convert them to safetensors)"
            )
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            if not file.is_file():
                raise UserError(f"{file}: shard named in {INDEX_FILE} is missing")
            header, data_start = _read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise UserError(
                        f"{file}: tensor {name}: dtype {info['dtype']} is not supported"
                    )
                self.entries[name] = TensorEntry(
                    file,
                    _DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    data_start + info["data_offsets"][0],
                )

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if math.prod(e.shape) == 0:
            return np.zeros(e.shape, e.dtype)
        return np.memmap(e.file, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape)


def _get_path(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer_path(stacked_path: tuple, layer: int) -> tuple:
    """('blocks', 'attn', 'wq') -> ('blocks', layer, 'attn', 'wq') (also under a prefix)."""
    at = stacked_path.index("blocks") + 1
    return (*stacked_path[:at], layer, *stacked_path[at:])


def check_tensors(ckpt: SafetensorsCheckpoint, maps: list[TensorMap]) -> None:
    """Every expected tensor present with its shape, and no unexpected ones."""
    expected = {m.hf_name: m for m in maps}
    for name, m in expected.items():
        if name not in ckpt.entries:
            raise UserError(f"{ckpt.directory}: tensor '{name}' is missing from the checkpoint")
        shape = ckpt.entries[name].shape
        if shape != m.hf_shape:
            raise UserError(
                f"{ckpt.directory}: tensor '{name}' has shape {shape}, expected "
                f"{m.hf_shape} from config.json"
            )
    for name in ckpt.entries:
        if name in expected or name.endswith(IGNORED_TENSOR_SUFFIXES):
            continue
        if name == "lm_head.weight" and "model.embed_tokens.weight" in expected:
            continue  # tied embeddings: some checkpoints store the copy anyway
        raise UserError(
            f"{ckpt.directory}: unexpected tensor '{name}' (config.json does not "
            "describe it, e.g. a bias or head jaxalign's model lacks)"
        )


def _map_grid(keys: tuple, shape: tuple, by_path: dict) -> np.ndarray | None:
    """The maps of one parameter as an object array over its leading stacked axes: none (one
    tensor), layers (scan-stacked `blocks`), experts (a trailing expert index in the maps'
    paths), or both; None when no map covers it."""
    candidates = [(keys, 0)]
    if "blocks" in keys:
        candidates.append((_layer_path(keys, 0), 1))
    for path, layered in candidates:
        for expert in (False, True):
            if (path + (0,) if expert else path) not in by_path:
                continue
            lead = shape[: layered + expert]
            grid = np.empty(lead, dtype=object)
            for index in np.ndindex(*lead):
                p = _layer_path(keys, index[0]) if layered else keys
                grid[index] = by_path[p + index[layered:]]
            return grid
    return None


def _read_grid(ckpt, grid: np.ndarray, idx: tuple, dtype) -> np.ndarray:
    """The slice `idx` of the parameter whose leading axes `grid` covers, read tensor by tensor."""
    lead = grid.ndim
    maps = grid[idx[:lead]] if lead else grid
    rest = idx[lead:]
    if lead == 0:
        m = maps.item()
        return np.asarray(m.to_jax(ckpt.get(m.hf_name))[rest]).astype(dtype, copy=True)
    parts = [np.asarray(m.to_jax(ckpt.get(m.hf_name))[rest]).astype(dtype) for m in maps.flat]
    return np.stack(parts).reshape(*maps.shape, *parts[0].shape)


def load_tensors(
    ckpt: SafetensorsCheckpoint,
    maps: list[TensorMap],
    abstract: Any,
    shardings: Any,
) -> dict:
    """Build the params dict (shaped like `abstract`, placed on `shardings`) from `ckpt`.

    Stacked (scan-over-layers) leaves under `blocks` are assembled layer slice by layer slice.
    """
    check_tensors(ckpt, maps)
    by_path = {m.path: m for m in maps}
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        sharding = _get_path(shardings, keys)
        dtype = np.dtype(leaf.dtype)
        grid = _map_grid(keys, tuple(leaf.shape), by_path)
        if grid is not None:

            def read(idx, grid=grid, dtype=dtype):
                return _read_grid(ckpt, grid, idx, dtype)
        else:
            name = ".".join(str(k) for k in keys)
            raise ConfigError(f"parameter '{name}' has no Hugging Face tensor")
        array = jax.make_array_from_callback(tuple(leaf.shape), sharding, read)
        if array.shape != tuple(leaf.shape):
            raise UserError(f"tensor for '{keys}' has shape {array.shape}, expected {leaf.shape}")
        _set_path(out, keys, array)
    return out


def iter_hf_tensors(
    params: dict, maps: list[TensorMap], stacked: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) per Hugging Face tensor, fetched one at a time from (sharded) params."""
    for m in maps:
        path, lead = m.path, ()
        if stacked and "blocks" in path:
            at = path.index("blocks") + 1
            path, lead = path[:at] + path[at + 1 :], (path[at],)
        if isinstance(path[-1], int):  # one expert of a stacked [E, ...] parameter
            path, lead = path[:-1], (*lead, path[-1])
        value = _get_path(params, path)
        value = value[lead] if lead else value
        yield m.hf_name, np.ascontiguousarray(m.to_hf(shd.host_array(value)))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def write_safetensors(
    directory: str | os.PathLike,
    tensors: Iterator[tuple[str, np.ndarray]],
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    *,
    max_shard_size: int | str = "5GB",
    write: bool = True,
) -> list[str]:
    """Stream `tensors` (in the order of `specs`: name, shape, dtype) into safetensors shards
    of at most `max_shard_size` bytes each; returns the file names. With several shards, also
    writes the index. `write=False` consumes the iterator without writing (non-main processes).
    """
    limit = _parse_size(max_shard_size)
    groups: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    n = len(groups)
    names = (
        [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    directory = run_path(directory, key="output")
    weight_map = {}
    total = 0
    for file_name, group in zip(names, groups, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in group:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f = (directory / file_name).open("wb") if write else None
        try:
            if f:
                f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape, dtype in group:
                got_name, array = next(tensors)
                if got_name != name or array.shape != tuple(shape):
                    raise AssertionError(f"tensor order mismatch: {got_name} vs {name}")
                if f:
                    f.write(array.astype(dtype, copy=False).tobytes())
        finally:
            if f:
                f.close()
    if n > 1 and write:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
