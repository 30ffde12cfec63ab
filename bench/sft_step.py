"""SFT train-step throughput: jaxalign's real jitted step vs PyTorch + transformers, same shapes.

    python bench/sft_step.py                       # sizes tiny,7m,50m; tcmalloc if installed
    python bench/sft_step.py --sizes 7m --repeats 7 \
        --variant 'qb64:model.attention_query_block=64' \
        --variant 'chunks4:loss.vocab_chunks=4' \
        --variant 'fastmath:xla_flags=--xla_cpu_enable_fast_math=true'

The JAX side is what users run: `Trainer(cfg, SFT-loss algorithm, devices=jax.devices()[:1])`,
`trainer.fresh_state()`, `trainer.compile_step(batch)` (in/out shardings, donated state), called
inside the trainer's activation-sharding context, exactly as `Trainer._loop` does. The baseline is
`transformers.LlamaForCausalLM` with the same config (random weights, f32), `model(input_ids,
labels=...)`, gradient clipping, `torch.optim.AdamW` with the same hyperparameters, the same
warmup + cosine schedule, batch and sequence length.

Every side runs in its own long-lived subprocess with the same allocator (`--allocator`, default
tcmalloc when libtcmalloc_minimal.so.4 is installed) and the parent asks them in turns, so the
repeats of each side interleave in time; ratios are taken per repeat, then the median.

A `--variant NAME:key=value;key=value` adds a JAX worker with config overrides (dotted keys as in
`--set`), plus two special keys: `xla_flags=...` (XLA_FLAGS for that worker) and `patch=FILE` (a
Python file executed in the worker before the step is built, to measure a proposed change to the
model or step code without editing it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Model shapes and batch per size. `tiny` is configs/sft_tiny.yaml (its model, batch and seq_len).
SIZES: dict[str, dict] = {
    "tiny": {"yaml": "configs/sft_tiny.yaml"},
    "7m": {
        "model": {
            "vocab_size": 8192,
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 4,
        },
        "batch_size": 8,
        "seq_len": 256,
    },
    "50m": {
        "model": {
            "vocab_size": 16384,
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 4,
        },
        "batch_size": 8,
        "seq_len": 256,
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


# ---------------------------------------------------------------------------------------------
# JAX worker


def jax_config(size: str, sets: list[str], run_dir: str):
    from jaxalign.config import load_config

    spec = SIZES[size]
    overrides = [
        f"run_dir={run_dir}",
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        "train.progress=false",
        "logging.tensorboard=false",
    ]
    overrides += [f"train.{k}={v}" for k, v in TRAIN.items()]
    base = None
    path = None
    if "yaml" in spec:
        path = ROOT / spec["yaml"]
        overrides.append(f"sharding.rules_file={ROOT / 'configs/sharding/fsdp.yaml'}")
    else:
        base = {"model": dict(spec["model"], dtype="float32", param_dtype="float32")}
        overrides += [f"train.batch_size={spec['batch_size']}", f"train.seq_len={spec['seq_len']}"]
    return load_config(path, overrides + sets, base=base)


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, grad_accum: int = 1) -> dict:
    """Random token rows shaped like the SFT pipeline's output: [A, B/A, T] per key."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = batch_size // grad_accum
    seqs = rng.integers(0, vocab, (grad_accum, rows, seq_len + 1), dtype=np.int32)
    shape = (grad_accum, rows, seq_len)
    return {
        "inputs": seqs[..., :-1].copy(),
        "targets": seqs[..., 1:].copy(),
        "loss_mask": np.ones(shape, np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
    }


def jax_worker(args) -> None:
    import tempfile

    rss_import_start = common.peak_rss_mb()
    import jax

    from jaxalign import sharding as shd
    from jaxalign.metrics import measure_matmul_peak, param_count, train_flops_per_token
    from jaxalign.trainers.loop import Trainer
    from jaxalign.trainers.sft import SFT

    if args.patch:
        code = Path(args.patch).read_text()
        exec(compile(code, args.patch, "exec"), {"__name__": "bench_patch"})

    class SyntheticSFT(SFT):
        """jaxalign's SFT loss on an in-memory batch (no tokenizer, no files)."""

        def __init__(self, cfg):  # noqa: D107 - skips SFT's tokenizer loading on purpose
            self.cfg = cfg

        def train_data(self, process_index, process_count):
            raise NotImplementedError

        def eval_data(self, process_index, process_count):
            return None

    state = compiled = batch = None
    for cmd in common.commands():
        op = cmd["op"]
        if op == "build":
            rss_imported = common.peak_rss_mb()
            cfg = jax_config(args.size, args.set, tempfile.mkdtemp(prefix="bench_sft_"))
            t = cfg.train
            trainer = Trainer(cfg, SyntheticSFT(cfg), devices=jax.devices()[:1])
            state = trainer.fresh_state()
            batch = trainer.to_global(
                synthetic_batch(t.batch_size, t.seq_len, cfg.model.vocab_size, t.grad_accum)
            )
            sharding_ctx = shd.activation_sharding(trainer.mesh, trainer.rules)
            sharding_ctx.__enter__()  # kept for the worker's life, as Trainer.run does
            t0 = time.perf_counter()
            compiled = trainer.compile_step(batch).lower(state, batch, None).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, None)
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(2):
                state, metrics = compiled(state, batch, None)
            jax.block_until_ready(metrics)
            warm_step_s = (time.perf_counter() - t0) / 2
            peaks = {n: measure_matmul_peak(n) for n in (512, 1024, 2048)}
            common.emit(
                {
                    "side": "jax",
                    "allocator": common.loaded_allocator(),
                    "ld_preload": os.environ.get("LD_PRELOAD", ""),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "batch_size": t.batch_size,
                    "seq_len": t.seq_len,
                    "params": param_count(cfg.model)["total"],
                    "flops_per_token": train_flops_per_token(cfg.model, t.seq_len),
                    "matmul_peak_flops": {str(k): v for k, v in peaks.items()},
                    "compile_s": compile_s,
                    "first_step_s": first_step_s,
                    "warm_step_s": warm_step_s,
                    "loss": float(metrics["loss"]),
                    "rss_python_mb": rss_import_start,
                    "rss_imported_mb": rss_imported,
                    "model": {
                        k: getattr(cfg.model, k)
                        for k in (
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
                    },
                    "loss_config": {"vocab_chunks": cfg.loss.vocab_chunks},
                }
            )
        elif op == "time":
            n = cmd["steps"]
            with common.Timer() as timer:
                for _ in range(n):
                    state, metrics = compiled(state, batch, None)
                jax.block_until_ready(metrics)
            common.emit(
                {"step_s": timer.wall_s / n, **timer.as_dict(), "loss": float(metrics["loss"])}
            )
        elif op == "finish":
            common.emit({"peak_rss_mb": common.peak_rss_mb()})


# ---------------------------------------------------------------------------------------------
# PyTorch worker


ADAMW_KWARGS = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def build_torch_step(m: dict, t: dict, adamw: str):
    """The baseline: (step function, model) for LlamaForCausalLM with jaxalign's model config
    `m` and batch `t` ({batch_size, seq_len})."""
    import torch
    import transformers

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=max(t["seq_len"], 2048),
        rms_norm_eps=m["rms_norm_eps"],
        rope_theta=m["rope_theta"],
        tie_word_embeddings=m["tie_embeddings"],
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(conf).to(torch.float32).train()
    decay, no_decay = [], []  # the same weight-decay mask as jaxalign.optim
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

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, m["vocab_size"], (t["batch_size"], t["seq_len"]), generator=g)

    def step():
        loss = model(input_ids=x, labels=x).loss  # labels are shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def torch_worker(args) -> None:
    rss_import_start = common.peak_rss_mb()
    import torch

    step = None
    for cmd in common.commands():
        op = cmd["op"]
        if op == "build":
            rss_imported = common.peak_rss_mb()
            step, model = build_torch_step(cmd["model"], cmd["train"], args.torch_adamw)
            t0 = time.perf_counter()
            loss = step()
            first_step_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(2):
                loss = step()
            warm_step_s = (time.perf_counter() - t0) / 2
            peaks = {n: torch_matmul_peak(torch, n) for n in (512, 1024, 2048)}
            common.emit(
                {
                    "side": "torch",
                    "torch_matmul_peak_flops": {str(k): v for k, v in peaks.items()},
                    "allocator": common.loaded_allocator(),
                    "ld_preload": os.environ.get("LD_PRELOAD", ""),
                    "threads": torch.get_num_threads(),
                    "adamw": args.torch_adamw,
                    "attn_implementation": model.config._attn_implementation,
                    "params": sum(p.numel() for p in model.parameters()),
                    "first_step_s": first_step_s,
                    "warm_step_s": warm_step_s,
                    "loss": float(loss),
                    "rss_python_mb": rss_import_start,
                    "rss_imported_mb": rss_imported,
                }
            )
        elif op == "time":
            n = cmd["steps"]
            with common.Timer() as timer:
                for _ in range(n):
                    loss = step()
            common.emit({"step_s": timer.wall_s / n, **timer.as_dict(), "loss": float(loss)})
        elif op == "finish":
            common.emit({"peak_rss_mb": common.peak_rss_mb()})


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


