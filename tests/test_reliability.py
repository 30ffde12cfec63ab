"""Crashes and preemption of real `jaxalign train` processes; unwritable run directories and
failed saves; the records a NaN/Inf halt names."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.trainers.base import Algorithm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import crash_fuzz  # noqa: E402


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    assert crash_fuzz.main(["--trials", "1", "--work-dir", str(tmp_path), "--seed", "3"]) == 0


@pytest.mark.slow
def test_sigterm_saves_logs_and_exits_cleanly_then_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    cmd = crash_fuzz.train_command(run_dir)
    cmd[cmd.index(f"train.steps={crash_fuzz.STEPS}")] = "train.steps=400"
    cmd[cmd.index("checkpoint.every=1")] = "checkpoint.every=1000"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=crash_fuzz.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert time.time() - sent < 30  # saves within a bounded time
    saved = [int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 400
    assert f"stop requested: saved step {saved[0]}" in out
    # Resuming continues from exactly that step.
    cmd[cmd.index("train.steps=400")] = f"train.steps={saved[0] + 2}"
    subprocess.run(cmd, cwd=REPO, env=crash_fuzz.env(), check=True, capture_output=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [saved[0] + 1, saved[0] + 2]


def test_unwritable_run_dir_fails_before_training(tmp_path, capsys):
    from jaxalign import cli

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should be")
    code = cli.main(
        ["train", str(REPO / "configs/sft_tiny.yaml"), "--set", f"run_dir={blocker}/run"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "run directory is not writable" in err and str(blocker) in err
    assert blocker.read_text().startswith("a file")  # nothing already there was touched


# -- the records of a batch, named when it halts the run -------------------------------------------


def _tokenizer():
    from jaxalign.data import load_tokenizer

    return load_tokenizer(str(REPO / "data/tiny/tokenizer.model"))


def _long_records(count: int, low: int, high: int) -> list[dict]:
    """Distinct records of data/tiny whose example has between `low` and `high` tokens."""
    from jaxalign.data import tokenize_records

    tok = _tokenizer()
    lines = (REPO / "data/tiny/sft_train.jsonl").read_text().splitlines()
    out, seen = [], set()
    for line in lines:
        record = json.loads(line)
        examples, _ = tokenize_records([record], tok, template="plain", seq_len=256, where="x")
        key = tuple(examples[0]["inputs"].tolist()) if examples else None
        if key and key not in seen and low <= len(key) <= high:
            out.append(record)
            seen.add(key)
        if len(out) == count:
            return out
    raise AssertionError("not enough records of that length in data/tiny")


def _segments(batch: dict) -> list[tuple]:
    """Each segment's input tokens, micro-batch by micro-batch, row by row, left to right."""
    out = []
    for inputs, segment_ids in zip(
        batch["inputs"].reshape(-1, batch["inputs"].shape[-1]),
        batch["segment_ids"].reshape(-1, batch["inputs"].shape[-1]),
        strict=True,
    ):
        for s in range(1, int(segment_ids.max()) + 1):
            out.append(tuple(inputs[segment_ids == s].tolist()))
    return out


def test_record_ids_name_each_packed_segment_and_survive_resume(tmp_path):
    from jaxalign.data import SFTBatchIterator, tokenize_records

    tok = _tokenizer()
    records = _long_records(40, 8, 40)
    path = tmp_path / "d.jsonl"
    # Blank lines and a bad record (skipped) make line numbers differ from record indices.
    lines = [json.dumps(r) for r in records]
    lines[5:5] = ["", '{"prompt": 3}']
    path.write_text("\n".join(lines) + "\n")
    line_of = {}
    for number, line in enumerate(lines, start=1):
        if line and line != '{"prompt": 3}':
            example = tokenize_records(
                [json.loads(line)], tok, template="plain", seq_len=64, where="x"
            )[0][0]
            line_of.setdefault(tuple(example["inputs"].tolist()), []).append(number)

    def make(prefetch):
        return SFTBatchIterator(
            str(path),
            tok,
            seq_len=64,
            global_batch_size=8,
            grad_accum=2,
            on_error="skip",
            prefetch=prefetch,
            num_packing_bins=4,
        )

    it = make(prefetch=2)
    seen = []
    for _ in range(6):
        batch = next(it)
        ids = it.record_ids()
        segments = _segments(batch)
        assert len(ids) == len(segments) > 8  # packed: more records than rows
        for record_id, segment in zip(ids, segments, strict=True):
            assert record_id.startswith(f"{path}:")
            assert int(record_id.rsplit(":", 1)[1]) in line_of[segment]
        seen.append(ids)
    assert len({i for ids in seen for i in ids}) == 40  # every record, over a few epochs
    # A resumed iterator (no prefetch) names the same records for the same batches.
    resumed = make(prefetch=0)
    first = make(prefetch=0)
    for _ in range(3):
        next(first)
    resumed.set_state(first.get_state())
    for ids in seen[3:]:
        next(resumed)
        assert resumed.record_ids() == ids


