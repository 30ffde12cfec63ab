"""The sampler: KV-cache decoding equals full forward passes, train/rollout log-prob parity,
sampling processors and penalties, stop tokens and stop strings, seeds, sharding, scan_layers;
the generate and rejection-sample commands."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import TINY_MODEL, random_params, reward_model_run, write_run

from jaxalign import sharding as shd
from jaxalign.config import SamplingConfig, load_config
from jaxalign.errors import DataError, UserError
from jaxalign.generate import (
    FINISH_REASONS,
    Sampler,
    Stops,
    apply_penalties,
    process_logits,
    read_prompts,
)
from jaxalign.losses import target_logprobs
from jaxalign.models.llama import Transformer, logical_axes, stack_layers

TOKENIZER = str(Path(__file__).resolve().parents[1] / "data" / "tiny" / "tokenizer.model")
MODEL = {**TINY_MODEL, "vocab_size": 512}
# Larger than default random weights make the distributions peaked, so argmax never ties.
WEIGHT_STD = 0.25
N = 10  # new tokens
PROMPT_LENS = (5, 11, 3, 20, 9, 1, 14, 7)  # bucket 32 (one prompt is longer than 16)
WIDTH = 32 + N  # reference forward width (right padding)


def make_cfg(**overrides):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets, base={"model": dict(MODEL)})


@pytest.fixture(scope="module")
def setup():
    cfg = make_cfg()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    params = jax.device_put(random_params(state, 0, WEIGHT_STD), jax.devices()[0])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 512, size=n).astype(np.int32) for n in PROMPT_LENS]

    @jax.jit
    def forward(params, tokens, segment_ids):
        """Training-style forward over right-padded rows: logits and next-token log-probs."""
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden = model(tokens, positions, segment_ids)
        logps, _ = target_logprobs(hidden[:, :-1], model.output_weight(), tokens[:, 1:])
        return model.logits(hidden).astype(jnp.float32), logps

    def reference(seqs):
        tokens = np.zeros((len(seqs), WIDTH), np.int32)
        segment_ids = np.zeros_like(tokens)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = s
            segment_ids[r, : len(s)] = 1
        return jax.device_get(forward(params, tokens, segment_ids))

    greedy = Sampler(cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N))
    return cfg, graphdef, params, prompts, reference, greedy


@pytest.fixture(scope="module")
def greedy_out(setup):
    _, _, params, prompts, _, greedy = setup
    return jax.device_get(greedy.generate(params, prompts))


def completions(out):
    return [out.tokens[r, : out.lengths[r]].tolist() for r in range(len(out.lengths))]


def test_greedy_equals_stepwise_argmax_of_full_forward(setup, greedy_out):
    _, _, _, prompts, reference, _ = setup
    seqs = [list(p) for p in prompts]
    for _ in range(N):
        logits, _ = reference(seqs)
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logits[r, len(s) - 1])))
    expected = [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]
    assert completions(greedy_out) == expected
    assert greedy_out.lengths.tolist() == [N] * len(prompts)
    assert greedy_out.finish_reasons.tolist() == [FINISH_REASONS.index("length")] * len(prompts)
    np.testing.assert_array_equal(greedy_out.sampling_logprobs, 0.0)  # a point mass


def _np_processed_logprobs(logits, temperature, top_k, top_p, min_p=0.0):
    """float64 reference of the sampling distribution: temperature, then top-k, then top-p,
    then min-p (relative to the most likely token's probability after renormalizing)."""
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep = np.zeros(x.shape, bool)
    keep[order[before < top_p]] = True
    x = np.where(keep, x, -np.inf)
    probs = np.exp(x - x.max()) / np.sum(np.exp(x - x.max()))
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


class CountingJit:
    """Wraps a Sampler's jitted function (`sampler._fn`) and records the signature of each call:
    the shapes, dtypes and shardings of its array arguments and its static `penalties`. jax.jit
    compiles once per signature, so `len(signatures)` is the number of compilations."""

    def __init__(self, fn):
        self.fn = fn
        self.signatures: set = set()

    @staticmethod
    def _abstract(x):
        array = x if hasattr(x, "shape") else np.asarray(x)
        return array.shape, str(array.dtype), getattr(x, "sharding", None)

    def __call__(self, *args, penalties):
        self.signatures.add((tuple(map(self._abstract, jax.tree.leaves(args))), penalties))
        return self.fn(*args, penalties=penalties)


def compilations(sampler: Sampler) -> int:
    """The distinct compiled shapes of a sampler made by `counting_sampler`."""
    return len(sampler._fn.signatures)


def counting_sampler(*args, **kwargs) -> Sampler:
    """A Sampler whose compilations `compilations` counts."""
    sampler = Sampler(*args, **kwargs)
    sampler._fn = CountingJit(sampler._fn)
    return sampler


@pytest.fixture(scope="module")
def sampled(setup):
    cfg, _, params, prompts, _, _ = setup
    sampling = SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=N, seed=3)
    sampler = counting_sampler(cfg.model, sampling)
    first = jax.device_get(sampler.generate(params, prompts))
    return sampler, sampling, first


