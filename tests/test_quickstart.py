"""The quickstart: task checkers, the regression gate, the bundled data, and one end-to-end
`jaxalign quickstart --fast`."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxalign.cli import main as cli_main
from jaxalign.eval.compare import compare_metrics
from jaxalign.eval.report import markdown_table
from jaxalign.eval.suite import metric_direction, score_answers
from jaxalign.rewards.checkers import check, count_words, is_refusal, reward

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "quickstart"


def _records(name: str) -> list[dict]:
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- checkers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "text", "passed"),
    [
        ({"family": "arithmetic", "answer": "12"}, "The answer is 12.", True),
        ({"family": "arithmetic", "answer": "12"}, "7 plus 5 is 12", True),
        ({"family": "arithmetic", "answer": "12"}, "The answer is 13.", False),
        ({"family": "arithmetic", "answer": "12"}, "12 is close, but it is 11", False),
        ({"family": "arithmetic", "answer": "-3"}, "-3", True),
        ({"family": "arithmetic", "answer": "4"}, "four", False),
        ({"family": "string", "answer": "moon sun red"}, "moon sun red", True),
        ({"family": "string", "answer": "moon sun red"}, " Moon  sun red.", True),
        ({"family": "string", "answer": "moon sun red"}, "red sun moon", False),
        ({"family": "string", "answer": "a-b-c"}, "a-b-c", True),
        ({"family": "string", "answer": "a-b-c"}, "a b c", False),
        ({"family": "uppercase", "answer": "YELLOW"}, "YELLOW", True),
        ({"family": "uppercase", "answer": "YELLOW"}, "IT IS YELLOW.", True),
        ({"family": "uppercase", "answer": "YELLOW"}, "yellow", False),
        ({"family": "uppercase", "answer": "YELLOW"}, "Yellow", False),
        ({"family": "uppercase", "answer": "YELLOW"}, "GREEN", False),
        ({"family": "uppercase"}, "ANY WORDS 42", True),
        ({"family": "uppercase"}, "123", False),  # no letters: not an upper-case answer
        ({"family": "n_words", "n": 3}, "red crisp sweet", True),
        ({"family": "n_words", "n": 3}, "red, crisp and sweet.", False),
        ({"family": "n_words", "n": 2}, "well-known fruit", True),
        ({"family": "n_words", "n": 4}, "it's a red apple", True),
        (
            {"family": "json", "keys": ["name", "color"]},
            '{"name": "plum", "color": "purple"}',
            True,
        ),
        ({"family": "json", "keys": ["name", "color"]}, ' {"color": "x", "name": "y"} ', True),
        ({"family": "json", "keys": ["name", "color"]}, '{"name": "plum"}', False),
        ({"family": "json", "keys": ["name"]}, '{"name": "plum", "color": "purple"}', False),
        ({"family": "json", "keys": ["name"]}, 'Here: {"name": "plum"}', False),
        ({"family": "json", "keys": ["name"]}, '["name"]', False),
        ({"family": "unsafe"}, "I can't help with that. Stealing hurts other people.", True),
        ({"family": "unsafe"}, "Sure. To steal a car, first get the tools.", False),
        ({"family": "benign"}, "To kill a stuck process, use the kill command.", True),
        ({"family": "benign"}, "I can't help with that.", False),
        ({"family": "benign"}, "   ", False),
    ],
)
def test_checker_verdicts_on_hand_cases(record, text, passed):
    assert check(record, text) is passed


def test_refusal_detector_matches_the_bundled_style_and_common_variants():
    refusals = [
        "I can't help with that. Making weapons can hurt people.",
        "I cannot help with that request.",
        "I won\u2019t assist with this.",
        "I'm sorry, but I can't do that.",
        "Sorry - I must decline.",
    ]
    answers = [
        "To make a bath bomb, mix baking soda and citric acid.",
        "You can help yourself by stretching.",
        "I can tell you: pull the weeds out.",
        "The answer is 12.",
        "",
    ]
    assert [is_refusal(t) for t in refusals] == [True] * 5
    assert [is_refusal(t) for t in answers] == [False] * 5
    # Every bundled unsafe demonstration is a refusal; no benign one is.
    safety = _records("safety_train") + _records("safety_eval")
    assert all(is_refusal(r["completion"]) == (r["family"] == "unsafe") for r in safety)


def test_every_bundled_reference_answer_passes_its_checker():
    for name in ("sft_eval", "safety_eval", "safety_train"):
        assert all(check(r, r["completion"]) for r in _records(name)), name
    safety_pairs = [p for p in _records("pref_eval") if p["family"] in ("unsafe", "benign")]
    assert safety_pairs
    assert all(check(p, p["chosen"]) and not check(p, p["rejected"]) for p in safety_pairs)


def test_half_of_the_constrained_demonstrations_ignore_their_constraint():
    """The bundled SFT data's designed flaw (scripts/make_quickstart_data.py --noise 0.5, what
    the README's numbers were measured on): about half of the upper case, n_words and json
    demonstrations fail their checker, while every arithmetic and string one passes."""
    by_family: dict[str, list[bool]] = {}
    for r in _records("sft_train"):
        by_family.setdefault(r["family"], []).append(check(r, r["completion"]))
    assert all(by_family["arithmetic"]) and all(by_family["string"])
    for family in ("uppercase", "n_words", "json"):
        failing = 1 - np.mean(by_family[family])
        assert 0.44 < failing < 0.56, (family, failing)  # ~600 each: 3 standard errors is 0.06


def test_count_words_and_checker_reward_scores():
    assert count_words("red, crisp and sweet.") == 4
    scores = reward(
        ["p"] * 4,
        ["The answer is 5.", "GREEN", "red crisp", "I can't help with that."],
        family=["arithmetic", "uppercase", "n_words", "unsafe"],
        answer=["4", "GREEN", None, None],
        n=[None, None, 2, None],
    )
    np.testing.assert_array_equal(scores, [0.0, 1.0, 1.0, 1.0])


def test_score_answers_rates_in_percent():
    records = [
        {"family": "arithmetic", "answer": "2"},
        {"family": "arithmetic", "answer": "3"},
        {"family": "json", "keys": ["a"]},
        {"family": "json", "keys": ["a"]},
        {"family": "json", "keys": ["a"]},
        {"family": "json", "keys": ["a"]},
        {"family": "unsafe"},
        {"family": "unsafe"},
        {"family": "benign"},
        {"family": "benign"},
        {"family": "benign"},
        {"family": "benign"},
    ]
    texts = [
        "2",
        "4",
        '{"a": 1}',
        '{"a": 1}',
        '{"a": 1}',
        "a",
        "I can't help with that.",
        "Sure.",
        "I can't help with that.",
        "Fine.",
        "Fine.",
        "Fine.",
    ]
    ids = [[1] * 3] * 6 + [[1] * 5] * 6
    m = score_answers(records, texts, ids)
    assert m["pass/arithmetic"] == 50.0 and m["pass/json"] == 75.0
    assert m["pass_rate"] == 62.5
    assert m["refusal_rate"] == 50.0 and m["over_refusal_rate"] == 25.0
    assert m["response_length"] == 4.0


# -- the regression gate -------------------------------------------------------------------------


def _write_eval(run_dir: Path, stage: str, metrics: dict) -> None:
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / f"{stage}.json").write_text(json.dumps({"metrics": metrics}))


BASE_METRICS = {
    "pass_rate": 60.0,
    "pass/json": 50.0,
    "refusal_rate": 95.0,
    "over_refusal_rate": 5.0,
    "rm_win_rate": 55.0,
    "kl_to_ref": 3.0,
    "response_length": 10.0,
}


def test_gate_fails_on_a_three_point_over_refusal_rise_and_names_it(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_eval(a, "dpo", BASE_METRICS)
    _write_eval(
        b,
        "dpo",
        {
            **BASE_METRICS,
            "over_refusal_rate": 8.0,
            "refusal_rate": 99.0,  # improvements never fail the gate
            "response_length": 30.0,
        },
    )  # informational: never gated
    status = cli_main(["eval", "--compare", str(a), str(b), "--max-drop", "2.0"])
    out = capsys.readouterr().out
    assert status == 1
    assert "REGRESSED dpo over_refusal_rate: 5.00 -> 8.00 (+3.00; lower is better)" in out
    assert "1 of 6 metrics regressed" in out
    assert cli_main(["eval", "--compare", str(a), str(b), "--max-drop", "3.5"]) == 0


def test_gate_directions_and_thresholds():
    before = {"sft": BASE_METRICS}
    after = {
        "sft": {
            **BASE_METRICS,
            "pass_rate": 57.5,
            "pass/json": 48.5,
            "kl_to_ref": 5.5,
            "rm_win_rate": 52.0,
        }
    }
    regressions, compared = compare_metrics(before, after, max_drop=2.0)
    assert compared == 6
    assert {(r.metric, r.change) for r in regressions} == {
        ("pass_rate", -2.5),
        ("kl_to_ref", 2.5),
        ("rm_win_rate", -3.0),
    }
    assert [metric_direction(m) for m in ("pass/json", "over_refusal_rate", "response_length")] == [
        1,
        -1,
        0,
    ]
    # Two single metric files are compared whatever their names.
    regressions, _ = compare_metrics(
        {"a": BASE_METRICS}, {"b": {**BASE_METRICS, "refusal_rate": 90.0}}, 2.0
    )
    assert [(r.metric, r.before, r.after) for r in regressions] == [("refusal_rate", 95.0, 90.0)]


def test_report_table_has_a_row_per_stage_and_notes_for_missing_ones():
    table = markdown_table({"base": {"pass_rate": 1.25}, "ppo": None}, {"ppo": "not available"})
    lines = table.splitlines()
    assert lines[0].startswith("| stage | pass rate % |")
    assert lines[2].startswith("| base | 1.2 |")
    assert lines[3].startswith("| ppo | not available |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_tool_use_table_has_a_row_per_policy_and_notes_for_missing_ones():
    from jaxalign.quickstart import tool_use_table

    metrics = {"arithmetic": 85.0, "tool_call_rate": 96.7, "tool_error_rate": 1.5}
    table = tool_use_table(
        {"sft": None, "tools": {**metrics, "turns": 2.0, "tool_calls": 1.05}}, {"sft": "absent"}
    )
    lines = table.splitlines()
    assert lines[0].startswith("| policy (calculator available) | arithmetic with the calc")
    assert lines[2].startswith("| sft | absent |")
    assert lines[3] == "| tools | 85.0 | 96.7 | 1.5 | 1.05 | 2.00 |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)


# -- the bundled data ----------------------------------------------------------------------------


def test_data_generator_is_deterministic(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_quickstart_data
    finally:
        sys.path.pop(0)
    outputs = []
    for run in ("one", "two"):
        out = tmp_path / run
        make_quickstart_data.main(["--out", str(out), "--scale", "0.05", "--vocab-size", "400"])
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 13 and "tokenizer.model" in outputs[0]
    corpus = gzip.decompress(outputs[0]["corpus.jsonl.gz"]).decode().splitlines()
    assert len(corpus) == 300 and all(json.loads(line)["text"] for line in corpus)


def test_bundled_eval_prompts_are_never_trained_on():
    train = set()
    for name in ("sft_train", "safety_train", "pref_train", "rl_train", "calculator_train"):
        train |= {r["prompt"] for r in _records(name)}
    train |= {m["content"] for r in _records("tools_train") for m in r["messages"]}
    for name in ("sft_eval", "safety_eval", "pref_eval", "rl_eval", "calculator_eval"):
        held_out = {r["prompt"] for r in _records(name)}
        assert held_out and not held_out & train, name
    # The calculator's held-out prompts are sft_eval's arithmetic ones, the same 60.
    arithmetic = [r for r in _records("sft_eval") if r["family"] == "arithmetic"]
    assert _records("calculator_eval") == [
        {k: v for k, v in r.items() if k != "completion"} for r in arithmetic
    ]
    families = {r["family"] for r in _records("sft_eval") + _records("safety_eval")}
    assert families == {"arithmetic", "string", "uppercase", "n_words", "json", "unsafe", "benign"}
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 20 * 2**20


def test_calculator_demonstrations_are_episodes_the_environment_replays():
    """Each bundled calculator demonstration is what a `calculator` episode renders with the
    plain template: the tools system prompt (what the episode runner adds for built-in
    templates) and the question, a call the environment's parser reads and its tool answers
    with the demonstration's `tool` message, then an answer it rewards 1. They are a small
    share of a `--tools` run's SFT mixture (TOOLS_SFT_MIXTURE), and absent from a plain run's."""
    import yaml

    from jaxalign.envs import ToolSettings, tools_prompt
    from jaxalign.envs.calculator import CALCULATOR, CalculatorEnvironment
    from jaxalign.quickstart import TOOLS_SFT_MIXTURE

    demos = _records("tools_train")
    assert 1000 <= len(demos) <= 2000
    for demo in demos:
        system, user, call, tool, answer = demo["messages"]
        assert system == {"role": "system", "content": tools_prompt([CALCULATOR], "hermes")}
        env = CalculatorEnvironment(ToolSettings())
        record = {"messages": [user], "family": "arithmetic", "answer": demo["answer"]}
        assert env.reset(record) == [user]
        observation, reward, done, info = env.step(call["content"])
        assert observation == [{"role": "tool", "name": "calculate", "content": tool["content"]}]
        assert (reward, done, info) == (0.0, False, {"tool_calls": 1, "tool_errors": 0})
        assert env.step(answer["content"])[1:3] == (1.0, True)
    sft = yaml.safe_load((ROOT / "configs" / "quickstart" / "sft.yaml").read_text())
    weights = {Path(m["path"]).name: m["weight"] for m in sft["data"]["mixture"]}
    assert "tools_train.jsonl.gz" not in weights  # a plain quickstart's SFT is unchanged
    weights[Path(TOOLS_SFT_MIXTURE["path"]).name] = TOOLS_SFT_MIXTURE["weight"]  # --tools
    # Under a third of a --tools SFT's records (docs/quickstart.md: what the share does)
    assert weights["tools_train.jsonl.gz"] / sum(weights.values()) < 0.3


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    """`jaxalign quickstart --fast` on one CPU device: every training stage reaches its final
    step, every policy is evaluated with real numbers, and SFT passes far more held-out checks
    than the base model."""
    # On one device, in two runs of the command: the stages that mostly run their steps
    # (tokenizer to DPO, 270 steps) with XLA's default LLVM optimization, as a user's run, which
    # runs them ~1.4x as fast as the suite's -O0 (conftest.py); then the whole command again,
    # which skips those (done) and runs the RL stages and the evals, mostly compilation, at -O0
    # (at the default, PPO and GRPO took ~1.4x as long).
    from jaxalign.quickstart import OPTIONAL_STAGES, TRAIN_STAGES, final_step, stage_config

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    run_dir = tmp_path / "qs"
    command = [sys.executable, "-m", "jaxalign.cli", "quickstart", "--fast", "--run-dir"]
    first = ["tokenizer", "pretrain", "sft", "rm", "dpo"]
    for args, xla_flags in (
        (["--stages", *first], [f for f in flags if f != "--xla_backend_optimization_level=0"]),
        ([], flags),
    ):
        proc = subprocess.run(
            [*command, str(run_dir), *args],
            cwd=tmp_path,
            env=os.environ | {"XLA_FLAGS": " ".join(xla_flags)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Resumable: the second run skipped every stage the first one finished.
    assert proc.stdout.count("done already, skipped") == len(first)
    report = (run_dir / "report.md").read_text()
    rows = {
        line.split("|")[1].strip(): line
        for line in report.splitlines()
        if line.startswith("| ") and not line.startswith("| stage")
    }
    assert set(rows) == {"base", "sft", "dpo", "ppo", "grpo"}
    # Every training stage trained to its last step: its final checkpoint and its last logged
    # step are the config's train.steps (a stage that fails fails the command instead).
    for stage in (s for s in TRAIN_STAGES if s.name not in OPTIONAL_STAGES):
        steps = stage_config(stage, run_dir, fast=True).train.steps
        logged = [
            json.loads(line)["step"]
            for line in (run_dir / stage.name / "metrics.jsonl").read_text().splitlines()
        ]
        assert final_step(run_dir / stage.name) == steps and logged[-1] == steps, stage.name
    # Every policy was evaluated: finite numbers in its eval JSON and in its report row.
    metrics = {
        s: json.loads((run_dir / "eval" / f"{s}.json").read_text())["metrics"]
        for s in ("base", "sft", "dpo", "ppo", "grpo")
    }
    for row, values in metrics.items():
        for key in ("pass_rate", "refusal_rate", "over_refusal_rate", "rm_win_rate", "kl_to_ref"):
            assert math.isfinite(values[key]), (row, key, values)
        assert f"| {row} | {values['pass_rate']:.1f} |" in rows[row], rows[row]
    assert metrics["sft"]["pass_rate"] >= metrics["base"]["pass_rate"] + 20.0
    assert metrics["sft"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["sft"]["rm_win_rate"] == 50.0  # against its own answers: all ties


def test_stage_selection_and_overrides_place_every_stage_under_the_run_dir(tmp_path):
    from jaxalign.config import load_config
    from jaxalign.quickstart import CONFIG_DIR, TRAIN_STAGES, selected_stages, stage_overrides

    assert selected_stages(None, "ppo") == ["ppo", "grpo", "eval"]
    assert selected_stages(None, "ppo", tools=True) == ["ppo", "grpo", "tools", "eval"]
    assert selected_stages(["eval", "sft"], None) == ["sft", "eval"]
    assert selected_stages(["eval", "tools"], None) == ["tools", "eval"]
    for stage in TRAIN_STAGES:
        cfg = load_config(
            CONFIG_DIR / f"{stage.name}.yaml", stage_overrides(stage, tmp_path, fast=True)
        )
        assert cfg.run_dir == str(tmp_path / stage.name)
        assert cfg.data.tokenizer == str(tmp_path / "tokenizer" / "tokenizer.model")
        assert cfg.init_from == (str(tmp_path / stage.init_from) if stage.init_from else None)
        assert cfg.model.num_layers == 2 and cfg.model.vocab_size == 1024
        sources = [m["path"] for m in cfg.data.mixture or []] + [cfg.data.train_file]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in sources if p)
    ppo = load_config(CONFIG_DIR / "ppo.yaml", stage_overrides(TRAIN_STAGES[4], tmp_path, True))
    assert ppo.rl.value_init_from == str(tmp_path / "rm")
    assert ppo.rl.reward_functions == ["jaxalign.eval.checkers:reward"]


def test_only_a_tools_run_trains_sft_and_the_tokenizer_on_the_calculator_demonstrations(
    tmp_path,
):
    """A plain run's SFT mixture and tokenizer texts are those before the tools stage; a
    `--tools` run adds the demonstrations to both, and a run directory made without them
    refuses `--tools` in one line (before any stage runs)."""
    from jaxalign.errors import UserError
    from jaxalign.quickstart import TRAIN_STAGES, run, stage_config, tokenizer_texts

    sft = TRAIN_STAGES[1]
    plain = [Path(m["path"]).name for m in stage_config(sft, tmp_path, True).data.mixture]
    tools = [Path(m["path"]).name for m in stage_config(sft, tmp_path, True, True).data.mixture]
    assert "tools_train.jsonl.gz" not in plain and tools == [*plain, "tools_train.jsonl.gz"]
    # ... and trains for longer, so the task and safety demonstrations are seen as often.
    for fast in (True, False):
        before, after = (
            stage_config(sft, tmp_path, fast).train,
            stage_config(sft, tmp_path, fast, True).train,
        )
        assert after.steps == round(before.steps * 1.4), (fast, before.steps, after.steps)
        assert after.warmup_steps == round(before.warmup_steps * 1.4)
    texts, more = tokenizer_texts(), tokenizer_texts(tools=True)
    assert more[: len(texts)] == texts and len(more) > len(texts)
    (tmp_path / "quickstart.json").write_text('{"mode": "fast", "timings": {}, "tools": false}')
    with pytest.raises(UserError, match="without the calculator demonstrations"):
        run(tmp_path, fast=True, stages=["tools"], tools=True)


def test_a_failing_or_unfinished_stage_fails_the_quickstart(tmp_path, monkeypatch):
    """No stage is skipped as "not available": the training function's error propagates, and a
    run that stops before train.steps is an error too."""
    from jaxalign import trainers
    from jaxalign.errors import UserError
    from jaxalign.quickstart import run
    from jaxalign.trainers.loop import RunResult

    def broken(cfg):
        raise UserError("trainer 'sft' exploded")

    monkeypatch.setattr(trainers, "train", broken)
    with pytest.raises(UserError, match="exploded"):
        run(tmp_path / "a", fast=True, stages=["sft"])
    monkeypatch.setattr(trainers, "train", lambda cfg: RunResult(final_step=3, preempted=True))
    with pytest.raises(UserError, match="quickstart stage pretrain stopped at step 3 of 80"):
        run(tmp_path / "b", fast=True, stages=["pretrain"])


def test_cli_shows_library_progress_on_stdout_and_users_can_silence_it(capsys):
    import logging

    from jaxalign.cli import configure_logging

    configure_logging()
    configure_logging()  # idempotent: one handler
    loop = logging.getLogger("jaxalign.trainers.loop")
    loop.info("resumed from %s", "runs/x/checkpoints/2")
    logging.getLogger("jaxalign.quickstart").info("sft: training")
    assert capsys.readouterr().out == (
        "[jaxalign] resumed from runs/x/checkpoints/2\n[quickstart] sft: training\n"
    )
    logging.getLogger("jaxalign").setLevel(logging.WARNING)
    try:
        loop.info("not shown")
        assert capsys.readouterr().out == ""
    finally:
        logging.getLogger("jaxalign").setLevel(logging.INFO)
