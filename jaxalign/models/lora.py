"""Low-rank adapters (LoRA) as a model transform, for any registered model family.

`add_adapters(model, lora_cfg, rngs)` gives every weight whose path `model.lora.targets` matches
two sibling parameters in the same module: `<weight>_lora_a` and `<weight>_lora_b`. For a weight
of shape in_shape + out_shape (a `dense(x, w, n_in)` weight: its first n_in dims contract; a
module declares n_in > 1 in its class attribute `lora_in_dims`, e.g. `{"wo": 2}`):

    A: in_shape + (rank,)   logical axes in_axes + ("lora_rank",)
    B: (rank,) + out_shape  logical axes ("lora_rank",) + out_axes

with the leading "layers" axis of scanned blocks on both. So A keeps the base weight's input
sharding and B its output sharding under any rules table, and "lora_rank" is always replicated.

The forward reads weights through `project` (every `dense` of a weight), `embed_lookup` (an
embedding: A [vocab, r] looked up, then @ B) and `merged_weight` (a weight the losses take whole,
the LM head). `project` computes x @ W + (dropout(x) @ A) @ B * scale as two skinny matmuls; A @ B
is never built there. Inside `with adapters_off():` (at trace time) the same model and the same
parameters compute the base model: the DPO reference without a second copy of the weights.

`build(model_cfg, rngs)` applies this to every family when `model_cfg.lora` is set (see
`jaxalign/models/registry.py`), so a reward model's backbone and PPO's policy and value get
adapters at the same paths under their prefix.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.errors import ConfigError
from jaxalign.models.lora_config import LoraConfig
from jaxalign.models.ops import dense, param

LORA_A = "_lora_a"
LORA_B = "_lora_b"
RANK_AXIS = "lora_rank"

_ADAPTERS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_off", default=False)
# (key, number of dropout masks drawn so far) while a train step traces its loss; None: no dropout.
_DROPOUT: contextvars.ContextVar[list | None] = contextvars.ContextVar("lora_drop", default=None)


@contextlib.contextmanager
def adapters_off() -> Iterator[None]:
    """Within this block (at trace time), models compute their base: adapters are skipped."""
    token = _ADAPTERS_OFF.set(True)
    try:
        yield
    finally:
        _ADAPTERS_OFF.reset(token)


@contextlib.contextmanager
def dropout_key(key: jax.Array) -> Iterator[None]:
    """Within this block (at trace time), adapters with `dropout > 0` draw their masks from
    `key` (the generic train step wraps each micro-batch's loss in it; evals run without)."""
    token = _DROPOUT.set([key, 0])
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined parameter path names a LoRA A or B."""
    return path.endswith(LORA_A) or path.endswith(LORA_B)


def path_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """A predicate on parameter paths: some pattern fullmatches the path or a '/'-suffix of it
    ('embed' matches 'embed' and 'backbone/embed')."""
    compiled = [re.compile(rf"(?:.*/)?(?:{p})") for p in patterns]
    return lambda path: any(c.fullmatch(path) for c in compiled)


def trainable(lora_cfg: LoraConfig, extra: list[str] = ()) -> Callable[[str], bool]:
    """Which parameters train under LoRA: the adapters, `lora.train`'s and `extra` (what the
    trainer always trains, e.g. a reward model's score head)."""
    also = path_matcher([*lora_cfg.train, *extra])
    return lambda path: is_adapter(path) or also(path)


def base_params(params: dict) -> dict:
    """`params` (a pure nested dict) without its adapter leaves: the base model's tree."""
    if not isinstance(params, dict):
        return params
    return {
        k: base_params(v)
        for k, v in params.items()
        if not (isinstance(k, str) and (k.endswith(LORA_A) or k.endswith(LORA_B)))
    }


# -- building ------------------------------------------------------------------------------------


def _param_paths(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, str, nnx.Param]]:
    for path, module in nnx.iter_modules(model):
        for name, value in list(vars(module).items()):
            if isinstance(value, nnx.Param):
                yield "/".join(str(p) for p in (*path, name)), module, name, value


