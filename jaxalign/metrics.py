"""Model FLOPs, a measured matmul peak, and the metrics writers (JSONL, TensorBoard, W&B)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.config import ModelConfig
from jaxalign.paths import LocalMirror, is_remote, open_append, run_path


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, and without the input embedding (what matmuls touch): a Llama
    block's per layer, plus what the family adds (`ModelFamily.extra_layer_params`)."""
    from jaxalign.models.registry import get_family

    d, f, h, kv, hd = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.resolved_head_dim,
    )
    attn = d * h * hd * 2 + d * kv * hd * 2
    if cfg.attention_bias:
        attn += (h + 2 * kv) * hd
    if cfg.attention_out_bias:
        attn += d
    mlp = 3 * d * f + ((2 * f + d) if cfg.mlp_bias else 0)
    block = attn + mlp + 2 * d + (2 * hd if cfg.qk_norm else 0)
    extra = get_family(cfg.family).extra_layer_params
    block += extra(cfg) if extra is not None else 0
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    total = embed + cfg.num_layers * block + d + head
    return {"total": total, "non_embedding": total - embed + (embed if cfg.tie_embeddings else 0)}


def moe_param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: `total` (memory), `active` (what one token's forward touches, without
    the input embedding: for FLOPs)."""
    dense_counts = param_count(cfg)  # every layer with a dense intermediate_size MLP
    d, e, k = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    dense_mlp = 3 * d * cfg.intermediate_size
    expert = 3 * d * cfg.resolved_moe_intermediate_size
    total = dense_counts["total"] + moe_layers * (d * e + e * expert - dense_mlp)
    active = dense_counts["non_embedding"] + moe_layers * (d * e + k * expert - dense_mlp)
    return {"total": total, "active": active}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters, plus causal attention scores and values
    (forward 2 x 2 x T/2 x H x hd per layer, x3 for forward+backward)."""
    n = param_count(cfg)["non_embedding"]
    attn = 3 * 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len / 2
    return 6.0 * n + attn


def matmul_params(cfg: ModelConfig) -> int:
    """The parameters one token's forward multiplies by: all but the input embedding (with a
    mixture of experts only the k routed experts of each MoE layer, and the router)."""
    if cfg.num_experts:
        return moe_param_count(cfg)["active"]
    return param_count(cfg)["non_embedding"]


def lora_adapter_params(cfg: ModelConfig) -> int:
    """The LoRA adapter parameters one token's forward multiplies by: r x (d_in + d_out) per
    adapted projection and layer (an embedding's adapter: its B, r x D; in a MoE layer the k
    routed experts' adapters); 0 without `model.lora`."""
    if cfg.lora is None:
        return 0
    from jaxalign.models.lora import path_matcher

    is_target = path_matcher([cfg.lora.targets])
    d, hd, r = cfg.hidden_size, cfg.resolved_head_dim, cfg.lora.rank
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d)}
    total = 0
    for i in range(cfg.num_layers):
        layer = "blocks/" if cfg.scan_layers else f"blocks/{i}/"
        moe = cfg.num_experts and cfg.is_moe_layer(i)
        f = cfg.resolved_moe_intermediate_size if moe else cfg.intermediate_size
        uses = cfg.num_experts_per_tok if moe else 1
        mlp = {"w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
        total += sum(r * (a + b) for n, (a, b) in attn.items() if is_target(f"{layer}attn/{n}"))
        total += uses * sum(
            r * (a + b) for n, (a, b) in mlp.items() if is_target(f"{layer}mlp/{n}")
        )
    if is_target("embed"):
        total += r * d
    if not cfg.tie_embeddings and is_target("lm_head"):
        total += r * (d + cfg.vocab_size)
    return total


def model_flops_per_token(cfg: ModelConfig, seq_len: int, trained: bool = True) -> float:
    """Model FLOPs per token (the MFU numerator) of a forward and backward pass through `cfg`'s
    model (`trained=False`: a forward pass only, e.g. DPO's reference), counted without remat's
    recomputation; the same for the train loop's logged MFU and bench/tpu_compile.py's.

    A weight costs 2 FLOPs per token forward, and backward 2 for its input gradient plus 2 for
    its own gradient when it trains: 6 per trained weight, 4 per frozen one (a LoRA base: its
    input gradients flow to the adapters below; `lora.train` patterns that name `lm_head` train
    the output head). Attention's scores and values (no weights) cost 3 x their forward. The
    family's `flops_per_token` (6 x `matmul_params` + attention: MoE's active experts, Gemma's
    sliding windows) gives the all-trained count; LoRA adapters add 6 x `lora_adapter_params`."""
    from jaxalign.models.registry import get_family

    everything = get_family(cfg.family).flops_per_token(cfg, seq_len)
    n = matmul_params(cfg)
    attention = everything - 6.0 * n
    if not trained:
        return 2.0 * n + attention / 3
    if cfg.lora is None:
        return everything
    from jaxalign.models.lora import path_matcher

    frozen = n
    if not cfg.tie_embeddings and path_matcher(cfg.lora.train)("lm_head"):
        frozen -= cfg.hidden_size * cfg.vocab_size
    return everything - 2.0 * frozen + 6.0 * lora_adapter_params(cfg)


def measure_matmul_peak(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured FLOP/s of one square matmul on the first device (a practical peak)."""
    x = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


class MetricsWriter:
    """Writes one JSON object per log step to RUN_DIR/metrics.jsonl (+ TensorBoard, W&B).

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = run_path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._tb_mirror = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_append(self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # Events for a gs:// run go to a local directory copied there every 30 s: tensorboardX's
            # own GCS writer uploads again when garbage-collected, after the run has ended.
            tb_dir = self.path.parent / "tensorboard"
            self._tb_mirror = LocalMirror(tb_dir) if is_remote(tb_dir) else None
            self._tb = SummaryWriter(str(self._tb_mirror.local if self._tb_mirror else tb_dir))
        if wandb_project:
            import wandb  # optional extra

            local_dir = None if is_remote(run_dir) else str(run_dir)  # W&B's files stay local
            self._wandb = wandb.init(project=wandb_project, config=config, dir=local_dir)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk or a directory that went away: one line, no traceback
            from jaxalign.errors import UserError

            raise UserError(
                f"{self.path}: cannot write the metrics of step {step} "
                f"({e.strerror or e}); earlier lines and checkpoints are kept"
            ) from e
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._tb_mirror is not None and self._tb_mirror.due():
            self._tb.flush()
            self._tb_mirror.sync()
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._tb_mirror is not None:
            self._tb_mirror.close()
        if self._wandb is not None:
            self._wandb.finish()


def plain_metric(value: Any) -> float | list[float]:
    """A metric as JSON has it: a float, or a list of floats for a vector metric (a MoE's
    per-expert load)."""
    if getattr(value, "ndim", 0) == 0:
        return float(value)
    return [float(v) for v in value.reshape(-1)]


def _plain(value: Any) -> Any:
    try:
        return (
            float(value) if getattr(value, "ndim", 0) == 0 and not isinstance(value, str) else value
        )
    except (TypeError, ValueError):
        return value
