"""Environment evals: greedy multi-turn episodes of a policy with an environment (`rl.environment`)
over a file of its records, with the rollout engine's episode loop (`trainers/episodes.py`).

    jaxalign eval --model RUN_DIR --environment calculator=sums.jsonl

Metrics, per environment `<env>` (its bundled name, or the class name of `module:Class`):

| metric | meaning | better |
|---|---|---|
| `env/<env>/success_rate` | episodes whose score (the sum of step rewards) reached 1, % | higher |
| `env/<env>/tool_error_rate` | failed tool calls (malformed, unknown, raised, timeout), % | lower |
| `env/<env>/turns` | model turns per episode | - |
| `env/<env>/tool_calls` | tool calls per episode | - |
| `env/<env>/turn_limit_rate` | episodes ended by rl.max_turns, % | - |
| `env/<env>/token_limit_rate` | episodes ended by rl.turn_tokens or the token budget, % | - |
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxalign import sharding as shd
from jaxalign.envs.base import BUNDLED
from jaxalign.errors import UserError

ENV_PREFIX = "env/"
# Directions of the per-environment metrics for the regression gate (`eval.suite`).
ENV_DIRECTIONS = {"success_rate": 1, "tool_error_rate": -1}


def environment_name(spec: str) -> str:
    """The metric name of an environment spec: a bundled name, else its class name."""
    return spec if spec in BUNDLED else spec.rsplit(":", 1)[-1]


def parse_environment_arg(value: str) -> tuple[str, str]:
    """`SPEC=FILE` of `--environment` -> (spec, file)."""
    spec, sep, path = value.partition("=")  # a path may hold "=" (day=1/), a spec does not
    if not sep or not spec or not path:
        raise UserError(
            f"--environment {value!r}: expected SPEC=FILE (e.g. calculator=sums.jsonl; SPEC a "
            "bundled name, module:Class or file.py:Class)"
        )
    return spec, path


def evaluate_environments(
    model_dir: str | Path,
    environments: Sequence[str],
    *,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    max_turns: int | None = None,
    batch_size: int = 64,
    episodes_path: str | Path | None = None,
) -> dict[str, float]:
    """`env/<name>/...` metrics (module docstring) of greedy episodes of the policy in
    `model_dir`, for each `SPEC=FILE` of `environments` (environment SPEC over the records of
    FILE, the first `limit`). The policy's run config gives the episode settings (rl.max_turns,
    rl.turn_tokens, rl.tool_*, sampling.stop); `max_new_tokens` (each episode's token budget
    after its first observation) and `max_turns` override two of them. With `episodes_path`,
    every episode (its record id, messages, score and counts) is written there as JSONL."""
    from jaxalign.data import load_tokenizer
    from jaxalign.generate import Sampler, Stops, load_policy
    from jaxalign.trainers.episodes import EpisodeRunner, evaluate_episodes, read_episode_records

    pairs = [parse_environment_arg(v) for v in environments]  # all checked before loading
    if max_turns is not None and max_turns < 1:
        raise UserError(f"--max-turns must be >= 1, got {max_turns}")
    overrides = ["sampling.temperature=0", f"sampling.batch_size={batch_size}"]
    if max_new_tokens is not None:
        overrides.append(f"sampling.max_new_tokens={max_new_tokens}")
    if max_turns is not None:
        overrides.append(f"rl.max_turns={max_turns}")
    policy = load_policy(model_dir, overrides)
    cfg = policy.cfg
    turn_tokens = cfg.rl.turn_tokens or cfg.sampling.max_new_tokens
    if turn_tokens > cfg.sampling.max_new_tokens:
        raise UserError(
            f"rl.turn_tokens ({turn_tokens}) of {model_dir} is more than the episode budget "
            f"({cfg.sampling.max_new_tokens}): raise --max-new-tokens"
        )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stops = Stops.for_config(tokenizer, cfg)
    sampler = Sampler(
        cfg.model,
        dataclasses.replace(cfg.sampling, max_new_tokens=turn_tokens),
        stop_token_ids=stops.token_ids,
        stop_sequences=stops.sequences,
        pad_id=tokenizer.pad_id,
        mesh=policy.mesh,
        rules=policy.rules,
        graphdef=policy.graphdef,
    )
    divisor = shd.batch_divisor(policy.mesh, policy.rules)  # rows split over the batch axes
    evals = []
    for spec, path in pairs:  # every record of every environment checked before any episode
        env_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, environment=spec))
        runner = EpisodeRunner(env_cfg, tokenizer, stops, sampler, None)
        records, row_ids = read_episode_records(path, tokenizer, cfg.data.template, limit or 0)
        runner.start(records, row_ids, None)
        evals.append((spec, runner, records, row_ids))
    metrics: dict[str, float] = {}
    written = []
    for spec, runner, records, row_ids in evals:
        rows = -(-min(batch_size, len(records)) // divisor) * divisor
        summary, episodes = evaluate_episodes(runner, policy.params, records, row_ids, rows, None)
        name = environment_name(spec)
        metrics.update({f"{ENV_PREFIX}{name}/{k}": v for k, v in summary.items()})
        written += [
            {
                "id": row_id,
                "environment": name,
                "messages": e.messages,
                "score": e.reward,
                "turns": e.turns,
                "tool_calls": e.tool_calls,
                "tool_errors": e.tool_errors,
            }
            for row_id, e in zip(row_ids, episodes, strict=True)
        ]
    if episodes_path is not None and jax.process_index() == 0:  # process 0 writes
        out = Path(episodes_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written))
    return metrics
