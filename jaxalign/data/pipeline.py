"""SFT batches: read, tokenize, shift, split into logical shards, shuffle, mix, pack, batch.

Each example is shifted before packing (inputs = ids[:-1], targets = ids[1:]), so no target
crosses a segment boundary. The examples are split into `shards` logical shards (see
`data/shards.py`), so the global batch stream is the same for any number of processes. A batch is
this process's share of one global batch, shaped
[grad_accum, global_batch_size // grad_accum // process_count, seq_len].
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxalign.config import DataConfig
from jaxalign.data.shards import (
    check_resume_state,
    jsonable,
    merge_states,
    plan_shards,
    shard_items,
    shard_seed,
)
from jaxalign.data.sources import read_records_with_ids, source_name, to_messages
from jaxalign.data.templates import get_template, render
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError
from jaxalign.trainers.base import DataIterator

STATE_VERSION = 2
FEATURES = ("inputs", "targets", "loss_mask")  # packed by Grain
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# The examples are in memory: reading threads would only contend for the GIL.
IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def tokenize_records(
    records: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    where: str,
    on_error: str = "raise",
) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Shifted examples (inputs, targets int32 [n]; loss_mask float32 [n]; n <= seq_len; and
    `record`, the index in `records` it came from).

    Examples longer than seq_len + 1 tokens are truncated; ones left with no trained-on target
    (the completion was cut off entirely) are dropped. A record the template cannot render raises
    DataError, or with on_error="skip" is counted as skipped. Returns the examples and counts.
    """
    examples = []
    truncated = dropped = skipped = 0
    for i, record in enumerate(records):
        try:
            ids, mask = render(to_messages(record, where=f"{where}[{i}]"), tokenizer, template)
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"record {i}: {e}", where=where) from None
            skipped += 1
            continue
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if not mask[1:].any():
            dropped += 1
            continue
        examples.append(
            {
                "inputs": ids[:-1],
                "targets": ids[1:],
                "loss_mask": mask[1:].astype(np.float32),
                "record": i,
            }
        )
    return examples, {"truncated": truncated, "dropped": dropped, "skipped": skipped}


def read_sft_records_with_ids(
    spec: Any, *, on_error: str, data_dir: str | None
) -> tuple[list[dict], int, list[str]]:
    """`read_records` of SFT records plus each valid record's id (see
    `sources.read_records_with_ids`)."""
    return read_records_with_ids(
        spec,
        validate=lambda r, where: to_messages(r, where=where),
        on_error=on_error,
        data_dir=data_dir,
    )


def _record_slots(records: list[int], seq_len: int) -> np.ndarray:
    """The record numbers of one row's segments, in order, padded with -1: int32 [seq_len]."""
    slots = np.full(seq_len, -1, np.int32)
    slots[: len(records)] = records
    return slots


