"""Two processes x 4 simulated CPU devices (a real jax.distributed cluster on localhost) against
one process with 8 devices: same losses, and checkpoints that move between the two."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "train.steps=5",
    "train.batch_size=16",
    "train.seq_len=64",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress=false",
    "train.peak_flops_per_device=1e9",
    "checkpoint.every=3",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "logging.tensorboard=false",
    "mesh.data=2",
    "mesh.fsdp=-1",
]

pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)  # XLA_FLAGS without the device count (JAXALIGN_CPU_DEVICES sets it)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    env.update(
        JAX_PLATFORMS="cpu", JAXALIGN_CPU_DEVICES=str(devices), JAXALIGN_COMPILATION_CACHE="off"
    )
    return env


def train_argv(
    run_dir: Path,
    extra: tuple[str, ...] = (),
    config: str = "configs/sft_tiny.yaml",
    overrides: list[str] = OVERRIDES,
) -> list[str]:
    """The arguments of `jaxalign train` for a run of `config` with `overrides` in `run_dir`."""
    sets = [a for o in [*overrides, f"run_dir={run_dir}", *extra] for a in ("--set", o)]
    return ["train", str(REPO / config), *sets]


def _train_args(run_dir: Path, extra: tuple[str, ...] = (), **kwargs) -> list[str]:
    return cli(*train_argv(run_dir, extra, **kwargs))


def run_two(cmd: list[str], logs_dir: Path, timeout: int = 300) -> str:
    """`cmd` in two processes x 4 simulated devices (launch/local_multiprocess.sh); their logs."""
    launcher = ["bash", "launch/local_multiprocess.sh", "2", "--devices-per-process", "4", "--"]
    proc = subprocess.run(
        [*launcher, *cmd],
        cwd=REPO,
        env=_env(4) | {"RUN_LOGS": str(logs_dir)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    logs = "".join(p.read_text() for p in sorted(logs_dir.glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-3000:]
    return logs


def run_two_commands(commands: list[list[str]], logs_dir: Path) -> str:
    """`jaxalign COMMAND...` for each of `commands`, in turn, in one launch of two processes x 4
    simulated devices (tests/cli_commands.py: the processes start and join the cluster once);
    their logs."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    listing = logs_dir / "commands.json"
    listing.write_text(json.dumps(commands))
    worker = str(REPO / "tests" / "cli_commands.py")
    return run_two([sys.executable, worker, str(listing)], logs_dir, timeout=600)


def one_process(
    run_dir: Path, config: str = "configs/sft_tiny.yaml", overrides: list[str] = OVERRIDES
) -> None:
    """The run in this process, on its 8 simulated devices: what `jaxalign train` runs, without
    a second start-up (and with the suite's compilation cache, so a resume of the same config
    compiles nothing new)."""
    from jaxalign.config import load_config
    from jaxalign.trainers import train

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the configs' data paths
        train(load_config(REPO / config, [*overrides, f"run_dir={run_dir}"]))


def two_processes(run_dir: Path, tmp: Path, extra: tuple[str, ...] = (), **kwargs) -> None:
    run_two(_train_args(run_dir, extra, **kwargs), tmp / f"logs_{run_dir.name}")


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


