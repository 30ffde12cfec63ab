"""Logical data shards: a global batch stream that does not depend on the number of processes.

The examples are split into `shards` logical shards (shard s holds examples [s::shards]), each
with its own shuffle/pack stream. Every global micro-batch takes `rows_per_shard` rows from each
shard, in shard order; process p runs only shards [p*k, (p+1)*k) with k = shards // process_count.
Concatenating the process-local batches of P processes (process-major) therefore gives the
single-process global batch for every P that divides `shards`, and an iterator's state (one entry
per shard) resumes under a different process count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxalign.errors import ConfigError, DataError

MAX_DEFAULT_SHARDS = 8


def default_shards(micro_rows: int) -> int:
    """The largest divisor of `micro_rows` (global rows per micro-batch) that is <= 8."""
    return max(d for d in range(1, min(micro_rows, MAX_DEFAULT_SHARDS) + 1) if micro_rows % d == 0)


@dataclass(frozen=True)
class ShardPlan:
    """Which logical shards this process runs and how many rows each gives per micro-batch."""

    shards: int
    rows_per_shard: int  # rows each shard gives to one global micro-batch
    process_index: int
    process_count: int

    @property
    def local(self) -> range:
        """The shards this process runs."""
        k = self.shards // self.process_count
        return range(self.process_index * k, (self.process_index + 1) * k)


def plan_shards(
    shards: int | None,
    *,
    global_rows: int,
    grad_accum: int,
    process_index: int,
    process_count: int,
    what: str = "global batch size",
) -> ShardPlan:
    """Validate the shard count against the batch and process count; ConfigError if it can't work.

    global_rows: rows (or prompts, pairs) per optimizer step across all processes.
    """
    if grad_accum < 1 or process_count < 1:
        raise ConfigError("grad_accum and process_count must be positive")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
    if global_rows < 1 or global_rows % (grad_accum * process_count):
        raise ConfigError(
            f"{what} {global_rows} must divide by grad_accum ({grad_accum})"
            f" x process count ({process_count})"
        )
    micro_rows = global_rows // grad_accum
    shards = default_shards(micro_rows) if shards is None else shards
    if shards < 1 or micro_rows % shards:
        raise ConfigError(
            f"data.shards ({shards}) must be positive and divide the global micro-batch "
            f"({micro_rows} rows = {what} {global_rows} / grad_accum {grad_accum})"
        )
    if shards % process_count:
        raise ConfigError(
            f"data.shards ({shards}) must divide by the process count ({process_count}); "
            f"set data.shards to a multiple of {process_count} that divides {micro_rows}"
        )
    return ShardPlan(shards, micro_rows // shards, process_index, process_count)


def shard_items(items: list, shard: int, shards: int, where: str) -> list:
    """Items [shard::shards]; DataError if there are fewer items than shards."""
    if len(items) < shards:
        raise DataError(
            f"{len(items)} examples cannot fill {shards} data shards; lower data.shards",
            where=where,
        )
    return items[shard::shards]


def shard_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for one shard (and component) of the stream, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def jsonable(tree: Any) -> Any:
    """Grain state with NumPy scalars turned into Python ones (a fresh copy), for json.dumps."""
    if isinstance(tree, dict):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jsonable(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def merge_states(states: list[dict]) -> dict:
    """One state holding every shard, from the `get_state()`s of all processes of one run.

    Resuming under another process count needs the state of every shard; a run with P processes
    has each shard's state on exactly one process.
    """
    if not states:
        raise DataError("no data iterator states to merge")
    merged = {k: v for k, v in states[0].items() if k != "shards"}
    shards: dict[str, Any] = {}
    for state in states:
        if {k: v for k, v in state.items() if k != "shards"} != merged:
            raise DataError("cannot merge data iterator states of different runs or steps")
        shards.update(state.get("shards", {}))
    merged["shards"] = dict(sorted(shards.items(), key=lambda kv: int(kv[0])))
    return merged


def check_resume_state(
    state: Any, *, version: int, fingerprint: dict, where: str, what: str = "data iterator"
) -> None:
    """Raise a DataError unless `state` (from `get_state()`) has `version` and a fingerprint
    equal to `fingerprint` (the data and settings it must agree with to resume exactly)."""
    if not isinstance(state, dict) or state.get("version") != version:
        raise DataError(f"{what} state has an unknown format", where=where)
    saved = state.get("fingerprint", {})
    differ = [k for k, v in fingerprint.items() if saved.get(k) != v]
    if differ:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {fingerprint[k]!r}" for k in differ)
        raise DataError(f"cannot resume the {what}; {detail}", where=where)
