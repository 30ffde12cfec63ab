"""One-GPU benchmark: jaxalign's SFT train step on a ~1B Llama in bf16, and KV-cache decoding.

    python bench/gpu_step.py                       # what bench/gpu.sh runs (H100 / H200)
    python bench/gpu_step.py --only sft --batch 8 --seq-len 2048
    python bench/gpu_step.py --cpu-smoke           # tiny model on CPU: checks the plumbing only

SFT: the real step (`Trainer(cfg, SFT loss)`, `compile_step`, donated state; as
bench/sft_step.py) on synthetic rows, no packing. Model `1b` is Llama-3.2-1B's shape (vocab
128,256, hidden 2,048, MLP 8,192, 16 layers, 32 heads, 8 KV heads, tied embeddings, 1.24B
parameters): compute in bfloat16 (`model.dtype`), parameters and AdamW state in float32
(`model.param_dtype`: mixed precision with f32 master weights). The step is timed once per
attention kernel in `--attention` (one process, each compiled afresh): `cudnn` (the option for GPUs,
`model.attention_kernel: cudnn`: `jax.nn.dot_product_attention`'s cuDNN flash attention with the
segment mask), `einsum` (jaxalign's grouped-query einsums + softmax, one query block on GPU) and
`cudnn-nomask` (cuDNN flash attention with the causal flag alone, patched in: what the segment
mask costs; exact only for unpacked rows like these). Candidate settings (batch, remat, loss
chunks) are compiled in order and the first whose compiled memory fits the device is timed (XLA's
`memory_analysis`, so nothing runs out of memory). MFU = tokens/s x `train_flops_per_token` (6 N
+ causal attention; recomputation under remat not counted) / peak, against the card's dense bf16
peak (H100 / H200 SXM: 989 TFLOP/s) and against a bf16 matmul measured here.

Decode: jaxalign's `Sampler` (prefill + while loop over a preallocated KV cache, greedy, no stop
tokens, as bench/decode.py's JAX side) on the same model with bf16 parameters; time per call
includes the prefill; tokens/s = batch x new tokens / seconds, median of the repeats after a
compiling warm-up.

Writes JSON to --json (default $OUT/gpu_step.json when $OUT is set, else
bench/results/gpu_step.json). Installs nothing and never imports Grain.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "1b": {  # Llama-3.2-1B's shape
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "tie_embeddings": True,
        "rope_theta": 500000.0,
    },
    "smoke": {  # --cpu-smoke: as small as still exercises every part
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "tie_embeddings": True,
    },
}

# Dense bf16 peak per card, FLOP/s, by a substring of `device_kind` (no sparsity).
CARD_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}

# The SFT step's attention variants, timed in this order by default (module docstring).
ATTENTION_KERNELS = ("cudnn", "einsum", "cudnn-nomask")

# (batch, remat, loss.vocab_chunks), best first: the first that fits is timed.
SFT_CANDIDATES = [(8, "save_dots", 1), (8, "save_dots", 4), (8, "full", 4), (4, "full", 4)]


def card_peak(device_kind: str) -> float | None:
    for name, peak in CARD_PEAKS.items():
        if name in device_kind:
            return peak
    return None


def sft_config(args, batch: int, remat: str, chunks: int, kernel: str = "einsum"):
    from jaxalign.config import load_config

    model = dict(
        MODELS[args.model],
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        remat=remat,
        attention_kernel=kernel,
    )
    sets = [
        f"run_dir={args.run_dir}",
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        "train.progress=false",
        "logging.tensorboard=false",
        f"train.batch_size={batch}",
        f"train.seq_len={args.seq_len}",
        f"loss.vocab_chunks={chunks}",
        *[f"train.{k}={v}" for k, v in common.TRAIN.items()],
        *args.set,
    ]
    return load_config(None, sets, base={"model": model})


def compiled_bytes(compiled) -> int | None:
    """Device memory a compiled step needs (arguments + outputs - donated aliases + temps)."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def device_limit() -> int | None:
    import jax

    try:
        return int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU has no memory stats
        return None


def cudnn_without_mask():
    """Patch the einsum kernel's whole-sequence attention to cuDNN flash attention with the causal
    flag alone (segment ids ignored: exact for this benchmark's unpacked rows, wrong for packed
    ones); returns a function that undoes the patch."""
    import jax

    from jaxalign.models import llama

    original = llama.attend

    def attend(q, k, v, q_segment_ids, k_segment_ids, q_index, k_index, sliding_window=None):
        if q.shape[1] != k.shape[1] or sliding_window is not None:
            return original(q, k, v, q_segment_ids, k_segment_ids, q_index, k_index, sliding_window)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    llama.attend = attend
    return lambda: setattr(llama, "attend", original)


