"""Multi-turn episodes in rollouts (`rl.environment`): the rollout engine with a `sample_round`
that runs environment episodes instead of sampling one response per prompt.

An episode's row is [first observation, left padded to P | model turn 1, observation 1, model
turn 2, ... , padding], the part after P at most sampling.max_new_tokens (N) tokens. Every model
turn is sampled with the prefix the row holds so far (the same token ids, positions and
attention the training forward sees, so the sampler's log-probs are the trainer's), at most
rl.turn_tokens tokens; the environment's observation after it is rendered through the chat
template (`render_observation`) and appended. The row's loss mask is 1 on the model's tokens
(its stop tokens included) and 0 on observation tokens, so observations are context only: out of
the policy loss, the KL and the entropy. The episode's score is the sum of its step rewards.

An episode ends when the environment says done, after rl.max_turns model turns (turn limit),
or when a model turn ends without a stop token (cut at rl.turn_tokens or at the N-token budget)
or the next observation would not leave room for another model token (token limit). Only an
episode the environment ended counts as stopped (rl.missing_eos_penalty,
rl.mask_truncated_completions).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxalign import sharding as shd
from jaxalign.data.templates import JinjaTemplate, get_template, render_observation, render_prompt
from jaxalign.envs import ToolSettings, load_environment, tools_prompt
from jaxalign.errors import DataError
from jaxalign.trainers.rl_rows import response_width
from jaxalign.trainers.rollout_engine import (
    EPISODE_PREFIX,
    PromptBatch,
    RolloutEngine,
    round_seed,
)

# Per-episode statistics, logged as rollout/episode/<name> (means over the rollout's episodes).
EPISODE_STATS = ("turns", "tool_calls", "tool_errors", "turn_limit", "token_limit")


@dataclasses.dataclass
class Episode:
    """One row's episode in progress: the token ids after the first observation, which of them
    are the model's (mask) and their sampling log-probs, the conversation as messages."""

    env: object
    prompt: np.ndarray
    messages: list[dict]
    tokens: list[int] = dataclasses.field(default_factory=list)
    mask: list[float] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    reward: float = 0.0
    turn_rewards: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    active: bool = True
    done: bool = False  # ended by the environment
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    turn_limit: bool = False
    token_limit: bool = False

    def extend(self, ids, model: bool, logprobs=None) -> None:
        self.tokens.extend(int(i) for i in ids)
        self.mask.extend([1.0 if model else 0.0] * len(ids))
        self.logprobs.extend([0.0] * len(ids) if logprobs is None else [float(x) for x in logprobs])


