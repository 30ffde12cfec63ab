"""`jaxalign plan`: check a config against a device count without those devices.

Resolves the mesh for N devices, maps every parameter through the sharding rules, and prints the
bytes per device of parameters, optimizer state, gradients and an activation estimate, plus what
the trainer keeps besides the trained policy: DPO's reference; PPO's value model and its optimizer
state; the RL rollout's reference, reward model, KV cache and log-prob logits. Fails when the
total does not fit the given memory per device.

The total is a sum, so an upper bound: the rollout's KV cache and logits are never live at the
same time as the train step's gradients and activations. For the same reason a frozen model kept
in host memory between uses (`rl.offload_frozen`) is shown but not counted: it is on device only
during its own forward pass, when the train step's gradients (at least as large) are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.config import Config, ModelConfig, load_config
from jaxalign.errors import ConfigError
from jaxalign.models.llama import DTYPES
from jaxalign.models.lora import trainable as lora_trainable
from jaxalign.models.params import logical_axes
from jaxalign.models.reward import RewardModel
from jaxalign.optim import freeze_patterns, frozen_matcher, param_path
from jaxalign.trainers import get_trainer

GIB = 1024**3


@dataclass
class Plan:
    """Per-device memory estimate of one training configuration.

    `parts` are the counted bytes per device in print order (`params`, `optimizer`, `gradients`
    and `activations` of the trained policy first); `host` the frozen models kept in host memory
    between uses, shown but not counted; `num_params` counts trained parameters.
    """

    mesh: dict[str, int]
    num_params: int
    parts: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)
    # A mixture of experts: parameters one token's forward uses (FLOPs), without the embedding.
    active_params: int | None = None
    # RL: the rollout's generate program (`jaxalign plan --compile`'s `rollout_generate`).
    rollout_generate: int | None = None

    @property
    def params(self) -> int:
        return self.parts["params"]

    @property
    def optimizer(self) -> int:
        return self.parts["optimizer"]

    @property
    def gradients(self) -> int:
        return self.parts["gradients"]

    @property
    def activations(self) -> int:
        return self.parts["activations"]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def train_step_bytes(self, is_rl: bool) -> int:
        """The parts live during the train step: the total without the rollout's KV cache,
        logits and (RL: used only by the rollout's forwards) frozen reference and reward
        model. What `jaxalign plan --compile`'s `train_step` peak measures."""
        rollout_only = {"rollout KV cache", "rollout logits"}
        if is_rl:
            rollout_only |= {"reference", "reward model"}
        return sum(v for k, v in self.parts.items() if k not in rollout_only)


@dataclass
class ModelBytes:
    """Per-device bytes of one model's parameters (in their dtype), of its AdamW moments and of
    the gradients of the trained ones (`train.freeze`: frozen parameters have neither)."""

    params: int
    optimizer: int
    num_params: int
    gradients: int
    # What the train step adds beside them: the compute-dtype copy of parameters stored wider
    # (WEIGHT_CAST_COPIES) and the quantized codes' copy (CODES_COPIES), per device.
    copies: int = 0
    # The float32 sum of the trained parameters' gradients over micro-batches (train.grad_accum
    # > 1: `step.accumulate_gradients` carries it beside each micro-batch's own gradients).
    accumulator: int = 0


def _shard_elems(shape: tuple[int, ...], spec, sizes: dict[str, int], path: str) -> int:
    n = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * len(shape)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        div = math.prod(sizes[a] for a in axes)
        if dim % div:
            raise ConfigError(
                f"sharding: parameter '{path}' dimension of size {dim} does not "
                f"divide by mesh axes {entry} (size {div})"
            )
        n *= dim // div
    return n


def model_bytes(
    module: Any,
    sizes: dict[str, int],
    rules: shd.Rules,
    frozen: Sequence[str] = (),
    prefix: str = "",
    trainable: Callable[[str], bool] | None = None,
    compute_dtype: str | None = None,
) -> ModelBytes:
    """Bytes per device of `module`'s parameters (an abstract nnx.Module, or the nnx.State of
    part of one: shared parameters counted where `nnx.split` lists them) on a mesh of `sizes`;
    `frozen`: `train.freeze` patterns, matched against `prefix` + each parameter's path;
    `trainable` (LoRA: the adapters and what trains beside them): the others are frozen too."""
    state = module if isinstance(module, nnx.State) else nnx.split(module)[1]
    names = logical_axes(state).to_pure_dict()
    shapes = state.to_pure_dict()
    matched = frozen_matcher(frozen)

    def is_frozen(path: str) -> bool:
        return matched(path) or (trainable is not None and not trainable(path))

    param_bytes = opt_bytes = grad_bytes = num_params = copies = accumulator = 0
    compute = np.dtype(DTYPES[compute_dtype]).itemsize if compute_dtype else None
    for (path, leaf), axes in zip(
        jax.tree_util.tree_leaves_with_path(shapes),
        jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)),
    ):
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        elems = _shard_elems(tuple(leaf.shape), shd.logical_to_spec(axes, rules), sizes, key)
        nbytes = elems * np.dtype(leaf.dtype).itemsize
        param_bytes += nbytes
        if param_path(path).rsplit("/", 1)[-1] == "codes":
            copies += CODES_COPIES * nbytes
        elif compute and np.dtype(leaf.dtype).itemsize > compute:
            copies += WEIGHT_CAST_COPIES * elems * compute
        if not is_frozen(prefix + param_path(path)):
            opt_bytes += elems * 4 * 2  # AdamW: two float32 moments per parameter
            grad_bytes += nbytes
            accumulator += elems * 4
        num_params += _weights_held(param_path(path), leaf)
    return ModelBytes(param_bytes, opt_bytes, num_params, grad_bytes, copies, accumulator)


