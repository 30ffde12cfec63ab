"""Rollout generation: today's fixed-batch sampler vs continuous batching, same model, same
prompts, same run, on a long-tailed distribution of response lengths.

    python bench/rollout.py                      # 7m model, 16 prompts x 4 samples, 16 slots
    python bench/rollout.py --size tiny --repeats 5 --json bench/results/rollout_tiny.json

The rollout is GRPO-shaped: `--prompts` prompts of random tokens (lengths 16 to 64, one prompt
bucket), `--group` samples each, sampled at temperature 1 with every row's own random stream.
The response lengths are a fixed schedule both samplers see identically: 10% of the rows
(exactly, at seeded random places) get 256 tokens, the others a uniform 4 to 31. Each row's
length is its token budget (`max_tokens`, the per-row budget both samplers take) and nothing
stops earlier (no stop tokens: a random-weight model's rows are never cut short by one), so the
lengths are the schedule exactly and both samplers generate the same tokens.

- static: `generate.Sampler`, `--slots` rows per compiled call in the rollout's row order (the
  rollout engine's rl.sampler: static): each call decodes until its longest row ends.
- continuous: `continuous.ContinuousSampler` over `--slots` slots (rl.sampler: continuous),
  each group's prompt prefilled once.

Both compile before timing (a warm-up rollout each); the timed repeats alternate between them
and report medians. tokens/s = generated tokens / wall seconds; CPU seconds per rollout are
recorded too (other processes on a shared machine distort them less), with the load average.
Not a test: nothing asserts, but the table says whether both produced the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SIZES = {
    "tiny": common.TINY_MODEL,
    "7m": common.MODELS["7m"],
}
LONG, SHORT = 256, (4, 31)  # the long-tailed length schedule


def length_schedule(rows: int, long_share: float, seed: int):
    """Each row's response length: exactly round(long_share * rows) rows of LONG tokens at
    seeded random places, the others uniform in SHORT."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(SHORT[0], SHORT[1] + 1, size=rows)
    lengths[rng.permutation(rows)[: round(long_share * rows)]] = LONG
    return lengths.astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="7m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--long-share", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "rollout.json"))
    args = ap.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from jaxalign.config import SamplingConfig, load_config
    from jaxalign.continuous import ContinuousSampler, sample_rows
    from jaxalign.generate import Sampler, left_pad
    from jaxalign.models.registry import build

    cfg = load_config(None, [], base={"model": dict(SIZES[args.size])})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))
    rng = np.random.default_rng(args.seed)
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(np.float32), state)
    params = jax.device_put(params)
    vocab = cfg.model.vocab_size
    prompts = [rng.integers(4, vocab, size=rng.integers(16, 65)) for _ in range(args.prompts)]
    rows = args.prompts * args.group
    tokens, lengths = left_pad(prompts, 64, 0)
    tokens, lengths = np.repeat(tokens, args.group, 0), np.repeat(lengths, args.group)
    budgets = length_schedule(rows, args.long_share, args.seed)
    ids = np.arange(rows, dtype=np.int32)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=LONG, max_prompt_len=64, seed=1)
    static = Sampler(cfg.model, sampling, graphdef=graphdef)
    continuous = ContinuousSampler(
        cfg.model, sampling, slots=args.slots, max_group=args.group, graphdef=graphdef
    )

    def rollout(sampler):
        return sample_rows(
            sampler,
            params,
            tokens,
            lengths,
            ids,
            None,
            args.slots,
            group=args.group,
            max_tokens=budgets,
        )

    outs = {name: rollout(s) for name, s in (("static", static), ("continuous", continuous))}
    same = bool(
        np.array_equal(outs["static"].lengths, budgets)
        and np.array_equal(outs["static"].lengths, outs["continuous"].lengths)
        and np.array_equal(outs["static"].tokens, outs["continuous"].tokens)
    )
    generated = int(budgets.sum())
    times: dict[str, list] = {"static": [], "continuous": []}
    for _ in range(args.repeats):
        for name, sampler in (("static", static), ("continuous", continuous)):
            with common.Timer() as t:
                rollout(sampler)
            times[name].append(t.as_dict())
    table = []
    for name in ("static", "continuous"):
        wall = common.median([t["wall_s"] for t in times[name]])
        cpu = common.median([t["cpu_s"] for t in times[name]])
        table.append(
            {
                "sampler": name,
                "wall_s": wall,
                "cpu_s": cpu,
                "tokens_per_s": generated / wall,
                "tokens_per_cpu_s": generated / cpu,
                "load": common.median([t["load_before"] for t in times[name]]),
            }
        )
    ratio = table[0]["wall_s"] / table[1]["wall_s"]
    cpu_ratio = table[0]["cpu_s"] / table[1]["cpu_s"]
    for row in table:
        row["ratio"] = table[0]["wall_s"] / row["wall_s"]
    columns = [
        ("sampler", "sampler", "s"),
        ("wall s", "wall_s", ".2f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("x static", "ratio", ".2f"),
        ("CPU s", "cpu_s", ".2f"),
        ("tokens/CPU s", "tokens_per_cpu_s", ",.0f"),
        ("load avg", "load", ".1f"),
    ]
    print(
        f"{args.size} model, {args.prompts} prompts x {args.group} samples = {rows} rows, "
        f"{args.slots} slots; {generated} tokens ({round(args.long_share * rows)} rows of {LONG}, "
        f"the rest {SHORT[0]}-{SHORT[1]}); same rows from both: {same}"
    )
    print(common.format_table(table, columns))
    print(f"continuous / static tokens/s: {ratio:.2f}x (CPU time: {cpu_ratio:.2f}x)")
    common.write_json(
        args.json,
        {
            "machine": common.machine_info(common.JAX_PACKAGES),
            "args": vars(args),
            "model": SIZES[args.size],
            "rows": rows,
            "generated_tokens": generated,
            "same_rows": same,
            "results": table,
            "speedup": ratio,
            "speedup_cpu": cpu_ratio,
            "repeats": times,
        },
    )


if __name__ == "__main__":
    main()
