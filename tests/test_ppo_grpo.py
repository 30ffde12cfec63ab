"""PPO, GRPO and RLOO through the one loop: rollout/training log-prob parity (ratio 1 on the first
minibatch), the logged metrics, exact resume at a rollout boundary, and config checks."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import TINY_MODEL, reward_model_run

from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.generate import Sampler
from jaxalign.trainers import make_algorithm
from jaxalign.trainers import rollout as rollout_mod
from jaxalign.trainers import rollout_engine as engine_mod
from jaxalign.trainers.loop import Trainer
from jaxalign.trainers.rl_rows import (
    pack_plan,
    response_buckets,
    response_logprobs,
    response_width,
)
from jaxalign.trainers.rollout_engine import RolloutEngine, join_rounds, select_groups

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"
REQUIRED_METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/rlhf_reward",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "kl_coef",
    "rollout/response_length",
    "rollout/eos_fraction",
    "time/generate",
    "time/score",
    "time/forward",
    "time/advantages",
)
PPO_METRICS = ("loss/value", "val/clipfrac", "val/explained_var")


def rl_config(tmp_path, trainer="ppo", **overrides):
    sets = {
        "trainer": trainer,
        "run_dir": str(tmp_path / "run"),
        "data.train_file": str(DATA / "rl_prompts_train.jsonl"),
        "data.tokenizer": str(DATA / "tokenizer.model"),
        "data.prompt_buckets": "[32]",
        "sampling.max_new_tokens": 8,
        "sampling.max_prompt_len": 32,
        "sampling.batch_size": 8,
        "rl.prompts_per_rollout": 8,
        "rl.num_generations": 2,
        "rl.epochs": 1,
        "rl.reward_functions": '["jaxalign.rewards:shaped_answer"]',
        # One compiled program per rollout shape (tests/test_continuous.py checks continuous
        # batching against it; test_first_minibatch_ratio_is_one runs it in the engine).
        "rl.sampler": "static",
        "train.steps": 2,
        "train.batch_size": 8,
        "train.seq_len": 40,
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.progress": False,
        "train.peak_flops_per_device": 1e9,
        "checkpoint.every": 0,
        "logging.tensorboard": False,
        **overrides,
    }
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}  # compiles faster
    return load_config(None, [f"{k}={v}" for k, v in sets.items()], base=base)


def start(cfg):
    algo = make_algorithm(cfg)
    trainer = Trainer(cfg, algo)
    init = getattr(algo, "initial_params", lambda t: None)(trainer)
    return algo, trainer, init


@pytest.fixture
def rollouts(monkeypatch) -> list:
    """Every `RolloutResult` the test's rollout engines return, in order (a test-side hook on
    `RolloutEngine.rollout`)."""
    results = []
    real = RolloutEngine.rollout

    def rollout(self, *args, **kwargs):
        results.append(real(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(RolloutEngine, "rollout", rollout)
    return results


def rollout_data(cfg):
    """The algorithm, trainer, a fresh train state and the RL data iterator watching it."""
    algo, trainer, init = start(cfg)
    params = init if init is not None else trainer.initial_params()
    algo.frozen_params(trainer, params)
    state = trainer.fresh_state(params)
    data = algo.train_data(0, 1)
    data.start(trainer)
    data.observe_state(state)
    return algo, trainer, state, data


@pytest.mark.parametrize("trainer_name", ["ppo", "rloo", "reinforce_pp"])
def test_first_minibatch_ratio_is_one(tmp_path, trainer_name):
    """Old log-probs straight from the sampler (KV-cache decoding, continuous batching with
    each group's prompt prefilled once) equal the training forward's on the first minibatch of
    a fresh rollout: ratio 1 and approxkl 0 up to 1e-6."""
    sets = {"rl.old_logprobs": "sampler", "rl.sampler": "continuous"}
    cfg = rl_config(tmp_path, trainer_name, **sets)
    algo, trainer, state, data = rollout_data(cfg)
    local = next(data)
    micro = {k: v[0] for k, v in local.items()}

    @jax.jit
    def check(params, batch):
        model = nnx.merge(trainer.graphdef, params)
        logp, _ = response_logprobs(algo.policy_module(model), batch, 1.0)
        loss, denom, metrics = algo.loss_fn(model, batch, jax.random.PRNGKey(0))
        return logp, {k: v / denom for k, v in metrics.items()}

    logp, metrics = jax.device_get(check(state["params"], micro))
    mask = micro["mask"] > 0
    assert mask.sum() > 20
    ratio = np.exp(logp - micro["old_logprobs"])[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-6, rtol=0)
    assert abs(metrics["policy/ratio"] - 1.0) < 1e-6
    assert metrics["policy/approxkl"] < 1e-6 and metrics["policy/clipfrac"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("critic_warmup", [0, 2])
def test_ppo_resume_at_rollout_boundary_reproduces_uninterrupted_run(tmp_path, critic_warmup):
    """Two rollouts (2 steps each) straight through, or stopped after the first rollout and
    resumed: same losses and metrics (policy, value, both optimizer states, the adaptive KL
    coefficient and the prompt iterator are restored). With train.critic_warmup_steps 2 the
    first rollout trains the value model alone (the policy in the step-2 checkpoint is the
    initial one, the logged lr 0) and the resumed run starts the policy's optimizer."""
    overrides = {"train.steps": 4, "rl.kl_target": 0.5, "rl.kl_horizon": 100, "rl.kl_coef": 0.1}
    overrides["train.critic_warmup_steps"] = critic_warmup
    cfg = rl_config(tmp_path / "straight", **overrides)
    algo, trainer, init = start(cfg)
    initial_policy = jax.device_get(init["policy"])
    straight = trainer.run(init_params=init).history
    lrs = [h["lr"] for h in straight]
    assert (lrs[:2] == [0.0, 0.0]) == bool(critic_warmup) and lrs[2] > 0
    for record in straight:
        if "objective/kl" in record:
            for key in REQUIRED_METRICS + PPO_METRICS:
                assert np.isfinite(record[key]), key
    assert straight[0]["policy/approxkl"] < 1e-6
    assert "time/train" in straight[2] and straight[2]["kl_coef"] != 0.1  # adaptive

    def interrupted_cfg():
        return rl_config(tmp_path / "resumed", **overrides, **{"checkpoint.every": 2})

    algo, trainer, init = start(interrupted_cfg())
    original = algo.train_data

    def crash_in_second_rollout(*args):
        data = original(*args)
        next_fn = data._rollout

        def rollout():
            if data.rollouts == 1:
                raise RuntimeError("simulated crash")
            next_fn()

        data._rollout = rollout
        return data

    algo.train_data = crash_in_second_rollout
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run(init_params=init)
    if critic_warmup:
        from jaxalign.checkpoint import load_params

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init)
        saved = load_params(tmp_path / "resumed" / "run" / "checkpoints" / "2", target)
        for a, b in zip(jax.tree.leaves(saved["policy"]), jax.tree.leaves(initial_policy)):
            np.testing.assert_array_equal(np.asarray(a), b)
    algo, trainer, init = start(interrupted_cfg())
    resumed = trainer.run(init_params=init).history
    assert [h["step"] for h in resumed] == [3, 4]
    for got, want in zip(resumed, straight[2:], strict=True):
        for key in ("loss", "loss/policy", "loss/value", "kl_coef", "objective/scores"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_grpo_logs_its_metrics_and_group_advantages(tmp_path, rollouts):
    trainer_name = "grpo"
    cfg = rl_config(
        tmp_path, trainer_name, **{"rl.num_generations": 4, "rl.prompts_per_rollout": 4}
    )
    algo, trainer, init = start(cfg)
    history = trainer.run(init_params=init).history
    assert history[0]["policy/approxkl"] < 1e-6
    for key in REQUIRED_METRICS + ("loss/kl", "rollout/group_score_std"):
        assert np.isfinite(history[0][key]), key
    buffer = rollouts[-1].buffer
    scores = rollouts[-1].scores.reshape(-1, 4)
    adv = buffer["advantages"][:, 0].reshape(-1, 4)
    centered = scores - scores.mean(1, keepdims=True)
    np.testing.assert_allclose(adv, centered / (scores.std(1, keepdims=True) + 1e-4), atol=1e-4)


def test_rl_config_errors_name_the_keys(tmp_path):
    with pytest.raises(ConfigError, match="train.steps .* multiple"):
        make_algorithm(rl_config(tmp_path, **{"train.steps": 3}))
    with pytest.raises(ConfigError, match="train.seq_len must be .* = 40"):
        make_algorithm(rl_config(tmp_path, **{"train.seq_len": 64}))
    with pytest.raises(ConfigError, match="group size"):
        make_algorithm(
            rl_config(tmp_path, "grpo", **{"rl.num_generations": 1, "rl.prompts_per_rollout": 8})
        )
    with pytest.raises(ConfigError, match="checkpoint.every"):
        make_algorithm(rl_config(tmp_path, **{"checkpoint.every": 3, "train.steps": 4}))
    with pytest.raises(ConfigError, match="rl.response_buckets must be positive"):
        make_algorithm(rl_config(tmp_path, **{"rl.response_buckets": "[0, 4]"}))
    with pytest.raises(ConfigError, match=r"rl.clip_eps_high \(0.1\) must be >= rl.clip_eps"):
        make_algorithm(rl_config(tmp_path, "grpo", **{"rl.clip_eps_high": 0.1}))
    with pytest.raises(ConfigError, match="rl.kl_target .* is for ppo and reinforce_pp"):
        make_algorithm(rl_config(tmp_path, "rloo", **{"rl.kl_target": 6.0}))
    with pytest.raises(ConfigError, match="sequence .GSPO. is for grpo and rloo"):
        make_algorithm(rl_config(tmp_path, **{"rl.importance_sampling": "sequence"}))


def test_exact_answer_reward():
    from jaxalign.rewards import exact_answer, shaped_answer

    got = exact_answer(
        ["p"] * 3, ["The answer is 5.", " 12 ", "x"], answer=["The answer is 5.", "12", "y"]
    )
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0])
    got = shaped_answer(["p"] * 2, ["The answer is 7", "9"], answer=["The answer is 7.", "8"])
    np.testing.assert_array_equal(got, [0.2, 0.0])
    assert jnp.asarray(got).shape == (2,)


