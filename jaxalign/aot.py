"""Ahead-of-time compilation of a run's programs: exact per-device memory and FLOPs.

`compile_run(cfg, devices)` builds the run's real train step (the loop's own `compile_step`,
the algorithm's own loss) with abstract inputs, `jax.ShapeDtypeStruct`s carrying shardings,
on a mesh of `devices` made from the config's mesh section, and compiles it. Nothing is
allocated: parameters and optimizer state come from `jax.eval_shape`. The devices may be a TPU
topology's (`jaxalign.topology.topology_devices("v5p-64")`), compiled for on any host.

Each program gives a `ProgramReport`: XLA's `memory_analysis` (arguments, outputs,
temporaries per device), the largest buffers of the optimized HLO, and the FLOPs with loop
bodies multiplied by their trip counts (`cost_analysis` counts a while loop's body once, so
`scan_layers` or `grad_accum` would hide most of the work).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax

from jaxalign.errors import UserError
from jaxalign.hlo import Buffer, hlo_flops, largest_buffers
from jaxalign.topology import GIB, Chip, chip_of


class ProgramDoesNotFit(UserError):
    """A program needs more memory per device than the chip has (compiled, or refused by XLA
    with RESOURCE_EXHAUSTED)."""


@dataclass
class ProgramReport:
    """Per-device memory and work of one compiled program. `peak_bytes` = arguments + outputs
    - aliased (donated) + temporaries, as XLA's `memory_analysis` reports them; `flops` counts
    matmuls and convolutions with loop bodies multiplied out; `xla_flops` is `cost_analysis`'s
    count (every op, loop bodies once)."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    hbm_bytes: int | None
    flops: float
    xla_flops: float
    bytes_accessed: float
    largest_buffers: list[Buffer] = field(default_factory=list)
    # While loops whose trip count is known only at run time (the decode loop stops early
    # when every row has stopped): their bodies count once in `flops`.
    unknown_trip_counts: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits)
        return out


# -- compiling ---------------------------------------------------------------------------------


def device_hbm_bytes(devices: Sequence) -> int | None:
    """Memory per device: the TPU chip's HBM (`topology.CHIPS`), else what the runtime reports
    (`memory_stats()["bytes_limit"]`), else None (e.g. CPU devices)."""
    chip = chip_of(devices[0])
    if chip is not None:
        return chip.hbm_bytes
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - topology devices and some backends have none
        stats = {}
    return stats.get("bytes_limit")


def _exhausted_line(name: str, message: str, hbm_bytes: int | None) -> str:
    """One line from XLA's RESOURCE_EXHAUSTED message, e.g. "the total memory required for
    HLO temporaries (599.38G) exceeds available HBM (15.75G)"."""
    found = re.search(r"required for (.+?) \(([^)]+)\) exceeds available HBM \(([^)]+)\)", message)
    if found:
        what, need, have = found.groups()
        return f"{name}: does not fit: {what} need {need}B per device, HBM available {have}B"
    have = f" ({hbm_bytes / GIB:.2f} GiB per device)" if hbm_bytes else ""
    return f"{name}: does not fit: XLA ran out of HBM{have} compiling it (RESOURCE_EXHAUSTED)"


def compile_program(name: str, lowered: Any, hbm_bytes: int | None) -> ProgramReport:
    """Compile a `jax.stages.Lowered` and report it. ProgramDoesNotFit when XLA refuses it for
    lack of memory."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises a runtime error type per backend
        if "RESOURCE_EXHAUSTED" in str(e):
            raise ProgramDoesNotFit(_exhausted_line(name, str(e), hbm_bytes)) from e
        raise
    return report(compiled, name, hbm_bytes)


def report(compiled: Any, name: str, hbm_bytes: int | None) -> ProgramReport:
    """The `ProgramReport` of a `jax.stages.Compiled`."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    text = compiled.as_text()
    flops, unknown = hlo_flops(text)
    return ProgramReport(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_bytes=hbm_bytes,
        flops=flops,
        xla_flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        largest_buffers=largest_buffers(text),
        unknown_trip_counts=unknown,
    )


def lower_train_step(cfg, devices: Sequence | None = None):
    """The run's train step lowered with abstract inputs on a mesh of `devices` (default: the
    local ones): the loop's `Trainer.compile_step` of the config's algorithm, with its abstract
    state, batch (`Algorithm.abstract_batch`) and frozen arrays (`abstract_frozen`).
    Returns (lowered, trainer)."""
    from jaxalign import sharding as shd
    from jaxalign.trainers import get_trainer
    from jaxalign.trainers.loop import Trainer, batch_sharding

    algorithm_cls = get_trainer(cfg.trainer)
    algorithm = algorithm_cls.for_compile(cfg)
    trainer = Trainer(cfg, algorithm, devices=devices)
    batch = {
        k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=batch_sharding(trainer.mesh, trainer.rules, v.ndim)
        )
        for k, v in algorithm_cls.abstract_batch(cfg).items()
    }
    trainer.frozen = algorithm.abstract_frozen(trainer)
    step = trainer.compile_step(batch)
    with shd.activation_sharding(trainer.mesh, trainer.rules):
        lowered = step.lower(trainer.abstract_state, batch, trainer.frozen)
    return lowered, trainer


