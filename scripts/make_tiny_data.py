"""Generate the bundled tiny SFT dataset and its tokenizer (deterministic; no network).

    python scripts/make_tiny_data.py [--out data/tiny] [--seed 0]

Writes sft_train.jsonl (~3000 records), sft_eval.jsonl (~200 records, prompts disjoint from
train) and tokenizer.model (vocab 512, trained on the train file). Tasks are simple and checkable:
arithmetic, reversing / casing / counting letters of words. Records mix the prompt/completion and
messages formats, some with a system prompt and some with two turns. Running it twice gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxalign.data.tokenizer import train_tokenizer  # noqa: E402

WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry olive onion carrot
potato tomato garlic pepper bread butter cheese honey sugar salt water coffee tea milk juice
house garden window door table chair pencil paper letter book story music piano guitar drum
river ocean island forest desert mountain valley meadow cloud storm thunder rain snow winter
summer autumn spring morning evening night planet rocket comet star moon sun light shadow
tiger lion zebra horse rabbit monkey turtle dolphin eagle falcon parrot spider beetle whale
silver golden purple yellow orange green little gentle bright quiet happy simple clever
doctor farmer pilot sailor singer teacher artist player driver baker hunter friend family
castle bridge tower market school library museum station harbor village city country
""".split()
WORDS = sorted(set(WORDS))

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "Answer the question exactly.",
]

Task = Callable[[random.Random], tuple[str, str]]


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    prompt = rng.choice(["Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}."])
    return prompt.format(a=a, b=b), f"The answer is {a + b}."


def subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    prompt = rng.choice(["Subtract {b} from {a}.", "What is {a} minus {b}?", "Compute {a} - {b}."])
    return prompt.format(a=a, b=b), f"The answer is {a - b}."


def multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = rng.choice(["Multiply {a} by {b}.", "What is {a} times {b}?", "Compute {a} * {b}."])
    return prompt.format(a=a, b=b), f"The answer is {a * b}."


def reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    prompt = rng.choice(
        ["Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write '{w}' reversed."]
    )
    return prompt.format(w=word), word[::-1]


def upper(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    prompt = rng.choice(["Write '{t}' in upper case.", "Convert '{t}' to uppercase."])
    return prompt.format(t=text), text.upper()


def lower(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3))).upper()
    prompt = rng.choice(["Write '{t}' in lower case.", "Convert '{t}' to lowercase."])
    return prompt.format(t=text), text.lower()


def count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    prompt = rng.choice(["How many letters are in '{w}'?", "Count the letters in '{w}'."])
    return prompt.format(w=word), str(len(word))


def first_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"What is the first letter of '{word}'?", word[0]
    return f"What is the last letter of '{word}'?", word[-1]


def largest(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    prompt = rng.choice(["Which is the largest: {n}?", "Find the maximum of {n}."])
    return prompt.format(n=listed), str(max(numbers))


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    return f"Sort these numbers in ascending order: {listed}.", ", ".join(map(str, sorted(numbers)))


TASKS: list[Task] = [
    add,
    subtract,
    multiply,
    reverse,
    upper,
    lower,
    count_letters,
    first_letter,
    largest,
    sort_numbers,
]


def make_record(rng: random.Random) -> tuple[str, dict]:
    """One record and its first prompt (used to keep eval prompts out of train)."""
    prompt, completion = rng.choice(TASKS)(rng)
    style = rng.random()
    if style < 0.6:
        return prompt, {"prompt": prompt, "completion": completion}
    messages = []
    if style < 0.85:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if rng.random() < 0.4:  # a second turn
        prompt2, completion2 = rng.choice(TASKS)(rng)
        messages += [
            {"role": "user", "content": prompt2},
            {"role": "assistant", "content": completion2},
        ]
    return prompt, {"messages": messages}


def make_split(rng: random.Random, count: int, exclude: set[str]) -> tuple[list[dict], set[str]]:
    records, prompts = [], set()
    while len(records) < count:
        prompt, record = make_record(rng)
        if prompt in exclude:
            continue
        records.append(record)
        prompts.add(prompt)
    return records, prompts


def write_jsonl(path: Path, records: list[dict]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    eval_records, eval_prompts = make_split(rng, args.eval, exclude=set())
    train_records, _ = make_split(rng, args.train, exclude=eval_prompts)
    write_jsonl(out / "sft_train.jsonl", train_records)
    write_jsonl(out / "sft_eval.jsonl", eval_records)
    model = train_tokenizer(
        [str(out / "sft_train.jsonl")], str(out / "tokenizer"), args.vocab_size, seed=args.seed
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)  # human-readable copy; not needed
    print(f"wrote {len(train_records)} train, {len(eval_records)} eval records and {model}")


if __name__ == "__main__":
    main()
