"""Preference pairs: read, tokenize, and batch chosen and rejected together (Grain).

A record is one of
  {"prompt": str, "chosen": str, "rejected": str}                  (optionally "system": str)
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  {"chosen": [messages], "rejected": [messages]}   the shared leading messages are the prompt
each with an optional number "margin" (for reward models). Chosen and rejected are rendered with
the chat template as prompt + completion; only completion tokens are scored (`loss_mask`).

A batch holds this process's pairs of one global batch of `global_batch_size` pairs, shaped
[grad_accum, pairs, 2, seq_len] (index 0: chosen, 1: rejected) for `tokens`, `loss_mask`,
`segment_ids` (1 real, 0 padding; right padding) and `positions`; [grad_accum, pairs] for
`margin` and `pair_mask` (0 for the filler pairs of a last, partial batch), and
[grad_accum, pairs, 2] `ref_logps` once `set_reference_logps` has been called. Like SFT
batches, the pairs are split into logical shards (`data/shards.py`), so the global batches are
the same for any number of processes.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxalign.data.shards import (
    check_resume_state,
    merge_states,
    plan_shards,
    shard_items,
    shard_seed,
)
from jaxalign.data.sources import read_records, read_records_with_ids, to_messages
from jaxalign.data.templates import get_template, render
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError
from jaxalign.trainers.base import DataIterator

STATE_VERSION = 2
ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
BATCH_KEYS = (*ROW_KEYS, "margin", "pair_mask")


def _messages(raw: Any, where: str, field: str) -> list[dict]:
    """A list of {role, content} messages, validated like SFT messages."""
    if not isinstance(raw, list) or not raw:
        raise DataError(
            f"field '{field}' must be a string or a non-empty list of messages", where=where
        )
    try:
        # to_messages checks roles and contents; it also requires an assistant message, which
        # prompts need not have, so validate with a stand-in answer appended.
        checked = to_messages(
            {"messages": [*raw, {"role": "assistant", "content": "x"}]}, where=where
        )
    except DataError as e:
        raise DataError(str(e).replace("'messages", f"'{field}"), where=None) from None
    return checked[:-1]


def to_preference(record: Any, *, where: str) -> tuple[list[dict], list[dict], list[dict], float]:
    """(prompt, chosen, rejected) message lists and the margin (0 if absent) of one record."""
    if not isinstance(record, dict):
        raise DataError("record must be a JSON object", where=where)
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"record must have a '{key}' field", where=where)
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError("field 'margin' must be a number", where=where)
    prompt_raw, chosen_raw, rejected_raw = (record.get(k) for k in ("prompt", "chosen", "rejected"))
    if prompt_raw is None:  # two conversations: the shared leading messages are the prompt
        chosen_all = _messages(chosen_raw, where, "chosen")
        rejected_all = _messages(rejected_raw, where, "rejected")
        shared = 0
        while (
            shared < min(len(chosen_all), len(rejected_all))
            and chosen_all[shared] == rejected_all[shared]
        ):
            shared += 1
        prompt, chosen, rejected = chosen_all[:shared], chosen_all[shared:], rejected_all[shared:]
        if not chosen or not rejected:
            raise DataError(
                "fields 'chosen' and 'rejected' are identical conversations", where=where
            )
    elif isinstance(prompt_raw, str):
        prompt = []
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError("field 'system' must be a string", where=where)
            prompt.append({"role": "system", "content": system})
        prompt.append({"role": "user", "content": prompt_raw})
        chosen, rejected = (_completion(record[k], where, k) for k in ("chosen", "rejected"))
    elif isinstance(prompt_raw, list):
        prompt = _messages(prompt_raw, where, "prompt")
        chosen, rejected = (_completion(record[k], where, k) for k in ("chosen", "rejected"))
    else:
        raise DataError("field 'prompt' must be a string or a list of messages", where=where)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise DataError(
                f"field '{name}' must end with a non-empty assistant message", where=where
            )
    if chosen == rejected:  # a pair with no preference: its loss would push on nothing real
        raise DataError("fields 'chosen' and 'rejected' are identical", where=where)
    return prompt, chosen, rejected, float(margin)


def _completion(raw: Any, where: str, field: str) -> list[dict]:
    if isinstance(raw, str):
        if not raw:
            raise DataError(f"field '{field}' must be a non-empty string", where=where)
        return [{"role": "assistant", "content": raw}]
    return _messages(raw, where, field)


def read_preference_jsonl(path: str, *, on_error: str = "raise") -> tuple[list[dict], int]:
    """Valid preference records of a source (any format `sources.read_records` reads) and how
    many were skipped. With on_error="raise" the first bad record raises DataError
    `path:line: ...`."""
    return read_records(
        path, validate=lambda record, where: to_preference(record, where=where), on_error=on_error
    )


def read_preferences_with_ids(path: str, *, on_error: str) -> tuple[list[dict], int, list[str]]:
    """`read_preference_jsonl` plus each valid record's id (see
    `sources.read_records_with_ids`)."""
    return read_records_with_ids(
        path, validate=lambda r, where: to_preference(r, where=where), on_error=on_error
    )


def tokenize_pair(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    max_prompt_length: int | None = None,
    too_long: str = "drop",
) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Token ids int32 [n] and completion masks bool [n] of chosen and rejected (n <= seq_len).

    Returns None when the pair is too long and too_long="drop". Truncation keeps the prompt's end
    (and BOS), then cuts completions at the end.
    """
    return _tokenize_pair(
        prompt,
        chosen,
        rejected,
        tokenizer,
        template=template,
        seq_len=seq_len,
        max_prompt_length=max_prompt_length,
        too_long=too_long,
    )[0]


