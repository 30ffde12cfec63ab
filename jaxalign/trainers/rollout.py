"""On-policy data for RL trainers: a rollout (generate, score, reference/value forwards,
advantages), then shuffled minibatches of it for the generic loop (`trainers/loop.py`).

`RolloutData` is the iterator an RL algorithm's `train_data` returns. The loop calls
`observe_state(state, trainer)` before every `next()`; when the buffer is empty the next call
runs a rollout from `state["params"]` (the trained parameters themselves: same mesh, no copy) and
queues `rl.epochs * R / train.batch_size` minibatches. Every process runs the same rollout over
the whole global batch (prompts are read unsharded, arrays are global), so statistics such as
whitening are global; each process then yields its own rows of every minibatch.

Resume is exact at rollout boundaries (RL configs require `checkpoint.every` and `train.steps`
to be multiples of the steps per rollout). A run stopped inside a rollout (SIGTERM) resumes with
a new rollout from the next prompts and yields only the minibatches that rollout had left.

With `rl.ptx_coef > 0` every minibatch also carries `ptx_*` arrays (inputs, targets, loss_mask,
segment_ids, positions: `rl.ptx_batch_size` packed rows of `rl.ptx_file`, read like SFT data)
for the PPO-ptx term of the loss (`RLAlgorithm.loss_fn`); their iterator's position is part of
the data state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.data.prompts import prompt_iterator_from_config
from jaxalign.errors import ConfigError
from jaxalign.generate import Sampler, Stops
from jaxalign.models.llama import Transformer
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
from jaxalign.trainers.scoring import (
    Scorer,
    family_scores,
    pass_rate,
    read_prompt_file,
    reward_names,
)

STATE_VERSION = 1
PTX_PREFIX = "ptx_"  # minibatch keys of the PPO-ptx rows
REWARD_PREFIX = "rollout/reward/"  # each reward's own mean score


# ---------------------------------------------------------------------------------------------
# The on-policy iterator.


class RolloutData:
    """The RL data iterator (see the module docstring). `algorithm` supplies:

    - `policy_module(model)`: the Transformer inside the trained module,
    - `needs_values`: whether to compute the value model's values,
    - `postprocess(rollout, kl_coef) -> (buffer, metrics)`: a jittable function of global
      arrays (scores, stopped, mask, old_logprobs, ref_logprobs[, values]) giving the per-row
      arrays the loss reads and scalar metrics,
    - `kl_controller`: a `rl.KLController` (its coefficient goes into postprocess).
    """

    def __init__(self, cfg: Config, algorithm, process_index: int, process_count: int):
        self.cfg = cfg
        self.rl = cfg.rl
        self.algorithm = algorithm
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = algorithm.tokenizer
        # Every process reads the whole global batch of prompts (see the module docstring).
        self.prompts = prompt_iterator_from_config(
            cfg.data, self.tokenizer, global_batch_size=self.rl.prompts_per_rollout
        )
        self.response_buckets = response_buckets(cfg)
        self.rows = self.rl.prompts_per_rollout * self.rl.num_generations
        self.steps_per_rollout = steps_per_rollout(cfg)
        self.scorer = Scorer(cfg, self.tokenizer)
        self.ptx = ptx_iterator(cfg, self.tokenizer, process_index, process_count)
        self.rollouts = 0  # rollouts started
        self.position = 0  # minibatches of the current rollout already yielded
        self.skip = 0  # after a resume inside a rollout: its minibatches already trained on
        self.queue: list[dict] = []
        self.queue_ids: list[list[str]] = []  # the prompt record ids of each queued minibatch
        self.packed_rows: list[int] = []  # rl.pack_rows: rows of each packed minibatch queued
        self._last_ids: list[str] = []
        self._state = None
        self._trainer = None
        self._metrics: list[dict] = []
        self._last_rollout_end = None
        self._built = False

    # -- loop hooks -----------------------------------------------------------------------------

    def observe_state(self, state: dict, trainer) -> None:
        self._state, self._trainer = state, trainer

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.queue:
            self._rollout()
        self.position += 1
        self._last_ids = self.queue_ids.pop(0)
        batch = self.queue.pop(0)
        if self.ptx is not None:
            batch = {**batch, **{PTX_PREFIX + k: v for k, v in next(self.ptx).items()}}
            self._last_ids = self._last_ids + self.ptx.record_ids()
        return batch

    @property
    def stats(self) -> dict:
        """The prompt data's counts (records, skipped, truncated, tokens) and the rollouts run
        (and the PPO-ptx data's counts under `ptx`)."""
        out = {**self.prompts.stats, "rollouts": self.rollouts}
        if self.ptx is not None:
            out["ptx"] = self.ptx.stats
        return out

    def report(self) -> str:
        """One line: the prompts read, skipped and truncated, and the rollouts generated."""
        return f"{self.prompts.report()}; {self.rollouts} rollouts of {self.rows} rows"

    def record_ids(self) -> list[str]:
        """The prompt record ids (`path:LINE`, ...) of the rows of the minibatch last returned
        (this process's rows), then those of its PPO-ptx records, for the NaN halt message.
        Host-side only."""
        return list(self._last_ids)

    def pop_metrics(self) -> dict[str, float]:
        """The mean of each rollout metric over the rollouts since the last call."""
        if not self._metrics:
            return {}
        keys = {k for m in self._metrics for k in m}
        out = {k: float(np.mean([m[k] for m in self._metrics if k in m])) for k in keys}
        self._metrics = []
        return out

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "prompts": self.prompts.get_state(),
            "rollouts": self.rollouts,
            "position": self.position % self.steps_per_rollout if self.rollouts else 0,
            "kl_controller": self.algorithm.kl_controller.get_state(),
            **({"ptx": self.ptx.get_state()} if self.ptx is not None else {}),
        }

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every process's (the trainer's `global_data_state`): the prompts, the
        rollout position and the KL controller are the same on every process; the PPO-ptx
        iterators' shards are merged, so the run resumes under any process count."""
        from jaxalign.data import merge_states

        out = dict(states[0])
        if "ptx" in out:
            out["ptx"] = merge_states([s["ptx"] for s in states])
        return out

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError("RL data state has an unknown format")
        self.prompts.set_state(state["prompts"])
        # A run that did not use rl.ptx_file before starts reading it from the beginning.
        if self.ptx is not None and "ptx" in state:
            self.ptx.set_state(state["ptx"])
        self.rollouts = int(state["rollouts"])
        self.algorithm.kl_controller.set_state(state["kl_controller"])
        self.skip = int(state["position"])
        self.position = 0
        self.queue, self.queue_ids = [], []

    # -- the rollout ----------------------------------------------------------------------------

    def _build(self, trainer) -> None:
        cfg, rl = self.cfg, self.rl
        self.mesh, self.rules = trainer.mesh, trainer.rules
        self.row_sharding = NamedSharding(
            self.mesh, shd.logical_to_spec(("batch", None), self.rules)
        )
        self.vec_sharding = NamedSharding(self.mesh, shd.logical_to_spec(("batch",), self.rules))
        self.stops = stops = Stops.for_config(self.tokenizer, cfg)
        self.sampler = Sampler(
            cfg.model,
            cfg.sampling,
            stop_token_ids=stops.token_ids,
            stop_sequences=stops.sequences,
            pad_id=self.tokenizer.pad_id,
            mesh=self.mesh,
            rules=self.rules,
        )
        graphdef, algo = trainer.graphdef, self.algorithm
        temperature = cfg.sampling.temperature
        recompute = rl.old_logprobs == "recompute"

        def policy_forward(params, batch):
            model = nnx.merge(graphdef, params)
            out = {}
            logp, entropy = response_logprobs(algo.policy_module(model), batch, temperature)
            out["entropy"] = entropy
            if recompute:
                out["old_logprobs"] = logp
            if algo.needs_values:
                out["values"] = response_values(model, batch)
            return out

        ref_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))

        def reference_forward(params, batch):
            ref = nnx.merge(ref_graphdef, params)
            return response_logprobs(ref, batch, temperature, with_entropy=False)[0]

        self._policy_forward = jax.jit(policy_forward)
        self._reference_forward = jax.jit(reference_forward)
        self._postprocess = jax.jit(algo.postprocess)
        self._concat = None
        self._take_slots = None
        divisor = shd.batch_divisor(self.mesh, self.rules)
        if self.ptx is not None:
            shd.validate_batch(
                ptx_rows(cfg), cfg.train.grad_accum, self.mesh, self.rules, "rl.ptx_batch_size"
            )
        if rl.forward_batch_size % divisor:
            raise ConfigError(
                f"rl.forward_batch_size ({rl.forward_batch_size}) must be a multiple of the "
                f"devices the batch is split over ({divisor})"
            )
        self.eval_sampler = None
        if rl.eval_every and cfg.data.eval_file:
            greedy = dataclasses.replace(cfg.sampling, temperature=0.0)
            self.eval_sampler = Sampler(
                cfg.model,
                greedy,
                stop_token_ids=stops.token_ids,
                stop_sequences=stops.sequences,
                pad_id=self.tokenizer.pad_id,
                mesh=self.mesh,
                rules=self.rules,
            )
            self.eval_prompts = read_prompt_file(
                cfg.data.eval_file,
                self.tokenizer,
                cfg.data.template,
                cfg.data.prompt_buckets,
                rl.eval_prompts,
            )
        self._built = True

    def _sample(self, policy_params, round_: int, timings: dict) -> dict:
        """The next global batch of prompts, `rl.num_generations` samples each (round_ > 0:
        another random stream), decoded and scored: per-row arrays and lists, responses at
        the sampler's full width. Adds to time/generate and time/score in `timings`."""
        cfg, rl = self.cfg, self.rl
        t = time.perf_counter()
        batch = next(self.prompts)
        g, rows = rl.num_generations, self.rows
        prompt_ids = self.prompts.record_ids()
        row_ids = [prompt_ids[i // g] for i in range(rows)]
        prompt_tokens = np.repeat(batch["tokens"], g, axis=0)
        prompt_lengths = np.repeat(batch["lengths"], g, axis=0)
        extras = {k: v for k, v in batch.items() if k not in ("tokens", "lengths")}
        records = [{k: v[i // g] for k, v in extras.items()} for i in range(rows)]
        sample_ids = (self.rollouts * rows + np.arange(rows)).astype(np.int32)
        seed = None if round_ == 0 else round_seed(cfg.sampling.seed, round_)
        per_call = min(rows, cfg.sampling.batch_size * g)
        outs = []
        for s in range(0, rows, per_call):
            sl = slice(s, s + per_call)
            outs.append(
                self.sampler.generate_padded(
                    policy_params, prompt_tokens[sl], prompt_lengths[sl], sample_ids[sl], seed
                )
            )
        # Every process needs every row (it scores them all): gather across processes.
        gens = [
            tuple(
                shd.host_array(x)
                for x in (o.tokens, o.lengths, o.finish_reasons, o.sampling_logprobs)
            )
            for o in outs
        ]
        response, lengths, finish, sampling_lp = (
            np.concatenate(x) for x in zip(*gens, strict=True)
        )
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
        sequences = []
        if self.scorer.reward_model is not None:
            for r in range(rows):
                seq = [*prompt_tokens[r, -prompt_lengths[r] :], *response[r, : lengths[r]]]
                sequences.append(np.asarray(seq if seq[-1] == eos else [*seq, eos], np.int32))
        raw_scores, rewards = self.scorer(prompt_texts, texts, records, sequences)
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

    def _join(self, rounds: list[dict], picks: list[tuple[int, int]]) -> dict:
        """One rollout from the groups `picks` ((round, group) pairs) of `_sample` results;
        prompts left-padded to the widest prompt bucket among them."""
        g = self.rl.num_generations
        width = max(rounds[r]["prompt_tokens"].shape[1] for r, _ in picks)
        out = {}
        for key, first in rounds[0].items():
            parts = [rounds[r][key][i * g : (i + 1) * g] for r, i in picks]
            if key == "prompt_tokens":
                pad = self.tokenizer.pad_id
                parts = [
                    np.pad(p, ((0, 0), (width - p.shape[1], 0)), constant_values=pad) for p in parts
                ]
            if isinstance(first, np.ndarray):
                out[key] = np.concatenate(parts)
            else:
                out[key] = [x for part in parts for x in part]
        return out

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
            params,
            ids,
            records,
            self.scorer.functions_score,
            self.stops,
            rows=rows,
        )
        return {"eval/pass_rate": out["pass_rate"], "eval/mean_score": out["mean_score"]}

    def _rollout(self) -> None:
        rl, trainer, state = self.rl, self._trainer, self._state
        if state is None:
            raise RuntimeError("RolloutData needs observe_state(state, trainer) before next()")
        if not self._built:
            self._build(trainer)
        jax.block_until_ready(state["params"])  # finish the previous rollout's training first
        # time/train ends and time/rollout starts here: the wait above is training, not rollout.
        t_start = time.perf_counter()
        timings = {}
        if self._last_rollout_end is not None:
            timings["time/train"] = t_start - self._last_rollout_end
        metrics: dict[str, float] = {}
        policy_params = self.algorithm.policy_params(state["params"])
        if self.eval_sampler is not None and self.rollouts % rl.eval_every == 0:
            t = time.perf_counter()
            metrics.update(self.evaluate(policy_params))
            timings["time/eval"] = time.perf_counter() - t

        # 1-2. Generate G samples per prompt and score them. rl.filter_groups (DAPO's dynamic
        # sampling): more batches of prompts until the rollout's groups all have a spread of
        # scores (select_groups), at most rl.max_generate_rounds batches.
        g, rows = rl.num_generations, self.rows
        rounds = [self._sample(policy_params, 0, timings)]
        if rl.filter_groups:
            want = rl.prompts_per_rollout
            picks, spread = select_groups([r["scores"] for r in rounds], g, want)
            while spread < want and len(rounds) < rl.max_generate_rounds:
                rounds.append(self._sample(policy_params, len(rounds), timings))
                picks, spread = select_groups([r["scores"] for r in rounds], g, want)
            sampled = self._join(rounds, picks)
            generated = sum(len(r["scores"]) for r in rounds) // g
            metrics["rollout/generate_rounds"] = float(len(rounds))
            metrics["rollout/groups_filtered"] = 1.0 - spread / generated
            metrics["rollout/sampled_scores"] = float(
                np.mean(np.concatenate([r["raw_scores"] for r in rounds]))
            )
        else:
            sampled = rounds[0]
        prompt_tokens, prompt_lengths = sampled["prompt_tokens"], sampled["prompt_lengths"]
        row_ids, records = sampled["row_ids"], sampled["records"]
        texts, raw_scores, scores = sampled["texts"], sampled["raw_scores"], sampled["scores"]
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
        # In chunks of rl.forward_batch_size rows: the float32 logits of a chunk are live at once.
        # With rl.pack_rows, each chunk's sequences are packed as for training and the results
        # gathered back to one row per sequence.
        chunk = rl.forward_batch_size or rows
        forwards, refs = [], []
        ref_params = self.algorithm.reference_on_device()  # None: no reference (uses_reference)
        for s in range(0, rows, chunk):
            plain = {k: rows_np[k][s : s + chunk] for k in (*ROW_KEYS, "mask")}
            seq, slots = self._forward_rows(plain)
            seq = {k: self._put(v) for k, v in seq.items()}
            policy_out = self._policy_forward(state["params"], seq)
            ref_out = None if ref_params is None else self._reference_forward(ref_params, seq)
            if slots is not None:
                policy_out, ref_out = self._unpack(policy_out, ref_out, slots)
            forwards.append(policy_out)
            refs.append(ref_out)
        self.algorithm.reference_release()
        forward = {k: self._concat_rows(*(f[k] for f in forwards)) for k in forwards[0]}
        rollout = {
            "scores": self._put(scores.astype(np.float32)),
            "stopped": self._put(stopped.astype(np.float32)),
            "mask": self._put(rows_np["mask"]),
            "entropy": forward["entropy"],
        }
        if rl.old_logprobs == "recompute":
            rollout["old_logprobs"] = forward["old_logprobs"]
        else:
            rollout["old_logprobs"] = self._put(sampling_lp.astype(np.float32))
        # Without a reference its log-probs are the rollout policy's: every KL term is 0.
        rollout["ref_logprobs"] = (
            rollout["old_logprobs"] if refs[0] is None else self._concat_rows(*refs)
        )
        if self.algorithm.needs_values:
            rollout["values"] = forward["values"]
        jax.block_until_ready(rollout)
        timings["time/forward"] = time.perf_counter() - t

        # 4. Rewards, advantages (jitted over the global arrays: global statistics).
        t = time.perf_counter()
        kl_coef = self.algorithm.kl_controller.kl_coef
        buffer, post_metrics = self._postprocess(rollout, jnp.float32(kl_coef))
        buffer = {k: shd.host_array(v) for k, v in buffer.items()}
        post_metrics = {k: float(v) for k, v in jax.device_get(post_metrics).items()}
        if hasattr(self.algorithm, "after_rollout"):
            post_metrics.update(self.algorithm.after_rollout(post_metrics, rows))
        timings["time/advantages"] = time.perf_counter() - t
        buffer.update({k: rows_np[k] for k in (*ROW_KEYS, "mask")})

        self.packed_rows = []
        self._enqueue(buffer, row_ids)
        if self.packed_rows:
            metrics["rollout/packed_rows"] = float(np.mean(self.packed_rows))
        self.rollouts += 1
        self.position = self.skip
        self.skip = 0
        metrics.update(post_metrics)
        metrics.update(family_scores(records, raw_scores))
        if len(self.scorer.names) > 1:
            metrics.update(
                {k: float(v.mean()) for k, v in sampled.items() if k.startswith(REWARD_PREFIX)}
            )
        metrics.update(
            {
                "objective/scores": float(scores.mean()),
                "objective/raw_scores": float(raw_scores.mean()),
                "rollout/response_length": float(lengths.mean()),
                "rollout/row_width": float(rows_np["tokens"].shape[1]),
                "rollout/eos_fraction": float(stopped.mean()),
                "rollout/index": float(self.rollouts),
                "kl_coef": kl_coef,
            }
        )
        end = time.perf_counter()
        timings["time/rollout"] = end - t_start
        if "time/train" in timings:
            timings["time/iteration"] = timings["time/train"] + timings["time/rollout"]
        metrics.update(timings)
        self._metrics.append(metrics)
        self.last_rollout = {
            "texts": texts,
            "row_ids": row_ids,
            "scores": scores,
            "records": records,
            "buffer": buffer,
            "metrics": metrics,
        }
        self._last_rollout_end = end

    def _enqueue(self, buffer: dict[str, np.ndarray], row_ids: list[str]) -> None:
        """Queue `epochs` shuffled passes of minibatches, this process's rows of each, shaped
        [grad_accum, rows / grad_accum / process_count, ...], with the prompt record ids of
        their rows; drop those a resume skips."""
        t = self.cfg.train
        batch, accum = t.batch_size, t.grad_accum
        local = batch // accum // self.process_count
        queue, queue_ids = [], []
        lengths = sequence_spans(buffer["segment_ids"])[1] if self.rl.pack_rows > 1 else None
        for epoch in range(self.rl.epochs):
            order = np.random.default_rng([self.cfg.data.seed, self.rollouts, epoch]).permutation(
                self.rows
            )
            for k in range(self.rows // batch):
                idx = order[k * batch : (k + 1) * batch].reshape(accum, batch // accum)
                mine = idx[:, self.process_index * local : (self.process_index + 1) * local]
                if lengths is not None:
                    queue.append(self._packed(buffer, lengths, idx, mine))
                else:
                    queue.append({name: v[mine] for name, v in buffer.items()})
                queue_ids.append([row_ids[i] for i in mine.reshape(-1).tolist()])
        self.queue = queue[self.skip :]
        self.queue_ids = queue_ids[self.skip :]

    def _packed(
        self, buffer: dict[str, np.ndarray], lengths: np.ndarray, idx: np.ndarray, mine: np.ndarray
    ) -> dict:
        """This process's micro-batches (its rows `mine` [accum, local] of the minibatch's global
        rows `idx` [accum, rows]), packed (`pack_micro_batch`) into as many rows as the fullest
        micro-batch of any process needs, rounded up to a multiple of 8 and of the local devices
        (at most the plain row count): one shape for every process, and few shapes
        (compilations) over a run. `lengths`: every buffer row's real tokens."""
        per_row, width = self.rl.pack_rows, buffer["tokens"].shape[-1]
        plans = [
            [pack_plan(lengths[part], width, per_row) for part in np.split(m, self.process_count)]
            for m in idx
        ]
        most = max(len(plan) for micro in plans for plan in micro)
        rows = packed_row_count(most, jax.local_device_count(), mine.shape[1])
        packed = [
            pack_micro_batch(
                {name: v[m] for name, v in buffer.items()},
                micro[self.process_index],
                rows,
                per_row,
                self.tokenizer.pad_id,
            )
            for m, micro in zip(mine, plans, strict=True)
        ]
        self.packed_rows.append(rows)
        return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


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


def ptx_rows(cfg: Config) -> int:
    """Global PPO-ptx rows per optimizer step."""
    return cfg.rl.ptx_batch_size or cfg.train.batch_size


def ptx_iterator(cfg: Config, tokenizer, process_index: int, process_count: int):
    """The PPO-ptx data (`rl.ptx_file`, packed SFT-style rows of train.seq_len tokens), or None
    when `rl.ptx_coef` is 0."""
    if not cfg.rl.ptx_coef:
        return None
    from jaxalign.data import sft_iterator_from_config

    data = sft_iterator_from_config(
        cfg.data,
        tokenizer,
        seq_len=cfg.train.seq_len,
        global_batch_size=ptx_rows(cfg),
        grad_accum=cfg.train.grad_accum,
        process_index=process_index,
        process_count=process_count,
        path=cfg.rl.ptx_file,
    )
    if process_index == 0:
        print(f"[jaxalign] rl.ptx_file: {data.report()}", flush=True)
    return data


def steps_per_rollout(cfg: Config) -> int:
    rl = cfg.rl
    return rl.epochs * rl.prompts_per_rollout * rl.num_generations // cfg.train.batch_size


def uses_reference(cfg: Config) -> bool:
    """Whether an RL run keeps a frozen reference policy: only for a KL term (rl.kl_coef > 0, or
    PPO's adaptive controller). GRPO with kl_coef 0 (as DAPO and Dr. GRPO train, and TRL's
    default beta) holds no reference copy and runs no reference forward."""
    return cfg.rl.kl_coef > 0 or cfg.rl.kl_target is not None


def validate_rl_config(cfg: Config, trainer: str) -> None:
    """Cross-field checks of an RL config (ConfigError naming the keys)."""
    rl, t, sp = cfg.rl, cfg.train, cfg.sampling
    rows = rl.prompts_per_rollout * rl.num_generations
    width = max(cfg.data.prompt_buckets) + sp.max_new_tokens
    if rl.prompts_per_rollout <= 0 or rl.num_generations <= 0 or rl.epochs <= 0:
        raise ConfigError(
            "rl.prompts_per_rollout, rl.num_generations and rl.epochs must be positive"
        )
    if trainer == "ppo" and rl.mask_truncated_completions:
        raise ConfigError(
            "rl.mask_truncated_completions is for grpo, rloo and reinforce_pp "
            "(PPO: rl.missing_eos_penalty)"
        )
    if trainer in ("grpo", "rloo") and rl.num_generations < 2:
        raise ConfigError(f"trainer {trainer}: rl.num_generations (the group size) must be >= 2")
    if rl.reinforce_baseline and (trainer != "reinforce_pp" or rl.num_generations < 2):
        raise ConfigError(
            "rl.reinforce_baseline is for trainer reinforce_pp with rl.num_generations >= 2"
        )
    if rows % t.batch_size:
        raise ConfigError(
            f"rl.prompts_per_rollout * rl.num_generations ({rows} rows per "
            f"rollout) must divide by train.batch_size ({t.batch_size})"
        )
    per_rollout = steps_per_rollout(cfg)
    if t.steps % per_rollout:
        raise ConfigError(
            f"train.steps ({t.steps}) must be a multiple of the optimizer steps per "
            f"rollout (rl.epochs * rows / train.batch_size = {per_rollout})"
        )
    if cfg.checkpoint.every % per_rollout:
        raise ConfigError(
            f"checkpoint.every ({cfg.checkpoint.every}) must be a multiple of the "
            f"optimizer steps per rollout ({per_rollout}): checkpoints are taken "
            "at rollout boundaries"
        )
    if t.seq_len != width:
        raise ConfigError(
            f"train.seq_len must be max(data.prompt_buckets) + "
            f"sampling.max_new_tokens = {width} for RL, got {t.seq_len}"
        )
    if sp.temperature <= 0:
        raise ConfigError("RL samples from the policy: sampling.temperature must be > 0")
    penalties = sp.repetition_penalty != 1 or sp.presence_penalty or sp.frequency_penalty
    if rl.old_logprobs == "sampler" and (sp.top_k or sp.top_p < 1 or sp.min_p > 0 or penalties):
        raise ConfigError(
            "rl.old_logprobs: sampler needs sampling.top_k = 0, top_p = 1, min_p = 0 and no "
            "repetition, presence or frequency penalty (the sampled distribution must be the "
            "policy's)"
        )
    per_call = min(rows, sp.batch_size * rl.num_generations)
    if rows % per_call:
        raise ConfigError(
            f"rows per rollout ({rows}) must divide by sampling.batch_size * "
            f"rl.num_generations ({per_call})"
        )
    if rl.importance_sampling == "sequence" and trainer not in ("grpo", "rloo"):
        raise ConfigError(
            "rl.importance_sampling: sequence (GSPO) is for grpo and rloo (sequence advantages)"
        )
    names = reward_names(rl.reward_functions, bool(rl.reward_model))
    if rl.reward_weights is not None and len(rl.reward_weights) != len(names):
        raise ConfigError(
            f"rl.reward_weights has {len(rl.reward_weights)} weights for {len(names)} "
            f"rewards ({', '.join(names)}: rl.reward_functions, then rl.reward_model)"
        )
    if rl.filter_groups and trainer not in ("grpo", "rloo"):
        raise ConfigError("rl.filter_groups is for grpo and rloo (groups of samples per prompt)")
    if rl.max_generate_rounds < 1:
        raise ConfigError(f"rl.max_generate_rounds must be >= 1, got {rl.max_generate_rounds}")
    if rl.forward_batch_size < 0 or (rl.forward_batch_size and rows % rl.forward_batch_size):
        raise ConfigError(
            f"rl.forward_batch_size ({rl.forward_batch_size}) must divide the rows per rollout "
            f"({rows}), or be 0 (all rows in one forward)"
        )
    if rl.pack_rows < 0:
        raise ConfigError(f"rl.pack_rows must be >= 0 (0 or 1: no packing), got {rl.pack_rows}")
    if rl.response_buckets is not None and any(b <= 0 for b in rl.response_buckets):
        raise ConfigError(f"rl.response_buckets must be positive, got {rl.response_buckets}")
    if rl.kl_target is not None and rl.kl_target <= 0:
        raise ConfigError("rl.kl_target must be positive (or null: a fixed coefficient)")
    if rl.kl_target is not None and trainer in ("grpo", "rloo"):
        raise ConfigError(
            f"rl.kl_target (an adaptive KL penalty in the reward) is for ppo and reinforce_pp; "
            f"{trainer} weighs its KL loss term by rl.kl_coef"
        )
    if rl.kl_coef < 0 or rl.clip_eps <= 0 or rl.value_clip <= 0:
        raise ConfigError("rl.kl_coef must be >= 0, rl.clip_eps and rl.value_clip positive")
    if rl.clip_eps_high is not None and rl.clip_eps_high < rl.clip_eps:
        raise ConfigError(
            f"rl.clip_eps_high ({rl.clip_eps_high}) must be >= rl.clip_eps ({rl.clip_eps})"
        )
    if rl.ptx_coef < 0 or rl.ptx_batch_size < 0:
        raise ConfigError("rl.ptx_coef and rl.ptx_batch_size must be >= 0")
    if rl.ptx_coef and not rl.ptx_file:
        raise ConfigError("rl.ptx_coef > 0 needs rl.ptx_file (the PPO-ptx data)")
    if rl.ptx_coef and ptx_rows(cfg) % (t.grad_accum * jax.process_count()):
        raise ConfigError(
            f"rl.ptx_batch_size ({ptx_rows(cfg)} rows) must divide by train.grad_accum x "
            f"processes ({t.grad_accum} x {jax.process_count()})"
        )


def load_data_state(path: str) -> dict:
    """The data state of a checkpoint step directory (for tools and tests)."""
    return json.loads((Path(path) / "data" / "metadata").read_text())
