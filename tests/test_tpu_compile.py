"""`jaxalign plan --compile`: the run's real programs compiled by XLA's TPU compiler (libtpu)
for TPU topologies on this CPU host. Each libtpu compile of a tiny step takes 20-30 s, so the
module compiles three programs in all: SFT (through the CLI) on v5e-4, DPO on v5p-8 and one
that does not fit, the last two of the tiny configs with one layer (the programs' structure, at
a fraction of the compile time)."""

from __future__ import annotations

import json
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import aot, cli, hlo, topology
from jaxalign.config import load_config
from jaxalign.errors import ConfigError

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(), reason="libtpu (jax[tpu]) is not installed"
)


@pytest.fixture(scope="module")
def v5e_4():
    if not topology.libtpu_available():
        pytest.skip("libtpu (jax[tpu]) is not installed")
    return topology.topology_devices("v5e-4")


@pytest.fixture(scope="module")
def sft_json(v5e_4):
    """`jaxalign plan configs/sft_tiny.yaml --compile --topology v5e-4 --json`'s object."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(
            ["plan", "configs/sft_tiny.yaml", "--compile", "--topology", "v5e-4", "--json"]
        )
    return code, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def dpo_v5p_8():
    cfg = load_config("configs/dpo_tiny.yaml", ["model.num_layers=1"])
    if not topology.libtpu_available():
        pytest.skip("libtpu (jax[tpu]) is not installed")
    devices = topology.topology_devices("v5p-8")
    lowered, trainer = aot.lower_train_step(cfg, devices)
    compiled = lowered.compile()
    report = aot.report(compiled, "train_step", aot.device_hbm_bytes(devices))
    return report, trainer, compiled.as_text()


def test_topology_names_map_to_maxtext_arguments():
    v5p = topology.parse_topology("v5p-64")
    assert (v5p.topology_name, v5p.chip_config_name, v5p.wrap) == (
        "v5:2x4x4",
        "megacore",
        (False, False, False),
    )
    assert v5p.num_devices == 32 and v5p.chip.hbm_bytes == 95 * topology.GIB
    v5e = topology.parse_topology("v5e-256")
    assert (v5e.topology_name, v5e.wrap) == ("v5e:16x16", (True, True, False))
    assert topology.parse_topology("v5e-128").wrap == (False, True, False)
    assert topology.parse_topology("v4-128").wrap == (True, True, True)
    assert topology.parse_topology("v6e-256").chip.name == "v6e"
    two = topology.parse_topology("2xv5p-64")
    assert two.num_slices == 2 and two.num_devices == 64
    with pytest.raises(ConfigError, match="unknown TPU slice 'v5p-63'; known: .*v5e-256"):
        topology.parse_topology("v5p-63")


def test_sft_compiles_and_fits_on_v5e_4(sft_json):
    code, out = sft_json
    train = out["programs"]["train_step"]
    assert code == 0
    assert train["fits"] is True and train["hbm_bytes"] == 16 * topology.GIB
    assert 0 < train["peak_bytes"] <= train["hbm_bytes"]
    # 4 layers of attention and MLP over 16 rows of 256 tokens: at least 6 x params x tokens
    # / 4 devices of matmul work; XLA's own count (every op, no loops here) is a bit above.
    assert 0.95 * train["xla_flops"] < train["flops"] <= train["xla_flops"]
    assert len(train["largest_buffers"]) == 10


def _sharded_bytes(tree) -> int:
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
    )


def test_dpo_argument_bytes_are_the_shardings_bytes(dpo_v5p_8):
    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import batch_sharding

    report, trainer, compiled_text = dpo_v5p_8
    assert report.fits is True and report.hbm_bytes == 95 * topology.GIB
    batch = [
        jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=batch_sharding(trainer.mesh, trainer.rules, v.ndim)
        )
        for v in DPO.abstract_batch(trainer.cfg).values()
    ]
    leaves = jax.tree.leaves((trainer.abstract_state, batch, trainer.frozen))
    expected = sorted(tuple(x.sharding.shard_shape(x.shape)) for x in leaves)
    # The program's arguments per device are the shards the shardings imply: the policy, its
    # AdamW moments and the frozen reference split over 4 chips, the batch rows over them too.
    # (jit drops arguments the step never reads: DPO's `margin`, the reference's copy of a
    # tied embedding.)
    params = hlo.entry_parameters(compiled_text)
    unread = Counter(expected) - Counter(tuple(hlo.array_dims(t)[1]) for t in params)
    assert not Counter(tuple(hlo.array_dims(t)[1]) for t in params) - Counter(expected)
    assert sum(unread.values()) <= 2 and len(params) > 40
    # XLA's argument bytes are those shards' bytes, in the TPU's tiled layout (the two most
    # minor dimensions rounded up to whole tiles, e.g. 8 x 128).
    assert report.argument_bytes == sum(hlo.padded_bytes(t) for t in params)
    assert sum(hlo.array_bytes(t) for t in params) >= aot.state_shard_bytes(trainer.abstract_state)
    assert report.alias_bytes >= aot.state_shard_bytes(trainer.abstract_state) * 0.99  # donated


def test_scanned_flops_equal_unrolled_flops(v5e_4):
    """cost_analysis counts a loop body once; `hlo_flops` multiplies it by the trip count."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(v5e_4), ("x",))
    w = jax.ShapeDtypeStruct((6, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))

    def scanned(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0].sum()

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x.sum()

    counts = {}
    for fn in (scanned, unrolled):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(w, x).compile()
        counts[fn.__name__] = (hlo.hlo_flops(compiled.as_text())[0], compiled.cost_analysis())
    per_matmul = 2 * 128 * 256 * 256  # a [128, 256] x [256, 256] product per device
    assert counts["unrolled"][0] == counts["scanned"][0] == 6 * 3 * per_matmul
    assert counts["scanned"][1]["flops"] < counts["scanned"][0] / 2  # the body once


