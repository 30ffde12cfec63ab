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
            b'{"txt": "x"}',
            "record must have a 'messages' field or 'prompt' and 'completion' fields",
        ),
        (b"[1, 2]", "record must be a JSON object"),
        (b'{"messages": []}', "field 'messages' must be a non-empty list"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
            "field 'messages[1].role' has unknown role 'bot' "
            "(expected system, user, assistant, tool)",
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
            assert ex["inputs"][0] == tok.bos_id and ex["loss_mask"][0] == 0.0
            if len(ex["inputs"]) < 64:  # not truncated: it ends with a trained-on EOS
                assert ex["targets"][-1] == tok.eos_id and ex["loss_mask"][-1] == 1.0


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
        # 4 shards (the largest divisor <= 8 of 4 micro-batch rows); shard s: examples [s::4]
        assert it.plan.shards == 4
        assert list(it.plan.local) == [2 * process_index, 2 * process_index + 1]
        assert it.stats["examples"] == 30 and it.stats["local_examples"] == (16, 14)[process_index]
        batches = list(it)
        assert batches[0]["inputs"].shape == (2, 2, 48)
        seen.append({example_key(s) for b in batches for s in segments(b)})
    assert (len(seen[0]), len(seen[1])) == (16, 14) and not seen[0] & seen[1]


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


# --- process-count-invariant shards --------------------------------------------------------------


def sharded(tok, process_index=0, process_count=1, **kwargs):
    args = dict(seq_len=64, global_batch_size=16, grad_accum=2, seed=7, shards=4)
    args.update(kwargs)
    return SFTBatchIterator(
        str(TINY / "sft_train.jsonl"),
        tok,
        process_index=process_index,
        process_count=process_count,
        **args,
    )


def global_batches(tok, process_count, steps, state=None, **kwargs):
    """The global batches of `steps` steps: process-local batches concatenated process-major."""
    iterators = [sharded(tok, p, process_count, **kwargs) for p in range(process_count)]
    if state is not None:
        for it in iterators:
            it.set_state(state)
    out = []
    for _ in range(steps):
        local = [next(it) for it in iterators]
        out.append({k: np.concatenate([b[k] for b in local], axis=1) for k in KEYS})
    return out, iterators


def test_global_batches_are_the_same_for_1_2_and_4_processes(tok):
    reference, _ = global_batches(tok, 1, 3)
    assert reference[0]["inputs"].shape == (2, 8, 64)
    for process_count in (2, 4):
        batches, iterators = global_batches(tok, process_count, 3)
        assert next(iterators[0])["inputs"].shape == (2, 8 // process_count, 64)
        for want, got in zip(reference, batches, strict=False):
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k])


def test_state_has_no_process_count_and_resumes_under_another_count(tok):
    single = sharded(tok)
    for _ in range(2):
        next(single)
    state = json.loads(json.dumps(single.get_state()))
    assert "process_index" not in state["fingerprint"] and set(state["shards"]) == {
        "0",
        "1",
        "2",
        "3",
    }
    expected = [next(single) for _ in range(3)]
    resumed, iterators = global_batches(tok, 2, 3, state=state)
    for want, got in zip(expected, resumed, strict=False):
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    # ...and back: the merged states of 2 processes resume a single process.
    from jaxalign.data import merge_states

    merged = merge_states([it.get_state() for it in iterators])
    again = sharded(tok)
    again.set_state(merged)
    np.testing.assert_array_equal(next(again)["inputs"], next(single)["inputs"])
    with pytest.raises(DataError, match=r"no entry for data shards \[2, 3\]"):
        sharded(tok).set_state(iterators[0].get_state())


def test_shard_count_must_divide_the_micro_batch_and_by_the_process_count(tok):
    with pytest.raises(ConfigError, match=r"data.shards \(3\) must be positive and divide"):
        sharded(tok, shards=3)
    with pytest.raises(ConfigError, match=r"data.shards \(2\) must divide by the process count"):
        sharded(tok, 0, 4, shards=2)
    assert sharded(tok, shards=None, global_batch_size=24, grad_accum=2).plan.shards == 6