def test_describe_records_keeps_errors_to_one_short_line():
    from jaxalign.trainers.loop import describe_records

    assert describe_records(["a:1"]) == "1 record: a:1"
    ids = [f"f.jsonl:{i}" for i in range(1, 26)]
    text = describe_records(ids)
    assert text == ("25 records: " + ", ".join(ids[:10]) + " and 15 more")


class _PoisonedSFT(Algorithm):
    """The SFT algorithm whose loss is NaN on any batch holding the `poison` example (found by
    its tokens, not by its id)."""

    def __init__(self, cfg, poison_inputs: np.ndarray):
        from jaxalign.trainers.sft import SFT

        self.sft = SFT(cfg)
        self.poison = tuple(poison_inputs.tolist())
        self.poisoned_steps: list[int] = []
        self.batches: list[dict] = []

    def loss_fn(self, model, batch, rng, frozen=None):
        loss_sum, n, extras = self.sft.loss_fn(model, batch, rng, frozen)
        return loss_sum * batch["poison"].mean(), n, extras  # NaN for a poisoned batch

    def eval_data(self, process_index, process_count):
        return None

    def train_data(self, process_index, process_count):
        inner = self.sft.train_data(process_index, process_count)
        outer = self

        class Poisoning:
            def __next__(self):
                batch = next(inner)
                outer.batches.append(batch)
                poisoned = outer.poison in _segments(batch)
                if poisoned:
                    outer.poisoned_steps.append(len(outer.batches))
                flag = np.float32(np.nan if poisoned else 1.0)
                return {**batch, "poison": np.full(batch["inputs"].shape[:2], flag)}

            def __getattr__(self, name):  # get_state, set_state, record_ids
                return getattr(inner, name)

        return Poisoning()


@pytest.mark.slow  # a real (tiny) SFT run: compiles a train step
def test_nan_halt_names_the_step_and_the_records_of_its_batch(tmp_path):
    import jax
    from toy import toy_config

    from jaxalign.data import tokenize_records
    from jaxalign.errors import UserError
    from jaxalign.trainers.loop import Trainer

    tok = _tokenizer()
    # 33..64 tokens: one record per packed row of 64, so a batch of 8 rows names all of them.
    records = _long_records(24, 33, 64)
    poison_line = 7
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    poison = tokenize_records(
        [records[poison_line - 1]], tok, template="plain", seq_len=64, where="x"
    )[0][0]["inputs"]
    cfg = toy_config(
        tmp_path,
        **{
            "trainer": "sft",
            "model.vocab_size": 512,
            "mesh.fsdp": 1,
            "train.seq_len": 64,
            "train.grad_accum": 2,
            "train.steps": 6,
            "train.log_every": 2,
            "data.train_file": str(path),
            "data.tokenizer": str(REPO / "data/tiny/tokenizer.model"),
        },
    )
    algo = _PoisonedSFT(cfg, poison)
    with pytest.raises(UserError) as raised:
        Trainer(cfg, algo, devices=jax.devices()[:1]).run()
    message = str(raised.value)
    assert "\n" not in message
    step = algo.poisoned_steps[0]  # 24 records, 8 a batch: the poisoned one is in steps 1-3
    assert 1 <= step <= 3
    assert message.startswith(f"step {step}: loss or gradients became NaN/Inf; halting")
    # Every record of that batch, found by content, is named: the poisoned one too.
    line_of = {}
    for number, record in enumerate(records, start=1):
        example = tokenize_records([record], tok, template="plain", seq_len=64, where="x")[0][0]
        line_of[tuple(example["inputs"].tolist())] = number
    expected = [f"{path}:{line_of[s]}" for s in _segments(algo.batches[step - 1])]
    assert len(expected) == 8 and f"{path}:{poison_line}" in expected
    assert message.endswith(f"; step {step}'s batch had 8 records: {', '.join(expected)}")


# -- a disk that fills while saving --------------------------------------------------------------


def _with_small_file_limit(cmd: list[str], limit_bytes: int) -> list[str]:
    """`cmd` (a Python command) run where files may not grow past `limit_bytes` (writes fail
    with EFBIG, as a full disk fails them with ENOSPC) and SIGXFSZ, which would kill it for
    trying, is ignored. Set by a Python wrapper that then execs `cmd`, not by a preexec_fn: that
    would fork this process, whose JAX threads make a fork unsafe."""
    wrapper = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    assert cmd[0] == sys.executable
    return [sys.executable, "-c", wrapper, *cmd[1:]]


def _logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_os_error_text_names_the_os_error():
    import errno

    from jaxalign.checkpoint import os_error_text

    tensorstore = ValueError(
        'OUT_OF_RANGE: Error writing local file "/r/4/d/x": Failed to write '
        "17635 bytes to file 12: No space left [os_error_code='28']"
    )
    assert os_error_text(tensorstore) == os.strerror(errno.ENOSPC)
    try:
        try:
            raise OSError(errno.EFBIG, "x")
        except OSError as e:
            raise RuntimeError("commit failed") from e
    except RuntimeError as chained:
        assert os_error_text(chained) == os.strerror(errno.EFBIG) == "File too large"
    assert os_error_text(ValueError("first line\nsecond")) == "first line"


