"""LoRA in the RL trainers and the inference commands: the rollout samples with the current
adapters (its log-probs equal the training forward's after updates), the reference is the policy
with its adapters off (no copy of the base), PPO's critic of adapters on the shared base or a
separate model, exact resume, and `generate`, `rejection-sample`, `eval` and `score` on LoRA
runs (the base rebuilt and checked, the checkpoint's adapters put in)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo_grpo import DATA
from test_ppo_grpo import rl_config as ppo_grpo_config
from toy import TINY_MODEL

from jaxalign.config import load_config
from jaxalign.errors import UserError
from jaxalign.trainers import make_algorithm
from jaxalign.trainers.loop import Trainer

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8}
# A score for every row (the tiny random policy rarely answers): PPO's losses are not all 0.
PPO = {"checkpoint.every": 2, "rl.kl_target": 0.5, "rl.missing_eos_penalty": 1.0}


def rl_config(path, trainer="grpo", **overrides):
    """test_ppo_grpo's tiny RL config with LoRA adapters, a KL term and a learning rate large
    enough that the adapters move visibly in two steps."""
    lora_rl = {
        "data.template": "plain",
        "rl.kl_coef": 0.1,
        "train.steps": 4,
        "train.lr": 3e-2,
        **LORA,
        **overrides,
    }
    return ppo_grpo_config(path, trainer, **lora_rl)


def run(cfg):
    algo = make_algorithm(cfg)
    trainer = Trainer(cfg, algo)
    return algo, trainer, trainer.run()


def leaves(tree) -> dict[str, np.ndarray]:
    from jaxalign.optim import param_path

    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {param_path(p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A LoRA GRPO run of two rollouts (2 steps each), merged sampling: (cfg, trainer, result)."""
    cfg = rl_config(tmp_path_factory.mktemp("grpo"))
    algo, trainer, result = run(cfg)
    return cfg, trainer, result, algo