def bench_sft(args, attention: str) -> dict:
    """Time the SFT step with one attention kernel (see the module docstring)."""
    kernel = "einsum" if attention == "cudnn-nomask" else attention
    undo = cudnn_without_mask() if attention == "cudnn-nomask" else None
    try:
        return _bench_sft(args, attention, kernel)
    finally:
        if undo is not None:
            undo()
        gc.collect()  # the last kernel's device buffers go before the next one's


def _bench_sft(args, attention: str, kernel: str) -> dict:
    import jax
    import sft_step

    from jaxalign import sharding as shd
    from jaxalign.metrics import param_count, train_flops_per_token

    limit = device_limit()
    candidates = SFT_CANDIDATES if args.batch is None else [(args.batch, args.remat, args.chunks)]
    tried = []
    for batch, remat, chunks in candidates:
        cfg = sft_config(args, batch, remat, chunks, kernel)
        trainer, state, data, info = sft_step.build_jax(args, cfg)
        with shd.activation_sharding(trainer.mesh, trainer.rules):
            t0 = time.perf_counter()
            compiled = trainer.compile_step(data).lower(state, data, None).compile()
            compile_s = time.perf_counter() - t0
            need = compiled_bytes(compiled)
            tried.append(
                {
                    "batch": batch,
                    "remat": remat,
                    "vocab_chunks": chunks,
                    "bytes": need,
                    "compile_s": compile_s,
                }
            )
            print(
                f"sft {attention}: candidate B={batch} remat={remat} chunks={chunks}: compiled in "
                f"{compile_s:.1f} s, needs {need / 2**30 if need else float('nan'):.1f} GiB of "
                f"{limit / 2**30 if limit else float('nan'):.1f}",
                flush=True,
            )
            if need is not None and limit is not None and need > 0.97 * limit:
                del trainer, state, data, compiled
                continue
            t0 = time.perf_counter()
            state, metrics = compiled(state, data, None)
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - t0
            state, metrics = compiled(state, data, None)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(state, data, None)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - t0) / args.steps)
            loss = float(metrics["loss"])
        del trainer, state, data, compiled
        step_s = common.median(times)
        tokens = batch * args.seq_len
        flops = train_flops_per_token(cfg.model, args.seq_len)
        return {
            "model": args.model,
            "dtype": args.dtype,
            "param_dtype": args.param_dtype,
            "params": param_count(cfg.model)["total"],
            "batch_size": batch,
            "seq_len": args.seq_len,
            "remat": remat,
            "vocab_chunks": chunks,
            "attention": attention,
            "attention_kernel": kernel,
            "attention_query_block": info["model"]["attention_query_block"],
            "candidates_tried": tried,
            "compile_s": compile_s,
            "first_step_s": first_step_s,
            "step_times_s": times,
            "step_s": step_s,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s,
            "flops_per_token": flops,
            "model_flops_per_s": tokens / step_s * flops,
            "memory_bytes": tried[-1]["bytes"],
            "loss": loss,
        }
    raise SystemExit(f"no SFT candidate fits the device ({limit} bytes): {tried}")


