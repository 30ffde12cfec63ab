"""The recipes of configs/recipes/ compiled for their TPU slices: exact memory, FLOPs, roofline.

    python bench/tpu_compile.py                          # every TPU recipe, one after the other
    python bench/tpu_compile.py sft_8b_v5p64 sft_8b_v5e256
    python bench/tpu_compile.py sft_8b_v5p64 --set model.remat=save_dots --tag save_dots
    python bench/tpu_compile.py --refresh    # recompute model FLOPs and MFU of the stored rows,
                                             # and print the fast estimate beside each peak

Each recipe is compiled in its own child process (`jaxalign.aot.compile_run`, the programs of
`jaxalign plan --compile`: the train step, and for RL recipes the rollout's generate program)
for the slice its file name names (`sft_8b_v5p64` -> `v5p-64`; recipes for GPUs are skipped),
with `JAX_PLATFORMS=cpu`: no TPU is needed, only libtpu. An 8B recipe takes minutes and ~2 GiB
of RAM on a 2-core host. Results are merged into bench/results/tpu_compile.json (one entry per
recipe, tag and program; a rerun replaces its entries) and the Markdown table is printed and
written beside it (tpu_compile.md). Each program's optimized HLO text goes to
$TPU_COMPILE_HLO_DIR (default /tmp/tpu_compile_hlo), named RECIPE.PROGRAM.hlo, and XLA's dump
of the recipe's compiles (buffer assignment, live ranges) to $TPU_COMPILE_HLO_DIR/dump/RECIPE,
from which each row records the buffers live at the program's peak (`live_at_peak`).

Per program and device:
- peak = arguments + outputs - donated + temporaries (XLA's `memory_analysis`), the chip's HBM
  (the published spec, `topology.CHIPS`; XLA itself makes a little less available, e.g.
  15.75 of 16 GiB on v5e) and whether it fits;
- FLOPs = the matmuls of the optimized HLO with loop bodies multiplied out
  (`hlo.hlo_flops`) plus the matmuls inside the splash-attention Pallas kernels, which neither
  `cost_analysis` nor the HLO shows (`hlo.pallas_attention_flops`: from each kernel call's
  q/k shapes, the blocks its causal or sliding-window mask visits, and the kernel's matmul
  count: 2 forward, 4 for dK/dV, 3 for dQ);
- HBM traffic = operands and results of every top-level HLO instruction, loop bodies
  multiplied out (`hlo.hlo_traffic`); collective bytes likewise (all-gather, reduce-scatter,
  all-reduce, all-to-all, collective-permute results);
- roofline step time = max(FLOPs / peak bf16 FLOP/s, HBM traffic / HBM bandwidth), the
  chip's published figures; predicted MFU = model FLOPs per device / (roofline time x peak).
  Model FLOPs are the work a step must do, by formula (`model_flops`, on
  `jaxalign.metrics.model_flops_per_token`, the train loop's MFU numerator): 6 x trained matmul
  parameters, 4 x frozen ones (a LoRA/QLoRA base: input gradients, no weight gradients), MoE's
  active experts only, plus causal attention, per token; 2 x ... for a forward only (DPO's
  reference), counted without remat's recomputation. The rollout's generate program has no MFU
  (decoding is bound by memory, not FLOPs).

The roofline ignores collectives (FSDP's all-gathers overlap with the layer's matmuls on a
TPU) and the latency of small ops: it is an upper bound on MFU, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "recipes"
RESULTS = ROOT / "bench" / "results" / "tpu_compile.json"
GIB = 1024**3
# The optimized HLO of each program, for reading its buffers and loops (not kept in git).
HLO_DIR = Path(os.environ.get("TPU_COMPILE_HLO_DIR", "/tmp/tpu_compile_hlo"))
# XLA's dumps (buffer assignment, live ranges: what each program holds at its peak), per recipe.
DUMP_DIR = HLO_DIR / "dump"
_SLICE = re.compile(r"_(v4|v5p|v5e|v6e)(\d+)$")


def recipe_topology(name: str) -> str | None:
    """The TPU slice a recipe's file name ends with ("sft_8b_v5p64" -> "v5p-64"), else None."""
    m = _SLICE.search(name)
    return f"{m.group(1)}-{m.group(2)}" if m else None


