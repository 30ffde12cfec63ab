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
[grad_accum, pairs, 2] `ref_logps` once `set_reference_logps` has been called.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxalign.data.shards import check_resume_state
from jaxalign.data.sources import read_records, to_messages
from jaxalign.data.templates import get_template, render
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError

STATE_VERSION = 1
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
    return read_records(path, validate=lambda record, where: to_preference(record, where=where),
                        on_error=on_error)


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
            return None
        prompt_ids = cut_prompt(prompt_ids, seq_len - longest)
    ids_out, masks_out = [], []
    for ids, mask in completions:
        room = seq_len - len(prompt_ids)
        ids, mask = ids[:room], mask[:room]
        ids_out.append(np.concatenate([prompt_ids, ids]).astype(np.int32))
        masks_out.append(np.concatenate([np.zeros(len(prompt_ids), bool), mask]))
    if not all(m.any() for m in masks_out):
        return None
    return ids_out, masks_out


def tokenize_preferences(
    records: list[dict],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    where: str,
    max_prompt_length: int | None = None,
    too_long: str = "drop",
) -> tuple[list[dict], dict[str, int]]:
    """Pair examples {ids: [chosen, rejected], masks: [...], margin} and counts (dropped, ...)."""
    examples, dropped = [], 0
    for i, record in enumerate(records):
        prompt, chosen, rejected, margin = to_preference(record, where=f"{where}[{i}]")
        pair = tokenize_pair(
            prompt,
            chosen,
            rejected,
            tokenizer,
            template=template,
            seq_len=seq_len,
            max_prompt_length=max_prompt_length,
            too_long=too_long,
        )
        if pair is None:
            dropped += 1
            continue
        examples.append({"ids": pair[0], "masks": pair[1], "margin": margin})
    return examples, {"dropped": dropped}


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


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


class PreferenceBatchIterator:
    """Infinite (or `num_epochs`-long) iterator of preference batches for one process.

    `get_state()` is JSON; `set_state()` on an iterator built with the same arguments resumes
    with exactly the same batches. `examples` is this process's shard, in file order.
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
    ):
        if global_batch_size < 1 or global_batch_size % (grad_accum * process_count):
            raise ConfigError(
                f"global batch size {global_batch_size} must divide by grad_accum ({grad_accum})"
                f" x process count ({process_count})"
            )
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
        get_template(template)
        self.path = path
        self.seq_len = seq_len
        self.grad_accum = grad_accum
        self.micro_batch = global_batch_size // grad_accum // process_count
        self.pad_id = tokenizer.pad_id
        records, skipped = read_preference_jsonl(path, on_error=on_error)
        examples, counts = tokenize_preferences(
            records,
            tokenizer,
            template=template,
            seq_len=seq_len,
            where=path,
            max_prompt_length=max_prompt_length,
            too_long=too_long,
        )
        shard = examples[process_index::process_count]
        if not shard:
            raise DataError(
                f"no pairs for process {process_index} of {process_count} "
                f"({len(examples)} pairs fit in seq_len {seq_len})",
                where=path,
            )
        for i, example in enumerate(shard):
            example["index"] = i
        self.examples = shard
        self.stats = {
            "records": len(records),
            "skipped": skipped,
            "dropped": counts["dropped"],
            "pairs": len(shard),
            "total_pairs": len(examples),
        }
        self._fingerprint = {
            "pairs": len(shard),
            "tokens": int(sum(len(e["ids"][0]) + len(e["ids"][1]) for e in shard)),
            "seq_len": seq_len,
            "shuffle": shuffle,
            "seed": seed,
            "process_index": process_index,
            "process_count": process_count,
        }
        self.ref_logps: np.ndarray | None = None
        dataset = grain.MapDataset.source(shard)
        if shuffle:
            dataset = dataset.shuffle(seed)
        dataset = dataset.repeat(num_epochs)
        ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.map(
            lambda example: {k: v[0] for k, v in pad_pairs([example], seq_len, self.pad_id).items()}
        )
        self._rows = self.grad_accum * self.micro_batch
        self._iterator = ds.batch(self._rows, drop_remainder=False).__iter__()

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
        batch = next(self._iterator)
        have = batch["tokens"].shape[0]
        if have < self._rows:  # last batch of a finite run: filler pairs
            empty = pad_pairs([], self.seq_len, self.pad_id, rows=self._rows - have)
            batch = {k: np.concatenate([batch[k], empty[k]]) for k in empty}
        lead = (self.grad_accum, self.micro_batch)
        out = {k: np.asarray(batch[k]).reshape(*lead, *batch[k].shape[1:]) for k in BATCH_KEYS}
        if self.ref_logps is not None:
            index = np.asarray(batch["index"])
            ref = np.where((index >= 0)[:, None], self.ref_logps[np.maximum(index, 0)], 0.0)
            out["ref_logps"] = ref.astype(np.float32).reshape(*lead, 2)
        return out

    def get_state(self) -> dict:
        """JSON-serializable position in the stream."""
        return {
            "version": STATE_VERSION,
            "fingerprint": dict(self._fingerprint),
            "grain": _jsonable(self._iterator.get_state()),
        }

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator built with the same data and arguments."""
        check_resume_state(state, version=STATE_VERSION, fingerprint=self._fingerprint,
                           where=self.path, what="data iterator")
        self._iterator.set_state(state["grain"])


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
    train.batch_size counts pairs."""
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
    )