def _weights_held(path: str, leaf: Any) -> int:
    """How many model weights a parameter array holds: its size, or for a quantized base weight
    (QLoRA) the weight's size counted on its codes (two NF4 codes a byte) and none on its
    scales."""
    last = path.rsplit("/", 1)[-1]
    if last == "codes":
        return math.prod(leaf.shape) * (2 if np.dtype(leaf.dtype) == np.uint8 else 1)
    if last in ("scales", "scale_scales", "scale_offset"):
        return 0
    return math.prod(leaf.shape)


def _axis_split(sizes: dict[str, int], rules: shd.Rules, logical: str) -> int:
    return math.prod(sizes[a] for a in rules.get(logical, ()))


def context_split(sizes: dict[str, int], rules: shd.Rules) -> int:
    """How many devices share a row's tokens: the mesh axes of the activations' `length` (less
    the batch's), as `models.context_attention.context_axes` reads them; 1 without context
    parallelism."""
    table = shd.activation_table(rules)
    batch = tuple(table.get("batch", ()))
    return math.prod(sizes[a] for a in table.get("length", ()) if a not in batch)


# What a compiled train step holds at its peak besides the state, read from XLA's TPU compiles
# of every recipe (bench/tpu_compile.py: the largest buffers and the live ranges at the peak,
# bench/results/tpu_compile.json; docs/performance.md "TPU compile of the recipes"). Counts of
# arrays whose shapes follow from the config, checked within 15% of every compiled peak by
# tests/test_plan_calibration.py:
# - the backward of the recomputed layer: MLP_BUFFERS [tokens, intermediate_size / tensor]
#   arrays in the compute dtype (the gate and up projections; the activation and product fuse
#   into the matmuls that read them);
MLP_BUFFERS = 2
# - remat "full" with scan_layers: the [layers, rows, T, D] layer inputs kept for the backward
#   pass, twice (SAVED_COPIES): the scan's stacked output and the buffer it is built in (a
#   dynamic-update-slice result and the allocation it updates, both live into the backward
#   pass in the compiled steps). A second model trained in the same step (PPO's value model)
#   keeps SECOND_MODEL_SAVED_COPIES (its scan is scheduled beside the policy's, and XLA reuses
#   the policy's build buffer);
SAVED_COPIES = 2
SECOND_MODEL_SAVED_COPIES = 1
# - RL losses score the response positions' logits [rows, N, V] whole, unchunked
#   (`rl_rows.response_logprobs`): the logits' gradient in the compute dtype, RL_LOGITS_BYTES
#   per element (the float32 logits and log-softmax fuse into their consumers);
RL_LOGITS_BYTES = 2
# - parameters stored wider than the compute dtype (float32 master weights, bf16 compute): XLA
#   casts every layer's weights once per step, hoisted out of the layer loop, so a compute-dtype
#   copy of the stacked weights is live through the step (trained or frozen alike);
WEIGHT_CAST_COPIES = 1
# - QLoRA: the stacked quantized codes copied once (relaid out for the dequantizing loop);
CODES_COPIES = 1
# - the loss's vocab chunk loop (`loss.vocab_chunks`): one chunk's float32 logits and their
#   gradient; and the output head's [D, V] weight gathered whole in the compute dtype, with its
#   gradient, also whole, before the reduction over the batch's devices.
LOGITS_F32_BUFFERS = 2
HEAD_COPIES = 2
# - a mixture of experts (`models/moe.py`): each MoE layer routes every token's k assignments
#   through buffers of ep x k rows per token (ep: the devices the experts split over; the
#   all-to-all's send and receive buffers are padded to the worst case, every assignment to
#   one device, so none is dropped), which the grouped matmuls read in expert order. A forward
#   holds MOE_FORWARD_BUFFERS [rows, D] arrays in the compute dtype at once (the received
#   rows, their expert-sorted copy, the experts' outputs); the backward of the recomputed layer
#   those and their gradients, plus MOE_BACKWARD_HIDDEN [rows, F_moe] arrays (gate, up, their
#   product and the gradients of gate and up).
MOE_FORWARD_BUFFERS = 3
MOE_BACKWARD_HIDDEN = 5
# - context parallelism (`mesh.context` C > 1, docs/context.md): every activation term above
#   counts a device's T / C tokens of a row (RL logits: N / C response positions). The
#   attention is `models/context_attention.py`'s block loop instead of the attention kernel:
#   the backward of one (query sub-block, key sub-block) update recomputes its float32 scores
#   and holds them with their float32 gradient and a one-byte mask of the max,
#   CONTEXT_SCORE_BYTES per element of [rows, H / tensor, t / SUB_BLOCKS, t / SUB_BLOCKS]
#   (t = T / C); and the backward of the step loop keeps each update's inputs, stacked over the
#   C steps: the float32 running output and the query sub-block [t / SUB_BLOCKS, H, hd], the
#   key and value sub-blocks [t / SUB_BLOCKS, KV, hd], for each of the SUB_BLOCKS^2 pairs.
#   `allgather` holds the row's gathered keys and values [T, KV, hd] besides; `ring` one
#   remote block (counted in the stacked inputs). The embedding lookup's output (and, in the
#   backward, its gradient) is gathered whole, [micro-batch rows of all devices, T, D], at
#   the two ends of the step, where the layer inputs are not held yet (or any more): not
#   counted in the train step.
CONTEXT_SCORE_BYTES = 4 + 4 + 1


