"""Helpers shared by the benchmarks: medians, peak memory, machine facts, allocators, JSON, and
persistent worker subprocesses that the parent drives in turns (so each side of a comparison is
measured right next to the other, under the same environment).

Benchmarks are not tests: they print tables and write JSON; nothing here asserts.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import queue
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MARKER = "@@bench "  # prefix of the JSON lines a worker writes to stdout

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)

# glibc settings that stop malloc from handing freed memory back to the OS (see
# the shared performance notes, PERFORMANCE-NOTES.md: on this VM, faulting it back in is slow).
GLIBC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}

ALLOCATORS = ("tcmalloc", "glibc", "glibc-tuned")


def scratch_dir(prefix: str) -> str:
    """A temporary run directory for a benchmark's trainer, removed when the process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time this process has used, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> float:
    """The 1-minute load average (other processes competing for the cores show up here)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


class Timer:
    """Wall and CPU time of a block; `cpu_share` is the fraction of all cores this process used
    (about 1.0 on an otherwise idle machine for a multi-threaded step; much lower means another
    process was competing for the cores)."""

    def __enter__(self) -> Timer:
        self.load_before = load_average()
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = cpu_seconds() - self._cpu
        self.cpu_share = self.cpu_s / max(self.wall_s, 1e-9) / (os.cpu_count() or 1)
        self.load_after = load_average()

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "cpu_share": self.cpu_share,
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


def find_tcmalloc() -> str | None:
    for path in TCMALLOC_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def default_allocator() -> str:
    return "tcmalloc" if find_tcmalloc() else "glibc"


def allocator_env(name: str) -> dict[str, str]:
    """Environment variables that select allocator `name` for a child process."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and k not in GLIBC_TUNED}
    if name == "tcmalloc":
        path = find_tcmalloc()
        if path is None:
            raise SystemExit(
                "tcmalloc requested but libtcmalloc_minimal.so.4 was not found "
                "(Debian: apt-get install libtcmalloc-minimal4)"
            )
        env["LD_PRELOAD"] = path
    elif name == "glibc-tuned":
        env.update(GLIBC_TUNED)
    elif name != "glibc":
        raise SystemExit(f"unknown allocator {name!r} (one of {', '.join(ALLOCATORS)})")
    return env


def loaded_allocator() -> str:
    """Which malloc this process actually runs with, read from its own memory map."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for lib in ("tcmalloc", "jemalloc", "mimalloc"):
        if lib in maps:
            return lib
    tuned = all(os.environ.get(k) == v for k, v in GLIBC_TUNED.items())
    return "glibc-tuned" if tuned else "glibc"


VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy")
# For benchmarks with no PyTorch side: torch is never imported next to jax's CUDA libraries.
JAX_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def machine_info(packages: Sequence[str] = VERSION_PACKAGES) -> dict[str, Any]:
    """CPU, core count, memory, OS and the versions of `packages` (each is imported)."""
    cpu = "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in packages:
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu_simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "versions": versions,
    }


def write_json(path: str | os.PathLike, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# -- worker protocol ---------------------------------------------------------------------------
# A worker reads one JSON command per line on stdin and answers with one `MARKER + JSON` line on
# stdout; anything else it prints is passed through. The parent keeps several workers alive and
# asks them in turns, so repeats of different sides interleave in time.


def emit(obj: Any) -> None:
    """Worker side: send one answer to the parent."""
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def commands():
    """Worker side: the parent's commands, until it closes stdin."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