def test_auto_settings_resolve_for_the_mesh_platform(v5e_4):
    from jaxalign import sharding as shd
    from jaxalign.models import build
    from jaxalign.models.auto import target_platform
    from jaxalign.models.llama import resolve_query_block
    from jaxalign.models.params import build_model

    cfg = load_config("configs/sft_tiny.yaml")
    rules = shd.resolve_rules(cfg.sharding)
    built = []

    def make(rngs):
        model = build(cfg.model, rngs)
        built.append(model.cfg.attention_query_block)
        return model

    for devices in (v5e_4, jax.devices()[:4]):
        build_model(cfg, shd.make_mesh(cfg.mesh, devices), rules, make)
    assert built == [0, 64]  # TPU: one fused attention; CPU (this process's backend): 64
    with target_platform(shd.make_mesh(cfg.mesh, v5e_4)):
        assert resolve_query_block("auto") == 0
    assert resolve_query_block("auto") == 64


@needs_libtpu
def test_program_over_hbm_is_one_line_and_exit_1(capsys):
    code = cli.main(
        [
            "plan",
            "configs/sft_tiny.yaml",
            "--compile",
            "--topology",
            "v5e-4",
            "--set",
            "train.batch_size=4096",
            "--set",
            "train.seq_len=4096",
            "--set",
            "model.num_layers=1",  # one layer compiles faster and is already far too big
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: train_step: does not fit")
    # XLA's own numbers: 4096 rows of 4096 tokens need tens of GB of temporaries per device
    # (splash attention, `auto` on TPU, never holds the [T, T] scores), far above the HBM.
    need = re.search(r"need ([\d.]+)GB per device, HBM available 15.75GB$", err[0])
    assert need and float(need.group(1)) > 2 * 15.75


def test_rl_rollout_generate_holds_the_kv_cache_and_the_update_step_lowers():
    """On the local (CPU) devices: the rollout's generate program (prefill, then the decode
    loop), whose temporaries hold the KV cache of its rows; and GRPO's update step over an
    abstract rollout buffer, lowered (its batch has every key the loss reads)."""
    from jaxalign import plan
    from jaxalign import sharding as shd

    # One layer: the programs' structure, at a fraction of the compile time.
    cfg = load_config("configs/grpo_tiny.yaml", ["model.num_layers=1"])
    lowered, trainer = aot.lower_train_step(cfg, jax.devices())
    assert "advantages" in lowered.args_info[0][1]
    generate = aot.compile_program(
        "rollout_generate", aot.lower_rollout_generate(cfg, trainer), None
    )
    sizes = shd.axis_sizes(cfg.mesh, len(jax.devices()))
    kv_cache = plan.rollout_kv_cache_bytes(cfg, sizes, shd.resolve_rules(cfg.sharding))
    assert generate.temp_bytes >= kv_cache > 0
    policy = aot.state_shard_bytes(trainer.abstract_state["params"])
    assert generate.argument_bytes >= policy  # the policy's parameters, as the trainer shards them
    assert generate.flops > 0
    assert generate.unknown_trip_counts == 1  # the decode loop stops when every row has
