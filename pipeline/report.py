"""The report stage: the paper's four tables and the figures, ours beside the paper's.

Reads only what earlier stages wrote (runs/<exp>/s<seed>/ dev_predictions.csv, metrics.json,
history.json, steps.jsonl, record.json; data/prepared; models/mlm/metrics.json) and the
paper's numbers (reports/paper_results.csv). Writes reports/tables/table{1..4}.{md,csv,tex},
reports/figures/*.png, reports/test_predictions/ (Table 3's leaderboard files) and
reports/REPORT.md. A run that is missing shows as missing; the report never needs all of them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io as pio
from pipeline import report_figures as figs
from pipeline.config import EXTENSIONS, load_config, read_params
from pipeline.errors import PipelineError
from pipeline.report_stats import Bootstrap, canonical_ids, estimate_runs, majority_estimates, read_dev_predictions
from pipeline.report_tables import (METRIC_NAMES, Row, attach, cell, diff_frame, differences, display_frame, find_row,
                                    latex, markdown, paper_scores, read_paper_results, table_metrics, table_rows,
                                    to_frame)
from pipeline.report_text import write_report_md

log = logging.getLogger(__name__)

FIGURES = ("ablation_scores.png", "alpha_sensitivity.png", "dev_curves.png", "gradnorm_weights.png",
           "pcgrad_conflicts.png", "ours_vs_paper.png", "table1_sentiment.png")
TEST_FILE = "{task}-test-output.csv"


@dataclass
class Settings:
    paper_results: str = "reports/paper_results.csv"
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    best_metric: str = "avg"
    reference: dict | None = None

    @classmethod
    def from_params(cls, block: dict | None) -> "Settings":
        block = dict(block or {})
        unknown = set(block) - set(cls.__dataclass_fields__)
        if unknown:
            raise PipelineError(f"report.{sorted(unknown)[0]}: unknown report parameter; "
                                f"known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**block)

    def reference_of(self, table: int) -> str | None:
        return (self.reference or {}).get(f"table{table}")


@dataclass
class Run:
    experiment: str
    seed: int
    run_dir: Path
    preds: dict
    metrics: dict
    history: list
    steps: pd.DataFrame | None
    record: dict


def _read_steps(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(lines) if lines else None


def collect_runs(runs_dir: Path, experiments: dict, seeds: list[int], records: dict) -> tuple[dict, list]:
    """{experiment: [Run per evaluated seed]} and the (experiment, seed) pairs not evaluated yet."""
    found, missing = {}, []
    for exp in experiments:
        for seed in seeds:
            run_dir = runs_dir / exp / f"s{seed}"
            preds_path = run_dir / "dev_predictions.csv"
            if not preds_path.exists():
                missing.append((exp, seed))
                continue
            metrics = pio.read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
            history = pio.read_json(run_dir / "history.json") if (run_dir / "history.json").exists() else []
            found.setdefault(exp, []).append(Run(exp, seed, run_dir, read_dev_predictions(preds_path), metrics,
                                                 history, _read_steps(run_dir / "steps.jsonl"),
                                                 records.get(str(run_dir), {})))
    return found, missing


PROFILE_SECTIONS = ("data", "model", "train", "eval", "mlm")


def check_study(params: dict) -> list[str]:
    """What would break dvc.yaml: an experiment in no or the wrong train_groups list (each in exactly
    one; those with the mlm extension in `mlm`), a missing `extensions`/`set`, a profile without one
    of the sections the stages depend on."""
    problems = [f"profiles.{name}.{section} is missing (DVC stages depend on it; use {{}})"
                for name, spec in (params.get("profiles") or {}).items()
                for section in PROFILE_SECTIONS if section not in (spec or {})]
    experiments = params.get("experiments") or {}
    groups = params.get("train_groups") or {}
    seen: dict[str, str] = {}
    for group, names in groups.items():
        for name in names or []:
            if name not in experiments:
                problems.append(f"train_groups.{group}: '{name}' is not an experiment")
            elif name in seen:
                problems.append(f"train_groups: '{name}' is in both {seen[name]} and {group}")
            seen[name] = group
    for name, spec in experiments.items():
        wants = "mlm" if "mlm" in ((spec or {}).get("extensions") or []) else "backbone"
        if name not in seen:
            problems.append(f"experiments.{name} is in no train_groups list (DVC never trains it)")
        elif seen[name] != wants:
            problems.append(f"experiments.{name} belongs in train_groups.{wants}, not {seen[name]}")
        for key in ("extensions", "set"):
            if key not in (spec or {}):
                problems.append(f"experiments.{name}.{key} is missing (its DVC stages depend on it; use [] or {{}})")
        unknown = set((spec or {}).get("extensions") or []) - set(EXTENSIONS)
        if unknown:
            problems.append(f"experiments.{name}.extensions: unknown {sorted(unknown)}")
    return problems


def dev_labels(prepared_dir: str, ids: dict[str, list[str]], dev_limit: int, tasks) -> dict:
    """Prepared dev labels of the examples the runs were scored on (else the eval.dev_limit prefix)."""
    from pipeline.data import load_split  # late: imports torch

    out = {}
    for task in tasks:
        if not (Path(prepared_dir) / f"{task}-dev.safetensors").exists():
            continue
        data = load_split(prepared_dir, task, "dev")
        labels = pd.Series(data.labels.numpy(), index=pd.Index(data.ids, dtype=str))
        keep = ids.get(task) or list(labels.index[: dev_limit or None])
        keep = [i for i in keep if i in labels.index]
        out[task] = (keep, labels.loc[keep].to_numpy())
    return out


def write_test_predictions(run: Run, prepared_dir: str, out: Path) -> list[Path]:
    """Table 3's leaderboard files: the run's own test predictions, else predicted now from its best model."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    present = sorted((run.run_dir / "predictions").glob(TEST_FILE.format(task="*")))
    if present:
        for src in present:
            pio.write_with(out / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        return [out / p.name for p in present]
    from pipeline.data import load_split, tokenizer_info  # late: torch
    from pipeline.evaluate import predict, write_leaderboard_file
    from pipeline.stages import load_trained
    from pipeline.train import pick_device

    device = pick_device("auto")
    model, cfg = load_trained(run.run_dir, device)
    pad_id = tokenizer_info(prepared_dir)["pad_id"]
    written = []
    for task in cfg.train.tasks:
        if (Path(prepared_dir) / f"{task}-test.safetensors").exists():
            test = load_split(prepared_dir, task, "test")
            path = out / TEST_FILE.format(task=task)
            write_leaderboard_file(path, task, test.ids, predict(model, test, pad_id, cfg.eval.batch_size, device))
            written.append(path)
    return written


def best_row(rows: list[Row], metric: str) -> Row | None:
    scored = [r for r in rows if metric in r.ours]
    return max(scored, key=lambda r: r.ours[metric].point) if scored else None


def run_report(params_path: str | Path = "params.yaml", out_dir: str | Path = "reports", profile: str | None = None) -> dict:
    """Build every table, figure and REPORT.md from the run records; returns what it wrote."""
    params = read_params(params_path)
    cfg = load_config(params_path, profile=profile)
    settings = Settings.from_params(params.get("report"))
    for problem in check_study(params):
        log.warning("%s", problem)
    experiments = params.get("experiments") or {}
    seeds = [int(s) for s in (params.get("seeds") or [cfg.train.seed])]
    out_dir = Path(out_dir)
    paper = read_paper_results(settings.paper_results)
    boot = Bootstrap(settings.n_boot, settings.ci, settings.seed)

    records = {rec["run_dir"]: rec for rec in _load_records(cfg.tracking.runs_dir)}
    runs, missing = collect_runs(Path(cfg.tracking.runs_dir), experiments, seeds, records)
    ids = canonical_ids([r.preds for rs in runs.values() for r in rs])
    estimates = {exp: estimate_runs(boot, [r.preds for r in rs], ids) for exp, rs in runs.items()}
    tasks = sorted({t for rs in runs.values() for r in rs for t in r.preds} | {"sst", "para", "sts", "cfimdb"})
    majority = majority_estimates(boot, dev_labels(cfg.data.prepared_dir, ids, cfg.eval.dev_limit, tasks))

    tables = {t: table_rows(paper, experiments, t) for t in (1, 2, 4)}
    for rows in tables.values():
        attach(rows, estimates)
    refs = {t: find_row(tables, t, settings.reference_of(t)) for t in tables}
    for t, rows in tables.items():
        differences(rows, refs[t], boot)

    table_dir, fig_dir = out_dir / "tables", out_dir / "figures"
    written = []
    for t, rows in tables.items():
        metrics = table_metrics(rows)
        maj = {m: e for m, e in majority.items() if m in metrics}
        ref = refs[t]
        md = (f"Scores: ours = mean over seeds [{settings.ci:.0%} bootstrap CI over dev examples]"
              f"{' ± std across seeds' if len(seeds) > 1 else ''}; paper = as published. "
              f"Majority class: the most frequent label of the scored dev examples.\n\n"
              f"{markdown(display_frame(rows, metrics, maj))}")
        if ref is not None:
            md += (f"\nDifferences from {ref.label} (paired bootstrap over the same dev examples; "
                   f"~noise: the interval contains 0):\n\n{markdown(diff_frame(rows, metrics, ref))}")
        written += _write_table(table_dir / f"table{t}", md, to_frame(rows, metrics, maj),
                                display_frame(rows, metrics, maj), f"Table {t}: ours vs the paper")

    t3 = table3(paper, tables[2], settings, runs, cfg, out_dir)
    written += _write_table(table_dir / "table3", t3["md"], t3["frame"], t3["frame"], "Table 3: test set")

    written += write_figures(fig_dir, tables, majority, runs, params_path, profile)

    profile_name = profile or os.environ.get("MINBERT_PROFILE") or params.get("profile")
    context = dict(profile=profile_name, params=params, cfg=cfg, settings=settings, seeds=seeds, runs=runs,
                   missing=missing, ids=ids, majority=majority, tables=tables, refs=refs, table3=t3, paper=paper,
                   out_dir=out_dir, figures=FIGURES)
    written.append(write_report_md(out_dir / "REPORT.md", context))
    log.info("report: %d of %d runs evaluated; wrote %s", sum(len(v) for v in runs.values()),
             sum(len(v) for v in runs.values()) + len(missing), out_dir / "REPORT.md")
    return {"written": [str(p) for p in written], "missing": missing, "tables": tables, "majority": majority,
            "table3": t3}


def write_figures(fig_dir: Path, tables: dict, majority: dict, runs: dict, params_path, profile) -> list[Path]:
    """Every figure of REPORT.md; one whose data is missing says so instead of failing."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    main_metrics = [m for m in ("avg", "sst_acc", "para_acc", "sts_corr") if m in table_metrics(tables[2])]
    figs.ablation_scores(tables[2], majority, main_metrics, fig_dir / "ablation_scores.png",
                         "Table 2: dev scores per ablation")
    figs.ablation_scores(tables[1], majority, table_metrics(tables[1]), fig_dir / "table1_sentiment.png",
                         "Table 1: pretrain vs fine-tune")
    alphas = [(load_config(params_path, r.experiments[0], profile=profile).train.gn_alpha, r)
              for r in tables[4] if r.experiments]
    figs.alpha_sensitivity(alphas, fig_dir / "alpha_sensitivity.png")
    ordered = [e for t in (2, 4) for r in tables[t] for e in r.experiments]
    histories = {e: runs[e][0].history for e in dict.fromkeys(ordered) if e in runs and runs[e][0].history}
    figs.dev_curves(histories, fig_dir / "dev_curves.png")
    steps = {e: runs[e][0].steps for e in dict.fromkeys(ordered) if e in runs and runs[e][0].steps is not None}
    figs.gradnorm_weights(steps, fig_dir / "gradnorm_weights.png")
    figs.pcgrad_conflicts(steps, fig_dir / "pcgrad_conflicts.png")
    figs.ours_vs_paper([r for t in (1, 2, 4) for r in tables[t]], fig_dir / "ours_vs_paper.png")
    return [fig_dir / f for f in FIGURES]


def _load_records(runs_dir) -> list[dict]:
    from pipeline.tracking import load_records

    return load_records(runs_dir) if Path(runs_dir).exists() else []


def _write_table(stem: Path, md: str, frame: pd.DataFrame, display: pd.DataFrame, caption: str) -> list[Path]:
    pio.write_text(stem.with_suffix(".md"), md)
    pio.write_with(stem.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    pio.write_text(stem.with_suffix(".tex"), latex(display, caption, f"tab:{stem.name}"))
    return [stem.with_suffix(s) for s in (".md", ".csv", ".tex")]


def table3(paper: pd.DataFrame, rows2: list[Row], settings: Settings, runs: dict, cfg, out_dir: Path) -> dict:
    """The paper's test row; our dev scores of its model and of our best Table 2 model, whose
    test-set predictions (labels are not public) are written in the leaderboard format."""
    metrics = ["avg", "sst_acc", "para_acc", "sts_corr"]
    best = best_row(rows2, settings.best_metric)
    lines = []
    for _, rec in paper[paper["table"] == 3].iterrows():
        scores = paper_scores(rec)
        lines.append({"Row": f"Paper: {rec['experiment']}", "Split": str(rec["split"]),
                      **{METRIC_NAMES[m]: f"{scores[m]:.3f}" if m in scores else "—" for m in metrics},
                      "Test predictions": "—"})
        same = next((r for r in rows2 if r.label == rec["experiment"]), None)
        if same is not None and same is not best:
            lines.append({"Row": f"Ours: {same.label}", "Split": "dev",
                          **{METRIC_NAMES[m]: cell(same.ours.get(m)) for m in metrics}, "Test predictions": "—"})
    files: list[Path] = []
    if best is not None:
        run = max((r for e in best.experiments for r in runs.get(e, [])),
                  key=lambda r: estimate_point(r, settings.best_metric))
        files = write_test_predictions(run, cfg.data.prepared_dir, out_dir / "test_predictions")
        listing = ", ".join(f"`{_rel(p)}`" for p in files) or "none (no test files prepared)"
        lines.append({"Row": f"Ours, best dev {METRIC_NAMES[settings.best_metric]}: {best.label}", "Split": "dev",
                      **{METRIC_NAMES[m]: cell(best.ours.get(m)) for m in metrics}, "Test predictions": "—"})
        lines.append({"Row": f"Ours, best dev {METRIC_NAMES[settings.best_metric]}: {best.label}", "Split": "test",
                      **{METRIC_NAMES[m]: "not scored (labels not public)" for m in metrics},
                      "Test predictions": f"{listing} (from `{_rel(run.run_dir)}`)"})
    else:
        pio.write_text(out_dir / "test_predictions" / "README.md", "No Table 2 run evaluated yet.\n")
    frame = pd.DataFrame(lines)
    md = ("The test labels are not public: our test row gives the leaderboard-format predictions of our best "
          f"Table 2 model (by dev {METRIC_NAMES[settings.best_metric]}) for submission, not scores.\n\n"
          + markdown(frame))
    return {"frame": frame, "md": md, "best": best, "files": files}


def _rel(path: Path) -> str:
    """A path relative to the working directory (the repository) when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def estimate_point(run: Run, metric: str) -> float:
    value = run.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) else -np.inf