def bench_decode(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxalign.config import SamplingConfig, load_config
    from jaxalign.generate import Sampler
    from jaxalign.models.llama import Transformer

    model = dict(MODELS[args.model], dtype=args.dtype, param_dtype=args.dtype)
    cfg = load_config(None, [], base={"model": model})
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))

    @jax.jit
    def init(key):
        leaves, treedef = jax.tree.flatten(abstract.to_pure_dict())
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(
            treedef,
            [
                0.02 * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                for k, x in zip(keys, leaves, strict=True)
            ],
        )

    params = init(jax.random.PRNGKey(0))
    p, n = args.prompt_len, args.new_tokens
    sampler = Sampler(
        cfg.model,
        SamplingConfig(temperature=0.0, max_new_tokens=n, max_prompt_len=p),
        graphdef=graphdef,
    )
    rows = []
    for b in args.decode_batches:
        prompts = np.random.default_rng(1).integers(4, cfg.model.vocab_size, (b, p))
        lengths = np.full((b,), p, np.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(sampler.generate_padded(params, prompts, lengths).tokens)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = sampler.generate_padded(params, prompts, lengths)
            jax.block_until_ready(out.tokens)
            times.append(time.perf_counter() - t0)
        new = int(np.asarray(out.lengths).min())
        seconds = common.median(times)
        rows.append(
            {
                "batch": b,
                "prompt_len": p,
                "new_tokens": new,
                "warmup_s": warmup_s,
                "times_s": times,
                "seconds": seconds,
                "tokens_per_s": b * new / seconds,
                "ms_per_token_step": seconds / new * 1e3,
            }
        )
        print(
            f"decode batch {b}: {b * new / seconds:,.0f} tokens/s "
            f"({seconds / new * 1e3:.2f} ms per step, warm-up {warmup_s:.1f} s)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny model, tiny batch, on CPU: checks that everything runs",
    )
    p.add_argument("--only", choices=("sft", "decode"), help="run one part")
    p.add_argument("--model", choices=tuple(MODELS), default="1b")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="parameter / optimizer dtype")
    p.add_argument("--batch", type=int, help="SFT rows (default: the first candidate that fits)")
    p.add_argument("--remat", default="save_dots", help="with --batch")
    p.add_argument("--chunks", type=int, default=1, help="loss.vocab_chunks, with --batch")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--attention",
        type=lambda text: text.split(","),
        default=None,
        help="SFT attention kernels to time, comma-separated, from cudnn, einsum, cudnn-nomask "
        "(default: cudnn,einsum,cudnn-nomask; einsum with --cpu-smoke)",
    )
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64]
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.model, args.dtype, args.param_dtype = "smoke", "float32", "float32"
        args.batch = args.batch or 2
        args.seq_len, args.steps, args.repeats = 96, 2, 2  # 96: two query blocks on CPU
        args.decode_batches, args.prompt_len, args.new_tokens = [2], 16, 4
        args.attention = args.attention or ["einsum"]
    args.attention = args.attention or list(ATTENTION_KERNELS)
    unknown = set(args.attention) - set(ATTENTION_KERNELS)
    if unknown:
        p.error(f"unknown --attention kernels: {sorted(unknown)}")
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = (
            str(Path(out_dir) / "gpu_step.json")
            if out_dir
            else str(ROOT / "bench/results/gpu_step.json")
        )
    if args.run_dir is None:
        args.run_dir = common.scratch_dir("bench_gpu_")

    import jax

    from jaxalign.metrics import measure_matmul_peak

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    print(f"device: {kind} ({device.platform}), jax {jax.__version__}", flush=True)
    peak_dtype = jax.numpy.bfloat16 if args.dtype == "bfloat16" else jax.numpy.float32
    sizes = (512, 1024) if args.cpu_smoke else (4096, 8192)
    measured = max(measure_matmul_peak(n, peak_dtype) for n in sizes)
    spec_peak = None if args.cpu_smoke else card_peak(kind)
    result = {
        "benchmark": "gpu_step",
        # torch is not imported next to jax's CUDA libraries (its own CUDA/cuDNN may clash).
        "machine": common.machine_info(common.JAX_PACKAGES),
        "device": kind,
        "platform": device.platform,
        "command": " ".join(["python", "bench/gpu_step.py", *(argv or sys.argv[1:])]),
        "card_peak_flops": spec_peak,
        "measured_matmul_peak_flops": measured,
        "measured_matmul_dtype": args.dtype,
    }
    print(
        f"matmul peak: measured {measured / 1e12:.1f} TFLOP/s ({args.dtype}), card "
        f"{spec_peak / 1e12 if spec_peak else float('nan'):.0f} TFLOP/s",
        flush=True,
    )
    if args.only in (None, "sft"):
        result["sft"] = []
        for attention in args.attention:
            try:
                sft = bench_sft(args, attention)
            except Exception as e:  # noqa: BLE001 - one kernel failing must not lose the others
                print(f"SFT {attention}: failed: {type(e).__name__}: {e}", flush=True)
                result["sft"].append({"attention": attention, "error": f"{type(e).__name__}: {e}"})
                common.write_json(args.json, result)
                continue
            sft["mfu_vs_measured"] = sft["model_flops_per_s"] / measured
            if spec_peak:
                sft["mfu"] = sft["model_flops_per_s"] / spec_peak
            result["sft"].append(sft)
            common.write_json(args.json, result)
            print(
                f"SFT {args.model} ({attention} attention) B={sft['batch_size']} "
                f"T={sft['seq_len']} remat={sft['remat']} "
                f"chunks={sft['vocab_chunks']}: step {sft['step_s'] * 1e3:.1f} ms, "
                f"{sft['tokens_per_s']:,.0f} tokens/s, MFU "
                + (
                    f"{sft['mfu'] * 100:.1f}% of {spec_peak / 1e12:.0f} TFLOP/s, "
                    if spec_peak
                    else ""
                )
                + f"{sft['mfu_vs_measured'] * 100:.1f}% of the measured matmul; compile "
                f"{sft['compile_s']:.1f} s",
                flush=True,
            )
    if args.only in (None, "decode"):
        result["decode"] = bench_decode(args)
        common.write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