def tpu_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml") if recipe_topology(p.stem))


# -- model FLOPs -------------------------------------------------------------------------------


def model_flops(cfg, program: str) -> float | None:
    """Model FLOPs of one execution of `program` (whole step, all devices), or None: per token
    `jaxalign.metrics.model_flops_per_token` (what the train loop logs MFU with: 6 x trained
    weights, 4 x a LoRA base's frozen ones, MoE's active experts, plus attention), for each
    trained row (DPO and RM: chosen and rejected), plus a forward of the reference where the
    step runs one (DPO without precomputed log-probs; LoRA's is the base, adapters off) and
    PPO's value model (the policy's trunk with a scalar head in place of the output head)."""
    from jaxalign.metrics import model_flops_per_token

    if program != "train_step":
        return None
    t, m = cfg.train, cfg.model
    tokens = t.batch_size * t.seq_len
    if cfg.trainer in ("dpo", "rm"):
        tokens *= 2  # chosen and rejected
    total = model_flops_per_token(m, t.seq_len) * tokens
    if cfg.trainer == "dpo" and not cfg.dpo.precompute_ref:
        from jaxalign.trainers.dpo import REFERENCE_FREE

        if cfg.dpo.loss_type not in REFERENCE_FREE:
            total += model_flops_per_token(m, t.seq_len, trained=False) * tokens
    if cfg.trainer == "ppo":
        head = 2 * m.hidden_size * m.vocab_size * (3 if m.lora is None else 2)
        total += (model_flops_per_token(m, t.seq_len) - head) * tokens
    return total


# -- what the peak holds ----------------------------------------------------------------------

# XLA's dump of each compiled module (the child's XLA_FLAGS --xla_dump_to), by program.
DUMP_MODULES = {"train_step": "jit_train_step", "rollout_generate": "jit__generate"}


def live_at_peak(dump_dir: Path, program: str, count: int = 16) -> tuple[float, list[dict]]:
    """The buffers XLA's buffer assignment keeps live at the program's peak (its dump's
    live-range report: the temporaries, without the arguments), largest first: (their total
    in bytes, the `count` largest as {gib, shape, source}), from the dump of `program`'s module
    in `dump_dir`; (0, []) without one."""
    module = DUMP_MODULES[program]
    found = sorted(dump_dir.glob(f"*{module}*after_optimizations-live-range.txt"))
    if not found:
        return 0.0, []
    path = max(found, key=lambda f: f.stat().st_size)
    base = str(path).removesuffix("-live-range.txt")
    peak = re.search(r"Live ranges at \d+ \(peak\):\n((?:    .*\n)+)", path.read_text())
    if peak is None:
        return 0.0, []
    live = [(n, int(b)) for n, b in re.findall(r"    (\S+): (\d+) bytes", peak.group(1))]
    shapes, sources = {}, {}
    value = re.compile(r" value: <\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): (.*)$")
    for line in Path(base + "-buffer-assignment.txt").read_text().splitlines():
        if m := value.match(line):
            shapes.setdefault(m.group(1).removesuffix("{}"), re.sub(r"\{[^{}]*\}", "", m.group(2)))
    op = re.compile(r"\s+(?:ROOT )?%?(\S+) = .*?op_name=\"([^\"]*)\"")
    for line in Path(base + ".txt").read_text().splitlines():
        if m := op.match(line):
            sources[m.group(1)] = m.group(2)
    rows = [
        dict(
            gib=nbytes / GIB,
            shape=shapes.get(name.removesuffix("{}"), "?")[:120],
            source=sources.get(name.split("{")[0], name)[-160:],
        )
        for name, nbytes in sorted(live, key=lambda x: -x[1])[:count]
    ]
    return float(sum(b for _, b in live)), rows


# -- one recipe, in a child process ------------------------------------------------------------


