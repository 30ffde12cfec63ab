"""Specification of jaxalign.data: sources, tokenizer, templates, and packed SFT batches."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from jaxalign.config import DataConfig
from jaxalign.data import (
    SFTBatchIterator,
    load_tokenizer,
    read_jsonl,
    render,
    render_prompt,
    sft_iterator_from_config,
    stop_token_ids,
    to_messages,
    tokenize_records,
    train_tokenizer,
)
from jaxalign.errors import ConfigError, DataError

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Reverse the word 'apple'."},
    {"role": "assistant", "content": "elppa"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TINY / "tokenizer.model"))


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def unique_records(n: int) -> list[dict]:
    """n distinct records of varying lengths, half in each record format."""
    records = []
    for i in range(n):
        prompt, completion = f"Add {i} and {i % 7}.", "The answer is " + "9" * (1 + i % 5) + "."
        if i % 2:
            records.append({"prompt": prompt, "completion": completion})
        else:
            messages = [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": completion})
            records.append({"messages": messages})
    return records


def segments(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every packed example (non-padding segment) of a batch, in row order."""
    rows = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    found = []
    for r in range(rows["inputs"].shape[0]):
        seg = rows["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            found.append({k: rows[k][r][where] for k in KEYS})
    return found


def example_key(ex: dict[str, np.ndarray]) -> tuple:
    return tuple(ex["inputs"].tolist()) + (-1,) + tuple(ex["targets"].tolist())


# --- templates -----------------------------------------------------------------------------------


def test_render_plain_has_one_bos_and_masks_exactly_the_assistant_spans(tok):
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    messages.append({"role": "assistant", "content": "The answer is 5."})
    ids, mask = render(messages, tok, "plain")
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
    assert ids[0] == tok.bos_id and int((ids == tok.bos_id).sum()) == 1
    assert ids[-1] == tok.eos_id and mask[-1]
    assert tok.decode(ids) == "<|user|>Add 2 and 3.<|end|><|assistant|>The answer is 5.<|end|>"
    assert tok.decode(ids[mask]) == "The answer is 5.<|end|>"
    # content tokens + end marker + EOS, and nothing else
    assert int(mask.sum()) == len(tok.encode("The answer is 5.")) + 2


def test_render_chatml_multi_turn_with_system_prompt(tok):
    ids, mask = render(CONVERSATION, tok, "chatml")
    assert int((ids == tok.bos_id).sum()) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 5.<|im_end|>\n"
        "<|im_start|>user\nReverse the word 'apple'.<|im_end|>\n"
        "<|im_start|>assistant\nelppa<|im_end|>\n"
    )
    assert tok.decode(ids[mask]) == "The answer is 5.<|im_end|>elppa<|im_end|>"
    im_end = tok.token_id("<|im_end|>")
    assert int(mask.sum()) == len(tok.encode("The answer is 5.")) + len(tok.encode("elppa")) + 3
    assert int(((ids == im_end) & mask).sum()) == 2 and int((ids == im_end).sum()) == 5


def test_render_prompt_is_the_prefix_of_the_rendered_conversation(tok):
    for template in ("plain", "chatml"):
        prompt = render_prompt(CONVERSATION[:4], tok, template)
        ids, mask = render(CONVERSATION, tok, template)
        assert prompt.dtype == np.int32
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        end = "<|end|>" if template == "plain" else "<|im_end|>"
        assert tok.decode(prompt[mask[: len(prompt)]]) == f"The answer is 5.{end}"
        assert mask[len(prompt)]  # the answer starts right after the prompt
        assert tok.decode(prompt).endswith(
            "<|assistant|>" if template == "plain" else "<|im_start|>assistant\n"
        )
    assert stop_token_ids(tok, "plain") == [tok.token_id("<|end|>"), tok.eos_id]


def test_render_rejects_unknown_template_and_role(tok):
    with pytest.raises(DataError, match="unknown chat template 'llama9'"):
        render(CONVERSATION, tok, "llama9")
    with pytest.raises(DataError, match=r"messages\[1\]: unknown role 'bot'"):
        render([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], tok)


# --- sources -------------------------------------------------------------------------------------

