"""The `model.lora` config section: low-rank adapters on the model's projections (see
`jaxalign/models/lora.py`). Light (no jax): `jaxalign/config.py` loads it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# Every attention and MLP projection of a block, with or without scan_layers ('blocks/attn/wq',
# 'blocks/0/attn/wq').
DEFAULT_TARGETS = r"(.*/)?(attn/(wq|wk|wv|wo)|mlp/(w_gate|w_up|w_down))"


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021): each targeted weight W gets A and B, and the
    projection becomes x @ W + (dropout(x) @ A) @ B * scale, with the base frozen.

    `targets` and `train` are regular expressions matched with `re.fullmatch` against parameter
    paths as `jaxalign.optim.param_path` gives them for the language model alone
    ('blocks/0/attn/wq', 'embed', 'lm_head'; with scan_layers 'blocks/attn/wq'). A reward model's
    or actor-critic's adapters sit at the same paths under 'backbone/', 'policy/', ...
    """

    rank: int = 8  # r: the adapters' inner width
    alpha: float = 16.0  # scale = alpha / rank (rslora: alpha / sqrt(rank))
    dropout: float = 0.0  # dropout on the adapters' input, in training only
    # Which weights get adapters; default: every attention and MLP projection (wq wk wv wo,
    # w_gate w_up w_down). Add 'embed' (looked up, as PEFT) or 'lm_head' with `|`.
    targets: str = DEFAULT_TARGETS
    rslora: bool = False  # rank-stabilized scaling alpha / sqrt(rank) (Kalajdzievski 2023)
    # kaiming: A ~ U(+-1/sqrt(fan_in)) (PEFT's default: torch's Kaiming-uniform with a=sqrt(5)),
    # B = 0; gaussian: A ~ N(0, std 1/rank), B = 0. Embedding adapters follow PEFT: A = 0,
    # B ~ N(0, 1). Either way the adapted model starts exactly equal to the base.
    init: Literal["kaiming", "gaussian"] = "kaiming"
    # Base parameters that still train alongside the adapters (regexes, e.g. '.*norm.*'); a
    # reward model's score head always trains.
    train: list[str] = field(default_factory=list)
    # QLoRA: the adapted base weights stored quantized (jaxalign/models/quant.py) and
    # dequantized on the fly in each matmul (embeddings stay in param_dtype).
    quantize: Literal["none", "int8", "nf4"] = "none"
    # A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, e.g.
    # `jaxalign export` of a LoRA run) whose adapters a fresh run starts from instead of fresh
    # ones (continued training; its checkpoints then export and sample like any LoRA run's).
    # rank and targets must describe it (a mismatch is one ConfigError line).
    from_peft: str | None = None
    quant_block: int = 64  # quantization block size (elements per absmax scale)
    double_quant: bool | None = None  # quantize the scales too; default: true for nf4

    @property
    def double_quantization(self) -> bool:
        """Whether the scales are quantized too: `double_quant`, default true for nf4."""
        return self.quantize == "nf4" if self.double_quant is None else self.double_quant

    @property
    def scale(self) -> float:
        """The adapters' output scale: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.rank <= 0:
            return f"model.lora.rank must be positive, got {self.rank}"
        if self.alpha <= 0:
            return f"model.lora.alpha must be positive, got {self.alpha}"
        if not 0 <= self.dropout < 1:
            return f"model.lora.dropout must be in [0, 1), got {self.dropout}"
        if self.quant_block <= 0:
            return f"model.lora.quant_block must be positive, got {self.quant_block}"
        for key, pattern in [("targets", self.targets)] + [("train", p) for p in self.train]:
            try:
                re.compile(pattern)
            except re.error as e:
                return f"model.lora.{key}: {pattern!r} is not a regular expression: {e}"
        return None