def test_prefetch_state_follows_consumed_batches_not_prepared_ones(tok):
    plain, ahead = sharded(tok), sharded(tok, prefetch=3)
    for _ in range(2):
        np.testing.assert_array_equal(next(plain)["inputs"], next(ahead)["inputs"])
    import time

    time.sleep(0.2)  # let the thread run ahead
    state = ahead.get_state()
    assert state == plain.get_state() and state["batches"] == 2
    fresh = sharded(tok, prefetch=2)
    fresh.set_state(json.loads(json.dumps(state)))
    for _ in range(3):
        want = next(plain)
        np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])
        np.testing.assert_array_equal(next(ahead)["targets"], want["targets"])
    ahead.close()
    fresh.close()


# --- mixtures ------------------------------------------------------------------------------------


def test_mixture_follows_the_weights_and_resumes_exactly(tmp_path, tok):
    # Component A's completions are all "a...", component B's all "b...": count them by segment.
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": f"q{i}", "completion": "aaaa"} for i in range(40)]
    )
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": f"q{i}", "completion": "bbbb"} for i in range(40)]
    )
    mixture = [{"path": a, "weight": 3.0}, {"path": b, "weight": 1.0}]

    def make():
        return SFTBatchIterator(
            None, tok, mixture=mixture, seq_len=32, global_batch_size=8, shards=4, seed=1
        )

    it = make()
    assert [c["examples"] for c in it.stats["components"]] == [40, 40]
    counts = {"a": 0, "b": 0}
    for _ in range(30):
        for seg in segments(next(it)):
            text = tok.decode(seg["targets"][seg["loss_mask"] > 0])
            counts["a" if "aaaa" in text else "b"] += 1
    share = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share - 0.75) < 0.03, counts
    state = json.loads(json.dumps(it.get_state()))
    # every component's position is in the state of every shard
    assert all(len(s["parent"]["parents"]) == 2 for s in state["shards"].values())
    resumed = make()
    resumed.set_state(state)
    for _ in range(3):
        want, got = next(it), next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(DataError, match="weights: saved"):
        SFTBatchIterator(
            None,
            tok,
            seq_len=32,
            global_batch_size=8,
            shards=4,
            seed=1,
            mixture=[(a, 1.0), (b, 1.0)],
        ).set_state(state)


# --- more templates ------------------------------------------------------------------------------


def test_llama3_and_gemma_write_the_models_exact_strings(tok):
    ids, mask = render(CONVERSATION[:3], tok, "llama3")
    assert ids[0] == tok.bos_id and int((ids == tok.bos_id).sum()) == 1
    assert tok.decode(ids) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is 5.<|eot_id|>"
    )
    assert tok.decode(ids[mask]) == "The answer is 5.<|eot_id|>"
    ids, mask = render(CONVERSATION, tok, "gemma")
    assert tok.decode(ids) == (  # no system role: it opens the first user turn
        "<start_of_turn>user\nBe brief.\n\nAdd 2 and 3.<end_of_turn>\n"
        "<start_of_turn>model\nThe answer is 5.<end_of_turn>\n"
        "<start_of_turn>user\nReverse the word 'apple'.<end_of_turn>\n"
        "<start_of_turn>model\nelppa<end_of_turn>\n"
    )
    assert tok.decode(ids[mask]) == "The answer is 5.<end_of_turn>elppa<end_of_turn>"
    prompt = render_prompt(CONVERSATION[:4], tok, "gemma")
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert tok.decode(prompt).endswith("<start_of_turn>model\n") and mask[len(prompt)]


CHATML_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer_config(tmp_path, template: str) -> str:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(
        json.dumps(
            {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}
        )
    )
    return str(path)


