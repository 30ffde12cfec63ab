"""Typed run configuration: dataclasses loaded from YAML plus `--set a.b=c` overrides.

Every key is validated (name, type, allowed values) before anything compiles; an unknown key is an
error that names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from jaxalign.errors import ConfigError
from jaxalign.models.lora_config import LoraConfig
from jaxalign.models.registry import family_names, get_family, unknown_family_message
from jaxalign.paths import run_path, unsupported_scheme
from jaxalign.trainers.preference_config import DPOConfig, PreferenceConfig, RMConfig
from jaxalign.trainers.rl_config import RLConfig

AXIS_NAMES = ("data", "fsdp", "expert", "context", "tensor")


@dataclass
class ModelConfig:
    """A decoder of a registered model family (jaxalign/models/registry.py). Field names follow
    Hugging Face's LlamaConfig where they overlap."""

    family: str = "llama"  # a name in jaxalign.models.registry (built in: llama, gemma2, gemma3)
    vocab_size: int = 1024  # must cover the tokenizer's vocabulary
    hidden_size: int = 128  # model width D
    intermediate_size: int = 352  # SwiGLU hidden width F
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
    head_dim: int | None = None  # default: hidden_size // num_heads
    rope_theta: float = 10000.0  # rotary embedding base
    # Llama-3 frequency scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}; None disables it.
    rope_scaling: dict[str, float] | None = None
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # output projection = embedding transposed
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False  # biases on the MLP projections
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"  # gate activation (GeGLU: gelu_tanh)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialized to 0 (Gemma)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    sliding_window: int | None = None  # attend only to the last N positions (Mistral)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # stored (master) weights
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    remat: Literal["none", "full", "save_dots"] = "none"  # per-block rematerialization policy
    scan_layers: bool = False  # stack blocks and lax.scan over them (one compiled block)
    # Queries are processed in blocks of this many positions (0: one block). Keeps the score matrix
    # in cache on CPU and skips fully masked key blocks. auto: 64 on CPU, 0 on GPU/TPU, for the
    # platform of the mesh's devices (models/auto.py; a TPU topology compiled for on a CPU: TPU).
    attention_query_block: int | Literal["auto"] = "auto"
    # Training/prefill attention: einsum (jaxalign's grouped-query einsums + softmax, in query
    # blocks; any backend), cudnn (jax.nn.dot_product_attention's cuDNN flash attention: NVIDIA
    # GPU, bfloat16 compute; not yet measured on a GPU here, see docs/performance.md), splash
    # (the Pallas splash-attention kernel: TPU; elsewhere Pallas interpret mode, exact but slow,
    # for tests) or auto (splash on TPU, einsum elsewhere). Decoding always uses the KV-cache
    # einsums.
    attention_kernel: Literal["auto", "einsum", "cudnn", "splash"] = "auto"
    # Attention when mesh.context > 1 splits each row's tokens over devices (whatever
    # attention_kernel says; docs/context.md): ring (K/V blocks passed around the context axis,
    # one block in memory at a time), allgather (every device gathers the row's K/V: fewer,
    # larger transfers) or auto (models/auto.py).
    context_attention: Literal["auto", "ring", "allgather"] = "auto"
    initializer_range: float = 0.02  # std of the normal init of weight matrices
    # --- mixture of experts (families qwen3_moe and mixtral: jaxalign/models/moe.py) ---------
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # an expert's SwiGLU width (None: intermediate_size)
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    # Load-balancing loss weight (Switch Transformer's, as transformers computes it); it joins
    # the objective only with output_router_logits (Hugging Face's switch for the same).
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = True
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (0: off)
    # Tokens per expert: 0 runs dropless (sort by expert + grouped matmul); > 0 gives each expert
    # capacity_factor x tokens x top-k / experts slots and drops the assignments past them.
    moe_capacity_factor: float = 0.0
    # The dropless experts' grouped matmul: ragged_dot (jax.lax.ragged_dot: TPU and GPU lower it
    # to grouped matmuls), megablox (the Pallas grouped matmul of
    # jax.experimental.pallas.ops.tpu.megablox: TPU; elsewhere Pallas interpret mode, exact but
    # slow, for tests), tiled (whole tiles of each expert's rows in batched matmuls: XLA's CPU
    # lowering of ragged_dot multiplies every row by every expert) or auto (megablox on TPU,
    # tiled on CPU, ragged_dot on GPU; docs/performance.md says why).
    moe_kernel: Literal["auto", "ragged_dot", "megablox", "tiled"] = "auto"
    decoder_sparse_step: int = 1  # layer i is a MoE layer when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    # --- end mixture of experts -----------------------------------------------------------
    # A local Hugging Face model directory to start from: its config.json sets the architecture
    # fields above and its safetensors the initial parameters (see jaxalign/hf).
    from_hf: str | None = None
    # (Gemma 2 / Gemma 3 fields, families gemma2 / gemma3 in jaxalign/models/gemma.py, start here.)

    # Per layer: "sliding_attention" (windowed by sliding_window) or "full_attention" (Gemma 2/3).
    # None: every layer is windowed when sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)
    # Linear RoPE scaling of the rope_theta (global) layers: positions / factor (Gemma 3).
    rope_linear_factor: float | None = None
    attn_logit_softcap: float | None = None  # attention scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcap: float | None = None  # output logits -> c * tanh(logits / c) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5 (None: head_dim)
    # (Gemma 2 / Gemma 3 fields end here.)
    # Low-rank adapters with the base frozen (jaxalign/models/lora_config.py); None: off.
    lora: LoraConfig | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def resolved_moe_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has routed experts (else the dense MLP), as transformers'
        Qwen3-MoE decides it."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class MeshConfig:
    """Device mesh sizes per named axis; one axis may be -1 (fill with the remaining devices).

    `dcn_*` sizes split an axis across slices (multi-slice); the total size of an axis is
    `axis * dcn_axis`.
    """

    data: int = 1  # pure data parallelism (replicas)
    fsdp: int = -1  # fully sharded data parallelism
    expert: int = 1  # expert parallelism: a MoE layer's experts split over this axis
    # context parallelism: each row's tokens split over this axis (the activations' `length`;
    # attention across it: jaxalign/models/context_attention.py, docs/context.md)
    context: int = 1
    tensor: int = 1  # tensor (model) parallelism
    dcn_data: int = 1  # slices along `data` (multi-slice); default: all slices
    dcn_fsdp: int = 1  # slices along `fsdp`
    dcn_expert: int = 1  # slices along `expert`
    dcn_context: int = 1  # slices along `context`
    dcn_tensor: int = 1  # slices along `tensor`


