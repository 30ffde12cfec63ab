"""Continuous batching (jaxalign/continuous.py): the same rows, token for token, as the static
sampler for any number and order of slots, greedy and sampled; a GRPO group's shared prompt
prefill equals separate prefills; log-probs equal the trainer's forward; sharded equals single
device; the multi-turn episode runner on it plays the same episodes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_generate import MODEL, WEIGHT_STD, completions, setup  # noqa: F401  (a fixture)

from jaxalign import sharding as shd
from jaxalign.config import SamplingConfig
from jaxalign.continuous import ContinuousSampler
from jaxalign.generate import Sampler, left_pad

N = 10
STOPS = (7, 11, 40, 99, 123, 200, 301, 333, 411, 500)  # frequent enough to end rows early


def samplers(cfg, sampling, slots, **kw):
    static = Sampler(cfg.model, sampling, stop_token_ids=STOPS, **kw)
    cont = ContinuousSampler(
        cfg.model, sampling, slots=slots, max_prompt_len=32, max_group=2, stop_token_ids=STOPS,
        **kw,
    )
    return static, cont


def rows(out):
    n = np.asarray(out.lengths)
    return [np.asarray(out.tokens)[r, : n[r]].tolist() for r in range(len(n))]


@pytest.fixture(scope="module")
def padded(setup):  # noqa: F811
    prompts = setup[3]
    tokens, lengths = left_pad(prompts, 32, 0)
    return tokens, lengths, np.arange(100, 100 + len(prompts), dtype=np.int32)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_continuous_equals_static_for_any_slot_count_and_order(setup, padded, temperature):  # noqa: F811
    cfg, _, params, _, _, _ = setup
    tokens, lengths, ids = padded
    sampling = SamplingConfig(temperature=temperature, top_k=50, max_new_tokens=N, seed=5)
    static, cont = samplers(cfg, sampling, slots=3)
    ref = jax.device_get(static.generate_padded(params, tokens, lengths, ids))
    assert len(set(ref.lengths.tolist())) > 2  # rows end at different lengths
    out = cont.generate_rows(params, tokens, lengths, ids)
    assert rows(out) == rows(ref)
    np.testing.assert_array_equal(out.finish_reasons, ref.finish_reasons)
    np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs, atol=2e-5)
    np.testing.assert_allclose(out.sampling_logprobs, ref.sampling_logprobs, atol=2e-5)
    # Another slot count, and the rows in reverse order (other slots, other batch-mates).
    other = ContinuousSampler(
        cfg.model, sampling, slots=5, max_prompt_len=32, stop_token_ids=STOPS
    ).generate_rows(params, tokens[::-1], lengths[::-1], ids[::-1])
    assert rows(other)[::-1] == rows(ref)