def compile_recipe(name: str, sets: list[str], topology_name: str | None) -> list[dict]:
    from jaxalign import aot, hlo, topology
    from jaxalign.config import load_config

    topology.prepare_host()
    import jax

    cfg = load_config(RECIPES / f"{name}.yaml", overrides=sets)
    topo = topology.parse_topology(topology_name or recipe_topology(name))
    devices = topology.topology_devices(topo)
    chip = topology.chip_of(devices[0])
    hbm = aot.device_hbm_bytes(devices)
    n = len(devices)
    lowered, trainer = aot.lower_train_step(cfg, devices)
    programs = [("train_step", lowered)]
    if trainer.algorithm.is_rl:
        programs.append(("rollout_generate", aot.lower_rollout_generate(cfg, trainer)))
    rows = []
    for program, low in programs:
        start = time.perf_counter()
        try:
            compiled = low.compile()
        except Exception as e:  # noqa: BLE001 - RESOURCE_EXHAUSTED and friends: recorded
            rows.append(
                dict(recipe=name, topology=topo.name, program=program, devices=n,
                     error=str(e).splitlines()[0][:400],
                     compile_s=round(time.perf_counter() - start, 1))
            )  # fmt: skip
            continue
        seconds = time.perf_counter() - start
        r = aot.report(compiled, program, hbm)
        text = compiled.as_text()
        HLO_DIR.mkdir(parents=True, exist_ok=True)
        (HLO_DIR / f"{name}.{program}.hlo").write_text(text)
        live_total, live = live_at_peak(DUMP_DIR / name, program)
        pallas = hlo.pallas_attention_flops(text)
        traffic, collective = hlo.hlo_traffic(text)
        flops = r.flops + pallas
        compute_s = flops / chip.peak_bf16_flops
        memory_s = traffic / chip.hbm_bandwidth
        step_s = max(compute_s, memory_s)
        mf = model_flops(cfg, program)
        rows.append(
            dict(
                recipe=name,
                topology=topo.name,
                program=program,
                devices=n,
                sets=sets,
                peak_gib=r.peak_bytes / GIB,
                hbm_gib=hbm / GIB,
                fits=r.fits,
                argument_gib=r.argument_bytes / GIB,
                output_gib=r.output_bytes / GIB,
                alias_gib=r.alias_bytes / GIB,
                temp_gib=r.temp_bytes / GIB,
                tflops_per_device=flops / 1e12,
                hlo_tflops=r.flops / 1e12,
                splash_tflops=pallas / 1e12,
                xla_cost_tflops=r.xla_flops / 1e12,
                hbm_traffic_gib=traffic / GIB,
                collective_gib=collective / GIB,
                compute_s=compute_s,
                memory_s=memory_s,
                step_s=step_s,
                model_tflops_per_device=None if mf is None else mf / n / 1e12,
                mfu=None if mf is None else mf / n / (step_s * chip.peak_bf16_flops),
                unknown_trip_counts=r.unknown_trip_counts,
                compile_s=round(seconds, 1),
                largest_buffers=[
                    dict(gib=b.nbytes / GIB, shape=b.shape, op=b.op, source=b.source[-160:])
                    for b in r.largest_buffers
                ],
                live_at_peak_gib=live_total / GIB,
                live_at_peak=live,
                jax=jax.__version__,
                libtpu=_libtpu_version(),
            )
        )
    return rows


def _libtpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:
        return "unknown"


# -- the table ---------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    head = (
        "| recipe | slice | program | peak / device | HBM | fits | TFLOP / device | "
        "HBM traffic | collectives | roofline step | MFU (roofline) | compile |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        name = r["recipe"] + (f" ({r['tag']})" if r.get("tag") else "")
        if "error" in r:
            lines.append(
                f"| {name} | {r['topology']} | {r['program']} | does not compile: "
                f"{r['error'][:80]} | | no | | | | | | {r['compile_s']:.0f} s |"
            )
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        bound = "compute" if r["compute_s"] >= r["memory_s"] else "memory"
        lines.append(
            f"| {name} | {r['topology']} | {r['program']} | {r['peak_gib']:.2f} GiB | "
            f"{r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else 'NO'} | "
            f"{r['tflops_per_device']:.1f} | {r['hbm_traffic_gib']:.0f} GiB | "
            f"{r['collective_gib']:.0f} GiB | {r['step_s']:.2f} s ({bound}) | {mfu} | "
            f"{r['compile_s']:.0f} s |"
        )
    return "\n".join(lines)