@dataclass
class ShardingConfig:
    """Logical-axis rules: each logical axis maps to a mesh axis, a list of mesh axes, or null.

    Two tables: `rules` places parameters (and their optimizer state), `activation_rules` places
    activations, batches and KV caches. The activation table starts as a copy of the parameter
    table, so a config that sets only `rules` shards both alike. `rules_file` (a YAML file with
    a `rules:` and optionally an `activation_rules:` mapping) is applied first, then the inline
    tables on top.
    """

    rules_file: str | None = None  # YAML with `rules:` (and `activation_rules:`) tables
    rules: dict[str, Any] = field(default_factory=dict)  # parameter overrides on top of the file
    # activation overrides on top of the file's (and of the parameter table)
    activation_rules: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where training examples come from and how they become token rows."""

    train_file: str = ""  # a source: .jsonl(.gz), .parquet, .arrayrecord, tfds:NAME:SPLIT
    eval_file: str | None = None  # held-out source for train.eval_every
    tokenizer: str = ""  # SentencePiece .model, tokenizer.json, or a HF model directory
    template: str = "plain"  # plain, chatml, llama3, gemma, or a tokenizer_config.json/.jinja
    packing: bool = True  # first-fit packing with segment ids (else one example per row)
    shuffle: bool = True  # reshuffled every epoch
    seed: int = 0  # shuffling and packing seed
    on_error: Literal["raise", "skip"] = "raise"  # bad records: stop, or skip and count
    num_packing_bins: int = 16  # open bins of the first-fit packer
    # Weighted sources replacing train_file: [{path: ..., weight: ...}, ...] (docs/data.md).
    mixture: list[dict[str, Any]] | None = None
    data_dir: str | None = None  # TFDS data_dir for `tfds:NAME[/CONFIG]:SPLIT` sources
    # Logical data shards (None: the largest divisor <= 8 of the global micro-batch rows). Fixed
    # independently of the process count, so the global batches are the same for any count.
    shards: int | None = None
    prefetch: int = 2  # batches prepared ahead on a background thread (0: none)
    prompt_buckets: list[int] = field(default_factory=lambda: [64, 128, 256])  # RL prompts


@dataclass
class LossConfig:
    """Loss computation options."""

    # The final projection + cross-entropy is computed over this many chunks of tokens, so full
    # [tokens, vocab] logits never exist at once (1: no chunking). Chunks are strided within each
    # row (chunk i: tokens i, i + n, ...), so each keeps the batch sharding.
    vocab_chunks: int = 1
    z_loss: float = 0.0  # weight of logsumexp(logits)^2 per target token


@dataclass
class TrainConfig:
    """Optimization and loop settings."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # global rows of seq_len tokens per optimizer step
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    seq_len: int = 256  # tokens per row
    lr: float = 1e-3  # peak learning rate
    # PPO: peak learning rate of the value model (params['value']; same warmup and decay, its own
    # AdamW state and global-norm clip); None: one optimizer for policy and value at `lr`.
    value_lr: float | None = None
    # PPO: optimizer steps at the start in which only the value model trains (verl's
    # critic_warmup, OpenRLHF's freezing_actor_steps); the policy's AdamW and its learning-rate
    # schedule then start from their first step.
    critic_warmup_steps: int = 0
    warmup_steps: int = 10  # linear warmup: step i uses lr * (i + 1) / warmup_steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled decay (not on norms, biases, embeddings)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # global-norm clipping (0: off)
    # Parameters left as they are: regular expressions searched in each parameter's path
    # ('/'-joined, e.g. 'embed', 'blocks/0/', 'lm_head'; PPO prefixes 'policy/' or 'value/').
    # Matching parameters get no updates, no optimizer state and are left out of the gradient
    # clipping norm (`jaxalign plan` counts their parameters, no moments and no gradients).
    freeze: list[str] = field(default_factory=list)
    log_every: int = 10  # steps between metrics records (and step 1)
    eval_every: int = 0  # 0: no held-out evaluation (needs data.eval_file)
    eval_batches: int = 4  # batches of the held-out split per evaluation
    seed: int = 0  # parameter init and step RNG
    # Peak FLOP/s per device for MFU; 0 measures a matmul peak at start-up.
    peak_flops_per_device: float = 0.0
    progress: bool = True  # tqdm progress bar on process 0
    # A step whose loss or gradients are NaN/Inf never updates the model. "halt" stops the run
    # (the last good checkpoint is kept); "skip" goes on and halts after `max_consecutive_skips`.
    nan_policy: Literal["halt", "skip"] = "halt"
    max_consecutive_skips: int = 5  # with nan_policy "skip"
    # After each checkpoint save and held-out evaluation, hand the allocator's free memory back to
    # the OS (glibc malloc_trim / tcmalloc), so resident memory tracks the memory in use.
    release_memory: bool = True