def test_jinja_chat_template_masks_from_prefix_spans_and_matches_builtin(tmp_path, tok):
    path = write_tokenizer_config(tmp_path, CHATML_JINJA)
    ids, mask = render(CONVERSATION, tok, path)
    want_ids, want_mask = render(CONVERSATION, tok, "chatml")
    # the template's `{{ bos_token }}` becomes the one BOS id, never a second BOS
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(
        render_prompt(CONVERSATION[:4], tok, path), render_prompt(CONVERSATION[:4], tok, "chatml")
    )
    assert stop_token_ids(tok, path) == [tok.token_id("<|im_end|>"), tok.eos_id]
    # {% generation %} blocks (HF's assistant markers) render their body
    generation = CHATML_JINJA.replace(
        "{{ m['content'] }}", "{% generation %}{{ m['content'] }}{% endgeneration %}"
    )
    gen_ids, gen_mask = render(CONVERSATION, tok, write_tokenizer_config(tmp_path, generation))
    np.testing.assert_array_equal(gen_ids, want_ids)
    np.testing.assert_array_equal(gen_mask, want_mask)


def test_jinja_sandbox_blocks_python_internals(tmp_path, tok):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    path = write_tokenizer_config(tmp_path, evil)
    with pytest.raises(DataError) as err:
        render(CONVERSATION, tok, path)
    assert str(err.value).startswith(f"{path}: chat template blocked by the sandbox (SecurityError")
    raising = write_tokenizer_config(tmp_path, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="chat template failed .*roles must alternate"):
        render(CONVERSATION, tok, raising)


def test_trained_tokenizer_keeps_every_builtin_marker_whole(tmp_path):
    from jaxalign.data.tokenizer import CHAT_MARKERS

    data = write_jsonl(tmp_path / "d.jsonl", unique_records(40))
    tok = load_tokenizer(train_tokenizer([data], str(tmp_path / "tok"), 300))
    for name in ("llama3", "gemma"):
        from jaxalign.data.templates import TEMPLATES

        t = TEMPLATES[name]
        assert t.end in CHAT_MARKERS and len(tok.encode(t.end)) == 1
    assert stop_token_ids(tok, "llama3") == [tok.token_id("<|eot_id|>"), tok.eos_id]


# --- prompt datasets -----------------------------------------------------------------------------


def prompt_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        question = "Add " + " and ".join(str(j) for j in range(1 + i % 9)) + "."
        if i % 3 == 0:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "dropped"},
            ]
            records.append({"messages": messages, "answer": str(i), "id": i})
        else:
            records.append({"prompt": question, "answer": str(i), "id": i})
    return records


def test_prompt_batches_are_left_padded_bucketed_and_carry_extra_fields(tok):
    from jaxalign.data import PromptBatchIterator

    records = prompt_records(40)
    it = PromptBatchIterator(
        records, tok, global_batch_size=8, buckets=[16, 32, 64], shuffle=False, template="chatml"
    )
    batch = next(it)
    assert sorted(batch) == ["answer", "id", "lengths", "tokens"]
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape[1] in (16, 32, 64)
    assert batch["id"] == [0, 1, 2, 3, 4, 5, 6, 7]  # 8 shards of one row, in shard order
    for row, i in enumerate(batch["id"]):
        messages = [{"role": "user", "content": to_prompt_text(records[i])}]
        want = render_prompt(messages, tok, "chatml")
        length = int(batch["lengths"][row])
        assert length == len(want) and batch["answer"][row] == str(i)
        np.testing.assert_array_equal(batch["tokens"][row, -length:], want)
        assert (batch["tokens"][row, :-length] == tok.pad_id).all()
    assert batch["tokens"].shape[1] == min(b for b in (16, 32, 64) if b >= batch["lengths"].max())
    shapes = {next(it)["tokens"].shape for _ in range(20)}
    assert shapes <= {(8, 16), (8, 32), (8, 64)}


