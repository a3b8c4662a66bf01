"""What DVC's own views read: one headline metrics file and the data of dvc.yaml's top-level plots.

`dvc exp show` lists the metrics files of the stages; the per-run metrics.json files are not
declared as metrics (21 runs x 5 scores made a 325-column table), so the report stage writes one
small file, reports/metrics.json: per table, the best, mean and reference row's dev `avg` (the
paper's mean of SST accuracy, Quora accuracy and STS correlation; Table 1: its task accuracies),
each a mean over seeds, so that two DVC experiments compare in a few columns.

`dvc plots show` draws, from reports/plots/:
- dev_curves.json: every run's per-epoch `avg` on the selection sample (train.eval_limit dev rows per
  task, what picks the best epoch), one line per run (template .dvc/plots/runs_lines.json);
- scores.json: each multitask experiment's full-dev scores (mean over seeds), one bar chart per
  metric comparing the experiments.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline import io as pio
from pipeline.tasks import MULTITASK_METRICS

HEADLINE = "avg"


def _score(value) -> float | None:
    return round(float(value), 4) if value is not None and math.isfinite(float(value)) else None


def headline_metrics(tables: dict, refs: dict) -> dict:
    """A few numbers per table that say how the study came out, each a seed mean on full dev:
    {"table<t>": {"<metric>_best", "<metric>_mean" (over the table's rows), "<metric>_reference"
    (the row the table's differences are against, report.reference)}} with <metric> `avg` where
    the rows have it (multitask), else each task metric. Per-experiment scores: plots/scores.json."""
    out: dict[str, dict[str, float]] = {}
    for t in sorted(tables):
        rows = [r for r in tables[t] if not r.missing]
        metrics = [HEADLINE] if any(HEADLINE in r.ours for r in rows) else sorted({m for r in rows for m in r.ours})
        block = {}
        for metric in metrics:
            scores = [_score(r.ours[metric].point) for r in rows if metric in r.ours]
            scores = [s for s in scores if s is not None]
            if not scores:
                continue
            block[f"{metric}_best"] = max(scores)
            block[f"{metric}_mean"] = round(sum(scores) / len(scores), 4)
            ref = refs.get(t)
            if ref is not None and metric in ref.ours and _score(ref.ours[metric].point) is not None:
                block[f"{metric}_reference"] = _score(ref.ours[metric].point)
        if block:
            out[f"table{t}"] = block
    return out


def score_rows(tables: dict) -> list[dict]:
    """One row per multitask experiment: its full-dev scores (mean over seeds)."""
    rows, seen = [], set()
    for t in sorted(tables):
        for row in tables[t]:
            if row.missing or len(row.experiments) != 1 or HEADLINE not in row.ours or row.experiments[0] in seen:
                continue
            seen.add(row.experiments[0])
            rows.append({"experiment": row.experiments[0], "table": t,
                         **{m: _score(row.ours[m].point) for m in (HEADLINE, *MULTITASK_METRICS) if m in row.ours}})
    return rows


def curve_rows(runs: dict) -> list[dict]:
    """Every run's per-epoch selection-sample `avg`, one point per run and epoch."""
    points = []
    for exp, rs in runs.items():
        for run in rs:
            tasks = ((run.record.get("config") or {}).get("train") or {}).get("tasks") or []
            group = "multitask" if len(tasks) > 1 else "single-task"
            for entry in run.history or []:
                score = _score(entry.get(HEADLINE))
                if score is not None and "epoch" in entry:
                    points.append({"run": f"{exp}/s{run.seed}", "group": group, "epoch": int(entry["epoch"]),
                                   HEADLINE: score})
    return points


def write_dvc_views(out_dir: Path, tables: dict, refs: dict, runs: dict) -> list[Path]:
    """reports/metrics.json and reports/plots/{dev_curves,scores}.json."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    curves, scores = out_dir / "plots" / "dev_curves.json", out_dir / "plots" / "scores.json"
    pio.write_json(metrics_path, headline_metrics(tables, refs))
    pio.write_json(curves, curve_rows(runs))
    pio.write_json(scores, score_rows(tables))
    return [metrics_path, curves, scores]
