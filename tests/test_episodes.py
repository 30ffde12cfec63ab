"""Multi-turn episodes in rollouts (rl.environment, jaxalign/trainers/episodes.py): the
assembled rows and loss masks token by token, sampler/trainer log-prob parity over every model
turn, config errors, and a tiny GRPO run with the calculator environment."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo_grpo import DATA, rollout_data, start
from toy import TINY_MODEL

from jaxalign.cli import main as cli_main
from jaxalign.config import load_config
from jaxalign.data import load_tokenizer
from jaxalign.data.templates import render, render_prompt, stop_token_ids
from jaxalign.envs import format_tool_call, tools_prompt
from jaxalign.envs.calculator import CALCULATOR
from jaxalign.errors import DataError, UserError
from jaxalign.eval.compare import compare_metrics
from jaxalign.eval.episodes import environment_name, evaluate_environments, parse_environment_arg
from jaxalign.generate import Generation, Sampler, Stops
from jaxalign.trainers import make_algorithm
from jaxalign.trainers.episodes import Episode, EpisodeRunner, episode_metrics, read_episode_records
from jaxalign.trainers.rl_rows import build_rows
from jaxalign.trainers.rollout_engine import RolloutEngine

ECHO_ENV = '''
class Echo:
    """Every model turn gets a tool message back and reward 1; never done."""

    tools = ()

    def reset(self, record):
        return record["messages"]

    def step(self, text):
        return [{"role": "tool", "content": "ok"}], 1.0, False, {"tool_calls": 1}
'''


def episode_config(tmp_path, **overrides):
    sets = {
        "trainer": "grpo",
        "run_dir": str(tmp_path / "run"),
        "data.train_file": str(DATA / "rl_prompts_train.jsonl"),
        "data.tokenizer": str(DATA / "tokenizer.model"),
        "data.prompt_buckets": "[160]",  # the calculator's tools prompt is long
        "sampling.max_new_tokens": 24,
        "sampling.batch_size": 4,
        "rl.prompts_per_rollout": 4,
        "rl.num_generations": 2,
        "rl.environment": "calculator",
        "rl.max_turns": 2,
        "rl.turn_tokens": 4,
        "rl.kl_coef": 0.0,
        "rl.sampler": "static",  # what patched_generate patches (tests/test_continuous.py)
        "train.steps": 1,
        "train.batch_size": 8,
        "train.seq_len": 184,
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.progress": False,
        "train.peak_flops_per_device": 1e9,
        "checkpoint.every": 0,
        "logging.tensorboard": False,
        **overrides,
    }
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()], base=base)


@contextlib.contextmanager
def patched_generate(fn):
    """Sampler.generate_padded replaced by `fn(real, self, *args)` for the block."""
    real = Sampler.generate_padded
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sampler, "generate_padded", lambda self, *a, **k: fn(real, self, *a, **k))
        yield


def cut_turns(cut: int):
    """Every turn ends after `cut` tokens as if it stopped there: the kept tokens and their
    log-probs are the sampler's own (a random model rarely emits a stop token)."""

    def generate(real, self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        keep = jnp.arange(out.tokens.shape[1])[None] < cut
        return Generation(
            tokens=jnp.where(keep, out.tokens, self.pad_id),
            lengths=jnp.full_like(out.lengths, cut),
            finish_reasons=jnp.ones_like(out.finish_reasons),
            model_logprobs=jnp.where(keep, out.model_logprobs, 0.0),
            sampling_logprobs=jnp.where(keep, out.sampling_logprobs, 0.0),
            num_steps=out.num_steps,
        )

    return generate


@pytest.fixture(scope="module")
def echo_rollout(tmp_path_factory):
    """A GRPO rollout's sampled round of Echo episodes (2 model turns of 3 sampled tokens with
    an observation between them), its config, engine and train state."""
    tmp = tmp_path_factory.mktemp("echo")
    (tmp / "echo_env.py").write_text(ECHO_ENV)
    cfg = episode_config(tmp, **{"rl.environment": f"{tmp / 'echo_env.py'}:Echo"})
    with patched_generate(cut_turns(3)):
        algo, trainer, state, data = rollout_data(cfg)
        engine = data.engine
        sampled = engine.sample_round(
            data._prompt_batches(), algo.policy_params(state["params"]), 0, 0, {}
        )
    return cfg, engine, state, sampled


def test_sampler_logprobs_of_every_model_token_equal_the_trainers_forward(echo_rollout):
    cfg, engine, state, sampled = echo_rollout
    mask = sampled["loss_mask"]
    assert (sampled["rollout/episode/turns"] == 2).all()
    assert (mask.sum(axis=1) == 6).all()  # 2 turns x 3 tokens
    # Observation tokens sit between the model's turns: the mask has holes.
    assert ((mask[:, :-1] == 0) & (mask[:, 1:] == 1)).any(axis=1).all()
    rows = build_rows(
        sampled["prompt_tokens"],
        sampled["prompt_lengths"],
        sampled["response"],
        sampled["lengths"],
        sampled["prompt_tokens"].shape[1],
        engine.tokenizer.pad_id,
    )
    rows["mask"] = mask
    batch = {k: engine._put(v) for k, v in rows.items()}
    trainer_lp = np.asarray(engine._policy_forward(state["params"], batch)["old_logprobs"])
    model = mask > 0
    np.testing.assert_allclose(trainer_lp[model], sampled["sampling_lp"][model], atol=1e-5)
    assert np.abs(sampled["sampling_lp"][model]).min() > 0
    assert (sampled["sampling_lp"][~model] == 0).all()


def test_episode_limits_and_rewards_are_counted(echo_rollout):
    _, _, _, sampled = echo_rollout
    # Echo never ends an episode: each stops at rl.max_turns with one reward per stepped turn.
    np.testing.assert_array_equal(sampled["rollout/episode/turn_limit"], 1.0)
    np.testing.assert_array_equal(sampled["rollout/episode/token_limit"], 0.0)
    np.testing.assert_array_equal(sampled["raw_scores"], 2.0)
    np.testing.assert_array_equal(sampled["rollout/episode/tool_calls"], 2.0)
    assert not sampled["stopped"].any()


def test_calculator_episode_rows_and_masks_token_by_token(tmp_path):
    """A scripted model calls the calculator, reads its result and answers: the row is the
    hand-built [prompt | call, end | tool message, assistant header | answer, end] with the
    loss mask on the model's tokens only, in the sampled round and in the rollout buffer."""
    data_file = tmp_path / "sums.jsonl"
    data_file.write_text(
        "".join(json.dumps({"prompt": "What is 2+3?", "answer": a}) + "\n" for a in "5577")
    )
    cfg = episode_config(
        tmp_path,
        **{
            "data.train_file": str(data_file),
            "sampling.max_new_tokens": 96,
            "rl.turn_tokens": 0,
            "train.seq_len": 256,
        },
    )
    tok = None
    turns = []

    def scripted(real, self, params, prompt_tokens, *args, **kwargs):
        ids = turns[len(scripted.calls)]
        scripted.calls.append(np.asarray(prompt_tokens))
        b, n = prompt_tokens.shape[0], self.sampling.max_new_tokens
        tokens = np.full((b, n), self.pad_id, np.int32)
        tokens[:, : len(ids)] = ids
        logprobs = np.where(np.arange(n) < len(ids), -0.5, 0.0).astype(np.float32)
        return Generation(
            tokens=jnp.asarray(tokens),
            lengths=jnp.full((b,), len(ids), jnp.int32),
            finish_reasons=jnp.ones((b,), jnp.int32),
            model_logprobs=jnp.asarray(np.tile(logprobs, (b, 1))),
            sampling_logprobs=jnp.asarray(np.tile(logprobs, (b, 1))),
            num_steps=jnp.int32(len(ids)),
        )

    scripted.calls = []
    results = []
    real_rollout = RolloutEngine.rollout
    with (
        patched_generate(scripted),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr(
            RolloutEngine,
            "rollout",
            lambda self, *a, **k: results.append(real_rollout(self, *a, **k)) or results[-1],
        )
        algo, trainer, state, data = rollout_data(cfg)
        tok = data.tokenizer
        end = stop_token_ids(tok, "plain")[0]  # <|end|>
        call = format_tool_call("calculate", {"expression": "2+3"}, "hermes")
        turns += [[*tok.encode(call), end], [*tok.encode("The answer is 5."), end]]
        next(data)
    (result,) = results

    system = tools_prompt([CALCULATOR], "hermes")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2+3?"}]
    prompt = render_prompt(messages, tok, "plain")
    observation = [*tok.encode("<|tool|>"), *tok.encode("5"), end, *tok.encode("<|assistant|>")]
    want_tokens = [*turns[0], *observation, *turns[1]]
    want_mask = [1.0] * len(turns[0]) + [0.0] * len(observation) + [1.0] * len(turns[1])
    # The second turn was sampled from exactly the first turn's row so far.
    second_prefix = scripted.calls[1][0]
    np.testing.assert_array_equal(
        second_prefix[second_prefix != tok.pad_id][
            -len(prompt) - len(turns[0]) - len(observation) :
        ],
        [*prompt, *turns[0], *observation],
    )
    buffer = result.buffer
    width = buffer["tokens"].shape[1] - buffer["mask"].shape[1]
    k = len(want_tokens)
    for r in range(8):
        row = buffer["tokens"][r]
        np.testing.assert_array_equal(row[width - len(prompt) : width], prompt)
        np.testing.assert_array_equal(row[width : width + k], want_tokens)
        np.testing.assert_array_equal(buffer["mask"][r, :k], want_mask)
        assert (buffer["mask"][r, k:] == 0).all() and (row[width + k :] == tok.pad_id).all()
        assert (buffer["advantages"][r][buffer["mask"][r] == 0] == 0).all()
    np.testing.assert_array_equal(result.scores, [1, 1, 1, 1, 0, 0, 0, 0])
    m = result.metrics
    # A record the environment cannot start from: one line naming its file and line.
    data_file.write_text('{"prompt": "What is 2+3?", "answer": "five"}\n' * 4)
    with pytest.raises(DataError, match=r"sums.jsonl:1: rl.environment cannot start an episode "):
        next(rollout_data(cfg)[3])
    assert m["rollout/episode/turns"] == 2 and m["rollout/episode/tool_calls"] == 1
    assert m["rollout/episode/tool_errors"] == 0 and m["rollout/episode/turn_limit"] == 0
    assert m["rollout/response_length"] == k


class ScriptedSampler:
    """A turn sampler whose every call returns the next of `turns` (token ids) in every row, as
    stopped, log-prob -0.5 per token; `calls` holds each call's prefix tokens."""

    def __init__(self, turns: list[list[int]], max_new_tokens: int, pad_id: int):
        self.turns, self.n, self.pad_id = turns, max_new_tokens, pad_id
        self.calls: list[np.ndarray] = []

    def generate_padded(self, params, prompt_tokens, *args):
        ids = self.turns[len(self.calls)]
        self.calls.append(np.asarray(prompt_tokens))
        b = prompt_tokens.shape[0]
        tokens = np.full((b, self.n), self.pad_id, np.int32)
        tokens[:, : len(ids)] = ids
        logprobs = np.where(np.arange(self.n) < len(ids), -0.5, 0.0).astype(np.float32)
        return Generation(
            tokens=tokens,
            lengths=np.full((b,), len(ids), np.int32),
            finish_reasons=np.ones((b,), np.int32),
            model_logprobs=np.tile(logprobs, (b, 1)),
            sampling_logprobs=np.tile(logprobs, (b, 1)),
            num_steps=len(ids),
        )


def test_a_turn_ended_at_a_stop_string_is_closed_as_the_template_renders_it(tmp_path):
    """sampling.stop ends the tool call at `</tool_call>` without the end marker: the string
    stays in the assistant message (the call parses: one call, no error), the end marker comes
    before the tool message as context, and the row equals the chat template's rendering of the
    whole conversation token by token."""
    data_file = tmp_path / "sums.jsonl"
    data_file.write_text((json.dumps({"prompt": "What is 2+3?", "answer": 5}) + "\n") * 2)
    cfg = episode_config(
        tmp_path,
        **{
            "data.train_file": str(data_file),
            "sampling.max_new_tokens": 96,
            "sampling.stop": '["</tool_call>"]',
            "rl.turn_tokens": 0,
        },
    )
    tok = load_tokenizer(cfg.data.tokenizer)
    end = stop_token_ids(tok, "plain")[0]  # <|end|>
    call = format_tool_call("calculate", {"expression": "2+3"}, "hermes")
    assert call.endswith("</tool_call>")
    turns = [tok.encode(call), [*tok.encode("The answer is 5."), end]]
    sampler = ScriptedSampler(turns, 96, tok.pad_id)
    runner = EpisodeRunner(cfg, tok, Stops.for_config(tok, cfg), sampler, rows_per_call=2)
    records, row_ids = read_episode_records(str(data_file), tok, "plain")
    assert row_ids == [f"{data_file}:1", f"{data_file}:2"]
    episodes, width = runner.start(records, row_ids, cfg.data.prompt_buckets)
    runner.run(episodes, width, None, np.arange(2, dtype=np.int32), 0, {})

    conversation = [
        {"role": "system", "content": tools_prompt([CALCULATOR], "hermes")},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "calculate", "content": "5"},
        {"role": "assistant", "content": "The answer is 5."},
    ]
    rendered, trained = render(conversation, tok, "plain")
    assert rendered[-1] == tok.eos_id  # the closing EOS, which an episode row leaves out
    rendered, trained = rendered[:-1], trained[:-1]
    observation = [
        end,
        *tok.encode("<|tool|>"),
        *tok.encode("5"),
        end,
        *tok.encode("<|assistant|>"),
    ]
    for e in episodes:
        assert e.messages[2:] == conversation[2:] and e.done
        np.testing.assert_array_equal([*e.prompt, *e.tokens], rendered)
        np.testing.assert_array_equal(e.tokens, [*turns[0], *observation, *turns[1]])
        # The template trains the assistant's end marker; the episode cannot (the model did
        # not sample it); otherwise the masks agree.
        model = np.asarray(trained[len(e.prompt) :], np.float32)
        model[len(turns[0])] = 0.0
        np.testing.assert_array_equal(e.mask, model)
        assert (e.tool_calls, e.tool_errors, e.reward) == (1, 0, 1.0)
    # The second turn was sampled from the row so far, the end marker included.
    second = sampler.calls[1][0]
    assert list(second[second != tok.pad_id]) == [*episodes[0].prompt, *turns[0], *observation]


def test_environment_config_errors_are_one_line(tmp_path):
    cases = [
        (
            {"rl.reward_functions": '["jaxalign.rewards:exact_answer"]'},
            "leave rl.reward_functions and rl.reward_model empty",
        ),
        ({"rl.max_turns": 0}, "rl.max_turns must be >= 1, got 0"),
        ({"rl.turn_tokens": 25}, r"rl.turn_tokens must be in \[0, sampling.max_new_tokens = 24\]"),
        ({"rl.tool_timeout": 0}, "rl.tool_timeout must be positive"),
        ({"rl.turn_rewards": True}, "rl.turn_rewards is for ppo and reinforce_pp"),
        ({"rl.environment": "no_such_module:Env"}, "rl.environment: 'no_such_module:Env': cannot"),
    ]
    for sets, message in cases:
        with pytest.raises(UserError, match=message):
            make_algorithm(episode_config(tmp_path, **sets))


def test_per_turn_rewards_give_reinforce_pp_returns_across_turns():
    """rl.turn_rewards: each step's reward sits on its turn's last model token and REINFORCE++'s
    returns sum the rewards of the model tokens after each one, skipping observation tokens
    (float64 NumPy reference); what the baseline changed in the score goes on the last token."""
    cfg = episode_config(
        Path("/nonexistent"),
        **{
            "trainer": "reinforce_pp",
            "rl.turn_rewards": True,
            "rl.reinforce_baseline": True,
            "rl.whiten_advantages": False,
            "rl.gamma": 0.9,
            "rl.kl_coef": 0.1,
        },
    )
    algo = make_algorithm(cfg)
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 10), np.float32)
    mask[:, 0:3] = mask[:, 6:8] = 1  # turn 1 | observation | turn 2 | padding
    mask[1, 8] = 1
    turn_rewards = np.zeros((2, 10), np.float32)
    turn_rewards[:, 2] = [0.5, 0.0]
    turn_rewards[0, 7], turn_rewards[1, 8] = 1.0, 2.0
    raw = turn_rewards.sum(axis=1)
    kl = np.where(mask > 0, rng.normal(size=(2, 10)), 0.0).astype(np.float32)
    rollout = {
        "mask": jnp.asarray(mask),
        "scores": jnp.asarray(raw),
        "raw_scores": jnp.asarray(raw),
        "turn_rewards": jnp.asarray(turn_rewards),
    }
    advantages, _ = algo.reinforce_advantages(rollout, jnp.asarray(kl), jnp.float32(0.1))

    centered = raw.astype(np.float64) - raw.mean()  # the group baseline (G = 2)
    want = np.zeros((2, 10))
    for r in range(2):
        positions = np.flatnonzero(mask[r])
        rewards = -0.1 * kl[r].astype(np.float64) + turn_rewards[r]
        rewards[positions[-1]] += centered[r] - raw[r]
        future = 0.0
        for t in positions[::-1]:
            future = rewards[t] + 0.9 * future
            want[r, t] = future
    np.testing.assert_allclose(np.asarray(advantages), want, rtol=1e-5, atol=1e-6)