def _tokenize_pair(
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    max_prompt_length: int | None,
    too_long: str,
) -> tuple[tuple[list[np.ndarray], list[np.ndarray]] | None, bool]:
    """`tokenize_pair`'s result and whether any of the pair's tokens were cut off."""
    has_bos = tokenizer.bos_id >= 0
    if prompt:
        prompt_ids, _ = render(prompt, tokenizer, template)
        prompt_ids = prompt_ids[:-1] if tokenizer.eos_id >= 0 else prompt_ids  # render adds EOS
    else:
        prompt_ids = np.asarray([tokenizer.bos_id] if has_bos else [], np.int32)
    completions = []
    for messages in (chosen, rejected):
        ids, mask = render(prompt + messages, tokenizer, template)
        n = len(prompt_ids)
        # Templates encode span by span, so the conversation starts with the prompt's ids.
        assert np.array_equal(ids[:n], prompt_ids), "template rendering is not prefix-stable"
        completions.append((ids[n:], mask[n:]))
    keep = 1 if has_bos else 0  # BOS stays first when the prompt is truncated
    full_length = len(prompt_ids) + sum(len(c[0]) for c in completions)

    def cut_prompt(ids: np.ndarray, limit: int) -> np.ndarray:
        limit = max(limit, keep + 1)
        return (
            ids
            if len(ids) <= limit
            else np.concatenate([ids[:keep], ids[len(ids) - limit + keep :]])
        )

    if max_prompt_length is not None:
        prompt_ids = cut_prompt(prompt_ids, max_prompt_length)
    longest = max(len(c[0]) for c in completions)
    if len(prompt_ids) + longest > seq_len:
        if too_long == "drop":
            return None, False
        prompt_ids = cut_prompt(prompt_ids, seq_len - longest)
    ids_out, masks_out = [], []
    for ids, mask in completions:
        room = seq_len - len(prompt_ids)
        ids, mask = ids[:room], mask[:room]
        ids_out.append(np.concatenate([prompt_ids, ids]).astype(np.int32))
        masks_out.append(np.concatenate([np.zeros(len(prompt_ids), bool), mask]))
    if not all(m.any() for m in masks_out):
        return None, False
    # Both sides share the prompt: the pair lost tokens iff the kept total is smaller.
    truncated = len(ids_out[0]) + len(ids_out[1]) - len(prompt_ids) < full_length
    return (ids_out, masks_out), truncated


def tokenize_preferences(
    records: list[dict],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    where: str,
    max_prompt_length: int | None = None,
    too_long: str = "drop",
    on_error: str = "raise",
) -> tuple[list[dict], dict[str, int]]:
    """Pair examples {ids: [chosen, rejected], masks: [...], margin} and counts: `dropped` (too
    long, or nothing left to score), `truncated` (kept, with tokens cut off: the prompt by
    max_prompt_length, or the pair with too_long="truncate") and `skipped` (the template failed
    on the record; raised unless on_error="skip")."""
    examples, dropped, truncated, skipped = [], 0, 0, 0
    for i, record in enumerate(records):
        prompt, chosen, rejected, margin = to_preference(record, where=f"{where}[{i}]")
        try:
            pair, cut = _tokenize_pair(
                prompt,
                chosen,
                rejected,
                tokenizer,
                template=template,
                seq_len=seq_len,
                max_prompt_length=max_prompt_length,
                too_long=too_long,
            )
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"record {i}: {e}", where=where) from None
            skipped += 1
            continue
        if pair is None:
            dropped += 1
            continue
        truncated += cut
        examples.append({"ids": pair[0], "masks": pair[1], "margin": margin, "record": i})
    return examples, {"dropped": dropped, "truncated": truncated, "skipped": skipped}


