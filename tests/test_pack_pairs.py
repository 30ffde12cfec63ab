"""Packed preference pairs (`preference.pack_pairs`): the same pairs, losses and gradients as
padded pairs, with chosen and rejected of a pair always in one row."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_rm_dpo import TINY, dpo_first_step, pref_config

from jaxalign.data import PreferenceBatchIterator, load_tokenizer
from jaxalign.data.preference import assign_rows, padding_fraction
from jaxalign.errors import DataError
from jaxalign.losses import segment_logprobs
from jaxalign.models.reward import RewardModel
from jaxalign.trainers.dpo import DPO, policy_statistics
from jaxalign.trainers.rm import RewardModelAlgorithm

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TINY / "tokenizer.model"))


def iterator(tok, pack: bool, **kwargs) -> PreferenceBatchIterator:
    options = {"seq_len": SEQ_LEN, "global_batch_size": 16, "grad_accum": 2, "seed": 3}
    return PreferenceBatchIterator(
        str(TINY / "pref_train.jsonl"), tok, pack_pairs=pack, **{**options, **kwargs}
    )


def by_pair(values: np.ndarray, index: np.ndarray) -> dict[int, np.ndarray]:
    """Per-pair values [..., slots, ...] keyed by the pair's position in `examples`."""
    flat = index.reshape(-1)
    values = np.asarray(values).reshape(len(flat), -1)
    return {int(i): values[n] for n, i in enumerate(flat) if i >= 0}


def micro(batch: dict, a: int = 0) -> dict:
    return {k: v[a] for k, v in batch.items()}


# -- the layout --------------------------------------------------------------------------------


def test_packing_keeps_every_batch_s_pairs_and_never_splits_a_pair(tok):
    padded, packed = iterator(tok, False), iterator(tok, True)
    assert packed.row_len == 2 * SEQ_LEN
    fractions = []
    for _ in range(4):
        want, got = next(padded), next(packed)
        fractions.append((padding_fraction(want), padding_fraction(got)))
        assert sorted(padded._last_index.ravel().tolist()) == sorted(
            packed._last_index[packed._last_index >= 0].tolist()
        )
        tokens, segments = got["tokens"], got["segment_ids"]
        for (a, r, k), i in np.ndenumerate(packed._last_index):
            if i < 0:
                assert got["pair_mask"][a, r, k] == 0
                continue
            example = packed.examples[i]
            assert got["margin"][a, r, k] == example["margin"]
            for side in range(2):
                where = np.flatnonzero(segments[a, r] == 2 * k + 1 + side)
                ids, mask = example["ids"][side], example["masks"][side]
                # One contiguous segment in row r: the whole sequence, positions from 0.
                np.testing.assert_array_equal(where, where[0] + np.arange(len(ids)))
                np.testing.assert_array_equal(tokens[a, r, where], ids)
                np.testing.assert_array_equal(got["positions"][a, r, where], np.arange(len(ids)))
                np.testing.assert_array_equal(got["loss_mask"][a, r, where][1:], mask[1:])
                assert got["loss_mask"][a, r, where[0]] == 0
        assert np.count_nonzero(got["segment_ids"]) == np.count_nonzero(want["segment_ids"])
    assert all(after < before for before, after in fractions)


def test_assign_rows_is_first_fit_decreasing_and_rejects_a_pair_longer_than_the_row():
    assert assign_rows([5, 9, 4, 6, 3], row_len=10, max_per_row=2) == [[1], [3, 2], [0, 4]]
    assert assign_rows([5, 5, 5], row_len=10, max_per_row=1) == [[0], [1], [2]]
    with pytest.raises(DataError, match="pair of 11 tokens does not fit a packed row of 10"):
        assign_rows([3, 11], row_len=10, max_per_row=4)


def test_pairs_at_the_length_limit_pack_like_today(tmp_path, tok):
    """too_long applies unchanged: a truncated pair as long as two padded rows fills a row."""
    record = {"prompt": "say " * 30, "chosen": "yes " * 40, "rejected": "no " * 50}
    path = tmp_path / "long.jsonl"
    short = {"prompt": "hi", "chosen": "ok", "rejected": "no"}
    path.write_text(json.dumps(record) + "\n" + json.dumps(short) + "\n")
    kwargs = {
        "seq_len": 32,
        "global_batch_size": 2,
        "shuffle": False,
        "too_long": "truncate",
        "shards": 1,
    }
    padded = PreferenceBatchIterator(str(path), tok, **kwargs)
    packed = PreferenceBatchIterator(str(path), tok, pack_pairs=True, **kwargs)
    assert padded.stats == packed.stats and packed.stats["truncated"] == 1
    want, got = next(padded), next(packed)
    assert got["tokens"].shape == (1, 2, 64)  # the 64-token pair fills its own row
    assert np.count_nonzero(got["segment_ids"]) == np.count_nonzero(want["segment_ids"])
    dropped = PreferenceBatchIterator(
        str(path), tok, pack_pairs=True, **{**kwargs, "too_long": "drop"}
    )
    assert dropped.stats["dropped"] == 1 and dropped.stats["pairs"] == 1


