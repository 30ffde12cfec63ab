"""Generate the bundled verifiable RL task: prompts with a ground-truth `answer` (deterministic).

    python scripts/make_tiny_rl_prompts.py [--out data/tiny] [--seed 1]

Writes rl_prompts_train.jsonl (2000 records) and rl_prompts_eval.jsonl (200 records) of
`{"prompt": ..., "answer": ..., "task": ...}`, drawn from the same checkable tasks as the SFT data
(scripts/make_tiny_data.py: arithmetic, reversing / casing / counting letters of words, largest
number, sorting). Eval prompts appear neither in the RL train prompts nor in the SFT train file,
so the eval pass rate is held out. `answer` is exactly the completion the SFT data teaches (e.g.
"The answer is 40." for arithmetic); `jaxalign.rewards.exact_answer` compares against it.
Running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_data import TASKS  # noqa: E402


def sft_prompts(path: Path) -> set[str]:
    """Every user prompt of an SFT file (so RL eval prompts can avoid them)."""
    prompts = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "prompt" in record:
            prompts.add(record["prompt"])
        for message in record.get("messages", []):
            if message["role"] == "user":
                prompts.add(message["content"])
    return prompts


def make_split(rng: random.Random, count: int, exclude: set[str]) -> list[dict]:
    records, seen = [], set()
    while len(records) < count:
        task = rng.choice(TASKS)
        prompt, answer = task(rng)
        if prompt in exclude or prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "answer": answer, "task": task.__name__})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "data/tiny"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()

    out = Path(args.out)
    rng = random.Random(args.seed)
    seen_in_sft = sft_prompts(out / "sft_train.jsonl")
    eval_records = make_split(rng, args.eval, exclude=seen_in_sft)
    train_records = make_split(rng, args.train, exclude={r["prompt"] for r in eval_records})
    write_jsonl(out / "rl_prompts_train.jsonl", train_records)
    write_jsonl(out / "rl_prompts_eval.jsonl", eval_records)
    print(f"wrote {len(train_records)} train and {len(eval_records)} eval prompts to {out}")


if __name__ == "__main__":
    main()
