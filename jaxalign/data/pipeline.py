"""SFT batches: tokenize, shift, shard by process, shuffle, repeat, pack (Grain), batch.

Each example is shifted before packing (inputs = ids[:-1], targets = ids[1:]), so no target
crosses a segment boundary. A batch is this process's share of one global batch, shaped
[grad_accum, global_batch_size // grad_accum // process_count, seq_len].
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxalign.config import DataConfig
from jaxalign.data.sources import read_jsonl, to_messages
from jaxalign.data.templates import get_template, render
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError

STATE_VERSION = 1
FEATURES = ("inputs", "targets", "loss_mask")  # packed by Grain
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def tokenize_records(
    records: list[dict], tokenizer: Tokenizer, *, template: str, seq_len: int, where: str
) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Shifted examples (inputs, targets int32 [n]; loss_mask float32 [n]; n <= seq_len).

    Examples longer than seq_len + 1 tokens are truncated; ones left with no trained-on target
    (the completion was cut off entirely) are dropped. Returns the examples and their counts.
    """
    examples = []
    truncated = dropped = 0
    for i, record in enumerate(records):
        ids, mask = render(to_messages(record, where=f"{where}[{i}]"), tokenizer, template)
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
            }
        )
    return examples, {"truncated": truncated, "dropped": dropped}


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "loss_mask": row["loss_mask"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
    }


def _pad_example(
    example: dict[str, np.ndarray], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    row = _empty_rows(1, seq_len, pad_id)
    row = {k: v[0] for k, v in row.items()}
    row["inputs"][:n] = example["inputs"]
    row["targets"][:n] = example["targets"]
    row["loss_mask"][:n] = example["loss_mask"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    return row


def _empty_rows(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding-only rows: segment id 0, loss mask 0."""
    return {
        "inputs": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
    }


def _jsonable(tree: Any) -> Any:
    """Grain state with NumPy scalars turned into Python ones, so json.dumps accepts it."""
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


class SFTBatchIterator:
    """Infinite (or `num_epochs`-long) iterator of SFT batches for one process.

    Each `next()` gives dict of numpy arrays [grad_accum, micro_batch, seq_len]: `inputs`,
    `targets` (int32), `loss_mask` (float32), `segment_ids` (int32, 0 = padding) and `positions`
    (int32, restarting at 0 per segment). `get_state()` is JSON-serializable; `set_state()` on a
    fresh iterator built with the same arguments resumes with exactly the same batches.
    """

    def __init__(
        self,
        path: str,
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
    ):
        if seq_len < 1 or grad_accum < 1 or process_count < 1:
            raise ConfigError("seq_len, grad_accum and process_count must be positive")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch_size < 1 or global_batch_size % (grad_accum * process_count):
            raise ConfigError(
                f"global batch size {global_batch_size} must divide by grad_accum ({grad_accum})"
                f" x process count ({process_count})"
            )
        if num_packing_bins < 1:
            raise ConfigError(f"num_packing_bins must be positive, got {num_packing_bins}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}")
        get_template(template)  # fail on a bad name before reading any data
        self.path = path
        self.seq_len = seq_len
        self.grad_accum = grad_accum
        self.micro_batch = global_batch_size // grad_accum // process_count
        self.pad_id = tokenizer.pad_id

        records, skipped = read_jsonl(path, on_error=on_error)
        examples, counts = tokenize_records(
            records, tokenizer, template=template, seq_len=seq_len, where=path
        )
        shard = examples[process_index::process_count]
        if not shard:
            raise DataError(
                f"no examples for process {process_index} of {process_count} "
                f"({len(examples)} examples in total)",
                where=path,
            )
        self.stats: dict[str, int] = {
            "records": len(records),
            "skipped": skipped,
            "truncated": counts["truncated"],
            "dropped": counts["dropped"],
            "examples": len(shard),
            "tokens": int(sum(len(e["inputs"]) for e in shard)),
        }
        # What a saved state must agree with to be meaningful here.
        self._fingerprint = {
            "examples": len(shard),
            "tokens": self.stats["tokens"],
            "seq_len": seq_len,
            "packing": packing,
            "shuffle": shuffle,
            "seed": seed,
            "process_index": process_index,
            "process_count": process_count,
        }

        dataset = grain.MapDataset.source(shard)
        if shuffle:
            dataset = dataset.shuffle(seed)
        dataset = dataset.repeat(num_epochs)
        # The examples are in memory: reading threads would only contend for the GIL.
        ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if packing:
            ds = grain.experimental.FirstFitPackIterDataset(
                ds,
                length_struct={k: seq_len for k in FEATURES},
                num_packing_bins=num_packing_bins,
                seed=seed,
                shuffle_bins=shuffle,
                padding_struct={"inputs": self.pad_id, "targets": self.pad_id, "loss_mask": 0.0},
            ).map(_rename_packed)
        else:
            ds = ds.map(lambda example: _pad_example(example, seq_len, self.pad_id))
        self._rows = self.grad_accum * self.micro_batch
        self._iterator = ds.batch(self._rows, drop_remainder=False).__iter__()

    def __iter__(self) -> SFTBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        have = batch["inputs"].shape[0]
        if have < self._rows:  # last batch of a finite run: fill with padding-only rows
            empty = _empty_rows(self._rows - have, self.seq_len, self.pad_id)
            batch = {k: np.concatenate([batch[k], empty[k]]) for k in empty}
        shape = (self.grad_accum, self.micro_batch, self.seq_len)
        return {k: np.asarray(batch[k]).reshape(shape) for k in BATCH_KEYS}

    def get_state(self) -> dict:
        """JSON-serializable position in the stream."""
        return {
            "version": STATE_VERSION,
            "fingerprint": dict(self._fingerprint),
            "grain": _jsonable(self._iterator.get_state()),
        }

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator built with the same data and arguments."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError("data iterator state has an unknown format", where=self.path)
        saved = state.get("fingerprint", {})
        differ = [k for k, v in self._fingerprint.items() if saved.get(k) != v]
        if differ:
            detail = ", ".join(
                f"{k}: saved {saved.get(k)!r}, now {self._fingerprint[k]!r}" for k in differ
            )
            raise DataError(f"cannot resume the data iterator; {detail}", where=self.path)
        self._iterator.set_state(state["grain"])


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
    """An SFTBatchIterator over `path` (default: data_cfg.train_file) with data_cfg's options."""
    return SFTBatchIterator(
        path if path is not None else data_cfg.train_file,
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
    )
