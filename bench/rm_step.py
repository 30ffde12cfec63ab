"""Reward-model train-step throughput: jaxalign's real RM step vs PyTorch + transformers.

    python bench/rm_step.py                        # sizes tiny,7m
    python bench/rm_step.py --sizes 7m,50m --repeats 7 --variant 'qb0:model.attention_query_block=0'

The JAX side is `trainer: rm` as users run it: `RewardModel` (the Llama transformer + a scalar
head on the last real token), the Bradley-Terry loss (`RewardModelAlgorithm.loss_fn`: chosen and
rejected rows in one forward pass, `rm.center_coef` term, reward metrics), through
`Trainer.compile_step` (clipping, AdamW, donated state). The baseline does the same work:
`transformers.LlamaModel` + a [D] head on the last real token, -log s(r_c - r_r) +
center_coef (r_c + r_r)^2 averaged over pairs, global-norm clipping, `torch.optim.AdamW` with the
same hyperparameters and weight-decay mask (the head is decayed, as in jaxalign.optim), same
pairs and sequence length, f32. tokens/s counts the tokens of chosen and rejected rows; MFU uses
6 N + attention per token with N excluding the unused LM head.

Workers, allocators, turns and `--variant`: as bench/sft_step.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# batch_size is in pairs (each pair is two rows of seq_len tokens).
SIZES = common.step_sizes("configs/rm_tiny.yaml")


def build_jax(args):
    """(trainer, state, batch, info) for `args.size`."""
    import jax

    from jaxalign.metrics import param_count, train_flops_per_token
    from jaxalign.trainers.loop import Trainer
    from jaxalign.trainers.rm import RewardModelAlgorithm

    class SyntheticRM(RewardModelAlgorithm):
        def __init__(self, cfg):  # skips the tokenizer: the batch is in memory
            self.cfg = cfg

        def initial_params(self, trainer):
            return None

    cfg = common.step_config(SIZES[args.size], args.set, common.scratch_dir("bench_rm_"), ROOT)
    t, m = cfg.train, cfg.model
    trainer = Trainer(cfg, SyntheticRM(cfg), devices=jax.devices()[:1])
    state = trainer.fresh_state()
    batch = trainer.to_global(
        common.synthetic_pairs(t.batch_size, t.seq_len, m.vocab_size, t.grad_accum)
    )
    # No LM head in a reward model: its 6 x D x V FLOPs per token are not done.
    flops = train_flops_per_token(m, t.seq_len) - 6 * m.hidden_size * m.vocab_size
    model = common.model_summary(m)
    info = {
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "tokens_per_step": 2 * t.batch_size * t.seq_len,
        # What jaxalign's RewardModel holds (its backbone keeps an unused LM head when untied).
        "params": param_count(m)["total"] + m.hidden_size,
        "flops_per_token": flops,
        "model": model,
        "center_coef": cfg.rm.center_coef,
        "overrides": list(args.set),
        "torch_build": {
            "model": model,
            "pairs": t.batch_size,
            "seq_len": t.seq_len,
            "center_coef": cfg.rm.center_coef,
        },
    }
    return trainer, state, batch, info


def build_torch(cmd: dict, adamw: str):
    """The baseline: LlamaModel + scalar head on the last real token, Bradley-Terry loss,
    clipping, AdamW + schedule; returns (step, info)."""
    import torch
    import transformers

    m, pairs, seq_len = cmd["model"], cmd["pairs"], cmd["seq_len"]
    torch.manual_seed(0)

    class RewardModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conf = common.torch_llama_config(m, seq_len)
            self.backbone = transformers.LlamaModel(conf)
            self.score = torch.nn.Parameter(0.02 * torch.randn(m["hidden_size"]))

        def forward(self, input_ids, attention_mask):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
            last = attention_mask.sum(-1) - 1  # right padding: the last real token
            final = hidden[torch.arange(hidden.shape[0]), last]
            return final.float() @ self.score.float()

    model = RewardModel().to(torch.float32).train()
    opt, sched = common.torch_optimizer(model, adamw)
    batch = common.synthetic_pairs(pairs, seq_len, m["vocab_size"])
    ids = torch.from_numpy(batch["tokens"].reshape(-1, seq_len)).long()  # [2P, T]
    mask = torch.from_numpy(batch["segment_ids"].reshape(-1, seq_len) > 0).long()
    margin = torch.from_numpy(batch["margin"].reshape(-1))
    center = cmd["center_coef"]

    def loss_fn():
        rewards = model(ids, mask).view(-1, 2)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        losses = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
        return (losses + center * (chosen + rejected) ** 2).mean()

    step = common.torch_train_step(model.parameters(), opt, sched, loss_fn)

    info = {
        "adamw": adamw,
        "attn_implementation": model.backbone.config._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return step, info


def markdown(data: dict) -> str:
    """This benchmark's table from its JSON."""
    return common.step_markdown(data)


def main(argv=None) -> dict:
    return common.step_main(__file__, __doc__, SIZES, "tiny,7m", build_jax, build_torch, argv)


if __name__ == "__main__":
    main()