class EpisodeEngine(RolloutEngine):
    """A `RolloutEngine` whose rows are multi-turn environment episodes (module docstring)."""

    def __init__(self, cfg, mesh, rules, graphdef, algorithm, tokenizer, scorer=None):
        super().__init__(cfg, mesh, rules, graphdef, algorithm, tokenizer, scorer)
        rl = cfg.rl
        self.make_env = load_environment(rl.environment, ToolSettings.from_rl(rl))
        self.turn_tokens = rl.turn_tokens or cfg.sampling.max_new_tokens
        self.turn_sampler = self._sampler(
            dataclasses.replace(cfg.sampling, max_new_tokens=self.turn_tokens)
        )
        self.template = cfg.data.template
        self.jinja = isinstance(get_template(self.template), JinjaTemplate)

    # -- rendering ------------------------------------------------------------------------------

    def first_observation(self, env, record: dict) -> tuple[list[dict], np.ndarray]:
        """The environment's first observation and its prompt ids (its tools offered: through a
        Jinja template's `tools`, or a system message with a built-in template)."""
        messages = list(env.reset(record))
        tools = [t.schema() for t in env.tools]
        if tools and not self.jinja:
            text = tools_prompt(env.tools, self.rl.tool_call_format)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
            else:
                messages.insert(0, {"role": "system", "content": text})
        ids = render_prompt(messages, self.tokenizer, self.template, tools or None)
        return messages, ids

    def observation_ids(self, episode: Episode, observation: list[dict]) -> np.ndarray:
        tools = [t.schema() for t in episode.env.tools] or None
        return render_observation(
            episode.messages, observation, self.tokenizer, self.template, tools
        )

    # -- the episodes ---------------------------------------------------------------------------

    def sample_round(
        self, prompts: Iterator[PromptBatch], policy_params, index: int, round_: int, timings: dict
    ) -> dict:
        """The next global batch of prompts, `rl.num_generations` episodes each, as the per-row
        arrays and lists of `RolloutEngine.sample_round` plus `loss_mask` [R, N] and the
        episode statistics. time/generate counts the sampling, time/score the environment."""
        cfg, rl = self.cfg, self.rl
        batch, prompt_ids = next(prompts)
        g, rows = rl.num_generations, self.rows
        n = cfg.sampling.max_new_tokens
        row_ids = [prompt_ids[i // g] for i in range(rows)]
        extras = {k: v for k, v in batch.items() if k not in ("tokens", "lengths")}
        records = [{k: v[i // g] for k, v in extras.items()} for i in range(rows)]

        t = time.perf_counter()
        episodes = []
        for record, row_id in zip(records, row_ids, strict=True):
            env = self.make_env()
            try:
                messages, ids = self.first_observation(env, record)
            except (DataError, KeyError, TypeError, ValueError) as e:
                message = f"{type(e).__name__}: {e}".splitlines()[0]
                raise DataError(
                    f"rl.environment cannot start an episode ({message})", where=row_id
                ) from None
            episodes.append(Episode(env, ids, messages))
        buckets = sorted(set(cfg.data.prompt_buckets))
        longest = max(len(e.prompt) for e in episodes)
        if longest > buckets[-1]:
            r = int(np.argmax([len(e.prompt) for e in episodes]))
            raise DataError(
                f"the environment's first observation is {longest} tokens, more than "
                f"max(data.prompt_buckets) = {buckets[-1]}",
                where=row_ids[r],
            )
        width = next(b for b in buckets if b >= longest)
        timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t

        sample_ids = (index * rows + np.arange(rows)).astype(np.int32)
        with ThreadPoolExecutor(max_workers=min(rows, 32)) as pool:
            for turn in range(rl.max_turns):
                if not any(e.active for e in episodes):
                    break
                t = time.perf_counter()
                outs = self._sample_turn(episodes, width, policy_params, sample_ids, round_, turn)
                timings["time/generate"] = (
                    timings.get("time/generate", 0.0) + time.perf_counter() - t
                )
                t = time.perf_counter()
                self._finish_turn(episodes, outs, turn, n, pool)
                timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t

        response = np.full((rows, n), self.tokenizer.pad_id, np.int32)
        loss_mask = np.zeros((rows, n), np.float32)
        sampling_lp = np.zeros((rows, n), np.float32)
        prompt_tokens = np.full((rows, width), self.tokenizer.pad_id, np.int32)
        for r, e in enumerate(episodes):
            k = len(e.tokens)
            response[r, :k], loss_mask[r, :k], sampling_lp[r, :k] = e.tokens, e.mask, e.logprobs
            prompt_tokens[r, width - len(e.prompt) :] = e.prompt
        lengths = np.asarray([len(e.tokens) for e in episodes], np.int32)
        stopped = np.asarray([e.done for e in episodes])
        raw_scores = np.asarray([e.reward for e in episodes], np.float64)
        scores = raw_scores.copy()
        if rl.missing_eos_penalty is not None:
            scores = np.where(stopped, scores, scores - rl.missing_eos_penalty)
        if rl.reward_clip is not None:
            scores = np.clip(scores, -rl.reward_clip, rl.reward_clip)
        extra = {}
        if rl.turn_rewards:
            extra["turn_rewards"] = np.zeros((rows, n), np.float32)
            for r, e in enumerate(episodes):
                for at, reward in e.turn_rewards:
                    extra["turn_rewards"][r, at] += reward
        stats = {
            EPISODE_PREFIX + name: np.asarray([float(getattr(e, name)) for e in episodes])
            for name in EPISODE_STATS
        }
        return {
            "prompt_tokens": prompt_tokens,
            "prompt_lengths": np.asarray([len(e.prompt) for e in episodes], np.int32),
            "response": response,
            "lengths": lengths,
            "stopped": stopped,
            "sampling_lp": sampling_lp,
            "loss_mask": loss_mask,
            "raw_scores": raw_scores,
            "scores": scores,
            "texts": [self.tokenizer.decode(e.tokens) for e in episodes],
            "records": records,
            "row_ids": row_ids,
            **extra,
            **stats,
        }

    def _sample_turn(self, episodes, width, policy_params, sample_ids, round_, turn):
        """Every row's next model turn, from its prefix (rows no longer active are sampled too,
        so every call has the same shape, and ignored): tokens [R, T], lengths, stopped,
        log-probs [R, T] and texts."""
        rows = len(episodes)
        used = max(len(e.tokens) for e in episodes if e.active)
        prefix_width = width + (response_width(used, self.response_buckets) if used else 0)
        prefix = np.full((rows, prefix_width), self.tokenizer.pad_id, np.int32)
        prefix_lengths = np.zeros(rows, np.int32)
        for r, e in enumerate(episodes):
            seq = np.concatenate([e.prompt, np.asarray(e.tokens, np.int32)])[-prefix_width:]
            prefix[r, prefix_width - len(seq) :] = seq
            prefix_lengths[r] = len(seq)
        seed = turn_seed(self.cfg.sampling.seed, round_, turn)
        per_call = min(rows, self.cfg.sampling.batch_size * self.rl.num_generations)
        outs = []
        for s in range(0, rows, per_call):
            sl = slice(s, s + per_call)
            outs.append(
                self.turn_sampler.generate_padded(
                    policy_params, prefix[sl], prefix_lengths[sl], sample_ids[sl], seed
                )
            )
        gens = [
            tuple(
                shd.host_array(x)
                for x in (o.tokens, o.lengths, o.finish_reasons, o.sampling_logprobs)
            )
            for o in outs
        ]
        tokens, lengths, finish, logprobs = (np.concatenate(x) for x in zip(*gens, strict=True))
        lengths, stopped, texts = self.stops.finish_rows(tokens, lengths, finish)
        return tokens, lengths, stopped, logprobs, texts

    def _finish_turn(self, episodes, outs, turn: int, n: int, pool: ThreadPoolExecutor) -> None:
        """Append each active row's model turn, step its environment (concurrently: a slow tool
        holds up only its own row until rl.tool_timeout) and append the observation."""
        tokens, lengths, stopped, logprobs, texts = outs
        stepping = []
        for r, e in enumerate(episodes):
            if not e.active:
                continue
            k = int(lengths[r])
            room = n - len(e.tokens)
            ended = bool(stopped[r]) and k <= room
            k = min(k, room)
            e.extend(tokens[r, :k], True, logprobs[r, :k])
            e.turns += 1
            if not ended:  # cut at rl.turn_tokens or at the episode's budget
                e.active, e.token_limit = False, True
                continue
            e.messages.append({"role": "assistant", "content": texts[r]})
            stepping.append(r)
        results = pool.map(lambda r: episodes[r].env.step(texts[r]), stepping)
        for r, (observation, reward, done, info) in zip(stepping, results, strict=True):
            e = episodes[r]
            e.reward += float(reward)
            e.turn_rewards.append((len(e.tokens) - 1, float(reward)))  # its turn's last token
            e.tool_calls += int(info.get("tool_calls", 0))
            e.tool_errors += int(info.get("tool_errors", 0))
            if done or not observation:
                e.active, e.done = False, True
                continue
            if turn + 1 >= self.rl.max_turns:
                e.active, e.turn_limit = False, True
                continue
            ids = self.observation_ids(e, observation)
            if len(e.tokens) + len(ids) >= n:  # no room left for a model token
                e.active, e.token_limit = False, True
                continue
            e.extend(ids, False)
            e.messages.extend(observation)


def turn_seed(seed: int, round_: int, turn: int) -> int | None:
    """The sampling seed of an episode turn: the round's own for the first turn (None: the
    sampler's sampling.seed), a stream of its own for every later turn."""
    if turn == 0:
        return None if round_ == 0 else round_seed(seed, round_)
    return int(np.random.SeedSequence([seed, round_, turn]).generate_state(1)[0] >> 1)