def moe_dispatch_rows(cfg: Config, sizes: dict[str, int], rules: shd.Rules) -> int:
    """Rows of a MoE layer's dispatch buffers per token of a device: k, times the expert
    parallelism (the worst-case padded all-to-all of `moe.expert_parallel_experts`)."""
    return cfg.model.num_experts_per_tok * _axis_split(sizes, rules, "expert")


def moe_layer_bytes(
    cfg: Config, sizes: dict[str, int], rules: shd.Rules, tokens: int, backward: bool
) -> int:
    """The dispatch buffers one MoE layer holds at once for `tokens` tokens of a device: a
    forward's MOE_FORWARD_BUFFERS [rows, D] arrays; a backward's twice as many, plus
    MOE_BACKWARD_HIDDEN [rows, F_moe / tensor] arrays (rows = tokens x `moe_dispatch_rows`)."""
    m = cfg.model
    rows = tokens * moe_dispatch_rows(cfg, sizes, rules)
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    tensor = sizes.get("tensor", 1) if rules.get("mlp") == ("tensor",) else 1
    width = MOE_FORWARD_BUFFERS * m.hidden_size
    if backward:
        width = 2 * width + MOE_BACKWARD_HIDDEN * m.resolved_moe_intermediate_size / tensor
    return int(rows * width * itemsize)