class Worker:
    """Parent side: one long-lived benchmark subprocess."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def request(self, command: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                answer = json.loads(line[len(MARKER) :])
                if "error" in answer:
                    raise RuntimeError(f"{self.name}: {answer['error']}")
                return answer
            sys.stderr.write(f"[{self.name}] {line}")
        raise RuntimeError(f"{self.name}: worker exited with code {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table. columns: (header, key, format spec); missing values print as '-'."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            v = row.get(key)
            cells.append("-" if v is None else format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- train-step comparisons (sft_step, rm_step, dpo_step) --------------------------------------
# Each script defines its sizes, a JAX build function (jaxalign's real Trainer and algorithm on an
# in-memory batch) and a PyTorch build function doing the same work; everything else (workers,
# turns, medians, MFU, the table) is here.

# Model shapes shared by the step benchmarks (`tiny` sizes come from each trainer's YAML).
# configs/sft_tiny.yaml's model (the benchmarks that take it untie its head).
TINY_MODEL: dict = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
}
MODELS: dict[str, dict] = {
    "7m": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 4,
    },
    "50m": {
        "vocab_size": 16384,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
    },
}

# Optimizer settings both sides use (jaxalign's AdamW: clip, then masked decoupled decay).
TRAIN = {
    "lr": 1e-3,
    "warmup_steps": 10,
    "steps": 100_000,
    "lr_schedule": "cosine",
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1e-8,
    "max_grad_norm": 1.0,
    "seed": 0,
}

# The model fields the PyTorch side needs to build the same architecture.
MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "tie_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "attention_query_block",
    "dtype",
)

ADAMW_KWARGS = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def step_sizes(tiny_yaml: str) -> dict[str, dict]:
    """Sizes of a step benchmark: `tiny` is a bundled config (its model, batch and seq_len), 7m
    and 50m use MODELS with 8 rows (SFT) or pairs (RM, DPO) of 256 tokens."""
    return {
        "tiny": {"yaml": tiny_yaml},
        **{name: {"model": m, "batch_size": 8, "seq_len": 256} for name, m in MODELS.items()},
    }


def step_config(spec: dict, sets: list[str], run_dir: str, root: Path):
    """jaxalign's Config for one size: `spec` is {"yaml": path} (a bundled tiny config, used for
    its model, batch and seq_len) or {"model", "batch_size", "seq_len"} (f32)."""
    from jaxalign.config import load_config

    overrides = [
        f"run_dir={run_dir}",
        "init_from=null",
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        "train.progress=false",
        "logging.tensorboard=false",
    ]
    overrides += [f"train.{k}={v}" for k, v in TRAIN.items()]
    base = path = None
    if "yaml" in spec:
        path = root / spec["yaml"]
        overrides.append(f"sharding.rules_file={root / 'configs/sharding/fsdp.yaml'}")
    else:
        base = {"model": dict(spec["model"], dtype="float32", param_dtype="float32")}
        overrides += [f"train.batch_size={spec['batch_size']}", f"train.seq_len={spec['seq_len']}"]
    return load_config(path, overrides + sets, base=base)


def model_summary(model_cfg) -> dict:
    """The model fields a benchmark reports (attention_query_block resolved for this backend)."""
    from jaxalign.models.llama import resolve_query_block

    summary = {k: getattr(model_cfg, k) for k in MODEL_FIELDS}
    summary["attention_query_block"] = resolve_query_block(summary["attention_query_block"])
    return summary


def serve_steps(build, rss_import_start: float) -> None:
    """Worker loop of a step benchmark. `build(cmd)` -> (run, facts): `run(n)` runs n steps,
    waits for them and returns the last loss; `facts()` is reported with the first and warm step
    times. Commands: build, time (n steps, timed), finish (peak RSS). `rss_import_start`: peak
    RSS before the framework was imported."""
    run = None
    for cmd in commands():
        op = cmd["op"]
        if op == "build":
            rss_imported = peak_rss_mb()
            run, facts = build(cmd)
            t0 = time.perf_counter()
            run(1)
            first_step_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loss = run(2)
            warm_step_s = (time.perf_counter() - t0) / 2
            emit(
                {
                    "allocator": loaded_allocator(),
                    "ld_preload": os.environ.get("LD_PRELOAD", ""),
                    "first_step_s": first_step_s,
                    "warm_step_s": warm_step_s,
                    "loss": loss,
                    "rss_python_mb": rss_import_start,
                    "rss_imported_mb": rss_imported,
                    **facts(),
                }
            )
        elif op == "time":
            n = cmd["steps"]
            with Timer() as timer:
                loss = run(n)
            emit({"step_s": timer.wall_s / n, **timer.as_dict(), "loss": loss})
        elif op == "finish":
            emit({"peak_rss_mb": peak_rss_mb()})


def serve_jax_step(build, patch: str | None = None) -> None:
    """Worker side of a JAX train step. `build()` -> (trainer, state, batch, info): a Trainer with
    `trainer.frozen` set if the algorithm has frozen inputs, its fresh state, a global batch, and
    the facts to report (must include tokens_per_step, flops_per_token, params and torch_build,
    the command the PyTorch worker is built with). The step is compiled exactly as
    `Trainer._loop` does, inside the trainer's activation-sharding context."""
    rss_import_start = peak_rss_mb()
    import jax

    from jaxalign import sharding as shd
    from jaxalign.metrics import measure_matmul_peak

    if patch:
        exec(compile(Path(patch).read_text(), patch, "exec"), {"__name__": "bench_patch"})

    def build_side(cmd):
        trainer, state, batch, info = build()
        sharding_ctx = shd.activation_sharding(trainer.mesh, trainer.rules)
        sharding_ctx.__enter__()  # kept for the worker's life, as Trainer.run does
        t0 = time.perf_counter()
        compiled = trainer.compile_step(batch).lower(state, batch, trainer.frozen).compile()
        compile_s = time.perf_counter() - t0
        box = {"state": state}

        def run(n: int) -> float:
            for _ in range(n):
                box["state"], metrics = compiled(box["state"], batch, trainer.frozen)
            return float(jax.block_until_ready(metrics)["loss"])

        def facts() -> dict:  # after the first steps, so the matmul runs on a warm process
            peaks = {n: measure_matmul_peak(n) for n in (512, 1024, 2048)}
            return {
                "side": "jax",
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "backend": jax.default_backend(),
                "matmul_peak_flops": {str(k): v for k, v in peaks.items()},
                "compile_s": compile_s,
                **info,
            }

        return run, facts

    serve_steps(build_side, rss_import_start)


