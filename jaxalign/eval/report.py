"""The quickstart report: a stage x metric markdown table and PNG plots (needs matplotlib:
`pip install 'jaxalign[plots]'`; without it the plots are skipped with a note)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from jaxalign.rewards.checkers import TASK_FAMILIES

# (metric, column header, format)
COLUMNS = (
    ("pass_rate", "pass rate %", "{:.1f}"),
    *((f"pass/{f}", f"{f} %", "{:.0f}") for f in TASK_FAMILIES),
    ("refusal_rate", "refusal % (unsafe)", "{:.1f}"),
    ("over_refusal_rate", "over-refusal % (benign)", "{:.1f}"),
    ("rm_win_rate", "RM win % vs SFT", "{:.1f}"),
    ("kl_to_ref", "KL to SFT", "{:.2f}"),
    ("response_length", "length (tokens)", "{:.1f}"),
)


def markdown_table(
    stage_metrics: dict[str, dict[str, float] | None], notes: dict[str, str] | None = None
) -> str:
    """One row per stage, one column per metric; a stage without metrics shows its note."""
    notes = notes or {}
    header = "| stage | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [header, rule]
    for stage, metrics in stage_metrics.items():
        if metrics is None:
            note = notes.get(stage, "not run")
            rows.append(f"| {stage} | {note} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            value = metrics.get(key)
            cells.append("" if value is None or math.isnan(value) else fmt.format(value))
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_history(run_dir: str | Path) -> list[dict]:
    """The records of a training run's metrics.jsonl ([] when absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in history if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _pick(history: list[dict], preferred: Sequence[str], needle: str) -> str | None:
    keys = {k for r in history for k in r}
    for key in preferred:
        if key in keys:
            return key
    candidates = sorted(k for k in keys if needle in k.lower() and not k.startswith("eval/"))
    return candidates[0] if candidates else None


def make_plots(
    out_dir: str | Path,
    stage_metrics: dict[str, dict[str, float] | None],
    training_dirs: dict[str, Path],
) -> tuple[list[Path], str | None]:
    """Write loss_curves.png, rl_reward_kl.png and pass_rate.png under `out_dir`; returns the
    files and a note (why plots were skipped, or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'jaxalign[plots]')"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    histories = {s: read_history(d) for s, d in training_dirs.items()}
    histories = {s: h for s, h in histories.items() if h}

    if histories:
        fig, axes = plt.subplots(
            1, len(histories), figsize=(3.2 * len(histories), 3), squeeze=False
        )
        for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
            ax.plot(*_series(history, "loss"), label="train")
            steps, values = _series(history, "eval/loss")
            if steps:
                ax.plot(steps, values, "o-", label="held-out")
                ax.legend(fontsize=7)
            ax.set_title(stage)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("loss")
        fig.tight_layout()
        files.append(out / "loss_curves.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)

    rl = {s: h for s, h in histories.items() if s in ("ppo", "grpo", "tools")}
    if rl:
        fig, axes = plt.subplots(1, 2, figsize=(7, 3))
        for stage, history in rl.items():
            reward_key = _pick(history, ("objective/scores", "reward/mean", "reward"), "reward")
            kl_key = _pick(history, ("objective/kl", "kl"), "kl")
            if reward_key:
                axes[0].plot(*_series(history, reward_key), label=f"{stage} ({reward_key})")
            if kl_key:
                axes[1].plot(*_series(history, kl_key), label=f"{stage} ({kl_key})")
        for ax, title in zip(axes, ("reward", "KL to reference"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "rl_reward_kl.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)

    measured = {s: m for s, m in stage_metrics.items() if m and "pass_rate" in m}
    if measured:
        fig, ax = plt.subplots(figsize=(1.2 * len(measured) + 2, 3))
        stages = list(measured)
        ax.bar(stages, [measured[s]["pass_rate"] for s in stages], label="pass rate")
        refusal = [measured[s].get("refusal_rate", math.nan) for s in stages]
        over = [measured[s].get("over_refusal_rate", math.nan) for s in stages]
        ax.plot(stages, refusal, "s--", color="tab:green", label="refusal (unsafe)")
        ax.plot(stages, over, "v--", color="tab:red", label="over-refusal (benign)")
        ax.set_ylabel("% of held-out prompts")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(out / "pass_rate.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files, None


def write_report(
    path: str | Path,
    table: str,
    *,
    preamble: Sequence[str] = (),
    plots: Sequence[Path] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the markdown report: preamble lines, the table, notes and links to the plots."""
    path = Path(path)
    lines = ["# jaxalign quickstart report", "", *preamble, "", table, ""]
    lines += [f"- {n}" for n in notes]
    if plots:
        lines += ["", *(f"![{p.stem}]({p.relative_to(path.parent)})" for p in plots)]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
