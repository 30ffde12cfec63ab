"""LoRA runs' parameters: a fresh run's (the base from `init_from`, `model.from_hf` or the seed,
QLoRA quantized as it loads, plus fresh adapters or `model.lora.from_peft`'s), and a saved run's
(`load_lora_run`: the base rebuilt the same way and checked against the one the checkpoint
records, then the checkpoint's trained part put on it), for every command that reads one
(generate, rejection-sample, eval, score, rl.reward_model, export) and for `init_from` a LoRA run
(`load_init_from`: the adapters merged into the base). Kept out of `models.lora` (which the model
modules import) so that the model code does not depend on checkpoints, the optimizer or Hugging
Face loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
    load_params,
    resolve_checkpoint,
)
from jaxalign.config import Config, MeshConfig, ShardingConfig, from_dict
from jaxalign.errors import ConfigError, UserError
from jaxalign.models.lora import base_params, base_reference, is_quantized, quantize_params
from jaxalign.models.params import build_model, init_params
from jaxalign.models.params import logical_axes as param_logical_axes
from jaxalign.optim import param_path, trained_labels, trained_part, with_trained


def check_saved_base(step_dir, cfg: Config) -> None:
    """UserError in one line unless the LoRA checkpoint `step_dir` was saved on the base that
    `cfg` names (`base_reference(cfg)`)."""
    want = base_reference(cfg)
    saved = Checkpointer._saved_base(Path(step_dir))
    if saved is None or saved.get("hash") != want["hash"]:
        was = "no base recorded" if saved is None else f"base {saved.get('source')}"
        raise UserError(
            f"{step_dir}: this LoRA checkpoint was trained on another base ({was}, hash "
            f"{(saved or {}).get('hash')}) than its config names: {want['source']} "
            f"(hash {want['hash']})"
        )


def _without_quantization(cfg: Config) -> Config:
    lora = dataclasses.replace(cfg.model.lora, quantize="none")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))


def load_base(cfg: Config, mesh: Mesh, rules: shd.Rules, algorithm, shardings, make_model=None):
    """The frozen base of a LoRA run of `algorithm` (an Algorithm class) from `init_from` (a
    checkpoint; a LoRA run's adapters merged in: `load_init_from`) or `model.from_hf`, on
    `shardings` (the parameter shardings of the module `make_model(cfg, rngs)` builds, default
    `algorithm.make_model`). A reward model started from a policy run takes that run's model
    as its backbone (`{"backbone": ...}`; its score head trains, it is not part of the base).
    QLoRA: quantized as it loads (`_load_base`)."""
    if algorithm.is_reward_model and cfg.init_from:
        source = checkpoint_config(resolve_checkpoint(cfg.init_from))
        if source is None or source.trainer != cfg.trainer:
            from jaxalign.models.registry import build

            def backbone(c, rngs):
                return build(c.model, rngs)

            return {"backbone": _load_base(cfg, mesh, rules, backbone, shardings["backbone"])}
    return _load_base(cfg, mesh, rules, make_model or algorithm.make_model, shardings)


def _load_base(cfg: Config, mesh: Mesh, rules: shd.Rules, make_model, shardings):
    """`load_base` of the module `make_model(cfg, rngs)`. QLoRA: the full-precision base loads
    into host memory, then goes to the devices one weight at a time, quantized there: the
    devices never hold the whole unquantized base."""
    quantized = cfg.model.lora.quantize != "none"
    plain_cfg = _without_quantization(cfg) if quantized else cfg
    _, plain_abstract, plain_shardings = build_model(
        plain_cfg, mesh, rules, lambda rngs: make_model(plain_cfg, rngs)
    )
    base_abstract = base_params(plain_abstract)
    base_shardings = base_params(plain_shardings)
    load_shardings = base_shardings
    if quantized:
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        load_shardings = jax.tree.map(lambda _: host, base_shardings)
    if cfg.init_from:
        base = load_init_from(cfg.init_from, abstract_with_shardings(base_abstract, load_shardings))
    else:
        from jaxalign import hf

        base = hf.load_params(cfg.model.from_hf, cfg.model, base_abstract, load_shardings)
    if quantized:
        plain_model = nnx.eval_shape(lambda: make_model(plain_cfg, nnx.Rngs(0)))
        names = param_logical_axes(nnx.state(plain_model)).to_pure_dict()
        base = quantize_params(base, names, cfg.model.lora, base_params(shardings), base_shardings)
    return base


def lora_initial_params(
    cfg: Config, mesh: Mesh, rules: shd.Rules, algorithm, abstract_params, param_shardings, labels
) -> Any:
    """A fresh LoRA run's parameters (those of `algorithm.make_model`): the base from
    `init_from`, a Hugging Face model or the seed (`load_base`), and fresh adapters (the trained
    part of a seeded init: XLA computes only those leaves), or `model.lora.from_peft`'s."""

    def make(rngs):
        return algorithm.make_model(cfg, rngs)

    trained_shardings = trained_part(param_shardings, labels)
    if not (cfg.init_from or cfg.model.from_hf):
        params = init_params(cfg, param_shardings, cfg.train.seed, make)
    else:

        def init_trained(key):
            return trained_part(nnx.split(make(nnx.Rngs(params=key)))[1].to_pure_dict(), labels)

        trained = jax.jit(init_trained, out_shardings=trained_shardings)(
            jax.random.PRNGKey(cfg.train.seed)
        )
        base = load_base(cfg, mesh, rules, algorithm, param_shardings)
        params = with_trained(base, trained)
    if cfg.model.lora.from_peft:
        params = with_trained(
            params, peft_adapters(cfg, abstract_params, labels, trained_shardings)
        )
    return params


def peft_adapters(cfg: Config, abstract_params, labels, trained_shardings: Any) -> Any:
    """`model.lora.from_peft`'s adapters (and a reward model's score head) as the trained
    part of a run's parameters, placed on their shardings."""
    from jaxalign.hf.peft import read_peft_adapter

    source = cfg.model.lora.from_peft
    adapters, _ = read_peft_adapter(source, cfg.model)
    if cfg.trainer == "rm" and "backbone" not in adapters:
        adapters = {"backbone": adapters}
    abstract = trained_part(abstract_params, labels)
    want = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(adapters)}
    for path, spec in want.items():
        if path not in have:
            raise ConfigError(
                f"model.lora.from_peft: {source} has no tensor for {path}; its targets and "
                "rank must match model.lora's"
            )
        if tuple(have[path].shape) != tuple(spec.shape):
            raise ConfigError(
                f"model.lora.from_peft: {source}: {path} has shape "
                f"{tuple(have[path].shape)}, this run's is {tuple(spec.shape)} "
                "(model.lora.rank and the model config must match the adapter's)"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConfigError(
            f"model.lora.from_peft: {source} adapts {extra[0]}, which model.lora.targets "
            "does not name"
        )
    part = jax.tree_util.tree_map_with_path(
        lambda path, spec: np.asarray(have[param_path(path)], spec.dtype), abstract
    )
    return jax.device_put(part, trained_shardings)


def load_lora_run(
    path, cfg: Config, algorithm, mesh: Mesh, rules: shd.Rules, *, merged: bool = False
) -> Any:
    """The policy parameters (`algorithm.make_policy`'s: PPO's policy without its critic; the
    whole trained module otherwise) of the LoRA run checkpoint `path` (a run, its checkpoints or
    one step) trained under `cfg` by `algorithm` (an Algorithm class), on the shardings `mesh`
    and `rules` give them.

    The checkpoint holds only the trained leaves: the frozen base is rebuilt as the trainer
    built it (`init_from`, `model.from_hf` (QLoRA: quantized again, deterministically) or the
    seeded init of `train.seed`), checked against the base the checkpoint records (one UserError
    line otherwise), and the checkpoint's leaves (adapters, `model.lora.train`'s, a reward
    model's score head) put in place. `merged`: every adapter merged into its weight
    (`hf.peft.merge_lora`, float32 math; a quantized weight dequantized to float32), the
    adapter leaves dropped: the parameters of the base architecture."""
    step_dir = resolve_checkpoint(path)
    check_saved_base(step_dir, cfg)
    _, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: algorithm.make_policy(cfg, rngs)
    )
    full = nnx.eval_shape(lambda: algorithm.make_model(cfg, nnx.Rngs(0)))
    full_abstract = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.split(full)[1].to_pure_dict()
    )
    labels = algorithm.policy_params(trained_labels(cfg, full_abstract))
    target = abstract_with_shardings(
        trained_part(abstract, labels), trained_part(shardings, labels)
    )
    trained = algorithm.policy_params(load_params(step_dir, algorithm.policy_target(target)))
    if cfg.init_from or cfg.model.from_hf:
        base = load_base(cfg, mesh, rules, algorithm, shardings, algorithm.make_policy)
    else:  # the seeded init the trainer made (XLA computes only the base leaves asked for)

        def init(key):
            model = algorithm.make_model(cfg, nnx.Rngs(params=key))
            return base_params(algorithm.policy_params(nnx.split(model)[1].to_pure_dict()))

        base = jax.jit(init, out_shardings=base_params(shardings))(
            jax.random.PRNGKey(cfg.train.seed)
        )
    params = with_trained(base, trained)
    if merged:
        params = merge_adapters(params, cfg.model.lora)
    return params


