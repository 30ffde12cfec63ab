"""Two processes x 4 simulated CPU devices (a real jax.distributed cluster on localhost) against
one process with 8 devices: same losses, and checkpoints that move between the two."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "train.steps=5", "train.batch_size=16", "train.seq_len=64", "train.log_every=1",
    "train.eval_every=0", "train.progress=false", "train.peak_flops_per_device=1e9",
    "checkpoint.every=3", "model.num_layers=2", "model.hidden_size=64",
    "model.intermediate_size=128", "logging.tensorboard=false", "mesh.data=2", "mesh.fsdp=-1",
]

pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAXALIGN_CPU_DEVICES=str(devices),
               JAXALIGN_COMPILATION_CACHE="off")
    return env


def _train_args(run_dir: Path) -> list[str]:
    sets = [a for o in OVERRIDES + [f"run_dir={run_dir}"] for a in ("--set", o)]
    return [sys.executable, "-m", "jaxalign.cli", "train", str(REPO / "configs/sft_tiny.yaml"),
            *sets]


def one_process(run_dir: Path) -> None:
    subprocess.run(_train_args(run_dir), cwd=REPO, env=_env(8), check=True, capture_output=True,
                   timeout=300)


def two_processes(run_dir: Path, tmp: Path) -> None:
    env = _env(4) | {"RUN_LOGS": str(tmp / "logs")}
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--devices-per-process",
                           "4", "--", *_train_args(run_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text() for p in sorted((tmp / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    one_process(tmp / "single")
    two_processes(tmp / "multi", tmp)
    return tmp


def test_two_processes_give_the_single_process_losses(runs):
    single, multi = losses(runs / "single"), losses(runs / "multi")
    assert sorted(multi) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([multi[s] for s in range(1, 6)],
                               [single[s] for s in range(1, 6)], atol=1e-5, rtol=0)


def test_only_process_zero_writes_metrics(runs):
    lines = (runs / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_two_process_checkpoint_resumes_in_one_process(runs):
    """Drop the final checkpoint of the 2-process run; one process resumes from step 3 with the
    8-device mesh and reproduces steps 4 and 5."""
    run_dir = runs / "resumed"
    shutil.copytree(runs / "multi", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "5")
    (run_dir / "metrics.jsonl").unlink()
    one_process(run_dir)
    resumed, single = losses(run_dir), losses(runs / "single")
    assert sorted(resumed) == [4, 5]
    np.testing.assert_allclose([resumed[4], resumed[5]], [single[4], single[5]], atol=1e-5)


def test_unreachable_coordinator_fails_in_bounded_time_naming_the_setting():
    import time

    env = _env(4) | {"JAXALIGN_COORDINATOR": "127.0.0.1:1", "JAXALIGN_NUM_PROCESSES": "2",
                     "JAXALIGN_PROCESS_ID": "1", "JAXALIGN_INIT_TIMEOUT": "5"}
    start = time.time()
    proc = subprocess.run(_train_args(Path("/tmp/unused_run")), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert time.time() - start < 60
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot join the cluster (JAXALIGN_COORDINATOR=127.0.0.1:1)")
    assert "not reachable within 5s" in last


def test_process_id_outside_the_count_is_one_line():
    env = _env(4) | {"JAXALIGN_COORDINATOR": "127.0.0.1:1", "JAXALIGN_NUM_PROCESSES": "2",
                     "JAXALIGN_PROCESS_ID": "2"}
    proc = subprocess.run(_train_args(Path("/tmp/unused_run")), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: JAXALIGN_PROCESS_ID=2 is outside 0..1 (JAXALIGN_NUM_PROCESSES=2)")