def calibration(rows: list[dict]) -> str:
    """Markdown: each compiled program's peak beside `jaxalign plan --platform tpu`'s fast
    estimate of it (what tests/test_plan_calibration.py checks within 15%)."""
    from jaxalign.config import load_config
    from jaxalign.plan import GIB as PLAN_GIB
    from jaxalign.plan import make_plan
    from jaxalign.trainers import get_trainer

    lines = [
        "| recipe | slice | program | compiled peak | `jaxalign plan --platform tpu` | "
        "difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r or r.get("tag"):
            continue
        cfg = load_config(RECIPES / f"{r['recipe']}.yaml", overrides=r["sets"])
        plan = make_plan(cfg, r["devices"], platform="tpu")
        if r["program"] == "rollout_generate":
            estimate = plan.rollout_generate / PLAN_GIB
        else:
            estimate = plan.train_step_bytes(get_trainer(cfg.trainer).is_rl) / PLAN_GIB
        lines.append(
            f"| {r['recipe']} | {r['topology']} | {r['program']} | {r['peak_gib']:.2f} GiB | "
            f"{estimate:.2f} GiB | {100 * (estimate / r['peak_gib'] - 1):+.1f}% |"
        )
    return "\n".join(lines)


def refresh(rows: list[dict]) -> list[dict]:
    """Stored rows with their model FLOPs and MFU recomputed by `model_flops` (the compiled
    FLOPs, HBM traffic and roofline time are the compile's; the chip's peak is its FLOPs over
    its compute time)."""
    from jaxalign.config import load_config

    for r in rows:
        if "error" in r:
            continue
        cfg = load_config(RECIPES / f"{r['recipe']}.yaml", overrides=r["sets"])
        mf = model_flops(cfg, r["program"])
        peak = r["tflops_per_device"] * 1e12 / r["compute_s"]
        r["model_tflops_per_device"] = None if mf is None else mf / r["devices"] / 1e12
        r["mfu"] = None if mf is None else mf / r["devices"] / (r["step_s"] * peak)
    return rows


def merge(new: list[dict], path: Path) -> list[dict]:
    old = json.loads(path.read_text())["results"] if path.exists() else []
    keys = {(r["recipe"], r.get("tag", "")) for r in new}
    kept = [r for r in old if (r["recipe"], r.get("tag", "")) not in keys]
    return sorted(kept + new, key=lambda r: (r["recipe"], r.get("tag", ""), r["program"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", help="recipe names (default: every TPU recipe)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--tag", default="", help="label of a variant (--set) in the results")
    p.add_argument("--topology", help="compile for this slice instead of the file name's")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument(
        "--refresh",
        action="store_true",
        help="recompute the stored rows' model FLOPs and MFU (formulas only, no compile)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.refresh:
        rows = refresh(json.loads(args.json.read_text())["results"])
        args.json.write_text(json.dumps({"results": rows}, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(markdown(rows) + "\n")
        print(markdown(rows) + "\n\n" + calibration(rows))
        return 0
    if args.worker:  # child: one recipe, JSON rows on the last line
        rows = compile_recipe(args.recipes[0], args.set, args.topology)
        print("@@rows " + json.dumps(rows), flush=True)
        return 0
    names = args.recipes or tpu_recipes()
    for name in names:
        if not (RECIPES / f"{name}.yaml").exists():
            sys.exit(f"tpu_compile: no recipe {RECIPES / name}.yaml")
        if not (args.topology or recipe_topology(name)):
            print(f"{name}: skipped (no TPU slice in its name)", flush=True)
            continue
        cmd = [
            sys.executable,
            __file__,
            name,
            "--worker",
            *sum([["--set", s] for s in args.set], []),
        ]
        if args.topology:
            cmd += ["--topology", args.topology]
        env = os.environ.copy()
        dump = DUMP_DIR / name
        if dump.exists():
            shutil.rmtree(dump)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
        start = time.perf_counter()
        print(f"{name}: compiling ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("@@rows ")), None)
        if line is None:
            print(f"{name}: failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        rows = json.loads(line.removeprefix("@@rows "))
        for r in rows:
            r["tag"] = args.tag
            r["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes")
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        print(markdown(rows), flush=True)
        merged = merge(rows, args.json)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": merged}, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(markdown(merged) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