def test_sampler_logprobs_equal_training_forward_logprobs(setup, sampled):
    """Train/rollout parity: temperature-1 log-probs of the sampled tokens equal the training
    forward pass's, within 1e-5 in f32; sampling log-probs match a float64 reference of the
    temperature/top-k/top-p distribution."""
    _, _, _, prompts, reference, greedy_sampler = setup
    _, sampling, out = sampled
    seqs = [list(p) + c for p, c in zip(prompts, completions(out), strict=True)]
    logits, train_logps = reference(seqs)
    assert completions(out) != completions(
        jax.device_get(greedy_sampler.generate(setup[2], prompts))
    )  # really sampled
    for r, p in enumerate(prompts):
        n = int(out.lengths[r])
        rollout = out.model_logprobs[r, :n]
        np.testing.assert_allclose(
            rollout, train_logps[r, len(p) - 1 : len(p) - 1 + n], atol=1e-5, rtol=0
        )
        for t in range(n):
            ref = _np_processed_logprobs(
                logits[r, len(p) - 1 + t], sampling.temperature, sampling.top_k, sampling.top_p
            )
            token = seqs[r][len(p) + t]
            assert np.isfinite(ref[token])  # never outside the top-k / nucleus
            np.testing.assert_allclose(out.sampling_logprobs[r, t], ref[token], atol=1e-4)


def test_process_logits_with_traced_settings_matches_float64_reference():
    """Temperature, top-k, top-p and min-p are run-time inputs of one compiled function."""
    rng = np.random.default_rng(5)
    logits = (2.0 * rng.standard_normal((3, 64))).astype(np.float32)
    logits[1, [3, 9, 20]] = logits[1].max() + 0.5  # a three-way tie at the top
    fn = jax.jit(lambda x, t, k, p, m: jax.nn.log_softmax(process_logits(x, t, k, p, m), axis=-1))
    for temperature, top_k, top_p, min_p in [
        (1.0, 0, 1.0, 0.0),
        (0.7, 5, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (0.5, 10, 0.6, 0.0),
        (1.0, 2, 1.0, 0.0),  # ties at the k-th value are kept
        (2.0, 64, 0.999, 0.0),
        (1.0, 0, 1e-6, 0.0),  # only the most likely tokens
        (1.0, 0, 1.0, 0.1),  # min-p alone
        (0.7, 20, 0.9, 0.05),  # all four
        (1.0, 0, 1.0, 1.0),  # only the most likely tokens (and ties)
    ]:
        got = np.asarray(fn(logits, temperature, top_k, top_p, min_p))
        for r in range(len(logits)):
            if r == 1 and top_p < 1.0:
                continue  # the reference cuts a tie in the nucleus; process_logits keeps it
            ref = _np_processed_logprobs(logits[r], temperature, top_k, top_p, min_p)
            np.testing.assert_array_equal(np.isfinite(got[r]), np.isfinite(ref))
            kept = np.isfinite(ref)
            np.testing.assert_allclose(got[r][kept], ref[kept], atol=1e-5)
    assert fn._cache_size() == 1


def test_sampling_settings_change_at_run_time_without_recompiling(setup, sampled, greedy_out):
    _, _, params, prompts, _, _ = setup
    sampler, _, first = sampled
    # Temperature 0: the exact argmax, a point mass.
    greedy = jax.device_get(sampler.generate(params, prompts, temperature=0.0))
    np.testing.assert_array_equal(greedy.tokens, greedy_out.tokens)
    np.testing.assert_allclose(greedy.model_logprobs, greedy_out.model_logprobs, atol=1e-6)
    np.testing.assert_array_equal(greedy.sampling_logprobs, 0.0)
    # Top-k 1, a tiny top-p and min-p 1 leave only the most likely token: greedy's tokens.
    for settings in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-6}, {"top_p": 1.0, "min_p": 1.0}):
        narrow = jax.device_get(sampler.generate(params, prompts, temperature=1.3, **settings))
        np.testing.assert_array_equal(narrow.tokens, greedy_out.tokens)
        np.testing.assert_allclose(narrow.sampling_logprobs, 0.0, atol=1e-6)
    # Temperature 1, no filters: the sampling distribution is the model's.
    plain = jax.device_get(sampler.generate(params, prompts, temperature=1.0, top_k=0, top_p=1.0))
    assert not np.array_equal(plain.tokens, first.tokens)
    np.testing.assert_allclose(plain.sampling_logprobs, plain.model_logprobs, atol=1e-6)
    # And back to the config's settings: the first samples.
    again = jax.device_get(sampler.generate(params, prompts))
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert compilations(sampler) == 1
    with pytest.raises(UserError, match="top_p"):
        sampler.generate(params, prompts, top_p=0.0)
    with pytest.raises(UserError, match="min_p"):
        sampler.generate(params, prompts, min_p=1.5)


