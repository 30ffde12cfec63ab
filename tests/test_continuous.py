"""Continuous batching (jaxalign/continuous.py): the same rows, token for token, as the static
sampler for any number and order of slots, greedy and sampled; a GRPO group's shared prompt
prefill equals separate prefills; log-probs equal the trainer's forward; sharded equals single
device; the multi-turn episode runner on it plays the same episodes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_episodes import ECHO_ENV, episode_config
from test_generate import make_cfg, setup  # noqa: F401  (a fixture)
from toy import random_params

from jaxalign import sharding as shd
from jaxalign.config import SamplingConfig
from jaxalign.continuous import ContinuousSampler
from jaxalign.data import load_tokenizer
from jaxalign.generate import Sampler, Stops, left_pad
from jaxalign.models.llama import Transformer, logical_axes
from jaxalign.trainers.episodes import EpisodeRunner, read_episode_records

N = 10
STOPS = (7, 11, 40, 99, 123, 200, 301, 333, 411, 500)  # frequent enough to end rows early


@pytest.fixture(scope="module")
def samplers(setup):  # noqa: F811
    """The static sampler, a continuous one over 3 slots, and one over 8 slots sharded over an
    8-device mesh (the settings and seed are run-time inputs: one compilation serves every
    test)."""
    cfg, graphdef = setup[:2]
    sampling = SamplingConfig(top_k=50, max_new_tokens=N, seed=5)
    static = Sampler(cfg.model, sampling, stop_token_ids=STOPS)
    common = {"max_prompt_len": 16, "max_group": 2, "stop_token_ids": STOPS}
    three = ContinuousSampler(cfg.model, sampling, slots=3, **common)
    mesh = shd.make_mesh(make_cfg(**{"mesh.fsdp": 4, "mesh.tensor": 2}).mesh)
    rules = shd.resolve_rules(cfg.sharding)
    sharded = ContinuousSampler(
        cfg.model, sampling, slots=8, mesh=mesh, rules=rules, graphdef=graphdef, **common
    )
    return static, three, sharded


def rows(out):
    n = np.asarray(out.lengths)
    return [np.asarray(out.tokens)[r, : n[r]].tolist() for r in range(len(n))]


@pytest.fixture(scope="module")
def padded(setup):  # noqa: F811
    # 8 prompts of one bucket (16): the group test's 4 x 2 rows have the same shape (fewer
    # compilations).
    prompts = [p[:16] for p in setup[3]]
    tokens, lengths = left_pad(prompts, 16, 0)
    return tokens, lengths, np.arange(100, 100 + len(prompts), dtype=np.int32)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_continuous_equals_static_for_any_slot_count_and_order(
    setup,  # noqa: F811
    samplers,
    padded,
    temperature,
):
    """3 slots, and 8 slots sharded over fsdp 4 x tensor 2 with the rows in reverse order
    (other slots, other slot-mates): the static sampler's rows token for token."""
    cfg, graphdef, params = setup[:3]
    tokens, lengths, ids = padded
    static, three, sharded = samplers
    ref = jax.device_get(
        static.generate_padded(params, tokens, lengths, ids, temperature=temperature)
    )
    assert len(set(ref.lengths.tolist())) > 2  # rows end at different lengths
    out = three.generate_rows(params, tokens, lengths, ids, temperature=temperature)
    assert rows(out) == rows(ref)
    np.testing.assert_array_equal(out.finish_reasons, ref.finish_reasons)
    np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs, atol=1e-5)
    np.testing.assert_allclose(out.sampling_logprobs, ref.sampling_logprobs, atol=1e-5)

    names = logical_axes(nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[1])
    shardings = shd.logical_to_sharding(names.to_pure_dict(), sharded.mesh, sharded.rules)
    flip = slice(None, None, -1)
    other = sharded.generate_rows(
        jax.device_put(params, shardings),
        tokens[flip],
        lengths[flip],
        ids[flip],
        temperature=temperature,
    )
    assert rows(other)[flip] == rows(ref)
    np.testing.assert_allclose(other.model_logprobs[flip], ref.model_logprobs, atol=1e-5)
    spec = sharded.session(params).state["cache"][0]["k"].sharding.spec
    assert "fsdp" in jax.tree.leaves(spec[0]) and spec[1] == "tensor"