def serve_torch_step(build) -> None:
    """Worker side of the PyTorch baseline. `build(cmd)` -> (step, info): `step()` runs one
    optimizer step and returns the loss tensor; `cmd` is the JAX side's `torch_build`."""
    rss_import_start = peak_rss_mb()
    import torch

    def build_side(cmd):
        step, info = build(cmd)

        def run(n: int) -> float:
            for _ in range(n):
                loss = step()
            return float(loss)

        def facts() -> dict:
            peaks = {n: torch_matmul_peak(torch, n) for n in (512, 1024, 2048)}
            return {
                "side": "torch",
                "torch_matmul_peak_flops": {str(k): v for k, v in peaks.items()},
                "threads": torch.get_num_threads(),
                **info,
            }

        return run, facts

    serve_steps(build_side, rss_import_start)


class _LoopGate:
    """Lets the parent's `time` commands drive a running train loop: after the n steps of a
    command, the loop waits (before its next batch, once the last step's state is ready)."""

    def __init__(self):
        self.commands: queue.Queue = queue.Queue()  # steps to run next; None: stop the run
        self.paused: queue.Queue = queue.Queue()  # True at each pause; False: the run failed
        self.remaining = 0

    def before_step(self, state, trainer) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            return
        import jax

        jax.block_until_ready(state)  # the segment ends when its last step has finished
        self.paused.put(True)
        steps = self.commands.get()
        if steps is None:
            trainer.request_stop()  # one more step, then the loop saves and returns
            steps = 1
        self.remaining = steps - 1


class PausingData:
    """A train-data iterator, unchanged, whose `observe_state` (called by the loop before each
    `next()`) pauses at the gate. Everything else is the wrapped iterator's."""

    def __init__(self, inner, gate: _LoopGate):
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str):  # get_state, set_state, record_ids, report, stats, ...
        return getattr(self._inner, name)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._inner)

    def start(self, trainer) -> None:
        self._trainer = trainer
        self._inner.start(trainer)

    def observe_state(self, state) -> None:
        self._gate.before_step(state, self._trainer)
        self._inner.observe_state(state)