def merge_adapters(params: dict, lora_cfg) -> dict:
    """`params` with every adapter merged into its weight and every remaining quantized weight
    dequantized (float32): a plain tree of the base architecture."""
    import jax.numpy as jnp

    from jaxalign.hf.peft import merge_lora
    from jaxalign.models import quant

    def plain(tree):
        if is_quantized(tree):
            return quant.dequantize(tree, jnp.float32)
        if isinstance(tree, dict):
            return {k: plain(v) for k, v in tree.items()}
        return tree

    return plain(merge_lora(params, lora_cfg))


def checkpoint_config(step_dir) -> Config | None:
    """The run config a checkpoint step recorded (its `config` item), or None if it has none."""
    path = Path(step_dir) / "config" / "metadata"
    if not path.is_file():
        return None
    return from_dict(Config, json.loads(path.read_text()))


def load_init_from(path, target) -> Any:
    """The parameters a run starting from checkpoint `path` (`init_from`, `rl.value_init_from`)
    reads, placed on `target` (ShapeDtypeStructs with shardings, a tree without adapters).

    A LoRA run's checkpoint holds only its adapters: its base is rebuilt and checked
    (`load_lora_run`) and the adapters merged into it, as peft's `merge_and_unload`; the new run
    then trains in full, or adds fresh adapters of its own on that merged base. Any other
    checkpoint loads as it is."""
    step_dir = resolve_checkpoint(path)
    run_cfg = checkpoint_config(step_dir)
    if run_cfg is None or run_cfg.model.lora is None:
        return load_params(step_dir, target)
    from jaxalign.trainers.registry import get_trainer

    # Loaded and merged on this run's mesh (the target's; a QLoRA base that loads into host
    # memory: the host's CPU device), then put on the target's shardings.
    leaf = jax.tree.leaves(target)[0]
    if isinstance(leaf.sharding, jax.sharding.NamedSharding):
        mesh = leaf.sharding.mesh
    else:
        host = list(leaf.sharding.device_set)[:1]
        mesh = shd.make_mesh(MeshConfig(fsdp=1), host)
    try:
        rules = shd.resolve_rules(run_cfg.sharding)
    except ConfigError:  # the run's rules file is not here
        rules = shd.resolve_rules(ShardingConfig())
    algorithm = get_trainer(run_cfg.trainer)
    params = load_lora_run(step_dir, run_cfg, algorithm, mesh, rules, merged=True)

    def shapes(tree):
        return {param_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = shapes(params), shapes(target)
    if got != want:
        name = min(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise UserError(
            f"{step_dir}: a LoRA {run_cfg.trainer} run's merged model does not fit this run's "
            f"model: {name} is {got.get(name, 'missing')} there, {want.get(name, 'missing')} here"
        )
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), params, target)
