"""The benchmark suite's plumbing: run_all's docs regeneration and the GPU script's CPU smoke run.
No timings are judged here; the arithmetic of the reported numbers is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run_all  # noqa: E402

MACHINE = {
    "date": "2026-11-28T10:00:00+00:00",
    "nproc": 2,
    "cpu": "AMD EPYC",
    "cpu_simd": ["avx2"],
    "mem_gib": 23.5,
    "platform": "Linux",
    "versions": {"python": "3.11.7", "jax": "0.10.2", "torch": "2.13.0+cpu"},
}


def step_row(side: str, step_s: float, ratio: float) -> dict:
    return {
        "size": "7m",
        "side": side,
        "params_m": 7.15,
        "step_s": step_s,
        "tokens_per_s": 2048 / step_s,
        "ratio_vs_pytorch": ratio,
        "best_ratio_vs_pytorch": ratio,
        "mfu": 0.5,
        "compile_s": 2.0 if side != "pytorch" else None,
        "first_step_s": 0.8,
        "peak_rss_mb": 1500.0,
        "cpu_share": 0.97,
        "load_average": 1.2,
        "build": {},
    }


SFT = {
    "benchmark": "sft_step",
    "machine": MACHINE,
    "command": "python bench/sft_step.py --sizes 7m",
    "results": [
        {
            "size": "7m",
            "tokens_per_step": 2048,
            "flops_per_token": 31.9e6,
            "matmul_peak_flops": 218.6e9,
            "jax_matmul_peak_flops": 218.6e9,
            "torch_matmul_peak_flops": 207.1e9,
            "rows": [step_row("jaxalign", 0.5, 1.05), step_row("pytorch", 0.525, 1.0)],
        }
    ],
}
DECODE = {
    "benchmark": "decode",
    "machine": MACHINE,
    "load_average": 1.5,
    "rows": [
        {
            "size": "tiny",
            "params_m": 0.87,
            "batch": 8,
            "new_tokens": 64,
            "jax_tok_s": 5000.0,
            "torch_tok_s": 2500.0,
            "ratio": 2.0,
        }
    ],
}
MANIFEST = {
    "command": "python bench/run_all.py --quick",
    "quick": True,
    "machine": MACHINE,
    "load_before": 0.5,
    "load_after": 1.25,
    "total_s": 600.0,
    "benches": {
        "sft_step": {
            "command": "python bench/sft_step.py --sizes 7m",
            "returncode": 0,
            "wall_s": 100.0,
            "load_before": 0.5,
            "load_after": 1.0,
            "log": "x",
        },
        "rm_step": {
            "command": "python bench/rm_step.py --sizes 7m",
            "returncode": 1,
            "wall_s": 5.0,
            "load_before": 1.0,
            "load_after": 1.0,
            "log": "x",
        },
        "decode": {
            "command": "python bench/decode.py --sizes tiny",
            "returncode": 0,
            "wall_s": 50.0,
            "load_before": 1.0,
            "load_after": 1.1,
            "log": "x",
        },
    },
}

DOC = """# Performance

Hand-written intro.

<!-- bench:machine:begin -->
old machine
<!-- bench:machine:end -->

## SFT

Analysis written by hand, kept.

<!-- bench:sft_step:begin -->
| stale | table |
<!-- bench:sft_step:end -->

More hand text after the table.