def to_prompt_text(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["messages"][0]["content"]


def test_prompt_batches_are_process_invariant_resumable_and_truncate_long_prompts(tok):
    from jaxalign.data import PromptBatchIterator

    records = prompt_records(40) + [{"prompt": "word " * 80, "answer": "long", "id": 99}]

    def make(p=0, count=1):
        return PromptBatchIterator(
            records,
            tok,
            global_batch_size=8,
            buckets=[32, 64],
            shards=4,
            seed=3,
            process_index=p,
            process_count=count,
        )

    single = make()
    assert single.stats["truncated"] == 1
    reference = [next(single) for _ in range(6)]
    assert max(b["lengths"].max() for b in reference) == 64  # the long prompt, cut to 64
    pair = [make(0, 2), make(1, 2)]
    for want in reference:
        got = [next(it) for it in pair]
        np.testing.assert_array_equal(np.concatenate([g["tokens"] for g in got]), want["tokens"])
        assert got[0]["id"] + got[1]["id"] == want["id"]
    resumed = make(1, 2)
    resumed.set_state(single.get_state())
    assert next(resumed)["id"] == next(single)["id"][4:]


def test_bad_prompt_records_name_the_field_or_are_skipped(tmp_path, tok):
    from jaxalign.data import PromptBatchIterator

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": ""}, {"x": 1}])
    with pytest.raises(DataError) as err:
        PromptBatchIterator(path, tok, global_batch_size=1)
    assert str(err.value) == f"{path}:2: field 'prompt' must be a non-empty string"
    it = PromptBatchIterator(path, tok, global_batch_size=1, on_error="skip")
    assert it.stats["skipped"] == 2 and it.stats["records"] == 1


def test_template_failures_are_skipped_and_counted_not_batched(tmp_path, tok):
    template = write_tokenizer_config(
        tmp_path,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}",
    )
    records = [GOOD, {"system": "S", **GOOD}, GOOD]
    with pytest.raises(DataError, match=r"<memory>: record 1: .*no system"):
        SFTBatchIterator(records, tok, seq_len=32, global_batch_size=2, template=template)
    it = SFTBatchIterator(
        records, tok, seq_len=32, global_batch_size=2, template=template, on_error="skip"
    )
    assert (it.stats["records"], it.stats["skipped"], it.stats["examples"]) == (2, 1, 2)
    assert "1 bad records skipped" in it.report()


# --- preference pairs on logical shards ----------------------------------------------------------

PAIR_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "margin", "pair_mask")


