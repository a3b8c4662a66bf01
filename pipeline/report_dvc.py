"""What DVC's own views read: one headline metrics file and the data of dvc.yaml's top-level plots.

`dvc exp show` and `dvc metrics show/diff` list the metrics files of the stages; the per-run
metrics.json files are not declared as metrics (21 runs x 5 scores made a 325-column table), so the
report stage writes one small file, reports/metrics.json: each study experiment's headline dev score
(a mean over its seeds, on full dev) under the metric's name, so that the study's experiments are
the columns of `dvc exp show` and two DVC experiments (or commits) compare experiment by experiment:
    {"avg": {"baseline": ..., "relu": ..., ...},            # multitask: mean of SST, Quora, STS
     "sst_acc": {"sst_pretrain": ..., ...}, "cfimdb_acc": {...}}   # single-task: its task's metric
`avg` comes first (DVC keeps the file's order), the experiments in params.yaml order.

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
from pipeline.tasks import MULTITASK_METRICS, TASK_OF_METRIC

HEADLINE = "avg"


def _score(value) -> float | None:
    return round(float(value), 4) if value is not None and math.isfinite(float(value)) else None


def headline_metrics(estimates: dict, order: list[str]) -> dict:
    """{metric: {experiment: score}}: `avg` for a multitask experiment, its task metric for a
    single-task one; experiments in `order`, `avg` first. Experiments without runs are left out."""
    out: dict[str, dict[str, float]] = {HEADLINE: {}}
    for exp in order:
        est = estimates.get(exp) or {}
        metrics = [HEADLINE] if HEADLINE in est else [m for m in est if m in TASK_OF_METRIC]
        for metric in metrics:
            score = _score(est[metric].point)
            if score is not None:
                out.setdefault(metric, {})[exp] = score
    return {m: block for m, block in out.items() if block}


def score_rows(estimates: dict, order: list[str]) -> list[dict]:
    """One row per multitask experiment (in `order`): its full-dev scores (mean over seeds)."""
    rows = []
    for exp in order:
        est = estimates.get(exp) or {}
        if HEADLINE in est:
            rows.append({"experiment": exp, **{m: _score(est[m].point) for m in (HEADLINE, *MULTITASK_METRICS)
                                                if m in est}})
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


def write_dvc_views(out_dir: Path, estimates: dict, order: list[str], runs: dict) -> list[Path]:
    """reports/metrics.json and reports/plots/{dev_curves,scores}.json."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    curves, scores = out_dir / "plots" / "dev_curves.json", out_dir / "plots" / "scores.json"
    pio.write_json(metrics_path, headline_metrics(estimates, order))
    pio.write_json(curves, curve_rows(runs))
    pio.write_json(scores, score_rows(estimates, order))
    return [metrics_path, curves, scores]