def worker_main(args) -> None:
    try:
        (jax_worker if args.worker == "jax" else torch_worker)(args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
        import traceback

        traceback.print_exc(file=sys.stdout)
        common.emit({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------------------------------------
# Parent


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


def torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def bench_size(size: str, args, env: dict[str, str]) -> dict:
    """Build every worker for `size`, time them in turns, return the results."""
    variants = [("jaxalign", [], None, None)] + [parse_variant(v) for v in args.variant]
    workers: dict[str, common.Worker] = {}
    me = [sys.executable, str(Path(__file__).resolve()), "--size", size]
    for name, sets, xla_flags, patch in variants:
        wenv = dict(env)
        if xla_flags is not None:
            wenv["XLA_FLAGS"] = xla_flags
        argv = me + ["--worker", "jax"] + [a for s in args.set + sets for a in ("--set", s)]
        if patch:
            argv += ["--patch", patch]
        workers[name] = common.Worker(f"{size}/{name}", argv, wenv)
    if args.baseline == "torch":
        workers["pytorch"] = common.Worker(
            f"{size}/pytorch", me + ["--worker", "torch", "--torch-adamw", args.torch_adamw], env
        )
    info: dict[str, dict] = {}
    try:
        for name, w in workers.items():
            if name == "pytorch":
                ref = info["jaxalign"]
                info[name] = w.request(
                    {
                        "op": "build",
                        "model": ref["model"],
                        "train": {"batch_size": ref["batch_size"], "seq_len": ref["seq_len"]},
                    }
                )
            else:
                info[name] = w.request({"op": "build"})
            print(
                f"  built {size}/{name}: first step {info[name]['first_step_s']:.2f} s"
                + (
                    f" (compile {info[name]['compile_s']:.2f} s)"
                    if "compile_s" in info[name]
                    else ""
                ),
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
    ref = info["jaxalign"]
    tokens = ref["batch_size"] * ref["seq_len"]
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
        med = common.median(times[name])
        row = {
            "size": size,
            "side": name,
            "params_m": i["params"] / 1e6,
            "steps": steps[name],
            "step_times_s": times[name],
            "step_s": med,
            "best_step_s": min(times[name]),
            "tokens_per_s": tokens / med,
            "best_tokens_per_s": tokens / min(times[name]),
            "cpu_share": common.median([x["cpu_share"] for x in samples[name]]),
            "cpu_s_per_step": common.median([x["cpu_s"] / steps[name] for x in samples[name]]),
            "load_average": common.median([x["load_before"] for x in samples[name]]),
            "samples": samples[name],
            "mfu": tokens / med * ref["flops_per_token"] / peak,
            "compile_s": i.get("compile_s"),
            "first_step_s": i["first_step_s"],
            "peak_rss_mb": i["peak_rss_mb"],
            "rss_imported_mb": i["rss_imported_mb"],
            "allocator": i["allocator"],
            "build": i,
        }
        if "pytorch" in times:
            ratios = [b / a for a, b in zip(times[name], times["pytorch"], strict=True)]
            row["ratio_vs_pytorch"] = common.median(ratios)
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


COLUMNS = [
    ("size", "size", ""),
    ("side", "side", ""),
    ("params", "params_m", ".2f"),
    ("step ms", "step_ms", ".1f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("x PyTorch", "ratio_vs_pytorch", ".2f"),
    ("best tok/s", "best_tokens_per_s", ",.0f"),
    ("best x PyTorch", "best_ratio_vs_pytorch", ".2f"),
    ("MFU %", "mfu_pct", ".1f"),
    ("compile s", "compile_s", ".1f"),
    ("1st step s", "first_step_s", ".1f"),
    ("peak RSS MiB", "peak_rss_mb", ",.0f"),
    ("CPU s/step", "cpu_s_per_step", ".2f"),
    ("CPU share", "cpu_share", ".2f"),
    ("load", "load_average", ".1f"),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="tiny,7m,50m", help=f"comma list of {', '.join(SIZES)}")
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
        choices=common.ALLOCATORS,
        default=common.default_allocator(),
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
    p.add_argument("--json", default=str(ROOT / "bench/results/sft_step.json"))
    # internal: worker mode
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--patch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r} (known: {', '.join(SIZES)})")
    env = common.allocator_env(args.allocator)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    machine = common.machine_info()
    print(
        f"machine: {machine['nproc']} x {machine['cpu']}, {machine['mem_gib']} GiB; "
        f"allocator {args.allocator} ({env.get('LD_PRELOAD') or 'no LD_PRELOAD'}) on every "
        f"side; XLA_FLAGS={env.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    results = []
    for size in sizes:
        print(f"{size}:", flush=True)
        results.append(bench_size(size, args, env))
    table_rows = []
    for res in results:
        for row in res["rows"]:
            table_rows.append({**row, "step_ms": row["step_s"] * 1e3, "mfu_pct": row["mfu"] * 100})
    print()
    print(common.format_table(table_rows, COLUMNS))
    for res in results:
        print(
            f"{res['size']}: {res['tokens_per_step']} tokens/step, "
            f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token, matmul peak "
            f"{res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s for MFU (best f32 square matmul of "
            f"512/1024/2048: measure_matmul_peak {res['jax_matmul_peak_flops'] / 1e9:.1f}"
            f", torch {res['torch_matmul_peak_flops'] / 1e9:.1f})"
        )
    for res in results:
        sides = {r["side"]: r["build"] for r in res["rows"]}
        for name, b in sides.items():
            print(
                f"  {res['size']}/{name}: allocator {b['allocator']} "
                f"(LD_PRELOAD={b['ld_preload'] or '-'})"
                + (f", XLA_FLAGS={b['xla_flags']!r}" if b.get("xla_flags") else "")
                + (
                    f", AdamW {b['adamw']}, attention {b['attn_implementation']}, "
                    f"{b['threads']} threads"
                    if b["side"] == "torch"
                    else ""
                )
            )
    out = {
        "benchmark": "sft_step",
        "machine": machine,
        "allocator": args.allocator,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "size", "patch")},
        "train": TRAIN,
        "results": results,
    }
    common.write_json(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
