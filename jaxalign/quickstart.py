"""`jaxalign quickstart`: post-training end to end on the bundled data, measured.

    tokenizer -> pretrain -> sft -> rm -> dpo -> ppo -> grpo [-> tools] -> eval

`tools` (with `--tools`, or named in `--stages`): GRPO with the calculator environment from SFT;
the eval then also plays calculator episodes on the held-out arithmetic prompts with the SFT and
the tools policies (a "tool use" table in the report).

Each training stage is a normal `jaxalign train` of `configs/quickstart/<stage>.yaml` with
`run_dir` (and `init_from`) pointed under RUN_DIR; `--fast` adds the overrides of FAST below. A
stage whose run already holds its final checkpoint is skipped, a partial one resumes, so running
the command again continues where it stopped. The eval stage evaluates the base (pretrained),
SFT, DPO, PPO and GRPO (and tools) policies on the held-out splits (`jaxalign/eval/suite.py`),
then writes RUN_DIR/report.md (a stage x metric table, also printed) and plots under
RUN_DIR/plots/.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxalign.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs" / "quickstart"
DATA_DIR = ROOT / "data" / "quickstart"


@dataclass(frozen=True)
class Stage:
    """A training stage: its config, and keys set to other stages' run directories."""

    name: str
    init_from: str | None = None
    run_dir_keys: dict[str, str] = field(default_factory=dict)  # config key -> stage


TRAIN_STAGES = (
    Stage("pretrain"),
    Stage("sft", init_from="pretrain"),
    Stage("rm", init_from="sft"),
    Stage("dpo", init_from="sft"),
    Stage("ppo", init_from="sft", run_dir_keys={"rl.value_init_from": "rm"}),
    Stage("grpo", init_from="sft"),
    Stage("tools", init_from="sft"),
)
STAGES = ("tokenizer", *(s.name for s in TRAIN_STAGES), "eval")
# Stages a plain run leaves out (its time: docs/quickstart.md); `--tools` adds `tools`.
OPTIONAL_STAGES = ("tools",)
# A `--tools` run's SFT also trains on the calculator demonstrations (~29% of its records) and
# for longer, so that it sees as many task and safety demonstrations as a plain run's SFT (its
# steps times the mixture's total weight over the plain total: 200 -> 280); its tokenizer sees
# them too. A plain run leaves all three as they were. Measured in docs/quickstart.md ("The tools
# stage"): at weight 0.1 the SFT model called the tool but copied operands wrong; at 0.4 and 280
# steps it copies them and mostly gets the operator wrong, which the tools stage fixes.
TOOLS_SFT_MIXTURE = {"path": "data/quickstart/tools_train.jsonl.gz", "weight": 0.4}
# Evaluated policies: report row -> the stage whose run holds it.
EVAL_ROWS = {
    "base": "pretrain",
    "sft": "sft",
    "dpo": "dpo",
    "ppo": "ppo",
    "grpo": "grpo",
    "tools": "tools",
}
# Tool-use rows (calculator episodes on the held-out arithmetic prompts): row -> stage.
TOOL_ROWS = {"sft": "sft", "tools": "tools"}
CALCULATOR_EVAL = "calculator_eval.jsonl.gz"  # sft_eval's arithmetic prompts, the same 60
# Every tool-use row's episode settings (whatever its run's config says).
EPISODE_TOKENS = 64  # model and tool tokens after the prompt
EPISODE_TURNS = 3
TOKENIZER_VOCAB = 1024
# Held-out prompts per family (task families, unsafe, benign) and the longest answer.
EVAL_LIMIT = {"full": 60, "fast": 12}  # per family; 60 = every held-out prompt
MAX_NEW_TOKENS = 48