<!-- bench:rm_step:begin -->
stale rm table
<!-- bench:rm_step:end -->
"""


def strip_generated(doc: str) -> str:
    import re

    return re.sub(
        r"<!-- bench:(\w+):begin -->.*?<!-- bench:\1:end -->", "[$1]", doc, flags=re.DOTALL
    )


def test_run_all_from_json_fills_sections_and_keeps_hand_written_text(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "sft_step.json").write_text(json.dumps(SFT))
    (results / "rm_step.json").write_text(json.dumps(SFT | {"benchmark": "rm_step"}))  # stale
    (results / "decode.json").write_text(json.dumps(DECODE))
    (results / "run_all.json").write_text(json.dumps(MANIFEST))
    doc = tmp_path / "performance.md"
    doc.write_text(DOC)
    argv = [
        "--from-json",
        "--results",
        str(results),
        "--doc",
        str(doc),
        "--only",
        "sft_step,rm_step,decode,dpo_step",
    ]
    assert run_all.main(argv) == 0
    out = doc.read_text()

    # Outside the markers nothing changed; decode's missing markers were appended at the end;
    # dpo_step (no JSON, not in the manifest) got no section.
    assert strip_generated(out) == strip_generated(DOC).rstrip("\n") + "\n\n[$1]\n"
    assert "bench:dpo_step" not in out
    sections = dict(
        (m.group(1), m.group(2))
        for m in __import__("re").finditer(
            r"<!-- bench:(\w+):begin -->\n(.*?)\n<!-- bench:\1:end -->", out, flags=16
        )
    )
    assert set(sections) == {"machine", "sft_step", "rm_step", "decode"}
    sft = sections["sft_step"]
    assert (
        "| 7m | jaxalign | 7.15 | 500.0 | 4,096 | 1.05 | 1.05 | 50.0 | 2.0 | 0.8 | 1,500 |" in sft
    )
    assert "| 7m | pytorch | 7.15 | 525.0 | 3,901 | 1.00 |" in sft
    assert "`python bench/sft_step.py --sizes 7m`" in sft and "exit code 0, 100 s" in sft
    assert "31.9 MFLOP/token" in sft and "218.6 GFLOP/s" in sft
    # A failed run's stale JSON is not shown as this run's result.
    assert "stale" not in sections["rm_step"] and "No results" in sections["rm_step"]
    assert "exit code 1" in sections["rm_step"]
    assert "| tiny | 0.9 | 8 | 64 | 5,000 | 2,500 | 2.00 |" in sections["decode"]
    machine = sections["machine"]
    assert "2 x AMD EPYC" in machine and "23.5 GiB" in machine and "jax 0.10.2" in machine
    assert "before: 0.50, after: 1.25" in machine and "10.0 minutes" in machine

    # Regenerating is idempotent.
    assert run_all.main(argv) == 0
    assert doc.read_text() == out


def test_replace_section_only_touches_its_own_markers():
    doc = (
        "a\n<!-- bench:x:begin -->\n1\n<!-- bench:x:end -->\nb\n<!-- bench:y:begin -->\n2\n"
        "<!-- bench:y:end -->\nc\n"
    )
    out = run_all.replace_section(doc, "x", "new $1 \\1")  # no regex escapes leak in
    assert out == doc.replace("\n1\n", "\nnew $1 \\1\n")


def test_chunked_loss_never_holds_the_full_float32_logits():
    """With loss.vocab_chunks = c the loss and its gradient keep 1/c of the f32 [tokens, V]
    logits (and their gradient) alive at a time: XLA's temporary memory shrinks as 1/c, plus the
    hidden states and their gradient laid out in chunk order (strided chunks: chunk i holds
    every c-th token of a row, issue #26), 2 x [tokens, D] f32, whatever c is."""
    import jax
    import jax.numpy as jnp

    from jaxalign.losses import token_cross_entropy_sum

    n, d, v = 1024, 64, 4096
    full_logits = n * v * 4
    hidden, w_out = jnp.full((1, n, d), 0.01), jnp.full((d, v), 0.01)
    targets, mask = jnp.zeros((1, n), jnp.int32), jnp.ones((1, n))

    def temp_bytes(chunks: int) -> int:
        def loss(h, w):
            return token_cross_entropy_sum(h, w, targets, mask, chunks=chunks)[0]

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return step.lower(hidden, w_out).compile().memory_analysis().temp_size_in_bytes

    unchunked = temp_bytes(1)
    assert unchunked >= 2 * full_logits  # logits and their gradient
    for chunks in (4, 8):
        assert temp_bytes(chunks) <= 1.1 * unchunked / chunks + 2 * n * d * 4


# The suite's LLVM -O0 (tests/conftest.py) for the smoke runs below: they check the scripts'
# plumbing and arithmetic, not their speed, and their few timed steps cost less than compiling.
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"


@pytest.mark.slow
def test_gpu_script_cpu_smoke_runs_without_grain_and_reports_consistent_numbers(tmp_path):
    """bench/gpu_step.py --cpu-smoke (what bench/gpu.sh runs, on a tiny model on CPU) with Grain
    made unimportable, as on the GPU image."""
    out = tmp_path / "gpu.json"
    code = (
        "import sys, runpy; sys.modules['grain'] = None; "
        f"sys.argv = ['gpu_step.py', '--cpu-smoke', '--json', {str(out)!r}]; "
        f"runpy.run_path({str(ROOT / 'bench/gpu_step.py')!r}, run_name='__main__')"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "JAXALIGN_COMPILATION_CACHE": "off",
        "XLA_FLAGS": SMOKE_XLA_FLAGS,
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    (sft,) = data["sft"]  # one kernel on CPU: einsum
    assert (sft["attention"], sft["attention_kernel"]) == ("einsum", "einsum")
    import gpu_step

    from jaxalign.config import ModelConfig
    from jaxalign.metrics import train_flops_per_token

    model = ModelConfig(**gpu_step.MODELS["smoke"])
    assert (sft["batch_size"], sft["seq_len"], sft["tokens_per_step"]) == (2, 96, 192)
    assert sft["attention_query_block"] == 64  # auto on CPU: two query blocks of T = 96
    assert sft["flops_per_token"] == train_flops_per_token(model, 96)
    assert sft["tokens_per_s"] == pytest.approx(192 / sft["step_s"])
    assert sft["mfu_vs_measured"] == pytest.approx(
        sft["tokens_per_s"] * sft["flops_per_token"] / data["measured_matmul_peak_flops"]
    )
    assert 0 < sft["mfu_vs_measured"] < 1.5 and 2.0 < sft["loss"] < 8.0  # ~log(256) = 5.5
    (decode,) = data["decode"]
    assert (decode["batch"], decode["new_tokens"]) == (2, 4)
    assert decode["tokens_per_s"] == pytest.approx(2 * 4 / decode["seconds"])
    assert data["card_peak_flops"] is None and data["platform"] == "cpu"
    assert "torch" not in data["machine"]["versions"]  # never loaded next to jax's CUDA libs


def test_gpu_check_cpu_smoke_compares_the_attention_kernels(tmp_path):
    """bench/gpu_check.py (the cuDNN-vs-einsum check bench/gpu.sh runs first) on CPU, where the
    XLA implementation stands in for cuDNN: every error is reported and small, nothing fails."""
    out = tmp_path / "check.json"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu-smoke", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["failures"] == [] and [r["window"] for r in data["attention"]] == [None, 16]
    for row in data["attention"]:
        assert set(row["cudnn"]) == {"out", "dq", "dk", "dv"}
        assert all(0 < err < 1e-2 for err in row["cudnn"].values())  # bf16 rounding, not zero
    assert data["model"]["grads"] < 1e-2


def test_decode_floor_matches_a_hand_count():
    """bench/decode.py's lower bound on a call's time, recomputed from the shapes by hand: the
    prefill's FLOPs at the peak, then per step the longer of the weight read and the FLOPs."""
    import decode

    m = {
        "vocab_size": 100,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
    }
    # Per layer: q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16 -> 192 + 384 = 576 weights.
    layer, head = 2 * 576, 100 * 8
    batch, prompt, new = 3, 5, 4
    peak, bandwidth = 1e6, 1e5
    prefill = 2 * batch * prompt * layer + 2 * batch * head + 2 * (2 * batch * prompt**2 * 8)
    expected = prefill / peak
    for t in range(new - 1):
        flops = 2 * batch * (layer + head) + 2 * 4 * batch * (prompt + t + 1) * 8
        expected += max(4 * (layer + head) / bandwidth, flops / peak)
    got = decode.decode_floor_s(m, batch, prompt, new, peak, bandwidth)
    assert abs(got - expected) < 1e-12 * expected
    # With a vast bandwidth the floor is the FLOPs alone; with a slow one, the weight reads.
    fast = decode.decode_floor_s(m, batch, prompt, new, peak, 1e30)
    slow = decode.decode_floor_s(m, batch, prompt, new, 1e30, bandwidth)
    assert fast < got and slow < got
    assert abs(slow - (new - 1) * 4 * (layer + head) / bandwidth) < 1e-9 * slow
    # bf16 weights: half the bytes per decode step.
    half = decode.decode_floor_s(m, batch, prompt, new, 1e30, bandwidth, bytes_per_param=2)
    assert abs(half - slow / 2) < 1e-9 * slow


@pytest.mark.slow
def test_sft_step_through_cli_times_the_train_loop_in_turns_with_the_isolated_step(tmp_path):
    """bench/sft_step.py --through-cli on the tiny size: a `jaxalign train` side that really
    trains (jaxalign.train on the bundled SFT data), with its ratio to the isolated step."""
    out = tmp_path / "sft.json"
    argv = ["--sizes", "tiny", "--through-cli", "--baseline", "none", "--allocator", "glibc"]
    argv += ["--steps", "2", "--repeats", "2", "--json", str(out)]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "JAXALIGN_COMPILATION_CACHE": "off",
        "XLA_FLAGS": SMOKE_XLA_FLAGS,
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/sft_step.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == {"jaxalign", "jaxalign train"}
    step, loop = rows["jaxalign"], rows["jaxalign train"]
    assert loop["steps"] == step["steps"] == 2 and len(loop["step_times_s"]) == 2
    assert loop["ratios_vs_step_per_repeat"] == pytest.approx(
        [a / b for a, b in zip(step["step_times_s"], loop["step_times_s"], strict=True)]
    )
    assert loop["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / loop["step_s"])
    assert 2.0 < loop["samples"][-1]["loss"] < 8.0  # step 1 of the run, logged: ~log(512)
    import common

    table = common.step_markdown({"results": [result]})
    assert f"| {loop['ratio_vs_step']:.2f} |" in table.splitlines()[3]  # the `x step` column
