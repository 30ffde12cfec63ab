"""Generation: a prefill, then a decode loop over a preallocated KV cache, in one compiled function.

    sampler = Sampler(cfg.model, cfg.sampling, stop_token_ids=[...], mesh=mesh, rules=rules)
    out = sampler.generate(params, prompts)  # prompts: a list of 1-D int arrays
    out.tokens, out.lengths, out.finish_reasons, out.model_logprobs, out.sampling_logprobs

Prompts are left-padded to a bucket length P (a few fixed sizes, so few shapes ever compile).
Every row then writes the same cache slot at each step (slot P + t - 1 for the t-th fed-back
token); RoPE positions start at 0 at each row's first real token and padding has segment id 0, so
a row's log-probs equal those of the training forward pass over its unpadded sequence.

`model_logprobs` are log-probs of the generated tokens under the raw model at temperature 1 (what
RL losses need); `sampling_logprobs` are under the distribution actually sampled from (after
temperature, top-k, top-p; 0 for greedy decoding, a point mass).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxalign import sharding as shd
from jaxalign.config import Config, ModelConfig, SamplingConfig, ShardingConfig, load_config
from jaxalign.errors import DataError, UserError
from jaxalign.models.auto import target_platform
from jaxalign.models.registry import build
from jaxalign.paths import run_path

FINISH_REASONS = ("length", "stop")  # index = the code in `Generation.finish_reasons`
MIN_BUCKET = 16


# ---------------------------------------------------------------------------------------------
# Pure math: processing logits and sampling.


def process_logits(
    logits: jax.Array,
    temperature: ArrayLike,
    top_k: ArrayLike,
    top_p: ArrayLike,
    min_p: ArrayLike = 0.0,
) -> jax.Array:
    """Logits of the sampling distribution. logits: [B, V] f32 -> [B, V] f32; temperature (> 0),
    top_k, top_p, min_p: scalars, Python or traced (changing them never recompiles).

    Divided by `temperature`, then tokens outside the `top_k` largest (0: off) and outside the
    smallest set whose probability reaches `top_p` (1: off) are set to -inf (Hugging Face's
    order), and so are those whose probability is below `min_p` times the most likely token's
    (0: off; Nguyen et al. 2024). Ties at a threshold are kept. The one sort top-k and top-p
    need runs only when one of them is on; min-p needs none (a ratio of probabilities, the same
    before and after the other filters renormalize) and runs only when on.
    """
    x = logits / temperature
    vocab = x.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    k_on = (top_k > 0) & (top_k < vocab)
    p_on = top_p < 1.0

    def filtered(x):
        sorted_desc = -jnp.sort(-x, axis=-1)
        kth = jax.lax.dynamic_index_in_dim(sorted_desc, jnp.where(k_on, top_k - 1, vocab - 1), 1)
        sorted_desc = jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc)  # still sorted
        x = jnp.where(x < kth, -jnp.inf, x)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p) | ~p_on  # always true for the most likely token
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < threshold, -jnp.inf, x)

    min_p = jnp.asarray(min_p, jnp.float32)

    def above_min_p(x):
        floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(min_p)
        return jnp.where(x < floor, -jnp.inf, x)

    x = jax.lax.cond(k_on | p_on, filtered, lambda x: x, x)
    return jax.lax.cond(min_p > 0, above_min_p, lambda x: x, x)  # off: no pass over the logits


def apply_penalties(
    logits: jax.Array,
    prompt_mask: jax.Array,
    counts: jax.Array,
    repetition: ArrayLike,
    presence: ArrayLike,
    frequency: ArrayLike,
) -> jax.Array:
    """Logits with repetition, presence and frequency penalties (vLLM's definitions; the
    repetition penalty is Hugging Face's and CTRL's). logits: [B, V] f32; prompt_mask: [B, V]
    bool, the tokens of each row's prompt; counts: [B, V] int32, how often each token occurs in
    the row's response so far; the penalties: scalars (1, 0, 0: off), may be traced.

    A token in the prompt or the response has a positive logit divided by `repetition` and a
    negative one multiplied by it; then a token in the response loses `presence` once and
    `frequency` per occurrence. Applied before temperature and the filters."""
    in_response = counts > 0
    seen = prompt_mask | in_response
    x = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
    return x - presence * in_response.astype(x.dtype) - frequency * counts.astype(x.dtype)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum) as int32, for x: [B, V] without
    NaNs. Two plain reductions, which XLA:CPU vectorizes, instead of one (value, index) reduction,
    which it does not (docs/performance.md, "Argmax")."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, iota, x.shape[-1]), axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token], computed as in `losses.target_logprobs`. [B, V], [B] -> [B]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: ArrayLike,
    top_k: ArrayLike,
    top_p: ArrayLike,
    min_p: ArrayLike = 0.0,
    penalized: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row. logits: [B, V] f32, keys: [B] PRNG keys (one per row, so a row's
    sample does not depend on the rest of the batch); temperature, top_k, top_p, min_p: scalars,
    may be traced; `penalized`: the logits after `apply_penalties` (None: no penalties), what
    greedy decoding and the sampling distribution start from. Returns (tokens [B] int32,
    model_logprobs [B] under the raw `logits`, sampling_logprobs [B]); temperature 0 is greedy
    (the exact argmax; only that branch runs)."""
    start = logits if penalized is None else penalized

    def greedy(_):
        tokens = first_argmax(start)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)

    def sampled(_):
        processed = process_logits(start, temperature, top_k, top_p, min_p)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
        tokens = first_argmax(processed + gumbel)
        return tokens, token_logprobs(processed, tokens)

    tokens, sampling_lp = jax.lax.cond(jnp.asarray(temperature) > 0, sampled, greedy, None)
    return tokens, token_logprobs(logits, tokens), sampling_lp