def pair_records(n: int) -> list[dict]:
    """n distinct preference records in the three record formats; every 20th is too long for
    64 tokens."""
    records = []
    for i in range(n):
        question = f"What is {i} plus {i % 7}?" + (" Think about it." * 12 if i % 20 == 19 else "")
        chosen, rejected = f"It is {i + i % 7}.", f"Maybe {i + i % 7 + 1 + i % 3}."
        if i % 3 == 0:
            records.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        else:
            user = [{"role": "user", "content": question}]
            answers = [[{"role": "assistant", "content": a}] for a in (chosen, rejected)]
            if i % 3 == 1:
                records.append({"prompt": user, "chosen": answers[0], "rejected": answers[1]})
            else:
                records.append({"chosen": user + answers[0], "rejected": user + answers[1]})
    return records


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    """200 records, 190 pairs that fit in 64 tokens (shards of 48, 48, 47, 47)."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records(200))


def preference(tok, path, process_index=0, process_count=1, **kwargs):
    from jaxalign.data import PreferenceBatchIterator

    args = dict(seq_len=64, global_batch_size=16, grad_accum=2, seed=7, shards=4)
    args.update(kwargs)
    return PreferenceBatchIterator(
        path,
        tok,
        process_index=process_index,
        process_count=process_count,
        **args,
    )


def global_pairs(iterators, steps):
    """`steps` global batches: the process-local batches concatenated process-major."""
    out = []
    for _ in range(steps):
        local = [next(it) for it in iterators]
        out.append({k: np.concatenate([b[k] for b in local], axis=1) for k in local[0]})
    return out


def test_preference_global_batches_are_the_same_for_1_2_and_4_processes(tok, pairs_path):
    # 190 pairs: 12 global batches of 16 make one epoch, so 14 cross into the second
    # (reshuffled) epoch.
    reference = global_pairs([preference(tok, pairs_path)], 14)
    assert reference[0]["tokens"].shape == (2, 8, 2, 64)
    # each shard holds 47 or 48 pairs, 4 per step: the first 11 steps show 176 different pairs
    first_epoch = {tuple(pair) for b in reference[:11] for pair in b["tokens"].reshape(-1, 128)}
    assert len(first_epoch) == 176
    for process_count in (2, 4):
        iterators = [preference(tok, pairs_path, p, process_count) for p in range(process_count)]
        assert next(preference(tok, pairs_path, 1, process_count))["tokens"].shape == (
            2,
            8 // process_count,
            2,
            64,
        )
        for want, got in zip(reference, global_pairs(iterators, 14), strict=True):
            for k in PAIR_KEYS:
                np.testing.assert_array_equal(got[k], want[k])
        # the processes hold disjoint pairs that together are all of them
        held = [it.examples for it in iterators]
        assert sum(map(len, held)) == 190 == iterators[0].stats["total_pairs"]


def test_packed_preference_batches_hold_the_same_pairs_for_1_2_and_4_processes(tok, pairs_path):
    """Packed, the rows depend on the process count but the pairs of each global micro-batch do
    not, and every process gets the same number of rows (the global array is rectangular)."""

    def pair_sets(iterators, steps):
        out = []
        for _ in range(steps):
            local = [next(it) for it in iterators]
            rows = {b["tokens"].shape for b in local}
            assert len(rows) == 1 and rows.pop()[2] == 128  # rows of 2 x seq_len
            out.append(
                [
                    sorted(
                        tuple(it.examples[i]["ids"][0])
                        for it in iterators
                        for i in it._last_index[a][it._last_index[a] >= 0]
                    )
                    for a in range(2)
                ]
            )
        return out

    reference = pair_sets([preference(tok, pairs_path, pack_pairs=True)], 14)
    padded = preference(tok, pairs_path)
    for want in reference[:3]:
        next(padded)
        assert want == [
            sorted(tuple(padded.examples[i]["ids"][0]) for i in row) for row in padded._last_index
        ]
    for process_count in (2, 4):
        iterators = [
            preference(tok, pairs_path, p, process_count, pack_pairs=True)
            for p in range(process_count)
        ]
        assert pair_sets(iterators, 14) == reference


def test_preference_state_resumes_mid_epoch_under_any_process_count(tok, pairs_path):
    from jaxalign.data import merge_states

    single = preference(tok, pairs_path)
    global_pairs([single], 5)
    state = json.loads(json.dumps(single.get_state()))
    assert state["batches"] == 5 and "process_index" not in state["fingerprint"]
    expected = global_pairs([single], 9)  # through the end of the epoch and into the next
    for process_count in (1, 2, 4):
        iterators = [preference(tok, pairs_path, p, process_count) for p in range(process_count)]
        for it in iterators:
            it.set_state(state)
        for want, got in zip(expected, global_pairs(iterators, 9), strict=True):
            for k in PAIR_KEYS:
                np.testing.assert_array_equal(got[k], want[k])
    # The states of 2 processes merge into the single-process state (and refuse to if they differ)
    pair = [preference(tok, pairs_path, p, 2) for p in range(2)]
    global_pairs(pair, 5)
    merged = merge_states([it.get_state() for it in pair])
    again = preference(tok, pairs_path)
    again.set_state(merged)
    np.testing.assert_array_equal(next(again)["tokens"], expected[0]["tokens"])
    next(pair[0])
    with pytest.raises(DataError, match="different runs or steps"):
        merge_states([it.get_state() for it in pair])
    with pytest.raises(DataError, match="seed: saved 7, now 8"):
        preference(tok, pairs_path, seed=8).set_state(state)


def test_preference_reference_logps_follow_their_pairs_on_every_process(tok, pairs_path):
    """Precomputed reference log-probs are attached by pair: give each pair a value computed
    from its tokens and check every row of every process's batches carries its own."""

    def tag(example):
        return [float(example["ids"][0].sum()), float(example["ids"][1].sum())]

    for process_index in (0, 1):
        it = preference(tok, pairs_path, process_index, 2)
        it.set_reference_logps(np.asarray([tag(e) for e in it.examples], np.float32))
        for batch in global_pairs([it], 13):
            real = batch["pair_mask"] > 0
            sums = (batch["tokens"] * batch["segment_ids"]).sum(-1)  # [A, rows, 2]
            np.testing.assert_array_equal(batch["ref_logps"][real], sums[real])
    assert it.max_local_pairs == 96  # shards 0 and 1: 48 + 48


