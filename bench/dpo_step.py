"""DPO train-step throughput: jaxalign's real DPO step vs PyTorch + transformers, same shapes.

    python bench/dpo_step.py                       # sizes tiny,7m
    python bench/dpo_step.py --sizes 7m,50m --variant 'chunks4:loss.vocab_chunks=4'

The JAX side is `trainer: dpo` (sigmoid loss) as users run it: the policy forward with gradient
and the frozen reference (a copy of the initial parameters, `DPO.frozen_params`) forward, chosen
and rejected rows in one pass each, sequence log-probs summed over completion tokens
(`policy_statistics`, with `loss.vocab_chunks`), `dpo_loss`, the DPO metrics, through
`Trainer.compile_step` (clipping, AdamW, donated state). The baseline does the same work, as TRL
does it: `LlamaForCausalLM` policy forward with grad and a frozen copy under `torch.no_grad()`,
log-softmax of the [2P, T, V] logits gathered at the next tokens and summed over completion
tokens, -log s(beta ((pi_c - pi_r) - (ref_c - ref_r))) averaged over pairs, global-norm clipping,
`torch.optim.AdamW` with the same hyperparameters, same pairs and sequence length, f32.
tokens/s counts the tokens of chosen and rejected rows; MFU counts 6 N + attention per token for
the policy and 2 N + forward attention for the reference.

Workers, allocators, turns and `--variant`: as bench/sft_step.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# batch_size is in pairs (each pair is two rows of seq_len tokens).
SIZES = common.step_sizes("configs/dpo_tiny.yaml")


def build_jax(args):
    """(trainer, state, batch, info) for `args.size`; trainer.frozen holds the reference."""
    import jax

    from jaxalign.metrics import param_count, train_flops_per_token
    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import Trainer

    class SyntheticDPO(DPO):
        def __init__(self, cfg):  # skips the tokenizer: the batch is in memory
            self.cfg = cfg
            self.reference_free = False
            self.precompute = False
            self._train = self._eval = self._eval_ref = None

    sets = ["dpo.loss_type=sigmoid", "dpo.precompute_ref=false", *args.set]
    cfg = common.step_config(SIZES[args.size], sets, common.scratch_dir("bench_dpo_"), ROOT)
    t, m = cfg.train, cfg.model
    algorithm = SyntheticDPO(cfg)
    trainer = Trainer(cfg, algorithm, devices=jax.devices()[:1])
    params = trainer.initial_params()
    trainer.frozen = algorithm.frozen_params(trainer, params)  # as Trainer.run does
    state = trainer.fresh_state(params)
    batch = trainer.to_global(
        common.synthetic_pairs(t.batch_size, t.seq_len, m.vocab_size, t.grad_accum)
    )
    train = train_flops_per_token(m, t.seq_len)
    model = common.model_summary(m)
    info = {
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "tokens_per_step": 2 * t.batch_size * t.seq_len,
        "params": param_count(m)["total"],
        "flops_per_token": train + train / 3,  # + the reference forward (2 N + attention)
        "model": model,
        "beta": cfg.dpo.beta,
        "loss_config": {"vocab_chunks": cfg.loss.vocab_chunks},
        "overrides": list(args.set),
        "torch_build": {
            "model": model,
            "pairs": t.batch_size,
            "seq_len": t.seq_len,
            "beta": cfg.dpo.beta,
        },
    }
    return trainer, state, batch, info


def build_torch(cmd: dict, adamw: str):
    """The baseline: policy + frozen reference LlamaForCausalLM, sequence log-probs over
    completion tokens, sigmoid DPO loss, clipping, AdamW + schedule; returns (step, info)."""
    import copy

    import torch
    import transformers

    m, pairs, seq_len, beta = cmd["model"], cmd["pairs"], cmd["seq_len"], cmd["beta"]
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(common.torch_llama_config(m, seq_len))
    policy = policy.to(torch.float32).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    opt, sched = common.torch_optimizer(policy, adamw)
    batch = common.synthetic_pairs(pairs, seq_len, m["vocab_size"])
    ids = torch.from_numpy(batch["tokens"].reshape(-1, seq_len)).long()  # [2P, T]
    attention_mask = torch.from_numpy(batch["segment_ids"].reshape(-1, seq_len) > 0).long()
    target_mask = torch.from_numpy(batch["loss_mask"].reshape(-1, seq_len))[:, 1:]
    targets = ids[:, 1:, None]

    def sequence_logps(model):
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets)[..., 0]
        return (logps * target_mask).sum(-1).view(-1, 2)

    def loss_fn():
        policy_logps = sequence_logps(policy)
        with torch.no_grad():
            ref_logps = sequence_logps(reference)
        diff = (policy_logps[:, 0] - policy_logps[:, 1]) - (ref_logps[:, 0] - ref_logps[:, 1])
        return -torch.nn.functional.logsigmoid(beta * diff).mean()

    step = common.torch_train_step(policy.parameters(), opt, sched, loss_fn)

    info = {
        "adamw": adamw,
        "attn_implementation": policy.config._attn_implementation,
        "params": sum(p.numel() for p in policy.parameters()),
    }
    return step, info


def markdown(data: dict) -> str:
    """This benchmark's table from its JSON."""
    return common.step_markdown(data)


def main(argv=None) -> dict:
    return common.step_main(__file__, __doc__, SIZES, "tiny,7m", build_jax, build_torch, argv)


if __name__ == "__main__":
    main()