def add_adapters(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Add A and B next to every weight `cfg.targets` matches (in place; returns `model`).
    B starts at zero (A for embeddings, as PEFT), so the model computes its base exactly."""
    found = list(_param_paths(model))
    is_target = path_matcher([cfg.targets])
    targets = [entry for entry in found if is_target(entry[0])]
    if not targets:
        shown = ", ".join(p for p, *_ in found[:8]) + (", ..." if len(found) > 8 else "")
        raise ConfigError(f"model.lora.targets: {cfg.targets!r} matches no parameter ({shown})")
    for path, module, name, weight in targets:
        axes = tuple(weight.get_metadata().get("out_sharding") or ())
        lead = 1 if axes[:1] == ("layers",) else 0
        n_in = dict(getattr(type(module), "lora_in_dims", {})).get(name, 1)
        shape = weight.shape
        if len(axes) != len(shape) or len(shape) - lead < n_in + 1:
            raise ConfigError(
                f"model.lora.targets: {path} (shape {tuple(shape)}) is not a matrix with logical "
                f"axes; target projection weights"
            )
        pd = weight.dtype
        cut = lead + n_in
        a_shape = (*shape[:cut], cfg.rank)
        b_shape = (*shape[:lead], cfg.rank, *shape[cut:])
        a_axes = (*axes[:cut], RANK_AXIS)
        b_axes = (*axes[:lead], RANK_AXIS, *axes[cut:])
        key = rngs.params()
        embedding = name in getattr(type(module), "lora_embeddings", ())
        if embedding:  # PEFT: A = 0, B ~ N(0, 1)
            a = jnp.zeros(a_shape, pd)
            b = jax.random.normal(key, b_shape, jnp.float32).astype(pd)
        else:
            if cfg.init == "kaiming":  # torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))
                bound = 1.0 / math.sqrt(math.prod(shape[lead:cut]))
                a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(key, a_shape, jnp.float32) / cfg.rank
            a, b = a.astype(pd), jnp.zeros(b_shape, pd)
        setattr(module, name + LORA_A, param(a, a_axes))
        setattr(module, name + LORA_B, param(b, b_axes))
        module.lora_config = cfg  # static: read by project / embed_lookup / merged_weight
        if cfg.quantize != "none" and not embedding:  # QLoRA: the frozen base quantized
            _check_quantizable(path, tuple(shape[lead:]), cfg)
            q, q_axes = quantize_weight(weight[...], axes, cfg)
            setattr(module, name, nnx.Dict({k: param(v, q_axes[k]) for k, v in q.items()}))
    return model


def share_base(target: nnx.Module, source: nnx.Module) -> None:
    """Make `target`'s base parameters (every non-adapter parameter) the very `nnx.Param`s of
    `source` at the same paths (in place): one copy of the base weights, read by both. `target`
    keeps its own adapters. `nnx.split` of a module holding both lists each shared parameter
    once, at its first path (PPO's critic on the policy's base: under `policy/`)."""
    source_params = {path: (module, name) for path, module, name, _ in _param_paths(source)}
    for path, module, name, _ in list(_param_paths(target)):
        if is_adapter(path):
            continue
        if path not in source_params:
            raise ValueError(f"share_base: {path} has no counterpart in the source module")
        owner, owner_name = source_params[path]
        setattr(module, name, getattr(owner, owner_name))


def _check_quantizable(path: str, shape: tuple[int, ...], cfg: LoraConfig) -> None:
    """ConfigError (one line naming the weight) when `cfg` cannot quantize a layer's weight of
    `shape`: a block size that does not tile it, or NF4 codes of an odd last axis."""
    from jaxalign.models import quant

    try:
        quant.block_tile(shape, cfg.quant_block)
    except ValueError:
        raise ConfigError(
            f"model.lora.quant_block: {cfg.quant_block} does not tile {path} (shape "
            f"{shape}): the block must divide its last axis ({shape[-1]}) or be a whole number "
            "of its trailing rows"
        ) from None
    if cfg.quantize == "nf4" and shape[-1] % 2:
        raise ConfigError(
            f"model.lora.quantize: nf4 packs two codes per byte, but {path} (shape {shape}) "
            "has an odd last axis; use int8"
        )


def quantize_weight(w: jax.Array, axes: tuple, cfg: LoraConfig) -> tuple[dict, dict]:
    """(the quantized weight, its arrays' logical axes) of a base weight `w` with logical `axes`
    under `cfg.quantize` (QLoRA; `jaxalign.models.quant`): each scanned layer quantized on its
    own, so a stacked weight equals the stack of its layers' quantizations."""
    from jaxalign.models import quant

    def one(x):
        return quant.quantize(x, cfg.quantize, cfg.quant_block, cfg.double_quantization)

    q = jax.vmap(one)(w) if tuple(axes[:1]) == ("layers",) else one(w)
    return q, quant.logical_axes(q, tuple(axes))


def is_quantized(value) -> bool:
    """Whether a parameter subtree (a pure dict, or an nnx.Dict) is a quantized base weight."""
    return isinstance(value, (dict, nnx.Dict)) and "codes" in value


def quantize_params(
    plain: dict, names: dict, cfg: LoraConfig, shardings: dict, plain_shardings: dict
) -> dict:
    """A full-precision base tree (`plain`, anywhere: e.g. in host memory; logical axes `names`)
    on the devices: each weight that `shardings` (a QLoRA model's) holds quantized is put on its
    full-precision sharding (`plain_shardings`), quantized there by a jitted `quantize_weight`
    into the quantized shardings, and released, one weight at a time; every other leaf is put on
    its sharding. What a QLoRA run does to a base loaded from a checkpoint or a Hugging Face
    directory. Consumes `plain` (its arrays are deleted). Deterministic: the same base gives the
    same codes and scales."""
    out = {}
    for key, value in plain.items():
        target = shardings.get(key) if isinstance(shardings, dict) else None
        if is_quantized(target):

            def one(w, axes=tuple(names[key])):
                return quantize_weight(w, axes, cfg)[0]

            w = jax.device_put(value, plain_shardings[key])
            out[key] = jax.jit(one, out_shardings=target)(w)
            for array in {id(w): w, id(value): value}.values():
                if isinstance(array, jax.Array) and not array.is_deleted():
                    array.delete()
        elif isinstance(value, dict):
            out[key] = quantize_params(value, names[key], cfg, target, plain_shardings[key])
        else:
            out[key] = jax.device_put(value, plain_shardings[key])
    return out


# -- the forward ---------------------------------------------------------------------------------


def _adapter(module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array] | None:
    """(A, B) of `module.<name>`, or None when it has none or adapters are off."""
    a = getattr(module, name + LORA_A, None)
    if a is None or _ADAPTERS_OFF.get():
        return None
    return a[...], getattr(module, name + LORA_B)[...]


def _quantized(module: nnx.Module, name: str) -> dict | None:
    """The arrays of `module.<name>` when it is a quantized base weight (QLoRA), else None."""
    value = getattr(module, name)
    if not isinstance(value, nnx.Dict):
        return None
    return {k: v[...] for k, v in value.items()}


def base_weight(module: nnx.Module, name: str) -> jax.Array:
    """The base weight `module.<name>` as an array; a quantized one (QLoRA) dequantized to the
    float32 it approximates."""
    if (q := _quantized(module, name)) is not None:
        from jaxalign.models import quant

        return quant.dequantize(q)
    return getattr(module, name)[...]


def _dropout(x: jax.Array, rate: float) -> jax.Array:
    state = _DROPOUT.get()
    if rate == 0.0 or state is None:
        return x
    key = jax.random.fold_in(state[0], state[1])
    state[1] += 1
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def project(module: nnx.Module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
    """`dense(x, module.<name>, n_in)` plus its adapter: x @ W + (dropout(x) @ A) @ B * scale.
    x: [..., *in_shape] -> [..., *out_shape], in x's dtype."""
    if (q := _quantized(module, name)) is not None:  # dequantized on the fly, no gradient
        from jaxalign.models import quant

        y = quant.quant_dense(x, q, n_in)
    else:
        y = dense(x, getattr(module, name)[...], n_in)
    adapter = _adapter(module, name)
    if adapter is None:
        return y
    a, b = adapter
    cfg: LoraConfig = module.lora_config
    h = dense(_dropout(x, cfg.dropout), a, n_in)  # [..., r]
    return y + dense(h, b) * jnp.asarray(cfg.scale, y.dtype)


def embed_lookup(module: nnx.Module, name: str, tokens: jax.Array) -> jax.Array:
    """Rows `tokens` of the embedding `module.<name>` [V, D] plus A[tokens] @ B * scale, in the
    parameter dtype. tokens: [...] int -> [..., D]."""
    x = jnp.take(base_weight(module, name), tokens, axis=0)
    adapter = _adapter(module, name)
    if adapter is None:
        return x
    a, b = adapter
    h = jnp.take(a, tokens, axis=0)  # [..., r]
    return x + dense(h, b) * jnp.asarray(module.lora_config.scale, x.dtype)


def merged_weight(module: nnx.Module, name: str) -> jax.Array:
    """`module.<name>` with its adapter merged in: W + A @ B * scale (for weights the losses
    read whole, such as the LM head, and for export)."""
    w = base_weight(module, name)
    adapter = _adapter(module, name)
    if adapter is None:
        return w
    a, b = adapter
    r = a.shape[-1]
    delta = a.reshape(-1, r) @ b.reshape(r, -1) * module.lora_config.scale
    return w + delta.reshape(w.shape).astype(w.dtype)


# -- checkpoints ---------------------------------------------------------------------------------


def _file_digest(path, digest, chunk: int = 1 << 20) -> None:
    """Fold a file's name-independent size and its first and last MiB into `digest`: cheap on
    a multi-GB base, and any re-saved or different weights change it."""
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            digest.update(f.read(chunk))


def base_reference(cfg) -> dict[str, str]:
    """What a LoRA checkpoint records of the frozen base it adapts: {"source", "hash"}.

    source: `init_from`'s checkpoint, `model.from_hf`'s directory, or "seed <n>" (a seeded
    init). hash: sha256 over the base's files (relative names, sizes, first and last MiB each;
    deterministic and cheap; `init_from` a LoRA run: its adapters' files and the base reference
    it recorded), or over the model config and seed for a seeded init."""
    import hashlib
    import json
    from dataclasses import asdict, replace
    from pathlib import Path

    digest = hashlib.sha256()
    files: list[Path] = []
    if cfg.init_from:
        from jaxalign.checkpoint import resolve_checkpoint

        root = Path(resolve_checkpoint(cfg.init_from)) / "state"
        source = str(root.parent)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        recorded = root.parent / "base" / "metadata"  # a LoRA run: its own base, by hash
        if recorded.is_file():
            digest.update(recorded.read_bytes())
    elif cfg.model.from_hf:
        root = Path(cfg.model.from_hf)
        source = str(root)
        files = sorted(
            p
            for p in root.iterdir()
            if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
        )
    else:
        source = f"seed {cfg.train.seed}"
        base_model = asdict(replace(cfg.model, lora=None, from_hf=None))
        digest.update(json.dumps([base_model, cfg.train.seed], sort_keys=True).encode())
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        _file_digest(path, digest)
    return {"source": source, "hash": digest.hexdigest()[:32]}