def test_family_scores_are_per_family_means():
    from jaxalign.trainers.scoring import family_scores

    records = [
        {"family": "json"},
        {"family": "arithmetic"},
        {"family": "json"},
        {"family": "arithmetic"},
        {"family": "json"},
    ]
    got = family_scores(records, np.asarray([1.0, 0.0, 0.0, 1.0, 1.0]))
    assert got == {"rollout/score/arithmetic": 0.5, "rollout/score/json": pytest.approx(2 / 3)}
    assert family_scores([{"answer": "1"}, {"family": "json"}], np.zeros(2)) == {}


@pytest.mark.slow
def test_ppo_value_lr_moves_the_value_model_at_its_own_rate(tmp_path):
    """train.value_lr through the trainer (sharded optimizer state): AdamW's first step moves a
    parameter by lr * |g| / (|g| + eps), so the largest change is the learning rate itself:
    train.lr for the policy, train.value_lr for the value model."""
    cfg = rl_config(
        tmp_path,
        **{
            "train.value_lr": 1e-2,
            "train.weight_decay": 0.0,
            "train.lr": 1e-4,
            "rl.missing_eos_penalty": 1.0,
            "rl.entropy_coef": 0.01,
        },
    )  # nonzero gradients for both
    algo, trainer, init = start(cfg)
    algo.frozen_params(trainer, init)
    before = jax.device_get(init)
    state = trainer.fresh_state(init)
    data = algo.train_data(0, 1)
    data.start(trainer)
    data.observe_state(state)
    batch = next(data)
    trainer.frozen = None
    step = trainer.compile_step(batch)
    state, metrics = step(state, batch, None)
    after = jax.device_get(state["params"])

    def largest_change(role):
        return max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(
                jax.tree.leaves(after[role]), jax.tree.leaves(before[role]), strict=True
            )
        )

    assert largest_change("policy") == pytest.approx(1e-4, rel=1e-3)
    assert largest_change("value") == pytest.approx(1e-2, rel=1e-3)
    assert float(metrics["lr"]) == pytest.approx(1e-4)


