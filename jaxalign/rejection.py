"""Rejection sampling (the Llama 3 recipe): K completions per prompt, scored; the best becomes an
SFT example and the best/worst pair a DPO example.

A scorer is any callable `score(prompts, completions, records) -> np.ndarray [N]` over N
(prompt, completion) rows, where `records` are the input records the rows came from: usually a
`jaxalign.rewards.Scorer` of the `--reward-fn` (a Python reward function, `module:function` or
`path/to/file.py:function`, called as `fn(prompts, completions, **record_fields) -> scores`, each
record field a list aligned with the rows, like TRL's reward functions) or the `--reward-model`
(a reward model run directory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

ScoreFn = Callable[[list, list[str], list[dict]], np.ndarray]


def best_and_worst(scores: np.ndarray, eligible: np.ndarray) -> tuple[int, int] | None:
    """Indices of the highest and lowest score among eligible samples (first on ties); None if
    none is eligible. scores, eligible: [K]."""
    if not eligible.any():
        return None
    masked_hi = np.where(eligible, scores, -np.inf)
    masked_lo = np.where(eligible, scores, np.inf)
    return int(np.argmax(masked_hi)), int(np.argmin(masked_lo))


def _prompt_fields(record: dict, messages: list[dict]) -> dict:
    """The prompt as it came: a text `prompt` (+ `system`) or a list of messages."""
    if isinstance(record.get("prompt"), str):
        extra = {"system": record["system"]} if isinstance(record.get("system"), str) else {}
        return {"prompt": record["prompt"], **extra}
    return {"prompt": messages}


def rejection_sample(
    policy,
    input_path: str | Path,
    scorer: ScoreFn,
    sft_output: str | Path,
    dpo_output: str | Path | None = None,
    *,
    scorer_prompts: str = "text",
    progress: bool = True,
    resume: bool = False,
    chunk_prompts: int | None = None,
) -> dict:
    """Sample `sampling.num_samples` completions per prompt of `input_path`, score them, and
    write the best per prompt as SFT JSONL (`prompt`/`system` + `completion`, or `messages`,
    with `score`) and the best/worst pair as DPO JSONL (`prompt`, `chosen`, `rejected`,
    `chosen_score`, `rejected_score`; pairs with equal scores are skipped). Empty completions
    are never chosen. `scorer_prompts`: "text" passes a record's prompt string (its messages if
    it has none), "messages" always the message list (what a reward model needs). Chunk by
    chunk and resumable, like `jaxalign generate` (`generate.sample_in_chunks`). Returns counts
    and the mean best/mean score."""
    from jaxalign.generate import sample_in_chunks

    def write(files, records, messages, samples, totals):
        texts = [[c.text for c in row] for row in samples]
        flat_prompts, flat_completions, flat_records = [], [], []
        for record, convo, row in zip(records, messages, texts, strict=True):
            prompt = (
                convo
                if scorer_prompts == "messages" or not isinstance(record.get("prompt"), str)
                else record["prompt"]
            )
            for text in row:
                flat_prompts.append(prompt)
                flat_completions.append(text)
                flat_records.append(record)
        scores = np.asarray(scorer(flat_prompts, flat_completions, flat_records), np.float64)
        scores = scores.reshape(len(records), len(texts[0]))
        for key, value in (("score_sum", scores.sum()), ("scores", scores.size)):
            totals[key] = totals.get(key, 0.0) + float(value)
        for key in ("best_sum", "sft_records", "dpo_pairs"):
            totals.setdefault(key, 0.0)
        sft_file, dpo_file = files[0], files[1] if len(files) > 1 else None
        for record, convo, row, row_scores in zip(records, messages, texts, scores, strict=True):
            picked = best_and_worst(row_scores, np.asarray([bool(t.strip()) for t in row]))
            if picked is None:
                continue
            best, worst = picked
            totals["best_sum"] += float(row_scores[best])
            totals["sft_records"] += 1
            prompt = _prompt_fields(record, convo)
            if isinstance(prompt["prompt"], str):
                sft = {**prompt, "completion": row[best]}
            else:
                sft = {"messages": [*convo, {"role": "assistant", "content": row[best]}]}
            if sft_file is not None:
                sft = {**sft, "score": float(row_scores[best])}
                sft_file.write(json.dumps(sft, ensure_ascii=False) + "\n")
            if dpo_output is not None and row_scores[best] > row_scores[worst]:
                totals["dpo_pairs"] += 1
                pair = {
                    **prompt,
                    "chosen": row[best],
                    "rejected": row[worst],
                    "chosen_score": float(row_scores[best]),
                    "rejected_score": float(row_scores[worst]),
                }
                if dpo_file is not None:
                    dpo_file.write(json.dumps(pair, ensure_ascii=False) + "\n")

    outputs = [sft_output] + ([dpo_output] if dpo_output is not None else [])
    count, totals = sample_in_chunks(
        policy,
        input_path,
        outputs,
        write,
        resume=resume,
        progress=progress,
        chunk_prompts=chunk_prompts,
    )
    sft_records = int(totals.get("sft_records", 0))
    return {
        "prompts": count,
        "samples_per_prompt": policy.cfg.sampling.num_samples,
        "sft_records": sft_records,
        "dpo_pairs": int(totals.get("dpo_pairs", 0)),
        "mean_score": totals["score_sum"] / totals["scores"]
        if totals.get("scores")
        else float("nan"),
        "mean_best_score": totals["best_sum"] / sft_records if sft_records else float("nan"),
    }
