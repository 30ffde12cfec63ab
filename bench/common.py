"""Helpers shared by the benchmarks: medians, peak memory, machine facts, allocators, JSON, and
persistent worker subprocesses that the parent drives in turns (so each side of a comparison is
measured right next to the other, under the same environment).

Benchmarks are not tests: they print tables and write JSON; nothing here asserts.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER = "@@bench "  # prefix of the JSON lines a worker writes to stdout

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)

# glibc settings that stop malloc from handing freed memory back to the OS (see
# /work/shared/PERFORMANCE-NOTES.md: on this VM, faulting it back in is slow).
GLIBC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}

ALLOCATORS = ("tcmalloc", "glibc", "glibc-tuned")


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


def machine_info() -> dict[str, Any]:
    """CPU, core count, memory, OS and the versions that matter for these benchmarks."""
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
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
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