def serve_train_loop(build, algorithm_class) -> None:
    """Worker side of the whole training loop, as `jaxalign train` runs it: `build()` -> (cfg,
    info); `jaxalign.train(cfg)` runs on a thread with its real data (the `algorithm_class`'s
    `train_data`, wrapped in PausingData), and each `time` command lets it run that many steps
    between pauses, so the parent interleaves it with the isolated step like any other side.
    What a segment times: every step's data, host work, dispatch, logging and the wait for the
    last step (periodic checkpoints and evals are the config's: the benchmark turns them off)."""
    rss_import_start = peak_rss_mb()
    import jax

    from jaxalign import train

    gate = _LoopGate()
    original_train_data = algorithm_class.train_data

    def train_data(self, process_index: int, process_count: int):
        return PausingData(original_train_data(self, process_index, process_count), gate)

    algorithm_class.train_data = train_data  # this worker process only
    box: dict = {}

    def wait_for_pause() -> None:
        if not gate.paused.get():
            raise RuntimeError(f"the train loop failed: {box['error']!r}")

    def build_side(cmd):
        cfg, info = build()

        def target() -> None:
            try:
                box["result"] = train(cfg, devices=jax.devices()[:1])
            except BaseException as e:  # noqa: BLE001 - reported by the next wait_for_pause
                box["error"] = e
                gate.paused.put(False)

        t0 = time.perf_counter()
        box["thread"] = threading.Thread(target=target, name="bench-train-loop", daemon=True)
        box["thread"].start()
        wait_for_pause()  # before step 1: data opened, state initialized, nothing compiled yet
        setup_s = time.perf_counter() - t0

        metrics_file = Path(cfg.run_dir) / "metrics.jsonl"

        def run(n: int) -> float:
            gate.commands.put(n)
            wait_for_pause()
            lines = metrics_file.read_text().splitlines()  # a few lines; the loop is paused
            return next((json.loads(x)["loss"] for x in reversed(lines) if '"loss"' in x), None)

        def facts() -> dict:
            return {
                "side": "train",
                "backend": jax.default_backend(),
                "setup_s": setup_s,
                "run_dir": cfg.run_dir,
                **info,
            }

        return run, facts

    serve_steps(build_side, rss_import_start)  # "loss": the last one the run logged
    if "thread" in box and box["thread"].is_alive():
        gate.commands.put(None)
        box["thread"].join(timeout=300)


