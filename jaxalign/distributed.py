"""Multi-controller start-up: one process per host, joined with `jax.distributed.initialize`.

Which environment calls for it:
- explicit: JAXALIGN_COORDINATOR (host:port), JAXALIGN_NUM_PROCESSES, JAXALIGN_PROCESS_ID;
- SLURM with more than one task (JAX reads the coordinator from SLURM's variables);
- a multi-host TPU slice (JAX reads the TPU metadata);
otherwise a single process, and nothing is called.
"""

from __future__ import annotations

import os
import socket
import time

import jax

from jaxalign.errors import UserError

ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"
ENV_TIMEOUT = "JAXALIGN_INIT_TIMEOUT"
ENV_CPU_DEVICES = "JAXALIGN_CPU_DEVICES"

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


def _int_env(env, name: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise UserError(f"{name} must be set to an integer when {ENV_COORDINATOR} is set "
                        f"(got {value!r})")
    return int(value)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Connect to host:port until it answers or `timeout` passes (JAX's own client aborts the
    whole process on a deadline instead of raising, so check first)."""
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
                raise UserError(f"cannot join the cluster ({ENV_COORDINATOR}={address}): "
                                f"coordinator not reachable within {timeout:g}s "
                                f"({e.strerror or e})") from None
            time.sleep(0.5)


def initialize(environ: dict[str, str] | None = None) -> str:
    """Join the cluster the environment describes (idempotent); returns the detected mode.

    Fails within JAXALIGN_INIT_TIMEOUT seconds (default 120) with a message naming the setting
    when the coordinator cannot be reached or the process counts disagree.
    """
    global _initialized
    env = os.environ if environ is None else environ
    mode = detect(env)
    if cpu_devices := env.get(ENV_CPU_DEVICES):
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if mode == "single" or _initialized:
        return mode
    timeout = int(env.get(ENV_TIMEOUT, "120"))
    kwargs: dict = {"initialization_timeout": timeout}
    if mode == "explicit":
        num = _int_env(env, ENV_NUM_PROCESSES)
        pid = _int_env(env, ENV_PROCESS_ID)
        if not 0 <= pid < num:
            raise UserError(f"{ENV_PROCESS_ID}={pid} is outside 0..{num - 1} "
                            f"({ENV_NUM_PROCESSES}={num})")
        kwargs.update(coordinator_address=env[ENV_COORDINATOR], num_processes=num,
                      process_id=pid)
        if pid != 0:  # process 0 starts the coordinator service; the others must reach it
            _wait_for_coordinator(env[ENV_COORDINATOR], timeout)
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
        # CPU devices of several processes need a collectives backend to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - every failure here is a set-up problem
        where = (f"{ENV_COORDINATOR}={env.get(ENV_COORDINATOR)}, {ENV_NUM_PROCESSES}="
                 f"{env.get(ENV_NUM_PROCESSES)}, {ENV_PROCESS_ID}={env.get(ENV_PROCESS_ID)}"
                 if mode == "explicit" else f"{mode} environment")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"cannot join the cluster ({where}) within {timeout}s: {first}") \
            from None
    _initialized = True
    return mode