GOOD = {"prompt": "Add 1 and 2.", "completion": "The answer is 3."}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"prompt": "hi"', "malformed JSON (Expecting ',' delimiter at column 16)"),
        (b'{"prompt": "caf\xe9", "completion": "x"}', "invalid UTF-8 at byte 15"),
        (b'{"prompt": "hi", "completion": ""}', "field 'completion' must be a non-empty string"),
        (b'{"prompt": "hi"}', "field 'completion' must be a non-empty string"),
        (b'{"prompt": 3, "completion": "x"}', "field 'prompt' must be a string"),
        (
            b'{"text": "x"}',
            "record must have a 'messages' field or 'prompt' and 'completion' fields",
        ),
        (b"[1, 2]", "record must be a JSON object"),
        (b'{"messages": []}', "field 'messages' must be a non-empty list"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
            "field 'messages[1].role' has unknown role 'bot' (expected system, user, assistant)",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}',
            "field 'messages' must contain an assistant message",
        ),
        (
            b'{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": ""}]}',
            "field 'messages[0].content' must be a string",
        ),
    ],
)
def test_bad_record_error_names_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + bad_line + b"\n")
    with pytest.raises(DataError) as err:
        read_jsonl(str(path))
    assert str(err.value) == f"{path}:3: {message}"
    assert "\n" not in str(err.value)


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError) as err:
        read_jsonl(str(empty))
    assert str(err.value) == f"{empty}: no valid records"
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_skip_mode_drops_and_counts_bad_records(tmp_path, tok):
    lines = [GOOD, {"prompt": "x", "completion": ""}, GOOD, {"messages": "no"}, GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    records, skipped = read_jsonl(path, on_error="skip")
    assert (len(records), skipped) == (3, 2)
    it = SFTBatchIterator(path, tok, seq_len=32, global_batch_size=2, on_error="skip")
    assert (it.stats["records"], it.stats["skipped"], it.stats["examples"]) == (3, 2, 3)
    with pytest.raises(DataError, match=r"mixed.jsonl:2: field 'completion'"):
        SFTBatchIterator(path, tok, seq_len=32, global_batch_size=2)


def test_gzipped_jsonl_reads_like_plain(tmp_path):
    records = unique_records(5)
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    assert read_jsonl(str(path)) == (records, 0)


def test_to_messages_normalizes_prompt_completion_with_system():
    record = {"system": "S", "prompt": "P", "completion": "C"}
    assert to_messages(record, where="x") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "P"},
        {"role": "assistant", "content": "C"},
    ]


# --- tokenizer -----------------------------------------------------------------------------------


def test_train_then_load_round_trips_and_is_reproducible(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20 + "hello world\n")
    data = write_jsonl(tmp_path / "d.jsonl", unique_records(20))
    first = train_tokenizer([str(corpus), data], str(tmp_path / "a" / "tok"), 320, seed=1)
    second = train_tokenizer([str(corpus), data], str(tmp_path / "b" / "tok"), 320, seed=1)
    assert Path(first).read_bytes() == Path(second).read_bytes()
    tok = load_tokenizer(first)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (320, 0, 2, 3)
    assert tok.token_id("<unk>") == 1
    for marker in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|im_start|>"):
        assert len(tok.encode(marker)) == 1
    text = "the lazy fox says héllo 🦊\n<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is lost
    assert tok.encode("") == [] and tok.bos_id not in tok.encode("the fox")


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.model: tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(DataError, match="garbage.model: not a valid SentencePiece model"):
        load_tokenizer(str(garbage))


# --- batches -------------------------------------------------------------------------------------


def test_packed_batches_keep_every_target_inside_its_segment(tok):
    it = SFTBatchIterator(
        str(TINY / "sft_train.jsonl"), tok, seq_len=64, global_batch_size=8, grad_accum=2, seed=3
    )
    for _ in range(3):
        batch = next(it)
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "inputs": ((2, 4, 64), "int32"),
            "targets": ((2, 4, 64), "int32"),
            "loss_mask": ((2, 4, 64), "float32"),
            "segment_ids": ((2, 4, 64), "int32"),
            "positions": ((2, 4, 64), "int32"),
        }
        seg, pos = batch["segment_ids"], batch["positions"]
        padding = seg == 0
        assert not batch["loss_mask"][padding].any() and not pos[padding].any()
        assert (seg[..., 0] == 1).all()  # no padding-only rows
        # positions restart at 0 exactly where the segment changes, else count up by one
        starts = np.concatenate(
            [np.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], -1
        )
        np.testing.assert_array_equal(pos[~padding & starts], 0)
        step = pos[..., 1:] - pos[..., :-1]
        np.testing.assert_array_equal(step[~starts[..., 1:] & ~padding[..., 1:]], 1)
        for ex in segments(batch):
            # within a segment, each target is the next input: the shift happened per example
            np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
            assert ex["inputs"][0] == tok.bos_id and ex["targets"][-1] == tok.eos_id
            assert ex["loss_mask"][-1] == 1.0 and ex["loss_mask"][0] == 0.0