def _rename_packed(row: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "loss_mask": row["loss_mask"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
        "record": _record_slots(row["record"], len(row["inputs"])),
    }


def _pad_example(
    example: dict[str, np.ndarray], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    row = {k: v[0] for k, v in _empty_rows(1, seq_len, pad_id).items()}
    row["inputs"][:n] = example["inputs"]
    row["targets"][:n] = example["targets"]
    row["loss_mask"][:n] = example["loss_mask"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["record"][0] = example["record"]
    return row


def _empty_rows(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding-only rows: segment id 0, loss mask 0, no record (-1)."""
    return {
        "inputs": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "record": np.full((rows, seq_len), -1, np.int32),
    }


def normalize_mixture(mixture: Sequence[Any]) -> list[tuple[Any, float]]:
    """[(source, weight)] from `[{path, weight}, ...]` or `[(source, weight), ...]`."""
    components = []
    for i, item in enumerate(mixture):
        if isinstance(item, dict):
            unknown = set(item) - {"path", "weight"}
            if unknown or "path" not in item:
                raise ConfigError(
                    f"data.mixture[{i}] must have keys 'path' and 'weight' (got {sorted(item)})"
                )
            source, weight = item["path"], item.get("weight", 1.0)
        else:
            source, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"data.mixture[{i}].weight must be a positive number, got {weight!r}")
        components.append((source, float(weight)))
    if not components:
        raise ConfigError("data.mixture must list at least one source")
    return components


class _ShardStreams:
    """The Grain iterators of this process's shards and how one batch is cut from them."""

    def __init__(
        self,
        iterators: list,
        shard_ids: range,
        rows_per_step: int,
        shape: tuple[int, int, int],
        pad_id: int,
        fingerprint: dict,
        other_shards_batches: Callable[[], int] | None = None,
    ):
        self.iterators = iterators
        # A finite run lasts as long as its longest shard on any process, so every process runs
        # the same number of batches (collectives stay matched) and those after its own shards
        # end are padding-only: the global batches are the single-process ones.
        self.other_shards_batches = other_shards_batches
        self.total_batches: int | None = None  # known once this process's shards are exhausted
        self.shard_ids = shard_ids
        self.fingerprint = fingerprint
        self.batches = 0
        self.exhausted = [False] * len(iterators)
        self.rows_per_step = rows_per_step
        self.shape = shape  # (grad_accum, rows_per_shard, seq_len)
        self.pad_id = pad_id

    def next_batch(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One batch and the record numbers of its segments, int32 [grad_accum, rows, seq_len]
        (-1: no record); the record numbers stay on the host, never in the batch."""
        parts = []
        for i, iterator in enumerate(self.iterators):
            batch = None
            if not self.exhausted[i]:
                try:
                    batch = next(iterator)
                except StopIteration:
                    self.exhausted[i] = True
            parts.append(batch)
        if all(self.exhausted):
            if self.total_batches is None:
                others = self.other_shards_batches
                self.total_batches = others() if others is not None else 0
            if self.batches >= self.total_batches:
                raise StopIteration
        grad_accum, rows_per_shard, seq_len = self.shape
        local = []
        for batch in parts:
            have = 0 if batch is None else batch["inputs"].shape[0]
            if have < self.rows_per_step:  # end of a finite run: fill with padding-only rows
                empty = _empty_rows(self.rows_per_step - have, seq_len, self.pad_id)
                batch = (
                    empty
                    if batch is None
                    else {k: np.concatenate([batch[k], empty[k]]) for k in empty}
                )
            local.append(
                {k: np.asarray(batch[k]).reshape(self.shape) for k in (*BATCH_KEYS, "record")}
            )
        # [grad_accum, rows_per_shard * local shards, seq_len]: shard order within each micro-batch
        out = {
            k: np.concatenate([part[k] for part in local], axis=1) for k in (*BATCH_KEYS, "record")
        }
        return {k: out[k] for k in BATCH_KEYS}, out["record"]

    def state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": dict(self.fingerprint),
            "batches": self.batches,
            "shards": {
                str(s): jsonable(it.get_state())
                for s, it in zip(self.shard_ids, self.iterators, strict=False)
            },
        }

    def produce(self) -> tuple[dict[str, np.ndarray], dict, np.ndarray]:
        """The next batch, the state right after it, and its record numbers."""
        batch, records = self.next_batch()
        self.batches += 1
        return batch, self.state(), records


class _Prefetcher:
    """Produces (batch, state after it, ...) on a background thread, `depth` batches ahead."""

    def __init__(self, produce: Callable[[], tuple], depth: int):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxalign-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = ("ok", self._produce())
            except StopIteration:
                item = ("stop", None)
            except BaseException as e:  # handed to the consumer, raised there
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] != "ok":
                return

    def get(self) -> tuple:
        kind, value = self._queue.get()
        if kind == "ok":
            return value
        self._queue.put((kind, value))  # every later call ends the same way
        if kind == "stop":
            raise StopIteration
        raise value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class SFTBatchIterator(DataIterator):
    """Infinite (or `num_epochs`-long) iterator of SFT batches for one process.

    Each `next()` gives dict of numpy arrays [grad_accum, micro_batch, seq_len]: `inputs`,
    `targets` (int32), `loss_mask` (float32), `segment_ids` (int32, 0 = padding) and `positions`
    (int32, restarting at 0 per segment). `source` is a path / `tfds:` spec / list of records;
    `mixture` ([(source, weight)] or [{path, weight}]) replaces it with a weighted mixture.

    The stream is split into `shards` logical shards (default: the largest divisor <= 8 of the
    global micro-batch rows); process p runs shards [p*k, (p+1)*k). `get_state()` is
    JSON-serializable and holds this process's shards; `set_state()` on a fresh iterator built
    with the same data and arguments, under any process count whose shards the state holds
    (see `shards.merge_states`), resumes with exactly the same batches. With `prefetch > 0` a
    background thread prepares that many batches ahead; the state still follows the batches
    returned, not the ones prepared.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        global_batch_size: int,
        grad_accum: int = 1,
        template: str = "plain",
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_packing_bins: int = 16,
        on_error: str = "raise",
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        shards: int | None = None,
        mixture: Sequence[Any] | None = None,
        data_dir: str | None = None,
        prefetch: int = 0,
    ):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {seq_len}")
        if num_packing_bins < 1:
            raise ConfigError(f"num_packing_bins must be positive, got {num_packing_bins}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}")
        if prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {prefetch}")
        self.plan = plan_shards(
            shards,
            global_rows=global_batch_size,
            grad_accum=grad_accum,
            process_index=process_index,
            process_count=process_count,
        )
        get_template(template)  # fail on a bad name before reading any data
        components = normalize_mixture(mixture) if mixture else [(source, 1.0)]
        self.path = ",".join(source_name(c) for c, _ in components)
        self.seq_len = seq_len
        self.grad_accum = grad_accum
        self.micro_batch = global_batch_size // grad_accum // process_count
        self.pad_id = tokenizer.pad_id

        stats = dict.fromkeys(
            ("records", "skipped", "truncated", "dropped", "examples", "tokens"), 0
        )
        per_component = []
        component_examples = []
        self._record_ids: list[str] = []  # every component's record ids, end to end
        for spec, _ in components:
            name = source_name(spec)
            records, skipped, ids = read_sft_records_with_ids(
                spec, on_error=on_error, data_dir=data_dir
            )
            examples, counts = tokenize_records(
                records,
                tokenizer,
                template=template,
                seq_len=seq_len,
                where=name,
                on_error=on_error,
            )
            if not examples:
                raise DataError("no examples left after tokenizing and truncating", where=name)
            for example in examples:  # a number into self._record_ids
                example["record"] += len(self._record_ids)
            self._record_ids.extend(ids)
            part = {
                "source": name,
                "records": len(records) - counts["skipped"],
                "skipped": skipped + counts["skipped"],
                "truncated": counts["truncated"],
                "dropped": counts["dropped"],
                "examples": len(examples),
                "tokens": int(sum(len(e["inputs"]) for e in examples)),
            }
            for key in stats:
                stats[key] += part[key]
            per_component.append(part)
            component_examples.append(examples)
        self.stats: dict[str, Any] = dict(stats)
        if len(components) > 1:
            self.stats["components"] = per_component
        # What a saved state must agree with to be meaningful here. Not the process index or
        # count: the global stream is the same for all of them.
        self._fingerprint = {
            "examples": [p["examples"] for p in per_component],
            "tokens": [p["tokens"] for p in per_component],
            "weights": [w for _, w in components],
            "shards": self.plan.shards,
            "seq_len": seq_len,
            "packing": packing,
            "shuffle": shuffle,
            "seed": seed,
        }

        weights = [w for _, w in components]
        rows_per_step = grad_accum * self.plan.rows_per_shard

        def shard_batches(s: int) -> grain.IterDataset:
            """Shard s's stream of batches of `rows_per_step` rows (fewer at the end)."""
            parts = []
            for c, examples in enumerate(component_examples):
                mine = shard_items(examples, s, self.plan.shards, per_component[c]["source"])
                ds = grain.MapDataset.source(mine)
                if shuffle:
                    ds = ds.shuffle(shard_seed(seed, c, s))
                parts.append(ds.repeat(num_epochs).to_iter_dataset(IN_MEMORY))
            ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
            if packing:
                ds = grain.experimental.FirstFitPackIterDataset(
                    ds,
                    length_struct={k: seq_len for k in FEATURES},
                    num_packing_bins=num_packing_bins,
                    seed=shard_seed(seed, 1 << 20, s),  # the packer's own stream
                    shuffle_bins=shuffle,
                    padding_struct={
                        "inputs": self.pad_id,
                        "targets": self.pad_id,
                        "loss_mask": 0.0,
                    },
                    meta_features=("record",),  # kept as a list per packed row
                ).map(_rename_packed)
            else:
                ds = ds.map(lambda example: _pad_example(example, seq_len, self.pad_id))
            return ds.batch(rows_per_step, drop_remainder=False)

        iterators = [shard_batches(s).__iter__() for s in self.plan.local]
        self.stats["local_examples"] = sum(
            len(examples[s :: self.plan.shards])
            for s in self.plan.local
            for examples in component_examples
        )
        others = [s for s in range(self.plan.shards) if s not in self.plan.local]

        def other_shards_batches() -> int:
            """Batches of the longest shard another process runs (finite runs only)."""
            return max((sum(1 for _ in shard_batches(s)) for s in others), default=0)

        # The prefetch thread holds only the streams, so dropping the iterator stops it.
        self._streams = _ShardStreams(
            iterators,
            self.plan.local,
            rows_per_step,
            (grad_accum, self.plan.rows_per_shard, seq_len),
            self.pad_id,
            self._fingerprint,
            # Only a finite run ends, and only then is every example kept for the count.
            other_shards_batches if num_epochs is not None else None,
        )
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._state = self._streams.state()
        self._last_records = np.zeros((0,), np.int32)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> SFTBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._prefetch:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._streams.produce, self._prefetch)
            batch, self._state, self._last_records = self._prefetcher.get()
        else:
            batch, self._state, self._last_records = self._streams.produce()
        return batch

    def record_ids(self) -> list[str]:
        """Ids of the records in the batch last returned (`path:LINE`, `<memory>[N]`, ...),
        micro-batch by micro-batch, row by row, in packing order. Host-side only."""
        numbers = self._last_records[self._last_records >= 0]
        return [self._record_ids[i] for i in numbers.tolist()]

    def close(self) -> None:
        """Stop the prefetch thread (if any)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def report(self) -> str:
        """One line on what was read: records, bad records skipped, truncated, dropped, tokens."""
        s = self.stats
        return (
            f"data {self.path}: {s['records']} records ({s['skipped']} bad records skipped), "
            f"{s['examples']} examples, {s['tokens']} tokens, {s['truncated']} truncated, "
            f"{s['dropped']} dropped (no target left), {self.plan.shards} shards"
        )

    # -- state -------------------------------------------------------------------------------

    # The trainer merges the states of all processes into one (see trainers/loop.py).
    merge_states = staticmethod(merge_states)

    def get_state(self) -> dict:
        """JSON-serializable position after the last batch returned (not the prefetched ones)."""
        return {**self._state, "fingerprint": dict(self._state["fingerprint"])}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator built with the same data and arguments."""
        check_resume_state(
            state,
            version=STATE_VERSION,
            fingerprint=self._fingerprint,
            where=self.path,
            what="data iterator",
        )
        shard_states = state.get("shards", {})
        missing = [s for s in self.plan.local if str(s) not in shard_states]
        if missing:
            raise DataError(
                f"cannot resume the data iterator; the state has no entry for data shards "
                f"{missing} (merge the states of every process with shards.merge_states)",
                where=self.path,
            )
        self.close()
        for s, iterator in zip(self.plan.local, self._streams.iterators, strict=False):
            iterator.set_state(shard_states[str(s)])
        self._streams.exhausted = [False] * len(self._streams.iterators)
        self._streams.batches = int(state.get("batches", 0))
        self._state = self._streams.state()


def sft_iterator_from_config(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    grad_accum: int,
    process_index: int = 0,
    process_count: int = 1,
    path: str | None = None,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
) -> SFTBatchIterator:
    """An SFTBatchIterator over `path` (default: data_cfg.train_file, or data_cfg.mixture) with
    data_cfg's options. An explicit `path` (e.g. the eval file) never uses the mixture."""
    mixture = data_cfg.mixture if path is None and data_cfg.mixture else None
    if mixture is None and path is None:
        path = data_cfg.train_file
    if mixture is None and not path:
        raise ConfigError("set data.train_file or data.mixture")
    return SFTBatchIterator(
        path,
        tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        grad_accum=grad_accum,
        template=data_cfg.template,
        packing=data_cfg.packing,
        shuffle=data_cfg.shuffle if shuffle is None else shuffle,
        seed=data_cfg.seed,
        num_packing_bins=data_cfg.num_packing_bins,
        on_error=data_cfg.on_error,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shards=data_cfg.shards,
        mixture=mixture,
        data_dir=data_cfg.data_dir,
        # Eval iterators are read once, up front: no thread for them.
        prefetch=data_cfg.prefetch if num_epochs is None else 0,
    )