def test_fixed_seed_reproduces_and_batch_composition_does_not_matter(setup, sampled):
    _, _, params, prompts, _, greedy = setup
    sampler, _, first = sampled
    again = jax.device_get(sampler.generate(params, prompts))
    np.testing.assert_array_equal(again.tokens, first.tokens)
    # The same rows in another order (with their sample ids): the same samples, no recompile.
    perm = np.array([3, 7, 0, 5, 1, 6, 2, 4])
    shuffled = jax.device_get(sampler.generate(params, [prompts[i] for i in perm], perm))
    np.testing.assert_array_equal(shuffled.tokens, first.tokens[perm])
    assert compilations(sampler) == 1
    other = jax.device_get(sampler.generate(params, prompts, seed=4))
    assert not np.array_equal(other.tokens, first.tokens)
    # Greedy: three prompts among different neighbours, in a smaller bucket (16, not 32).
    rng = np.random.default_rng(1)
    keep = [0, 2, 5]
    batch = [
        prompts[0],
        rng.integers(4, 512, 13),
        prompts[2],
        prompts[5],
        rng.integers(4, 512, 2),
        rng.integers(4, 512, 8),
        rng.integers(4, 512, 16),
        rng.integers(4, 512, 4),
    ]
    out = jax.device_get(greedy.generate(params, batch))
    full = jax.device_get(greedy.generate(params, prompts))
    np.testing.assert_array_equal(out.tokens[[0, 2, 3]], full.tokens[keep])
    np.testing.assert_allclose(out.model_logprobs[[0, 2, 3]], full.model_logprobs[keep], atol=1e-5)


def test_stop_tokens_end_each_row_and_the_loop_exits_early(setup, greedy_out):
    cfg, _, params, prompts, _, _ = setup
    free = completions(greedy_out)
    # Row r's greedy token at step r % 4 + 1 is a stop token: every row stops within 5 tokens
    # (earlier where another row's stop token comes first).
    stops = sorted({row[r % 4 + 1] for r, row in enumerate(free)})
    sampler = Sampler(
        cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N), stop_token_ids=stops, pad_id=0
    )
    out = jax.device_get(sampler.generate(params, prompts))
    for r, row in enumerate(free):
        n = next(j for j, t in enumerate(row) if t in stops) + 1
        assert out.lengths[r] == n and FINISH_REASONS[out.finish_reasons[r]] == "stop"
        assert out.tokens[r, :n].tolist() == row[:n]
        assert (out.tokens[r, n:] == 0).all() and (out.model_logprobs[r, n:] == 0).all()
        np.testing.assert_allclose(
            out.model_logprobs[r, :n], greedy_out.model_logprobs[r, :n], atol=1e-6
        )
    assert int(out.num_steps) == out.lengths.max() <= 5 < N  # the loop exited early


def _np_penalized(logits, prompt_mask, counts, repetition, presence, frequency):
    """float64 reference of vLLM's penalties (the repetition penalty as Hugging Face's)."""
    x = logits.astype(np.float64)
    seen = prompt_mask | (counts > 0)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    return x - presence * (counts > 0) - frequency * counts


def test_penalties_match_float64_reference():
    rng = np.random.default_rng(7)
    logits = (2.0 * rng.standard_normal((4, 64))).astype(np.float32)
    prompt_mask = rng.random((4, 64)) < 0.2
    counts = rng.integers(0, 4, (4, 64)) * (rng.random((4, 64)) < 0.3)
    fn = jax.jit(apply_penalties)
    for settings in [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (0.8, 0.5, 0.2), (2.0, -0.4, 1.0)]:
        got = np.asarray(fn(logits, prompt_mask, counts.astype(np.int32), *settings))
        ref = _np_penalized(logits, prompt_mask, counts, *settings)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-6)
    np.testing.assert_array_equal(fn(logits, prompt_mask, counts, 1.0, 0.0, 0.0), logits)
    assert fn._cache_size() == 1