def test_preference_counts_report_dropped_truncated_and_skipped_pairs(tmp_path, tok):
    from jaxalign.data import PreferenceBatchIterator

    good = {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"}
    long = {"prompt": "word " * 40, "chosen": "5", "rejected": "6"}
    records = [good, {"prompt": "x", "chosen": "", "rejected": "y"}, long, good]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'chosen'"):
        PreferenceBatchIterator(path, tok, seq_len=32, global_batch_size=2)

    def make(**kwargs):
        return PreferenceBatchIterator(
            path, tok, seq_len=32, global_batch_size=2, on_error="skip", **kwargs
        )

    dropping, cutting = make(), make(too_long="truncate")
    assert {k: dropping.stats[k] for k in ("records", "skipped", "dropped", "truncated")} == {
        "records": 3,
        "skipped": 1,
        "dropped": 1,
        "truncated": 0,
    }
    assert (cutting.stats["dropped"], cutting.stats["truncated"]) == (0, 1)
    assert "3 records (1 bad records skipped), 2 pairs, 1 dropped" in dropping.report()
    assert "0 dropped (too long or nothing to score), 1 truncated" in cutting.report()


# --- finite (eval) passes ---------------------------------------------------------------------


def test_finite_preference_pass_gives_every_process_the_same_batches_and_the_exact_mean(
    tok, pairs_path
):
    """190 pairs, global batches of 24: every process runs 8 batches (the last ones partly
    masked pairs), and the masked mean of a per-pair loss equals its plain mean over the pairs."""
    from jaxalign.data.preference import read_preference_jsonl, tokenize_preferences

    records, _ = read_preference_jsonl(pairs_path)
    pairs, _ = tokenize_preferences(records, tok, template="plain", seq_len=64, where="eval")

    def pair_loss(ids, masks):  # any per-pair number: mean chosen minus mean rejected token id
        return np.mean(ids[0][masks[0]]) - np.mean(ids[1][masks[1]])

    exact = np.mean([pair_loss(p["ids"], [m.astype(bool) for m in p["masks"]]) for p in pairs])
    reference = None
    for process_count in (1, 2, 4):
        per_process = [
            list(
                preference(
                    tok,
                    pairs_path,
                    p,
                    process_count,
                    global_batch_size=24,
                    shuffle=False,
                    num_epochs=1,
                )
            )
            for p in range(process_count)
        ]
        assert [len(b) for b in per_process] == [8] * process_count
        batches = [
            {k: np.concatenate([b[k] for b in step], axis=1) for k in PAIR_KEYS}
            for step in zip(*per_process, strict=True)
        ]
        total = weight = 0.0
        for batch in batches:
            ids = batch["tokens"].reshape(-1, 2, 64).astype(np.float64)
            masks = batch["loss_mask"].reshape(-1, 2, 64) > 0
            for row, w in enumerate(batch["pair_mask"].reshape(-1)):
                if w:
                    total += w * pair_loss(ids[row], masks[row])
                weight += w
        assert weight == 190
        np.testing.assert_allclose(total / weight, exact, rtol=1e-12)
        if reference is None:
            reference = batches
        for want, got in zip(reference, batches, strict=True):
            np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_finite_packed_pass_gives_every_process_the_same_batches_and_the_exact_mean(tok):
    """Shard 0 holds long examples, the others short ones: packed, shard 0 runs for more batches
    than the rest. Every process still runs as many batches as the longest shard (padding-only
    rows after its own shards end), so the global batches and the token-mean loss are the
    single-process ones."""
    records = []
    for i in range(26):
        answer = "9" * (40 if i % 4 == 0 else 2)
        records.append({"prompt": f"Add {i} and {i % 5}.", "completion": answer})
    examples, _ = tokenize_records(records, tok, template="plain", seq_len=64, where="x")

    def token_loss(targets):  # any per-token number, float64
        return np.log1p(targets.astype(np.float64))

    exact = sum((token_loss(e["targets"]) * e["loss_mask"]).sum() for e in examples) / sum(
        e["loss_mask"].sum() for e in examples
    )

    def make(p, count):
        return SFTBatchIterator(
            records,
            tok,
            seq_len=64,
            global_batch_size=8,
            grad_accum=2,
            shards=4,
            shuffle=False,
            num_epochs=1,
            num_packing_bins=2,
            process_index=p,
            process_count=count,
        )

    reference = None
    for count in (1, 2, 4):
        per_process = [list(make(p, count)) for p in range(count)]
        lengths = [len(b) for b in per_process]
        assert lengths == [lengths[0]] * count
        batches = [
            {k: np.concatenate([b[k] for b in step], axis=1) for k in KEYS}
            for step in zip(*per_process, strict=True)
        ]
        if reference is None:
            reference = batches
            # shard 0 (the long examples) outlasts the others: the last batch is mostly padding
            assert batches[-1]["segment_ids"][:, 1:].sum() == 0
            assert batches[-1]["segment_ids"][:, 0].sum() > 0
        assert len(batches) == len(reference)
        for want, got in zip(reference, batches, strict=True):
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k])
        loss = sum((token_loss(b["targets"]) * b["loss_mask"]).sum() for b in batches)
        np.testing.assert_allclose(
            loss / sum(b["loss_mask"].sum() for b in batches), exact, rtol=1e-12
        )


