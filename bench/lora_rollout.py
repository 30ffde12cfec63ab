"""LoRA rollout sampling: adapters merged once per rollout vs applied in every decode step.

    python bench/lora_rollout.py                       # the quickstart GRPO rollout's shapes
    python bench/lora_rollout.py --rows 64 --new-tokens 24 --repeats 5

Samples `--rows` rows of `--prompt-len` random prompt tokens and exactly `--new-tokens` new
tokens (no stop tokens) with the quickstart model (configs/quickstart/grpo.yaml: vocab 1024,
hidden 128, 4 layers) carrying rank-`--rank` adapters on every projection (B random, so the
adapters change the output), the way the rollout engine does it (`rl.lora_sampling`):

- merged: W + scale * A @ B for every adapted weight (`hf.peft.merge_lora`, jitted), then the
  plain model's sampler; the merge is inside the timed call, once per rollout;
- unmerged: the LoRA model's sampler, x @ W + (x @ A) @ B * scale in every decode step.

Both compile first; then the two alternate `--repeats` times and the medians are printed (wall
seconds, rows * new tokens / s, and CPU seconds per call, which competing processes distort
less than wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np
from flax import nnx

from jaxalign.config import load_config
from jaxalign.generate import Sampler
from jaxalign.hf.peft import merge_lora
from jaxalign.models.params import init_params
from jaxalign.models.registry import build

QUICKSTART = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "tie_embeddings": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)  # 32 prompts x 8 generations
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sets = [
        f"model.lora.rank={args.rank}",
        f"sampling.max_new_tokens={args.new_tokens}",
        f"sampling.max_prompt_len={args.prompt_len}",
        "sampling.temperature=1.0",
    ]
    cfg = load_config(None, sets, base={"model": dict(QUICKSTART)})
    shardings = jax.tree.map(
        lambda _: None,
        nnx.split(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))[1].to_pure_dict(),
    )
    params = init_params(cfg, shardings, 0, lambda rngs: build(cfg.model, rngs))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jax.numpy.asarray(rng.normal(0, 0.02, x.shape), x.dtype)
            if jax.tree_util.keystr(p).endswith("_lora_b']")
            else x
        ),
        params,
    )
    plain_model = dataclasses.replace(cfg.model, lora=None)
    merge = jax.jit(lambda p: merge_lora(p, cfg.model.lora))
    merged_sampler = Sampler(plain_model, cfg.sampling)
    lora_sampler = Sampler(cfg.model, cfg.sampling)
    prompts = rng.integers(1, QUICKSTART["vocab_size"], (args.rows, args.prompt_len))
    prompts = prompts.astype(np.int32)
    lengths = np.full(args.rows, args.prompt_len, np.int32)

    def merged():
        return merged_sampler.generate_padded(merge(params), prompts, lengths).tokens

    def unmerged():
        return lora_sampler.generate_padded(params, prompts, lengths).tokens

    runs = {"merged": merged, "unmerged": unmerged}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        jax.block_until_ready(fn())  # compile
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    tokens = args.rows * args.new_tokens
    for name, ts in times.items():
        s = statistics.median(ts)
        c = statistics.median(cpu[name])
        print(f"{name:9s} {s:7.3f} s  {tokens / s:9,.0f} tokens/s  {c:7.3f} CPU s  (runs: {ts})")


if __name__ == "__main__":
    main()