def test_one_epoch_without_shuffle_yields_every_example_exactly_once(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", unique_records(57))
    records, _ = read_jsonl(path)
    examples, _ = tokenize_records(records, tok, template="plain", seq_len=48, where=path)
    for packing in (True, False):
        it = SFTBatchIterator(
            path,
            tok,
            seq_len=48,
            global_batch_size=4,
            shuffle=False,
            packing=packing,
            num_packing_bins=4,
            num_epochs=1,
        )
        seen = [seg for batch in it for seg in segments(batch)]
        assert sorted(map(example_key, seen)) == sorted(map(example_key, examples))
        assert sum(s["loss_mask"].sum() for s in seen) == sum(
            e["loss_mask"].sum() for e in examples
        )
        if not packing:  # one example per row, in file order, right-padded
            assert [example_key(s) for s in seen] == [example_key(e) for e in examples]
            assert len(seen) == 57


def test_unpacked_rows_hold_one_right_padded_example(tok):
    it = SFTBatchIterator(
        str(TINY / "sft_eval.jsonl"),
        tok,
        seq_len=64,
        global_batch_size=4,
        packing=False,
        shuffle=False,
    )
    batch = next(it)
    seg = batch["segment_ids"][0]
    assert set(np.unique(seg)) == {0, 1} and (seg[:, :1] == 1).all()
    lengths = (seg == 1).sum(-1)
    for row, length in enumerate(lengths):
        assert (seg[row, :length] == 1).all() and (seg[row, length:] == 0).all()
        np.testing.assert_array_equal(batch["positions"][0, row, :length], np.arange(length))
        assert batch["loss_mask"][0, row, length:].sum() == 0
        assert (batch["inputs"][0, row, length:] == tok.pad_id).all()


@pytest.mark.parametrize("packing", [True, False])
def test_resumed_iterator_yields_the_same_batches(tok, packing):
    def make():
        return SFTBatchIterator(
            str(TINY / "sft_train.jsonl"),
            tok,
            seq_len=64,
            global_batch_size=8,
            grad_accum=2,
            packing=packing,
            seed=5,
        )

    a = make()
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    b = make()
    b.set_state(state)
    for _ in range(4):
        batch_a, batch_b = next(a), next(b)
        for k in KEYS:
            np.testing.assert_array_equal(batch_a[k], batch_b[k])


def test_resume_refuses_a_state_from_different_data(tmp_path, tok):
    a = SFTBatchIterator(str(TINY / "sft_eval.jsonl"), tok, seq_len=64, global_batch_size=4)
    b = SFTBatchIterator(str(TINY / "sft_eval.jsonl"), tok, seq_len=32, global_batch_size=4)
    with pytest.raises(DataError, match="seq_len: saved 64, now 32"):
        b.set_state(a.get_state())


def test_processes_read_disjoint_records_that_cover_the_dataset(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", unique_records(30))
    seen = []
    for process_index in (0, 1):
        it = SFTBatchIterator(
            path,
            tok,
            seq_len=48,
            global_batch_size=8,
            grad_accum=2,
            process_index=process_index,
            process_count=2,
            num_epochs=1,
        )
        assert it.stats["examples"] == 15
        batches = list(it)
        assert batches[0]["inputs"].shape == (2, 2, 48)
        seen.append({example_key(s) for b in batches for s in segments(b)})
    assert len(seen[0]) == len(seen[1]) == 15 and not seen[0] & seen[1]


def test_long_examples_are_truncated_and_counted(tmp_path, tok):
    records = [
        {"prompt": "Hi.", "completion": "word " * 100},  # truncated, keeps some targets
        {"prompt": "word " * 100, "completion": "x"},  # nothing to learn once truncated
        GOOD,
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    it = SFTBatchIterator(path, tok, seq_len=32, global_batch_size=2, shuffle=False, num_epochs=1)
    assert (it.stats["truncated"], it.stats["dropped"], it.stats["examples"]) == (2, 1, 2)
    lengths = sorted(len(s["inputs"]) for b in it for s in segments(b))
    assert lengths[-1] == 32 and len(lengths) == 2


def test_batch_size_must_split_evenly(tok):
    with pytest.raises(ConfigError, match=r"global batch size 6 must divide by grad_accum \(4\)"):
        SFTBatchIterator(
            str(TINY / "sft_eval.jsonl"), tok, seq_len=32, global_batch_size=6, grad_accum=4
        )


def test_iterator_from_config_uses_the_data_options(tok):
    cfg = DataConfig(
        train_file=str(TINY / "sft_train.jsonl"),
        eval_file=str(TINY / "sft_eval.jsonl"),
        template="chatml",
        packing=False,
        shuffle=False,
    )
    it = sft_iterator_from_config(
        cfg, tok, seq_len=96, global_batch_size=2, grad_accum=1, path=cfg.eval_file
    )
    assert it.stats["records"] == 200
    first = next(it)
    ids, _ = render(to_messages(read_jsonl(cfg.eval_file)[0][0], where="x"), tok, "chatml")
    np.testing.assert_array_equal(first["inputs"][0, 0, : len(ids) - 1], ids[:-1])
