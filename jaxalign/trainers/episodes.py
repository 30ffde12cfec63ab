"""Multi-turn episodes in rollouts (`rl.environment`): the rollout engine with a `sample_round`
that runs environment episodes instead of sampling one response per prompt. The episode loop
itself (`EpisodeRunner`) also runs the environment evals (rl.eval_every, `jaxalign eval
--environment`: `jaxalign/eval/episodes.py`).

An episode's row is [first observation, left padded to P | model turn 1, observation 1, model
turn 2, ... , padding], the part after P at most sampling.max_new_tokens (N) tokens. Every model
turn is sampled with the prefix the row holds so far (the same token ids, positions and
attention the training forward sees, so the sampler's log-probs are the trainer's), at most
rl.turn_tokens tokens; the environment's observation after it is rendered through the chat
template (`render_observation`) and appended (after the template's end marker, as context,
when the turn ended at a sampling.stop string). The row's loss mask is 1 on the model's tokens
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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from jaxalign import sharding as shd
from jaxalign.continuous import ContinuousSampler, Request, sample_rows
from jaxalign.data.prompts import PromptBatchIterator
from jaxalign.data.templates import JinjaTemplate, get_template, render_observation, render_prompt
from jaxalign.envs import ToolSettings, load_environment, tools_prompt
from jaxalign.errors import DataError
from jaxalign.generate import Sampler, Stops
from jaxalign.trainers.rl_rows import response_buckets, response_width
from jaxalign.trainers.rollout_engine import (
    EPISODE_PREFIX,
    PromptBatch,
    RolloutEngine,
    continuous_batching,
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


class EpisodeRunner:
    """Runs environment episodes with a turn sampler: what the rollout engine's `sample_round`
    and the environment evals (`jaxalign.eval.episodes`, rl.eval_every) share. `cfg`: the run
    config (its `rl` environment keys, data.template, sampling.max_new_tokens, sampling.seed);
    `turn_sampler`: samples one model turn (at most rl.turn_tokens tokens); `rows_per_call`:
    rows per sampler call (None: all of a `run`'s rows in one)."""

    def __init__(
        self, cfg, tokenizer, stops: Stops, turn_sampler: Sampler, rows_per_call: int | None
    ):
        rl = cfg.rl
        self.cfg, self.rl = cfg, rl
        self.tokenizer, self.stops = tokenizer, stops
        self.make_env = load_environment(rl.environment, ToolSettings.from_rl(rl))
        self.turn_sampler = turn_sampler
        self.rows_per_call = rows_per_call
        self.response_buckets = response_buckets(cfg)
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

    def observation_ids(
        self, episode: Episode, observation: list[dict], closed: bool = True
    ) -> np.ndarray:
        """The ids after the episode's last model token: its end marker when the turn ended
        without one (`closed=False`, a sampling.stop string), the observation, the next
        assistant header."""
        tools = [t.schema() for t in episode.env.tools] or None
        return render_observation(
            episode.messages, observation, self.tokenizer, self.template, tools, closed
        )

    # -- the episodes ---------------------------------------------------------------------------

    def start(
        self, records: list[dict], row_ids: list[str], buckets: list[int] | None
    ) -> tuple[list[Episode], int]:
        """A fresh environment per record and its first observation; the prompt width (the
        smallest of `buckets` that holds every first observation; None: a multiple of 64). A
        record the environment cannot start from is a one-line DataError naming its
        `path:LINE` (`row_ids`)."""
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
        longest = max(len(e.prompt) for e in episodes)
        if buckets is None:
            return episodes, -(-longest // 64) * 64
        buckets = sorted(set(buckets))
        if longest > buckets[-1]:
            r = int(np.argmax([len(e.prompt) for e in episodes]))
            raise DataError(
                f"the environment's first observation is {longest} tokens, more than "
                f"max(data.prompt_buckets) = {buckets[-1]}",
                where=row_ids[r],
            )
        return episodes, next(b for b in buckets if b >= longest)

    def run(
        self,
        episodes: list[Episode],
        width: int,
        params,
        sample_ids: np.ndarray,
        round_: int,
        timings: dict,
    ) -> None:
        """Play `episodes` (from `start`) to their ends (row r's random stream is
        `sample_ids[r]`; turn t's seed `turn_seed`). With the static sampler every turn samples
        all active rows, then steps their environments; with a continuous one every episode's
        turn is queued as soon as its last observation is in, and an episode waiting for its
        tools leaves its slot to others. The same episodes either way. Adds to time/generate
        (sampling) and time/score (environments, as far as sampling waited for them) in
        `timings`."""
        n = self.cfg.sampling.max_new_tokens
        with ThreadPoolExecutor(max_workers=min(len(episodes), 32)) as pool:
            if isinstance(self.turn_sampler, ContinuousSampler):
                self._run_continuous(episodes, params, sample_ids, round_, timings, n, pool)
                return
            for turn in range(self.rl.max_turns):
                if not any(e.active for e in episodes):
                    break
                t = time.perf_counter()
                outs = self._sample_turn(episodes, width, params, sample_ids, round_, turn)
                timings["time/generate"] = (
                    timings.get("time/generate", 0.0) + time.perf_counter() - t
                )
                t = time.perf_counter()
                self._finish_turn(episodes, outs, turn, n, pool)
                timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t

    def _run_continuous(self, episodes, params, sample_ids, round_, timings, n, pool) -> None:
        """`run` over a ContinuousSampler's slots: turns are sampled as episodes become ready,
        environments stepped in `pool` while the other episodes decode."""
        session = self.turn_sampler.session(params)
        seed = self.cfg.sampling.seed

        def submit(r: int, turn: int) -> None:
            e = episodes[r]
            prefix = np.concatenate([e.prompt, np.asarray(e.tokens, np.int32)])
            room = n - len(e.tokens)  # a turn cut by the episode's budget: token limit
            turn_stream = turn_seed(seed, round_, turn)
            request = Request(
                prefix,
                [int(sample_ids[r])],
                seed if turn_stream is None else turn_stream,
                [min(room, self.turn_sampler.max_new_tokens)],
            )
            session.submit((r, turn), request)

        for r in range(len(episodes)):
            submit(r, 0)
        stepping: dict = {}  # future -> (row, turn, closed)
        while session.busy or stepping:
            if session.busy:
                t = time.perf_counter()
                done = session.step()
                timings["time/generate"] = (
                    timings.get("time/generate", 0.0) + time.perf_counter() - t
                )
                for (r, turn), [(tokens, length, stopped, _, logprobs)] in done.items():
                    k, stopped, text = self.stops.finish(tokens[:length], bool(stopped))
                    closed = self._model_turn(episodes[r], tokens, k, stopped, logprobs, text, n)
                    if closed is not None:
                        e = episodes[r]
                        future = pool.submit(e.env.step, e.messages[-1]["content"])
                        stepping[future] = (r, turn, closed)
            ready = [f for f in stepping if f.done()]
            if not ready and stepping and not session.busy:
                t = time.perf_counter()
                ready = list(wait(stepping, return_when=FIRST_COMPLETED).done)
                timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t
            for future in ready:
                r, turn, closed = stepping.pop(future)
                if self._observe(episodes[r], future.result(), turn, closed, n):
                    submit(r, turn + 1)

    def _sample_turn(self, episodes, width, params, sample_ids, round_, turn):
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
        out = sample_rows(
            self.turn_sampler, params, prefix, prefix_lengths, sample_ids, seed, self.rows_per_call
        )
        lengths, stopped, texts = self.stops.finish_rows(
            out.tokens, out.lengths, out.finish_reasons
        )
        return out.tokens, lengths, stopped, out.sampling_logprobs, texts

    def _finish_turn(self, episodes, outs, turn: int, n: int, pool: ThreadPoolExecutor) -> None:
        """Append each active row's model turn (`_model_turn`), step its environment
        (concurrently: a slow tool holds up only its own row until rl.tool_timeout) and append
        the observation (`_observe`)."""
        tokens, lengths, stopped, logprobs, texts = outs
        stepping, closed = [], {}
        for r, e in enumerate(episodes):
            if not e.active:
                continue
            ended = self._model_turn(
                e, tokens[r], int(lengths[r]), bool(stopped[r]), logprobs[r], texts[r], n
            )
            if ended is not None:
                closed[r] = ended
                stepping.append(r)
        results = pool.map(
            lambda r: episodes[r].env.step(episodes[r].messages[-1]["content"]), stepping
        )
        for r, result in zip(stepping, results, strict=True):
            self._observe(episodes[r], result, turn, closed[r], n)

    def _model_turn(self, e: Episode, tokens, k: int, stopped: bool, logprobs, text, n: int):
        """Append a model turn of `k` tokens (cut to the episode's budget). Returns None when
        the episode ends here (cut at rl.turn_tokens or at the budget: token limit), else
        whether the turn ended with a stop token (closed) or at a sampling.stop string.

        A turn that ended at a sampling.stop string keeps the string: its tokens are in the
        row, so the assistant message (what the environment reads, and what the template
        renders) is their text, and its end marker comes before the observation as context,
        so the row is what the chat template renders for the conversation."""
        room = n - len(e.tokens)
        ended = stopped and k <= room
        k = min(k, room)
        e.extend(tokens[:k], True, logprobs[:k])
        e.turns += 1
        if not ended:
            e.active, e.token_limit = False, True
            text = self.tokenizer.decode(tokens[:k])
            e.messages.append({"role": "assistant", "content": text})  # for the record
            return None
        closed = k > 0 and int(tokens[k - 1]) in self.stops.token_ids
        text = text if closed else self.tokenizer.decode(tokens[:k])
        e.messages.append({"role": "assistant", "content": text})
        return closed

    def _observe(self, e: Episode, result, turn: int, closed: bool, n: int) -> bool:
        """Count an environment step's (observation, reward, done, info) and append the
        observation; whether the episode goes on to another model turn."""
        observation, reward, done, info = result
        e.reward += float(reward)
        e.turn_rewards.append((len(e.tokens) - 1, float(reward)))  # its turn's last token
        e.tool_calls += int(info.get("tool_calls", 0))
        e.tool_errors += int(info.get("tool_errors", 0))
        if done or not observation:
            e.active, e.done = False, True
            return False
        if turn + 1 >= self.rl.max_turns:
            e.active, e.turn_limit = False, True
            return False
        ids = self.observation_ids(e, observation, closed)
        if len(e.tokens) + len(ids) >= n:  # no room left for a model token
            e.active, e.token_limit = False, True
            return False
        e.extend(ids, False)
        e.messages.extend(observation)
        return True


def episode_metrics(episodes: list[Episode], success: float = 1.0) -> dict[str, float]:
    """Summary of finished episodes (rates in percent): `success_rate` (episodes whose score
    reached `success`), mean `turns` and `tool_calls` per episode, `tool_error_rate` (tool calls
    that failed), `turn_limit_rate` and `token_limit_rate` (episodes a limit ended)."""
    calls = sum(e.tool_calls for e in episodes)
    return {
        "success_rate": 100.0 * float(np.mean([e.reward >= success for e in episodes])),
        "turns": float(np.mean([e.turns for e in episodes])),
        "tool_calls": float(np.mean([e.tool_calls for e in episodes])),
        "tool_error_rate": 100.0 * sum(e.tool_errors for e in episodes) / calls if calls else 0.0,
        "turn_limit_rate": 100.0 * float(np.mean([e.turn_limit for e in episodes])),
        "token_limit_rate": 100.0 * float(np.mean([e.token_limit for e in episodes])),
    }


def read_episode_records(
    path: str, tokenizer, template: str, limit: int = 0
) -> tuple[list[dict], list[str]]:
    """Every record of a prompts file (its fields, its prompt as `messages`) and its id
    (`path:LINE`), in file order; the first `limit` (0: all)."""
    it = PromptBatchIterator(
        path,
        tokenizer,
        global_batch_size=1,
        template=template,
        buckets=[2**k for k in range(6, 17)],  # the environment renders it again: no cut
        shuffle=False,
        num_epochs=1,
        shards=1,
        keep_messages=True,
    )
    count = it.stats["records"] if not limit else min(limit, it.stats["records"])
    records, ids = [], []
    for _ in range(count):
        batch = next(it)
        records.append({k: v[0] for k, v in batch.items() if k not in ("tokens", "lengths")})
        ids.extend(it.record_ids())
    return records, ids


def evaluate_episodes(
    runner: EpisodeRunner,
    params,
    records: list[dict],
    row_ids: list[str],
    rows: int,
    buckets: list[int] | None,
) -> tuple[dict[str, float], list[Episode]]:
    """Greedy episodes (`runner`'s sampler at temperature 0) over `records`, `rows` at a time
    (a multiple of the devices the batch is split over; the last batch filled with copies,
    dropped, so every call has one shape): their
    `episode_metrics` and the episodes."""
    done: list[Episode] = []
    for s in range(0, len(records), rows):
        chunk = list(range(s, min(s + rows, len(records))))
        padded = chunk + [chunk[-1]] * (rows - len(chunk))
        episodes, width = runner.start(
            [records[i] for i in padded], [row_ids[i] for i in padded], buckets
        )
        runner.run(episodes, width, params, np.arange(rows, dtype=np.int32), 0, {})
        done.extend(episodes[: len(chunk)])
    return episode_metrics(done), done


class EpisodeEngine(RolloutEngine):
    """A `RolloutEngine` whose rows are multi-turn environment episodes (module docstring).
    With rl.eval_every, its evals are greedy episodes over data.eval_file."""

    def __init__(self, cfg, mesh, rules, graphdef, algorithm, tokenizer, scorer=None):
        super().__init__(cfg, mesh, rules, graphdef, algorithm, tokenizer, scorer)
        rl = cfg.rl
        turn = dataclasses.replace(
            cfg.sampling, max_new_tokens=rl.turn_tokens or cfg.sampling.max_new_tokens
        )
        self.episodes = EpisodeRunner(
            cfg,
            tokenizer,
            self.stops,
            self._sampler(
                turn,
                continuous=continuous_batching(cfg),
                max_prompt_len=max(cfg.data.prompt_buckets) + cfg.sampling.max_new_tokens,
            ),
            cfg.sampling.batch_size * rl.num_generations,
        )
        if self.eval_sampler is not None:
            self.eval_sampler = self._sampler(dataclasses.replace(turn, temperature=0.0))
            self.eval_episodes = EpisodeRunner(cfg, tokenizer, self.stops, self.eval_sampler, None)
            self.eval_prompts = read_episode_records(
                cfg.data.eval_file, tokenizer, cfg.data.template, rl.eval_prompts
            )

    def evaluate(self, params) -> dict:
        """Greedy episodes over data.eval_file: eval/success_rate (a fraction, as
        eval/pass_rate), eval/turns, eval/tool_calls, eval/tool_error_rate (a fraction)."""
        records, row_ids = self.eval_prompts
        divisor = shd.batch_divisor(self.mesh, self.rules)  # rows split over the batch axes
        rows = -(-min(len(records), self.cfg.sampling.batch_size) // divisor) * divisor
        metrics, _ = evaluate_episodes(
            self.eval_episodes,
            self.sampling_params(params),
            records,
            row_ids,
            rows,
            self.cfg.data.prompt_buckets,
        )
        return {
            "eval/success_rate": metrics["success_rate"] / 100.0,
            "eval/turns": metrics["turns"],
            "eval/tool_calls": metrics["tool_calls"],
            "eval/tool_error_rate": metrics["tool_error_rate"] / 100.0,
        }

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
        episodes, width = self.episodes.start(records, row_ids, cfg.data.prompt_buckets)
        timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t
        sample_ids = (index * rows + np.arange(rows)).astype(np.int32)
        self.episodes.run(episodes, width, policy_params, sample_ids, round_, timings)

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


def turn_seed(seed: int, round_: int, turn: int) -> int | None:
    """The sampling seed of an episode turn: the round's own for the first turn (None: the
    sampler's sampling.seed), a stream of its own for every later turn."""
    if turn == 0:
        return None if round_ == 0 else round_seed(seed, round_)
    return int(np.random.SeedSequence([seed, round_, turn]).generate_state(1)[0] >> 1)