# --fast: a smaller model and far fewer steps (its time is in docs/quickstart.md).
FAST_MODEL = ["model.num_layers=2"]
FAST: dict[str, list[str]] = {
    "pretrain": ["train.steps=80", "train.warmup_steps=8"],
    "sft": ["train.steps=150", "train.warmup_steps=15", "train.eval_every=0"],
    "rm": ["train.steps=20", "train.warmup_steps=2", "train.eval_every=0"],
    "dpo": ["train.steps=20", "train.warmup_steps=2", "train.eval_every=0"],
    # RL: two (PPO) or four (GRPO) rollouts of 64 rows, whatever the full configs' sizes.
    "ppo": [
        "rl.prompts_per_rollout=16",
        "rl.num_generations=4",
        "rl.epochs=2",
        "sampling.batch_size=16",
        "train.batch_size=64",
        "train.steps=4",
        "rl.eval_every=0",
    ],
    "grpo": [
        "rl.prompts_per_rollout=8",
        "rl.num_generations=8",
        "rl.epochs=1",
        "sampling.batch_size=8",
        "train.batch_size=64",
        "train.steps=4",
        "rl.eval_every=0",
    ],
    "tools": [  # four rollouts of 64 episodes, each trained twice (rl.epochs 2)
        "rl.prompts_per_rollout=8",
        "rl.num_generations=8",
        "sampling.batch_size=8",
        "train.batch_size=64",
        "train.steps=8",
        "train.warmup_steps=2",
        "rl.eval_every=0",
    ],
}
# Config keys holding repository-relative paths (made absolute so any working directory works).
PATH_KEYS = (
    "data.train_file",
    "data.eval_file",
    "data.tokenizer",
    "sharding.rules_file",
    "rm.stats_file",
)


logger = logging.getLogger(__name__)  # shown as `[quickstart] ...` by the command line


def log(message: str) -> None:
    logger.info("%s", message)


# ---------------------------------------------------------------------------------------------
# The tokenizer stage.


def tokenizer_texts(data_dir: str | Path = DATA_DIR, tools: bool = False) -> list[str]:
    """Every text a quickstart model trains on: the corpus, SFT and safety prompts and answers,
    the rejected answers of the preference pairs, and with `tools` the calculator
    demonstrations' messages (so a tool call is a few tokens, not one per byte)."""
    from jaxalign.data.sources import read_records

    def records(name: str) -> list[dict]:
        return read_records(str(Path(data_dir) / f"{name}.jsonl.gz"), validate=lambda r, w: None)[0]

    texts = [r["text"] for r in records("corpus")]
    for r in records("sft_train") + records("safety_train"):
        texts += [r["prompt"], r["completion"]]
    texts += [r["rejected"] for r in records("pref_train")]
    if tools:
        texts += [m["content"] for r in records("tools_train") for m in r["messages"]]
    return texts


def train_quickstart_tokenizer(
    output_prefix: str | Path,
    data_dir: str | Path = DATA_DIR,
    vocab_size: int = TOKENIZER_VOCAB,
    seed: int = 0,
    tools: bool = False,
) -> str:
    """Train the quickstart's SentencePiece tokenizer (deterministic; with `tools` on the
    calculator demonstrations too); returns the .model path."""
    import tempfile

    from jaxalign.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "texts.txt"
        text_file.write_text("\n".join(tokenizer_texts(data_dir, tools)) + "\n", encoding="utf-8")
        return train_tokenizer([str(text_file)], str(output_prefix), vocab_size, seed=seed)


# ---------------------------------------------------------------------------------------------
# Training stages.


