"""Continuous batching: a fixed number of decode slots, each refilled as soon as its row ends.

    sampler = ContinuousSampler(cfg.model, cfg.sampling, slots=16, stop_token_ids=[...])
    out = sampler.generate_rows(params, tokens, lengths, sample_ids, seed, group=4)

The static sampler (`generate.Sampler`) decodes a batch until its longest row ends; here a row
that ends (a stop token or sequence, or its token budget) frees its slot, and the next prompt
is prefilled into it while the other slots keep decoding. Two compiled programs, each with
fixed shapes, so no refill recompiles:

- `decode`: decode steps over every slot, in a `lax.while_loop` that exits once enough slots are
  free for the next prompt (or every row has ended);
- `prefill`: k prompts of one bucket length (k and the bucket from a few fixed sizes) prefilled,
  their KV copied into the cache rows of their slots and their first tokens sampled. A GRPO
  group's prompt is prefilled once and copied into each of its `group` slots.

Each slot's cache row is [prompt, left padded to its bucket | generated tokens | ... | scratch].
Every decode step writes the new keys and values into the last (scratch) slot, which every row
attends to, and then moves them to the row's own next slot: the model's decode path
(`with_cache` with one write index for the batch) serves rows at different lengths, and a
stale row left by a slot's previous occupant is masked out by `kv_segment_ids` (0).

A row's random stream is fixed by its (seed, sample id) and its position in its own sequence,
as in the static sampler (`fold_in(fold_in(PRNGKey(seed), sample_id), t)`), so results do not
depend on the number of slots or which slot a row gets; the per-token log-probs are the same
as the static sampler's (and the trainer's forward, up to float rounding).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.config import ModelConfig, SamplingConfig, ShardingConfig
from jaxalign.errors import UserError
from jaxalign.generate import Sampler, model_graphdef, prompt_bucket, sample_tokens
from jaxalign.models.llama import CACHE_AXES


@dataclass
class RowSamples:
    """Sampled rows on the host, in request order. Past a row's end, tokens are the pad id and
    log-probs 0."""

    tokens: np.ndarray  # [R, N] int32, the stop token included
    lengths: np.ndarray  # [R] int32
    finish_reasons: np.ndarray  # [R] int32 index into generate.FINISH_REASONS (1: stopped)
    model_logprobs: np.ndarray  # [R, N] f32 under the raw model
    sampling_logprobs: np.ndarray  # [R, N] f32 under the sampling distribution


def _cache_axes(path) -> tuple[int, int]:
    """(batch axis, slot axis) of a KV cache leaf: 'k' [..., B, KV, hd, S], 'v' [..., B, KV,
    S, hd]; a stacked (scan_layers) leaf has a leading layer axis."""
    name = path[-1].key
    slot = CACHE_AXES[name].index("cache_length") - len(CACHE_AXES[name])
    return -4, slot


def _key_data(seed: int) -> np.ndarray:
    """The uint32[2] PRNG key of `seed`, as the static sampler makes it."""
    return np.asarray(jax.random.PRNGKey(seed), np.uint32)


class ContinuousSampler:
    """Continuous-batching generation over `slots` decode rows (module docstring).

    `max_prompt_len`: the longest prompt (default sampling.max_prompt_len; the cache holds it
    plus sampling.max_new_tokens); `max_group`: the most slots one prompt's KV is copied into
    (GRPO's group size). Penalties (sampling.repetition/presence/frequency_penalty) are not
    supported: use the static `generate.Sampler`.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        sampling: SamplingConfig,
        *,
        slots: int,
        max_prompt_len: int | None = None,
        max_group: int = 1,
        stop_token_ids: Sequence[int] = (),
        stop_sequences: Sequence[Sequence[int]] = (),
        pad_id: int = 0,
        mesh: Mesh | None = None,
        rules: shd.Rules | None = None,
        graphdef: nnx.GraphDef | None = None,
    ):
        if graphdef is None:
            graphdef = model_graphdef(model_cfg, mesh)
        if slots < max_group:
            raise UserError(f"continuous batching: {slots} slots hold no group of {max_group}")
        self.model_cfg, self.sampling = model_cfg, sampling
        self.slots, self.max_group = slots, max_group
        self.max_prompt_len = max_prompt_len or sampling.max_prompt_len
        self.max_new_tokens = sampling.max_new_tokens
        self.cache_len = self.max_prompt_len + self.max_new_tokens  # the last slot: scratch
        self.mesh = mesh
        self.rules = rules if rules is not None else shd.resolve_rules(ShardingConfig())
        self.pad_id = pad_id
        self.stop_ids = tuple(int(i) for i in stop_token_ids)
        self.stop_sequences = tuple(tuple(int(i) for i in q) for q in stop_sequences if q)
        self.tail_len = max((len(q) for q in self.stop_sequences), default=0)
        self._settings = Sampler.settings.__get__(self)  # the static sampler's validation
        self.graphdef = graphdef
        self._init = None
        self._compile(None)

    def _compile(self, shardings) -> None:
        """The decode and prefill programs: the slots' state donated, and laid out as
        `shardings` (None: as the compiler chooses, single device)."""
        self._decode = jax.jit(
            functools.partial(self._decode_fn, self.graphdef),
            donate_argnums=(1,),
            out_shardings=shardings,
        )
        self._prefill = jax.jit(
            functools.partial(self._prefill_fn, self.graphdef),
            donate_argnums=(1,),
            out_shardings=shardings,
        )

    # -- device state -----------------------------------------------------------------------

    def _spec(self, shape, names) -> P | None:
        """The PartitionSpec of logical `names` for `shape`, dims that do not divide left
        unsharded."""
        spec = shd.logical_to_spec(names, shd.activation_table(self.rules))
        return P(
            *(
                e if size % shd.spec_axis_size(self.mesh, e) == 0 else None
                for size, e in zip(shape, spec, strict=True)
            )
        )

    def _empty_state(self, params) -> dict:
        """Fresh slots (every one free) on the device: the KV cache (`init_cache` of the
        model), its segment ids, and the per-slot rows, laid out over the batch axes."""
        b, s, n = self.slots, self.cache_len, self.max_new_tokens
        graphdef = self.graphdef

        def empty(params):
            state = {
                "cache": nnx.merge(graphdef, params).init_cache(b, s),
                "kv_segment_ids": jnp.zeros((b, s), jnp.int32),
                "active": jnp.zeros((b,), bool),
                "stopped": jnp.zeros((b,), bool),
                "last": jnp.zeros((b,), jnp.int32),
                "write_slot": jnp.full((b,), s - 1, jnp.int32),
                "position": jnp.zeros((b,), jnp.int32),
                "length": jnp.zeros((b,), jnp.int32),
                "limit": jnp.zeros((b,), jnp.int32),
                "keys": jnp.zeros((b, 2), jnp.uint32),
                "tokens": jnp.full((b, n), self.pad_id, jnp.int32),
                "model_logprobs": jnp.zeros((b, n), jnp.float32),
                "sampling_logprobs": jnp.zeros((b, n), jnp.float32),
            }
            if self.tail_len:
                state["tail"] = jnp.full((b, self.tail_len), -1, jnp.int32)
            return state

        if self._init is None:
            shardings = None
            if self.mesh is not None:

                def sharding(path, x):
                    if path[0].key == "cache":
                        names = CACHE_AXES[path[-1].key]
                        names = (("layers",) if x.ndim == 5 else ()) + names
                    else:
                        names = ("batch",) + (None,) * (x.ndim - 1)
                    return NamedSharding(self.mesh, self._spec(x.shape, names))

                shapes = jax.eval_shape(empty, params)
                shardings = jax.tree_util.tree_map_with_path(sharding, shapes)
                self._compile(shardings)
            self._init = jax.jit(empty, out_shardings=shardings)
        return self._init(params)

    # -- the compiled programs ----------------------------------------------------------------

    def _ends(self, token, tail):
        """Whether `token` [B] stops its row, and the updated tail of the response."""
        stop = jnp.any(token[:, None] == jnp.asarray(self.stop_ids or (-1,), jnp.int32), axis=-1)
        if self.tail_len:
            tail = jnp.concatenate([tail[:, 1:], token[:, None]], axis=1)
            for seq in self.stop_sequences:
                q = jnp.asarray(seq, jnp.int32)
                stop |= jnp.all(tail[:, self.tail_len - len(seq) :] == q, axis=-1)
        return stop, tail

    def _sample(self, logits, keys, step, settings):
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        return sample_tokens(
            logits.astype(jnp.float32),
            step_keys,
            settings["temperature"],
            settings["top_k"],
            settings["top_p"],
            settings["min_p"],
        )

    def _prefill_fn(
        self,
        graphdef,
        params,
        state,
        prompt_tokens,
        prompt_lengths,
        source,
        dest,
        seed_keys,
        sample_ids,
        limits,
        settings,
    ):
        """Prefill k prompts [k, Pb] (left padded; lengths [k]) and start rows in slots `dest`
        [m] (out of range: none) from prompt `source` [m], with PRNG keys `seed_keys` [m, 2],
        stream ids `sample_ids` [m] and token budgets `limits` [m]."""
        model = nnx.merge(graphdef, params)
        k, pb = prompt_tokens.shape
        s = self.cache_len
        pad = pb - prompt_lengths
        cols = jnp.arange(pb, dtype=jnp.int32)
        segment_ids = (cols[None, :] >= pad[:, None]).astype(jnp.int32)
        positions = jnp.maximum(cols[None, :] - pad[:, None], 0)
        hidden, cache = model.with_cache(
            prompt_tokens, positions, segment_ids, model.init_cache(k, pb)
        )
        logits = model.logits(hidden[:, -1])[source]
        keys = jax.vmap(jax.random.fold_in)(seed_keys, sample_ids)
        m = dest.shape[0]
        token, model_lp, sampling_lp = self._sample(
            logits, keys, jnp.zeros((m,), jnp.int32), settings
        )
        tail = jnp.full((m, max(self.tail_len, 1)), -1, jnp.int32)
        stop, tail = self._ends(token, tail)

        def put(path, big, small):
            batch, slot = _cache_axes(path)
            small = jnp.take(small, source, axis=batch % small.ndim)
            index = [slice(None)] * big.ndim
            index[batch % big.ndim] = dest
            index[slot % big.ndim] = slice(0, pb)
            return big.at[tuple(index)].set(small.astype(big.dtype), mode="drop")

        new = dict(state)
        new["cache"] = jax.tree_util.tree_map_with_path(put, state["cache"], cache)
        kv_row = jnp.zeros((m, s), jnp.int32).at[:, :pb].set(segment_ids[source]).at[:, -1].set(1)
        n = self.max_new_tokens

        def rows(name, value):
            new[name] = state[name].at[dest].set(value.astype(state[name].dtype), mode="drop")

        rows("kv_segment_ids", kv_row)
        rows("active", ~stop & (limits > 1))
        rows("stopped", stop)
        rows("last", token)
        rows("write_slot", jnp.full((m,), pb, jnp.int32))
        rows("position", prompt_lengths[source])
        rows("length", jnp.ones((m,), jnp.int32))
        rows("limit", limits)
        rows("keys", keys)
        rows("tokens", jnp.full((m, n), self.pad_id, jnp.int32).at[:, 0].set(token))
        rows("model_logprobs", jnp.zeros((m, n), jnp.float32).at[:, 0].set(model_lp))
        rows("sampling_logprobs", jnp.zeros((m, n), jnp.float32).at[:, 0].set(sampling_lp))
        if self.tail_len:
            rows("tail", tail)
        return new

    def _decode_fn(self, graphdef, params, state, want_free, settings):
        """Decode steps over every slot until at least `want_free` slots are free, every row
        has ended, or max_new_tokens steps have run."""
        model = nnx.merge(graphdef, params)
        b, s = self.slots, self.cache_len
        scratch = s - 1
        cols = jnp.arange(self.max_new_tokens, dtype=jnp.int32)

        def cond(c):
            st, i = c
            free = jnp.sum(~st["active"])
            return (i < self.max_new_tokens) & jnp.any(st["active"]) & (free < want_free)

        def body(c):
            st, i = c
            active = st["active"]
            hidden, cache = model.with_cache(
                st["last"][:, None],
                st["position"][:, None],
                jnp.ones((b, 1), jnp.int32),
                st["cache"],
                scratch,
                st["kv_segment_ids"],
            )
            write = jnp.where(active, st["write_slot"], scratch)

            def move(path, a):  # the scratch slot's new keys/values to each row's own slot
                batch, slot = _cache_axes(path)

                def one(row, at):
                    col = jax.lax.dynamic_index_in_dim(row, scratch, slot % row.ndim)
                    return jax.lax.dynamic_update_index_in_dim(row, col, at, slot % row.ndim)

                axis = batch % a.ndim
                return jax.vmap(one, in_axes=(axis, 0), out_axes=axis)(a, write)

            cache = jax.tree_util.tree_map_with_path(move, cache)
            kv = st["kv_segment_ids"].at[jnp.arange(b), write].set(1)
            t = st["length"]
            token, model_lp, sampling_lp = self._sample(
                model.logits(hidden[:, 0]), st["keys"], t, settings
            )
            token = jnp.where(active, token, self.pad_id)
            stop, tail = self._ends(token, st.get("tail"))
            stop &= active
            here = (cols[None, :] == t[:, None]) & active[:, None]
            length = t + active.astype(jnp.int32)
            new = {
                **st,
                "cache": cache,
                "kv_segment_ids": kv,
                "tokens": jnp.where(here, token[:, None], st["tokens"]),
                "model_logprobs": jnp.where(here, model_lp[:, None], st["model_logprobs"]),
                "sampling_logprobs": jnp.where(here, sampling_lp[:, None], st["sampling_logprobs"]),
                "length": length,
                "stopped": st["stopped"] | stop,
                "active": active & ~stop & (length < st["limit"]),
                "last": token,
                "write_slot": st["write_slot"] + active.astype(jnp.int32),
                "position": st["position"] + active.astype(jnp.int32),
            }
            if self.tail_len:
                new["tail"] = jnp.where(active[:, None], tail, st["tail"])
            return new, i + 1

        state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
        return state

    def _call(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with shd.activation_sharding(self.mesh, self.rules):
            return fn(*args)

    # -- scheduling ---------------------------------------------------------------------------

    def generate_rows(
        self,
        params: Any,
        prompt_tokens: np.ndarray,
        prompt_lengths: np.ndarray,
        sample_ids: np.ndarray | None = None,
        seed: int | None = None,
        *,
        group: int = 1,
        max_tokens: np.ndarray | None = None,
        **settings,
    ) -> RowSamples:
        """Generate for left-padded prompts [R, W] with lengths [R], as the static sampler's
        `generate_padded` does (same streams, same results), on the host. Consecutive runs of
        `group` rows with the same prompt share one prefill. `max_tokens` [R]: each row's
        token budget (default sampling.max_new_tokens)."""
        r = len(prompt_lengths)
        if sample_ids is None:
            sample_ids = np.arange(r, dtype=np.int32)
        if max_tokens is None:
            max_tokens = np.full(r, self.max_new_tokens, np.int32)
        seed = self.sampling.seed if seed is None else seed
        if group > self.max_group or r % group:
            raise UserError(
                f"continuous batching: groups of {group} rows, max_group is "
                f"{self.max_group} and there are {r} rows"
            )
        prompts = [
            np.asarray(prompt_tokens[i, prompt_tokens.shape[1] - int(prompt_lengths[i]) :])
            for i in range(0, r, group)
        ]
        requests = [
            Request(
                p,
                [int(x) for x in sample_ids[i * group : (i + 1) * group]],
                seed,
                [int(x) for x in max_tokens[i * group : (i + 1) * group]],
            )
            for i, p in enumerate(prompts)
        ]
        session = self.session(params, **settings)
        for i, req in enumerate(requests):
            session.submit(i, req)
        done = {}
        while session.busy:
            done.update(session.step())
        n = self.max_new_tokens
        out = RowSamples(
            np.full((r, n), self.pad_id, np.int32),
            np.zeros(r, np.int32),
            np.zeros(r, np.int32),
            np.zeros((r, n), np.float32),
            np.zeros((r, n), np.float32),
        )
        for i in range(len(requests)):
            for j, row in enumerate(done[i]):
                k = i * group + j
                out.tokens[k], out.lengths[k], out.finish_reasons[k] = row[:3]
                out.model_logprobs[k], out.sampling_logprobs[k] = row[3:]
        return out

    def session(self, params: Any, **settings) -> Session:
        """A scheduling session over fresh slots (see `Session`). `settings`: overrides of the
        sampling settings (temperature, top_k, top_p, min_p)."""
        values = self._settings(
            settings.pop("temperature", None),
            settings.pop("top_k", None),
            settings.pop("top_p", None),
            settings.pop("min_p", None),
            **settings,
        )
        if (
            values["repetition_penalty"] != 1
            or values["presence_penalty"] != 0
            or values["frequency_penalty"] != 0
        ):
            raise UserError(
                "continuous batching does not apply sampling penalties: set rl.sampler: static"
            )
        values = {k: v for k, v in values.items() if "penalty" not in k}
        if self.mesh is not None:
            values = jax.device_put(values, NamedSharding(self.mesh, P()))
        return Session(self, params, values)


@dataclass
class Request:
    """One prompt to sample: `len(sample_ids)` rows (a GRPO group shares the prompt's prefill),
    each with its random stream id and token budget."""

    prompt: np.ndarray  # 1-D token ids
    sample_ids: list[int]
    seed: int
    max_tokens: list[int]


class Session:
    """Submitted requests sampled over a ContinuousSampler's slots. `submit(tag, request)`
    queues one; each `step()` runs one compiled call (a prefill of queued prompts while slots
    are free for them, else decode steps until enough slots are free) and returns
    {tag: [(tokens [N], length, finish_reason, model_logprobs [N], sampling_logprobs [N]) per
    row]} for the requests whose rows have all ended. Requests may be submitted between steps
    (e.g. an episode's next turn)."""

    def __init__(self, sampler: ContinuousSampler, params, settings):
        self.sampler, self.params, self.settings = sampler, params, settings
        self.state = sampler._empty_state(params)
        self.queue: collections.deque = collections.deque()
        self.owner: list[tuple[Any, int] | None] = [None] * sampler.slots  # (tag, row)
        self.partial: dict[Any, list] = {}
        self.steps = {"prefill": 0, "decode": 0}

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(o is not None for o in self.owner)

    def submit(self, tag, request: Request) -> None:
        sp = self.sampler
        if len(request.sample_ids) > sp.max_group:
            raise UserError(
                f"a request of {len(request.sample_ids)} rows > max_group {sp.max_group}"
            )
        if not 0 < len(request.prompt) <= sp.max_prompt_len:
            raise UserError(
                f"prompt of {len(request.prompt)} tokens; the continuous sampler holds "
                f"1 to {sp.max_prompt_len}"
            )
        self.partial[tag] = [None] * len(request.sample_ids)
        self.queue.append((tag, request))

    def step(self) -> dict:
        sp = self.sampler
        free = [i for i, o in enumerate(self.owner) if o is None]
        if self.queue and len(free) >= len(self.queue[0][1].sample_ids):
            self._prefill(free)
        else:
            want = len(self.queue[0][1].sample_ids) if self.queue else sp.slots
            self.state = sp._call(
                sp._decode, self.params, self.state, np.int32(want), self.settings
            )
            self.steps["decode"] += 1
        return self._harvest()

    def _prefill(self, free: list[int]) -> None:
        """Admit queued requests of the head's prompt bucket into free slots, in one call."""
        sp = self.sampler
        bucket = prompt_bucket(len(self.queue[0][1].prompt), sp.max_prompt_len)
        taken, keep = [], collections.deque()
        slots = list(free)
        while self.queue:
            tag, req = self.queue.popleft()
            fits = len(req.sample_ids) <= len(slots) and len(taken) < sp.slots
            if fits and prompt_bucket(len(req.prompt), sp.max_prompt_len) == bucket:
                rows = [slots.pop(0) for _ in req.sample_ids]
                taken.append((tag, req, rows))
            else:
                keep.append((tag, req))
        self.queue = keep
        k = 1  # prompts per prefill: 1, 4, 16, ... up to what the slots hold (few shapes)
        while k < len(taken):
            k *= 4
        k = min(k, sp.slots // len(taken[0][1].sample_ids))
        m = sp.slots
        tokens = np.full((k, bucket), sp.pad_id, np.int32)
        lengths = np.ones(k, np.int32)
        source = np.zeros(m, np.int32)
        dest = np.full(m, m, np.int32)  # out of range: dropped
        seed_keys = np.zeros((m, 2), np.uint32)
        sample_ids = np.zeros(m, np.int32)
        limits = np.ones(m, np.int32)
        j = 0
        for p, (tag, req, rows) in enumerate(taken):
            tokens[p, bucket - len(req.prompt) :] = req.prompt
            lengths[p] = len(req.prompt)
            key = _key_data(req.seed)
            for row, (slot, sid, limit) in enumerate(
                zip(rows, req.sample_ids, req.max_tokens, strict=True)
            ):
                source[j], dest[j], seed_keys[j], sample_ids[j] = p, slot, key, sid
                limits[j] = max(1, min(int(limit), sp.max_new_tokens))
                self.owner[slot] = (tag, row)
                j += 1
        self.state = sp._call(
            sp._prefill,
            self.params,
            self.state,
            tokens,
            lengths,
            source,
            dest,
            seed_keys,
            sample_ids,
            limits,
            self.settings,
        )
        self.steps["prefill"] += 1

    def _harvest(self) -> dict:
        active = shd.host_array(self.state["active"])
        ended = [i for i, o in enumerate(self.owner) if o is not None and not active[i]]
        if not ended:
            return {}
        host = {
            k: shd.host_array(self.state[k])
            for k in ("tokens", "length", "stopped", "model_logprobs", "sampling_logprobs")
        }
        done = {}
        for i in ended:
            tag, row = self.owner[i]
            self.owner[i] = None
            self.partial[tag][row] = (
                host["tokens"][i].copy(),
                int(host["length"][i]),
                int(host["stopped"][i]),
                host["model_logprobs"][i].copy(),
                host["sampling_logprobs"][i].copy(),
            )
            if all(x is not None for x in self.partial[tag]):
                done[tag] = self.partial.pop(tag)
        return done


def sample_rows(
    sampler: Sampler | ContinuousSampler,
    params: Any,
    prompt_tokens: np.ndarray,
    prompt_lengths: np.ndarray,
    sample_ids: np.ndarray,
    seed: int | None,
    rows_per_call: int | None = None,
    *,
    group: int = 1,
    max_tokens: np.ndarray | None = None,
) -> RowSamples:
    """Every row of left-padded prompts [R, W] (lengths [R], stream ids [R]) sampled, on the
    host (gathered across processes): with the static sampler `rows_per_call` rows per
    compiled call (None: all), with the continuous one over its slots (`group` consecutive
    rows sharing each prompt's prefill)."""
    if isinstance(sampler, ContinuousSampler):
        return sampler.generate_rows(
            params,
            prompt_tokens,
            prompt_lengths,
            sample_ids,
            seed,
            group=group,
            max_tokens=max_tokens,
        )
    rows = len(prompt_lengths)
    per_call = min(rows, rows_per_call or rows)
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    parts = []
    for s in range(0, rows, per_call):
        sl = slice(s, s + per_call)
        more = {k: v[sl] for k, v in kwargs.items()}
        parts.append(
            sampler.generate_padded(
                params, prompt_tokens[sl], prompt_lengths[sl], sample_ids[sl], seed, **more
            )
        )
    fields = ("tokens", "lengths", "finish_reasons", "model_logprobs", "sampling_logprobs")
    return RowSamples(
        *(np.concatenate([shd.host_array(getattr(o, f)) for o in parts]) for f in fields)
    )
