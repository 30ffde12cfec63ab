"""The rollout engine: prompts and parameters in, scored, advantage-ready rows out.

`RolloutEngine.rollout` samples `rl.num_generations` completions per prompt with the policy,
scores them (`jaxalign.rewards.Scorer`), runs the policy (old log-probs, entropy, values) and
reference forwards over the rows, and the algorithm's `postprocess` (rewards, advantages) over
the whole rollout's global arrays. It keeps no data state: the RL data iterator
(`trainers/rollout.py`) feeds it prompts and the current parameters and cuts its rows into
minibatches. Every process runs the same rollout over the whole global batch (prompts unsharded,
arrays global), so statistics such as whitening are global.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.continuous import ContinuousSampler, sample_rows
from jaxalign.errors import ConfigError
from jaxalign.generate import Sampler, Stops
from jaxalign.hf.peft import merge_lora
from jaxalign.models.auto import target_platform
from jaxalign.models.lora import adapters_off
from jaxalign.models.registry import build
from jaxalign.optim import with_trained
from jaxalign.rewards import Scorer
from jaxalign.trainers.rl_rows import (
    ROW_KEYS,
    build_rows,
    pack_micro_batch,
    pack_plan,
    packed_row_count,
    response_buckets,
    response_logprobs,
    response_values,
    response_width,
    sequence_spans,
)
from jaxalign.trainers.scoring import family_scores, pass_rate, read_prompt_file

REWARD_PREFIX = "rollout/reward/"  # each reward's own mean score
EPISODE_PREFIX = "rollout/episode/"  # per-row episode statistics (multi-turn), logged as means

# A batch of prompts (a prompt iterator's `next()`: tokens [P, W] left-padded, lengths [P] and
# each record's extra fields) and the record ids (`path:LINE`) of its prompts.
PromptBatch = tuple[dict[str, Any], list[str]]


class RolloutAlgorithm(Protocol):
    """What the engine asks of an RL algorithm (`trainers/ppo.py`'s `RLAlgorithm`)."""

    needs_values: bool  # whether the rows get the value model's values

    def policy_module(self, model: nnx.Module) -> nnx.Module:
        """The language model inside the trained module."""

    def policy_params(self, params: Any) -> Any:
        """The policy's parameters inside the trained module's."""

    def postprocess(self, rollout: dict, kl_coef: jax.Array) -> tuple[dict, dict]:
        """Jittable: global arrays (scores, stopped, mask, old_logprobs, ref_logprobs[, values])
        -> the per-row arrays the loss reads, and scalar metrics."""

    def after_rollout(self, metrics: dict[str, float], rows: int) -> dict[str, float]:
        """Host-side, after postprocess (e.g. the adaptive KL controller's update)."""


@dataclasses.dataclass
class RolloutResult:
    """One rollout. `buffer`: the per-row arrays the loss reads, host-side, [rows, ...] (the
    rows' tokens, positions, segment_ids, mask and the algorithm's advantages, log-probs, ...);
    `scores` [rows] (after rl.missing_eos_penalty and rl.reward_clip); `texts`, `records`,
    `row_ids`: each row's completion, prompt record fields and prompt record id; `metrics`:
    the rollout's scalar metrics and timings."""

    buffer: dict[str, np.ndarray]
    scores: np.ndarray
    texts: list[str]
    records: list[dict]
    row_ids: list[str]
    metrics: dict[str, float]


class RolloutEngine:
    """Runs rollouts of an RL config on a mesh (see the module docstring). Built once from what
    does not change over a run (the mesh, sharding rules and the trained module's graphdef);
    every `rollout` call takes the current parameters."""

    def __init__(
        self,
        cfg: Config,
        mesh,
        rules,
        graphdef: nnx.GraphDef,
        algorithm: RolloutAlgorithm,
        tokenizer,
        scorer: Scorer,
    ):
        rl = cfg.rl
        self.cfg, self.rl = cfg, rl
        self.lora = cfg.model.lora is not None
        # With LoRA and rl.lora_sampling merged, the samplers run the plain model on
        # W + scale * A @ B, merged once per rollout (`sampling_params`).
        self.merged = self.lora and rl.lora_sampling == "merged"
        self._merge = jax.jit(functools.partial(merge_lora, lora_cfg=cfg.model.lora))
        self.mesh, self.rules = mesh, rules
        self.algorithm, self.tokenizer, self.scorer = algorithm, tokenizer, scorer
        self.rows = rl.prompts_per_rollout * rl.num_generations
        self.response_buckets = response_buckets(cfg)
        self.row_sharding = NamedSharding(mesh, shd.logical_to_spec(("batch", None), rules))
        self.vec_sharding = NamedSharding(mesh, shd.logical_to_spec(("batch",), rules))
        divisor = shd.batch_divisor(mesh, rules)
        if rl.forward_batch_size % divisor:
            raise ConfigError(
                f"rl.forward_batch_size ({rl.forward_batch_size}) must be a multiple of the "
                f"devices the batch is split over ({divisor})"
            )
        self.stops = Stops.for_config(tokenizer, cfg)
        self.sampler = self._sampler(
            cfg.sampling,
            continuous=continuous_batching(cfg),
            max_prompt_len=max(cfg.data.prompt_buckets),
            group=rl.num_generations,
        )
        temperature = cfg.sampling.temperature
        recompute = rl.old_logprobs == "recompute"

        def policy_forward(params, batch):
            model = nnx.merge(graphdef, params)
            out = {}
            logp, entropy = response_logprobs(algorithm.policy_module(model), batch, temperature)
            out["entropy"] = entropy
            if recompute:
                out["old_logprobs"] = logp
            if algorithm.needs_values:
                out["values"] = response_values(model, batch)
            return out

        with target_platform(mesh):
            ref_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))

        def reference_forward(params, batch):
            ref = nnx.merge(ref_graphdef, params)
            return response_logprobs(ref, batch, temperature, with_entropy=False)[0]

        def lora_reference_forward(params, overrides, batch):
            """The policy with its adapters off, on the trained parameters themselves, with
            the initial values of its trained base parameters (`overrides`, often none)."""
            policy = with_trained(algorithm.policy_params(params), overrides)
            with adapters_off():
                ref = nnx.merge(ref_graphdef, policy)
                return response_logprobs(ref, batch, temperature, with_entropy=False)[0]

        self._policy_forward = jax.jit(policy_forward)
        if self.lora:
            self._reference_forward = jax.jit(lora_reference_forward)
        else:
            self._reference_forward = jax.jit(lambda _, ref, batch: reference_forward(ref, batch))
        self._postprocess = jax.jit(algorithm.postprocess)
        self._concat = None
        self._take_slots = None
        self.eval_sampler = None
        if rl.eval_every and cfg.data.eval_file:
            self.eval_sampler = self._sampler(dataclasses.replace(cfg.sampling, temperature=0.0))
            self.eval_prompts = read_prompt_file(
                cfg.data.eval_file,
                tokenizer,
                cfg.data.template,
                cfg.data.prompt_buckets,
                rl.eval_prompts,
            )

    def _sampler(
        self,
        sampling,
        continuous: bool = False,
        max_prompt_len: int | None = None,
        group: int = 1,
    ) -> Sampler | ContinuousSampler:
        """A sampler of the policy: the static one, or (`continuous`) continuous batching over
        sampling.batch_size x rl.num_generations slots for prompts of up to `max_prompt_len`
        tokens, `group` rows sharing each prompt's prefill."""
        model_cfg = self.cfg.model
        if self.merged:
            model_cfg = dataclasses.replace(model_cfg, lora=None)
        if continuous:
            return ContinuousSampler(
                model_cfg,
                sampling,
                slots=self.cfg.sampling.batch_size * self.rl.num_generations,
                max_prompt_len=max_prompt_len,
                max_group=group,
                stop_token_ids=self.stops.token_ids,
                stop_sequences=self.stops.sequences,
                pad_id=self.tokenizer.pad_id,
                mesh=self.mesh,
                rules=self.rules,
            )
        return Sampler(
            model_cfg,
            sampling,
            stop_token_ids=self.stops.token_ids,
            stop_sequences=self.stops.sequences,
            pad_id=self.tokenizer.pad_id,
            mesh=self.mesh,
            rules=self.rules,
        )

    def sampling_params(self, policy_params: Any) -> Any:
        """What the samplers take for the policy `policy_params`: those, or with LoRA merged
        sampling a temporary W + scale * A @ B of every adapted weight (float32 math, the
        weight's dtype and sharding), computed now from the current adapters."""
        return self._merge(policy_params) if self.merged else policy_params

    # -- the rollout ----------------------------------------------------------------------------

    def rollout(
        self,
        prompts: Iterator[PromptBatch],
        params: Any,
        reference: Callable[[], Any] | None,
        index: int,
        kl_coef: float,
    ) -> RolloutResult:
        """One rollout from `params` (the trained module's). `prompts`: the global batches of
        prompts, one per sampling round (several only with rl.filter_groups); `reference`:
        gives the reference policy's parameters on device (called after generation, so an
        offloaded reference is on device only for the forwards), None for no reference;
        `index`: the rollout's number (each row's random stream); `kl_coef`: the KL
        coefficient for postprocess."""
        rl, algorithm = self.rl, self.algorithm
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {}
        policy_params = algorithm.policy_params(params)

        # 1-2. Generate G samples per prompt and score them. rl.filter_groups (DAPO's dynamic
        # sampling): more batches of prompts until the rollout's groups all have a spread of
        # scores (select_groups), at most rl.max_generate_rounds batches.
        g, rows = rl.num_generations, self.rows
        t = time.perf_counter()
        sampling_params = self.sampling_params(policy_params)
        timings["time/generate"] = time.perf_counter() - t
        rounds = [self.sample_round(prompts, sampling_params, index, 0, timings)]
        if rl.filter_groups:
            want = rl.prompts_per_rollout
            picks, spread = select_groups([r["scores"] for r in rounds], g, want)
            while spread < want and len(rounds) < rl.max_generate_rounds:
                rounds.append(
                    self.sample_round(prompts, sampling_params, index, len(rounds), timings)
                )
                picks, spread = select_groups([r["scores"] for r in rounds], g, want)
            sampled = join_rounds(rounds, picks, g, self.tokenizer.pad_id)
            generated = sum(len(r["scores"]) for r in rounds) // g
            metrics["rollout/generate_rounds"] = float(len(rounds))
            metrics["rollout/groups_filtered"] = 1.0 - spread / generated
            metrics["rollout/sampled_scores"] = float(
                np.mean(np.concatenate([r["raw_scores"] for r in rounds]))
            )
        else:
            sampled = rounds[0]
        del sampling_params  # a merged copy is freed before the forwards
        prompt_tokens, prompt_lengths = sampled["prompt_tokens"], sampled["prompt_lengths"]
        records, raw_scores, scores = sampled["records"], sampled["raw_scores"], sampled["scores"]
        stopped, lengths = sampled["stopped"], sampled["lengths"]
        # Trim the rows to the response bucket of the longest response: the columns cut are
        # padding in every row.
        n = response_width(int(lengths.max()), self.response_buckets)
        response, sampling_lp = sampled["response"][:, :n], sampled["sampling_lp"][:, :n]

        # 3. Reference (and policy / value) forwards over the rows.
        t = time.perf_counter()
        rows_np = build_rows(
            prompt_tokens,
            prompt_lengths,
            response,
            lengths,
            prompt_tokens.shape[1],
            self.tokenizer.pad_id,
        )
        if "loss_mask" in sampled:  # multi-turn episodes: only the model's own tokens train
            rows_np["mask"] = np.ascontiguousarray(sampled["loss_mask"][:, :n], np.float32)
        # In chunks of rl.forward_batch_size rows: the float32 logits of a chunk are live at once.
        # With rl.pack_rows, each chunk's sequences are packed as for training and the results
        # gathered back to one row per sequence.
        chunk = rl.forward_batch_size or rows
        forwards, refs = [], []
        ref_params = None if reference is None else reference()
        for s in range(0, rows, chunk):
            plain = {k: rows_np[k][s : s + chunk] for k in (*ROW_KEYS, "mask")}
            seq, slots = self._forward_rows(plain)
            seq = {k: self._put(v) for k, v in seq.items()}
            policy_out = self._policy_forward(params, seq)
            ref_out = (
                None if ref_params is None else self._reference_forward(params, ref_params, seq)
            )
            if slots is not None:
                policy_out, ref_out = self._unpack(policy_out, ref_out, slots)
            forwards.append(policy_out)
            refs.append(ref_out)
        del ref_params
        forward = {k: self._concat_rows(*(f[k] for f in forwards)) for k in forwards[0]}
        rollout = {
            "scores": self._put(scores.astype(np.float32)),
            "stopped": self._put(stopped.astype(np.float32)),
            "mask": self._put(rows_np["mask"]),
            "entropy": forward["entropy"],
        }
        if rl.old_logprobs == "recompute":
            rollout["old_logprobs"] = forward["old_logprobs"]
            # The sampler's log-probs against the training forward's on the same parameters:
            # 0 up to rounding unless the sampler ran on other (stale) weights.
            gap = np.abs(shd.host_array(forward["old_logprobs"]) - sampling_lp)
            metrics["rollout/sampler_logprob_gap"] = float(np.max(gap * (rows_np["mask"] > 0)))
        else:
            rollout["old_logprobs"] = self._put(sampling_lp.astype(np.float32))
        # Without a reference its log-probs are the rollout policy's: every KL term is 0.
        rollout["ref_logprobs"] = (
            rollout["old_logprobs"] if refs[0] is None else self._concat_rows(*refs)
        )
        if algorithm.needs_values:
            rollout["values"] = forward["values"]
        if "turn_rewards" in sampled:  # rl.turn_rewards: per-token rewards of the episodes
            rollout["turn_rewards"] = self._put(sampled["turn_rewards"][:, :n].astype(np.float32))
            rollout["raw_scores"] = self._put(raw_scores.astype(np.float32))
        jax.block_until_ready(rollout)
        timings["time/forward"] = time.perf_counter() - t

        # 4. Rewards, advantages (jitted over the global arrays: global statistics).
        t = time.perf_counter()
        buffer, post_metrics = self._postprocess(rollout, jnp.float32(kl_coef))
        buffer = {k: shd.host_array(v) for k, v in buffer.items()}
        post_metrics = {k: float(v) for k, v in jax.device_get(post_metrics).items()}
        post_metrics.update(algorithm.after_rollout(post_metrics, rows))
        timings["time/advantages"] = time.perf_counter() - t
        buffer.update({k: rows_np[k] for k in (*ROW_KEYS, "mask")})

        metrics.update(post_metrics)
        metrics.update(family_scores(records, raw_scores))
        if self.scorer is not None and len(self.scorer.names) > 1:
            metrics.update(
                {k: float(v.mean()) for k, v in sampled.items() if k.startswith(REWARD_PREFIX)}
            )
        metrics.update(
            {k: float(v.mean()) for k, v in sampled.items() if k.startswith(EPISODE_PREFIX)}
        )
        metrics.update(
            {
                "objective/scores": float(scores.mean()),
                "objective/raw_scores": float(raw_scores.mean()),
                "rollout/response_length": float(lengths.mean()),
                "rollout/row_width": float(rows_np["tokens"].shape[1]),
                "rollout/eos_fraction": float(stopped.mean()),
                "kl_coef": kl_coef,
                **timings,
            }
        )
        return RolloutResult(
            buffer=buffer,
            scores=scores,
            texts=sampled["texts"],
            records=records,
            row_ids=sampled["row_ids"],
            metrics=metrics,
        )

    def sample_round(
        self, prompts: Iterator[PromptBatch], policy_params, index: int, round_: int, timings: dict
    ) -> dict:
        """The next global batch of prompts, `rl.num_generations` samples each (round_ > 0:
        another random stream), decoded and scored: per-row arrays and lists, responses at
        the sampler's full width. Adds to time/generate and time/score in `timings`."""
        cfg, rl = self.cfg, self.rl
        t = time.perf_counter()
        batch, prompt_ids = next(prompts)
        g, rows = rl.num_generations, self.rows
        row_ids = [prompt_ids[i // g] for i in range(rows)]
        prompt_tokens = np.repeat(batch["tokens"], g, axis=0)
        prompt_lengths = np.repeat(batch["lengths"], g, axis=0)
        extras = {k: v for k, v in batch.items() if k not in ("tokens", "lengths")}
        records = [{k: v[i // g] for k, v in extras.items()} for i in range(rows)]
        sample_ids = (index * rows + np.arange(rows)).astype(np.int32)
        seed = None if round_ == 0 else round_seed(cfg.sampling.seed, round_)
        # Every process needs every row (it scores them all): gathered across processes.
        out = sample_rows(
            self.sampler,
            policy_params,
            prompt_tokens,
            prompt_lengths,
            sample_ids,
            seed,
            cfg.sampling.batch_size * g,
            group=g,
        )
        response, lengths, finish = out.tokens, out.lengths, out.finish_reasons
        sampling_lp = out.sampling_logprobs
        timings["time/generate"] = timings.get("time/generate", 0.0) + time.perf_counter() - t

        t = time.perf_counter()
        lengths, stopped, texts = self.stops.finish_rows(response, lengths, finish)
        if self.stops.strings:  # rows cut at a stop string end there
            past = np.arange(response.shape[1])[None, :] >= lengths[:, None]
            response = np.where(past, self.tokenizer.pad_id, response)
            sampling_lp = np.where(past, 0.0, sampling_lp).astype(sampling_lp.dtype)
        prompt_texts = [
            self.tokenizer.decode(p[-n:].tolist())
            for p, n in zip(batch["tokens"], batch["lengths"], strict=True)
        ]
        prompt_texts = [prompt_texts[i // g] for i in range(rows)]
        eos = self.tokenizer.eos_id
        sequences = None  # what a reward model scores: prompt + response (+ EOS), token ids
        if self.scorer.needs_sequences:
            sequences = []
            for r in range(rows):
                seq = [*prompt_tokens[r, -prompt_lengths[r] :], *response[r, : lengths[r]]]
                sequences.append(np.asarray(seq if seq[-1] == eos else [*seq, eos], np.int32))
        raw_scores, rewards = self.scorer.parts(prompt_texts, texts, records, sequences)
        scores = raw_scores.copy()
        if rl.missing_eos_penalty is not None:
            scores = np.where(stopped, scores, scores - rl.missing_eos_penalty)
        if rl.reward_clip is not None:
            scores = np.clip(scores, -rl.reward_clip, rl.reward_clip)
        timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t
        return {
            "prompt_tokens": prompt_tokens,
            "prompt_lengths": prompt_lengths,
            "response": response,
            "lengths": lengths,
            "stopped": stopped,
            "sampling_lp": sampling_lp,
            "raw_scores": raw_scores,
            "scores": scores,
            "texts": texts,
            "records": records,
            "row_ids": row_ids,
            **{REWARD_PREFIX + name: part for name, part in rewards.items()},
        }

    def _forward_rows(self, plain: dict[str, np.ndarray]) -> tuple[dict, np.ndarray | None]:
        """The rows a rollout forward runs on: `plain` itself, or (rl.pack_rows > 1) its
        sequences packed as `pack_micro_batch` does for training, into as many rows as they
        need rounded up to a multiple of 8 and of the devices the batch is split over (at most
        the plain row count), with each plain row's slot in the packed result."""
        per_row = self.rl.pack_rows
        if per_row <= 1:
            return plain, None
        count, width = plain["tokens"].shape
        plan = pack_plan(sequence_spans(plain["segment_ids"])[1], width, per_row)
        divisor = shd.batch_divisor(self.mesh, self.rules)
        packed_rows = packed_row_count(len(plan), divisor, count)
        packed = pack_micro_batch(plain, plan, packed_rows, per_row, self.tokenizer.pad_id)
        slots = np.zeros(count, np.int32)
        for r, seqs in enumerate(plan):
            for j, i in enumerate(seqs):
                slots[i] = r * per_row + j
        return packed, slots

    def _unpack(self, policy_out: dict, ref_out: jax.Array, slots: np.ndarray):
        """Packed forward results [S, N] back in plain row order [rows, N] (`slots`: each plain
        row's slot), rows over the batch axes."""
        if self._take_slots is None:
            self._take_slots = jax.jit(
                lambda tree, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree),
                out_shardings=self.row_sharding,
            )
        return self._take_slots((policy_out, ref_out), slots)

    def _concat_rows(self, *parts: jax.Array) -> jax.Array:
        """The [rows, ...] concatenation of per-chunk results, rows over the batch axes."""
        if len(parts) == 1:
            return parts[0]
        if self._concat is None:
            self._concat = jax.jit(
                lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=self.row_sharding
            )
        return self._concat(*parts)

    def _put(self, x: np.ndarray) -> jax.Array:
        sharding = self.row_sharding if x.ndim == 2 else self.vec_sharding
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def evaluate(self, params) -> dict:
        """Held-out greedy pass rate of the current policy over data.eval_file."""
        ids, records = self.eval_prompts

        rows = shd.batch_divisor(self.mesh, self.rules) * 32
        out = pass_rate(
            self.eval_sampler,
            self.sampling_params(params),
            ids,
            records,
            self.scorer.without_sequences,
            self.stops,
            rows=rows,
        )
        return {"eval/pass_rate": out["pass_rate"], "eval/mean_score": out["mean_score"]}


def continuous_batching(cfg: Config) -> bool:
    """Whether rollouts sample with continuous batching: rl.sampler continuous and no sampling
    penalties (which only the static sampler applies)."""
    sp = cfg.sampling
    penalties = sp.repetition_penalty != 1 or sp.presence_penalty != 0 or sp.frequency_penalty != 0
    return cfg.rl.sampler == "continuous" and not penalties


def join_rounds(rounds: list[dict], picks: list[tuple[int, int]], group: int, pad_id: int) -> dict:
    """One rollout from the groups `picks` ((round, group) pairs, `group` rows each) of
    sampling rounds' per-row arrays and lists; prompts left-padded to the widest prompt bucket
    among them."""
    width = max(rounds[r]["prompt_tokens"].shape[1] for r, _ in picks)
    out = {}
    for key, first in rounds[0].items():
        parts = [rounds[r][key][i * group : (i + 1) * group] for r, i in picks]
        if key == "prompt_tokens":
            parts = [
                np.pad(p, ((0, 0), (width - p.shape[1], 0)), constant_values=pad_id) for p in parts
            ]
        if isinstance(first, np.ndarray):
            out[key] = np.concatenate(parts)
        else:
            out[key] = [x for part in parts for x in part]
    return out


def select_groups(
    scores: Sequence[np.ndarray], group: int, want: int
) -> tuple[list[tuple[int, int]], int]:
    """DAPO's dynamic sampling. `scores`: each sampling round's row scores [rows], `group`
    consecutive rows per prompt. Returns `want` (round, group) pairs, the groups whose scores
    are not all equal first (in order), then, if there are too few, the others in order; and
    how many groups have a spread. A group of equal scores has zero advantage everywhere: no
    policy gradient, only its tokens in the loss's denominator."""
    spread, flat = [], []
    for r, round_scores in enumerate(scores):
        for i, g in enumerate(np.asarray(round_scores).reshape(-1, group)):
            (spread if g.max() > g.min() else flat).append((r, i))
    return (spread + flat)[:want], len(spread)


def round_seed(seed: int, round_: int) -> int:
    """The sampling seed of a rollout's extra sampling round (rl.filter_groups): a stream of
    its own, not the first round's (`sampling.seed`)."""
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0] >> 1)
