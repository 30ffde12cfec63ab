"""Crashes and preemption of real `jaxalign train` processes; unwritable run directories."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    proc = subprocess.Popen(cmd, cwd=REPO, env=crash_fuzz.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                       len(metrics.read_text().splitlines()) < 3):
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
    code = cli.main(["train", str(REPO / "configs/sft_tiny.yaml"), "--set",
                     f"run_dir={blocker}/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "run directory is not writable" in err and str(blocker) in err
    assert blocker.read_text().startswith("a file")  # nothing already there was touched
