"""Prompt-only datasets for RL: left-padded prompts in a few fixed shapes, plus extra fields.

A record is `{"prompt": str}` (optionally `"system": str`) or `{"messages": [...]}` (a trailing
assistant turn, if any, is dropped: the policy writes it). Every other field (e.g. a ground-truth
`answer` for a verifiable reward) is carried alongside the tokens unchanged.

Prompts are rendered with the template's `render_prompt` and left-padded to the smallest of
`buckets` that fits the longest prompt of the global batch, so generation compiles at most
len(buckets) shapes. Prompts longer than the largest bucket keep their end (BOS stays first) and
are counted. Like SFT batches, the stream is split into logical shards, so the global batches
are the same for any process count; the state is just the number of batches consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxalign.config import DataConfig
from jaxalign.data.shards import check_resume_state, plan_shards, shard_items, shard_seed
from jaxalign.data.sources import _messages_from_list, read_records_with_ids, source_name
from jaxalign.data.templates import get_template, render_prompt
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError

STATE_VERSION = 1


def to_prompt(record: Any, *, where: str) -> tuple[list[dict], dict[str, Any]]:
    """(messages to render, extra fields) of a prompt record; DataError naming the field."""
    if not isinstance(record, dict):
        raise DataError("record must be a JSON object", where=where)
    if "messages" in record:
        raw = record["messages"]
        if (
            isinstance(raw, list)
            and raw
            and isinstance(raw[-1], dict)
            and (raw[-1].get("role") == "assistant")
        ):
            raw = raw[:-1]
        if not isinstance(raw, list) or not raw:
            raise DataError(
                "field 'messages' must hold at least one non-assistant message", where=where
            )
        # Validate roles and contents; the stand-in answer satisfies the assistant requirement.
        messages = _messages_from_list([*raw, {"role": "assistant", "content": "x"}], where)[:-1]
        extras = {k: v for k, v in record.items() if k != "messages"}
        return messages, extras
    if "prompt" not in record:
        raise DataError("record must have a 'prompt' or a 'messages' field", where=where)
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise DataError("field 'prompt' must be a non-empty string", where=where)
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError("field 'system' must be a string", where=where)
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    extras = {k: v for k, v in record.items() if k not in ("prompt", "system")}
    return messages, extras


def _validate(record: Any, where: str) -> None:
    to_prompt(record, where=where)


class PromptBatchIterator:
    """Batches of prompts for generation: this process's share of each global batch.

    Each `next()` gives `tokens` int32 [B, L] (left-padded with the tokenizer's pad id, L one of
    `buckets`), `lengths` int32 [B] (real tokens per row), and each extra record field as a list
    of B Python objects (None where a record lacks it). B = global_batch_size // process_count.
    With `keep_messages`, the prompt's messages are such a field too (`messages`).
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Tokenizer,
        *,
        global_batch_size: int,
        template: str = "plain",
        buckets: Sequence[int] = (64, 128, 256),
        shuffle: bool = True,
        seed: int = 0,
        on_error: str = "raise",
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        shards: int | None = None,
        data_dir: str | None = None,
        keep_messages: bool = False,
    ):
        buckets = sorted(set(buckets))
        if not buckets or buckets[0] < 2:
            raise ConfigError(f"data.prompt_buckets must be lengths >= 2, got {list(buckets)}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}")
        self.plan = plan_shards(
            shards,
            global_rows=global_batch_size,
            grad_accum=1,
            process_index=process_index,
            process_count=process_count,
            what="prompt batch size",
        )
        get_template(template)
        self.path = source_name(source)
        self.buckets = buckets
        self.pad_id = tokenizer.pad_id
        records, skipped, record_ids = read_records_with_ids(
            source, validate=_validate, on_error=on_error, data_dir=data_dir
        )
        longest = buckets[-1]
        self._tokens: list[np.ndarray] = []
        self._extras: list[dict[str, Any]] = []
        self._record_ids: list[str] = []
        self._last: list[int] = []  # the prompts of the batch last returned
        truncated = 0
        for i, record in enumerate(records):
            messages, extras = to_prompt(record, where=f"{self.path}[{i}]")
            if keep_messages:  # multi-turn episodes re-render the prompt (rl.environment)
                extras = {**extras, "messages": messages}
            try:
                ids = render_prompt(messages, tokenizer, template)
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"record {i}: {e}", where=self.path) from None
                skipped += 1
                continue
            if len(ids) > longest:  # keep the end, where the question is; BOS stays first
                keep_bos = ids[0] == tokenizer.bos_id
                ids = (
                    np.concatenate([ids[:1], ids[len(ids) - longest + 1 :]])
                    if keep_bos
                    else (ids[-longest:])
                )
                truncated += 1
            self._tokens.append(ids)
            self._extras.append(extras)
            self._record_ids.append(record_ids[i])
        if not self._tokens:
            raise DataError("no prompts left after rendering", where=self.path)
        self._lengths = np.asarray([len(t) for t in self._tokens], np.int32)
        self.stats = {
            "records": len(self._tokens),
            "skipped": skipped,
            "truncated": truncated,
            "tokens": int(self._lengths.sum()),
        }
        # Shard s is a shuffled, repeated MapDataset of example indices: random access, so every
        # process can look up the lengths of the whole global batch to pick its bucket.
        self._shards = []
        for s in range(self.plan.shards):
            ds = grain.MapDataset.source(
                shard_items(list(range(len(self._tokens))), s, self.plan.shards, self.path)
            )
            if shuffle:
                ds = ds.shuffle(shard_seed(seed, 0, s))
            self._shards.append(ds.repeat(num_epochs))
        self._fingerprint = {
            "prompts": len(self._tokens),
            "tokens": self.stats["tokens"],
            "buckets": buckets,
            "shards": self.plan.shards,
            "shuffle": shuffle,
            "seed": seed,
        }
        self.step = 0

    def __iter__(self) -> PromptBatchIterator:
        return self

    def _indices(self, shard: int) -> list[int]:
        rows = self.plan.rows_per_shard
        ds = self._shards[shard]
        return [ds[self.step * rows + j] for j in range(rows)]

    def __next__(self) -> dict[str, Any]:
        rows = self.plan.rows_per_shard
        if (self.step + 1) * rows > min(len(ds) for ds in self._shards):
            raise StopIteration  # a finite run ends before any shard would run short
        global_longest = max(
            int(self._lengths[i]) for s in range(self.plan.shards) for i in self._indices(s)
        )
        length = next(b for b in self.buckets if b >= global_longest)
        local = [i for s in self.plan.local for i in self._indices(s)]
        tokens = np.full((len(local), length), self.pad_id, np.int32)
        for row, i in enumerate(local):
            tokens[row, length - self._lengths[i] :] = self._tokens[i]
        keys = sorted({k for i in local for k in self._extras[i]})
        batch: dict[str, Any] = {"tokens": tokens, "lengths": self._lengths[local].copy()}
        for key in keys:
            if key in batch:
                raise DataError(f"extra field {key!r} clashes with a batch key", where=self.path)
            batch[key] = [self._extras[i].get(key) for i in local]
        self._last = local
        self.step += 1
        return batch

    def report(self) -> str:
        """One line on what was read: prompts kept, bad records skipped, prompts truncated."""
        s = self.stats
        return (
            f"prompts {self.path}: {s['records']} prompts ({s['skipped']} bad records skipped, "
            f"{s['truncated']} truncated to {self.buckets[-1]} tokens), {s['tokens']} tokens, "
            f"{self.step} batches taken"
        )

    def record_ids(self) -> list[str]:
        """Ids of the prompt records of the batch last returned, row by row (`path:LINE`,
        `<memory>[N]`, ...). Host-side only."""
        return [self._record_ids[i] for i in self._last]

    def get_state(self) -> dict:
        """JSON-serializable: the number of batches consumed (the same on every process)."""
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), "step": self.step}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator over the same prompts (any process count)."""
        check_resume_state(
            state,
            version=STATE_VERSION,
            fingerprint=self._fingerprint,
            where=self.path,
            what="prompt iterator",
        )
        self.step = int(state["step"])


def prompt_iterator_from_config(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    path: str | None = None,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
    keep_messages: bool = False,
) -> PromptBatchIterator:
    """A PromptBatchIterator over `path` (default: data_cfg.train_file) with data_cfg's options."""
    return PromptBatchIterator(
        path if path is not None else data_cfg.train_file,
        tokenizer,
        global_batch_size=global_batch_size,
        template=data_cfg.template,
        buckets=data_cfg.prompt_buckets,
        shuffle=data_cfg.shuffle if shuffle is None else shuffle,
        seed=data_cfg.seed,
        on_error=data_cfg.on_error,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shards=data_cfg.shards,
        data_dir=data_cfg.data_dir,
        keep_messages=keep_messages,
    )