def test_ppo_on_episodes_runs_gae_over_model_tokens_only(echo_rollout):
    """PPO on an Echo rollout's rows: values are read at model tokens, GAE runs across turns
    with observation tokens skipped (the next model token's value bootstraps across an
    observation; gamma and lambda apply once per model token), per-turn rewards on each turn's
    last token. Float64 NumPy reference."""
    _, _, _, sampled = echo_rollout
    sets = {"trainer": "ppo", "rl.turn_rewards": True, "rl.whiten_advantages": False}
    sets |= {"rl.gamma": 0.9, "rl.lam": 0.8, "rl.kl_coef": 0.1, "rl.num_generations": 1}
    sets |= {"rl.prompts_per_rollout": 8}
    algo = make_algorithm(episode_config(Path("/nonexistent"), **sets))
    mask = sampled["loss_mask"]
    # Echo's steps: reward 1 after each of the two turns, on the turn's last token.
    turn_rewards = np.zeros_like(mask)
    for r in range(len(mask)):
        model = np.flatnonzero(mask[r])
        turn_rewards[r, model[2]] = turn_rewards[r, model[5]] = 1.0
    rng = np.random.default_rng(0)
    old = np.where(mask > 0, sampled["sampling_lp"], 0.0).astype(np.float32)
    ref = (old + np.where(mask > 0, rng.normal(0, 0.1, mask.shape), 0)).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)  # garbage at observations: unused
    rollout = {
        "mask": mask,
        "scores": sampled["scores"].astype(np.float32),
        "raw_scores": sampled["raw_scores"].astype(np.float32),
        "turn_rewards": turn_rewards,
        "old_logprobs": old,
        "ref_logprobs": ref,
        "values": values,
        "entropy": np.zeros_like(mask),
    }
    buffer, _ = algo.postprocess({k: jnp.asarray(v) for k, v in rollout.items()}, 0.1)

    want_adv, want_ret = np.zeros(mask.shape), np.zeros(mask.shape)
    for r in range(len(mask)):
        model = np.flatnonzero(mask[r])
        rewards = -0.1 * (old[r].astype(np.float64) - ref[r]) + turn_rewards[r]
        next_value = next_adv = 0.0
        for t in model[::-1]:
            delta = rewards[t] + 0.9 * next_value - values[r, t]
            next_adv = delta + 0.9 * 0.8 * next_adv
            next_value = values[r, t]
            want_adv[r, t], want_ret[r, t] = next_adv, next_adv + values[r, t]
    np.testing.assert_allclose(np.asarray(buffer["advantages"]), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(buffer["returns"]), want_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(buffer["old_values"])[mask == 0], 0.0)