def test_shared_group_prefill_equals_separate_prefills_and_the_trainers_logprobs(
    setup,  # noqa: F811
    samplers,
    padded,
):
    """A GRPO group (2 samples of one prompt, prefilled once and copied into 2 slots) samples
    what 2 separately prefilled rows with the same streams sample, and every sampled token's
    log-prob equals the training forward's within 1e-5."""
    _, _, params, _, reference, _ = setup
    static, three, _ = samplers
    tokens, lengths, _ = padded
    tokens, lengths = np.repeat(tokens[:4], 2, axis=0), np.repeat(lengths[:4], 2)
    ids = np.arange(8, dtype=np.int32)
    settings = {"temperature": 1.0, "top_k": 0, "seed": 9}
    grouped = three.generate_rows(params, tokens, lengths, ids, group=2, **settings)
    separate = three.generate_rows(params, tokens, lengths, ids, group=1, **settings)
    assert rows(grouped) == rows(separate)
    assert rows(grouped)[0] != rows(grouped)[1]  # a group's samples differ
    np.testing.assert_allclose(grouped.model_logprobs, separate.model_logprobs, atol=1e-5)
    ref = jax.device_get(static.generate_padded(params, tokens, lengths, ids, **settings))
    assert rows(grouped) == rows(ref)
    firsts = [tokens[r, 16 - lengths[r] :].tolist() for r in range(8)]
    seqs = [firsts[r] + row for r, row in enumerate(rows(grouped))]
    _, train_logps = reference(seqs)
    for r, row in enumerate(rows(grouped)):
        start = len(firsts[r]) - 1
        np.testing.assert_allclose(
            grouped.model_logprobs[r, : len(row)],
            train_logps[r, start : start + len(row)],
            atol=1e-5,
            rtol=0,
        )


def test_episodes_on_continuous_batching_are_the_static_samplers_episodes(tmp_path):
    """Multi-turn Echo episodes (tests/test_episodes.py) whose turns end at many stop tokens,
    so episodes wait for their tool at different times: on 3 slots shared by 4 episodes they
    are the static sampler's episodes token for token, with the same masks, log-probs and
    rewards."""
    (tmp_path / "echo_env.py").write_text(ECHO_ENV)
    cfg = episode_config(tmp_path, **{"rl.environment": f"{tmp_path / 'echo_env.py'}:Echo"})
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stops = Stops(tokenizer, range(3, 512, 4))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    params = jax.device_put(random_params(state, 1, 0.25))
    turn = dataclasses.replace(cfg.sampling, max_new_tokens=cfg.rl.turn_tokens)
    common = {"stop_token_ids": stops.token_ids, "pad_id": tokenizer.pad_id, "graphdef": graphdef}
    continuous = ContinuousSampler(cfg.model, turn, slots=3, max_prompt_len=160 + 24, **common)
    records, row_ids = read_episode_records(
        cfg.data.train_file, tokenizer, cfg.data.template, limit=4
    )
    played = []
    for sampler in (Sampler(cfg.model, turn, **common), continuous):
        runner = EpisodeRunner(cfg, tokenizer, stops, sampler, None)
        episodes, width = runner.start(records, row_ids, cfg.data.prompt_buckets)
        runner.run(episodes, width, params, np.arange(7, 11, dtype=np.int32), 1, {})
        played.append(episodes)
    static, cont = played
    assert len({(e.turns, len(e.tokens)) for e in static}) > 1  # episodes of different shapes
    assert max(e.turns for e in static) > 1
    for a, b in zip(static, cont, strict=True):
        assert (a.tokens, a.mask, a.turns, a.reward) == (b.tokens, b.mask, b.turns, b.reward)
        assert (a.turn_limit, a.token_limit) == (b.turn_limit, b.token_limit)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