def test_packed_iterator_resumes_exactly_with_reference_logps(tok):
    def make():
        it = iterator(tok, True)
        it.set_reference_logps(np.arange(2 * len(it.examples), dtype=np.float32).reshape(-1, 2))
        return it

    first = make()
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(2)]
    first_pairs = first._last_index  # of the last batch
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        index = resumed._last_index
        np.testing.assert_array_equal(
            got["ref_logps"][index >= 0], 2 * index[index >= 0, None] + np.arange(2)
        )
    # Packing changes the rows, not the pairs: a padded run's state resumes a packed one.
    padded = iterator(tok, False)
    padded.set_state(state)
    next(padded)
    next(padded)
    assert sorted(padded._last_index.ravel().tolist()) == sorted(
        first_pairs[first_pairs >= 0].tolist()
    )


def test_packed_rows_divide_over_the_batch_mesh_axes(tok):
    it = iterator(tok, True, global_batch_size=32, grad_accum=1)
    it.row_multiple = 8
    for _ in range(3):
        assert next(it)["tokens"].shape[1] % 8 == 0


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("soft_cap", [None, 2.0])  # 2.0: Gemma 2/3's final logit soft-cap
def test_segment_logprobs_match_float64_reference(soft_cap):
    rng = np.random.default_rng(0)
    b, t, d, v, segments = 2, 12, 8, 16, 4
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w_out = rng.normal(size=(d, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    segment_ids = np.array([[1] * 3 + [2] * 4 + [3] * 3 + [0] * 2, [1] * 5 + [4] * 7], np.int32)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    logps, counts = segment_logprobs(
        jnp.asarray(hidden),
        jnp.asarray(w_out),
        tokens,
        mask,
        segment_ids,
        segments,
        chunks=3,
        soft_cap=soft_cap,
    )
    logits = hidden.astype(np.float64) @ w_out.astype(np.float64)
    if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want, want_counts = np.zeros((b, segments)), np.zeros((b, segments))
    for row in range(b):
        for pos in range(1, t):
            s = segment_ids[row, pos]
            if s and mask[row, pos]:
                want[row, s - 1] += log_softmax[row, pos - 1, tokens[row, pos]]
                want_counts[row, s - 1] += 1
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), want_counts)