def test_rollout_forward_in_chunks_equals_one_forward(tmp_path, monkeypatch, rollouts):
    """rl.forward_batch_size: the log-prob / value forwards after generation, run 8 rows at a
    time on the 8-device mesh, give the rollout buffer of one forward over all 16 rows, also
    when each chunk is packed (rl.pack_rows; responses cut short so that sequences share rows)."""
    short_responses(monkeypatch, [3, 3, 3])
    plans = []
    real_plan = rollout_mod.pack_plan
    for module in (engine_mod, rollout_mod):  # the rollout's forwards, then training's
        monkeypatch.setattr(
            module, "pack_plan", lambda *a: plans.append(real_plan(*a)) or plans[-1]
        )
    buffers = []
    for chunk, pack in ((0, 0), (8, 0), (8, 3)):
        sets = {"rl.forward_batch_size": chunk, "rl.pack_rows": pack}
        cfg = rl_config(tmp_path / f"{chunk}_{pack}", "ppo", **sets)
        data = rollout_data(cfg)[3]
        next(data)  # the first rollout
        buffers.append(rollouts[-1].buffer)
    whole, *chunked = buffers
    # The packed run's first two plans are its forward chunks' (training's follow): really packed.
    assert len(plans) > 2 and all(len(plan) < 8 for plan in plans[:2])
    assert "old_logprobs" in whole and "returns" in whole
    for other in chunked:
        assert set(other) == set(whole)
        for key in whole:
            np.testing.assert_allclose(other[key], whole[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert np.abs(whole["old_logprobs"]).sum() > 0

    bad = rl_config(tmp_path / "bad", "ppo", **{"rl.forward_batch_size": 4})
    with pytest.raises(ConfigError, match="rl.forward_batch_size"):
        next(rollout_data(bad)[3])


def short_responses(monkeypatch, cuts):
    """Make every Sampler.generate_padded call end each row after at most cuts[call] tokens (the
    rest padding, finish reason "stop"; None: unchanged), as a trained policy's early stops do,
    so a random-weight model's rollouts have short responses to trim."""
    real = Sampler.generate_padded
    calls = iter(cuts)

    def generate_padded(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        cut = next(calls)
        if cut is None:
            return out
        lengths = jnp.minimum(out.lengths, cut)
        keep = jnp.arange(out.tokens.shape[1])[None] < lengths[:, None]
        return dataclasses.replace(
            out,
            tokens=jnp.where(keep, out.tokens, self.pad_id),
            lengths=lengths,
            finish_reasons=jnp.ones_like(out.finish_reasons),
            model_logprobs=jnp.where(keep, out.model_logprobs, 0.0),
            sampling_logprobs=jnp.where(keep, out.sampling_logprobs, 0.0),
        )

    monkeypatch.setattr(Sampler, "generate_padded", generate_padded)


def first_minibatch_loss(cfg, rollouts):
    """The first minibatch of a fresh rollout under `cfg` (its first micro-batch), the loss,
    metrics and gradients of the fresh state on it, the rollout's metrics and its buffer
    (`rollouts`: the fixture's list)."""
    algo, trainer, state, data = rollout_data(cfg)
    micro = {k: v[0] for k, v in next(data).items()}

    def loss(params):
        value, denom, metrics = algo.loss_fn(
            nnx.merge(trainer.graphdef, params), micro, jax.random.PRNGKey(0)
        )
        return value / denom, {k: v / denom for k, v in metrics.items()}

    (value, metrics), grads = jax.device_get(
        jax.jit(jax.value_and_grad(loss, has_aux=True))(state["params"])
    )
    return micro, value, metrics, grads, data.pop_metrics(), rollouts[-1].buffer


def assert_same_loss(got, want):
    """(loss, metrics, grads) of two layouts of the same minibatch agree to float rounding."""
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    for key in want[1]:
        np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-4, atol=1e-6, err_msg=key)
    for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trainer_name", ["ppo", "grpo"])
def test_trimmed_rollout_rows_train_like_full_width_rows(
    tmp_path, monkeypatch, rollouts, trainer_name
):
    """Rows trimmed to the rollout's prompt bucket and the response bucket of its longest
    response (rl.response_buckets) carry the same per-token values as full-width rows and give
    the same loss and gradients: the columns cut are padding in every row."""
    short_responses(monkeypatch, [3, 3])
    runs = {}
    for name, sets in {
        "full": {"data.prompt_buckets": "[48]", "rl.response_buckets": "[]"},
        "trim": {"data.prompt_buckets": "[32, 48]", "rl.response_buckets": "[2, 4]"},
    }.items():
        sets = {**sets, "sampling.max_prompt_len": 48, "train.seq_len": 56}
        cfg = rl_config(tmp_path / name, trainer_name, **sets)
        runs[name] = first_minibatch_loss(cfg, rollouts)[:4]
    full, trim = runs["full"][0], runs["trim"][0]
    assert full["tokens"].shape[-1] == 48 + 8 and trim["tokens"].shape[-1] == 32 + 4
    assert full["mask"].sum(-1).max() == 3 and full["mask"][:, 4:].sum() == 0
    for key in ("tokens", "positions", "segment_ids"):
        np.testing.assert_array_equal(trim[key], full[key][:, 16:52], err_msg=key)
        assert not full[key][:, :16].any() and not full[key][:, 52:].any()
    for key, value in full.items():
        if value.shape[-1] == 8:  # per response token: old/ref log-probs, advantages, ...
            np.testing.assert_allclose(trim[key], value[:, :4], rtol=1e-5, atol=1e-5, err_msg=key)
    assert_same_loss(runs["trim"][1:4], runs["full"][1:4])


@pytest.mark.parametrize(
    "trainer_name, per_row, aggregation",
    [
        ("ppo", 4, None),
        ("ppo", 6, None),
        ("grpo", 6, "sequence_mean"),
        ("rloo", 6, "token_sum_norm"),
    ],
)
def test_packed_rows_train_like_plain_rows(
    tmp_path, monkeypatch, rollouts, trainer_name, per_row, aggregation
):
    """rl.pack_rows: short sequences share rows (each its own segment), in the rollout's
    forwards (old and reference log-probs, values, entropy: the same per-token values as plain
    rows) and in training (the minibatch gives the same loss, metrics and gradients as one
    sequence per row); GRPO and RLOO with per-sequence aggregations, so the empty slots must
    weigh and count nothing. 4 per row: the logits are taken at the slots' 4 x 8 response
    positions; 6: at the rows' 40 positions (fewer than 6 x 8) and the response tokens' scores
    gathered."""
    short_responses(monkeypatch, [3, 3])
    runs = {}
    for name, pack in {"plain": 0, "packed": per_row}.items():
        sets = {
            "rl.pack_rows": pack,
            "rl.prompts_per_rollout": 8,
            "rl.num_generations": 4,
            "train.batch_size": 32,
            "rl.response_buckets": "[]",
            **({"rl.loss_aggregation": aggregation} if aggregation else {}),
        }
        runs[name] = first_minibatch_loss(
            rl_config(tmp_path / name, trainer_name, **sets), rollouts
        )
    plain, (packed, *_, rollout_metrics, packed_buffer) = runs["plain"][0], runs["packed"]
    plain_buffer = runs["plain"][5]
    assert set(packed_buffer) == set(plain_buffer)
    for key, value in plain_buffer.items():  # rollout buffers: plain row order in both
        np.testing.assert_allclose(packed_buffer[key], value, rtol=1e-5, atol=2e-6, err_msg=key)
    rows = packed["tokens"].shape[0]
    assert rows % 8 == 0 and rows < plain["tokens"].shape[0] == 32
    assert rollout_metrics["rollout/packed_rows"] == rows
    assert packed["mask"].shape == (rows * per_row, 8)
    assert packed["mask"].sum() == plain["mask"].sum()
    # Every sequence's tokens and positions are in some packed row, in a segment of its own.
    seqs = lambda b: sorted(  # noqa: E731
        (tuple(t[s == g]), tuple(p[s == g]))
        for t, p, s in zip(b["tokens"], b["positions"], b["segment_ids"], strict=True)
        for g in range(1, int(s.max()) + 1)
    )
    assert seqs(packed) == seqs(plain)
    assert_same_loss(runs["packed"][1:4], runs["plain"][1:4])


@pytest.mark.parametrize("trainer_name", ["grpo", "rloo"])
def test_truncated_completions_weigh_nothing_when_masked(tmp_path, monkeypatch, trainer_name):
    """rl.mask_truncated_completions: every other row ends with a stop token, the rest are cut
    at max_new_tokens; the first minibatch's loss and gradients then equal those of the
    minibatch without its truncated rows (and differ from the unmasked loss)."""
    real = Sampler.generate_padded

    def generate_padded(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        stop = (jnp.arange(out.finish_reasons.shape[0]) % 2).astype(out.finish_reasons.dtype)
        return dataclasses.replace(out, finish_reasons=stop)

    monkeypatch.setattr(Sampler, "generate_padded", generate_padded)
    reward = tmp_path / "varied.py"  # scores that differ within groups: nonzero advantages
    reward.write_text(
        "def reward(prompts, completions, **fields):\n"
        "    return [float(sum(map(ord, c)) % 7) for c in completions]\n"
    )
    sets = {"rl.mask_truncated_completions": True, "rl.reward_functions": f'["{reward}:reward"]'}
    cfg = rl_config(tmp_path, trainer_name, **sets)
    algo, trainer, state, data = rollout_data(cfg)
    micro = {k: v[0] for k, v in next(data).items()}
    stopped = micro["loss_mask"].any(axis=1)
    assert 0 < stopped.sum() < len(stopped)
    np.testing.assert_array_equal(micro["loss_mask"], micro["mask"] * stopped[:, None])
    kept = {k: v[stopped] for k, v in micro.items() if k != "loss_mask"}
    unmasked = {k: v for k, v in micro.items() if k != "loss_mask"}

    def loss_and_grads(batch):
        def loss(params):
            value, denom, _ = algo.loss_fn(
                nnx.merge(trainer.graphdef, params), batch, jax.random.PRNGKey(0)
            )
            return value / denom

        return jax.device_get(jax.jit(jax.value_and_grad(loss))(state["params"]))

    masked, without, everything = (loss_and_grads(b) for b in (micro, kept, unmasked))
    np.testing.assert_allclose(masked[0], without[0], rtol=1e-5, atol=1e-7)
    for g, w in zip(jax.tree.leaves(masked[1]), jax.tree.leaves(without[1]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
    assert not np.isclose(masked[0], everything[0], rtol=1e-3)
    with pytest.raises(ConfigError, match="rl.mask_truncated_completions is for grpo, rloo"):
        make_algorithm(rl_config(tmp_path, "ppo", **{"rl.mask_truncated_completions": True}))


def test_grpo_without_kl_keeps_no_reference(tmp_path, monkeypatch, rollouts):
    """rl.kl_coef 0 (DAPO / Dr. GRPO, TRL's default beta): no reference forward (its log-probs
    are the rollout policy's, so every KL is 0) and the first minibatch trains as with a
    reference whose KL term weighs nothing; `jaxalign plan` counts no reference."""
    from jaxalign.plan import make_plan

    traced = []  # with_entropy of each traced rollout forward: False is the reference's
    real = engine_mod.response_logprobs

    def spy(policy, batch, temperature, with_entropy=True):
        traced.append(with_entropy)
        return real(policy, batch, temperature, with_entropy)

    monkeypatch.setattr(engine_mod, "response_logprobs", spy)
    runs = {}
    for name, kl_coef in {"with_ref": 1e-30, "no_ref": 0.0}.items():
        traced.clear()
        runs[name] = first_minibatch_loss(
            rl_config(tmp_path / name, "grpo", **{"rl.kl_coef": kl_coef}), rollouts
        )
        assert (False in traced) == (name == "with_ref") and True in traced, name
    no_ref, with_ref = runs["no_ref"], runs["with_ref"]
    np.testing.assert_array_equal(no_ref[5]["ref_logprobs"], no_ref[5]["old_logprobs"])
    assert no_ref[4]["objective/kl"] == 0.0  # (at the fresh state the reference's is ~0 too)
    assert_same_loss(no_ref[1:4], with_ref[1:4])
    plan = make_plan(rl_config(tmp_path / "plan", "grpo", **{"rl.kl_coef": 0.0}), 8)
    assert "reference" not in plan.parts and "reference" not in plan.host
    assert "reference" in make_plan(rl_config(tmp_path / "plan2", "grpo"), 8).parts


def test_pack_plan_fills_rows_first_fit_decreasing():
    """At most `per_row` sequences per row, never wider than the row, every sequence once."""
    lengths = np.array([30, 5, 12, 25, 8, 8, 40, 3])
    plan = pack_plan(lengths, 40, 3)
    assert sorted(i for row in plan for i in row) == list(range(8))
    assert all(len(row) <= 3 and lengths[row].sum() <= 40 for row in plan)
    assert plan == [[6], [0, 4], [3, 2, 7], [5, 1]]


@pytest.mark.slow
def test_rollouts_of_other_widths_compile_a_step_each_once(tmp_path, monkeypatch):
    """The loop compiles one train step per row shape: rollouts trimmed to 4 response tokens,
    then full width (8), then 4 again compile twice, and train with finite losses."""
    short_responses(monkeypatch, [3, None, 3])
    cfg = rl_config(tmp_path, "ppo", **{"train.steps": 6, "rl.response_buckets": "[4]"})
    algo, trainer, init = start(cfg)
    history = trainer.run(init_params=init).history
    widths = [r["rollout/row_width"] for r in history if "rollout/row_width" in r]
    assert widths == [36.0, 40.0, 36.0]
    assert sum("compile_s" in r for r in history) == 2
    assert all(np.isfinite(r["loss"]) for r in history)


def test_minibatch_record_ids_name_the_prompt_of_each_row(tmp_path):
    """RolloutData.record_ids() (what a NaN halt names) gives, row by row, the `path:LINE` of
    the prompt each row of the minibatch was generated from."""
    import json

    from jaxalign.data import load_tokenizer, render_prompt

    cfg = rl_config(tmp_path, "grpo")
    data = rollout_data(cfg)[3]
    tok = load_tokenizer(cfg.data.tokenizer)
    path = cfg.data.train_file
    lines = Path(path).read_text().splitlines()
    for _ in range(2):  # both minibatches of the rollout
        batch = next(data)
        ids = data.record_ids()
        tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
        assert len(ids) == len(tokens) == cfg.train.batch_size
        for row, rid in zip(tokens, ids, strict=True):
            file, line = rid.rsplit(":", 1)
            assert file == path
            prompt = json.loads(lines[int(line) - 1])["prompt"]
            expected = render_prompt([{"role": "user", "content": prompt}], tok, "plain")
            assert row[32 - len(expected) : 32].tolist() == list(expected)
    assert data.stats["records"] == len(lines) and data.stats["rollouts"] == 1
    assert data.report().startswith(f"prompts {path}: {len(lines)} prompts (0 bad records")
    assert data.report().endswith("1 batches taken; 1 rollouts of 16 rows")


# ---------------------------------------------------------------------------------------------
# PPO-ptx: a supervised next-token term on another dataset in every RL minibatch.

PTX = {
    "rl.ptx_coef": 0.5,
    "rl.ptx_file": str(DATA / "sft_train.jsonl"),
    "rl.ptx_batch_size": 16,
}


@pytest.mark.parametrize("trainer_name", ["ppo", "grpo"])
def test_ptx_term_is_coef_times_mean_nll(tmp_path, trainer_name):
    """loss_fn = rl_loss + ptx_coef x mean NLL of the ptx rows, normalized by the RL
    denominator (float64 NumPy reference for the value; the gradient against an independent
    full-softmax JAX NLL); `loss/ptx` is the mean NLL."""
    cfg = rl_config(tmp_path, trainer_name, **PTX)
    algo, trainer, state, data = rollout_data(cfg)
    local = next(data)
    assert local["ptx_inputs"].shape == (1, 16, cfg.train.seq_len)
    micro = {k: v[0] for k, v in local.items()}
    ptx = {k[4:]: v for k, v in micro.items() if k.startswith("ptx_")}
    assert set(ptx) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    assert ptx["loss_mask"].sum() > 100

    def policy(params):
        return algo.policy_module(nnx.merge(trainer.graphdef, params))

    @jax.jit
    def parts(params):
        model = nnx.merge(trainer.graphdef, params)
        with_ptx = algo.loss_fn(model, micro, jax.random.PRNGKey(0))
        rl_only = algo.rl_loss(model, micro, jax.random.PRNGKey(0))
        net = policy(params)
        hidden = net(ptx["inputs"], ptx["positions"], ptx["segment_ids"])
        return with_ptx, rl_only, net.logits(hidden).astype(jnp.float32)

    (loss, denom, metrics), (rl_loss, rl_denom, _), logits = jax.device_get(parts(state["params"]))
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ptx["targets"][..., None], -1)[..., 0]
    mask = ptx["loss_mask"] > 0
    mean_nll = nll[mask].mean()
    assert denom == rl_denom
    np.testing.assert_allclose((loss - rl_loss) / denom, 0.5 * mean_nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/ptx"] / denom, mean_nll, rtol=1e-5)

    def full_softmax_nll(params):
        net = policy(params)
        hidden = net(ptx["inputs"], ptx["positions"], ptx["segment_ids"])
        lp = jax.nn.log_softmax(net.logits(hidden).astype(jnp.float32), -1)
        tok = jnp.take_along_axis(lp, ptx["targets"][..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(ptx["loss_mask"] > 0, tok, 0.0)) / mask.sum()

    def normalized(fn):
        def f(params):
            value, d, _ = fn(nnx.merge(trainer.graphdef, params), micro, jax.random.PRNGKey(0))
            return value / jax.lax.stop_gradient(d)

        return f

    g_all, g_rl, g_nll = jax.device_get(
        jax.jit(
            lambda p: [
                jax.grad(f)(p)
                for f in (normalized(algo.loss_fn), normalized(algo.rl_loss), full_softmax_nll)
            ]
        )(state["params"])
    )
    g_policy = algo.policy_params(g_all)
    want = jax.tree.map(
        lambda r, n: r + 0.5 * n, algo.policy_params(g_rl), algo.policy_params(g_nll)
    )
    for got, ref in zip(jax.tree.leaves(g_policy), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_ptx_data_state_resumes_and_merges_across_processes(tmp_path):
    """The ptx iterator's position is in the RL data state: a fresh iterator set to it yields
    the next ptx rows; the states of two processes merge into one that resumes on one."""
    cfg = rl_config(tmp_path, "ppo", **PTX)
    algo = make_algorithm(cfg)
    halves = [algo.train_data(p, 2) for p in (0, 1)]
    for d in halves:
        for _ in range(3):
            next(d.ptx)
    merged = type(halves[0]).merge_states([d.get_state() for d in halves])
    assert merged["prompts"] == halves[0].get_state()["prompts"]
    single = make_algorithm(cfg).train_data(0, 1)
    single.set_state(merged)
    want = [next(d.ptx) for d in halves]
    got = next(single.ptx)
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(
            got[key], np.concatenate([w[key] for w in want], axis=1), err_msg=key
        )
    assert single.stats["ptx"]["records"] == 3000


@pytest.mark.slow
def test_ptx_run_on_8_devices_equals_one_device(tmp_path):
    """A PPO-ptx run (one rollout, two steps) on fsdp 8 and on one device: the same losses,
    ptx term included; the NLL of the ptx data falls."""
    histories = []
    for devices in (jax.devices(), jax.devices()[:1]):
        cfg = rl_config(tmp_path / str(len(devices)), "ppo", **{**PTX, "rl.ptx_coef": 2.0})
        algo = make_algorithm(cfg)
        trainer = Trainer(cfg, algo, devices=devices)
        histories.append(trainer.run(init_params=algo.initial_params(trainer)).history)
    sharded, single = histories
    for a, b in zip(sharded, single, strict=True):
        for key in ("loss", "loss/ptx", "loss/policy", "loss/value"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert sharded[1]["loss/ptx"] < sharded[0]["loss/ptx"]


def test_ptx_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="rl.ptx_coef > 0 needs rl.ptx_file"):
        make_algorithm(rl_config(tmp_path, **{"rl.ptx_coef": 0.1}))
    with pytest.raises(ConfigError, match="rl.ptx_coef and rl.ptx_batch_size must be >= 0"):
        make_algorithm(rl_config(tmp_path, **{**PTX, "rl.ptx_coef": -1}))
    with pytest.raises(ConfigError, match="rl.ptx_batch_size .* train.grad_accum"):
        make_algorithm(
            rl_config(tmp_path, **{**PTX, "rl.ptx_batch_size": 6, "train.grad_accum": 4})
        )
    bad = rl_config(tmp_path, **{**PTX, "rl.ptx_batch_size": 4})
    with pytest.raises(ConfigError, match="rl.ptx_batch_size: micro-batch of 4 rows"):
        next(rollout_data(bad)[3])


@pytest.mark.parametrize(
    "max_new, given, want",
    [(40, None, [16, 32, 40]), (8, None, [8]), (128, None, [16, 32, 64, 128]), (40, [], [40])]
    + [(40, [64, 8, 8], [8, 40])],
)
def test_response_buckets_end_at_max_new_tokens(tmp_path, max_new, given, want):
    """The default buckets are 16, 32, ... below sampling.max_new_tokens, which always ends the
    list; a rollout's rows take the smallest that fits its longest response."""
    sets = {"sampling.max_new_tokens": max_new, "train.seq_len": 32 + max_new}
    if given is not None:
        sets["rl.response_buckets"] = str(given)
    buckets = response_buckets(rl_config(tmp_path, **sets))
    assert buckets == want
    assert response_width(1, buckets) == want[0]
    assert response_width(max_new, buckets) == max_new
    if len(want) > 1:
        assert response_width(want[0], buckets) == want[0]
        assert response_width(want[0] + 1, buckets) == want[1]


def test_select_groups_puts_groups_with_a_spread_first():
    rounds = [np.array([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), np.array([0.0, 0.5, 3.0, 3.0, 1.0, 0.0])]
    assert select_groups(rounds, 2, 3) == ([(0, 1), (1, 0), (1, 2)], 3)
    assert select_groups(rounds[:1], 2, 3) == ([(0, 1), (0, 0), (0, 2)], 1)
    assert select_groups(rounds, 2, 6)[1] == 3
    # Rounds of other prompt buckets join left-padded to the widest.
    sampled = [
        {"prompt_tokens": np.full((4, w), w), "texts": [f"{w}-{i}" for i in range(4)]}
        for w in (2, 3)
    ]
    joined = join_rounds(sampled, [(1, 1), (0, 0)], group=2, pad_id=0)
    np.testing.assert_array_equal(joined["prompt_tokens"], [[3, 3, 3]] * 2 + [[0, 2, 2]] * 2)
    assert joined["texts"] == ["3-2", "3-3", "2-0", "2-1"]


@pytest.mark.slow
def test_filter_groups_samples_until_every_group_has_a_spread(tmp_path, rollouts):
    """rl.filter_groups (DAPO's dynamic sampling): prompts of the `add` task score 1 whatever
    the answer (groups of equal scores); the rollout then holds only other prompts' groups,
    each row still with its own prompt, record and completion, gathered over several sampling
    rounds; with one round allowed, equal groups fill the rollout instead."""
    reward = tmp_path / "flat.py"
    reward.write_text(
        "def reward(prompts, completions, task, **fields):\n"
        "    return [1.0 if t == 'add' else float(sum(map(ord, c)) % 7)\n"
        "            for c, t in zip(completions, task)]\n"
    )
    lines = (DATA / "rl_prompts_train.jsonl").read_text().splitlines()
    for rounds in (4, 1):
        sets = {
            "rl.reward_functions": f'["{reward}:reward"]',
            "rl.filter_groups": True,
            "rl.max_generate_rounds": rounds,
        }
        cfg = rl_config(tmp_path / str(rounds), "grpo", **sets)
        algo, trainer, state, data = rollout_data(cfg)
        next(data)
        metrics, last = data.pop_metrics(), rollouts[-1]
        tasks = [r["task"] for r in last.records]
        scores = last.scores.reshape(-1, 2)
        buffer = last.buffer
        tokenizer = algo.tokenizer
        for r, row_id in enumerate(last.row_ids):  # each row's prompt is its record's
            record = json.loads(lines[int(row_id.rsplit(":", 1)[1]) - 1])
            assert record["task"] == tasks[r]
            prompt = buffer["tokens"][r][buffer["segment_ids"][r] > 0]
            assert record["prompt"] in tokenizer.decode(prompt.tolist())
        rescored = [1.0 if t == "add" else sum(map(ord, c)) % 7 for c, t in zip(last.texts, tasks)]
        np.testing.assert_array_equal(last.scores, rescored)
        assert metrics["rollout/generate_rounds"] <= rounds
        assert metrics["rollout/groups_filtered"] > 0
        if rounds == 4:
            assert metrics["rollout/generate_rounds"] >= 2
            assert (scores.max(1) > scores.min(1)).all() and "add" not in tasks
            assert metrics["rollout/groups_all_equal"] == 0
        else:
            assert metrics["rollout/groups_all_equal"] > 0 and "add" in tasks
    with pytest.raises(ConfigError, match="rl.filter_groups is for grpo and rloo"):
        make_algorithm(rl_config(tmp_path, "ppo", **{"rl.filter_groups": True}))


def test_stop_strings_and_penalties_in_a_rollout(tmp_path, rollouts):
    """sampling.stop in RL: a response ends with the token that completes its first stop string
    (that token trained on, nothing after it), and its text, what the rewards score, ends
    before the string; the penalties run in the rollout's sampler, and rl.old_logprobs:
    sampler refuses them."""
    sets = {"sampling.stop": '["e"]', "sampling.repetition_penalty": 1.3}
    algo, trainer, state, data = rollout_data(rl_config(tmp_path, "grpo", **sets))
    next(data)
    last, tokenizer = rollouts[-1], algo.tokenizer
    buffer = last.buffer
    n = buffer["mask"].shape[1]
    cut = 0
    for r, text in enumerate(last.texts):
        response = buffer["tokens"][r, -n:][buffer["mask"][r] > 0].tolist()
        assert (buffer["tokens"][r, -n:][buffer["mask"][r] == 0] == tokenizer.pad_id).all()
        decoded = tokenizer.decode(response)
        assert "e" not in text
        if "e" in decoded:
            cut += 1
            assert text == decoded[: decoded.index("e")]
            assert "e" not in tokenizer.decode(response[:-1])
        else:
            assert text == decoded
    assert cut > 0
    with pytest.raises(ConfigError, match="penalty"):
        make_algorithm(rl_config(tmp_path, "grpo", **sets, **{"rl.old_logprobs": "sampler"}))


def rm_run_with_stats(path: Path) -> Path:
    """A random-weight reward-model run with reward statistics to normalize by."""
    from jaxalign.rewards.model import STATS_FILE

    sets = [f"run_dir={path}", "trainer=rm", f"data.tokenizer={DATA / 'tokenizer.model'}"]
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}
    reward_model_run(path, load_config(None, [*sets, "train.seq_len=64"], base=base))
    (path / STATS_FILE).write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return path


def test_reward_model_scores_rollouts_with_or_without_offload(tmp_path, rollouts):
    """rl.reward_model: each row's score is the RM's score of prompt + response (+ EOS where
    the response has no EOS), normalized by the run's reward statistics; with
    rl.offload_frozen (the RM and the reference in host memory between rollouts) the rollouts
    are the same, the second one too (parameters brought back from host memory)."""
    from jaxalign.rewards.model import load_reward_model

    rm_run = rm_run_with_stats(tmp_path / "rm")
    sets = {"rl.reward_functions": "[]", "rl.reward_model": str(rm_run), "train.steps": 4}
    runs = []
    for offload in (False, True):
        cfg = rl_config(tmp_path / str(offload), "ppo", **sets, **{"rl.offload_frozen": offload})
        algo, trainer, state, data = rollout_data(cfg)
        for _ in range(2):
            for _ in range(trainer.cfg.train.steps // 2):  # one rollout's minibatches
                next(data)
        runs.append(rollouts[-2:])
    eos = algo.tokenizer.eos_id
    scorer = load_reward_model(str(rm_run))[1]
    buffer, scores = runs[0][0].buffer, runs[0][0].scores
    sequences = []
    for r in range(len(scores)):
        real = buffer["tokens"][r][buffer["segment_ids"][r] > 0].tolist()
        sequences.append(np.asarray(real if real[-1] == eos else [*real, eos], np.int32))
    np.testing.assert_allclose(scores, (scorer.score(sequences) - 0.5) / 2.0, atol=1e-5)
    assert np.std(scores) > 0
    for plain, offloaded in zip(*runs, strict=True):
        np.testing.assert_array_equal(offloaded.scores, plain.scores)
        for key in plain.buffer:
            np.testing.assert_allclose(
                offloaded.buffer[key], plain.buffer[key], atol=1e-6, err_msg=key
            )


def test_reward_weights_weigh_each_reward_and_each_is_logged(tmp_path, rollouts):
    """rl.reward_weights: the rollout's scores are the weighted sum of the reward functions'
    (recomputed here from the decoded completions), each function's own mean is logged under
    rollout/reward/<name>, and a weight count that does not match is a config error."""
    reward = tmp_path / "two.py"
    reward.write_text(
        "def length(prompts, completions, **fields):\n"
        "    return [len(c) % 3 for c in completions]\n"
        "def chars(prompts, completions, **fields):\n"
        "    return [sum(map(ord, c)) % 5 for c in completions]\n"
    )
    sets = {
        "rl.reward_functions": f'["{reward}:length", "{reward}:chars"]',
        "rl.reward_weights": "[2.0, -0.5]",
    }
    algo, trainer, state, data = rollout_data(rl_config(tmp_path, "grpo", **sets))
    next(data)
    texts, metrics = rollouts[-1].texts, data.pop_metrics()
    length = np.array([len(c) % 3 for c in texts], np.float64)
    chars = np.array([sum(map(ord, c)) % 5 for c in texts], np.float64)
    assert length.std() > 0 and chars.std() > 0
    np.testing.assert_allclose(rollouts[-1].scores, 2.0 * length - 0.5 * chars)
    np.testing.assert_allclose(metrics["rollout/reward/length"], length.mean())
    np.testing.assert_allclose(metrics["rollout/reward/chars"], chars.mean())
    with pytest.raises(ConfigError, match="rl.reward_weights has 1 weights for 2 rewards"):
        make_algorithm(rl_config(tmp_path, "grpo", **{**sets, "rl.reward_weights": "[1.0]"}))


def test_held_out_pass_rate_every_rollout(tmp_path, rollouts):
    """rl.eval_every: before a rollout, the engine greedy-decodes rl.eval_prompts held-out
    prompts and logs the fraction whose reward functions' score is >= 1 and the mean score."""
    sets = {
        "data.eval_file": str(DATA / "rl_prompts_eval.jsonl"),
        "rl.eval_every": 1,
        "rl.eval_prompts": 8,
    }
    algo, trainer, state, data = rollout_data(rl_config(tmp_path, "grpo", **sets))
    next(data)
    metrics = data.pop_metrics()
    assert metrics["time/eval"] > 0 and "eval/pass_rate" not in rollouts[-1].metrics
    again = data.engine.evaluate(algo.policy_params(state["params"]))  # greedy: the same
    assert again == {k: metrics[k] for k in ("eval/pass_rate", "eval/mean_score")}
    assert 0.0 <= again["eval/pass_rate"] <= again["eval/mean_score"] + 1e-9
    assert len(data.engine.eval_prompts[0]) == 8


def test_reward_errors_name_the_config_key_or_flag(tmp_path):
    """A reward that cannot be loaded, or returns the wrong number of scores, is named by where
    it came from: its entry of rl.reward_functions, or the command line's flag."""
    from jaxalign.data import load_tokenizer
    from jaxalign.errors import UserError
    from jaxalign.rewards import Scorer

    reward = tmp_path / "short.py"
    reward.write_text("def reward(prompts, completions, **fields):\n    return [1.0]\n")
    tokenizer = load_tokenizer(str(DATA / "tokenizer.model"))
    functions = f'["jaxalign.rewards:exact_answer", "{reward}:nothing"]'
    cfg = rl_config(tmp_path, **{"rl.reward_functions": functions})
    with pytest.raises(UserError, match=r"^rl.reward_functions\[1\]: .* has no function"):
        Scorer.from_rl_config(cfg, tokenizer)
    cfg = rl_config(tmp_path, **{"rl.reward_functions": '["no_such_module:f"]'})
    with pytest.raises(UserError, match=r"^rl.reward_functions\[0\]: .* cannot import"):
        Scorer.from_rl_config(cfg, tokenizer)
    with pytest.raises(UserError, match="^--reward-fn: 'no_such_module:f': cannot import"):
        Scorer.from_flags("no_such_module:f", None)
    with pytest.raises(UserError, match="^--reward-model: .*: not a run directory"):
        Scorer.from_flags(None, str(tmp_path))
    cfg = rl_config(tmp_path, **{"rl.reward_functions": f'["{reward}:reward"]'})
    scorer = Scorer.from_rl_config(cfg, tokenizer)
    with pytest.raises(UserError, match=r"^rl.reward_functions\[0\] .* returned 1 scores for 2"):
        scorer(["p", "q"], ["a", "b"], [{}, {}])


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_advantages_equal_float64_reference(tmp_path, baseline):
    """REINFORCE++ (trainer reinforce_pp): per-token rewards -kl_coef * k1 plus the score (with
    rl.reinforce_baseline, minus its group's mean) on the last response token, discounted
    returns without a critic, whitened over every response token of the rollout."""
    gamma, kl_coef, g = 0.9, 0.1, 2
    sets = {"rl.gamma": gamma, "rl.num_generations": g, "rl.reinforce_baseline": baseline}
    algo = make_algorithm(rl_config(tmp_path, "reinforce_pp", **sets))
    assert algo.kl_estimator == "k1"
    rng = np.random.default_rng(3)
    lengths = np.array([3, 5, 1, 4])
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.float64)
    old = rng.normal(-1.0, 0.3, (4, 5)) * mask
    ref = rng.normal(-1.0, 0.3, (4, 5)) * mask
    scores = np.array([1.0, 0.0, 0.5, 2.0])
    rollout = {
        "mask": mask,
        "scores": scores,
        "old_logprobs": old,
        "ref_logprobs": ref,
        "entropy": np.ones((4, 5)),
        "stopped": np.ones(4),
    }
    rollout = {k: jnp.asarray(v, jnp.float32) for k, v in rollout.items()}
    buffer, metrics = jax.device_get(algo.postprocess(rollout, jnp.float32(kl_coef)))
    centered = scores - np.repeat(scores.reshape(-1, g).mean(1), g) if baseline else scores
    rewards = -kl_coef * (old - ref) * mask
    rewards[np.arange(4), lengths - 1] += centered
    returns = np.zeros((4, 5))
    for t in reversed(range(5)):
        after = returns[:, t + 1] if t + 1 < 5 else 0.0
        returns[:, t] = (rewards[:, t] + gamma * after) * mask[:, t]
    real = mask > 0
    want = (returns - returns[real].mean()) / np.sqrt(returns[real].var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(buffer["advantages"], want, atol=1e-5)
    np.testing.assert_allclose(
        metrics["objective/kl"], ((old - ref) * mask).sum(1).mean(), atol=1e-5
    )
    with pytest.raises(ConfigError, match="rl.reinforce_baseline is for trainer reinforce_pp"):
        make_algorithm(rl_config(tmp_path, "grpo", **{"rl.reinforce_baseline": True}))
    # rl.kl_target adapts the reward's KL coefficient after each rollout, as PPO's does.
    adaptive = make_algorithm(rl_config(tmp_path, "reinforce_pp", **{"rl.kl_target": 6.0}))
    before = adaptive.kl_controller.kl_coef
    adaptive.after_rollout({"objective/kl": 9.0}, 64)
    assert adaptive.kl_controller.kl_coef > before
