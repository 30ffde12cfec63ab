"""Decode throughput: jaxalign's Sampler vs Hugging Face transformers' `generate`, same shapes.

    python bench/decode.py                          # sizes tiny,100m; batches 1,8,64
    python bench/decode.py --sizes 7m --batches 8 --new-tokens 128 --repeats 5
    python bench/decode.py --dtype bfloat16 --json bench/results/decode_bf16.json

Both sides decode greedily from random-weight models of the same Llama config, with weights and
compute in `--dtype` on both sides (default float32; bfloat16 uses the CPU's AVX512-BF16 / AMX
units where it has them: jaxalign's `model.param_dtype` and `model.dtype`, torch's
`model.to(torch.bfloat16)`), with prompts
of `--prompt-len` random tokens (no padding) and exactly `--new-tokens` new tokens (jaxalign: no
stop tokens; transformers: `min_new_tokens = max_new_tokens`, KV cache on). The time of one call
includes the prefill on both sides; tokens/s = batch * new tokens / seconds. JAX compiles once per
shape before timing.

Each side runs in its own long-lived subprocess with the same allocator (`--allocator`, default
tcmalloc when installed); the parent asks them in turns so the repeats interleave in time, and
reports medians. Results: a table on stdout and JSON (`--json`, default
bench/results/decode.json).

`--sides` picks what runs: `jax`, `torch`, and `jax@DIR`, jaxalign imported from another
checkout (e.g. `git worktree add /tmp/base HEAD~1`), to compare code versions interleaved on a
busy machine: `--sides jax@/tmp/base,jax`. Ratios are against torch when it runs, else against
the first side. Each row also records CPU seconds per call (`*_cpu_s`), which competing processes
distort less than wall time.

The floor columns say how fast any implementation could go on this machine (`decode_floor_s`):
the prefill's FLOPs at the matmul peak plus, per decode step, the longer of reading every weight
once at the measured weight-streaming bandwidth and the step's FLOPs at the peak (both measured
by the JAX worker at start-up). "floor / transformers" is the largest speed-up over transformers
the machine allows at that shape; at ~100M parameters decode is bound by reading the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SIZES: dict[str, dict] = {
    # configs/sft_tiny.yaml's model (untied here so both sides have the same parameters).
    "tiny": common.TINY_MODEL,
    # The 7.1M model of the shared performance notes (PERFORMANCE-NOTES.md).
    "7m": common.MODELS["7m"],
    # About 100M parameters (25M embedding + 25M output + 12 x 4.2M blocks).
    "100m": {
        "vocab_size": 16384,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 4,
    },
}


def num_params(m: dict) -> int:
    d, f, v, layers = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_layers"]
    hd = d // m["num_heads"]
    attn = d * hd * (2 * m["num_heads"] + 2 * m["num_kv_heads"])
    return 2 * v * d + d + layers * (attn + 3 * d * f + 2 * d)


def decode_floor_s(
    m: dict,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    peak_flops: float,
    bandwidth: float,
    bytes_per_param: int = 4,
) -> float:
    """The fastest any implementation could run one call on this machine (weights of
    `bytes_per_param` bytes: 4 for f32, 2 for bf16, with peak_flops measured in that dtype): the
    prefill's matmul FLOPs at the measured matmul peak, plus, for each of the new_tokens - 1
    decode steps, the longer of reading every matmul weight once (at the measured bandwidth)
    and the step's FLOPs at the peak. Attention over the cache is counted as FLOPs; norms,
    sampling and the cache's own traffic are left out, so this is a lower bound."""
    d, f, v, layers = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_layers"]
    hd = d // m["num_heads"]
    layer_params = layers * (d * hd * (2 * m["num_heads"] + 2 * m["num_kv_heads"]) + 3 * d * f)
    head_params = v * d  # the LM head; the embedding is a lookup
    q_width = m["num_heads"] * hd
    # Prefill: every prompt position through the layers, causal attention (QK^T and PV, half
    # the square), the LM head on the last position only.
    prefill = 2 * batch * prompt_len * layer_params + 2 * batch * head_params
    prefill += layers * 2 * batch * prompt_len * prompt_len * q_width
    total = prefill / peak_flops
    weight_bytes = bytes_per_param * (layer_params + head_params)
    for t in range(new_tokens - 1):
        context = prompt_len + t + 1
        flops = 2 * batch * (layer_params + head_params) + layers * 4 * batch * context * q_width
        total += max(weight_bytes / bandwidth, flops / peak_flops)
    return total


# -- workers -----------------------------------------------------------------------------------