@pytest.mark.slow
def test_save_failing_for_lack_of_space_is_one_line_and_keeps_earlier_checkpoints(tmp_path):
    import jax

    run_dir = tmp_path / "run"
    cmd = crash_fuzz.train_command(run_dir)
    cmd[cmd.index("checkpoint.every=1")] = "checkpoint.every=2"
    steps_at = cmd.index(f"train.steps={crash_fuzz.STEPS}")
    cmd[steps_at] = "train.steps=2"
    subprocess.run(cmd, cwd=REPO, env=crash_fuzz.env(), check=True, capture_output=True)
    saved = crash_fuzz.final_params(run_dir)
    # Checkpoint files are larger than 8 KiB; config.yaml and metrics.jsonl stay smaller.
    cmd[steps_at] = "train.steps=4"
    full = subprocess.run(
        _with_small_file_limit(cmd, 8192),
        cwd=REPO,
        env=crash_fuzz.env(),
        capture_output=True,
        text=True,
    )
    assert full.returncode != 0
    err = full.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err[-3000:]
    assert err == (
        f"error: {run_dir / 'checkpoints' / '4'}: saving the checkpoint of step 4 "
        "failed (File too large); earlier checkpoints are untouched (latest complete "
        "checkpoint: step 2)"
    )
    # The earlier checkpoint restores bitwise; the metrics written before the failure are kept.
    assert [p for p in os.listdir(run_dir / "checkpoints") if p.isdigit()] == ["2"]
    restored = crash_fuzz.final_params(run_dir)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True)
    )
    assert _logged_steps(run_dir) == [1, 2, 3, 4]
    # With room again, a resume continues from step 2 and saves step 4.
    out = subprocess.run(
        cmd, cwd=REPO, env=crash_fuzz.env(), check=True, capture_output=True, text=True
    ).stdout
    assert f"resumed from {run_dir / 'checkpoints' / '2'}" in out
    assert sorted(int(p) for p in os.listdir(run_dir / "checkpoints")) == [2, 4]
    assert _logged_steps(run_dir) == [1, 2, 3, 4, 3, 4]


def test_preference_record_ids_name_each_pair_of_the_batch():
    from jaxalign.data.preference import PreferenceBatchIterator, tokenize_preferences

    tok = _tokenizer()
    path = str(REPO / "data/tiny/pref_train.jsonl")
    lines = (REPO / "data/tiny/pref_train.jsonl").read_text().splitlines()
    it = PreferenceBatchIterator(path, tok, seq_len=128, global_batch_size=8, grad_accum=2)
    for _ in range(3):
        batch = next(it)
        ids = it.record_ids()
        assert len(ids) == 8
        rows = batch["tokens"].reshape(8, 2, 128)
        for record_id, row in zip(ids, rows, strict=True):
            path_part, line = record_id.rsplit(":", 1)
            assert path_part == path
            pair = tokenize_preferences(
                [json.loads(lines[int(line) - 1])], tok, template="plain", seq_len=128, where="x"
            )[0][0]
            for side in range(2):  # chosen and rejected are that record's tokens
                n = len(pair["ids"][side])
                np.testing.assert_array_equal(row[side, :n], pair["ids"][side])


def test_metrics_write_failing_for_lack_of_space_is_one_line_and_keeps_earlier_lines(tmp_path):
    import errno

    from jaxalign.errors import UserError
    from jaxalign.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": 2.0})
    real = writer._file

    class Full:  # the file object of a disk that just filled up
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    writer._file = Full()
    with pytest.raises(UserError) as info:
        writer.write(2, {"loss": 1.0})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'metrics.jsonl'}: cannot write the metrics of step 2")
    assert os.strerror(errno.ENOSPC) in message
    writer._file = real
    writer.close()
    assert _logged_steps(tmp_path) == [1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_returns_fragmented_free_heap_to_the_os():
    """300 MiB in 64 KiB blocks (below glibc's mmap threshold: heap memory), every 64th kept so
    the heap cannot shrink from its top: freeing the rest leaves RSS high until the release."""
    script = (
        "import psutil, numpy as np\n"
        "from jaxalign.memory import release_free_memory\n"
        "p = psutil.Process()\n"
        "blocks = [np.ones(16384, np.float32) for _ in range(4800)]\n"
        "kept = blocks[::64]\n"
        "del blocks\n"
        "before = p.memory_info().rss\n"
        "assert release_free_memory()\n"
        "print(before / 2**20, p.memory_info().rss / 2**20)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    before, after = (float(x) for x in out.stdout.split())
    assert before - after > 200, (before, after)
