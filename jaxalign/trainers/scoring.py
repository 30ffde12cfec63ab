"""Scoring RL samples: the reward (reward functions and a reward model), the held-out greedy
pass rate, and per-family rollout scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.data.prompts import PromptBatchIterator
from jaxalign.errors import ConfigError
from jaxalign.generate import Sampler, Stops
from jaxalign.rejection import function_scorer, load_reward_function


class Scorer:
    """Scores of completions: the weighted sum (`rl.reward_weights`, default 1 each) of the
    `rl.reward_functions` and the `rl.reward_model`, in that order."""

    def __init__(self, cfg: Config, tokenizer):
        rl = cfg.rl
        self.tokenizer = tokenizer
        self.functions = [function_scorer(load_reward_function(s), s) for s in rl.reward_functions]
        self.reward_model = None
        if rl.reward_model:
            from jaxalign.trainers.rm import load_reward_model

            rm_cfg, self.reward_model, stats = load_reward_model(rl.reward_model)
            if Path(rm_cfg.data.tokenizer).resolve() != Path(cfg.data.tokenizer).resolve():
                raise ConfigError(
                    f"rl.reward_model {rl.reward_model}: its tokenizer "
                    f"({rm_cfg.data.tokenizer}) differs from data.tokenizer"
                )
            self.rm_stats = stats if rl.normalize_reward_model else None
            self._rm_host = None
        if not self.functions and self.reward_model is None:
            raise ConfigError("RL needs rl.reward_functions and/or rl.reward_model")
        self.names = reward_names(rl.reward_functions, self.reward_model is not None)
        self.weights = list(rl.reward_weights or [1.0] * len(self.names))
        self.offload = rl.offload_frozen

    def functions_score(
        self, prompts: list[str], completions: list[str], records: list[dict]
    ) -> np.ndarray:
        """The weighted sum of the reward functions alone (held-out pass rates)."""
        scores = np.zeros(len(completions), np.float64)
        for fn, weight in zip(self.functions, self.weights, strict=False):
            scores += weight * fn(prompts, completions, records)
        return scores

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        records: list[dict],
        sequences: list[np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The scores [R] and each reward's own, unweighted, by name ({name: [R]})."""
        parts = [fn(prompts, completions, records) for fn in self.functions]
        if self.reward_model is not None:
            rm = self.reward_model
            if self._rm_host is not None:  # back from host memory
                rm.params = shd.to_device(self._rm_host)
            rewards = rm.score(sequences).astype(np.float64)
            if self.offload:  # each process keeps its own shards
                self._rm_host, rm.params = shd.to_host(rm.params), None
            if self.rm_stats is not None:
                rewards = (rewards - self.rm_stats["mean"]) / max(self.rm_stats["std"], 1e-8)
            parts.append(rewards)
        scores = np.zeros(len(completions), np.float64)
        for part, weight in zip(parts, self.weights, strict=True):
            scores += weight * part
        return scores, dict(zip(self.names, parts, strict=True))


def reward_names(functions: Sequence[str], reward_model: bool) -> list[str]:
    """Metric names of the rewards: each function's own name ("module:fn" -> "fn"; repeated
    names numbered), then "reward_model"."""
    names = [spec.rsplit(":", 1)[-1] for spec in functions]
    names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names + (["reward_model"] if reward_model else [])


# ---------------------------------------------------------------------------------------------
# Held-out pass rate.


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