def jax_worker(size: str, dtype: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxalign.config import SamplingConfig, load_config
    from jaxalign.generate import Sampler
    from jaxalign.models.llama import Transformer

    model = {**SIZES[size], "param_dtype": dtype, "dtype": dtype}
    cfg = load_config(None, [], base={"model": model})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.ones(x.shape, np.float32)
            if "norm" in jax.tree_util.keystr(path)
            else (0.02 * rng.standard_normal(x.shape, np.float32))
        ).astype(x.dtype),
        state.to_pure_dict(),
    )
    params = jax.device_put(params, jax.devices()[0])
    samplers: dict[int, Sampler] = {}
    import jaxalign
    from jaxalign.metrics import measure_matmul_peak

    common.emit(
        {
            "ready": True,
            "device": str(jax.devices()[0]),
            "allocator": common.loaded_allocator(),
            "jaxalign": str(Path(jaxalign.__file__).parent),
        }
    )
    for cmd in common.commands():
        if cmd.get("calibrate"):  # asked while the other side idles
            peak = max(measure_matmul_peak(n, jnp.dtype(dtype)) for n in (512, 1024, 2048))
            common.emit({"matmul_peak_flops": peak, "weight_bandwidth": measure_weight_bandwidth()})
            continue
        n, b, p = cmd["new_tokens"], cmd["batch"], cmd["prompt_len"]
        if n not in samplers:
            samplers[n] = Sampler(
                cfg.model,
                SamplingConfig(temperature=0.0, max_new_tokens=n, max_prompt_len=p),
                graphdef=graphdef,
            )
        prompts = np.random.default_rng(1).integers(4, cfg.model.vocab_size, (b, p))
        lengths = np.full((b,), p, np.int32)
        sampler = samplers[n]
        penalty = {"repetition_penalty": cmd.get("repetition_penalty", 1.0)}
        if cmd.get("warmup"):
            jax.block_until_ready(
                sampler.generate_padded(params, prompts, lengths, **penalty).tokens
            )
        with common.Timer() as t:
            out = sampler.generate_padded(params, prompts, lengths, **penalty)
            jax.block_until_ready(out.tokens)
        assert int(out.lengths.min()) == n
        common.emit({"seconds": t.wall_s, **t.as_dict()})


