"""GPU correctness check: cuDNN flash attention (`model.attention_kernel: cudnn`) against the einsum
attention, on the device, in bfloat16.

    python bench/gpu_check.py [--json OUT/gpu_check.json]

For packed rows (two segments and padding in one row, one plain row), grouped-query heads and a
sliding window or none: the attention output and the gradients of a scalar loss with respect to
q, k and v, each from the cudnn kernel and from the einsum kernel in bfloat16, against the einsum
kernel in float32 on the same (bf16-rounded) inputs: relative error ||x - ref|| / ||ref||. The
cudnn kernel passes when its error is at most 2e-2 and at most twice the bf16 einsum kernel's plus
1e-3 (bf16 rounding alone lands between 1e-3 and 1e-2). Then the same for a whole model: the
logits and the loss gradient of a small Llama in bfloat16 built with each kernel from the same
parameters. tests/test_config_sharding.py checks the same call's semantics on CPU (through
`jax.nn.dot_product_attention`'s XLA implementation); this runs the cuDNN one. Exits 1 if a check
fails. Installs nothing. `--cpu-smoke` runs the plumbing on CPU with smaller shapes and the
XLA implementation in place of cuDNN's (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(batch=2, length=512, heads=32, kv_heads=8, head_dim=64)
MODEL = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    dtype="bfloat16",
    param_dtype="float32",
)


def rel(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def attention_errors(window) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models.llama import blocked_causal_attention, cudnn_causal_attention

    b, t, h, kv, hd = (SHAPE[k] for k in ("batch", "length", "heads", "kv_heads", "head_dim"))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.bfloat16) for n in (h, kv, kv))
    first = np.repeat([1, 2, 0], [t // 2, t // 4, t - t // 2 - t // 4])  # two segments + padding
    segments = jnp.asarray(np.stack([first, np.ones(t, int)]), jnp.int32)
    probe = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)

    def run(kernel, dtype):
        def loss(q, k, v):
            q, k, v = (x.astype(dtype) for x in (q, k, v))
            if kernel == "cudnn":
                out = cudnn_causal_attention(q, k, v, segments, window)
            else:
                out = blocked_causal_attention(q, k, v, segments, 0, window)
            out = out.astype(jnp.float32)
            return jnp.sum(out * probe), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v
        )
        return jax.device_get((out, grads))

    ref = run("einsum", jnp.float32)
    row = {"window": window}
    for kernel in ("cudnn", "einsum"):
        out, grads = run(kernel, jnp.bfloat16)
        row[kernel] = {
            "out": rel(out, ref[0]),
            **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref[1], strict=True)},
        }
    return row


def model_errors() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxalign.config import load_config
    from jaxalign.losses import target_logprobs
    from jaxalign.models.llama import Transformer

    def build(kernel):
        cfg = load_config(None, [f"model.attention_kernel={kernel}"], base={"model": MODEL})
        return nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))

    graphdefs = {k: build(k)[0] for k in ("cudnn", "einsum")}
    _, abstract = build("einsum")
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32),
        abstract.to_pure_dict(),
    )
    t = 256
    tokens = jnp.asarray(rng.integers(0, MODEL["vocab_size"], (2, t)), jnp.int32)
    segments = jnp.asarray(np.stack([np.repeat([1, 2], [150, t - 150]), np.ones(t, int)]))
    positions = jnp.asarray(np.stack([np.r_[np.arange(150), np.arange(t - 150)], np.arange(t)]))

    def run(kernel):
        def loss(params):
            model = nnx.merge(graphdefs[kernel], params)
            hidden = model(tokens, positions, segments)
            logps, _ = target_logprobs(hidden[:, :-1], model.output_weight(), tokens[:, 1:])
            return -jnp.mean(logps), model.logits(hidden).astype(jnp.float32)

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return jax.device_get((logits, grads))

    cudnn, einsum = run("cudnn"), run("einsum")
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    return {"logits": rel(cudnn[0], einsum[0]), "grads": rel(flat(cudnn[1]), flat(einsum[1]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="CPU, small shapes, XLA in place of cuDNN"
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        import functools
        import os

        os.environ["JAX_PLATFORMS"] = "cpu"
        from jaxalign.models import llama

        llama.cudnn_causal_attention = functools.partial(
            llama.cudnn_causal_attention, implementation="xla"
        )
        SHAPE.update(length=64, heads=4, kv_heads=2, head_dim=16)
        MODEL.update(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2)
    import jax

    device = jax.devices()[0]
    print(f"device: {getattr(device, 'device_kind', device.platform)} ({device.platform})")
    failures = []
    rows = []
    for window in (None, SHAPE["length"] // 4):
        row = attention_errors(window)
        rows.append(row)
        for name, err in row["cudnn"].items():
            limit = min(2e-2, 2 * row["einsum"][name] + 1e-3)
            ok = err <= limit
            print(
                f"attention window={window} {name:>3}: cudnn {err:.2e}, einsum bf16 "
                f"{row['einsum'][name]:.2e} (vs f32 einsum) {'ok' if ok else 'FAIL'}",
                flush=True,
            )
            if not ok:
                failures.append(f"window={window} {name}")
    model = model_errors()
    print(
        f"bf16 model, cudnn vs einsum: logits {model['logits']:.2e}, grads {model['grads']:.2e}",
        flush=True,
    )
    if model["logits"] > 2e-2 or model["grads"] > 5e-2:
        failures.append("model")
    result = {
        "device": getattr(device, "device_kind", device.platform),
        "jax": jax.__version__,
        "shape": SHAPE,
        "attention": rows,
        "model": model,
        "failures": failures,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("gpu_check:", "FAIL " + ", ".join(failures) if failures else "all ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
