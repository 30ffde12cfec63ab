"""Multi-controller start-up: one process per host, joined with `jax.distributed.initialize`.

Which environment calls for it:
- explicit: JAXALIGN_COORDINATOR (host:port), JAXALIGN_NUM_PROCESSES, JAXALIGN_PROCESS_ID;
- SLURM with more than one task (JAX reads the coordinator from SLURM's variables);
- a multi-host TPU slice (JAX reads the TPU metadata);
otherwise a single process, and nothing is called.

Joining is bounded by JAXALIGN_INIT_TIMEOUT seconds. JAX's own client aborts the whole process
(a C++ LOG(FATAL)) when not every process registers in time, so a watchdog thread reports first:
it prints jaxalign's one-line error naming the settings and exits with status 2. Errors that JAX
reports by aborting at once (two processes with the same id) follow a start-up line that names
the settings.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import jax

from jaxalign.errors import UserError

ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"
ENV_TIMEOUT = "JAXALIGN_INIT_TIMEOUT"
ENV_CPU_DEVICES = "JAXALIGN_CPU_DEVICES"
DEFAULT_TIMEOUT_S = 120
# JAX's deadline is set this much later than ours, so that our message comes first.
_JAX_TIMEOUT_MARGIN_S = 30
EXIT_STATUS = 2  # as for every UserError

_initialized = False


def detect(environ: dict[str, str] | None = None) -> str:
    """'explicit', 'slurm', 'tpu' or 'single' for the given environment."""
    env = os.environ if environ is None else environ
    if env.get(ENV_COORDINATOR):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "single"


def settings(mode: str, environ: dict[str, str] | None = None) -> str:
    """The variables that decide coordinator, process count and process id in `mode`, with
    their values, for error messages."""
    env = os.environ if environ is None else environ
    names = {
        "explicit": (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
        "slurm": ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"),
        "tpu": ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS"),
    }.get(mode, ())
    return ", ".join(f"{n}={env.get(n, '<unset>')}" for n in names) or f"{mode} environment"


def init_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds allowed for joining the cluster (JAXALIGN_INIT_TIMEOUT, default 120)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{ENV_TIMEOUT} must be a positive number of seconds (got {raw!r})")
    return value


def _int_env(env, name: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise UserError(
            f"{name} must be set to an integer when {ENV_COORDINATOR} is set (got {value!r})"
        )
    return int(value)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Connect to host:port until it answers or `timeout` passes, for a clear message when the
    coordinator address is wrong or process 0 is not running."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{ENV_COORDINATOR}={address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"cannot join the cluster ({ENV_COORDINATOR}={address}): "
                    f"coordinator not reachable within {timeout:g}s ({e.strerror or e})"
                ) from None
            time.sleep(0.5)


class _Watchdog:
    """Prints `message` and ends the process unless `done()` is called within `timeout`s.

    JAX's connect and topology exchange run in C++ with the GIL released, so this thread gets to
    run while the main thread waits there.
    """

    def __init__(self, timeout: float, message: str):
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(timeout, message), daemon=True, name="jaxalign-init-watchdog"
        )
        self._thread.start()

    def _watch(self, timeout: float, message: str) -> None:
        if not self._done.wait(timeout):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(EXIT_STATUS)

    def done(self) -> None:
        self._done.set()


def _check_agreement(timeout: float, where: str) -> None:
    """Every process publishes its process count; process 0 compares all of them with its own,
    the others compare theirs with process 0's. (The coordinator service only knows process 0's
    count, so a process that believes in a different one would otherwise get through.)"""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    client, num, pid = state.client, state.num_processes, state.process_id
    key = "jaxalign/init/num_processes/{}"
    client.key_value_set(key.format(pid), str(num))
    others = range(1, num) if pid == 0 else [0]
    for other in others:
        try:
            theirs = client.blocking_key_value_get(key.format(other), int(timeout * 1000))
        except Exception:  # noqa: BLE001 - a timeout here means the counts disagree
            theirs = "?"
        if theirs != str(num):
            raise UserError(
                f"cannot join the cluster ({where}): this is process {pid} of {num} but process "
                f"{other} says {theirs} processes; every process needs the same number of "
                f"processes and its own process id"
            )


def initialize(environ: dict[str, str] | None = None) -> str:
    """Join the cluster the environment describes (idempotent); returns the detected mode.

    Fails within JAXALIGN_INIT_TIMEOUT seconds (default 120) with a one-line message naming the
    settings when the coordinator cannot be reached or the processes disagree on their number.
    """
    global _initialized
    env = os.environ if environ is None else environ
    mode = detect(env)
    if cpu_devices := env.get(ENV_CPU_DEVICES):
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if mode == "single" or _initialized:
        return mode
    timeout = init_timeout(env)
    where = settings(mode, env)
    kwargs: dict = {"initialization_timeout": int(timeout) + _JAX_TIMEOUT_MARGIN_S}
    if mode == "explicit":
        num = _int_env(env, ENV_NUM_PROCESSES)
        pid = _int_env(env, ENV_PROCESS_ID)
        if not 0 <= pid < num:
            raise UserError(
                f"{ENV_PROCESS_ID}={pid} is outside 0..{num - 1} ({ENV_NUM_PROCESSES}={num})"
            )
        kwargs.update(coordinator_address=env[ENV_COORDINATOR], num_processes=num, process_id=pid)
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
        # CPU devices of several processes need a collectives backend to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start = time.monotonic()
    if mode == "explicit" and kwargs["process_id"] != 0:
        # Process 0 starts the coordinator service; the others must reach it.
        _wait_for_coordinator(env[ENV_COORDINATOR], timeout)
    # JAX aborts at once (LOG(FATAL)) on some errors, e.g. two processes with the same id: this
    # line, printed first, says which settings to check.
    print(
        f"jaxalign: joining the cluster ({where}) within {timeout:g}s", file=sys.stderr, flush=True
    )
    watchdog = _Watchdog(
        max(timeout - (time.monotonic() - start), 1.0),
        f"cannot join the cluster ({where}) within {timeout:g}s: not every process registered "
        f"with the coordinator; check that all processes use the same coordinator address and "
        f"number of processes, each with its own process id (or raise {ENV_TIMEOUT})",
    )
    try:
        jax.distributed.initialize(**kwargs)
        jax.devices()  # the topology exchange between processes, still under the watchdog
        _check_agreement(max(timeout - (time.monotonic() - start), 1.0), where)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure here is a set-up problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"cannot join the cluster ({where}) within {timeout:g}s: {first}") from None
    finally:
        watchdog.done()
    _initialized = True
    return mode