def measure_weight_bandwidth(repeats: int = 5) -> float:
    """Bytes/s at which XLA streams f32 weights (256 MiB, far larger than any cache) through a
    one-row matmul, as a decode step at batch 1 does, or through a sum: the practical bandwidth
    for reading weights (the best of both, best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    w = jnp.full((4096, 16384), 0.5, jnp.float32)
    x = jnp.ones((1, 4096), jnp.float32)
    best = float("inf")
    for f, args in ((jax.jit(lambda a, b: a @ b), (x, w)), (jax.jit(jnp.sum), (w,))):
        f(*args).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return w.size * 4 / best


def torch_worker(size: str, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = SIZES[size]
    config = LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype=torch.float32,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    common.emit(
        {"ready": True, "threads": torch.get_num_threads(), "allocator": common.loaded_allocator()}
    )
    for cmd in common.commands():
        n, b, p = cmd["new_tokens"], cmd["batch"], cmd["prompt_len"]
        ids = torch.randint(4, m["vocab_size"], (b, p), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        kwargs = dict(
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
            repetition_penalty=cmd.get("repetition_penalty", 1.0),
        )
        with torch.inference_mode():
            if cmd.get("warmup"):
                model.generate(ids, **kwargs)
            with common.Timer() as t:
                out = model.generate(ids, **kwargs)
        assert out.shape == (b, p + n), out.shape
        common.emit({"seconds": t.wall_s, **t.as_dict()})


# -- parent ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--new-tokens-100m",
        type=int,
        default=64,
        help="new tokens for the 100m size (keeps the run to a few minutes)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="both sides decode with this repetition penalty (1: off)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights and compute on both sides",
    )
    ap.add_argument("--allocator", default=common.default_allocator(), choices=common.ALLOCATORS)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "decode.json"))
    ap.add_argument(
        "--sides",
        default="jax,torch",
        help="comma-separated: jax, torch, jax@DIR (jaxalign from another checkout)",
    )
    ap.add_argument("--worker", choices=("jax", "torch"))
    ap.add_argument("--size")
    args = ap.parse_args()
    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args.size, args.dtype)
        return

    sides = args.sides.split(",")
    for side in sides:
        if side not in ("jax", "torch") and not (side.startswith("jax@") and len(side) > 4):
            raise SystemExit(f"--sides: unknown side {side!r} (jax, torch or jax@DIR)")
    if len(set(sides)) != len(sides):
        raise SystemExit(f"--sides: {args.sides!r} names a side twice")
    base_env = common.allocator_env(args.allocator)
    base_env.setdefault("JAX_PLATFORMS", "cpu")
    reference = "torch" if "torch" in sides else sides[0]
    rows, info = [], {}
    started = time.perf_counter()
    for size in args.sizes.split(","):
        workers = {side: start_worker(side, size, args.dtype, base_env) for side in sides}
        try:
            info[size] = {side: w.read() for side, w in workers.items()}
            for side, w in workers.items():  # the machine's peak, with every worker idle
                if side.startswith("jax"):
                    info[size][side].update(w.request({"calibrate": True}))
                    break
            n = args.new_tokens_100m if size == "100m" else args.new_tokens
            for b in (int(x) for x in args.batches.split(",")):
                cmd = {"batch": b, "prompt_len": args.prompt_len, "new_tokens": n}
                cmd["repetition_penalty"] = args.repetition_penalty
                answers: dict[str, list[dict]] = {side: [] for side in sides}
                for rep in range(args.repeats):
                    for side, w in workers.items():
                        answers[side].append(w.request({**cmd, "warmup": rep == 0}))
                row = {
                    "size": size,
                    "params_m": num_params(SIZES[size]) / 1e6,
                    "batch": b,
                    "prompt_len": args.prompt_len,
                    "new_tokens": n,
                    "dtype": args.dtype,
                    "repetition_penalty": args.repetition_penalty,
                }
                for side in sides:
                    row[f"{side}_s"] = common.median([a["seconds"] for a in answers[side]])
                    row[f"{side}_tok_s"] = b * n / row[f"{side}_s"]
                    row[f"{side}_all_s"] = [a["seconds"] for a in answers[side]]
                    row[f"{side}_cpu_s"] = common.median([a["cpu_s"] for a in answers[side]])
                for side in sides:
                    if side != reference:
                        row[f"{side}_ratio"] = row[f"{side}_tok_s"] / row[f"{reference}_tok_s"]
                jax_info = next((info[size][x] for x in sides if x.startswith("jax")), None)
                if jax_info and "matmul_peak_flops" in jax_info:
                    row["floor_s"] = decode_floor_s(
                        SIZES[size],
                        b,
                        args.prompt_len,
                        n,
                        jax_info["matmul_peak_flops"],
                        jax_info["weight_bandwidth"],
                        bytes_per_param=2 if args.dtype == "bfloat16" else 4,
                    )
                    row["floor_tok_s"] = b * n / row["floor_s"]
                    if "torch" in sides:  # the most any implementation could beat it by here
                        row["floor_ratio"] = row["floor_tok_s"] / row["torch_tok_s"]
                if "jax" in sides and "torch" in sides:
                    row["ratio"] = row["jax_ratio"]
                rows.append(row)
                speeds = ", ".join(
                    f"{side} {row[f'{side}_tok_s']:,.0f} tok/s"
                    + (f" ({row[f'{side}_ratio']:.2f}x)" if side != reference else "")
                    for side in sides
                )
                print(f"{size} batch {b}: {speeds}", flush=True)
                write_result(args, info, rows, started)  # partial results survive an abort
        finally:
            for w in workers.values():
                w.close()
    columns = [
        ("size", "size", "s"),
        ("params (M)", "params_m", ".1f"),
        ("batch", "batch", "d"),
        ("new tokens", "new_tokens", "d"),
    ]
    for side in sides:
        title = {"jax": "jaxalign", "torch": "transformers"}.get(side, side)
        columns.append((f"{title} tok/s", f"{side}_tok_s", ",.0f"))
    for side in sides:
        if side != reference:
            columns.append((f"{side} / {reference}", f"{side}_ratio", ".2f"))
    columns.append(("floor tok/s", "floor_tok_s", ",.0f"))
    if "torch" in sides:
        columns.append(("floor / transformers", "floor_ratio", ".2f"))
    print()
    print(common.format_table(rows, columns))
    write_result(args, info, rows, started)
    print(f"\nwrote {args.json}")


def start_worker(side: str, size: str, dtype: str, base_env: dict[str, str]) -> common.Worker:
    """A worker subprocess for `side` (jax, torch, or jax@DIR: jaxalign imported from DIR)."""
    root = side.split("@", 1)[1] if side.startswith("jax@") else str(ROOT)
    env = dict(base_env)
    env["PYTHONPATH"] = os.path.abspath(root) + os.pathsep + env.get("PYTHONPATH", "")
    kind = "torch" if side == "torch" else "jax"
    argv = [sys.executable, __file__, "--worker", kind, "--size", size, "--dtype", dtype]
    return common.Worker(side, argv, env)


def write_result(args: argparse.Namespace, info: dict, rows: list[dict], started: float) -> None:
    result = {
        "benchmark": "decode",
        "machine": common.machine_info(),
        "allocator": args.allocator,
        "sides": args.sides.split(","),
        "dtype": args.dtype,
        "repetition_penalty": args.repetition_penalty,
        "workers": info,
        "load_average": common.load_average(),
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
