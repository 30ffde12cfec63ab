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

Packed (`pack_pairs=True`, `preference.pack_pairs`), a batch holds the same pairs, but packed
into rows of 2 x seq_len tokens (`pack_pairs`): [grad_accum, rows, 2 * seq_len] for the token
arrays and [grad_accum, rows, pairs_per_row] for `margin` and `pair_mask` ([..., 2] for
`ref_logps`). A pair's chosen and rejected are two consecutive segments of one row. The number
of rows varies from step to step (the fullest micro-batch of any process decides; at most its
pairs), so a run compiles one step per row count it meets. Pairs pack across a process's shards,
so the rows (not the pairs) depend on the process count.
"""

from __future__ import annotations

import math
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


def padding_fraction(batch: dict) -> float:
    """The fraction of a preference batch's token positions that are padding (either layout)."""
    return 1.0 - float(np.count_nonzero(batch["segment_ids"])) / batch["segment_ids"].size


def pair_length(example: dict) -> int:
    """Tokens of a pair example: its chosen plus its rejected sequence (the prompt twice)."""
    return len(example["ids"][0]) + len(example["ids"][1])


def assign_rows(lengths: list[int], row_len: int, max_per_row: int) -> list[list[int]]:
    """First-fit decreasing packing of whole pairs: the positions (in `lengths`) of the pairs of
    each row, longest first. Deterministic: ties keep their order. A pair never splits; one
    longer than `row_len` is a DataError (tokenization keeps every pair within 2 x seq_len)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > row_len:
            raise DataError(f"a pair of {n} tokens does not fit a packed row of {row_len} tokens")
        for r, left in enumerate(room):
            if n <= left and len(rows[r]) < max_per_row:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_len - n)
    return rows


def pack_pairs(
    examples: list[dict],
    assignment: list[list[int]],
    row_len: int,
    pad_id: int,
    *,
    rows: int,
    pairs_per_row: int,
) -> dict:
    """Packed rows of pair examples: row r holds the pairs `assignment[r]` (positions in
    `examples`), each as two segments, chosen (segment id 2k + 1 for the pair in slot k) then
    rejected (2k + 2), positions restarting at 0 per segment, then right padding (segment 0).

    Returns tokens, loss_mask, segment_ids, positions [rows, row_len] and margin, pair_mask,
    index [rows, pairs_per_row] (unused slots and filler rows: pair_mask 0, index -1). The loss
    mask is 0 on every segment's first token: its prediction would read the segment before.
    """
    out = {
        "tokens": np.full((rows, row_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, row_len), np.float32),
        "segment_ids": np.zeros((rows, row_len), np.int32),
        "positions": np.zeros((rows, row_len), np.int32),
        "margin": np.zeros((rows, pairs_per_row), np.float32),
        "pair_mask": np.zeros((rows, pairs_per_row), np.float32),
        "index": np.full((rows, pairs_per_row), -1, np.int32),
    }
    for r, members in enumerate(assignment):
        start = 0
        for k, i in enumerate(members):
            example = examples[i]
            for side in range(2):
                ids, mask = example["ids"][side], example["masks"][side]
                span = slice(start, start + len(ids))
                out["tokens"][r, span] = ids
                out["loss_mask"][r, span] = mask
                out["loss_mask"][r, start] = 0.0
                out["segment_ids"][r, span] = 2 * k + 1 + side
                out["positions"][r, span] = np.arange(len(ids))
                start += len(ids)
            out["margin"][r, k] = example["margin"]
            out["pair_mask"][r, k] = 1.0
            out["index"][r, k] = example.get("index", -1)
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
        pack_pairs: bool = False,
        row_multiple: int = 1,
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
        # Each shard is a (shuffled, repeated) random-access dataset of positions within the
        # shard, so a batch is just a step number: nothing else to checkpoint. Packing reads
        # every shard's pairs (not only this process's): all processes must agree on the rows.
        self._shards = []
        for s in range(self.plan.shards):
            ds = grain.MapDataset.source(range(len(shard_pairs[s])))
            if shuffle:
                ds = ds.shuffle(shard_seed(seed, 0, s))
            self._shards.append(ds.repeat(num_epochs))
        sizes = [len(shard_pairs[s]) for s in self.plan.local]
        self._offsets = {s: sum(sizes[:i]) for i, s in enumerate(self.plan.local)}
        self._shard_lengths = [[pair_length(pairs[i]) for i in ids] for ids in shard_pairs]
        # Packed rows hold 2 x seq_len tokens, the positions of one padded pair: every pair that
        # fits unpacked fits one packed row, so `too_long` applies unchanged.
        self.pack_pairs = pack_pairs
        self.row_len = 2 * seq_len if pack_pairs else seq_len
        shortest = min(pair_length(e) for e in pairs)
        local_pairs = self.plan.rows_per_shard * (self.plan.shards // process_count)
        self.pairs_per_row = min(local_pairs, self.row_len // shortest)
        self.row_multiple = row_multiple
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
        parts = self._packed_parts() if self.pack_pairs else self._padded_parts()
        out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in BATCH_KEYS}
        index = np.concatenate([p["index"] for p in parts], axis=1)
        self._last_index = index  # host-side only: record_ids() names the batch's records
        if self.ref_logps is not None:
            ref = np.where((index >= 0)[..., None], self.ref_logps[np.maximum(index, 0)], 0.0)
            out["ref_logps"] = ref.astype(np.float32)
        self.batches += 1
        return out

    def _step_positions(self, shard: int) -> list[int]:
        """Positions within `shard` of its pairs in this step (fewer past the end of a finite
        shard: the rest are filler pairs)."""
        ds, rows = self._shards[shard], self._rows_per_step
        start = self.batches * rows
        return [ds[j] for j in range(start, min(start + rows, len(ds)))]

    def _padded_parts(self) -> list[dict]:
        """Each local shard's pairs, one padded row per side: [grad_accum, pairs, 2, seq_len]."""
        lead = (self.grad_accum, self.plan.rows_per_shard)
        parts = []
        for s in self.plan.local:
            index = [self._offsets[s] + p for p in self._step_positions(s)]
            batch = pad_pairs(
                [self.examples[i] for i in index], self.seq_len, self.pad_id, self._rows_per_step
            )
            batch["index"][: len(index)] = index
            parts.append({k: v.reshape(*lead, *v.shape[1:]) for k, v in batch.items()})
        return parts

    def _packed_parts(self) -> list[dict]:
        """This process's pairs packed: [grad_accum, rows, row_len] and [grad_accum, rows,
        pairs_per_row]. Pairs pack across the process's shards (its micro-batch is one pool);
        every process and micro-batch of the step gets as many rows as the fullest needs,
        rounded up so the global rows divide by `row_multiple`. The pairs of each step are the
        unpacked ones; only their places in the rows depend on the process count."""
        per_micro, k = self.plan.rows_per_shard, self.plan.shards // self.plan.process_count
        mine, need = None, 1
        for process in range(self.plan.process_count):
            # Micro-batch a of this process: slice a of each of its shards, in shard order.
            micro = [[] for _ in range(self.grad_accum)]  # (shard, position) pairs
            for s in range(process * k, (process + 1) * k):
                positions = self._step_positions(s)
                for a in range(self.grad_accum):
                    micro[a] += [(s, p) for p in positions[a * per_micro : (a + 1) * per_micro]]
            assigned = [
                assign_rows(
                    [self._shard_lengths[s][p] for s, p in m], self.row_len, self.pairs_per_row
                )
                for m in micro
            ]
            need = max(need, *(len(a) for a in assigned))
            if process == self.plan.process_index:
                mine = (micro, assigned)
        count = self.plan.process_count
        step = self.row_multiple // math.gcd(self.row_multiple, count)
        rows = min(-(-need // step) * step, per_micro * k)
        micro_batches = []
        for members, assignment in zip(*mine, strict=True):
            examples = [
                {**self.examples[self._offsets[s] + p], "index": self._offsets[s] + p}
                for s, p in members
            ]
            micro_batches.append(
                pack_pairs(
                    examples,
                    assignment,
                    self.row_len,
                    self.pad_id,
                    rows=rows,
                    pairs_per_row=self.pairs_per_row,
                )
            )
        return [{key: np.stack([m[key] for m in micro_batches]) for key in micro_batches[0]}]

    def start(self, trainer: Any) -> None:
        """Packed rows: the global rows of a micro-batch must divide over the batch mesh axes."""
        from jaxalign import sharding as shd

        self.row_multiple = shd.batch_divisor(trainer.mesh, trainer.rules)

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
    row_multiple: int = 1,
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
        pack_pairs=p.pack_pairs,
        row_multiple=row_multiple,
    )