def test_penalties_in_the_loop_match_stepwise_reference(setup, greedy_out):
    """Greedy decoding with penalties equals the step-by-step argmax of the full forward's
    logits penalized in float64 by the row's prompt tokens and the response so far; sampled,
    the sampling log-probs are the penalized distribution's and the model log-probs still the
    raw model's. Penalty values are run-time inputs: one extra compilation for them all."""
    cfg, _, params, prompts, reference, _ = setup
    settings = {"repetition_penalty": 1.8, "presence_penalty": 0.7, "frequency_penalty": 0.4}
    sampler = counting_sampler(cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N))
    out = jax.device_get(sampler.generate(params, prompts, **settings))
    seqs = [list(p) for p in prompts]
    for _ in range(N):
        logits, _ = reference(seqs)
        for r, seq in enumerate(seqs):
            prompt = np.zeros(512, bool)
            prompt[prompts[r]] = True
            counts = np.bincount(seq[len(prompts[r]) :], minlength=512)
            pen = _np_penalized(logits[r, len(seq) - 1], prompt, counts, *settings.values())
            seq.append(int(np.argmax(pen)))
    got = completions(out)
    assert got == [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]
    assert got != completions(greedy_out)  # the penalties changed some answers
    # Random-weight greedy decoding repeats tokens; with the penalties it repeats fewer.
    repeats = [sum(len(c) - len(set(c)) for c in rows) for rows in (completions(greedy_out), got)]
    assert repeats[1] < repeats[0]
    _, train_logps = reference([list(p) + c for p, c in zip(prompts, got, strict=True)])
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(
            out.model_logprobs[r], train_logps[r, len(p) - 1 : len(p) - 1 + N], atol=1e-5
        )

    hot = jax.device_get(sampler.generate(params, prompts, temperature=0.9, **settings))
    seqs = [list(p) + c for p, c in zip(prompts, completions(hot), strict=True)]
    logits, train_logps = reference(seqs)
    for r, p in enumerate(prompts):
        prompt = np.zeros(512, bool)
        prompt[p] = True
        for t in range(int(hot.lengths[r])):
            counts = np.bincount(seqs[r][len(p) : len(p) + t], minlength=512)
            pen = _np_penalized(logits[r, len(p) - 1 + t], prompt, counts, *settings.values())
            ref = _np_processed_logprobs(pen, 0.9, 0, 1.0)
            np.testing.assert_allclose(
                hot.sampling_logprobs[r, t], ref[seqs[r][len(p) + t]], atol=1e-4
            )
        np.testing.assert_allclose(
            hot.model_logprobs[r], train_logps[r, len(p) - 1 : len(p) - 1 + N], atol=1e-5
        )
    off = jax.device_get(sampler.generate(params, prompts))
    np.testing.assert_array_equal(off.tokens, greedy_out.tokens)
    assert compilations(sampler) == 2  # without and with penalties, whatever their values
    with pytest.raises(UserError, match="repetition_penalty"):
        sampler.generate(params, prompts, repetition_penalty=0.0)


def test_stop_sequences_end_rows_in_the_loop(setup, greedy_out):
    """A row stops with the last token of the first stop sequence its response spells (the
    prompt's tokens never count)."""
    cfg, _, params, prompts, _, _ = setup
    free = completions(greedy_out)
    sequences = [tuple(free[0][2:4]), tuple(free[3][1:2]), tuple(free[5][3:6])]
    sampler = Sampler(
        cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N), stop_sequences=sequences
    )
    out = jax.device_get(sampler.generate(params, prompts))

    def end(row):
        for j in range(len(row)):
            if any(tuple(row[max(0, j + 1 - len(q)) : j + 1]) == q for q in sequences):
                return j + 1
        return None

    for r, row in enumerate(free):
        n = end(row)
        want = (n, "stop") if n else (N, "length")
        assert (int(out.lengths[r]), FINISH_REASONS[out.finish_reasons[r]]) == want
        assert out.tokens[r, : want[0]].tolist() == row[: want[0]]
    assert int(out.num_steps) == max(end(row) or N for row in free)


