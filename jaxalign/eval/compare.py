"""The regression gate: compare two evaluations metric by metric, direction aware.

    jaxalign eval --compare RUN_A RUN_B --max-drop 2.0

A regression is a metric of B that is worse than A's by more than `max_drop` (points for rates;
nats for `kl_to_ref`): lower for higher-is-better metrics (pass rates, refusal rate, RM win
rate), higher for lower-is-better ones (over-refusal rate, KL). `response_length` is not gated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from jaxalign.errors import UserError
from jaxalign.eval.suite import metric_direction


@dataclass(frozen=True)
class Regression:
    """One metric of one stage that got worse by more than the threshold."""

    stage: str
    metric: str
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before

    def describe(self) -> str:
        better = "higher" if metric_direction(self.metric) > 0 else "lower"
        where = f"{self.stage} " if self.stage else ""
        return (
            f"{where}{self.metric}: {self.before:.2f} -> {self.after:.2f} "
            f"({self.change:+.2f}; {better} is better)"
        )


def _metrics_of(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read metrics ({e})") from None
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: expected a JSON object of metrics")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def load_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """stage -> metrics of a quickstart RUN_DIR (its `eval/<stage>.json`), a directory of such
    files, or one metrics JSON file (stage "")."""
    p = Path(path)
    if p.is_file():
        return {"": _metrics_of(p)}
    directory = p / "eval" if (p / "eval").is_dir() else p
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise UserError(
            f"{path}: no evaluation found (a metrics .json file, or a run directory "
            "with eval/<stage>.json)"
        )
    return {f.stem: _metrics_of(f) for f in files}


def compare_metrics(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], max_drop: float
) -> tuple[list[Regression], int]:
    """Regressions from `before` to `after` (stage -> metrics each) and how many metrics were
    compared. Two single evaluations are compared whatever their stage names."""
    if len(before) == 1 and len(after) == 1:
        pairs = [
            (
                "" if next(iter(before)) != next(iter(after)) else next(iter(before)),
                next(iter(before.values())),
                next(iter(after.values())),
            )
        ]
    else:
        common = [s for s in before if s in after]
        if not common:
            raise UserError(f"no stage in common to compare ({sorted(before)} vs {sorted(after)})")
        pairs = [(s, before[s], after[s]) for s in common]
    regressions, compared = [], 0
    for stage, a, b in pairs:
        for metric in sorted(set(a) & set(b)):
            direction = metric_direction(metric)
            if direction == 0 or math.isnan(a[metric]) or math.isnan(b[metric]):
                continue
            compared += 1
            if direction * (a[metric] - b[metric]) > max_drop:
                regressions.append(Regression(stage, metric, a[metric], b[metric]))
    return regressions, compared


def run_gate(path_a: str | Path, path_b: str | Path, max_drop: float) -> int:
    """Print the comparison; 1 if any metric regressed by more than `max_drop`, else 0."""
    regressions, compared = compare_metrics(load_metrics(path_a), load_metrics(path_b), max_drop)
    if regressions:
        print(
            f"[jaxalign] {len(regressions)} of {compared} metrics regressed by more than "
            f"{max_drop:g} from {path_a} to {path_b}:"
        )
        for r in regressions:
            print(f"  REGRESSED {r.describe()}")
        return 1
    print(
        f"[jaxalign] no regression beyond {max_drop:g} in {compared} metrics ({path_a} -> {path_b})"
    )
    return 0
