"""SFT train-step throughput: jaxalign's real jitted step vs PyTorch + transformers, same shapes.

    python bench/sft_step.py                       # sizes tiny,7m,50m; tcmalloc if installed
    python bench/sft_step.py --sizes 7m --through-cli   # + the whole `jaxalign train` loop
    python bench/sft_step.py --sizes 7m --repeats 7 \
        --variant 'qb0:model.attention_query_block=0' \
        --variant 'chunks4:loss.vocab_chunks=4' \
        --variant 'fastmath:xla_flags=--xla_cpu_enable_fast_math=true'

The JAX side is what users run: `Trainer(cfg, SFT-loss algorithm, devices=jax.devices()[:1])`,
`trainer.fresh_state()`, `trainer.compile_step(batch)` (in/out shardings, donated state), called
inside the trainer's activation-sharding context, exactly as `Trainer._loop` does. The baseline is
`transformers.LlamaForCausalLM` with the same config (random weights, f32), `model(input_ids,
labels=...)`, gradient clipping, `torch.optim.AdamW` with the same hyperparameters, the same
warmup + cosine schedule, batch and sequence length.

Every side runs in its own long-lived subprocess with the same allocator (`--allocator`, default
tcmalloc when libtcmalloc_minimal.so.4 is installed) and the parent asks them in turns, so the
repeats of each side interleave in time; ratios are taken per repeat, then the median.

`--through-cli` adds a side `jaxalign train`: the whole loop that command runs
(`jaxalign.train(cfg)`: the real SFT data pipeline on data/tiny/sft_train.jsonl packed into the
same batch and sequence length, prefetch thread, host-to-device copies, logging every
`train.log_every` steps, NaN checks), timed in turns with the isolated step; its `x step` column
is its speed over the isolated step's, per repeat, then the median. Periodic checkpoints and
held-out evals are off on that side.

A `--variant NAME:key=value;key=value` adds a JAX worker with config overrides (dotted keys as in
`--set`), plus two special keys: `xla_flags=...` (XLA_FLAGS for that worker) and `patch=FILE` (a
Python file executed in the worker before the step is built, to measure a proposed change to the
model or step code without editing it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Model shapes and batch per size. `tiny` is configs/sft_tiny.yaml (its model, batch and seq_len).
SIZES = common.step_sizes("configs/sft_tiny.yaml")


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, grad_accum: int = 1) -> dict:
    """Random token rows shaped like the SFT pipeline's output: [A, B/A, T] per key."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = batch_size // grad_accum
    seqs = rng.integers(0, vocab, (grad_accum, rows, seq_len + 1), dtype=np.int32)
    shape = (grad_accum, rows, seq_len)
    return {
        "inputs": seqs[..., :-1].copy(),
        "targets": seqs[..., 1:].copy(),
        "loss_mask": np.ones(shape, np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
    }


def synthetic_sft(cfg):
    """jaxalign's SFT algorithm on an in-memory batch (no tokenizer, no files)."""
    from jaxalign.trainers.sft import SFT

    class SyntheticSFT(SFT):
        def __init__(self, cfg):  # skips SFT's tokenizer loading on purpose
            self.cfg = cfg

        def train_data(self, process_index, process_count):
            raise NotImplementedError

        def eval_data(self, process_index, process_count):
            return None

    return SyntheticSFT(cfg)


def build_jax(args, cfg=None):
    """(trainer, state, batch, info) for `args.size` (or a given config)."""
    import jax

    from jaxalign.metrics import param_count, train_flops_per_token
    from jaxalign.trainers.loop import Trainer

    if cfg is None:
        run_dir = common.scratch_dir("bench_sft_")
        cfg = common.step_config(SIZES[args.size], args.set, run_dir, ROOT)
    t = cfg.train
    trainer = Trainer(cfg, synthetic_sft(cfg), devices=jax.devices()[:1])
    state = trainer.fresh_state()
    batch = trainer.to_global(
        synthetic_batch(t.batch_size, t.seq_len, cfg.model.vocab_size, t.grad_accum)
    )
    model = common.model_summary(cfg.model)
    info = {
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "tokens_per_step": t.batch_size * t.seq_len,
        "params": param_count(cfg.model)["total"],
        "flops_per_token": train_flops_per_token(cfg.model, t.seq_len),
        "model": model,
        "loss_config": {"vocab_chunks": cfg.loss.vocab_chunks},
        "overrides": list(getattr(args, "set", [])),
        "torch_build": {"model": model, "batch_size": t.batch_size, "seq_len": t.seq_len},
    }
    return trainer, state, batch, info


def build_train_loop(args):
    """(cfg, info) of the `jaxalign train` side: the isolated step's config plus real SFT data."""
    run_dir = common.scratch_dir("bench_sft_train_")
    data = [
        "trainer=sft",
        f"data.train_file={ROOT / 'data/tiny/sft_train.jsonl'}",
        f"data.tokenizer={ROOT / 'data/tiny/tokenizer.model'}",  # 512 pieces: fits every vocab
        "data.eval_file=null",
        "train.eval_every=0",
        "checkpoint.every=0",  # only at the end: no periodic save inside a timed segment
    ]
    cfg = common.step_config(SIZES[args.size], data + args.set, run_dir, ROOT)
    return cfg, {"overrides": list(args.set), "data": str(cfg.data.train_file)}


def serve_train(args) -> None:
    """The `--through-cli` worker."""
    from jaxalign.trainers.sft import SFT

    common.serve_train_loop(lambda: build_train_loop(args), SFT)


def build_torch(cmd: dict, adamw: str):
    """The baseline: LlamaForCausalLM with jaxalign's model config, `model(input_ids, labels)`,
    clipping, AdamW + schedule; returns (step, info)."""
    import torch
    import transformers

    m, b, t = cmd["model"], cmd["batch_size"], cmd["seq_len"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(common.torch_llama_config(m, t))
    model = model.to(torch.float32).train()
    opt, sched = common.torch_optimizer(model, adamw)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, m["vocab_size"], (b, t), generator=g)

    # labels are shifted inside the model
    step = common.torch_train_step(
        model.parameters(), opt, sched, lambda: model(input_ids=x, labels=x).loss
    )

    info = {
        "adamw": adamw,
        "attn_implementation": model.config._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return step, info


def markdown(data: dict) -> str:
    """This benchmark's table from its JSON."""
    return common.step_markdown(data)


def main(argv=None) -> dict:
    return common.step_main(
        __file__, __doc__, SIZES, "tiny,7m,50m", build_jax, build_torch, argv, serve_train
    )


if __name__ == "__main__":
    main()
