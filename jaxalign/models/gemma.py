"""Gemma 2 and Gemma 3 (text): the Llama modules with a "sandwich" block.

What differs from Llama, and where it lives:
- each block normalizes the attention output and the MLP output too (`post_attn_norm`,
  `post_mlp_norm`) before the residual add: `GemmaBlock` below (`llama.Block`'s output hooks);
- alternating local (sliding-window) and global layers (`model.layer_types`), each layer with its
  own window and RoPE base (Gemma 3: `rope_local_theta` for local layers, `rope_theta` with
  `rope_linear_factor` for global ones): `llama.layer_windows` / `llama.layer_rope`, which
  `Transformer.forward` feeds to each layer (static per unrolled layer; under `scan_layers` as
  scanned per-layer arrays, so one compiled block serves both kinds);
- attention logit soft-cap, `query_pre_attn_scalar` and the final logit soft-cap: options of
  llama's attention kernels and of `Transformer.logits` / the losses, read from the config;
- Gemma 3's QK-norm, (1 + w) norms, sqrt(D)-scaled embeddings and the tied head: existing
  ModelConfig switches (`qk_norm`, `norm_plus_one`, `scale_embeddings`, `tie_embeddings`).

Both families register here; they share the module and differ in their Hugging Face converter
(`jaxalign/hf/convert.py`, model_type `gemma2` / `gemma3_text`).
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.hf.convert import GEMMA2_CONVERTER, GEMMA3_CONVERTER
from jaxalign.metrics import param_count
from jaxalign.models import llama
from jaxalign.models.registry import ModelFamily, register_family


class GemmaBlock(llama.Block):
    """Pre- and post-norm block: x + norm(attn(norm(x))), then x + norm(mlp(norm(x))) (the
    post-norms through `llama.Block`'s output hooks)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        pd = llama.DTYPES[cfg.param_dtype]
        norm_init = llama._zeros if cfg.norm_plus_one else llama._ones
        self.post_attn_norm = norm_init((cfg.hidden_size,), ("norm",), pd)
        self.post_mlp_norm = norm_init((cfg.hidden_size,), ("norm",), pd)

    def attn_out(self, attn: jax.Array) -> jax.Array:
        return self._post_norm(attn, self.post_attn_norm)

    def mlp_out(self, h: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, None]:
        return self._post_norm(self.mlp(h), self.post_mlp_norm), None

    def _post_norm(self, x: jax.Array, scale: nnx.Param) -> jax.Array:
        return llama.rms_norm(x, scale[...], self.cfg.rms_norm_eps, self.cfg.norm_plus_one)


class GemmaTransformer(llama.Transformer):
    """Gemma 2 / Gemma 3 text decoder."""

    block_class = GemmaBlock


def gemma_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters, plus attention scores and values over
    the keys each query sees (forward 2 x 2 x keys x H x hd per layer, x3 for forward+backward):
    on average (T + 1) / 2 keys in a global layer, fewer in a sliding-window layer."""
    n = param_count(cfg)["non_embedding"]
    keys = 0.0
    for window in llama.layer_windows(cfg):
        w = seq_len if window is None else min(window, seq_len)
        # sum over query index i of min(i + 1, w), divided by T
        keys += (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    return 6.0 * n + 3 * 2 * 2 * cfg.num_heads * cfg.resolved_head_dim * keys


def post_norm_params(cfg: ModelConfig) -> int:
    """Each layer's parameters beyond a Llama block's: the two post-norms."""
    return 2 * cfg.hidden_size


GEMMA2 = register_family(
    ModelFamily(
        name="gemma2",
        module=GemmaTransformer,
        flops_per_token=gemma_flops_per_token,
        hf=GEMMA2_CONVERTER,
        extra_layer_params=post_norm_params,
    )
)
GEMMA3 = register_family(
    ModelFamily(
        name="gemma3",
        module=GemmaTransformer,
        flops_per_token=gemma_flops_per_token,
        hf=GEMMA3_CONVERTER,
        extra_layer_params=post_norm_params,
    )
)