# ---------------------------------------------------------------------------------------------
# The compiled generate function.


@jax.tree_util.register_dataclass
@dataclass
class Generation:
    """What `Sampler.generate` returns (a pytree; `sharding.host_array` gives numpy). Past a row's
    end, tokens are `pad_id` and log-probs 0."""

    tokens: jax.Array  # [B, N] int32 generated tokens (the stop token included)
    lengths: jax.Array  # [B] int32 number of generated tokens, the stop token included
    finish_reasons: jax.Array  # [B] int32 index into FINISH_REASONS
    model_logprobs: jax.Array  # [B, N] f32 under the raw model at temperature 1
    sampling_logprobs: jax.Array  # [B, N] f32 under the processed sampling distribution
    num_steps: jax.Array  # [] int32 tokens generated per row before the loop exited (<= N)

    def finish_reason_names(self) -> list[str]:
        return [FINISH_REASONS[int(r)] for r in np.asarray(self.finish_reasons)]


def _generate(
    graphdef: nnx.GraphDef,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    sample_ids: jax.Array,
    seed_key: jax.Array,
    settings: dict,
    row_limits: jax.Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    stop_sequences: tuple[tuple[int, ...], ...],
    pad_id: int,
    penalties: bool,
) -> dict:
    """Prefill + `lax.while_loop` decode. prompt_tokens: [B, P] left-padded; prompt_lengths,
    sample_ids: [B]; settings: {'temperature', 'top_k', 'top_p', 'min_p', 'repetition_penalty',
    'presence_penalty', 'frequency_penalty'} scalar arrays (traced, so other values never
    recompile). A row stops at a token of `stop_ids` or when its last tokens are one of
    `stop_sequences`; the loop exits as soon as every row has stopped. `penalties` (static)
    carries each row's prompt tokens and response token counts ([B, V] each) and applies the
    penalties; without it the penalty settings are ignored. `row_limits` [B]: each row's token
    budget (None: max_new_tokens for every row); the loop still runs until every row ends."""
    model = nnx.merge(graphdef, params)
    cfg: ModelConfig = model.cfg
    b, p = prompt_tokens.shape
    n = max_new_tokens
    pad = p - prompt_lengths
    slots = jnp.arange(p, dtype=jnp.int32)
    segment_ids = (slots[None, :] >= pad[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    # Slots P.. hold generated tokens (the last one is never fed back): S = P + N - 1.
    kv_segment_ids = jnp.concatenate([segment_ids, jnp.ones((b, n - 1), jnp.int32)], axis=1)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(sample_ids)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    tail_len = max((len(q) for q in stop_sequences), default=0)
    rows = jnp.arange(b)
    limits = jnp.full((b,), n, jnp.int32) if row_limits is None else row_limits

    def sample(logits, step, s):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        logits = logits.astype(jnp.float32)
        penalized = None
        if penalties:
            penalized = apply_penalties(
                logits,
                s["prompt_mask"],
                s["counts"],
                settings["repetition_penalty"],
                settings["presence_penalty"],
                settings["frequency_penalty"],
            )
        return sample_tokens(
            logits,
            keys,
            settings["temperature"],
            settings["top_k"],
            settings["top_p"],
            settings["min_p"],
            penalized,
        )

    def ends(token, s, active):
        """Whether `token` stops its row; the updated tail and counts."""
        out, stop = {}, jnp.any(token[:, None] == stops, axis=-1)
        if tail_len:
            tail = jnp.concatenate([s["tail"][:, 1:], token[:, None]], axis=1)
            for seq in stop_sequences:
                q = jnp.asarray(seq, jnp.int32)
                stop |= jnp.all(tail[:, tail_len - len(seq) :] == q, axis=-1)
            out["tail"] = tail
        if penalties:
            out["counts"] = s["counts"].at[rows, token].add(active.astype(jnp.int32))
        return stop & active, out

    extra = {}
    if tail_len:
        extra["tail"] = jnp.full((b, tail_len), -1, jnp.int32)  # the response only
    if penalties:
        vocab = cfg.vocab_size
        seen = jnp.zeros((b, vocab), jnp.int32).at[rows[:, None], prompt_tokens].max(segment_ids)
        extra["prompt_mask"] = seen > 0
        extra["counts"] = jnp.zeros((b, vocab), jnp.int32)

    hidden, cache = model.with_cache(
        prompt_tokens, positions, segment_ids, model.init_cache(b, p + n - 1)
    )
    token, model_lp, sampling_lp = sample(model.logits(hidden[:, -1]), 0, extra)
    stopped, updated = ends(token, extra, jnp.ones((b,), bool))
    state = {
        "step": jnp.ones((), jnp.int32),
        "tokens": jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token),
        "model_logprobs": jnp.zeros((b, n), jnp.float32).at[:, 0].set(model_lp),
        "sampling_logprobs": jnp.zeros((b, n), jnp.float32).at[:, 0].set(sampling_lp),
        "lengths": jnp.ones((b,), jnp.int32),
        "stopped": stopped,
        "last": token,
        "cache": cache,
        **extra,
        **updated,
    }

    def cond(s):
        return (s["step"] < n) & jnp.any(~s["stopped"] & (s["lengths"] < limits))

    def body(s):
        t = s["step"]
        active = ~s["stopped"] & (s["lengths"] < limits)
        position = (prompt_lengths + t - 1)[:, None]
        hidden, cache = model.with_cache(
            s["last"][:, None],
            position,
            jnp.ones((b, 1), jnp.int32),
            s["cache"],
            p + t - 1,
            kv_segment_ids,
        )
        token, model_lp, sampling_lp = sample(model.logits(hidden[:, 0]), t, s)
        token = jnp.where(active, token, pad_id)
        stop, updated = ends(token, s, active)

        def put(buf, value):
            value = (
                jnp.where(active, value, jnp.zeros_like(value)) if buf.dtype != jnp.int32 else value
            )
            return jax.lax.dynamic_update_slice(buf, value[:, None].astype(buf.dtype), (0, t))

        return {
            **s,
            "step": t + 1,
            "tokens": put(s["tokens"], token),
            "model_logprobs": put(s["model_logprobs"], model_lp),
            "sampling_logprobs": put(s["sampling_logprobs"], sampling_lp),
            "lengths": s["lengths"] + active.astype(jnp.int32),
            "stopped": s["stopped"] | stop,
            "last": token,
            "cache": cache,
            **updated,
        }

    state = jax.lax.while_loop(cond, body, state)
    return {
        "tokens": state["tokens"],
        "lengths": state["lengths"],
        "finish_reasons": state["stopped"].astype(jnp.int32),
        "model_logprobs": state["model_logprobs"],
        "sampling_logprobs": state["sampling_logprobs"],
        "num_steps": state["step"],
    }


def prompt_bucket(length: int, max_prompt_len: int) -> int:
    """The smallest bucket holding `length` tokens: powers of two from 16, capped at
    `max_prompt_len`."""
    if length > max_prompt_len:
        raise DataError(
            f"prompt of {length} tokens is longer than sampling.max_prompt_len ({max_prompt_len})"
        )
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_prompt_len)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """[B, length] int32 left-padded tokens and [B] int32 lengths."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for row, prompt in enumerate(prompts):
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        if not 0 < len(prompt) <= length:
            raise DataError(f"prompt {row}: length {len(prompt)} not in [1, {length}]")
        tokens[row, length - len(prompt) :] = prompt
        lengths[row] = len(prompt)
    return tokens, lengths


def stop_string_sequences(tokenizer, text: str) -> list[tuple[int, ...]]:
    """The token sequences that spell `text` where it follows other text, as far as a few
    contexts show (a tokenizer may spell it differently at the start of the text, inside a word,
    after a space or a newline): the sequences the compiled loop stops at. Each is checked to
    decode, after its context, to text holding `text`."""
    found = []
    for context, sep in (("", ""), ("a", ""), ("a", " "), ("a.", "\n")):
        head = tokenizer.encode(context) if context else []
        ids = tokenizer.encode(context + sep + text)
        if ids[: len(head)] != head or len(ids) == len(head):
            continue
        seq = tuple(ids[len(head) :])
        if seq not in found and text in tokenizer.decode([*head, *seq])[len(context) :]:
            found.append(seq)
    # A sequence ending in another one stops no row the shorter one does not.
    return [q for q in found if not any(len(o) < len(q) and q[-len(o) :] == o for o in found)]


class Stops:
    """How a generated row ends: at one of `token_ids` (the template's end marker and EOS) or at
    the token that completes one of the stop `strings` (`sampling.stop`), whichever comes first.

    The compiled loop stops a row at its stop tokens and at the usual tokenizations of each stop
    string (`sequences`), which saves the remaining decode steps; `finish` then cuts every row
    at its first stop string in the decoded text, however the model spelled it, so the result
    does not depend on the tokenization. A completion's text leaves out the stop token and the
    stop string (vLLM's default)."""

    def __init__(self, tokenizer, token_ids: Sequence[int], strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.token_ids = tuple(int(i) for i in token_ids)
        self.strings = tuple(strings)
        self.sequences = tuple(q for s in self.strings for q in stop_string_sequences(tokenizer, s))

    @classmethod
    def for_config(cls, tokenizer, cfg: Config) -> Stops:
        from jaxalign.data.templates import stop_token_ids

        return cls(tokenizer, stop_token_ids(tokenizer, cfg.data.template), cfg.sampling.stop)

    def _first(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def finish(self, ids: Sequence[int], stopped: bool) -> tuple[int, bool, str]:
        """(tokens kept, stopped, text) of one row's generated tokens (its first `lengths`)."""
        ids = [int(i) for i in ids]
        stop_token = bool(stopped) and bool(ids) and ids[-1] in self.token_ids
        body = ids[:-1] if stop_token else ids
        text = self.tokenizer.decode(body)
        cut = self._first(text) if self.strings else None
        if cut is None:
            return len(ids), bool(stopped), text
        lo, hi = 1, len(body)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if self._first(self.tokenizer.decode(body[:mid])) is not None:
                hi = mid
            else:
                lo = mid + 1
        return lo, True, text[:cut]

    def finish_rows(self, tokens: np.ndarray, lengths: np.ndarray, stopped: np.ndarray):
        """`finish` for each row of [R, N] tokens: (lengths [R], stopped [R] bool, texts)."""
        out = [
            self.finish(tokens[r, : int(lengths[r])], bool(stopped[r])) for r in range(len(lengths))
        ]
        new_lengths = np.asarray([o[0] for o in out], np.int32).reshape(len(out))
        new_stopped = np.asarray([o[1] for o in out], bool).reshape(len(out))
        return new_lengths, new_stopped, [o[2] for o in out]


def model_graphdef(model_cfg: ModelConfig, mesh: Mesh | None) -> nnx.GraphDef:
    """The graph of `model_cfg`'s module, its `auto` settings resolved for the mesh's devices
    (the local platform without a mesh); nothing is allocated."""
    platform = target_platform(mesh) if mesh is not None else contextlib.nullcontext()
    with platform:
        return nnx.graphdef(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))))


class Sampler:
    """Generates from a Transformer's params; one compiled function per (batch, bucket) shape.

    With a `mesh`, rows are sharded over the batch axes and KV heads over the tensor axis, per
    `rules`; the parameters are used with whatever shardings they already have (the trainer's,
    for the policy being trained), so nothing is copied or resharded.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        sampling: SamplingConfig,
        *,
        stop_token_ids: Sequence[int] = (),
        stop_sequences: Sequence[Sequence[int]] = (),
        pad_id: int = 0,
        mesh: Mesh | None = None,
        rules: shd.Rules | None = None,
        graphdef: nnx.GraphDef | None = None,
    ):
        if graphdef is None:
            graphdef = model_graphdef(model_cfg, mesh)
        self.model_cfg = model_cfg
        self.sampling = sampling
        self.mesh = mesh
        self.rules = rules if rules is not None else shd.resolve_rules(ShardingConfig())
        self.pad_id = pad_id
        self._fn = jax.jit(
            functools.partial(
                _generate,
                graphdef,
                max_new_tokens=sampling.max_new_tokens,
                stop_ids=tuple(int(i) for i in stop_token_ids),
                stop_sequences=tuple(tuple(int(i) for i in q) for q in stop_sequences if q),
                pad_id=pad_id,
            ),
            static_argnames=("penalties",),
        )

    def _batch_sharding(self, batch: int, ndim: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        axis = shd.logical_to_spec(("batch",), self.rules)[0]
        if batch % shd.spec_axis_size(self.mesh, axis):
            axis = None
        return NamedSharding(self.mesh, P(axis, *([None] * (ndim - 1))))

    def generate_padded(
        self,
        params: Any,
        prompt_tokens: np.ndarray,
        prompt_lengths: np.ndarray,
        sample_ids: np.ndarray | None = None,
        seed: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        max_tokens: np.ndarray | None = None,
    ) -> Generation:
        """Generate from left-padded prompts [B, P] with lengths [B]. `sample_ids` [B] (default
        0..B-1) pick each row's random stream, so a row's samples do not depend on its batch.
        `max_tokens` [B]: each row's token budget (None: sampling.max_new_tokens each).
        `seed` and the sampling settings default to the `SamplingConfig`'s; they are run-time
        inputs, so changing them never recompiles (turning the penalties on or off compiles a
        second variant, which carries each row's token counts)."""
        b = prompt_tokens.shape[0]
        if sample_ids is None:
            sample_ids = np.arange(b, dtype=np.int32)
        seed = self.sampling.seed if seed is None else seed
        settings = self.settings(
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )
        penalties = bool(
            settings["repetition_penalty"] != 1
            or settings["presence_penalty"] != 0
            or settings["frequency_penalty"] != 0
        )
        inputs = [
            np.asarray(prompt_tokens, np.int32),
            np.asarray(prompt_lengths, np.int32),
            np.asarray(sample_ids, np.int32),
        ]
        limits = None
        if max_tokens is not None:
            limits = np.clip(np.asarray(max_tokens, np.int32), 1, self.sampling.max_new_tokens)
        if self.mesh is not None:
            inputs = [jax.device_put(x, self._batch_sharding(b, x.ndim)) for x in inputs]
            if limits is not None:
                limits = jax.device_put(limits, self._batch_sharding(b, 1))
            replicated = NamedSharding(self.mesh, P())
            settings = jax.device_put(settings, replicated)
            with shd.activation_sharding(self.mesh, self.rules):
                out = self._fn(
                    params,
                    *inputs,
                    jax.random.PRNGKey(seed),
                    settings,
                    limits,
                    penalties=penalties,
                )
        else:
            out = self._fn(
                params, *inputs, jax.random.PRNGKey(seed), settings, limits, penalties=penalties
            )
        return Generation(**out)

    def lower(self, params: Any, rows: int, prompt_width: int, penalties: bool = False):
        """The generate program (prefill, then the decode loop over its KV cache) lowered for
        `rows` prompts of `prompt_width` tokens, with abstract inputs: `params` may be
        ShapeDtypeStructs with shardings. Needs a mesh. For `jaxalign.aot`."""
        batch = lambda ndim: self._batch_sharding(rows, ndim)  # noqa: E731
        replicated = NamedSharding(self.mesh, P())
        inputs = [
            jax.ShapeDtypeStruct((rows, prompt_width), jnp.int32, sharding=batch(2)),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch(1)),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch(1)),
        ]
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        settings = {
            k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=replicated)
            for k, v in self.settings(None, None, None).items()
        }
        with shd.activation_sharding(self.mesh, self.rules):
            return self._fn.lower(params, *inputs, key, settings, penalties=penalties)

    def settings(
        self,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None = None,
        *,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The sampling settings as the compiled function's scalar inputs (None: the config's)."""
        sp = self.sampling

        def pick(value, default, kind=float):
            return kind(default if value is None else value)

        temperature = pick(temperature, sp.temperature)
        top_k = pick(top_k, sp.top_k, int)
        top_p = pick(top_p, sp.top_p)
        min_p = pick(min_p, sp.min_p)
        repetition = pick(repetition_penalty, sp.repetition_penalty)
        if (
            temperature < 0
            or top_k < 0
            or not 0 < top_p <= 1
            or not 0 <= min_p <= 1
            or repetition <= 0
        ):
            raise UserError(
                f"sampling settings out of range: temperature {temperature} (>= 0), "
                f"top_k {top_k} (>= 0), top_p {top_p} (in (0, 1]), min_p {min_p} (in [0, 1]), "
                f"repetition_penalty {repetition} (> 0)"
            )
        return {
            "temperature": np.float32(temperature),
            "top_k": np.int32(top_k),
            "top_p": np.float32(top_p),
            "min_p": np.float32(min_p),
            "repetition_penalty": np.float32(repetition),
            "presence_penalty": np.float32(pick(presence_penalty, sp.presence_penalty)),
            "frequency_penalty": np.float32(pick(frequency_penalty, sp.frequency_penalty)),
        }

    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        sample_ids=None,
        seed: int | None = None,
        **settings,
    ) -> Generation:
        """Generate from a list of token-id prompts of any lengths (left-padded to a bucket).
        `settings`: overrides of the sampling settings (see `generate_padded`)."""
        length = prompt_bucket(max(len(p) for p in prompts), self.sampling.max_prompt_len)
        tokens, lengths = left_pad(prompts, length, self.pad_id)
        return self.generate_padded(params, tokens, lengths, sample_ids, seed, **settings)


# ---------------------------------------------------------------------------------------------
# Loading a trained policy and generating for a file of prompts (the CLI).


@dataclass
class Policy:
    """A model loaded for generation: its run config, mesh, rules, graphdef and params."""

    cfg: Config
    mesh: Mesh
    rules: shd.Rules
    graphdef: nnx.GraphDef
    params: Any


def find_run_config(path: str | Path) -> Path:
    """The `config.yaml` of a RUN_DIR, its `checkpoints/` dir, or one `checkpoints/<step>`."""
    p = run_path(path, key="checkpoint")
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    raise UserError(
        f"{path}: not a run directory (no config.yaml in it or its parent run directory) "
        "nor a Hugging Face model directory (no config.json)"
    )


def load_policy(path: str | Path, overrides: Sequence[str] = ()) -> Policy:
    """Load a run's (or checkpoint's) policy params onto the mesh its config (plus `overrides`)
    names. A PPO run's checkpoint holds `{"policy", "value"}`: only the policy is restored. A
    LoRA run's holds the adapters: its base is rebuilt and checked
    (`trainers.lora_runs.load_lora_run`).

    A Hugging Face model directory loads too: its config.json, tokenizer and chat template make
    the config (`hf.model.run_config`, then `overrides`), and its weights stream straight into
    their shardings."""
    from jaxalign import hf
    from jaxalign.checkpoint import abstract_with_shardings, load_params
    from jaxalign.hf.model import hf_model_dir, run_config
    from jaxalign.models.params import build_model
    from jaxalign.trainers import get_trainer

    hf_dir = hf_model_dir(path)
    if hf_dir is not None:
        cfg = run_config(hf_dir, list(overrides))
    else:
        cfg = load_config(find_run_config(path), list(overrides))
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding)
    algorithm = get_trainer(cfg.trainer)
    graphdef, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: algorithm.make_policy(cfg, rngs)
    )
    if hf_dir is not None:
        params = hf.load_params(hf_dir, cfg.model, abstract, shardings)
        return Policy(cfg, mesh, rules, graphdef, params)
    if cfg.model.lora is not None:  # the base rebuilt, the checkpoint's adapters put in
        from jaxalign.trainers.lora_runs import load_lora_run

        params = load_lora_run(path, cfg, algorithm, mesh, rules)
        return Policy(cfg, mesh, rules, graphdef, params)
    target = algorithm.policy_target(abstract_with_shardings(abstract, shardings))
    params = algorithm.policy_params(load_params(path, target))
    return Policy(cfg, mesh, rules, graphdef, params)


def prompt_messages(record: Any, where: str) -> list[dict]:
    """The conversation to continue: `{"prompt", "system"?}` or `{"messages"}` (a trailing
    assistant message, e.g. a reference answer, is dropped)."""
    if not isinstance(record, dict):
        raise DataError("record must be a JSON object", where=where)
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise DataError(
                "field 'messages' must be a non-empty list of {role, content}", where=where
            )
        messages = [{"role": m.get("role"), "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(
                "field 'messages' has no prompt before the assistant reply", where=where
            )
        return messages
    if not isinstance(record.get("prompt"), str):
        raise DataError("record must have a string 'prompt' or a 'messages' list", where=where)
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("field 'system' must be a string", where=where)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": record["prompt"]}]


def read_prompts(path: str | Path, tokenizer, template: str, max_prompt_len: int):
    """Records of a prompts file (any format `data.sources.read_records` reads: `.jsonl`,
    `.jsonl.gz`, Parquet, ArrayRecord), their messages and their rendered prompt token ids.
    A bad record raises a one-line DataError naming the file, line and field."""
    from jaxalign.data.sources import read_records
    from jaxalign.data.templates import render_prompt

    messages, prompt_ids = [], []

    def validate(record: Any, where: str) -> None:
        convo = prompt_messages(record, where)
        try:
            ids = render_prompt(convo, tokenizer, template)
        except DataError as e:
            raise DataError(str(e), where=where) from None
        if len(ids) > max_prompt_len:
            raise DataError(
                f"prompt has {len(ids)} tokens, more than sampling.max_prompt_len "
                f"({max_prompt_len})",
                where=where,
            )
        messages.append(convo)
        prompt_ids.append(ids)

    records, _ = read_records(str(path), validate=validate)
    return records, messages, prompt_ids


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    token_ids: list[int]  # generated tokens, the stop token (or stop string's tokens) included
    finish_reason: str
    model_logprob: float  # sum of the tokens' log-probs under the raw model
    text: str  # decoded, without the stop token or stop string


def generate_all(
    sampler: Sampler,
    params: Any,
    prompt_ids: Sequence[np.ndarray],
    stops: Stops,
    *,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    first_index: int = 0,
    bar=None,
) -> list[list[Completion]]:
    """`num_samples` completions for every prompt, in fixed-size batches of rows sorted by prompt
    length (so buckets are tight); row `(first_index + i) * num_samples + j` samples with stream
    id of that number, so results depend neither on batching nor on which slice of a prompt
    list this call gets. `bar`: a progress bar to advance (else `progress` makes one)."""
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
    rows.sort(key=lambda r: -len(prompt_ids[r[0]]))
    out: list[list[Completion | None]] = [[None] * num_samples for _ in prompt_ids]
    own_bar = bar is None and progress
    if own_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="sample", dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # keep the compiled shape
        ids = np.asarray([(first_index + i) * num_samples + j for i, j in padded], np.int32)
        gen = sampler.generate(params, [prompt_ids[i] for i, _ in padded], ids, seed)
        tokens, lengths, finish, model_lp = (
            shd.host_array(x)
            for x in (gen.tokens, gen.lengths, gen.finish_reasons, gen.model_logprobs)
        )
        for row, (i, j) in enumerate(chunk):
            n, stopped, text = stops.finish(tokens[row, : int(lengths[row])], bool(finish[row]))
            out[i][j] = Completion(
                tokens[row, :n].tolist(),
                FINISH_REASONS[int(stopped)],
                float(model_lp[row, :n].sum()),
                text,
            )
        if bar is not None:
            bar.update(len(chunk))
    if own_bar:
        bar.close()
    return out  # type: ignore[return-value]


def policy_sampler(policy: Policy, stops: Stops) -> Sampler:
    """A Sampler for `policy` that stops where `stops` says (see `Stops.for_config`)."""
    cfg = policy.cfg
    return Sampler(
        cfg.model,
        cfg.sampling,
        stop_token_ids=stops.token_ids,
        stop_sequences=stops.sequences,
        pad_id=stops.tokenizer.pad_id,
        mesh=policy.mesh,
        rules=policy.rules,
        graphdef=policy.graphdef,
    )


def load_prompts(policy: Policy, input_path: str | Path):
    """The policy's tokenizer and stops, and the records, messages and prompt token ids of
    `input_path` (every record checked before anything is generated)."""
    from jaxalign.data.tokenizer import load_tokenizer

    cfg = policy.cfg
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{cfg.data.tokenizer}: vocabulary ({tokenizer.vocab_size}) is larger "
            f"than model.vocab_size ({cfg.model.vocab_size})"
        )
    records, messages, prompt_ids = read_prompts(
        input_path, tokenizer, cfg.data.template, cfg.sampling.max_prompt_len
    )
    return tokenizer, Stops.for_config(tokenizer, cfg), records, messages, prompt_ids


def output_record(record: dict, samples: Sequence[Completion]) -> dict:
    """The input record plus `completion`, `num_tokens` and `finish_reason` (several samples:
    `completions`, a list of such objects)."""
    items = [
        {"completion": c.text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
        for c in samples
    ]
    return {**record, **items[0]} if len(items) == 1 else {**record, "completions": items}


def sample_in_chunks(
    policy: Policy,
    input_path: str | Path,
    outputs: Sequence[str | Path],
    write_chunk,
    *,
    resume: bool = False,
    progress: bool = True,
    chunk_prompts: int | None = None,
) -> tuple[int, dict[str, float]]:
    """Sample `sampling.num_samples` completions for every prompt of `input_path`, a chunk of
    prompts at a time (`chunk_prompts`; default 32 compiled batches' worth), and hand each chunk
    to `write_chunk(files, records, messages, completions, totals)`, which writes its lines to
    `files` (the open `outputs`, None on processes other than 0; every process calls it, so it
    may run collectives such as a reward model) and updates the running `totals` dict.

    The outputs are `partial.PartialOutputs`: a crash or an interrupt loses at most the chunk in
    flight, and `resume` continues an unfinished run with the samples an uninterrupted run
    draws (each row's random stream is fixed by its prompt's index, not its batch or chunk).
    Returns the number of input records and the totals."""
    from jaxalign.config import to_dict
    from jaxalign.partial import PartialOutputs, fingerprint

    _, stops, records, messages, prompt_ids = load_prompts(policy, input_path)
    sp = policy.cfg.sampling
    # What shapes the output: not the batch size (a row's samples do not depend on its batch),
    # so a run that ran out of memory can resume with smaller batches.
    sampling = {k: v for k, v in to_dict(policy.cfg)["sampling"].items() if k != "batch_size"}
    shape = {"sampling": sampling, "template": policy.cfg.data.template}
    chunk_prompts = chunk_prompts or max(1, 32 * sp.batch_size // sp.num_samples)
    sampler = policy_sampler(policy, stops)
    with PartialOutputs(outputs, fingerprint(records, shape), resume=resume) as out:
        bar = None
        if progress and out.main:
            from tqdm import tqdm

            total, done = len(records) * sp.num_samples, out.done * sp.num_samples
            bar = tqdm(total=total, initial=done, unit="sample", dynamic_ncols=True)
        totals = dict(out.totals)
        try:
            for start in range(out.done, len(records), chunk_prompts):
                end = min(start + chunk_prompts, len(records))
                completions = generate_all(
                    sampler,
                    policy.params,
                    prompt_ids[start:end],
                    stops,
                    num_samples=sp.num_samples,
                    batch_size=sp.batch_size,
                    seed=sp.seed,
                    first_index=start,
                    bar=bar,
                )
                write_chunk(out.files, records[start:end], messages[start:end], completions, totals)
                out.commit(end, totals)
        finally:
            if bar is not None:
                bar.close()
        out.finish()
    return len(records), totals


def generate_file(
    policy: Policy,
    input_path: str | Path,
    output_path: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    chunk_prompts: int | None = None,
) -> int:
    """Write one JSONL record per prompt, in input order (`output_record`), chunk by chunk and
    resumable (`sample_in_chunks`). Returns the number of records."""

    def write(files, records, _, completions, totals):
        if files[0] is not None:
            for record, samples in zip(records, completions, strict=True):
                line = json.dumps(output_record(record, samples), ensure_ascii=False)
                files[0].write(line + "\n")

    count, _ = sample_in_chunks(
        policy,
        input_path,
        [output_path],
        write,
        resume=resume,
        progress=progress,
        chunk_prompts=chunk_prompts,
    )
    return count
