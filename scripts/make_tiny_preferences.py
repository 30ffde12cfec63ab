"""Generate the bundled tiny preference pairs (deterministic; no network).

    python scripts/make_tiny_preferences.py [--out data/tiny] [--seed 1]

Writes pref_train.jsonl (2000 pairs) and pref_eval.jsonl (200 pairs, prompts disjoint from train
and from data/tiny/sft_eval.jsonl) from the task families of scripts/make_tiny_data.py: `chosen`
is the correct answer, `rejected` a plausible wrong one (for addition and subtraction a number
copied from the prompt; a product or letter count off by a little; the letter at the other end of
the word, or another of its letters; two letters swapped) or an off-format one (wrong case, the
word not reversed). Records mix three
formats: text prompt/chosen/rejected (some with a system prompt), message-list prompt with
assistant-message answers, and two full conversations sharing their leading messages. Running it
twice gives byte-identical files. The tokenizer (data/tiny/tokenizer.model) is not retrained.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny_data import SYSTEM_PROMPTS, TASKS, write_jsonl  # noqa: E402


def _swap_letters(word: str, rng: random.Random) -> str:
    if len(set(word)) < 2:
        return word + word[-1]
    while True:
        i, j = sorted(rng.sample(range(len(word)), 2))
        swapped = word[:i] + word[j] + word[i + 1 : j] + word[i] + word[j + 1 :]
        if swapped != word:
            return swapped


def _shift_number(text: str, rng: random.Random) -> str:
    """Change one number in `text` by a small nonzero amount (kept >= 0)."""
    matches = list(re.finditer(r"\d+", text))
    m = rng.choice(matches)
    value = int(m.group())
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    new = value + delta if value + delta >= 0 else value + abs(delta)
    return text[: m.start()] + str(new) + text[m.end() :]


def corrupt(task: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible but wrong (or off-format) answer to `prompt`."""
    if task in ("add", "subtract"):
        # A number copied from the prompt: a tiny model's typical slip, and one it can learn to
        # avoid. (A result off by a little needs exact two-digit arithmetic to rank, which the
        # bundled SFT model does at chance, before and after DPO, on train pairs as well.)
        value = re.search(r"\d+", answer).group()
        operands = [n for n in re.findall(r"\d+", prompt) if n != value]
        if operands:
            return answer.replace(value, rng.choice(operands))
        return _shift_number(answer, rng)
    if task in ("multiply", "count_letters"):
        return _shift_number(answer, rng)
    if task == "largest":
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        return str(rng.choice([n for n in numbers if str(n) != answer]))
    if task == "sort_numbers":
        numbers = answer.split(", ")
        if rng.random() < 0.5:
            return ", ".join(reversed(numbers))
        i = rng.randrange(len(numbers) - 1)
        numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]
        return ", ".join(numbers)
    if task == "reverse":
        word = answer[::-1]
        return word if rng.random() < 0.5 else _swap_letters(answer, rng)
    if task == "upper":
        return answer.lower() if rng.random() < 0.5 else answer.title()
    if task == "lower":
        return answer.upper() if rng.random() < 0.5 else answer.title()
    if task == "first_letter":
        word = re.search(r"'(\w+)'", prompt).group(1)
        other_end = word[-1] if "first" in prompt else word[0]  # first and last confused
        if other_end != answer and rng.random() < 0.5:
            return other_end
        other = [c for c in sorted(set(word)) if c != answer] or ["x"]
        return rng.choice(other)
    raise ValueError(task)


def make_pair(rng: random.Random) -> tuple[str, dict]:
    """One preference record and its prompt."""
    task = rng.choice(TASKS)
    prompt, chosen = task(rng)
    rejected = corrupt(task.__name__, prompt, chosen, rng)
    style = rng.random()
    if style < 0.5:
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if rng.random() < 0.3:
            record = {"system": rng.choice(SYSTEM_PROMPTS), **record}
        return prompt, record
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if style >= 0.8 and rng.random() < 0.5:  # an earlier, answered turn
        first_prompt, first_answer = rng.choice(TASKS)(rng)
        messages += [
            {"role": "user", "content": first_prompt},
            {"role": "assistant", "content": first_answer},
        ]
    messages.append({"role": "user", "content": prompt})
    if style < 0.8:
        return prompt, {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return prompt, {
        "chosen": [*messages, {"role": "assistant", "content": chosen}],
        "rejected": [*messages, {"role": "assistant", "content": rejected}],
    }


def make_split(rng: random.Random, count: int, exclude: set[str]) -> tuple[list[dict], set[str]]:
    records, prompts = [], set()
    while len(records) < count:
        prompt, record = make_pair(rng)
        if prompt in exclude:
            continue
        records.append(record)
        prompts.add(prompt)
    return records, prompts


def _sft_eval_prompts(path: Path) -> set[str]:
    prompts = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            prompts.update(m["content"] for m in messages if m["role"] == "user")
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data/tiny"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    held_out = _sft_eval_prompts(out / "sft_eval.jsonl")
    eval_records, eval_prompts = make_split(rng, args.eval, exclude=set())
    train_records, _ = make_split(rng, args.train, exclude=eval_prompts | held_out)
    write_jsonl(out / "pref_train.jsonl", train_records)
    write_jsonl(out / "pref_eval.jsonl", eval_records)
    print(f"wrote {len(train_records)} train and {len(eval_records)} eval preference pairs")


if __name__ == "__main__":
    main()