# --- counts reported at the end of training ------------------------------------------------------


def test_training_result_and_last_log_line_carry_the_skipped_and_dropped_counts(tmp_path, capsys):
    import jax

    from jaxalign.cli import configure_logging
    from jaxalign.config import load_config
    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import Trainer

    good = {"prompt": "Add 2 and 3.", "chosen": "The answer is 5.", "rejected": "It is 6."}
    records = [good] * 6 + [
        {"prompt": "x", "chosen": 3, "rejected": "y"},
        {"prompt": "word " * 60, "chosen": "5", "rejected": "6"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    sets = {
        "trainer": "dpo",
        "dpo.loss_type": "simpo",
        "run_dir": str(tmp_path / "run"),
        "data.train_file": path,
        "data.tokenizer": str(TINY / "tokenizer.model"),
        "data.on_error": "skip",
        "train.steps": 1,
        "train.batch_size": 2,
        "train.seq_len": 32,
        "train.warmup_steps": 1,
        "train.progress": False,
        "train.peak_flops_per_device": 1e9,
        "checkpoint.every": 0,
        "logging.tensorboard": False,
    }
    model = {
        "vocab_size": 512,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()], base={"model": model})
    configure_logging()  # what the command line shows: the `jaxalign` loggers on stdout
    result = Trainer(cfg, DPO(cfg), devices=jax.devices()[:1]).run()
    assert result.final_step == 1
    counts = {k: result.data_stats[k] for k in ("records", "skipped", "dropped", "total_pairs")}
    assert counts == {"records": 7, "skipped": 1, "dropped": 1, "total_pairs": 6}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        f"[jaxalign] end of training: preference data {path}: 7 records "
        "(1 bad records skipped), 6 pairs, 1 dropped"
    )


def test_prompt_batches_are_the_same_for_1_2_and_4_processes_and_end_together(tok):
    from jaxalign.data import PromptBatchIterator

    records = prompt_records(50)  # shards of 13, 13, 12, 12 prompts: 6 finite batches of 2 x 4

    def make(p, count, **kwargs):
        return PromptBatchIterator(
            records,
            tok,
            global_batch_size=8,
            buckets=[32, 64],
            shards=4,
            seed=5,
            process_index=p,
            process_count=count,
            **kwargs,
        )

    single = make(0, 1)
    reference = [next(single) for _ in range(8)]  # past one epoch (50 prompts)
    finite = list(make(0, 1, num_epochs=1))
    assert len(finite) == 6
    for count in (2, 4):
        iterators = [make(p, count) for p in range(count)]
        for want in reference:
            got = [next(it) for it in iterators]
            np.testing.assert_array_equal(
                np.concatenate([g["tokens"] for g in got]), want["tokens"]
            )
            assert [i for g in got for i in g["id"]] == want["id"]
        assert [len(list(make(p, count, num_epochs=1))) for p in range(count)] == [6] * count
