"""The dropless experts' grouped matmul on TPU, megablox against ragged_dot, compiled for one chip
of a TPU topology on this host (libtpu's compiler; no TPU needed): XLA's cost analysis (FLOPs and
bytes accessed, the Pallas kernels' own cost estimates included) and temporaries of one MoE
layer's experts, forward and backward (routing, sort, the three grouped projections, gather).

    python bench/moe_kernel_compile.py                         # Qwen3-30B-A3B's layer shape
    python bench/moe_kernel_compile.py --tokens 1024 --hidden 256 --width 256 --experts 8 --top-k 2

Defaults: 4,096 tokens per device, hidden 2048, expert width 768, 16 experts (Qwen3-30B-A3B's
128 over mesh.expert=8), top-8, bfloat16. Used for `moe_kernel: auto` (docs/performance.md,
"Megablox"). Each compile takes minutes on a 2-core host.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import topology
from jaxalign.models import auto, moe


def compile_experts(kernel: str, devices, n: int, d: int, f: int, e: int, k: int) -> dict:
    """Cost analysis of grad(mean(experts(x)^2)) for x [n, d] and experts [e, d, f] x 3."""

    def loss(x, router, w_gate, w_up, w_down):
        weights, experts, _ = moe.route(x @ router, k, True)
        y = moe.dropless_experts(x, experts, weights, w_gate, w_up, w_down, jax.nn.silu, kernel)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    one = NamedSharding(Mesh(devices[:1], ("x",)), P())
    shapes = ((n, d), (d, e), (e, d, f), (e, d, f), (e, f, d))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=one) for s in shapes]
    start = time.perf_counter()
    with auto.platform_named("tpu"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(*args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "kernel": kernel,
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "mosaic_kernels": compiled.as_text().count("tpu_custom_call"),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e-4")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args()
    devices = topology.topology_devices(args.topology)
    shape = (args.tokens, args.hidden, args.width, args.experts, args.top_k)
    grouped = 18 * args.tokens * args.top_k * args.hidden * args.width  # 3 projections x 3 x 2
    for kernel in ("megablox", "ragged_dot"):
        row = compile_experts(kernel, devices, *shape)
        row["flops_over_grouped"] = round(row["flops"] / grouped, 2)
        print(json.dumps({"topology": args.topology, "shape": shape, **row}), flush=True)


if __name__ == "__main__":
    main()
