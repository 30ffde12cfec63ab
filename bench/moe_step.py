"""Mixture-of-experts train-step throughput: jaxalign's Qwen3-MoE step vs PyTorch + transformers'
`Qwen3MoeForCausalLM` step, and vs a dense jaxalign model of equal active parameters, same run.

    python bench/moe_step.py                 # size moe50m: the three sides, in turns
    python bench/moe_step.py --no-ragged-dot        # without the ragged_dot side
    python bench/moe_step.py --repeats 7 --variant 'capacity:model.moe_capacity_factor=1.25'

Size `moe50m`: hidden 512, 8 layers, 8 heads / 4 KV heads (head_dim 64, QK-norm), vocab 16384,
8 experts of width 256 per layer, top-2 (renormalized): 48.3M parameters in all, 21.0M active
per token (without the input embedding); 8 rows of 256 tokens, f32. The dense side
(`dense_active`) is family llama with QK-norm (Qwen3's dense layout) and a 512-wide MLP: the same
attention and two experts' worth of MLP, so its active parameters equal the MoE's (less the
4K-parameter router per layer).

The JAX side is the SFT step users run (`Trainer.compile_step`: the next-token loss plus the
router's load-balancing loss through the aux-loss hook, clipping, AdamW, donated state), dropless
experts (`model.moe_kernel` auto: on CPU whole tiles per expert, `moe._tiled_swiglu`). The
baseline is transformers' Qwen3-MoE built from the same config (`hf.convert.moe_config_to_hf`;
its default experts implementation, reported), `model(input_ids, labels=...)` with
`output_router_logits=True` (so its loss includes the same aux loss), global-norm clipping,
`torch.optim.AdamW` with the same hyperparameters and schedule.
tokens/s counts every position; MFU counts 6 x active parameters + attention per token.

A fourth side, `ragged_dot`, runs the MoE step with the experts through `jax.lax.ragged_dot` as
on GPU (`--set model.moe_kernel=ragged_dot`): XLA's generic lowering, the one CPU gets,
multiplies every row by every expert's weights, which is why the CPU path is `_tiled_swiglu`.

Workers, allocators, turns and `--variant`: as bench/sft_step.py (one JAX worker per side,
interleaved repeats, ratios per repeat then the median).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sft_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MOE_50M = {
    "family": "qwen3_moe",
    "vocab_size": 16384,
    "hidden_size": 512,
    "intermediate_size": 512,  # unused: every layer is a MoE layer
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "head_dim": 64,
    "qk_norm": True,
    "rms_norm_eps": 1e-6,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": True,
}
SIZES = {"moe50m": {"model": MOE_50M, "batch_size": 8, "seq_len": 256}}
# The dense model of equal active parameters: two experts' width as one SwiGLU MLP.
DENSE_ACTIVE = (
    "dense_active:model.family=llama;model.num_experts=0;model.moe_intermediate_size=null;"
    f"model.intermediate_size={MOE_50M['num_experts_per_tok'] * MOE_50M['moe_intermediate_size']}"
)

# The experts through jax.lax.ragged_dot, as on TPU/GPU (on CPU: every row x every expert).
RAGGED_DOT = "ragged_dot:model.moe_kernel=ragged_dot"


def build_jax(args):
    """(trainer, state, batch, info): sft_step's side on the MoE config (or the dense variant),
    with parameters and FLOPs counted over the active parameters."""
    from jaxalign.metrics import moe_param_count, param_count
    from jaxalign.models.moe import moe_train_flops_per_token

    cfg = common.step_config(SIZES[args.size], args.set, common.scratch_dir("bench_moe_"), ROOT)
    trainer, state, batch, info = sft_step.build_jax(args, cfg)
    m = cfg.model
    if m.num_experts:
        counts = moe_param_count(m)
        info["params"] = counts["total"]
        info["active_params"] = counts["active"]
        info["flops_per_token"] = moe_train_flops_per_token(m, cfg.train.seq_len)
    else:
        info["active_params"] = param_count(m)["non_embedding"]
    info["model"]["family"] = m.family
    info["torch_build"] = {"batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len}
    if m.num_experts:  # the baseline is built from the MoE side's config.json
        from jaxalign.hf.convert import moe_config_to_hf

        info["torch_build"]["hf_config"] = moe_config_to_hf(m)
    return trainer, state, batch, info


def build_torch(cmd: dict, adamw: str):
    """The baseline: transformers' Qwen3MoeForCausalLM of the same config.json, trained as
    bench/sft_step.py trains Llama (its loss includes the router aux loss)."""
    import torch
    import transformers

    hf, b, t = dict(cmd["hf_config"]), cmd["batch_size"], cmd["seq_len"]
    hf.pop("architectures", None)
    hf.pop("torch_dtype", None)
    hf.pop("dtype", None)
    model_type = hf.pop("model_type")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **hf, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).train()
    opt, sched = common.torch_optimizer(model, adamw)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (b, t), generator=g)
    step = common.torch_train_step(
        model.parameters(),
        opt,
        sched,
        lambda: model(input_ids=x, labels=x, output_router_logits=True).loss,
    )
    info = {
        "adamw": adamw,
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return step, info


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    variants = [DENSE_ACTIVE, RAGGED_DOT]
    if "--no-ragged-dot" in argv:  # its step needs about 2 GiB more memory
        argv.remove("--no-ragged-dot")
        variants.remove(RAGGED_DOT)
    if "--worker" not in argv:
        for variant in variants:
            if not any(a.startswith(variant.split(":")[0] + ":") for a in argv):
                argv += ["--variant", variant]
    return common.step_main(__file__, __doc__, SIZES, "moe50m", build_jax, build_torch, argv)


if __name__ == "__main__":
    main()
