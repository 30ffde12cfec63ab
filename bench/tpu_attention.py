"""Attention memory on a TPU, from the TPU compiler on this host: einsum vs splash attention.

    python bench/tpu_attention.py                          # v5p-8, Llama-3-8B heads, T = 4096
    python bench/tpu_attention.py --seq-lens 4096,8192 --rows-per-device 1

Compiles one layer's attention, forward and backward (the gradient of q, k and v), for each
`model.attention_kernel` on a TPU topology (libtpu's compiler; no TPU needed: `JAX_PLATFORMS=cpu`)
with bf16 q/k/v of Llama-3-8B's attention (32 query heads, 8 K/V heads, head_dim 128), the batch
sharded over every chip (`--rows-per-device` rows each), under jaxalign's activation rules, and
reports `memory_analysis()` per device. FLOPs are not compared: `cost_analysis()` does not count
the work inside a Pallas kernel (a Mosaic custom call), only the XLA ops around it. About 35 s of
compiling per kernel and length on a 2-core host. JSON: `--json` (default
bench/results/tpu_attention.json).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import write_json  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxalign import sharding as shd  # noqa: E402
from jaxalign.config import MeshConfig, ModelConfig, ShardingConfig  # noqa: E402
from jaxalign.models.llama import causal_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tpu_attention.json"
# name -> get_topology_desc arguments (MaxText's train_compile.py values)
TOPOLOGIES = {
    "v5p-8": dict(topology_name="v5:2x2x1", chip_config_name="megacore", wrap=(False,) * 3),
    "v5e-4": dict(topology_name="v5e:2x2", chip_config_name="default", wrap=(False,) * 3),
}
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def compile_attention(kernel: str, seq_len: int, rows_per_device: int, devices) -> dict:
    """Compile the gradient of sum(attention(q, k, v)) for `kernel`; per-device bytes."""
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    rules = shd.resolve_rules(ShardingConfig())
    cfg = ModelConfig(
        vocab_size=8,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=8,
        num_layers=1,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        dtype="bfloat16",
        attention_kernel=kernel,
        attention_query_block=0,
    )

    def loss(q, k, v, segment_ids):
        with shd.activation_sharding(mesh, rules):
            out = causal_attention(q, k, v, segment_ids, cfg)
            return jnp.sum(out.astype(jnp.float32))

    batch = rows_per_device * len(devices)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [
        jax.ShapeDtypeStruct((batch, seq_len, n, HEAD_DIM), jnp.bfloat16, sharding=rows)
        for n in (HEADS, KV_HEADS, KV_HEADS)
    ] + [jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows)]
    start = time.time()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    memory = compiled.memory_analysis()
    return {
        "kernel": kernel,
        "seq_len": seq_len,
        "rows_per_device": rows_per_device,
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "compile_s": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-8", choices=sorted(TOPOLOGIES))
    parser.add_argument("--seq-lens", default="4096")
    parser.add_argument("--rows-per-device", type=int, default=1)
    parser.add_argument("--kernels", default="einsum,splash")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    devices = topologies.get_topology_desc(
        platform="tpu", chips_per_host_bounds=(2, 2, 1), num_slices=1, **TOPOLOGIES[args.topology]
    ).devices
    rows = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for kernel in args.kernels.split(","):
            row = compile_attention(kernel, seq_len, args.rows_per_device, devices)
            rows.append(row)
            print(
                f"{args.topology} T={seq_len} {kernel:>6}: temporaries "
                f"{row['temp_bytes'] / 2**30:.3f} GiB, arguments "
                f"{row['argument_bytes'] / 2**30:.3f} GiB per device ({row['compile_s']} s)"
            )
    write_json(
        args.json,
        {
            "topology": args.topology,
            "device_kind": devices[0].device_kind,
            "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
            "dtype": "bfloat16",
            "jax": jax.__version__,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