def torch_llama_config(m: dict, seq_len: int):
    """transformers.LlamaConfig for jaxalign model fields `m` (random init, no cache)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=max(seq_len, 2048),
        rms_norm_eps=m["rms_norm_eps"],
        rope_theta=m["rope_theta"],
        tie_word_embeddings=m["tie_embeddings"],
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=False,
    )


def torch_optimizer(model, adamw: str, extra_params=()):
    """torch AdamW + LambdaLR with jaxalign.optim's weight-decay mask (no decay on norms and
    embeddings) and warmup + cosine schedule, hyperparameters from TRAIN."""
    import math

    import torch

    decay, no_decay = list(extra_params), []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name or "embed_tokens" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": TRAIN["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=TRAIN["lr"],
        betas=(TRAIN["b1"], TRAIN["b2"]),
        eps=TRAIN["eps"],
        **ADAMW_KWARGS[adamw],
    )
    warm, total, floor = TRAIN["warmup_steps"], TRAIN["steps"], TRAIN["min_lr_ratio"]

    def lr_lambda(step: int) -> float:  # jaxalign.optim's warmup + cosine
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def torch_train_step(params, opt, sched, loss_fn):
    """One baseline optimizer step: `loss_fn()`, backward, global-norm clipping of `params`,
    AdamW, schedule; returns the detached loss."""
    import torch

    params = list(params)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def torch_matmul_peak(torch, size: int, repeats: int = 5) -> float:
    """FLOP/s of one square f32 matmul in PyTorch (best of `repeats`), for comparison."""
    a = torch.ones(size, size)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def parse_variant(spec: str) -> tuple[str, list[str], str | None, str | None]:
    """'NAME:key=v;key=v' -> (name, config overrides, xla_flags, patch file)."""
    name, _, rest = spec.partition(":")
    sets, xla_flags, patch = [], None, None
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, _, value = item.partition("=")
        if key == "xla_flags":
            xla_flags = value
        elif key == "patch":
            patch = str(Path(value).resolve())
        else:
            sets.append(item)
    return name, sets, xla_flags, patch


def step_arg_parser(
    doc: str, sizes: dict, default_sizes: str, default_json: str, through_cli: bool = False
):
    """The command line every step benchmark shares (parent and worker modes)."""
    import argparse

    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default=default_sizes, help=f"comma list of {', '.join(sizes)}")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="steps per timed repeat (0: enough for about --target-s seconds)",
    )
    p.add_argument("--target-s", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--baseline", choices=("torch", "none"), default="torch" if torch_available() else "none"
    )
    p.add_argument(
        "--torch-adamw",
        choices=tuple(ADAMW_KWARGS),
        default="foreach",
        help="torch.optim.AdamW implementation of the baseline",
    )
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default=default_allocator(),
        help="malloc for every worker (tcmalloc is LD_PRELOADed)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every JAX worker",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V;K=V",
        help="an extra JAX worker with overrides (xla_flags=..., patch=FILE allowed)",
    )
    p.add_argument("--json", default=default_json)
    if through_cli:
        p.add_argument(
            "--through-cli",
            action="store_true",
            help="add a side running the whole `jaxalign train` loop (jaxalign.train) on real "
            "data with the same shapes, timed in turns with the isolated step",
        )
    # internal: worker mode
    p.add_argument("--worker", choices=("jax", "torch", "train"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--patch", help=argparse.SUPPRESS)
    return p


def bench_step_size(script: str, size: str, args, env: dict[str, str]) -> dict:
    """Build every worker of `script` for `size`, time them in turns, return the results."""
    import math

    variants = [("jaxalign", [], None, None)] + [parse_variant(v) for v in args.variant]
    workers: dict[str, Worker] = {}
    me = [sys.executable, script, "--size", size]
    for name, sets, xla_flags, patch in variants:
        wenv = dict(env)
        if xla_flags is not None:
            wenv["XLA_FLAGS"] = xla_flags
        argv = me + ["--worker", "jax"] + [a for s in args.set + sets for a in ("--set", s)]
        if patch:
            argv += ["--patch", patch]
        workers[name] = Worker(f"{size}/{name}", argv, wenv)
    if getattr(args, "through_cli", False):
        argv = me + ["--worker", "train"] + [a for s in args.set for a in ("--set", s)]
        workers["jaxalign train"] = Worker(f"{size}/train", argv, env)
    if args.baseline == "torch":
        workers["pytorch"] = Worker(
            f"{size}/pytorch", me + ["--worker", "torch", "--torch-adamw", args.torch_adamw], env
        )
    info: dict[str, dict] = {}
    try:
        for name, w in workers.items():
            if name == "pytorch":
                info[name] = w.request({"op": "build", **info["jaxalign"]["torch_build"]})
            else:
                info[name] = w.request({"op": "build"})
            compile_note = (
                f" (compile {info[name]['compile_s']:.2f} s)" if "compile_s" in info[name] else ""
            )
            print(
                f"  built {size}/{name}: first step {info[name]['first_step_s']:.2f} s"
                + compile_note,
                flush=True,
            )
        steps = {
            name: args.steps or max(3, math.ceil(args.target_s / i["warm_step_s"]))
            for name, i in info.items()
        }
        times: dict[str, list[float]] = {name: [] for name in workers}
        samples: dict[str, list[dict]] = {name: [] for name in workers}
        order = list(workers)
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                answer = workers[name].request({"op": "time", "steps": steps[name]})
                times[name].append(answer["step_s"])
                samples[name].append(answer)
        for name, w in workers.items():
            info[name].update(w.request({"op": "finish"}))
    finally:
        for w in workers.values():
            w.close()
    return summarize_step(size, info, times, samples, steps)


def summarize_step(size: str, info: dict, times: dict, samples: dict, steps: dict) -> dict:
    """Rows (one per side) with medians, ratios to PyTorch per repeat, and MFU against the best
    matmul rate either side measured."""
    ref = info["jaxalign"]
    tokens = ref["tokens_per_step"]
    jax_peak = max(max(i.get("matmul_peak_flops", {"0": 0}).values()) for i in info.values())
    torch_peak = max(
        [
            max(i["torch_matmul_peak_flops"].values())
            for i in info.values()
            if "torch_matmul_peak_flops" in i
        ],
        default=0.0,
    )
    peak = max(jax_peak, torch_peak)
    rows = []
    for name, i in info.items():
        med = median(times[name])
        row = {
            "size": size,
            "side": name,
            "params_m": ref["params"] / 1e6,
            "steps": steps[name],
            "step_times_s": times[name],
            "step_s": med,
            "best_step_s": min(times[name]),
            "tokens_per_s": tokens / med,
            "best_tokens_per_s": tokens / min(times[name]),
            "cpu_share": median([x["cpu_share"] for x in samples[name]]),
            "cpu_s_per_step": median([x["cpu_s"] / steps[name] for x in samples[name]]),
            "load_average": median([x["load_before"] for x in samples[name]]),
            "samples": samples[name],
            "mfu": tokens / med * ref["flops_per_token"] / peak,
            "compile_s": i.get("compile_s"),
            "first_step_s": i["first_step_s"],
            "peak_rss_mb": i["peak_rss_mb"],
            "rss_imported_mb": i["rss_imported_mb"],
            "allocator": i["allocator"],
            "build": i,
        }
        if name != "jaxalign":  # the same work around the isolated step, timed in turns
            ratios = [b / a for a, b in zip(times[name], times["jaxalign"], strict=True)]
            row["ratio_vs_step"] = median(ratios)
            row["ratios_vs_step_per_repeat"] = ratios
        if "pytorch" in times:
            ratios = [b / a for a, b in zip(times[name], times["pytorch"], strict=True)]
            row["ratio_vs_pytorch"] = median(ratios)
            row["ratios_per_repeat"] = ratios
            row["best_ratio_vs_pytorch"] = min(times["pytorch"]) / min(times[name])
        rows.append(row)
    return {
        "size": size,
        "tokens_per_step": tokens,
        "flops_per_token": ref["flops_per_token"],
        "matmul_peak_flops": peak,
        "jax_matmul_peak_flops": jax_peak,
        "torch_matmul_peak_flops": torch_peak,
        "rows": rows,
    }


STEP_COLUMNS = [
    ("size", "size", ""),
    ("side", "side", ""),
    ("params (M)", "params_m", ".2f"),
    ("step ms", "step_ms", ",.1f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("x PyTorch", "ratio_vs_pytorch", ".2f"),
    ("x step", "ratio_vs_step", ".2f"),
    ("best x PyTorch", "best_ratio_vs_pytorch", ".2f"),
    ("MFU %", "mfu_pct", ".1f"),
    ("compile s", "compile_s", ".1f"),
    ("1st step s", "first_step_s", ".1f"),
    ("peak RSS MiB", "peak_rss_mb", ",.0f"),
    ("CPU share", "cpu_share", ".2f"),
    ("load", "load_average", ".1f"),
]


def step_markdown(data: dict) -> str:
    """The table (and per-size notes) of a step benchmark's JSON, as Markdown."""
    rows = []
    for res in data["results"]:
        for row in res["rows"]:
            side = row["side"]
            overrides = row.get("build", {}).get("overrides")
            label = side if not overrides else f"{side} (`{'; '.join(overrides)}`)"
            rows.append(
                {
                    **row,
                    "side": label,
                    "step_ms": row["step_s"] * 1e3,
                    "mfu_pct": row["mfu"] * 100,
                }
            )
    columns = [  # `x step` only where a run has the whole-loop side (--through-cli)
        c for c in STEP_COLUMNS if c[1] != "ratio_vs_step" or any(c[1] in r for r in rows)
    ]
    lines = [format_table(rows, columns), ""]
    for res in data["results"]:
        lines.append(
            f"- {res['size']}: {res['tokens_per_step']:,} tokens/step, "
            f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token, MFU against "
            f"{res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (best f32 square matmul of "
            f"512/1024/2048 in this run: XLA {res['jax_matmul_peak_flops'] / 1e9:.1f}, torch "
            f"{res['torch_matmul_peak_flops'] / 1e9:.1f})"
        )
    return "\n".join(lines)