def test_stop_strings_cut_rows_wherever_the_tokens_split_them():
    from jaxalign.data import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    stops = Stops(tok, [tok.eos_id], ["world", "!!"])
    for q in stops.sequences:
        assert any(t in tok.decode([*tok.encode("a"), *q]) for t in stops.strings)
    ids = tok.encode("hello world and more")
    # The loop would stop this row: its tokens of " world" are one of the sequences.
    assert any(ids[j - len(q) : j] == list(q) for q in stops.sequences for j in range(len(ids) + 1))
    n, stopped, text = stops.finish(ids, False)
    assert (stopped, text) == (True, "hello ")
    assert "world" in tok.decode(ids[:n]) and "world" not in tok.decode(ids[: n - 1])
    # Spelled one letter at a time, as the model may: still cut there.
    letters = [tok.token_id(c) for c in "world"]
    spelled = [*tok.encode("hello "), *letters, *tok.encode(" more"), tok.eos_id]
    assert stops.finish(spelled, True) == (len(tok.encode("hello ")) + 5, True, "hello ")
    # No stop string: only the stop token leaves the text; a cut length keeps the rest.
    plain = [*tok.encode("hello there"), tok.eos_id]
    assert stops.finish(plain, True) == (len(plain), True, "hello there")
    assert stops.finish(plain[:-1], False) == (len(plain) - 1, False, "hello there")
    lengths, stopped, texts = stops.finish_rows(
        np.asarray([plain, [*spelled[: len(plain)]]]), np.asarray([len(plain), 3]), [True, False]
    )
    assert lengths.tolist() == [len(plain), 3] and stopped.tolist() == [True, False]
    assert texts[0] == "hello there"


def test_sharded_generation_equals_single_device(setup, greedy_out):
    """fsdp=4 x tensor=2: rows over fsdp, KV heads over tensor, params used where they lie."""
    cfg, graphdef, params, prompts, _, _ = setup
    mesh = shd.make_mesh(make_cfg(**{"mesh.fsdp": 4, "mesh.tensor": 2}).mesh)
    rules = shd.resolve_rules(cfg.sharding)
    names = logical_axes(nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[1])
    shardings = shd.logical_to_sharding(names.to_pure_dict(), mesh, rules)
    sharded = jax.device_put(params, shardings)
    sampler = Sampler(
        cfg.model,
        SamplingConfig(temperature=0.0, max_new_tokens=N),
        mesh=mesh,
        rules=rules,
        graphdef=graphdef,
    )
    out = sampler.generate(sharded, prompts)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp") or out.tokens.sharding.spec[0] in (
        "fsdp",
        ("fsdp",),
    )
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens, greedy_out.tokens)
    np.testing.assert_allclose(out.model_logprobs, greedy_out.model_logprobs, atol=1e-5)


