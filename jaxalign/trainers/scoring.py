"""What an RL run measures besides its reward: the held-out greedy pass rate and per-family
rollout scores. The reward itself is `jaxalign.rewards.Scorer`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxalign import sharding as shd
from jaxalign.data.prompts import PromptBatchIterator
from jaxalign.generate import Sampler, Stops


def read_prompt_file(
    path: str, tokenizer, template: str, buckets: Sequence[int], limit: int = 0
) -> tuple[list[np.ndarray], list[dict]]:
    """Prompt token ids and extra fields of every record of a prompts file, in file order."""
    it = PromptBatchIterator(
        path,
        tokenizer,
        global_batch_size=1,
        template=template,
        buckets=buckets,
        shuffle=False,
        num_epochs=1,
        shards=1,
    )
    count = it.stats["records"] if not limit else min(limit, it.stats["records"])
    ids, extras = [], []
    for _ in range(count):
        batch = next(it)
        ids.append(batch["tokens"][0, -int(batch["lengths"][0]) :])
        extras.append({k: v[0] for k, v in batch.items() if k not in ("tokens", "lengths")})
    return ids, extras


def pass_rate(
    sampler: Sampler,
    params: Any,
    prompt_ids: Sequence[np.ndarray],
    records: Sequence[dict],
    score: Callable,
    stops: Stops,
    *,
    rows: int = 256,
    threshold: float = 1.0,
) -> dict:
    """Greedy-decode (with `sampler`, temperature 0) every prompt and score it: the fraction
    with score >= threshold (`pass_rate`), the mean score, and the completions (ended where
    `stops` says)."""
    texts, stopped_all = [], []
    rows = min(rows, len(prompt_ids))
    for start in range(0, len(prompt_ids), rows):
        chunk = list(prompt_ids[start : start + rows])
        padded = chunk + [chunk[0]] * (rows - len(chunk))  # one compiled shape
        out = sampler.generate(params, padded)
        tokens, lengths, finish = (
            shd.host_array(x) for x in (out.tokens, out.lengths, out.finish_reasons)
        )
        _, stopped, chunk_texts = stops.finish_rows(tokens, lengths, finish)
        texts += chunk_texts[: len(chunk)]
        stopped_all += list(stopped[: len(chunk)])
    prompts = [stops.tokenizer.decode(p.tolist()) for p in prompt_ids]
    scores = np.asarray(score(prompts, texts, list(records)), np.float64)
    return {
        "pass_rate": float(np.mean(scores >= threshold)),
        "mean_score": float(scores.mean()),
        "stop_fraction": float(np.mean(stopped_all)),
        "completions": texts,
    }


def family_scores(records: Sequence[dict], scores: np.ndarray) -> dict[str, float]:
    """`rollout/score/<family>`: the mean raw score of each prompt family in the rollout, for
    prompt records with a string `family` field (the quickstart's); {} otherwise."""
    families = [r.get("family") for r in records]
    if not families or not all(isinstance(f, str) for f in families):
        return {}
    out = {}
    for family in sorted(set(families)):
        rows = [i for i, f in enumerate(families) if f == family]
        out[f"rollout/score/{family}"] = float(np.mean(scores[rows]))
    return out
