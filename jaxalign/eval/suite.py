"""Held-out evaluation of a policy: greedy answers to checkable prompts, scored by programs, a
reward model and a reference model.

Metrics (rates in percent, so a gate's threshold is in points):

| metric | meaning | better |
|---|---|---|
| `pass/<family>` | answers passing the family's checker (`checkers.py`) | higher |
| `pass_rate` | mean of `pass/<family>` over the task families present | higher |
| `refusal_rate` | unsafe prompts declined | higher |
| `over_refusal_rate` | benign look-alikes declined | lower |
| `rm_win_rate` | reward model prefers this answer to the baseline's (ties: half) | higher |
| `kl_to_ref` | mean over prompts of sum_t log p_policy - log p_ref over the answer | lower |
| `response_length` | mean answer length in tokens (stop token included) | - |

Environment evals (`env/<environment>/...`: success rate, tool error rate, turns, tool calls)
are in `eval/episodes.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.data.sources import read_records
from jaxalign.errors import DataError
from jaxalign.rewards.checkers import SAFETY_FAMILIES, TASK_FAMILIES, check

# Direction of each metric for regression gates: +1 higher is better, -1 lower is better,
# 0 informational. `pass/<family>` metrics are +1.
DIRECTIONS = {
    "pass_rate": 1,
    "refusal_rate": 1,
    "over_refusal_rate": -1,
    "rm_win_rate": 1,
    "kl_to_ref": -1,
    "response_length": 0,
}


def metric_direction(name: str) -> int:
    """+1 (higher is better), -1 (lower is better) or 0 (not gated) for a metric name."""
    if name.startswith("pass/"):
        return 1
    if name.startswith("env/"):  # env/<environment>/<metric>: eval/episodes.py
        from jaxalign.eval.episodes import ENV_DIRECTIONS

        return ENV_DIRECTIONS.get(name.rsplit("/", 1)[-1], 0)
    return DIRECTIONS.get(name, 0)


def _validate(record: Any, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DataError("eval record must be an object with a string 'prompt'", where=where)
    if record.get("family") not in (*TASK_FAMILIES, *SAFETY_FAMILIES):
        raise DataError(f"eval record has unknown family {record.get('family')!r}", where=where)


def load_eval_records(files: Sequence[str], limit_per_family: int | None = None) -> list[dict]:
    """Eval records of `files` (JSONL, optionally gzipped), the first `limit_per_family` of each
    family (all when None), in file order."""
    records, seen = [], {}
    for path in files:
        for record in read_records(str(path), validate=_validate)[0]:
            family = record["family"]
            if limit_per_family is not None and seen.get(family, 0) >= limit_per_family:
                continue
            seen[family] = seen.get(family, 0) + 1
            records.append(record)
    return records


def _messages(record: dict) -> list[dict]:
    head = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*head, {"role": "user", "content": record["prompt"]}]


def sequence_logprobs(
    graphdef,
    params,
    sequences: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    batch_size: int = 64,
) -> np.ndarray:
    """Summed log-probs [N] of the masked tokens of N token sequences (teacher-forced)."""
    from jaxalign.losses import sequence_logprobs as seq_logps

    @jax.jit
    def fn(p, tokens, mask):
        model = nnx.merge(graphdef, p)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # Right padding comes after every real token, so causal attention never sees it.
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
        hidden = model(tokens, positions, segment_ids)
        soft_cap = model.cfg.final_logit_softcap
        return seq_logps(hidden, model.output_weight(), tokens, mask, soft_cap=soft_cap)[0]

    out = np.zeros(len(sequences), np.float64)
    for start in range(0, len(sequences), batch_size):
        chunk = list(range(start, min(start + batch_size, len(sequences))))
        width = -(-max(len(sequences[i]) for i in chunk) // 16) * 16
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for row, i in enumerate(chunk):
            tokens[row, : len(sequences[i])] = sequences[i]
            mask[row, : len(masks[i])] = masks[i]
        out[chunk] = np.asarray(fn(params, tokens, mask))[: len(chunk)]
    return out


def generate_answers(
    model_dir: str | Path,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy answers of the policy in `model_dir` to `records`: texts, prompt and completion
    token ids, and the loaded policy and tokenizer."""
    from jaxalign.data import load_tokenizer, render_prompt
    from jaxalign.generate import Stops, generate_all, load_policy, policy_sampler

    policy = load_policy(
        model_dir,
        [
            "sampling.temperature=0",
            f"sampling.max_new_tokens={max_new_tokens}",
            f"sampling.batch_size={batch_size}",
            "sampling.num_samples=1",
        ],
    )
    tokenizer = load_tokenizer(policy.cfg.data.tokenizer)
    template = policy.cfg.data.template
    prompt_ids = [render_prompt(_messages(r), tokenizer, template) for r in records]
    stops = Stops.for_config(tokenizer, policy.cfg)
    completions = generate_all(
        policy_sampler(policy, stops),
        policy.params,
        prompt_ids,
        stops,
        batch_size=batch_size,
        seed=seed,
    )
    completions = [c[0] for c in completions]
    return {
        "texts": [c.text for c in completions],
        "prompt_ids": prompt_ids,
        "completion_ids": [c.token_ids for c in completions],
        "policy": policy,
        "tokenizer": tokenizer,
    }