@pytest.mark.slow
def test_calculator_grpo_run_evals_episodes_and_resumes_mid_episode_exactly(tmp_path):
    """A tiny GRPO run with the calculator: two rollouts straight through (with greedy episode
    evals before each), or crashed in the middle of the second rollout's episodes and resumed
    from the step-1 checkpoint: the same step 2. `jaxalign eval --environment` of that
    checkpoint reports what the straight run's own eval of the step-1 parameters logged."""
    data_file, eval_file = tmp_path / "sums.jsonl", tmp_path / "held_out.jsonl"
    sums = [(a, b) for a in range(2, 6) for b in range(3, 5)]
    for path, pairs in ((data_file, sums), (eval_file, sums[:4])):
        path.write_text(
            "".join(
                json.dumps({"prompt": f"What is {a}+{b}?", "answer": a + b}) + "\n"
                for a, b in pairs
            )
        )
    overrides = {"data.train_file": str(data_file), "train.steps": 2}
    # Evals do not change training: only the straight run evaluates.
    evals = {"data.eval_file": str(eval_file), "rl.eval_every": 1}
    _, trainer, init = start(episode_config(tmp_path / "straight", **overrides, **evals))
    straight = trainer.run(init_params=init).history
    assert [h["step"] for h in straight] == [1, 2]
    metrics = straight[0]
    for key in (
        "rollout/episode/turns",
        "rollout/episode/tool_calls",
        "rollout/episode/tool_errors",
        "rollout/episode/turn_limit",
        "rollout/episode/token_limit",
        "loss/policy",
        "objective/scores",
    ):
        assert np.isfinite(metrics[key]), key
    # Every episode ended one way: the environment's answer (stopped), or a limit.
    ends = ("rollout/eos_fraction", "rollout/episode/token_limit", "rollout/episode/turn_limit")
    assert sum(metrics[k] for k in ends) == pytest.approx(1.0)
    assert 1 <= metrics["rollout/episode/turns"] <= 2
    for h in straight:  # greedy episodes over the 4 held-out sums
        assert h["eval/success_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert 1 <= h["eval/turns"] <= 2 and 0 <= h["eval/tool_error_rate"] <= 1

    def crash_mid_episode(train_data):
        def make(*args):
            data = train_data(*args)
            rollout = data._rollout

            def crashing():
                if data.rollouts == 1:  # the second rollout's first turn sampled, then a crash

                    def finish(*args):
                        raise RuntimeError("simulated crash mid-episode")

                    data.engine.episodes._model_turn = finish  # both samplers add turns by it
                rollout()

            data._rollout = crashing
            return data

        return make

    overrides["checkpoint.every"] = 1
    algo, trainer, init = start(episode_config(tmp_path / "resumed", **overrides))
    algo.train_data = crash_mid_episode(algo.train_data)
    with pytest.raises(RuntimeError, match="simulated crash mid-episode"):
        trainer.run(init_params=init)
    _, trainer, init = start(episode_config(tmp_path / "resumed", **overrides))
    (resumed,) = trainer.run(init_params=init).history
    assert resumed["step"] == 2
    for key in ("loss", "loss/policy", "objective/scores", "rollout/episode/turns"):
        np.testing.assert_allclose(resumed[key], straight[1][key], rtol=1e-5, err_msg=key)

    checkpoint = tmp_path / "resumed" / "run" / "checkpoints" / "1"
    episodes_file = tmp_path / "episodes.jsonl"
    evaluated = evaluate_environments(
        checkpoint, [f"calculator={eval_file}"], episodes_path=episodes_file
    )
    written = [json.loads(line) for line in episodes_file.read_text().splitlines()]
    assert [w["id"] for w in written] == [f"{eval_file}:{i}" for i in range(1, 5)]
    assert all(w["messages"][-1]["role"] == "assistant" for w in written)  # even when cut
    assert np.mean([w["turns"] for w in written]) == evaluated["env/calculator/turns"]
    assert evaluated["env/calculator/success_rate"] == pytest.approx(
        100 * straight[1]["eval/success_rate"]
    )
    assert evaluated["env/calculator/turns"] == pytest.approx(straight[1]["eval/turns"])
    assert evaluated["env/calculator/tool_calls"] == pytest.approx(straight[1]["eval/tool_calls"])


def test_bad_environment_records_are_one_line_errors_naming_file_and_line(tmp_path):
    cfg = episode_config(tmp_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    runner = EpisodeRunner(cfg, tok, Stops.for_config(tok, cfg), None, rows_per_call=2)
    good = json.dumps({"prompt": "What is 2+3?", "answer": 5})
    cases = [
        ('{"answer": 5}', r"bad.jsonl:2: record must have a 'prompt' or a 'messages' field"),
        (
            '{"prompt": "2+3?", "answer": "five"}',
            r"bad.jsonl:2: rl.environment cannot start an "
            r"episode \(ValueError: field 'answer' must hold an integer\)",
        ),
        ('{"prompt": "2+3?", "answer": 5', r"bad.jsonl:2: "),
    ]
    for line, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(DataError, match=message) as info:
            records, row_ids = read_episode_records(str(path), tok, "plain")
            runner.start(records, row_ids, cfg.data.prompt_buckets)
        assert "\n" not in str(info.value)
    # The format_checker environment names the field it needs too.
    checker = episode_config(tmp_path, **{"rl.environment": "format_checker"})
    runner = EpisodeRunner(checker, tok, Stops.for_config(tok, checker), None, rows_per_call=2)
    path.write_text(f"{good}\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*field 'family' must be one of"):
        runner.start(*read_episode_records(str(path), tok, "plain"), None)


def test_episode_metrics_and_their_regression_gate():
    def episode(reward, turns, calls, errors, turn_limit=False, token_limit=False):
        e = Episode(None, np.zeros(1, np.int32), [], reward=reward, turns=turns)
        e.tool_calls, e.tool_errors = calls, errors
        e.turn_limit, e.token_limit = turn_limit, token_limit
        return e

    episodes = [
        episode(1.0, 2, 1, 0),
        episode(0.0, 3, 2, 1, turn_limit=True),
        episode(1.0, 1, 0, 0),
        episode(0.0, 2, 1, 1, token_limit=True),
    ]
    got = episode_metrics(episodes)
    assert got == pytest.approx(
        {
            "success_rate": 50.0,
            "turns": 2.0,
            "tool_calls": 1.0,
            "tool_error_rate": 50.0,  # 2 of 4 calls
            "turn_limit_rate": 25.0,
            "token_limit_rate": 25.0,
        }
    )
    assert episode_metrics([episode(0.5, 1, 0, 0)])["tool_error_rate"] == 0.0  # no calls
    before = {f"env/calculator/{k}": v for k, v in got.items()}
    after = {**before, "env/calculator/success_rate": 45.0, "env/calculator/turns": 4.0}
    after["env/calculator/tool_error_rate"] = 53.0
    regressions, compared = compare_metrics({"a": before}, {"a": after}, max_drop=2.0)
    assert compared == 2  # success (higher is better) and tool errors (lower); the rest inform
    assert [(r.metric, r.change) for r in regressions] == [
        ("env/calculator/success_rate", -5.0),
        ("env/calculator/tool_error_rate", 3.0),
    ]
    assert environment_name("calculator") == "calculator"
    assert environment_name("my_envs.py:Maze") == "Maze"
    assert parse_environment_arg("calculator=data/day=1.jsonl") == (
        "calculator",
        "data/day=1.jsonl",
    )
    with pytest.raises(UserError, match="--environment 'calculator': expected SPEC=FILE"):
        cli_main(["eval", "--model", "no_such_run", "--environment", "calculator", "--debug"])


UNRULY_ENV = """
import time

from jaxalign.envs import Tool, ToolEnvironment


def hang():
    time.sleep(60)


def boom():
    raise RuntimeError("disk on fire")


def huge():
    return "x" * 10_000_000


class Unruly(ToolEnvironment):
    tools = tuple(
        Tool(f.__name__, f, "misbehaves", {"type": "object", "properties": {}})
        for f in (hang, boom, huge)
    )

    def score(self, answer):
        return 1.0
"""


def test_tools_that_hang_raise_or_flood_do_not_stop_the_episode(tmp_path):
    """One turn calls a tool that hangs, one that raises and one that returns 10 MB: the turn
    ends after rl.tool_timeout, the model sees two errors and a truncated result, and answers."""
    (tmp_path / "unruly.py").write_text(UNRULY_ENV)
    data_file = tmp_path / "q.jsonl"
    data_file.write_text(json.dumps({"prompt": "Go."}) + "\n")
    cfg = episode_config(
        tmp_path,
        **{
            "rl.environment": f"{tmp_path / 'unruly.py'}:Unruly",
            "rl.tool_timeout": 0.5,
            "rl.tool_max_chars": 64,
            "rl.turn_tokens": 0,
            "sampling.max_new_tokens": 400,
        },
    )
    tok = load_tokenizer(cfg.data.tokenizer)
    end = stop_token_ids(tok, "plain")[0]
    calls = "".join(format_tool_call(name, {}, "hermes") for name in ("hang", "boom", "huge"))
    sampler = ScriptedSampler([[*tok.encode(calls), end], [*tok.encode("Done."), end]], 400, 0)
    runner = EpisodeRunner(cfg, tok, Stops.for_config(tok, cfg), sampler, rows_per_call=1)
    episodes, width = runner.start(*read_episode_records(str(data_file), tok, "plain"), None)
    started = time.perf_counter()
    runner.run(episodes, width, None, np.zeros(1, np.int32), 0, {})
    assert time.perf_counter() - started < 5
    (e,) = episodes
    assert e.done and e.reward == 1.0 and e.turns == 2
    assert (e.tool_calls, e.tool_errors) == (3, 2)
    hang, boom, huge = (m["content"] for m in e.messages[-4:-1])
    assert hang == "Error: tool 'hang' timed out after 0.5 s"
    assert boom == "Error: RuntimeError: disk on fire"
    assert huge == "x" * 64 + "\n[truncated: 10000000 characters, showing the first 64]"