def test_scan_layers_equals_unrolled(setup, greedy_out):
    _, _, params, prompts, _, _ = setup
    cfg = make_cfg(**{"model.scan_layers": True})
    sampler = Sampler(cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N))
    out = jax.device_get(sampler.generate(stack_layers(params), prompts))
    np.testing.assert_array_equal(out.tokens, greedy_out.tokens)
    np.testing.assert_allclose(out.model_logprobs, greedy_out.model_logprobs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The commands, on a run directory written directly (config.yaml + a checkpoint of random
# params).


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, setup):
    _, _, params, _, _, _ = setup
    root = tmp_path_factory.mktemp("gen")
    cfg = make_cfg(
        **{
            "run_dir": str(root / "run"),
            "data.tokenizer": TOKENIZER,
            "sampling.max_new_tokens": 8,
            "sampling.max_prompt_len": 64,
        }
    )
    write_run(root / "run", cfg, params)
    prompts = root / "prompts.jsonl"
    records = [
        {"prompt": "Multiply 10 by 4.", "bonus": 1.0},
        {
            "messages": [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."},
            ],
            "bonus": 0.0,
        },
        {"prompt": "Spell cat.", "system": "Be brief.", "bonus": 2.0},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, prompts, records


@pytest.mark.slow
def test_generate_command_writes_one_greedy_record_per_prompt(run_dir, setup):
    from jaxalign.cli import main
    from jaxalign.data import load_tokenizer, render_prompt, stop_token_ids

    root, prompts, records = run_dir
    out_path = root / "out.jsonl"
    code = main(
        [
            "generate",
            "--model",
            str(root / "run"),
            "--input",
            str(prompts),
            "--output",
            str(out_path),
            "--set",
            "sampling.temperature=0",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [r["bonus"] for r in rows] == [r["bonus"] for r in records]
    # The same prompts through the Sampler directly (one row each, unsharded).
    cfg, _, params, _, _, _ = setup
    tok = load_tokenizer(TOKENIZER)
    stops = stop_token_ids(tok, "plain")
    sampler = Sampler(
        cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=8), stop_token_ids=stops
    )
    convos = [
        [{"role": "user", "content": "Multiply 10 by 4."}],
        [{"role": "user", "content": "Name a color."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Spell cat."}],
    ]
    direct = jax.device_get(sampler.generate(params, [render_prompt(c, tok) for c in convos]))
    for r, row in enumerate(rows):
        n = int(direct.lengths[r])
        reason = FINISH_REASONS[direct.finish_reasons[r]]
        ids = direct.tokens[r, : n - 1 if reason == "stop" else n]
        assert (row["num_tokens"], row["finish_reason"]) == (n, reason)
        assert row["completion"] == tok.decode(ids)

    # A stop string from inside the first completion: it ends there, without the string.
    first = rows[0]["completion"]
    assert len(first) >= 4
    cut = json.dumps([first[2:4]])
    stopped_path = root / "out_stop.jsonl"
    args = ["generate", "--model", str(root / "run"), "--input", str(prompts)]
    args += ["--output", str(stopped_path), "--set", "sampling.temperature=0"]
    assert main([*args, "--set", f"sampling.stop={cut}", "--no-progress"]) == 0
    again = [json.loads(line) for line in stopped_path.read_text().splitlines()]
    assert again[0]["completion"] == first[: first.index(first[2:4])]
    assert again[0]["finish_reason"] == "stop" and again[0]["num_tokens"] <= rows[0]["num_tokens"]
    for before, after in zip(rows[1:], again[1:], strict=True):
        if first[2:4] not in before["completion"]:
            assert after == before


def interrupt_on_chunk(monkeypatch, n: int) -> None:
    """Make the n-th chunk of generation (`generate_all` call) raise KeyboardInterrupt."""
    from jaxalign import generate as gen

    real, calls = gen.generate_all, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_all", interrupted)


def test_outputs_survive_an_interrupt_and_resume_to_the_same_files(run_dir, tmp_path, monkeypatch):
    """`jaxalign generate` and rejection sampling write chunk by chunk to OUTPUT.partial; an
    interrupt leaves the chunks done there (and an existing OUTPUT untouched); a rerun refuses
    to overwrite them, and --resume continues to the files an uninterrupted run writes
    (sampled: each row's stream is fixed by its prompt's index), dropping what the crash left
    of a chunk; a resume with smaller batches is allowed, with other sampling settings refused."""
    from jaxalign import generate as gen
    from jaxalign.partial import partial_path
    from jaxalign.rejection import rejection_sample
    from jaxalign.rewards import FunctionReward

    root, prompts, records = run_dir
    sets = ["sampling.temperature=1.0", "sampling.num_samples=2", "sampling.batch_size=2"]
    policy = gen.load_policy(root / "run", sets)
    straight = tmp_path / "straight.jsonl"
    gen.generate_file(policy, prompts, straight, progress=False, chunk_prompts=1)
    assert not partial_path(straight).exists()
    lines = straight.read_text().splitlines()
    assert len(lines) == 3 and all(len(json.loads(x)["completions"]) == 2 for x in lines)
    # The same in one chunk: chunking changes nothing.
    whole = tmp_path / "whole.jsonl"
    gen.generate_file(policy, prompts, whole, progress=False)
    assert whole.read_text() == straight.read_text()

    out = tmp_path / "out.jsonl"
    out.write_text("an earlier complete output\n")
    with monkeypatch.context() as m:
        interrupt_on_chunk(m, 3)
        with pytest.raises(KeyboardInterrupt):
            gen.generate_file(policy, prompts, out, progress=False, chunk_prompts=1)
    partial = partial_path(out)
    assert partial.read_text().splitlines() == lines[:2]
    assert out.read_text() == "an earlier complete output\n"  # not replaced by a part
    with pytest.raises(UserError, match="--resume"):
        gen.generate_file(policy, prompts, out, progress=False)
    other = gen.load_policy(root / "run", [*sets, "sampling.seed=5"])
    with pytest.raises(UserError, match="other settings"):
        gen.generate_file(other, prompts, out, progress=False, resume=True)
    with partial.open("a") as f:
        f.write('{"bonus": 2.0, "compl')  # what the crash left of the chunk in flight
    smaller = gen.load_policy(root / "run", [*sets, "sampling.batch_size=1"])  # e.g. after OOM
    assert gen.generate_file(smaller, prompts, out, progress=False, resume=True) == 3
    assert out.read_text() == straight.read_text() and not partial.exists()

    # Rejection sampling: the same, with its two files and its running statistics.
    def reward(prompts, completions, bonus, **fields):
        return [len(c) % 5 + b for c, b in zip(completions, bonus, strict=True)]

    scorer = FunctionReward(reward)
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "dpo", "sft2", "dpo2")}
    want = rejection_sample(
        policy, prompts, scorer, paths["sft"], paths["dpo"], progress=False, chunk_prompts=1
    )
    with monkeypatch.context() as m:
        interrupt_on_chunk(m, 2)
        with pytest.raises(KeyboardInterrupt):
            rejection_sample(
                policy,
                prompts,
                scorer,
                paths["sft2"],
                paths["dpo2"],
                progress=False,
                chunk_prompts=1,
            )
    assert not paths["sft2"].exists() and partial_path(paths["sft2"]).exists()
    got = rejection_sample(
        policy, prompts, scorer, paths["sft2"], paths["dpo2"], progress=False, resume=True
    )
    assert got == want and want["sft_records"] == 3
    for name in ("sft", "dpo"):
        assert paths[name + "2"].read_text() == paths[name].read_text()


@pytest.mark.slow
def test_rejection_sampling_writes_best_for_sft_and_best_worst_for_dpo(run_dir, tmp_path):
    from jaxalign.cli import main
    from jaxalign.data import read_jsonl
    from jaxalign.data.preference import to_preference
    from jaxalign.rejection import best_and_worst

    root, prompts, _ = run_dir
    reward_file = tmp_path / "reward.py"
    reward_file.write_text(
        "def reward(prompts, completions, bonus, **fields):\n"
        "    return [len(c) + b for c, b in zip(completions, bonus)]\n"
    )
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    code = main(
        [
            "rejection-sample",
            "--model",
            str(root / "run"),
            "--input",
            str(prompts),
            "--reward-fn",
            f"{reward_file}:reward",
            "--output-sft",
            str(sft),
            "--output-dpo",
            str(dpo),
            "--set",
            "sampling.num_samples=4",
            "--set",
            "sampling.temperature=1.5",
            "--no-progress",
        ]
    )
    assert code == 0
    bonus = {"Multiply 10 by 4.": 1.0, "Spell cat.": 2.0}
    best = {}
    for record in (json.loads(line) for line in sft.read_text().splitlines()):
        key = record.get("prompt") or record["messages"][0]["content"]
        text = record.get("completion") or record["messages"][-1]["content"]
        assert record["score"] == len(text) + bonus.get(key, 0.0)
        best[key] = record["score"]
    assert len(best) >= 2
    read_jsonl(str(sft))  # SFT-ready
    pairs = [json.loads(line) for line in dpo.read_text().splitlines()]
    assert pairs
    for i, pair in enumerate(pairs):
        to_preference(pair, where=f"pair {i}")  # DPO-ready
        key = pair["prompt"] if isinstance(pair["prompt"], str) else pair["prompt"][0]["content"]
        assert pair["chosen_score"] == best[key] > pair["rejected_score"]
        assert pair["rejected_score"] == len(pair["rejected"]) + bonus.get(key, 0.0)
    assert best_and_worst(np.array([1.0, 5.0, -2.0, 5.0]), np.array([True, True, True, False])) == (
        1,
        2,
    )
    assert best_and_worst(np.array([1.0, 5.0]), np.array([False, False])) is None


def test_read_prompts_reads_gzipped_jsonl_and_names_the_bad_line(run_dir, tmp_path):
    import gzip

    from jaxalign.data import load_tokenizer, render_prompt

    _, prompts, records = run_dir
    tok = load_tokenizer(TOKENIZER)
    gz = tmp_path / "prompts.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(prompts.read_text())
    got_records, messages, ids = read_prompts(gz, tok, "plain", 64)
    assert got_records == records
    assert messages[2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Spell cat."},
    ]
    assert [list(i) for i in ids] == [list(render_prompt(m, tok)) for m in messages]
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(records[0]) + "\n\n" + json.dumps({"promt": "typo"}) + "\n")
    with pytest.raises(DataError) as e:
        read_prompts(gz, tok, "plain", 64)
    assert str(e.value).startswith(f"{gz}:3: ") and "'prompt'" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"prompts\.jsonl\.gz:1: prompt has \d+ tokens"):
        read_prompts(gz, tok, "plain", 2)


def test_load_policy_restores_the_policy_of_a_ppo_run(setup, tmp_path):
    """A PPO checkpoint holds {"policy", "value"}; `load_policy` (and so `jaxalign generate`
    and the eval suite) restores the policy part."""
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.config import save_config, to_dict
    from jaxalign.generate import load_policy
    from jaxalign.models.actor_critic import ActorCritic

    cfg, _, params, _, _, _ = setup
    run = tmp_path / "ppo_run"
    ppo_cfg = make_cfg(**{"run_dir": str(run), "trainer": "ppo", "data.tokenizer": TOKENIZER})
    abstract = nnx.split(nnx.eval_shape(lambda: ActorCritic(ppo_cfg.model, nnx.Rngs(0))))[1]
    rng = np.random.default_rng(7)
    value = jax.tree.map(
        lambda x: rng.standard_normal(x.shape).astype(np.float32),
        abstract.to_pure_dict()["value"],
    )
    ckpt = Checkpointer(run / "checkpoints", keep=1, async_save=False)
    ckpt.save(3, {"params": {"policy": params, "value": value}}, {}, to_dict(ppo_cfg), force=True)
    ckpt.close()
    save_config(ppo_cfg, run / "config.yaml")
    policy = load_policy(run, ["sampling.temperature=0"])
    assert policy.cfg.trainer == "ppo" and policy.cfg.sampling.temperature == 0
    loaded = jax.device_get(policy.params)
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.device_get(params))
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.slow
def test_rejection_sampling_with_a_reward_model_writes_its_scores(run_dir, tmp_path):
    """K = 4 samples per prompt scored by a reward-model run: the written scores are that RM's
    scores of the pairs (as `jaxalign score` computes them), the SFT record is the argmax and
    the DPO pair the argmax/argmin of all K samples."""
    from jaxalign.cli import main
    from jaxalign.rewards.model import score_file

    root, prompts, records = run_dir
    rm_run = tmp_path / "rm_run"
    rm_cfg = make_cfg(
        **{
            "run_dir": str(rm_run),
            "trainer": "rm",
            "data.tokenizer": TOKENIZER,
            "train.seq_len": 128,
        }
    )
    reward_model_run(rm_run, rm_cfg, seed=11)

    k = 4
    settings = ["--set", f"sampling.num_samples={k}", "--set", "sampling.temperature=1.5"]
    sft, dpo, samples = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl", tmp_path / "all.jsonl"
    common = ["--model", str(root / "run"), "--input", str(prompts), *settings, "--no-progress"]
    outputs = ["--output-sft", str(sft), "--output-dpo", str(dpo)]
    assert main(["rejection-sample", *common, "--reward-model", str(rm_run), *outputs]) == 0
    # All K samples (same seed and sample ids, so the same completions), scored by the RM
    # through `jaxalign score`.
    assert main(["generate", *common, "--output", str(samples)]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    to_score = tmp_path / "to_score.jsonl"
    with to_score.open("w") as f:
        for record, row in zip(records, rows, strict=True):
            prompt = (
                {k_: record[k_] for k_ in ("prompt", "system") if k_ in record}
                if "prompt" in record
                else {"prompt": record["messages"][:-1]}
            )
            for c in row["completions"]:
                f.write(json.dumps({**prompt, "completion": c["completion"]}) + "\n")
    scored_path = tmp_path / "scored.jsonl"
    score_file(str(rm_run), str(to_score), str(scored_path))
    rewards = np.array(
        [json.loads(line)["reward"] for line in scored_path.read_text().splitlines()]
    ).reshape(len(records), k)
    texts = [[c["completion"] for c in row["completions"]] for row in rows]

    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    dpo_rows = [json.loads(line) for line in dpo.read_text().splitlines()]
    assert len(sft_rows) == len(records)
    pairs = iter(dpo_rows)
    for i, sft_row in enumerate(sft_rows):
        eligible = np.array([bool(t.strip()) for t in texts[i]])
        best = int(np.argmax(np.where(eligible, rewards[i], -np.inf)))
        worst = int(np.argmin(np.where(eligible, rewards[i], np.inf)))
        completion = sft_row.get("completion") or sft_row["messages"][-1]["content"]
        assert completion == texts[i][best]
        np.testing.assert_allclose(sft_row["score"], rewards[i, best], rtol=1e-5, atol=1e-5)
        if rewards[i, best] > rewards[i, worst]:
            pair = next(pairs)
            assert (pair["chosen"], pair["rejected"]) == (texts[i][best], texts[i][worst])
            np.testing.assert_allclose(
                [pair["chosen_score"], pair["rejected_score"]],
                [rewards[i, best], rewards[i, worst]],
                rtol=1e-5,
                atol=1e-5,
            )
    assert next(pairs, None) is None
    assert len(set(rewards.ravel().round(6))) > len(records)  # the scores really differ