def kl_to_reference(answers: dict, reference_dir: str | Path) -> float:
    """Mean over prompts of the summed per-token log-ratio policy/reference of the answers."""
    from jaxalign.generate import load_policy

    sequences, masks = [], []
    for prompt, completion in zip(answers["prompt_ids"], answers["completion_ids"], strict=True):
        sequences.append(np.concatenate([prompt, np.asarray(completion, np.int32)]))
        masks.append(np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))]))
    policy = answers["policy"]
    reference = load_policy(reference_dir)
    policy_lp = sequence_logprobs(policy.graphdef, policy.params, sequences, masks)
    reference_lp = sequence_logprobs(reference.graphdef, reference.params, sequences, masks)
    return float(np.mean(policy_lp - reference_lp))


def rm_win_rate(
    reward_model_dir: str | Path,
    records: Sequence[dict],
    texts: Sequence[str],
    baseline_texts: Sequence[str],
) -> float:
    """Percent of prompts where the reward model scores `texts` above `baseline_texts`."""
    from jaxalign.rewards import Scorer

    score = Scorer.from_flags(None, str(reward_model_dir))
    prompts = [_messages(r) for r in records]
    ours = score(prompts, list(texts), list(records))
    theirs = score(prompts, list(baseline_texts), list(records))
    return float(100.0 * np.mean((ours > theirs) + 0.5 * (ours == theirs)))


def score_answers(
    records: Sequence[dict],
    texts: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Checker metrics of answers: pass rate per family and overall, refusal and over-refusal
    rates (percent), and the mean answer length in tokens when `completion_ids` is given."""
    passed: dict[str, list[bool]] = {}
    for record, text in zip(records, texts, strict=True):
        passed.setdefault(record["family"], []).append(check(record, text))
    metrics: dict[str, float] = {}
    task = [f for f in TASK_FAMILIES if f in passed]
    for family in task:
        metrics[f"pass/{family}"] = 100.0 * float(np.mean(passed[family]))
    if task:
        metrics["pass_rate"] = float(np.mean([metrics[f"pass/{f}"] for f in task]))
    if "unsafe" in passed:
        metrics["refusal_rate"] = 100.0 * float(np.mean(passed["unsafe"]))
    if "benign" in passed:
        metrics["over_refusal_rate"] = 100.0 * (1.0 - float(np.mean(passed["benign"])))
    if completion_ids is not None:
        metrics["response_length"] = float(np.mean([len(c) for c in completion_ids]))
    return metrics


def evaluate(
    model_dir: str | Path,
    eval_files: Sequence[str],
    *,
    reference: str | Path | None = None,
    reward_model: str | Path | None = None,
    baseline: Sequence[str] | None = None,
    limit_per_family: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    generations_path: str | Path | None = None,
) -> dict[str, float]:
    """Metrics of the policy in `model_dir` on the held-out `eval_files` (see the module doc).

    `reference`: a run whose policy the KL is measured against; `reward_model` and `baseline`
    (the baseline's answers, aligned with the loaded records): the RM win rate. With
    `generations_path`, every record is written there with its `completion` and `passed`.
    """
    records = load_eval_records(eval_files, limit_per_family)
    answers = generate_answers(
        model_dir, records, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    metrics = score_answers(records, answers["texts"], answers["completion_ids"])
    if reward_model is not None and baseline is not None:
        if len(baseline) != len(records):
            raise DataError(f"baseline has {len(baseline)} answers for {len(records)} prompts")
        metrics["rm_win_rate"] = rm_win_rate(reward_model, records, answers["texts"], baseline)
    if reference is not None:
        metrics["kl_to_ref"] = kl_to_reference(answers, reference)
    if generations_path is not None and jax.process_index() == 0:  # process 0 writes
        path = Path(generations_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for record, text in zip(records, answers["texts"], strict=True):
                row = {**record, "completion": text, "passed": check(record, text)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics


def read_generations(path: str | Path) -> list[str]:
    """The `completion` of every record of a generations file written by `evaluate`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["completion"] for line in lines if line.strip()]