def loss_and_grads(algo, params, graphdef, batch, frozen=None):
    def objective(p):
        loss, pairs, metrics = algo.loss_fn(nnx.merge(graphdef, p), batch, None, frozen)
        return loss, (pairs, metrics)

    (loss, (pairs, metrics)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return float(loss), float(pairs), jax.tree.map(float, metrics), grads


def assert_same_grads(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def batches(tok):
    padded, packed = iterator(tok, False), iterator(tok, True)
    want, got = micro(next(padded)), micro(next(packed))
    # A filler pair (pair_mask 0) in both layouts: it must count in neither.
    last = int(padded._last_index[0, -1])
    want["pair_mask"][-1] = 0.0
    got["pair_mask"][packed._last_index[0] == last] = 0.0
    return want, got, padded._last_index[0], packed._last_index[0]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_dpo_losses_and_gradients_equal_padded(tmp_path, batches, loss_type):
    want, got, want_index, got_index = batches
    cfg = pref_config(tmp_path, "dpo", **{"dpo.loss_type": loss_type, "dpo.rpo_alpha": 0.5})
    algo = DPO(cfg)
    graphdef, params = nnx.split(algo.make_model(cfg, nnx.Rngs(0)))
    reference = {"reference": nnx.split(algo.make_model(cfg, nnx.Rngs(1)))[1]}
    frozen = None if algo.reference_free else reference
    stats = jax.jit(lambda p, b: policy_statistics(nnx.merge(graphdef, p), b))
    padded_stats, packed_stats = stats(params, want), stats(params, got)
    for key in ("logps", "lengths", "mean_logits"):
        a, b = by_pair(padded_stats[key], want_index), by_pair(packed_stats[key], got_index)
        assert a.keys() == b.keys()
        np.testing.assert_allclose(
            np.stack([b[i] for i in a]), np.stack(list(a.values())), rtol=1e-5, atol=1e-5
        )
    padded_out = loss_and_grads(algo, params, graphdef, want, frozen)
    packed_out = loss_and_grads(algo, params, graphdef, got, frozen)
    np.testing.assert_allclose(packed_out[0], padded_out[0], rtol=1e-5)
    assert packed_out[1] == padded_out[1] == float(want["pair_mask"].sum())
    for name, value in padded_out[2].items():
        np.testing.assert_allclose(packed_out[2][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert_same_grads(packed_out[3], padded_out[3])

    # The summed loss against a float64 reference from the per-pair log-probs.
    real = want["pair_mask"] > 0
    logps = np.asarray(padded_stats["logps"], np.float64)[real]
    lengths = np.asarray(padded_stats["lengths"], np.float64)[real]
    avg = logps / lengths
    beta = cfg.dpo.beta
    if loss_type == "simpo":
        z = beta * (avg[:, 0] - avg[:, 1]) - cfg.dpo.simpo_gamma
        losses = -log_sigmoid(z)
    else:
        ref = np.asarray(stats(reference["reference"], want)["logps"], np.float64)[real]
        if loss_type == "ipo":
            d = (avg[:, 0] - avg[:, 1]) - (ref[:, 0] / lengths[:, 0] - ref[:, 1] / lengths[:, 1])
            losses = (d - 1 / (2 * beta)) ** 2
        else:
            d = (logps[:, 0] - logps[:, 1]) - (ref[:, 0] - ref[:, 1])
            losses = -log_sigmoid(beta * d)
    losses = losses + 0.5 * -avg[:, 0]
    np.testing.assert_allclose(packed_out[0], losses.sum(), rtol=1e-5)


def test_packed_reward_model_losses_and_gradients_equal_padded(tmp_path, batches):
    want, got, want_index, got_index = batches
    cfg = pref_config(tmp_path, "rm", **{"rm.center_coef": 0.1})
    algo = RewardModelAlgorithm(cfg)
    graphdef, params = nnx.split(RewardModel(cfg.model, nnx.Rngs(2)))
    margins = np.linspace(0, 1, want["margin"].size).astype(np.float32)
    want = {**want, "margin": margins}
    got = {**got, "margin": np.zeros_like(got["margin"])}
    for n, i in enumerate(want_index):
        got["margin"][got_index == i] = margins[n]
    rewards = jax.jit(lambda p, b: algo.pair_rewards(nnx.merge(graphdef, p), b))
    a, b = by_pair(rewards(params, want), want_index), by_pair(rewards(params, got), got_index)
    np.testing.assert_allclose(
        np.stack([b[i] for i in a]), np.stack(list(a.values())), rtol=1e-5, atol=1e-5
    )
    padded_out = loss_and_grads(algo, params, graphdef, want)
    packed_out = loss_and_grads(algo, params, graphdef, got)
    for name, value in padded_out[2].items():
        np.testing.assert_allclose(packed_out[2][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert_same_grads(packed_out[3], padded_out[3])
    real = want["pair_mask"] > 0
    r = np.asarray(rewards(params, want), np.float64)[real]
    m = margins[real].astype(np.float64)
    expected = np.sum(-log_sigmoid(r[:, 0] - r[:, 1] - m) + 0.1 * (r[:, 0] + r[:, 1]) ** 2)
    np.testing.assert_allclose(packed_out[0], expected, rtol=1e-5)
    np.testing.assert_allclose(padded_out[0], expected, rtol=1e-5)


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_packed_dpo_run_with_precomputed_reference(tmp_path, tok):
    """A packed DPO step through the loop on 2 devices, reference log-probs precomputed: the
    policy starts equal to the reference (loss log 2), the step moves it, and tokens/s counts
    the real tokens of the packed batch."""
    options = {"mesh.fsdp": 2, "dpo.precompute_ref": True, "preference.pack_pairs": True}
    before, after = dpo_first_step(tmp_path, **options)
    np.testing.assert_allclose(before["loss"], np.log(2.0), atol=1e-5)
    assert abs(before["rewards/margins"]) < 1e-4
    assert after["rewards/margins"] > before["rewards/margins"] + 1e-3
    assert after["loss_sum"] < np.log(2.0)
    cfg = pref_config(tmp_path, "dpo", **options)
    first = next(DPO(cfg).train_data(0, 1))
    assert first["tokens"].shape[1] % 2 == 0  # the rows divide over the 2 devices
    np.testing.assert_allclose(
        before["tokens_per_s"] * before["step_time_s"],
        np.count_nonzero(first["segment_ids"]),
        rtol=1e-6,
    )