def lower_rollout_generate(cfg, trainer) -> Any:
    """An RL run's generate program (prefill, then the decode loop over the KV cache), as the
    rollout calls it (`generate.Sampler`, built like `RolloutEngine._sampler`): rows =
    min(rollout rows, sampling.batch_size x rl.num_generations), prompts of the widest of
    data.prompt_buckets, from the trainer's policy parameters with their shardings."""
    from jaxalign.checkpoint import abstract_with_shardings
    from jaxalign.generate import Sampler

    rl = cfg.rl
    rows = rl.prompts_per_rollout * rl.num_generations
    per_call = min(rows, cfg.sampling.batch_size * rl.num_generations)
    sampler = Sampler(cfg.model, cfg.sampling, mesh=trainer.mesh, rules=trainer.rules)
    params = abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
    policy = trainer.algorithm.policy_params(params)
    return sampler.lower(policy, per_call, max(cfg.data.prompt_buckets))


def compile_run(cfg, devices: Sequence | None = None) -> dict[str, ProgramReport]:
    """Compile the run's programs for `devices` (default: the local ones): name -> report.
    `train_step`: every trainer's (DPO's with its reference forward); RL trainers also
    `rollout_generate`: the rollout's prefill and decode (with its KV cache)."""
    devices = list(devices if devices is not None else jax.devices())
    hbm = device_hbm_bytes(devices)
    lowered, trainer = lower_train_step(cfg, devices)
    reports = {"train_step": compile_program("train_step", lowered, hbm)}
    if trainer.algorithm.is_rl:
        generate = lower_rollout_generate(cfg, trainer)
        reports["rollout_generate"] = compile_program("rollout_generate", generate, hbm)
    return reports


def state_shard_bytes(abstract_state: Any) -> int:
    """Bytes per device of a pytree of sharded ShapeDtypeStructs: each leaf's shard shape
    (`sharding.shard_shape`) times its itemsize, summed."""
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


# -- printing ----------------------------------------------------------------------------------


def _size(nbytes: float) -> str:
    if nbytes >= GIB / 10:
        return f"{nbytes / GIB:8.2f} GiB"
    return f"{nbytes / 2**20:8.2f} MiB"


def _count(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} "


def format_reports(reports: dict[str, ProgramReport], header: str = "") -> str:
    lines = [header] if header else []
    for report in reports.values():
        hbm = f" of {report.hbm_bytes / GIB:.2f} GiB" if report.hbm_bytes else ""
        verdict = {True: "  fits", False: "  DOES NOT FIT", None: ""}[report.fits]
        lines += [
            f"{report.name}: per device",
            f"  arguments     {_size(report.argument_bytes)}",
            f"  outputs       {_size(report.output_bytes)}"
            + (f"  ({_size(report.alias_bytes).strip()} donated)" if report.alias_bytes else ""),
            f"  temporaries   {_size(report.temp_bytes)}",
            f"  peak          {_size(report.peak_bytes)}{hbm}{verdict}",
            f"  FLOPs         {_count(report.flops)}FLOP (matmuls, loops multiplied out; "
            f"XLA's cost analysis, loop bodies once: {_count(report.xla_flops)}FLOP)",
        ]
        if report.unknown_trip_counts:
            lines.append(
                f"                {report.unknown_trip_counts} loop(s) of run-time length "
                "(decoding) counted once"
            )
        lines += [
            "  largest buffers:",
        ]
        for b in report.largest_buffers:
            lines.append(f"    {_size(b.nbytes)}  {b.shape:<28} {b.op:<14} {b.source}")
    return "\n".join(lines)


def reports_json(reports: dict[str, ProgramReport], **extra: Any) -> str:
    return json.dumps(
        {**extra, "programs": {name: r.to_json() for name, r in reports.items()}}, indent=1
    )


def check_reports_fit(reports: dict[str, ProgramReport]) -> None:
    """ProgramDoesNotFit naming the first program whose peak exceeds its device's HBM."""
    for report in reports.values():
        if report.fits is False:
            raise ProgramDoesNotFit(
                f"{report.name}: does not fit: peak {report.peak_bytes / GIB:.2f} GiB per "
                f"device, HBM {report.hbm_bytes / GIB:.2f} GiB"
            )


__all__ = [
    "Buffer",
    "Chip",
    "ProgramDoesNotFit",
    "ProgramReport",
    "check_reports_fit",
    "compile_program",
    "compile_run",
    "format_reports",
    "lower_rollout_generate",
    "lower_train_step",
    "report",
    "reports_json",
    "state_shard_bytes",
]