@pytest.mark.slow
def test_rollout_samples_with_current_adapters_and_reference_is_the_base(grpo_run):
    """After two updates the second rollout's sampler log-probs (merged W + s A@B decoding)
    equal the training forward's on the same parameters to 1e-5 (f32): no stale weights; so do
    those of unmerged sampling (adapters in each decode step) from the final adapters. The
    adapters moved, the base did not, and the reference kept no copy of the base: its
    log-probs, the policy with adapters off, equal a plain model's on the base weights."""
    from flax import nnx

    from jaxalign.models.lora import base_params
    from jaxalign.models.registry import build
    from jaxalign.trainers.rl_rows import response_logprobs
    from jaxalign.trainers.rollout_engine import RolloutEngine

    cfg, trainer, result, algo = grpo_run
    gaps = [h["rollout/sampler_logprob_gap"] for h in result.history if "objective/kl" in h]
    assert len(gaps) == 2 and max(gaps) < 1e-5
    final = leaves(result.state["params"])
    moved = [k for k, v in final.items() if k.endswith("_lora_b") and np.abs(v).max() > 1e-3]
    assert len(moved) == 7  # wq wk wv wo w_gate w_up w_down of the one layer
    initial = leaves(trainer.initial_params())
    for key in base_params({k: None for k in final}):
        np.testing.assert_array_equal(final[key], initial[key])
    assert jax.tree.leaves(algo.reference.params) == []  # nothing copied: the overrides are {}
    # The second rollout's KL is between the trained adapters and the base: positive.
    kls = [h["objective/kl"] for h in result.history if "objective/kl" in h]
    assert kls[0] == 0.0 and kls[1] > 0

    # Unmerged sampling (adapters in every decode step) from the final adapters: the same.
    unmerged_cfg = dataclasses.replace(
        cfg, rl=dataclasses.replace(cfg.rl, lora_sampling="unmerged")
    )
    data = algo.data
    unmerged = RolloutEngine(
        unmerged_cfg,
        trainer.mesh,
        trainer.rules,
        trainer.graphdef,
        algo,
        data.tokenizer,
        data.scorer,
    )
    out = unmerged.rollout(data._prompt_batches(), result.state["params"], None, 2, 0.1)
    assert out.metrics["rollout/sampler_logprob_gap"] < 1e-5

    # The reference forward on the final params equals a plain model's on their base.
    engine = algo.data.engine
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 512, (8, 40)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "positions": np.tile(np.arange(40, dtype=np.int32), (8, 1)),
        "segment_ids": np.ones((8, 40), np.int32),
        "mask": np.ones((8, 8), np.float32),  # the last 8 positions: the response
    }
    batch = {k: engine._put(v) for k, v in batch.items()}
    ref = engine._reference_forward(result.state["params"], {}, batch)
    plain_cfg = cfg.model.__class__(**{**cfg.model.__dict__, "lora": None})
    plain = nnx.graphdef(nnx.eval_shape(lambda: build(plain_cfg, nnx.Rngs(0))))
    base = base_params(jax.device_get(result.state["params"]))
    want = response_logprobs(nnx.merge(plain, base), batch, 1.0, with_entropy=False)[0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_ppo_resumes_bitwise_with_a_critic_of_adapters_on_the_shared_base(tmp_path):
    """LoRA PPO (critic: its own adapters + head on the policy's base) for two rollouts with a
    checkpoint after each; a copy of the run with only the first checkpoint resumes to the same
    losses and parameters, bit for bit. The checkpoint holds adapters and the head, no base;
    `load_policy` rebuilds the policy exactly."""
    import shutil

    from jaxalign.generate import load_policy

    cfg = rl_config(tmp_path / "a", "ppo", **PPO)
    algo, trainer, straight = run(cfg)
    params = leaves(straight.state["params"])
    assert not any(k.startswith("value/backbone") and "_lora_" not in k for k in params)
    labels = leaves(trainer.labels)
    trained = sorted(k for k, v in labels.items() if v == "trained")
    assert all("_lora_" in k or k == "value/score" for k in trained) and len(trained) == 29
    value_b = [v for k, v in params.items() if k.startswith("value/") and k.endswith("_lora_b")]
    assert value_b and all(np.abs(v).max() > 0 for v in value_b)  # the critic's adapters train
    base = json.loads((tmp_path / "a/run/checkpoints/4/base/metadata").read_text())
    assert base["source"] == f"seed {cfg.train.seed}"  # the base by reference

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/run/checkpoints/4")
    resumed_cfg = rl_config(tmp_path / "b", "ppo", **PPO)
    _, _, resumed = run(resumed_cfg)
    assert [h["step"] for h in resumed.history] == [3, 4]
    for got, want in zip(resumed.history, straight.history[2:], strict=True):
        for key in ("loss", "loss/policy", "loss/value", "kl_coef", "objective/kl"):
            if key in want:
                assert got[key] == want[key], key
    for key, value in leaves(resumed.state["params"]).items():
        np.testing.assert_array_equal(value, params[key], err_msg=key)

    policy = load_policy(tmp_path / "a" / "run")
    for key, value in leaves(policy.params).items():
        np.testing.assert_array_equal(value, params["policy/" + key], err_msg=key)


@pytest.mark.slow
def test_lora_ppo_with_a_separate_critic_trains_it_in_full(tmp_path):
    """rl.lora_critic=separate: the value model is a plain model started from the base (a copy)
    with a zero head and trained in full; the policy trains through its adapters only."""
    cfg = rl_config(tmp_path, "ppo", **{**PPO, "rl.lora_critic": "separate", "train.steps": 2})
    _, trainer, result = run(cfg)
    params = leaves(result.state["params"])
    initial = leaves(trainer.initial_params())
    labels = leaves(trainer.labels)
    value_keys = [k for k in params if k.startswith("value/") and "lm_head" not in k]
    assert not any("_lora_" in k for k in value_keys)
    assert all(labels[k] == "trained" for k in value_keys)
    for key in value_keys:  # a copy of the policy's base, moved by training
        if key != "value/score":
            np.testing.assert_array_equal(initial[key], initial["policy/" + key[15:]])
    wq = "value/backbone/blocks/0/attn/wq"
    assert np.abs(params[wq] - initial[wq]).max() > 0
    for key, value in params.items():
        if key.startswith("policy/") and "_lora_" not in key:
            np.testing.assert_array_equal(value, initial[key], err_msg=key)


def test_qlora_ppo_from_a_run_quantizes_its_base_and_copies_it_dequantized_to_the_critic(
    grpo_run, tmp_path
):
    """LoRA PPO with an int8 base, `init_from` the LoRA GRPO run (its merged model) and a
    separate critic: the policy's base is stored quantized, with fresh adapters, and the
    critic's backbone is that base dequantized (the same numbers in full precision)."""
    from jaxalign.models import quant
    from jaxalign.models.lora import is_quantized

    overrides = {"model.lora.quantize": "int8", "model.lora.quant_block": 32}
    sets = {**PPO, **overrides, "rl.lora_critic": "separate", "init_from": grpo_run[0].run_dir}
    cfg = rl_config(tmp_path, "ppo", **sets)
    params = jax.device_get(Trainer(cfg, make_algorithm(cfg)).initial_params())
    policy, critic = params["policy"], params["value"]["backbone"]
    quantized = set()
    for path, weight in jax.tree_util.tree_flatten_with_path(
        critic, is_leaf=lambda x: isinstance(x, np.ndarray)
    )[0]:
        node = policy
        for key in path:
            node = node[key.key if hasattr(key, "key") else key.idx]
        if is_quantized(node):
            quantized.add(str(path[-1].key))
            node = quant.dequantize(node, jnp.float32)
        # codes x scale in float32, compiled or not: equal up to one rounding
        want = np.asarray(node, np.float32)
        np.testing.assert_allclose(weight.astype(np.float32), want, rtol=3e-7, atol=0)
    assert quantized == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    adapters_b = [v for k, v in leaves(policy).items() if k.endswith("_lora_b")]
    assert adapters_b and all(np.all(b == 0) for b in adapters_b)  # fresh adapters


@pytest.mark.slow
def test_generate_rejection_sample_and_eval_load_a_lora_run(grpo_run, tmp_path):
    """The LoRA GRPO run through the commands: `load_policy` rebuilds exactly the trained
    parameters (seeded base + the checkpoint's adapters), `generate` writes what the sampler
    gives on them, `rejection-sample` and `eval` run on it, and a config naming another base
    is refused in one line."""
    from jaxalign.cli import main
    from jaxalign.data import load_tokenizer, render_prompt, stop_token_ids
    from jaxalign.generate import FINISH_REASONS, Sampler, load_policy

    cfg, _, result, _ = grpo_run
    run_dir = str(Path(cfg.run_dir))
    policy = load_policy(run_dir)
    want = leaves(result.state["params"])
    got = leaves(policy.params)
    assert got.keys() == want.keys()
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)

    prompts = tmp_path / "prompts.jsonl"
    texts, answers = ["What is 2 + 3?", "What is 4 + 4?"], ["5", "8"]
    records = [{"prompt": t, "family": "arithmetic", "answer": a} for t, a in zip(texts, answers)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    args = ["--model", run_dir, "--input", str(prompts), "--no-progress"]
    assert main(["generate", *args, "--output", str(out), "--set", "sampling.temperature=0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(cfg.data.tokenizer)
    sampling = dataclasses.replace(cfg.sampling, temperature=0.0)
    sampler = Sampler(cfg.model, sampling, stop_token_ids=stop_token_ids(tok, "plain"))
    ids = [render_prompt([{"role": "user", "content": t}], tok) for t in texts]
    direct = jax.device_get(sampler.generate(result.state["params"], ids))
    for r, row in enumerate(rows):
        n = int(direct.lengths[r])
        stop = FINISH_REASONS[direct.finish_reasons[r]] == "stop"
        assert row["completion"] == tok.decode(direct.tokens[r, : n - 1 if stop else n])

    reward = tmp_path / "reward.py"
    reward.write_text(
        "def reward(prompts, completions, **f):\n    return [len(c) for c in completions]\n"
    )
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    rs = ["rejection-sample", *args, "--reward-fn", f"{reward}:reward", "--output-sft", str(sft)]
    assert main([*rs, "--output-dpo", str(dpo), "--set", "sampling.num_samples=2"]) == 0
    best = [json.loads(line) for line in sft.read_text().splitlines()]
    assert best and all(r["score"] == len(r["completion"]) for r in best)

    generations = tmp_path / "generations.jsonl"
    ev = ["eval", "--model", run_dir, "--eval-file", str(prompts), "--max-new-tokens", "8"]
    assert main([*ev, "--generations", str(generations)]) == 0
    evaluated = [json.loads(line) for line in generations.read_text().splitlines()]
    assert [r["completion"] for r in evaluated] == [r["completion"] for r in rows]

    with pytest.raises(UserError, match="trained on another base .* seed 7") as error:
        load_policy(run_dir, ["train.seed=7"])
    assert "\n" not in str(error.value)


def test_score_command_scores_with_a_lora_reward_model(tmp_path):
    """A LoRA reward-model run (random adapters and head on a seeded base) scores a file as the
    same model merged into a plain run does (1e-5, f32)."""
    from flax import nnx
    from toy import write_run

    from jaxalign.checkpoint import Checkpointer
    from jaxalign.cli import main
    from jaxalign.config import save_config, to_dict
    from jaxalign.hf.peft import merge_lora
    from jaxalign.models.lora import base_reference
    from jaxalign.models.params import init_params
    from jaxalign.models.reward import RewardModel
    from jaxalign.optim import trained_labels, trained_part

    sets = {
        "trainer": "rm",
        "run_dir": str(tmp_path / "lora"),
        "data.tokenizer": str(DATA / "tokenizer.model"),
        "data.template": "plain",
        "train.seq_len": 32,
        **LORA,
    }
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()], base=base)
    model = nnx.eval_shape(lambda: RewardModel(cfg.model, nnx.Rngs(0)))
    shardings = jax.tree.map(lambda _: None, nnx.split(model)[1].to_pure_dict())
    params = jax.device_get(
        init_params(cfg, shardings, cfg.train.seed, lambda r: RewardModel(cfg.model, r))
    )
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            rng.normal(0, 0.2, x.shape).astype(np.float32)
            if "_lora_b" in jax.tree_util.keystr(p) or "score" in jax.tree_util.keystr(p)
            else np.asarray(x)
        ),
        params,
    )
    labels = trained_labels(cfg, params)
    ckpt = Checkpointer(tmp_path / "lora" / "checkpoints", keep=1, async_save=False)
    ckpt.save(
        1,
        {"params": trained_part(params, labels)},
        {},
        to_dict(cfg),
        force=True,
        base=base_reference(cfg),
    )
    ckpt.close()
    save_config(cfg, tmp_path / "lora" / "config.yaml")
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
    write_run(tmp_path / "plain", plain, jax.device_get(merge_lora(params, cfg.model.lora)))

    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
            for w in ("yes", "no", "a long answer")
        )
    )
    scores = {}
    for name in ("lora", "plain"):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(
                [
                    "score",
                    "--model",
                    str(tmp_path / name),
                    "--input",
                    str(records),
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        scores[name] = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(scores["lora"], scores["plain"], atol=1e-5, rtol=0)
    assert np.std(scores["lora"]) > 0