def pad_pairs(examples: list[dict], seq_len: int, pad_id: int, rows: int | None = None) -> dict:
    """Right-padded arrays of pair examples: [rows, 2, seq_len] and [rows]; filler rows (beyond
    len(examples)) are all padding with pair_mask 0 and index -1."""
    rows = len(examples) if rows is None else rows
    out = {
        "tokens": np.full((rows, 2, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, 2, seq_len), np.float32),
        "segment_ids": np.zeros((rows, 2, seq_len), np.int32),
        "positions": np.zeros((rows, 2, seq_len), np.int32),
        "margin": np.zeros((rows,), np.float32),
        "pair_mask": np.zeros((rows,), np.float32),
        "index": np.full((rows,), -1, np.int32),
    }
    for r, example in enumerate(examples):
        for side in range(2):
            ids, mask = example["ids"][side], example["masks"][side]
            n = len(ids)
            out["tokens"][r, side, :n] = ids
            out["loss_mask"][r, side, :n] = mask
            out["segment_ids"][r, side, :n] = 1
            out["positions"][r, side, :n] = np.arange(n)
        out["margin"][r] = example["margin"]
        out["pair_mask"][r] = 1.0
        out["index"][r] = example.get("index", -1)
    return out


class PreferenceBatchIterator(DataIterator):
    """Infinite (or `num_epochs`-long) iterator of preference batches for one process.

    The pairs are split into `shards` logical shards (shard s: pairs [s::shards], default: the
    largest divisor <= 8 of the global micro-batch), each shuffled on its own; every global
    micro-batch takes `rows_per_shard` pairs from each shard in shard order and process p runs
    shards [p*k, (p+1)*k) (see `data/shards.py`). So the global batches are the same for any
    process count that divides `shards`. A finite run gives every process the same number of
    batches (the longest shard's), the last ones filled with masked pairs (`pair_mask` 0).

    `get_state()` is JSON: the number of batches taken, the same on every process; `set_state()`
    on an iterator over the same data and settings, under any process count, resumes with exactly
    the same batches. `examples` are this process's pairs (its shards, in shard then file order).
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
        shuffle: bool = True,
        seed: int = 0,
        on_error: str = "raise",
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        max_prompt_length: int | None = None,
        too_long: str = "drop",
        shards: int | None = None,
    ):
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}")
        self.plan = plan_shards(
            shards,
            global_rows=global_batch_size,
            grad_accum=grad_accum,
            process_index=process_index,
            process_count=process_count,
        )
        get_template(template)
        self.path = path
        self.seq_len = seq_len
        self.grad_accum = grad_accum
        self.micro_batch = global_batch_size // grad_accum // process_count
        self.pad_id = tokenizer.pad_id
        records, skipped, self._record_ids = read_preferences_with_ids(path, on_error=on_error)
        self._last_index = np.zeros((0,), np.int32)  # positions in `examples` of the last batch
        pairs, counts = tokenize_preferences(
            records,
            tokenizer,
            template=template,
            seq_len=seq_len,
            where=path,
            max_prompt_length=max_prompt_length,
            too_long=too_long,
            on_error=on_error,
        )
        if not pairs:
            raise DataError(f"no pairs fit in seq_len {seq_len}", where=path)
        shard_pairs = [
            shard_items(list(range(len(pairs))), s, self.plan.shards, path)
            for s in range(self.plan.shards)
        ]
        self.examples = [pairs[i] for s in self.plan.local for i in shard_pairs[s]]
        k = self.plan.shards // process_count
        # The most pairs any process holds (DPO precomputes reference log-probs in step).
        self.max_local_pairs = max(
            sum(len(shard_pairs[s]) for s in range(p * k, (p + 1) * k))
            for p in range(process_count)
        )
        self.stats = {
            "records": len(records) - counts["skipped"],
            "skipped": skipped + counts["skipped"],
            "dropped": counts["dropped"],
            "truncated": counts["truncated"],
            "pairs": len(self.examples),
            "total_pairs": len(pairs),
        }
        self._fingerprint = {
            "pairs": len(pairs),
            "tokens": int(sum(len(e["ids"][0]) + len(e["ids"][1]) for e in pairs)),
            "shards": self.plan.shards,
            "seq_len": seq_len,
            "shuffle": shuffle,
            "seed": seed,
        }
        self._rows_per_step = grad_accum * self.plan.rows_per_shard
        # Each shard is a (shuffled, repeated) random-access dataset of positions in `examples`,
        # so a batch is just a step number: nothing else to checkpoint.
        self._shards = []
        offset = 0
        for s in self.plan.local:
            ds = grain.MapDataset.source(range(offset, offset + len(shard_pairs[s])))
            if shuffle:
                ds = ds.shuffle(shard_seed(seed, 0, s))
            self._shards.append(ds.repeat(num_epochs))
            offset += len(shard_pairs[s])
        self.num_batches: int | None = None  # per process, of a finite run
        if num_epochs is not None:
            self.num_batches = max(
                -(-len(ids) * num_epochs // self._rows_per_step) for ids in shard_pairs
            )
        self.batches = 0
        self.ref_logps: np.ndarray | None = None

    def set_reference_logps(self, ref_logps: np.ndarray) -> None:
        """Attach precomputed reference log-probs [pairs, 2] (in `examples` order) to batches."""
        if ref_logps.shape != (len(self.examples), 2):
            raise DataError(
                f"reference log-probs have shape {ref_logps.shape}, expected "
                f"({len(self.examples)}, 2)",
                where=self.path,
            )
        self.ref_logps = np.asarray(ref_logps, np.float32)

    def __iter__(self) -> PreferenceBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.batches >= self.num_batches:
            raise StopIteration
        rows = self._rows_per_step
        start = self.batches * rows
        lead = (self.grad_accum, self.plan.rows_per_shard)
        parts = []
        for ds in self._shards:
            index = [ds[j] for j in range(start, min(start + rows, len(ds)))]
            # Past the end of a finite shard: filler pairs (pair_mask 0, index -1).
            batch = pad_pairs([self.examples[i] for i in index], self.seq_len, self.pad_id, rows)
            batch["index"][: len(index)] = index
            parts.append({k: v.reshape(*lead, *v.shape[1:]) for k, v in batch.items()})
        out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in BATCH_KEYS}
        index = np.concatenate([p["index"] for p in parts], axis=1)
        self._last_index = index  # host-side only: record_ids() names the batch's records
        if self.ref_logps is not None:
            ref = np.where((index >= 0)[..., None], self.ref_logps[np.maximum(index, 0)], 0.0)
            out["ref_logps"] = ref.astype(np.float32)
        self.batches += 1
        return out

    def record_ids(self) -> list[str]:
        """Ids of the records of the pairs in the batch last returned (`path:LINE`, ...)."""
        index = self._last_index[self._last_index >= 0]
        return [self._record_ids[self.examples[i]["record"]] for i in index.tolist()]

    def report(self) -> str:
        """One line: records read, bad records skipped, pairs kept, dropped and truncated."""
        s = self.stats
        return (
            f"preference data {self.path}: {s['records']} records ({s['skipped']} bad records "
            f"skipped), {s['total_pairs']} pairs, {s['dropped']} dropped (too long or nothing to "
            f"score), {s['truncated']} truncated, {self.plan.shards} shards"
        )

    # -- state -------------------------------------------------------------------------------

    # Every process holds the same state; merging checks that they agree (trainers/loop.py).
    merge_states = staticmethod(merge_states)

    def get_state(self) -> dict:
        """JSON-serializable: the number of batches taken (the same on every process)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": dict(self._fingerprint),
            "batches": self.batches,
        }

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` (or merged states) of an iterator over the same data and
        settings, under any process count."""
        check_resume_state(
            state,
            version=STATE_VERSION,
            fingerprint=self._fingerprint,
            where=self.path,
            what="data iterator",
        )
        self.batches = int(state["batches"])


def preference_iterator_from_config(
    cfg: Any,
    tokenizer: Tokenizer,
    *,
    path: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
) -> PreferenceBatchIterator:
    """A PreferenceBatchIterator over `path` (default data.train_file) with a Config's options;
    train.batch_size counts pairs, data.shards splits them."""
    d, t, p = cfg.data, cfg.train, cfg.preference
    return PreferenceBatchIterator(
        path if path is not None else d.train_file,
        tokenizer,
        seq_len=t.seq_len,
        global_batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        template=d.template,
        shuffle=d.shuffle if shuffle is None else shuffle,
        seed=d.seed,
        on_error=d.on_error,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        max_prompt_length=p.max_prompt_length,
        too_long=p.too_long,
        shards=d.shards,
    )
