"""Reward models and DPO: preference data, the RM head, the DPO trainer, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import load_config
from jaxalign.data import (
    PreferenceBatchIterator,
    load_tokenizer,
    read_preference_jsonl,
    to_preference,
    tokenize_pair,
)
from jaxalign.errors import DataError
from jaxalign.models.reward import RewardModel
from jaxalign.rewards.model import load_reward_model, score_file
from jaxalign.trainers.dpo import DPO
from jaxalign.trainers.loop import Trainer
from jaxalign.trainers.rm import RewardModelAlgorithm
from jaxalign.trainers.step import make_eval_step

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
MODEL = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
}


def pref_config(tmp_path, trainer, **overrides):
    sets = [
        f"{k}={v}"
        for k, v in {
            "trainer": trainer,
            "run_dir": str(tmp_path / "run"),
            "mesh.fsdp": 1,
            "data.train_file": str(TINY / "pref_train.jsonl"),
            "data.eval_file": str(TINY / "pref_eval.jsonl"),
            "data.tokenizer": str(TINY / "tokenizer.model"),
            "train.steps": 1,
            "train.batch_size": 16,
            "train.seq_len": 64,
            "train.lr": 1e-3,
            "train.warmup_steps": 1,
            "train.log_every": 1,
            "train.progress": False,
            "train.peak_flops_per_device": 1e9,
            "train.eval_batches": 13,
            "checkpoint.every": 0,
            "logging.tensorboard": False,
            **overrides,
        }.items()
    ]
    return load_config(None, sets, base={"model": dict(MODEL)})


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TINY / "tokenizer.model"))


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- data --------------------------------------------------------------------------------------

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
FORMATS = [
    {
        "system": "Be brief.",
        "prompt": "Add 2 and 3.",
        "chosen": "The answer is 5.",
        "rejected": "6",
    },
    {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": "The answer is 5."}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
    {
        "chosen": [*PROMPT, {"role": "assistant", "content": "The answer is 5."}],
        "rejected": [*PROMPT, {"role": "assistant", "content": "6"}],
        "margin": 1.5,
    },
]


def test_every_record_format_scores_only_the_completion_tokens(tok):
    pairs = []
    for record in FORMATS:
        prompt, chosen, rejected, _ = to_preference(record, where="r")
        pairs.append(tokenize_pair(prompt, chosen, rejected, tok, template="plain", seq_len=64))
    for ids, masks in pairs[1:]:
        for side in range(2):
            np.testing.assert_array_equal(ids[side], pairs[0][0][side])
            np.testing.assert_array_equal(masks[side], pairs[0][1][side])
    (chosen_ids, rejected_ids), (chosen_mask, rejected_mask) = pairs[0]
    assert tok.decode(chosen_ids[chosen_mask]) == "The answer is 5.<|end|>"
    assert tok.decode(rejected_ids[rejected_mask]) == "6<|end|>"
    assert chosen_ids[-1] == rejected_ids[-1] == tok.eos_id and chosen_mask[-1]
    assert to_preference(FORMATS[2], where="r")[3] == 1.5


def test_bad_record_error_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [FORMATS[0], {"prompt": "hi", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: .*'rejected'"):
        read_preference_jsonl(path)
    path = write_jsonl(tmp_path / "q.jsonl", [{**FORMATS[0], "margin": "big"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'margin'"):
        read_preference_jsonl(path)
    records, skipped = read_preference_jsonl(
        write_jsonl(tmp_path / "r.jsonl", [FORMATS[0], {"chosen": 1}]), on_error="skip"
    )
    assert (len(records), skipped) == (1, 1)


def test_identical_chosen_and_rejected_is_an_error_or_a_counted_skip(tmp_path):
    prompt_forms = [
        {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "Add 2 and 3."}],
            "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": "5",
        },
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
        },
    ]
    for i, record in enumerate(prompt_forms):
        path = write_jsonl(tmp_path / f"same{i}.jsonl", [FORMATS[0], record])
        with pytest.raises(DataError, match=rf"same{i}\.jsonl:2: .*'chosen' and 'rejected'"):
            read_preference_jsonl(path)
        records, skipped = read_preference_jsonl(path, on_error="skip")
        assert (len(records), skipped) == (1, 1)


def test_long_pairs_are_dropped_or_truncated_keeping_the_prompt_end(tok):
    prompt = [{"role": "user", "content": "Reverse the word 'apple'. " * 6 + "Now!"}]
    chosen, rejected = ([{"role": "assistant", "content": t}] for t in ("elppa", "apple"))
    full = tokenize_pair(prompt, chosen, rejected, tok, template="plain", seq_len=200)
    n = len(full[0][0])
    assert tokenize_pair(prompt, chosen, rejected, tok, template="plain", seq_len=n - 5) is None
    cut = tokenize_pair(
        prompt, chosen, rejected, tok, template="plain", seq_len=n - 5, too_long="truncate"
    )
    ids, mask = cut[0][0], cut[1][0]
    assert len(ids) == n - 5 and ids[0] == tok.bos_id
    np.testing.assert_array_equal(ids[1:], full[0][0][6:])  # the prompt kept its end
    np.testing.assert_array_equal(mask[1:], full[1][0][6:])
    capped = tokenize_pair(
        prompt, chosen, rejected, tok, template="plain", seq_len=200, max_prompt_length=10
    )
    first_answer_token = int(np.argmax(capped[1][0]))  # after 10 prompt tokens + the header
    assert first_answer_token == 11 and capped[0][0][0] == tok.bos_id
    assert tok.decode(capped[0][0][first_answer_token:]) == "elppa<|end|>"


def test_preference_iterator_resumes_exactly(tok):
    def make():
        return PreferenceBatchIterator(
            str(TINY / "pref_eval.jsonl"),
            tok,
            seq_len=64,
            global_batch_size=8,
            grad_accum=2,
            seed=3,
        )

    first = make()
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(2)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got["tokens"].shape == (2, 4, 2, 64) and got["margin"].shape == (2, 4)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert first.stats["dropped"] > 0  # a few eval pairs exceed 64 tokens


def test_finite_iterator_pads_the_last_batch_with_masked_pairs(tok):
    it = PreferenceBatchIterator(
        str(TINY / "pref_eval.jsonl"),
        tok,
        seq_len=64,
        global_batch_size=64,
        shuffle=False,
        num_epochs=1,
    )
    batches = list(it)
    assert sum(b["pair_mask"].sum() for b in batches) == it.stats["pairs"]
    assert batches[-1]["pair_mask"][0, -1] == 0 and batches[-1]["segment_ids"][0, -1].sum() == 0


# -- the reward model --------------------------------------------------------------------------


def test_reward_model_reads_the_last_real_token_with_left_or_right_padding():
    cfg = pref_config(Path("/tmp"), "rm")
    graphdef, params = nnx.split(RewardModel(cfg.model, nnx.Rngs(0)))
    rewards = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    rng = np.random.default_rng(0)
    t = 16
    rows = [rng.integers(4, 512, n) for n in (5, 9, t)]

    def padded(left):
        tokens, segments, positions = (np.zeros((3, t), np.int32) for _ in range(3))
        for i, r in enumerate(rows):
            where = slice(t - len(r), t) if left else slice(0, len(r))
            tokens[i, where], segments[i, where], positions[i, where] = r, 1, np.arange(len(r))
        return np.asarray(rewards(params, tokens, positions, segments)), tokens

    right, right_tokens = padded(left=False)
    left, left_tokens = padded(left=True)
    np.testing.assert_allclose(left, right, atol=1e-5)
    # The full row is unpadded in both layouts; padded rows read a real token, not padding.
    np.testing.assert_array_equal(left_tokens[2], right_tokens[2])
    whole = np.asarray(
        rewards(params, right_tokens, np.tile(np.arange(t), (3, 1)), np.ones((3, t), np.int32))
    )
    assert abs(whole[0] - right[0]) > 1e-4 and abs(whole[2] - right[2]) < 1e-5


def test_reward_model_loss_fn_matches_bradley_terry_reference(tok, tmp_path):
    cfg = pref_config(tmp_path, "rm", **{"rm.center_coef": 0.1})
    algo = RewardModelAlgorithm(cfg)
    model = RewardModel(cfg.model, nnx.Rngs(1))
    batch = {k: v[0] for k, v in next(algo.train_data(0, 1)).items()}
    batch["margin"] = np.linspace(0, 1, batch["margin"].shape[0]).astype(np.float32)
    batch["pair_mask"][-3:] = 0.0  # filler pairs do not count
    loss_sum, pairs, metrics = algo.loss_fn(model, batch, jax.random.PRNGKey(0))
    rewards = np.asarray(algo.pair_rewards(model, batch), np.float64)[:-3]
    c, r, m = rewards[:, 0], rewards[:, 1], batch["margin"][:-3].astype(np.float64)
    expected = np.sum(np.logaddexp(0.0, -(c - r - m)) + 0.1 * (c + r) ** 2)
    assert float(pairs) == len(c)
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.sum(c > r))
    np.testing.assert_allclose(float(metrics["min:reward/min"]), rewards.min(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["max:reward/max"]), rewards.max(), rtol=1e-5)


def test_reward_model_eval_min_max_are_over_the_whole_split(tmp_path):
    """Held-out reward/min and reward/max are the extremes over every eval pair (several
    batches of 2 micro-batches), not averages of per-batch extremes."""
    cfg = pref_config(tmp_path, "rm", **{"train.grad_accum": 2, "train.eval_batches": 4})
    algo = RewardModelAlgorithm(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[:1])
    params = trainer.fresh_state()["params"]
    rewards_fn = jax.jit(lambda p, b: algo.pair_rewards(nnx.merge(trainer.graphdef, p), b))
    rewards, batch_max = [], []
    for batch in algo.eval_data(0, 1):
        for a in range(cfg.train.grad_accum):
            micro = {k: v[a] for k, v in batch.items()}
            r = np.asarray(rewards_fn(params, micro))[micro["pair_mask"] > 0]
            rewards.append(r)
        batch_max.append(max(x.max() for x in rewards[-cfg.train.grad_accum :]))
    rewards = np.concatenate(rewards)
    eval_fn = jax.jit(make_eval_step(trainer.graphdef, algo.loss_fn))
    got = trainer._evaluate(eval_fn, params)
    np.testing.assert_allclose(got["eval/reward/min"], rewards.min(), rtol=1e-5)
    np.testing.assert_allclose(got["eval/reward/max"], rewards.max(), rtol=1e-5)
    np.testing.assert_allclose(got["eval/reward/mean"], rewards.mean(), rtol=1e-4, atol=1e-6)
    assert abs(np.mean(batch_max) - rewards.max()) > 1e-4  # the old averaging differs


# -- DPO ---------------------------------------------------------------------------------------


def dpo_first_step(tmp_path, **overrides):
    """One DPO step; returns the run's step-1 metrics and the metrics of the same batch after
    that step."""
    cfg = pref_config(tmp_path, "dpo", **{"train.lr": 3e-3, **overrides})
    algo = DPO(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[: cfg.mesh.fsdp])
    result = trainer.run()
    it = DPO(cfg).train_data(0, 1)  # the same first batch as the run's
    if algo.precompute:
        it.set_reference_logps(algo._train.ref_logps)
    batch = next(it)
    after = jax.jit(make_eval_step(trainer.graphdef, algo.loss_fn))(
        result.state["params"], trainer.to_global(batch), trainer.frozen
    )
    before = dict(result.history[0])
    # Real tokens of both sides of the first batch, from each row's last position (right
    # padding): what tokens/s must count, once (the reference's forward pass is not counted).
    before["real_tokens"] = float(
        np.sum((batch["positions"].max(-1) + 1) * batch["segment_ids"][..., 0])
    )
    return before, {k: float(v) / float(after["denominator"]) for k, v in after.items()}


@pytest.fixture(scope="module")
def frozen_reference_step(tmp_path_factory):
    return dpo_first_step(tmp_path_factory.mktemp("dpo_frozen"), **{"mesh.fsdp": 2})


def test_dpo_with_policy_equal_to_reference_starts_at_log_2(frozen_reference_step):
    before, _ = frozen_reference_step
    np.testing.assert_allclose(before["loss"], np.log(2.0), atol=1e-5)
    assert abs(before["rewards/margins"]) < 1e-4


def test_dpo_first_gradient_step_raises_margins(frozen_reference_step):
    before, after = frozen_reference_step
    assert after["rewards/margins"] > before["rewards/margins"] + 1e-3
    assert after["loss_sum"] < np.log(2.0)


def test_dpo_tokens_per_s_counts_real_tokens_of_chosen_and_rejected(frozen_reference_step):
    before, _ = frozen_reference_step
    # Step 1 is its own logging interval: tokens/s x seconds/step = the step's tokens.
    np.testing.assert_allclose(
        before["tokens_per_s"] * before["step_time_s"], before["real_tokens"], rtol=1e-6
    )


def test_precomputed_reference_equals_frozen_reference(tmp_path, frozen_reference_step):
    before, after = dpo_first_step(tmp_path, **{"dpo.precompute_ref": True})
    frozen_before, frozen_after = frozen_reference_step
    for key in ("loss", "rewards/margins", "logps/chosen", "rewards/chosen"):
        np.testing.assert_allclose(before[key], frozen_before[key], atol=1e-4)
    for key in ("loss_sum", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(after[key], frozen_after[key], atol=1e-4)
    assert list((tmp_path / "run" / "reference_logps").glob("train.0-of-1.npz"))


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_learns_preferences_saves_statistics_and_scores(tmp_path):
    cfg = pref_config(
        tmp_path,
        "rm",
        **{
            # lr 3e-3 is at the edge of stability here (120 steps: held-out over 0.6 on an AMD EPYC
            # VM, 0.59 on an Intel Xeon; 4e-3 stays at 0.55); 2e-3 rises steadily (0.71 at 160).
            "train.steps": 160,
            "train.lr": 2e-3,
            "train.warmup_steps": 10,
            "train.eval_every": 160,
            "rm.center_coef": 0.01,
            "model.tie_embeddings": "false",
            "train.weight_decay": 0.1,
        },
    )
    algo = RewardModelAlgorithm(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[:1])
    start = jax.tree.map(np.asarray, trainer.initial_params())
    result = trainer.run()
    # No loss reads an untied RM's LM head: it keeps its initial values (no weight decay) and
    # has no AdamW moments, while the backbone and the score head train.
    end, head = result.state["params"], start["backbone"]["lm_head"]
    np.testing.assert_array_equal(np.asarray(end["backbone"]["lm_head"]), head)
    assert not np.allclose(np.asarray(end["backbone"]["embed"]), start["backbone"]["embed"])
    moments = jax.tree.leaves(result.state["opt_state"])
    assert not any(getattr(x, "shape", None) == head.shape for x in moments)
    final = result.history[-1]
    # From random init on a 32-wide model in CI; from the SFT run the RM reaches far more (README).
    assert final["eval/accuracy"] > 0.6, final
    stats = result.extras  # the loop called algo.on_train_end
    saved = json.loads((tmp_path / "run" / "reward_stats.json").read_text())
    assert saved == stats and stats["count"] == 2 * stats["pairs"] and stats["std"] > 0
    assert abs(stats["accuracy"] - final["eval/accuracy"]) < 0.05  # 64-token vs full pairs

    records = [
        {"prompt": "Add 2 and 3.", "response": "The answer is 5."},
        {
            "messages": [
                {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "The answer is 5."},
            ]
        },
    ]
    out = tmp_path / "scored.jsonl"
    score_file(str(tmp_path / "run"), write_jsonl(tmp_path / "in.jsonl", records), str(out))
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["reward"] == pytest.approx(scored[1]["reward"], abs=1e-5)
    _, scorer, _ = load_reward_model(str(tmp_path / "run"))
    np.testing.assert_allclose(
        scored[0]["reward_normalized"],
        (scored[0]["reward"] - stats["mean"]) / stats["std"],
        rtol=1e-5,
    )
    assert scorer.params is not None


@pytest.mark.slow
def test_dpo_from_sft_raises_held_out_reward_accuracy_and_preferred_rate(tmp_path):
    """SFT on the bundled instructions, then DPO on the bundled pairs from that model: held-out
    implicit-reward accuracy and the preferred-answer rate both rise over the SFT model."""
    from jaxalign.trainers.sft import SFT

    sft_cfg = pref_config(
        tmp_path / "sft",
        "sft",
        **{
            "data.train_file": str(TINY / "sft_train.jsonl"),
            "data.eval_file": str(TINY / "sft_eval.jsonl"),
            "data.packing": True,
            "train.steps": 150,
            "train.batch_size": 16,
            "train.seq_len": 128,
            "train.lr": 3e-3,
            "train.warmup_steps": 10,
            "train.log_every": 150,
            "checkpoint.keep": 1,
        },
    )
    Trainer(sft_cfg, SFT(sft_cfg), devices=jax.devices()[:1]).run()
    cfg = pref_config(
        tmp_path,
        "dpo",
        **{
            "init_from": str(tmp_path / "sft" / "run"),
            "train.steps": 60,
            "train.lr": 1e-3,
            "train.warmup_steps": 5,
            "train.log_every": 60,
            "train.eval_every": 60,
            "dpo.beta": 0.1,
        },
    )
    algo = DPO(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[:1])
    result = trainer.run()
    eval_fn = jax.jit(make_eval_step(trainer.graphdef, algo.loss_fn))
    before = trainer._evaluate(eval_fn, trainer.frozen["reference"])  # the SFT model
    after = result.history[-1]
    assert before["eval/rewards/accuracies"] == 0.0  # policy = reference: all rewards 0
    # Measured: accuracy 0 -> 0.73, preferred-answer rate 0.59 -> 0.70 (191 pairs of <= 64 tokens).
    assert after["eval/rewards/accuracies"] > 0.6
    assert after["eval/preferred_rate"] > before["eval/preferred_rate"] + 0.05


def test_reward_model_scores_in_batches_sized_to_the_work(tmp_path):
    """8 sequences (on the 8-device test mesh) take one forward of 8 rows, not 32, and score as
    they do inside a batch of 32; 40 take a batch of 32, then one of 8; 3 take one of 8."""
    from toy import reward_model_run

    sets = [f"run_dir={tmp_path}", "trainer=rm", f"data.tokenizer={TINY / 'tokenizer.model'}"]
    cfg = load_config(None, [*sets, "train.seq_len=64"], base={"model": dict(MODEL)})
    reward_model_run(tmp_path, cfg)
    _, runner, _ = load_reward_model(str(tmp_path))
    rows, real = [], runner._fn

    def counting(params, tokens, *rest):
        rows.append(tokens.shape[0])
        return real(params, tokens, *rest)

    runner._fn = counting
    rng = np.random.default_rng(0)
    sequences = [rng.integers(4, 512, int(n)) for n in rng.integers(5, 30, 40)]
    few = runner.score(sequences[:8])
    assert rows == [8]
    rows.clear()
    every = runner.score(sequences)
    assert rows == [32, 8]
    np.testing.assert_allclose(few, every[:8], rtol=1e-5, atol=1e-5)
    rows.clear()
    np.testing.assert_allclose(runner.score(sequences[:3]), every[:3], rtol=1e-5, atol=1e-5)
    assert rows == [8]
    assert np.std(every) > 0

    # As a reward (the eval suite's rm_win_rate, rejection sampling): message prompts and
    # completions rendered in the RM's template, scored by the same runner.
    from jaxalign.data import render
    from jaxalign.eval.suite import rm_win_rate
    from jaxalign.rewards import Scorer

    scorer = Scorer.from_flags(None, str(tmp_path))
    prompts = [[{"role": "user", "content": f"Add {i} and 3."}] for i in range(3)]
    answers = ["The answer is 5.", "no", "6"]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ids = [
        render([*p, {"role": "assistant", "content": a}], tokenizer, cfg.data.template)[0]
        for p, a in zip(prompts, answers, strict=True)
    ]
    np.testing.assert_allclose(scorer(prompts, answers, [{}] * 3), runner.score(ids), atol=1e-6)
    records = [{"prompt": p[0]["content"]} for p in prompts]
    assert rm_win_rate(tmp_path, records, answers, answers) == 50.0  # all ties