def synthetic_pairs(pairs: int, seq_len: int, vocab: int, grad_accum: int = 1) -> dict:
    """Random preference pairs shaped like the preference pipeline's output, [A, P/A, 2, T] per
    token key and [A, P/A] for margin/pair_mask: full rows, the first half of each row is a prompt
    shared by chosen and rejected, the second half the completion (loss_mask 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = pairs // grad_accum
    shape = (grad_accum, rows, 2, seq_len)
    tokens = rng.integers(0, vocab, shape, dtype=np.int32)
    prompt = seq_len // 2
    tokens[..., 1, :prompt] = tokens[..., 0, :prompt]
    loss_mask = np.zeros(shape, np.float32)
    loss_mask[..., prompt:] = 1.0
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
        "margin": np.zeros(shape[:2], np.float32),
        "pair_mask": np.ones(shape[:2], np.float32),
    }


def step_main(
    script: str,
    doc: str,
    sizes: dict,
    default_sizes: str,
    build_jax,
    build_torch,
    argv=None,
    serve_train=None,
) -> dict:
    """A step benchmark's command line: parse, check the sizes, run. `serve_train(args)` (a
    benchmark with `--through-cli`) serves the whole-loop worker."""
    name = Path(script).stem
    p = step_arg_parser(
        doc, sizes, default_sizes, str(RESULTS_DIR / f"{name}.json"), serve_train is not None
    )
    args = p.parse_args(argv)
    for s in args.sizes.split(","):
        if s.strip() and s.strip() not in sizes:
            p.error(f"unknown size {s!r} (known: {', '.join(sizes)})")
    return run_step_main(script, args, build_jax, build_torch, argv, serve_train)


def run_step_main(
    script: str, args, build_jax, build_torch, argv: list[str] | None = None, serve_train=None
) -> dict:
    """Run a step benchmark: worker mode if `args.worker`, else every size, a table, JSON."""
    if args.worker:
        try:
            if args.worker == "train":
                serve_train(args)
            elif args.worker == "jax":
                serve_jax_step(lambda: build_jax(args), args.patch)
            else:
                serve_torch_step(lambda cmd: build_torch(cmd, args.torch_adamw))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
            import traceback

            traceback.print_exc(file=sys.stdout)
            emit({"error": f"{type(e).__name__}: {e}"})
        return {}
    root = Path(script).resolve().parents[1]
    env = allocator_env(args.allocator)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    machine = machine_info()
    print(
        f"machine: {machine['nproc']} x {machine['cpu']}, {machine['mem_gib']} GiB; "
        f"allocator {args.allocator} ({env.get('LD_PRELOAD') or 'no LD_PRELOAD'}) on every "
        f"side; XLA_FLAGS={env.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    results = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        print(f"{size}:", flush=True)
        results.append(bench_step_size(str(Path(script).resolve()), size, args, env))
    out = {
        "benchmark": Path(script).stem,
        "machine": machine,
        "allocator": args.allocator,
        "command": shlex.join(
            ["python", f"bench/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)]
        ),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "size", "patch")},
        "train": TRAIN,
        "results": results,
    }
    print()
    print(step_markdown(out))
    for res in results:
        for row in res["rows"]:
            b = row["build"]
            print(
                f"  {res['size']}/{row['side']}: allocator {b['allocator']} "
                f"(LD_PRELOAD={b['ld_preload'] or '-'})"
                + (f", XLA_FLAGS={b['xla_flags']!r}" if b.get("xla_flags") else "")
                + (
                    f", AdamW {b['adamw']}, attention {b['attn_implementation']}, "
                    f"{b['threads']} threads"
                    if b["side"] == "torch"
                    else ""
                )
            )
    write_json(args.json, out)
    print(f"wrote {args.json}")
    return out
