"""Loading a LoRA run for the commands that read one (generate, rejection-sample, eval, score,
rl.reward_model): the base rebuilt and checked against the one the checkpoint records, then the
checkpoint's trained part put on it. Kept out of `models.lora` (which the model modules import)
so that the model code does not depend on checkpoints, the optimizer or Hugging Face loading."""

from __future__ import annotations

import jax
from flax import nnx

from jaxalign.models.lora import base_params, base_reference


def check_saved_base(step_dir, cfg) -> None:
    """UserError in one line unless the LoRA checkpoint `step_dir` was saved on the base that
    `cfg` names (`base_reference(cfg)`)."""
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.errors import UserError

    want = base_reference(cfg)
    saved = Checkpointer._saved_base(step_dir)
    if saved is None or saved.get("hash") != want["hash"]:
        was = "no base recorded" if saved is None else f"base {saved.get('source')}"
        raise UserError(
            f"{step_dir}: this LoRA checkpoint was trained on another base ({was}, hash "
            f"{(saved or {}).get('hash')}) than its config names: {want['source']} "
            f"(hash {want['hash']})"
        )


def load_run_params(path, cfg, algorithm, abstract, shardings):
    """The parameters of a LoRA run's checkpoint (`path`: a run, its checkpoints or one step)
    for `algorithm.policy_params` of its trained module (the policy of PPO's actor-critic; the
    whole module otherwise), whose abstract params and shardings are `abstract`, `shardings`.

    The checkpoint holds only the trained leaves: the frozen base is rebuilt as the trainer built
    it (`init_from`'s checkpoint, `model.from_hf`, or the seeded init of `cfg.train.seed`),
    checked against the base the checkpoint records (`check_saved_base`), and the checkpoint's
    leaves (adapters, `model.lora.train`'s, a reward model's score head) put in place."""
    from jaxalign.checkpoint import abstract_with_shardings, load_params, resolve_checkpoint
    from jaxalign.optim import trained_labels, trained_part, with_trained

    step_dir = resolve_checkpoint(path)
    check_saved_base(step_dir, cfg)
    full = nnx.eval_shape(lambda: algorithm.make_model(cfg, nnx.Rngs(0)))
    full_abstract = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.split(full)[1].to_pure_dict()
    )
    labels = algorithm.policy_params(trained_labels(cfg, full_abstract))
    target = abstract_with_shardings(abstract, shardings)
    trained = load_params(step_dir, algorithm.policy_target(trained_part(target, labels)))
    base_target, base_shardings = base_params(target), base_params(shardings)
    if cfg.init_from:
        base = load_params(cfg.init_from, base_target)
    elif cfg.model.from_hf:
        from jaxalign import hf

        base = hf.load_params(cfg.model.from_hf, cfg.model, base_params(abstract), base_shardings)
    else:  # the seeded init the trainer made (XLA computes only the base leaves asked for)

        def init(key):
            model = algorithm.make_model(cfg, nnx.Rngs(params=key))
            return base_params(algorithm.policy_params(nnx.split(model)[1].to_pure_dict()))

        base = jax.jit(init, out_shardings=base_shardings)(jax.random.PRNGKey(cfg.train.seed))
    return with_trained(base, algorithm.policy_params(trained))