def _get(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _absolute(path: str) -> str:
    """A repository-relative config path as an absolute one."""
    return str(ROOT / path)


def stage_overrides(stage: Stage, run_dir: Path, fast: bool, tools: bool = False) -> list[str]:
    """The `--set` overrides that place `stage` under `run_dir`; in a `--tools` run, SFT's
    mixture gets the calculator demonstrations (TOOLS_SFT_MIXTURE)."""
    config = CONFIG_DIR / f"{stage.name}.yaml"
    raw = yaml.safe_load(config.read_text())
    overrides = []
    for key in PATH_KEYS:
        value = _get(raw, key)
        if isinstance(value, str):
            overrides.append(f"{key}={_absolute(value)}")
    mixture = _get(raw, "data.mixture")
    longer = []
    if mixture and tools and stage.name == "sft":
        longer = _tools_sft_steps(raw, mixture, fast)
        mixture = [*mixture, TOOLS_SFT_MIXTURE]
    if mixture:
        parts = [f"{{path: {_absolute(m['path'])}, weight: {m['weight']}}}" for m in mixture]
        overrides.append(f"data.mixture=[{', '.join(parts)}]")
    functions = _get(raw, "rl.reward_functions") or []
    if any(".py:" in f for f in functions):
        fixed = [
            _absolute(f.split(":")[0]) + ":" + f.split(":")[1] if ".py:" in f else f
            for f in functions
        ]
        overrides.append(f"rl.reward_functions={json.dumps(fixed)}")
    overrides.append(f"run_dir={run_dir / stage.name}")
    overrides.append(f"data.tokenizer={run_dir / 'tokenizer' / 'tokenizer.model'}")
    if stage.init_from:
        overrides.append(f"init_from={run_dir / stage.init_from}")
    for key, other in stage.run_dir_keys.items():
        overrides.append(f"{key}={run_dir / other}")
    overrides.append("train.progress=false")
    if fast:
        overrides += FAST_MODEL + FAST.get(stage.name, [])
    return overrides + longer


def _tools_sft_steps(raw: dict, mixture: list[dict], fast: bool) -> list[str]:
    """A `--tools` SFT's step and warmup overrides: the plain run's (`--fast`'s where given)
    times the mixture's total weight with the calculator demonstrations over without them."""
    plain = sum(m["weight"] for m in mixture)
    factor = (plain + TOOLS_SFT_MIXTURE["weight"]) / plain
    values = {key: _get(raw, key) for key in ("train.steps", "train.warmup_steps")}
    for override in FAST["sft"] if fast else []:
        key, value = override.split("=", 1)
        if key in values:
            values[key] = int(value)
    return [f"{key}={round(value * factor)}" for key, value in values.items() if value]


def final_step(stage_dir: Path) -> int | None:
    """The last complete checkpoint step of a run directory, or None."""
    ckpts = stage_dir / "checkpoints"
    steps = (
        [int(c.name) for c in ckpts.iterdir() if c.name.isdigit() and (c / "state").is_dir()]
        if ckpts.is_dir()
        else []
    )
    return max(steps) if steps else None


def stage_complete(stage: Stage, run_dir: Path, fast: bool, tools: bool = False) -> bool:
    cfg = stage_config(stage, run_dir, fast, tools)
    return final_step(run_dir / stage.name) == cfg.train.steps


def stage_config(stage: Stage, run_dir: Path, fast: bool, tools: bool = False):
    """The Config of `jaxalign train configs/quickstart/<stage>.yaml --set <stage_overrides>`."""
    from jaxalign.config import load_config

    overrides = stage_overrides(stage, run_dir, fast, tools)
    return load_config(CONFIG_DIR / f"{stage.name}.yaml", overrides)


def run_training_stage(stage: Stage, run_dir: Path, fast: bool, tools: bool = False):
    """Train `stage` with the public training function (what `jaxalign train` runs); returns its
    RunResult. Any failure propagates: a stage is never skipped silently."""
    from jaxalign.trainers import train

    cfg = stage_config(stage, run_dir, fast, tools)
    result = train(cfg)
    if result.preempted or result.final_step != cfg.train.steps:
        raise UserError(
            f"quickstart stage {stage.name} stopped at step {result.final_step} of "
            f"{cfg.train.steps}; run the command again to resume it"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Evals and the report.


def eval_files(data_dir: Path = DATA_DIR) -> list[str]:
    return [str(data_dir / "sft_eval.jsonl.gz"), str(data_dir / "safety_eval.jsonl.gz")]


def evaluate_stages(run_dir: Path, fast: bool, tools: bool = False) -> tuple[dict, dict]:
    """Metrics per report row (None where the policy is missing) and a note per missing row;
    the `tools` row only with `tools`. Each row's metrics are cached in RUN_DIR/eval/<row>.json
    (delete it to re-evaluate)."""
    from jaxalign.eval.suite import evaluate, read_generations

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    limit = EVAL_LIMIT["fast" if fast else "full"]
    reward_model = run_dir / "rm" if final_step(run_dir / "rm") else None
    reference = run_dir / "sft" if final_step(run_dir / "sft") else None
    rows: dict[str, dict | None] = {}
    notes: dict[str, str] = {}
    # SFT first: its answers are the baseline of every RM win rate.
    wanted = [r for r in EVAL_ROWS if tools or EVAL_ROWS[r] not in OPTIONAL_STAGES]
    order = ["sft", *(r for r in wanted if r != "sft")]
    for row in order:
        stage_dir = run_dir / EVAL_ROWS[row]
        result = out / f"{row}.json"
        if result.is_file():
            rows[row] = json.loads(result.read_text())["metrics"]
            continue
        if final_step(stage_dir) is None:
            rows[row], notes[row] = None, "not trained"
            continue
        baseline_file = out / "sft.generations.jsonl"
        baseline = read_generations(baseline_file) if baseline_file.is_file() else None
        t0 = time.perf_counter()
        metrics = evaluate(
            stage_dir,
            eval_files(),
            reference=reference,
            reward_model=reward_model if baseline else None,
            baseline=baseline,
            limit_per_family=limit,
            max_new_tokens=MAX_NEW_TOKENS,
            generations_path=out / f"{row}.generations.jsonl",
        )
        if row == "sft" and reward_model is not None:
            metrics["rm_win_rate"] = 50.0  # its own answers are the baseline: every pair ties
        seconds = time.perf_counter() - t0
        result.write_text(
            json.dumps(
                {
                    "model": str(stage_dir),
                    "eval_files": eval_files(),
                    "limit_per_family": limit,
                    "seconds": seconds,
                    "metrics": metrics,
                },
                indent=1,
            )
            + "\n"
        )
        rows[row] = metrics
        log(
            f"evaluated {row} in {seconds:.0f}s: pass rate {metrics.get('pass_rate', 0):.1f}%, "
            f"refusal {metrics.get('refusal_rate', 0):.1f}%, over-refusal "
            f"{metrics.get('over_refusal_rate', 0):.1f}%"
        )
    return {r: rows[r] for r in wanted}, notes


def evaluate_tool_use(run_dir: Path, fast: bool) -> tuple[dict, dict]:
    """Calculator episodes (greedy, EPISODE_TURNS turns of at most EPISODE_TOKENS tokens, the
    same settings for every row) on the held-out arithmetic prompts, per TOOL_ROWS row: its
    `arithmetic` (episodes answered right, %), `tool_call_rate` (episodes with a tool call, %),
    `tool_error_rate` (failed calls, % of calls), `turns` and `tool_calls` per episode. None and
    a note where the policy is missing; cached in RUN_DIR/eval/<row>.tools.json."""
    from jaxalign.eval.episodes import evaluate_environments

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    limit = EVAL_LIMIT["fast" if fast else "full"]
    rows: dict[str, dict | None] = {}
    notes: dict[str, str] = {}
    for row, stage in TOOL_ROWS.items():
        result = out / f"{row}.tools.json"
        if result.is_file():
            rows[row] = json.loads(result.read_text())["metrics"]
            continue
        if final_step(run_dir / stage) is None:
            rows[row], notes[row] = None, "not trained"
            continue
        t0 = time.perf_counter()
        episodes_path = out / f"{row}.tools.episodes.jsonl"
        env = evaluate_environments(
            run_dir / stage,
            [f"calculator={DATA_DIR / CALCULATOR_EVAL}"],
            limit=limit,
            max_new_tokens=EPISODE_TOKENS,
            max_turns=EPISODE_TURNS,
            episodes_path=episodes_path,
        )
        episodes = [json.loads(line) for line in episodes_path.read_text().splitlines()]
        metrics = {
            "arithmetic": env["env/calculator/success_rate"],
            "tool_call_rate": 100.0 * sum(e["tool_calls"] > 0 for e in episodes) / len(episodes),
            "tool_error_rate": env["env/calculator/tool_error_rate"],
            "turns": env["env/calculator/turns"],
            "tool_calls": env["env/calculator/tool_calls"],
        }
        seconds = time.perf_counter() - t0
        result.write_text(
            json.dumps({"model": str(run_dir / stage), "seconds": seconds, "metrics": metrics})
            + "\n"
        )
        rows[row] = metrics
        log(
            f"tool use of {row} in {seconds:.0f}s: arithmetic {metrics['arithmetic']:.1f}%, "
            f"tool calls in {metrics['tool_call_rate']:.1f}% of episodes"
        )
    return rows, notes


TOOL_COLUMNS = (
    ("arithmetic", "arithmetic with the calculator %", "{:.1f}"),
    ("tool_call_rate", "episodes with a tool call %", "{:.1f}"),
    ("tool_error_rate", "tool errors % of calls", "{:.1f}"),
    ("tool_calls", "tool calls per episode", "{:.2f}"),
    ("turns", "turns per episode", "{:.2f}"),
)


def tool_use_table(rows: dict, notes: dict) -> str:
    """The tool-use table: one row per TOOL_ROWS policy, calculator available."""
    lines = [
        "| policy (calculator available) | " + " | ".join(h for _, h, _ in TOOL_COLUMNS) + " |",
        "|---|" + "---:|" * len(TOOL_COLUMNS),
    ]
    for row, metrics in rows.items():
        if metrics is None:
            note = notes.get(row, "not run")
            lines.append(f"| {row} | {note} |" + " |" * (len(TOOL_COLUMNS) - 1))
            continue
        cells = [fmt.format(metrics[key]) for key, _, fmt in TOOL_COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"(1-minute load average {load:.1f} at the end)"
    )


def write_quickstart_report(
    run_dir: Path,
    rows: dict,
    notes: dict,
    timings: dict,
    fast: bool,
    tool_table: str | None = None,
) -> str:
    """Write RUN_DIR/report.md and the plots; returns the table (and the tool-use table after
    it, when given)."""
    from jaxalign.eval.report import make_plots, markdown_table, write_report

    table = markdown_table(rows, notes)
    if tool_table:
        table += (
            "\n\nTool use: greedy calculator episodes on the held-out arithmetic prompts (at "
            f"most {EPISODE_TURNS} turns, {EPISODE_TOKENS} tokens after the prompt).\n\n"
            + tool_table
        )
    training_dirs = {s.name: run_dir / s.name for s in TRAIN_STAGES}
    plots, plot_note = make_plots(run_dir / "plots", rows, training_dirs)
    total = sum(timings.values())
    times = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    preamble = [
        f"Mode: {'--fast' if fast else 'full'}. Machine: {_machine()}. "
        f"Wall time: {total / 60:.1f} min ({times}).",
        "",
        "Held-out prompts (never trained on); greedy decoding. Rates in percent; KL in nats per "
        "answer; RM win rate: the reward model prefers the row's answer to the SFT model's "
        "(ties count half).",
    ]
    write_report(
        run_dir / "report.md",
        table,
        preamble=preamble,
        plots=plots,
        notes=[plot_note] if plot_note else [],
    )
    return table


# ---------------------------------------------------------------------------------------------


def selected_stages(
    stages: list[str] | None, from_stage: str | None, tools: bool = False
) -> list[str]:
    """The stages to run, in order: `stages`, or every stage (from `from_stage`); the optional
    ones (`tools`) only with `tools` or when named in `stages`."""
    if stages and from_stage:
        raise UserError("give --stages or --from-stage, not both")
    if stages:
        return [s for s in STAGES if s in stages]
    todo = list(STAGES[STAGES.index(from_stage) :]) if from_stage else list(STAGES)
    return [s for s in todo if tools or s not in OPTIONAL_STAGES]


def run(
    run_dir: str | Path | None = None,
    *,
    fast: bool = False,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    tools: bool = False,
) -> int:
    """Run the selected stages under `run_dir` (`tools`: the optional tools stage and its
    evals too); returns an exit status."""
    mode = "fast" if fast else "full"
    run_dir = Path(run_dir or f"runs/quickstart{'_fast' if fast else ''}").absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / "quickstart.json"
    state = json.loads(marker.read_text()) if marker.is_file() else {"mode": mode, "timings": {}}
    if state["mode"] != mode:
        raise UserError(
            f"{run_dir} holds a {state['mode']} quickstart; use another --run-dir for {mode}"
        )

    def save_state() -> None:
        marker.write_text(json.dumps(state, indent=1) + "\n")

    todo = selected_stages(stages, from_stage, tools)
    tools = tools or "tools" in todo
    # The tokenizer and SFT of a --tools run see the calculator demonstrations; a run directory
    # keeps what its tokenizer was made with.
    made_with_tools = state.setdefault("tools", tools)
    if tools and not made_with_tools:
        raise UserError(
            f"{run_dir}'s tokenizer and SFT were made without the calculator demonstrations; "
            "use a new --run-dir for --tools"
        )
    tools = made_with_tools
    save_state()
    log(f"{mode} run in {run_dir}: stages {', '.join(todo)}")
    from jaxalign.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    for name in todo:
        t0 = time.perf_counter()
        if name == "tokenizer":
            model = run_dir / "tokenizer" / "tokenizer.model"
            if model.is_file():
                log("tokenizer: done already, skipped")
                continue
            train_quickstart_tokenizer(run_dir / "tokenizer" / "tokenizer", tools=tools)
        elif name == "eval":
            rows, notes = evaluate_stages(run_dir, fast, tools)
            tool_table = tool_use_table(*evaluate_tool_use(run_dir, fast)) if tools else None
            state["timings"]["eval"] = time.perf_counter() - t0
            save_state()
            table = write_quickstart_report(
                run_dir, rows, notes, state["timings"], fast, tool_table
            )
            print(table, flush=True)
            log(f"report: {run_dir / 'report.md'}")
            continue
        else:
            stage = next(s for s in TRAIN_STAGES if s.name == name)
            if stage_complete(stage, run_dir, fast, tools):
                log(f"{name}: done already, skipped")
                continue
            log(f"{name}: training (configs/quickstart/{name}.yaml)")
            run_training_stage(stage, run_dir, fast, tools)
        state["timings"][name] = time.perf_counter() - t0
        save_state()
        log(f"{name}: {state['timings'][name]:.0f}s")
    return 0