SLICES = ("mesh.data=1", "mesh.dcn_data=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process runs (8 devices, here), then the same runs in one launch of two processes
    x 4 devices: the SFT run of OVERRIDES (`multi`), the same with each process a slice
    (`slices`), and the PPO run of PPO_OVERRIDES (`ppo_multi`)."""
    tmp = tmp_path_factory.mktemp("multihost")
    one_process(tmp / "single")
    one_process(tmp / "ppo_single", **PPO)
    commands = [
        train_argv(tmp / "multi"),
        train_argv(tmp / "slices", SLICES),
        train_argv(tmp / "ppo_multi", **PPO),
    ]
    run_two_commands(commands, tmp / "logs")
    return tmp


def test_two_processes_give_the_single_process_losses(runs):
    single, multi = losses(runs / "single"), losses(runs / "multi")
    assert sorted(multi) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [multi[s] for s in range(1, 6)], [single[s] for s in range(1, 6)], atol=1e-5, rtol=0
    )


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


def test_each_process_a_slice_gives_the_single_process_losses(runs):
    """mesh.dcn_data=2 across two processes (CPU devices have no slice_index, so each process is
    a slice): data=1 x 2 slices, fsdp=4 within a process; the losses of the 8-device run."""
    slices, single = losses(runs / "slices"), losses(runs / "single")
    assert sorted(slices) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [slices[s] for s in range(1, 6)], [single[s] for s in range(1, 6)], atol=1e-5, rtol=0
    )


PPO_OVERRIDES = [
    "init_from=null",  # a fresh policy; the value model starts from it with a zero head
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "rl.prompts_per_rollout=16",
    "rl.epochs=2",
    "rl.eval_every=0",
    "sampling.batch_size=16",
    "sampling.max_new_tokens=8",
    "train.seq_len=40",
    "train.batch_size=8",
    "train.steps=8",  # 2 rollouts x 2 epochs x 2 minibatches
    # PPO-ptx: its rows are sharded over the processes like SFT data, its state merged.
    "rl.ptx_coef=0.5",
    "rl.ptx_file=data/tiny/sft_train.jsonl",
    "rl.ptx_batch_size=8",
    # Packed train rows: each process packs its own rows, in as many rows as any process needs.
    "rl.pack_rows=2",
    # The reference in host memory between rollouts: each process keeps its own shards.
    "rl.offload_frozen=true",
    "train.log_every=1",
    "train.progress=false",
    "train.peak_flops_per_device=1e9",
    "checkpoint.every=0",
    "logging.tensorboard=false",
    # FSDP over all 8 devices: each process holds half of every parameter.
    "mesh.data=1",
    "mesh.fsdp=-1",
]
PPO = {"config": "configs/ppo_tiny.yaml", "overrides": PPO_OVERRIDES}


def test_two_process_ppo_gives_the_single_process_run(runs):
    """PPO (with a PPO-ptx term, on packed rows) across two processes x 4 devices (rollouts
    generated and scored on every process, each packing and training its share of each
    minibatch and reading its share of the ptx rows) equals one process with 8 devices: the
    same sampled rollouts (scores, lengths), the same losses and the same data state in the
    final checkpoint (the two processes' ptx iterator states merged into one). FSDP spans both
    processes and the reference lives in host memory between rollouts (rl.offload_frozen),
    each process keeping its own half."""
    single_dir, multi_dir = runs / "ppo_single", runs / "ppo_multi"

    def records(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    single, multi = records(runs / "ppo_single"), records(runs / "ppo_multi")
    assert sorted(multi) == sorted(single) == list(range(1, 9))
    for key in ("loss", "loss/policy", "loss/value", "loss/ptx"):
        np.testing.assert_allclose(
            [multi[s][key] for s in range(1, 9)],
            [single[s][key] for s in range(1, 9)],
            atol=1e-5,
            rtol=1e-5,
            err_msg=key,
        )
    # Rollout statistics, logged with the first step after each rollout.
    rollout_steps = [s for s in range(1, 9) if "objective/scores" in single[s]]
    assert len(rollout_steps) == 2
    for key in ("objective/scores", "rollout/response_length", "rollout/eos_fraction"):
        assert [multi[s][key] for s in rollout_steps] == [single[s][key] for s in rollout_steps]
    np.testing.assert_allclose(
        [multi[s]["objective/kl"] for s in rollout_steps],
        [single[s]["objective/kl"] for s in rollout_steps],
        atol=1e-5,
        rtol=1e-5,
    )
    states = [
        json.loads((r / "checkpoints" / "8" / "data" / "metadata").read_text())
        for r in (single_dir, multi_dir)
    ]
    assert "ptx" in states[0] and states[1] == states[0]


def test_unreachable_coordinator_fails_in_bounded_time_naming_the_setting():
    env = _env(4) | {
        "JAXALIGN_COORDINATOR": "127.0.0.1:1",
        "JAXALIGN_NUM_PROCESSES": "2",
        "JAXALIGN_PROCESS_ID": "1",
        "JAXALIGN_INIT_TIMEOUT": "5",
    }
    start = time.time()
    proc = subprocess.run(
        _train_args(Path("/tmp/unused_run")),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.time() - start < 60
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot join the cluster (JAXALIGN_COORDINATOR=127.0.0.1:1)")
    assert "not reachable within 5s" in last


def test_process_id_outside_the_count_is_one_line():
    env = _env(4) | {
        "JAXALIGN_COORDINATOR": "127.0.0.1:1",
        "JAXALIGN_NUM_PROCESSES": "2",
        "JAXALIGN_PROCESS_ID": "2",
    }
    proc = subprocess.run(
        _train_args(Path("/tmp/unused_run")),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: JAXALIGN_PROCESS_ID=2 is outside 0..1 (JAXALIGN_NUM_PROCESSES=2)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(counts: list[int], timeout_s: int = 5) -> tuple[float, list[int], list[str]]:
    """Start one process per entry of `counts` (its JAXALIGN_NUM_PROCESSES; process ids 0, 1,
    ...) on a fresh localhost coordinator; the seconds until all ended, their exit codes and the
    last stderr line of each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            _train_args(Path("/tmp/unused_run")),
            cwd=REPO,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(2)
            | {
                "JAXALIGN_COORDINATOR": coordinator,
                "JAXALIGN_NUM_PROCESSES": str(num),
                "JAXALIGN_PROCESS_ID": str(pid),
                "JAXALIGN_INIT_TIMEOUT": str(timeout_s),
            },
        )
        for pid, num in enumerate(counts)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    last = [(e.strip().splitlines() or [""])[-1].replace(coordinator, "HOST:PORT") for e in errs]
    return time.monotonic() - start, [p.returncode for p in procs], last


def test_process_zero_expecting_more_processes_fails_in_bounded_time_naming_the_settings():
    """Process 0 (the coordinator) waits for a third process that never comes: JAX would abort
    after its own deadline; jaxalign's watchdog reports first, on both processes."""
    seconds, codes, last = _join([3, 2])
    assert seconds < 30 and codes == [2, 2]
    for pid, num in enumerate([3, 2]):
        assert last[pid] == (
            f"error: cannot join the cluster (JAXALIGN_COORDINATOR=HOST:PORT, "
            f"JAXALIGN_NUM_PROCESSES={num}, JAXALIGN_PROCESS_ID={pid}) within 5s: not every "
            f"process registered with the coordinator; check that all processes use the same "
            f"coordinator address and number of processes, each with its own process id "
            f"(or raise JAXALIGN_INIT_TIMEOUT)"
        )


def test_worker_expecting_more_processes_fails_naming_both_counts():
    """The coordinator service knows only process 0's count, so JAX lets process 1 (which says 3)
    join a cluster of 2; jaxalign compares the counts after joining."""
    seconds, codes, last = _join([2, 3])
    assert seconds < 30 and codes == [2, 2]
    assert last[0] == (
        "error: cannot join the cluster (JAXALIGN_COORDINATOR=HOST:PORT, JAXALIGN_NUM_PROCESSES=2, "
        "JAXALIGN_PROCESS_ID=0): this is process 0 of 2 but process 1 says 3 processes; every "
        "process needs the same number of processes and its own process id"
    )
    assert last[1].startswith(
        "error: cannot join the cluster (JAXALIGN_COORDINATOR=HOST:PORT, "
        "JAXALIGN_NUM_PROCESSES=3, JAXALIGN_PROCESS_ID=1): this is process "
        "1 of 3 but process 0 says 2 processes"
    )


def test_error_messages_name_the_variables_of_each_environment():
    from jaxalign import distributed
    from jaxalign.errors import UserError

    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NODELIST": "node[01-04]",
    }
    assert distributed.detect(slurm) == "slurm"
    assert distributed.settings("slurm", slurm) == (
        "SLURM_STEP_NODELIST=node[01-04], SLURM_NTASKS=4, SLURM_PROCID=1"
    )
    tpu = {"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}
    assert distributed.detect(tpu) == "tpu"
    assert distributed.settings("tpu", tpu) == (
        "TPU_WORKER_HOSTNAMES=a,b, TPU_WORKER_ID=1, MEGASCALE_COORDINATOR_ADDRESS=<unset>"
    )
    assert (
        distributed.init_timeout({}) == 120
        and distributed.init_timeout({"JAXALIGN_INIT_TIMEOUT": "2.5"}) == 2.5
    )
    with pytest.raises(
        UserError,
        match=r"^JAXALIGN_INIT_TIMEOUT must be a positive number of "
        r"seconds \(got 'soon'\)$",
    ):
        distributed.init_timeout({"JAXALIGN_INIT_TIMEOUT": "soon"})


SAMPLING = ["sampling.temperature=1.0", "sampling.max_new_tokens=8", "sampling.batch_size=8"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxalign.cli", *args]


def random_run(path: Path, trainer: str = "sft", seed: int = 0) -> Path:
    """A run directory of a tiny random-weight model (FSDP over all devices), so the
    command tests below need no training (nor the `runs` fixture)."""
    from flax import nnx
    from toy import TINY_MODEL, random_params, reward_model_run, write_run

    from jaxalign.config import load_config
    from jaxalign.models.llama import Transformer

    sets = [f"run_dir={path}", f"trainer={trainer}", "train.seq_len=64", "mesh.fsdp=-1"]
    sets.append(f"data.tokenizer={REPO / 'data' / 'tiny' / 'tokenizer.model'}")
    cfg = load_config(None, sets, base={"model": {**TINY_MODEL, "vocab_size": 512}})
    if trainer == "rm":
        return reward_model_run(path, cfg, seed)
    abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[1]
    return write_run(path, cfg, random_params(abstract, seed))


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """The outputs of `jaxalign generate --resume`, `rejection-sample`, `eval` and `score` here
    (one process, 8 devices) and in one launch of two processes x 4 devices that runs the four
    commands in turn (random-weight models with FSDP over all devices); the launch's logs."""
    from jaxalign import generate as gen
    from jaxalign.eval.suite import evaluate
    from jaxalign.rejection import rejection_sample
    from jaxalign.rewards import FunctionReward
    from jaxalign.rewards.model import score_file

    tmp = tmp_path_factory.mktemp("commands")
    out = {"tmp": tmp}
    run = random_run(tmp / "policy")
    common = ["--model", str(run), *(a for s in SAMPLING for a in ("--set", s)), "--no-progress"]

    # generate: a partial file written here (interrupted after two records) to resume.
    prompts = tmp / "prompts.jsonl"
    questions = ["What is 2 plus 3?", "Name a fruit.", "Spell dog.", "Say hi.", "Count to 3."]
    prompts.write_text(
        "".join(json.dumps({"prompt": q, "i": i}) + "\n" for i, q in enumerate(questions))
    )
    common += ["--input", str(prompts)]
    policy = gen.load_policy(run, SAMPLING)
    gen.generate_file(policy, prompts, tmp / "one.jsonl", progress=False)
    real, calls = gen.generate_all, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "generate_all", interrupted)
        with pytest.raises(KeyboardInterrupt):
            gen.generate_file(policy, prompts, tmp / "two.jsonl", progress=False, chunk_prompts=1)
    out["partial"] = (tmp / "two.jsonl.partial").read_text().splitlines()
    generate = ["generate", *common, "--output", str(tmp / "two.jsonl"), "--resume"]

    # rejection-sample with a reward function.
    reward = tmp / "reward.py"
    reward.write_text(
        "def reward(prompts, completions, **fields):\n    return [len(c) for c in completions]\n"
    )
    three = gen.load_policy(run, [*SAMPLING, "sampling.num_samples=3"])
    scorer = FunctionReward.load(f"{reward}:reward")
    rejection_sample(three, prompts, scorer, tmp / "sft1.jsonl", tmp / "dpo1.jsonl", progress=False)
    rejection = ["rejection-sample", *common, "--set", "sampling.num_samples=3"]
    rejection += ["--output-sft", str(tmp / "sft2.jsonl"), "--output-dpo", str(tmp / "dpo2.jsonl")]
    rejection += ["--reward-fn", f"{reward}:reward"]

    # eval: greedy answers and the KL to a reference.
    files = [
        str(REPO / "data" / "quickstart" / f) for f in ("sft_eval.jsonl.gz", "safety_eval.jsonl.gz")
    ]
    reference = random_run(tmp / "ref", seed=1)
    out["eval_one"] = evaluate(
        run,
        files,
        reference=reference,
        limit_per_family=1,
        max_new_tokens=8,
        generations_path=tmp / "eval_one.jsonl",
    )
    evaluation = ["eval", "--model", str(run), "--reference", str(reference)]
    evaluation += ["--limit", "1", "--max-new-tokens", "8", "--output", str(tmp / "eval_two.json")]
    evaluation += ["--generations", str(tmp / "eval_two.jsonl")]
    evaluation += [a for f in files for a in ("--eval-file", f)]

    # score with a reward model.
    rm = random_run(tmp / "rm", "rm")
    pairs = tmp / "pairs.jsonl"
    rows = [{"prompt": f"Add {i} and 2.", "response": f"It is {i + 2}."} for i in range(11)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_file(str(rm), str(pairs), str(tmp / "score_one.jsonl"))
    score = ["score", "--model", str(rm), "--input", str(pairs)]
    score += ["--output", str(tmp / "score_two.jsonl")]

    out["logs"] = run_two_commands([generate, rejection, evaluation, score], tmp / "logs")
    return out


def test_two_process_generate_resumes_to_the_single_process_output(commands):
    """`jaxalign generate --resume` across two processes (every process generates with the
    params sharded over both, process 0 writes) continues a partial file written here (one
    process, 8 devices, interrupted after two records) to the one-process output, byte for
    byte; `jaxalign rejection-sample` on two processes writes the one-process files."""
    tmp = commands["tmp"]
    lines = (tmp / "one.jsonl").read_text().splitlines()
    assert len(lines) == 5 and commands["partial"] == lines[:2]
    assert (tmp / "two.jsonl").read_text() == (tmp / "one.jsonl").read_text()
    assert commands["logs"].count("wrote 5 records") == 1  # only process 0 says it
    for name in ("sft", "dpo"):
        assert (tmp / f"{name}2.jsonl").read_text() == (tmp / f"{name}1.jsonl").read_text()
    assert (tmp / "sft1.jsonl").read_text().count("\n") == 5
    assert commands["logs"].count("5 prompts x 3 samples") == 1


def test_two_process_eval_gives_the_single_process_metrics(commands):
    """`jaxalign eval` across two processes (greedy answers and the teacher-forced KL to a
    reference, parameters sharded over both): the metrics and generations of one process (8
    devices, here); process 0 alone prints and writes them."""
    tmp, one = commands["tmp"], commands["eval_one"]
    two = json.loads((tmp / "eval_two.json").read_text())["metrics"]
    assert set(one) == set(two) and "kl_to_ref" in one and "pass_rate" in one
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert (tmp / "eval_two.jsonl").read_text() == (tmp / "eval_one.jsonl").read_text()
    assert commands["logs"].count('"kl_to_ref"') == 1


def test_two_process_score_writes_the_single_process_rewards(commands):
    """`jaxalign score` across two processes: the rewards of one process (here), written by
    process 0 alone."""
    one, two = (
        [json.loads(x) for x in (commands["tmp"] / f"score_{n}.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    )
    assert len(one) == len(two) == 11
    np.testing.assert_allclose(
        [r["reward"] for r in two], [r["reward"] for r in one], rtol=1e-5, atol=1e-6
    )
    assert commands["logs"].count("wrote 11 rewards") == 1