def activation_bytes(
    cfg: Config,
    sizes: dict[str, int],
    rules: shd.Rules,
    batch_size: int | None = None,
    with_head: bool = True,
) -> int:
    """Activations and temporaries of the train step, per device (an estimate, calibrated on
    compiled TPU programs), of `batch_size` sequences per step (default train.batch_size) of
    train.seq_len tokens, per micro-batch.

    Kept for the backward pass, per layer and token: with remat "full" only the layer input
    (D, the scan's stacked carry, SAVED_COPIES times); "save_dots" the matmul outputs (q, k,
    v, attention output, gate, up, down); "none" those plus norms and activations. Plus the
    working set of one layer's backward (MLP_BUFFERS [tokens, F / tensor] arrays in the
    compute dtype; the attention probabilities where the attention kernel materializes them:
    `einsum` on the platform being planned for, H x T float32 per token, or H x query block
    per token with `attention_query_block`, splash and cuDNN keep none; a MoE layer's
    dispatch buffers, `moe_layer_bytes`), one vocab chunk's float32 logits and their
    gradient (LOGITS_F32_BUFFERS x tokens / loss.vocab_chunks x V; RL losses: the response
    logits unchunked, RL_LOGITS_BYTES x rows x N x V), and the output head's weight and
    gradient whole (HEAD_COPIES x D x V in the compute dtype, split only by `tensor`; not
    with `with_head=False`: more rows through the same step, e.g. PPO-ptx's).

    With context parallelism (C devices share a row, `context_split`) every per-token term
    counts a device's T / C tokens (RL logits N / C positions), and the attention's working
    set is that of the context-parallel block loop (`context_attention_bytes`).
    """
    from jaxalign.models import auto

    m, t = cfg.model, cfg.train
    batch_div = _axis_split(sizes, rules, "batch")
    tensor = sizes.get("tensor", 1) if rules.get("mlp") == ("tensor",) else 1
    rows = max((batch_size or t.batch_size) // t.grad_accum // batch_div, 1)
    context = context_split(sizes, rules)
    tokens = rows * t.seq_len // context  # a device's part of its rows' tokens
    d, f, h, kv, hd = (
        m.hidden_size,
        m.intermediate_size,
        m.num_heads,
        m.num_kv_heads,
        m.resolved_head_dim,
    )
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    if m.num_experts:  # a MoE layer keeps each token's k expert rows (and their inputs)
        f = m.num_experts_per_tok * (m.resolved_moe_intermediate_size + d / 3)
    dots = (h * hd + 2 * kv * hd + 2 * d + 3 * f / tensor) * itemsize
    probs = 0.0
    if context > 1:  # the context-parallel attention replaces the kernel
        working_attention = context_attention_bytes(cfg, sizes, rules, rows)
    elif auto.resolve("attention_kernel", m.attention_kernel) == "einsum":
        block = auto.resolve("attention_query_block", m.attention_query_block)
        width = min(block, t.seq_len) if block else t.seq_len
        probs = h / tensor * t.seq_len * 4 * width / t.seq_len
    saved = {
        "full": SAVED_COPIES * d * itemsize,
        "save_dots": dots,
        "none": dots + (4 * d + f / tensor) * itemsize + probs,
    }[m.remat]
    working = MLP_BUFFERS * f / tensor * itemsize + probs
    if m.num_experts:  # the recomputed MoE layer's dispatch buffers, not dense MLP arrays
        working = probs + moe_layer_bytes(cfg, sizes, rules, 1, backward=True)
    logits = LOGITS_F32_BUFFERS * m.vocab_size / tensor * 4 / cfg.loss.vocab_chunks
    head = HEAD_COPIES * d * m.vocab_size / tensor * itemsize if with_head else 0
    total = tokens * (m.num_layers * saved + working) + head
    if context > 1:
        total += working_attention
    if get_trainer(cfg.trainer).is_rl and with_head:
        # RL losses score the response positions' logits whole, unchunked
        # (`rl_rows.response_logprobs`): RL_LOGITS_BYTES per element of [rows, N / C, V].
        n = cfg.sampling.max_new_tokens / context
        vocab = m.vocab_size / _axis_split(sizes, rules, "vocab")
        return int(total + rows * n * vocab * RL_LOGITS_BYTES)
    return int(total + tokens * logits)


def context_attention_bytes(cfg: Config, sizes: dict[str, int], rules: shd.Rules, rows: int) -> int:
    """What the backward of one layer's context-parallel attention holds, per device, for
    `rows` rows of train.seq_len tokens split over C devices (see CONTEXT_SCORE_BYTES): one
    sub-block pair's scores, the block loop's stacked inputs and, for `allgather`, the row's
    gathered keys and values."""
    from jaxalign.models import auto
    from jaxalign.models.context_attention import SUB_BLOCKS

    m = cfg.model
    context = context_split(sizes, rules)
    tensor = _axis_split(sizes, rules, "heads")
    kv_div = _axis_split(sizes, rules, "kv_heads")
    heads = m.num_heads / tensor
    kv = m.num_kv_heads / kv_div if m.num_kv_heads % kv_div == 0 else m.num_kv_heads
    hd, itemsize = m.resolved_head_dim, np.dtype(DTYPES[m.dtype]).itemsize
    t = cfg.train.seq_len // context
    sub = SUB_BLOCKS if t % SUB_BLOCKS == 0 else 1
    scores = rows * heads * (t / sub) ** 2 * CONTEXT_SCORE_BYTES
    # SUB_BLOCKS^2 pairs a step, C steps: the running output (f32) and the query, key and
    # value sub-blocks of each pair.
    inputs = context * sub * rows * t * (heads * hd * (4 + itemsize) + 2 * kv * hd * itemsize)
    gathered = 0
    if auto.resolve("context_attention", m.context_attention) == "allgather":
        gathered = 2 * rows * cfg.train.seq_len * kv * hd * itemsize
    return int(scores + inputs + gathered)


def saved_layer_bytes(cfg: Config, sizes: dict[str, int], rules: shd.Rules) -> int:
    """The layer inputs a scanned remat-"full" model keeps for its backward pass, per device:
    SAVED_COPIES x layers x tokens of a micro-batch x D in the compute dtype ([layers, rows, T,
    D] arrays).
    A second model trained in the same step (PPO's value model) keeps its own."""
    m, t = cfg.model, cfg.train
    rows = max(t.batch_size // t.grad_accum // _axis_split(sizes, rules, "batch"), 1)
    tokens = rows * t.seq_len // context_split(sizes, rules)
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    return SECOND_MODEL_SAVED_COPIES * m.num_layers * tokens * m.hidden_size * itemsize


def _rows_per_device(rows: int, batch_div: int) -> int:
    # The sampler and the rollout shard rows over the batch axes when they divide, else
    # replicate them (generate.Sampler._batch_sharding).
    return rows // batch_div if rows % batch_div == 0 else rows


def rollout_kv_cache_bytes(cfg: Config, sizes: dict[str, int], rules: shd.Rules) -> int:
    """The KV cache of one generate call of the rollout, per device.

    rows = min(rollout rows, sampling.batch_size x rl.num_generations), split over the batch
    axes; slots = P + N - 1 (P = max(data.prompt_buckets), N = sampling.max_new_tokens); keys
    and values of every layer, kv heads split over the axes of `kv_heads`, in the compute dtype.
    """
    m, rl, sp = cfg.model, cfg.rl, cfg.sampling
    total_rows = rl.prompts_per_rollout * rl.num_generations
    per_call = min(total_rows, sp.batch_size * rl.num_generations)
    rows = _rows_per_device(per_call, _axis_split(sizes, rules, "batch"))
    kv_div = _axis_split(sizes, rules, "kv_heads")
    kv = m.num_kv_heads // kv_div if m.num_kv_heads % kv_div == 0 else m.num_kv_heads
    slots = max(cfg.data.prompt_buckets) + sp.max_new_tokens - 1
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    return rows * slots * m.num_layers * kv * m.resolved_head_dim * 2 * itemsize


def rollout_generate_bytes(
    cfg: Config, sizes: dict[str, int], rules: shd.Rules, policy_params: int
) -> int:
    """The rollout's generate program (prefill, then the decode loop), per device: the policy's
    parameters, the KV cache (`rollout_kv_cache_bytes`) and half of it again (the compiled
    decode loop writes an updated copy of the keys' or the values' cache beside the one it
    carries: three [layers, rows, kv heads, slots, head_dim] arrays at its peak), and the
    output head gathered whole in the compute dtype by the prefill and by the decode step
    (HEAD_COPIES x D x V / tensor), as the compiled programs hold them.

    With context parallelism (C > 1) the cache is still whole on every device of a context
    group (`cache_length` is not split): the compiled decode loop updates it in place (the keys
    and values, two arrays), and the cache, allocated before the prefill, is live beside the
    prefill's own buffers: the prompt's embeddings gathered whole ([rows of the call, P, D]
    in the compute dtype: the embedding table's D is split over every device, as in the train
    step) and the head gathered whole; the decode step gathers the head over the batch axes
    only (D / C)."""
    m = cfg.model
    rl, sp = cfg.rl, cfg.sampling
    itemsize = np.dtype(DTYPES[m.dtype]).itemsize
    tensor = sizes.get("tensor", 1) if rules.get("vocab") == ("tensor",) else 1
    context = context_split(sizes, rules)
    head = m.hidden_size * m.vocab_size // tensor * itemsize
    per_call = min(rl.prompts_per_rollout * rl.num_generations, sp.batch_size * rl.num_generations)
    cache = rollout_kv_cache_bytes(cfg, sizes, rules)
    if context > 1:
        prompts = per_call * max(cfg.data.prompt_buckets) * m.hidden_size * itemsize
        held = cache + prompts + head + head // context
    else:
        held = 3 * cache // 2 + HEAD_COPIES * head
    if m.num_experts:  # the prefill's MoE layers route every prompt token
        rows = _rows_per_device(per_call, _axis_split(sizes, rules, "batch"))
        tokens = rows * max(cfg.data.prompt_buckets) // context
        held += moe_layer_bytes(cfg, sizes, rules, tokens, backward=False)
    return policy_params + held


def rollout_logits_bytes(cfg: Config, sizes: dict[str, int], rules: shd.Rules) -> int:
    """The float32 logits and log-softmax [rows, N, V] of the log-prob forward that scores a
    rollout's response tokens, rl.forward_batch_size rows at a time (0: all at once; rows split
    over the batch axes, V over `vocab`'s). With rl.pack_rows K > 1 a chunk packs into at most
    its plain row count, and each packed row's logits are taken at min(K x N, W) positions (its
    slots' response positions or its own W = P + N; `response_logprobs`). With context
    parallelism a device holds 1 / C of the positions."""
    m, rl = cfg.model, cfg.rl
    rows = _rows_per_device(
        rl.forward_batch_size or rl.prompts_per_rollout * rl.num_generations,
        _axis_split(sizes, rules, "batch"),
    )
    n = cfg.sampling.max_new_tokens
    positions = min(rl.pack_rows * n, max(cfg.data.prompt_buckets) + n) if rl.pack_rows > 1 else n
    positions //= context_split(sizes, rules)
    vocab_div = _axis_split(sizes, rules, "vocab")
    vocab = m.vocab_size // vocab_div if m.vocab_size % vocab_div == 0 else m.vocab_size
    return rows * positions * vocab * 4 * 2


def reward_model_bytes(cfg: Config, num_devices: int) -> int:
    """The reward model's parameters per device, as `trainers.rm.load_reward_model` places them
    (FSDP over all devices, the RM run's tensor axis). Its run config (or a Hugging Face
    directory's config.json) gives the architecture when `rl.reward_model` exists here;
    otherwise it is assumed to be the policy's."""
    from jaxalign.hf.model import hf_model_dir, run_config

    rm_cfg = cfg
    config_path = Path(cfg.rl.reward_model) / "config.yaml"
    if config_path.is_file():
        rm_cfg = load_config(config_path)
    elif (hf_dir := hf_model_dir(cfg.rl.reward_model)) is not None:
        rm_cfg = run_config(hf_dir, reward=True, where="rl.reward_model")
    sizes = shd.axis_sizes(shd.fsdp_everywhere(rm_cfg.mesh), num_devices)
    rules = shd.resolve_rules(rm_cfg.sharding)
    return model_bytes(_abstract(RewardModel, rm_cfg.model), sizes, rules).params


def _abstract(cls, model_cfg: ModelConfig):
    return nnx.eval_shape(lambda: cls(model_cfg, nnx.Rngs(0)))


@dataclass
class Estimate:
    """The plan being built, for `Algorithm.memory_terms` to add to: the trained policy's
    bytes (`policy`), the counted `parts` and the `host` ones, in print order."""

    cfg: Config
    sizes: dict[str, int]
    rules: shd.Rules
    num_devices: int
    freeze: list[str]
    trainable: Callable[[str], bool] | None
    policy: ModelBytes
    parts: dict[str, int]
    host: dict[str, int]
    num_params: int

    def model_bytes(self, module: Any, prefix: str = "") -> ModelBytes:
        """`model_bytes` of an abstract module whose parameters sit at `prefix` of the tree."""
        dtype = self.cfg.model.dtype
        found = model_bytes(
            module, self.sizes, self.rules, self.freeze, prefix, self.trainable, dtype
        )
        if found.copies:
            self.parts["weight copies"] = self.parts.get("weight copies", 0) + found.copies
        if self.cfg.train.grad_accum > 1 and found.accumulator:
            key = "grad accumulator"
            self.parts[key] = self.parts.get(key, 0) + found.accumulator
        return found


def make_plan(cfg: Config, num_devices: int, platform: str | None = None) -> Plan:
    """The per-device memory plan of `cfg` on `num_devices` devices of `platform` ("cpu",
    "gpu", "tpu": what `auto` model settings resolve for; default JAX's default backend)."""
    if platform is not None:
        from jaxalign.models import auto

        with auto.platform_named(platform):
            return make_plan(cfg, num_devices)
    sizes = shd.axis_sizes(cfg.mesh, num_devices)
    rules = shd.resolve_rules(cfg.sharding)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    batch_div = _axis_split(sizes, rules, "batch")
    if micro % batch_div:
        raise ConfigError(
            f"train.batch_size: micro-batch of {micro} rows does not divide by the "
            f"batch mesh axes (size {batch_div})"
        )
    freeze = freeze_patterns(cfg)
    algorithm = get_trainer(cfg.trainer)
    prefix = f"{algorithm.policy_key}/" if algorithm.policy_key else ""
    abstract = nnx.eval_shape(lambda: algorithm.make_policy(cfg, nnx.Rngs(0)))
    trainable = None
    if cfg.model.lora is not None:  # the base has no gradient and no optimizer state
        trainable = lora_trainable(cfg.model.lora, algorithm.lora_trained(cfg))
    policy = model_bytes(abstract, sizes, rules, freeze, prefix, trainable, cfg.model.dtype)
    parts = {
        "params": policy.params,
        "optimizer": policy.optimizer,
        "gradients": policy.gradients,
        "activations": activation_bytes(cfg, sizes, rules),
    }
    if policy.copies:
        parts["weight copies"] = policy.copies
    if cfg.train.grad_accum > 1 and policy.accumulator:
        parts["grad accumulator"] = policy.accumulator
    # What the trainer keeps besides: DPO's reference; PPO's value model; RL's rollout.
    estimate = Estimate(
        cfg, sizes, rules, num_devices, freeze, trainable, policy, parts, {}, policy.num_params
    )
    algorithm.memory_terms(cfg, estimate)
    rollout = None
    if algorithm.is_rl:
        rollout = rollout_generate_bytes(cfg, sizes, rules, policy.params)
    active = None
    if cfg.model.num_experts:
        from jaxalign.metrics import moe_param_count

        active = moe_param_count(cfg.model)["active"]
    return Plan(
        mesh=sizes,
        num_params=estimate.num_params,
        parts=parts,
        host=estimate.host,
        active_params=active,
        rollout_generate=rollout,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:8.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: Plan, hbm_gib: float | None) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    count = (
        f"{plan.num_params / 1e9:.2f}B"
        if plan.num_params >= 1e9
        else f"{plan.num_params / 1e6:.2f}M"
    )
    active = ""
    if plan.active_params is not None:
        active = f" ({_count(plan.active_params)} active per token, for FLOPs)"
    lines = [
        f"mesh: {mesh} ({math.prod(plan.mesh.values())} devices); {count} parameters{active}",
        "per device:",
    ]
    for name, nbytes in plan.parts.items():
        lines.append(f"  {name:<17} {_size(nbytes)}")
    for name, nbytes in plan.host.items():
        lines.append(
            f"  {name:<17} {_size(nbytes)}  in host memory between uses "
            f"(rl.offload_frozen): not counted"
        )
    lines.append(
        f"  {'total':<17} {_size(plan.total)}" + (f" of {hbm_gib:g} GiB" if hbm_gib else "")
    )
    return "\n".join(lines)


def check_fits(plan: Plan, hbm_gib: float) -> None:
    if plan.total > hbm_gib * GIB:
        parts = ", ".join(f"{name} {nbytes / GIB:.1f}" for name, nbytes in plan.parts.items())
        raise ConfigError(
            f"plan: needs {plan.total / GIB:.1f} GiB per device but only "
            f"{hbm_gib:g} GiB are available ({parts})"
        )