@dataclass
class CheckpointConfig:
    """Orbax checkpointing."""

    every: int = 100  # save every N steps (0: only at the end); always at the end and on SIGTERM
    keep: int = 3  # checkpoints kept
    async_save: bool = True  # write in the background while training goes on


@dataclass
class LoggingConfig:
    """Where metrics go besides RUN_DIR/metrics.jsonl."""

    tensorboard: bool = True  # RUN_DIR/tensorboard event files
    wandb_project: str | None = None  # log to Weights & Biases (extra `wandb`)


@dataclass
class SamplingConfig:
    """Generation settings (`jaxalign generate`, rejection sampling, RL rollouts)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; drop tokens below min_p x the most likely one's probability
    # Penalties on the logits before temperature (vLLM's and Hugging Face's definitions): a token
    # already in the prompt or the response has a positive logit divided by repetition_penalty
    # and a negative one multiplied by it (1: off); a token already in the response loses
    # presence_penalty once and frequency_penalty per occurrence (0: off).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Stop strings: a response ends with the first token that completes one of them, and its
    # text ends before it (as vLLM's `stop`), besides the template's end marker and EOS.
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 128  # response length limit (tokens)
    # Longest prompt in tokens. Prompts are left-padded to the smallest bucket that fits (powers
    # of two from 16, capped at this), so a handful of shapes is ever compiled.
    max_prompt_len: int = 512
    batch_size: int = 8  # prompts per compiled call (x num_samples rows)
    seed: int = 0  # sampling RNG (each row has its own stream)
    num_samples: int = 1  # completions per prompt


@dataclass
class Config:
    """A whole run."""

    # which algorithm trains: a registered name (jaxalign/trainers/registry.py): sft, rm, dpo,
    # ppo, grpo, rloo or reinforce_pp
    trainer: str = "sft"
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, config.yaml, TensorBoard
    resume: bool | None = None  # None: resume automatically when RUN_DIR has checkpoints
    # Start from the parameters of another run's latest checkpoint (a RUN_DIR or its
    # checkpoints/<step> directory), e.g. SFT from a base model, DPO from SFT. A LoRA run: its
    # adapters merged into its base (then trained in full, or under this run's model.lora).
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return _check_value(value, options[0], key)  # its own error (a did-you-mean)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if args:
            return {k: _check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if not args:
            return list(value)
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _check_value(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `a.b=c` strings; values are read as YAML scalars (`true`, `3`, `1e-3`, `[1, 2]`)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        parsed.append((key.strip(), value))
    return parsed


def load_raw(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    p = run_path(path, key="config")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return raw


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict | None = None,
) -> Config:
    """Load a Config from YAML and `--set` overrides, validated."""
    raw = dict(base or {})
    raw.update(load_raw(path))
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
    where = str(path) if path else "config"
    try:
        cfg = from_dict(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.model.from_hf:
        if "family" not in (raw.get("model") or {}):  # the directory's model_type decides
            from jaxalign.hf.families import hf_model_family

            cfg.model.family = hf_model_family(cfg.model.from_hf)
        if cfg.model.family not in family_names():
            raise ConfigError(f"{where}: {unknown_family_message(cfg.model.family)}")
        family = get_family(cfg.model.family)
        if family.hf is None:
            raise ConfigError(f"{where}: model.family '{family.name}' has no Hugging Face import")
        cfg.model = family.hf.resolve_config(cfg.model, raw.get("model") or {}, where)
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: str = "config") -> None:
    """Cross-field checks that need no devices (mesh divisibility is checked in sharding)."""
    from jaxalign.trainers.registry import trainer_names, unknown_trainer_message

    m, t = cfg.model, cfg.train

    def fail(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if m.family not in family_names():
        fail(unknown_family_message(m.family))
    if cfg.trainer not in trainer_names():
        fail(f"trainer: {unknown_trainer_message(cfg.trainer)}")

    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
    ):
        if getattr(m, name) <= 0:
            fail(f"model.{name} must be positive, got {getattr(m, name)}")
    if m.num_heads % m.num_kv_heads:
        fail(
            f"model.num_heads ({m.num_heads}) must divide by model.num_kv_heads ({m.num_kv_heads})"
        )
    if m.head_dim is None and m.hidden_size % m.num_heads:
        fail(
            f"model.hidden_size ({m.hidden_size}) must divide by model.num_heads "
            f"({m.num_heads}) unless model.head_dim is set"
        )
    if m.resolved_head_dim % 2:
        fail(f"model head_dim ({m.resolved_head_dim}) must be even for rotary embeddings")
    if m.rope_scaling is not None:
        need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        missing = need - set(m.rope_scaling)
        if missing:
            fail(f"model.rope_scaling is missing {sorted(missing)}")
    # --- Gemma 2 / Gemma 3 ---
    if m.layer_types is not None:
        if len(m.layer_types) != m.num_layers:
            fail(
                f"model.layer_types has {len(m.layer_types)} entries, model.num_layers is "
                f"{m.num_layers}"
            )
        bad = sorted(set(m.layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            fail(f"model.layer_types: {bad[0]!r} is not sliding_attention or full_attention")
    if m.sliding_window is not None and m.sliding_window <= 0:
        fail(f"model.sliding_window must be positive, got {m.sliding_window}")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
        if getattr(m, name) is not None and getattr(m, name) <= 0:
            fail(f"model.{name} must be positive, got {getattr(m, name)}")
    if m.attention_kernel == "cudnn" and m.attn_logit_softcap is not None:
        fail("model.attention_kernel=cudnn cannot soft-cap attention logits (attn_logit_softcap)")
    # --- end Gemma 2 / Gemma 3 ---
    if m.attention_query_block != "auto" and m.attention_query_block < 0:
        fail("model.attention_query_block must be >= 0 or auto")
    if m.attention_kernel == "cudnn" and m.dtype != "bfloat16":
        fail("model.attention_kernel=cudnn needs model.dtype=bfloat16 (cuDNN flash attention)")
    if m.lora is not None:
        if (problem := m.lora.problem()) is not None:
            fail(problem)
        if cfg.trainer == "ppo" and cfg.rl.value_init_from and cfg.rl.lora_critic == "adapters":
            fail(
                "rl.value_init_from: a LoRA PPO critic of adapters starts from the policy's "
                "base; set rl.lora_critic=separate to start it from a reward-model run"
            )
    if (problem := moe_problem(m)) is not None:
        fail(problem)
    if t.batch_size <= 0 or t.grad_accum <= 0 or t.seq_len <= 1 or t.steps < 0:
        fail("train.batch_size, train.grad_accum, train.steps must be positive and seq_len > 1")
    if t.batch_size % t.grad_accum:
        fail(f"train.batch_size ({t.batch_size}) must divide by train.grad_accum ({t.grad_accum})")
    if t.log_every <= 0:
        fail("train.log_every must be positive")
    if cfg.loss.vocab_chunks <= 0:
        fail("loss.vocab_chunks must be positive")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep <= 0:
        fail("checkpoint.every must be >= 0 and checkpoint.keep positive")
    sp = cfg.sampling
    if sp.temperature < 0 or not 0 < sp.top_p <= 1 or sp.top_k < 0 or not 0 <= sp.min_p <= 1:
        fail(
            "sampling.temperature must be >= 0, sampling.top_p in (0, 1], sampling.top_k >= 0, "
            "sampling.min_p in [0, 1]"
        )
    if sp.repetition_penalty <= 0:
        fail(f"sampling.repetition_penalty must be positive (1: off), got {sp.repetition_penalty}")
    if any(not isinstance(s, str) or not s for s in sp.stop):
        fail(f"sampling.stop must be a list of non-empty strings, got {sp.stop!r}")
    if min(sp.max_new_tokens, sp.max_prompt_len, sp.batch_size, sp.num_samples) <= 0:
        fail("sampling.max_new_tokens, max_prompt_len, batch_size and num_samples must be positive")
    for section in (cfg.dpo, cfg.rm, cfg.preference):  # each checks its own keys
        if (problem := section.problem()) is not None:
            fail(problem)
    sizes = [getattr(cfg.mesh, a) for a in AXIS_NAMES]
    if sizes.count(-1) > 1:
        fail("at most one mesh axis may be -1")
    if cfg.mesh.context == -1:
        fail("mesh.context must be a size, not -1 (it must divide train.seq_len)")
    context = cfg.mesh.context * cfg.mesh.dcn_context
    if context > 1 and t.seq_len % (2 * context):
        fail(
            f"train.seq_len ({t.seq_len}) must divide by 2 x the context axis "
            f"(mesh.context x mesh.dcn_context = {context}): each device holds two chunks of a "
            "row (the zig-zag layout, docs/context.md)"
        )
    for a in AXIS_NAMES:
        for name in (a, f"dcn_{a}"):
            v = getattr(cfg.mesh, name)
            if v == 0 or v < -1 or (name.startswith("dcn") and v < 1):
                fill = "" if name.startswith("dcn") else " or -1"
                fail(f"mesh.{name} must be a positive size{fill}, got {v}")
    for key, value in {  # before a local directory named `s3:` is made
        "run_dir": cfg.run_dir,
        "init_from": cfg.init_from,
        "data.train_file": cfg.data.train_file,
        "data.eval_file": cfg.data.eval_file,
    }.items():
        if isinstance(value, str) and (problem := unsupported_scheme(value, key)):
            fail(problem)


# --- mixture of experts ------------------------------------------------------------------------
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def moe_problem(m: ModelConfig) -> str | None:
    """The first thing wrong with `m`'s mixture-of-experts fields, as one line (None: fine)."""
    if m.family in MOE_FAMILIES and m.num_experts <= 0:
        return f"model.family '{m.family}' needs model.num_experts > 0"
    if m.num_experts <= 0:
        return None
    if m.family not in MOE_FAMILIES:
        return (
            f"model.num_experts={m.num_experts} needs a mixture-of-experts model.family "
            f"({', '.join(MOE_FAMILIES)}), got '{m.family}'"
        )
    if not 0 < m.num_experts_per_tok <= m.num_experts:
        return (
            f"model.num_experts_per_tok ({m.num_experts_per_tok}) must be in "
            f"[1, model.num_experts={m.num_experts}]"
        )
    if m.moe_capacity_factor < 0:
        return f"model.moe_capacity_factor must be >= 0 (0: dropless), got {m.moe_capacity_factor}"
    if m.decoder_sparse_step <= 0:
        return f"model.decoder_sparse_step must be positive, got {m.decoder_sparse_step}"
    if m.router_aux_loss_coef < 0 or m.router_z_loss_coef < 0:
        return "model.router_aux_loss_coef and model.router_z_loss_coef must be >= 0"
    if m.resolved_moe_intermediate_size <= 0:
        return "model.moe_intermediate_size must be positive"
    kinds = {m.is_moe_layer(i) for i in range(m.num_layers)}
    if m.scan_layers and len(kinds) > 1:
        return (
            "model.scan_layers needs every layer alike; model.mlp_only_layers / "
            "model.decoder_sparse_step mix dense and MoE layers (set scan_layers: false)"
        )
    return None


# --- end mixture of experts --------------------------------------------------------------------


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    run_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
