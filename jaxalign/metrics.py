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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters, plus causal attention scores and values
    (forward 2 x 2 x T/2 x H x hd per layer, x3 for forward+backward)."""
    n = param_count(cfg)["non_embedding"]
    attn = 3 * 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len / 2
    return 6.0 * n + attn


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
