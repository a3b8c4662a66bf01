"""The report stage: the paper's four tables and the figures, ours beside the paper's.

Read-only: it reads what earlier stages wrote (runs/study/<exp>/s<seed>/ dev_predictions.csv,
metrics.json, history.json, steps.jsonl, record.json, predictions/*-test-output.csv;
models/mlm/metrics.json; data/prepared/report.json) and the paper's numbers
(reports/paper_results.csv), and never loads a model or runs inference (tests/test_report.py
checks that no report module imports torch or the model, training or evaluation code).
Writes reports/tables/table{1..4}.{md,csv,tex}, reports/figures/*.png,
reports/test_predictions/ (Table 3's leaderboard files, copied from the run that made them)
and reports/REPORT.md. A run that is missing shows as missing; the report never needs all of them.

The study is the experiments dvc.yaml trains (those named in `train_groups`); other experiments
of params.yaml (the quality candidates, ad-hoc ones) are not read. Each experiment's runs are
those of its seeds (`seeds`, plus `extra_seeds` for train_groups.seeded:
pipeline.config.experiment_seeds).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io as pio
from pipeline import report_figures as figs
from pipeline.config import experiment_seeds, load_config, read_params, study_dir
from pipeline.errors import ConfigError
from pipeline.report_dvc import write_dvc_views
from pipeline.report_stats import (
    GN_ALPHA_TOL,
    Bootstrap,
    canonical_ids,
    compare_gradnorm_alphas,
    dev_labels,
    estimate_runs,
    majority_estimates,
    read_dev_predictions,
)
from pipeline.report_tables import (
    LEARN_METRICS,
    METRIC_NAMES,
    Row,
    attach,
    cell,
    diff_frame,
    differences,
    display_frame,
    find_row,
    latex,
    mark_did_not_learn,
    markdown,
    paper_scores,
    read_paper_results,
    table_metrics,
    table_rows,
    to_frame,
)
from pipeline.report_text import task_list, write_report_md
from pipeline.tasks import MULTITASK, MULTITASK_METRICS, TASK_OF_METRIC

log = logging.getLogger(__name__)

FIGURES = ("ablation_scores.png", "alpha_sensitivity.png", "dev_curves.png", "gradnorm_weights.png",
           "pcgrad_conflicts.png", "ours_vs_paper.png", "table1_sentiment.png")
TEST_FILE = "{task}-test-output.csv"
TEST_TASKS = MULTITASK  # the leaderboard's tasks; each only where the prepared data has its test split
HEADLINE_METRICS = ("avg", *MULTITASK_METRICS)  # Table 2's figure and Table 3's columns


@dataclass(frozen=True)
class Settings:
    """params.yaml's `report:` block. Every key is required: no default here can disagree with it."""
    paper_results: str
    n_boot: int
    ci: float
    seed: int
    best_metric: str
    reference: dict
    sweep_summary: str  # the latest committed sweep study's SUMMARY.md, linked from REPORT.md

    @classmethod
    def from_params(cls, block, source: str = "params.yaml") -> "Settings":
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise ConfigError(f"report: must be a mapping in {source}, got {type(block).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(block) - set(names))
        if unknown:
            raise ConfigError(f"report.{unknown[0]}: unknown report parameter; known: {', '.join(names)}")
        missing = [n for n in names if block.get(n) is None]
        if missing:
            raise ConfigError(f"{', '.join('report.' + n for n in missing)} missing in {source} "
                              "(the report stage takes its settings from the report block only)")
        kinds = {"paper_results": (str,), "n_boot": (int,), "ci": (int, float), "seed": (int,),
                 "best_metric": (str,), "reference": (dict,), "sweep_summary": (str,)}
        for name, kind in kinds.items():
            value = block[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ConfigError(f"report.{name}={value!r} must be {' or '.join(k.__name__ for k in kind)}")
        if block["best_metric"] not in METRIC_NAMES:
            raise ConfigError(f"report.best_metric={block['best_metric']!r} is not one of {', '.join(METRIC_NAMES)}")
        bad = sorted(k for k in block["reference"] if k not in ("table1", "table2", "table4"))
        if bad:
            raise ConfigError(f"report.reference.{bad[0]}: unknown table; known: table1, table2, table4")
        return cls(**{**block, "ci": float(block["ci"])})

    def reference_of(self, table: int) -> str | None:
        return self.reference.get(f"table{table}")


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


def _read_json(path: Path, default):
    """A JSON file, or `default` when it is absent or unreadable (logged): older runs lack some files."""
    if not path.exists():
        return default
    try:
        return pio.read_json(path)
    except (ValueError, OSError) as err:
        log.warning("%s: unreadable, ignored (%s)", path, err)
        return default


def _read_steps(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    lines = []
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError:
                log.warning("%s: line %d is not JSON; skipped", path, k)
    return pd.DataFrame(lines) if lines else None


def read_run(exp: str, seed: int, run_dir: Path) -> Run | None:
    """One evaluated run (None when it has no dev predictions yet)."""
    preds_path = run_dir / "dev_predictions.csv"
    if not preds_path.exists():
        return None
    return Run(exp, seed, run_dir, read_dev_predictions(preds_path), _read_json(run_dir / "metrics.json", {}),
               _read_json(run_dir / "history.json", []), _read_steps(run_dir / "steps.jsonl"),
               _read_json(run_dir / "record.json", {}))


def study_experiments(params: dict) -> list[str]:
    """The study's experiments in params.yaml order: those a train_groups list names (what dvc.yaml
    trains); every experiment when params.yaml has no train_groups."""
    experiments = list(params.get("experiments") or {})
    groups = params.get("train_groups")
    if not isinstance(groups, dict):
        return experiments
    named = {n for group, names in groups.items() if group != "seeded" for n in names or []}
    return [e for e in experiments if e in named]


def collect_runs(runs_dir: Path, params: dict) -> tuple[dict, list, dict]:
    """({experiment: [Run per evaluated seed]}, the (experiment, seed) pairs not evaluated yet,
    {experiment: its seeds}) for the study's experiments (study_experiments); each experiment's
    seeds from pipeline.config.experiment_seeds."""
    found, missing, planned = {}, [], {}
    for exp in study_experiments(params):
        planned[exp] = experiment_seeds(params, exp)
        for seed in planned[exp]:
            run = read_run(exp, seed, Path(runs_dir) / exp / f"s{seed}")
            if run is None:
                missing.append((exp, seed))
            else:
                found.setdefault(exp, []).append(run)
    return found, missing, planned


# ---------------------------------------------------------------- what each run was


def _steps_of(run: Run) -> int | None:
    """Optimizer steps: the run record's (older runs: metrics.json's), else the lines of steps.jsonl."""
    value = (run.record.get("metrics") or {}).get("steps", run.metrics.get("steps"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return len(run.steps) if run.steps is not None else None


def run_facts(run: Run) -> dict:
    """What a run was, from its record and metrics; older records lack some fields (defaults noted)."""
    config = run.record.get("config") or {}
    model, train = config.get("model") or {}, config.get("train") or {}
    n_dev = (run.record.get("evaluation") or {}).get("n_dev", run.metrics.get("n_dev"))
    if not isinstance(n_dev, dict):  # older runs: count what dev_predictions.csv holds
        n_dev = {t: len(f) for t, f in run.preds.items()}
    return {"experiment": run.experiment, "seed": run.seed,
            "freeze_layers": int(model.get("freeze_layers", 0) or 0), "mode": model.get("mode", "finetune"),
            "precision": str((run.record.get("metrics") or {}).get("precision") or run.metrics.get("precision")
                             or train.get("precision") or "fp32"),
            "steps": _steps_of(run), "n_dev": dict(n_dev), "eval_limit": train.get("eval_limit"),
            "gn_alpha": train.get("gn_alpha"), "gn_lr": train.get("gn_lr"), "balancer": train.get("balancer")}


def best_row(rows: list[Row], metric: str) -> Row | None:
    scored = [r for r in rows if metric in r.ours]
    return max(scored, key=lambda r: r.ours[metric].point) if scored else None


# ---------------------------------------------------------------- the stage


def run_report(params_path: str | Path = "params.yaml", out_dir: str | Path = "reports",
               profile: str | None = None) -> dict:
    """Build every table, figure and REPORT.md from the run records; returns what it wrote."""
    params = read_params(params_path)
    settings = Settings.from_params(params.get("report"), source=str(params_path))
    cfg = load_config(params_path, profile=profile)
    experiments = {e: (params.get("experiments") or {})[e] for e in study_experiments(params)}
    out_dir = Path(out_dir)
    paper = read_paper_results(settings.paper_results)
    boot = Bootstrap(settings.n_boot, settings.ci, settings.seed)

    runs, missing, planned = collect_runs(study_dir(cfg.tracking.runs_dir), params)
    facts = {exp: [run_facts(r) for r in rs] for exp, rs in runs.items()}
    all_preds = [r.preds for rs in runs.values() for r in rs]
    ids = canonical_ids(all_preds)
    estimates = {exp: estimate_runs(boot, [r.preds for r in rs], ids) for exp, rs in runs.items()}
    majority = majority_estimates(boot, dev_labels(all_preds, ids))

    tables = {t: table_rows(paper, experiments, t) for t in (1, 2, 4)}
    for rows in tables.values():
        attach(rows, estimates)
        mark_did_not_learn(rows, majority)
    refs = {t: find_row(tables, t, settings.reference_of(t)) for t in tables}
    for t, rows in tables.items():
        differences(rows, refs[t], boot)

    table_dir, fig_dir = out_dir / "tables", out_dir / "figures"
    written = []
    for t, rows in tables.items():
        metrics = table_metrics(rows)
        maj = {m: e for m, e in majority.items() if m in metrics}
        md = f"{score_legend(settings)}\n\n{markdown(display_frame(rows, metrics, maj))}"
        ref = refs[t]
        if ref is not None:
            md += f"\n{difference_legend(settings, ref.label)}\n\n{markdown(diff_frame(rows, metrics, ref))}"
        written += _write_table(table_dir / f"table{t}", md, to_frame(rows, metrics, maj),
                                display_frame(rows, metrics, maj), f"Table {t}: ours vs the paper")

    t3 = table3(paper, tables[2], settings, runs, cfg.data.prepared_dir, out_dir)
    written += _write_table(table_dir / "table3", t3["md"], t3["frame"], t3["frame"], "Table 3: test set")

    alphas = gradnorm_alphas(tables[4], runs, facts, params_path, profile)
    gn_check = compare_gradnorm_alphas({a: {r.seed: r.steps for r in rs if r.steps is not None}
                                        for a, (_, rs) in alphas.items()}, GN_ALPHA_TOL)
    written += write_figures(fig_dir, tables, majority, runs, facts, alphas)
    written += write_dvc_views(out_dir, estimates, list(experiments), runs)

    profile_name = profile or os.environ.get("MINBERT_PROFILE") or params.get("profile")
    context = dict(profile=profile_name, params=params, cfg=cfg, settings=settings, planned=planned, runs=runs,
                   facts=facts, missing=missing, ids=ids, majority=majority, tables=tables, refs=refs, table3=t3,
                   paper=paper, out_dir=out_dir, figures=FIGURES, gradnorm=gn_check, alphas=alphas)
    written.append(write_report_md(out_dir / "REPORT.md", context))
    n_runs = sum(len(v) for v in runs.values())
    log.info("report: %d of %d runs evaluated; wrote %s", n_runs, n_runs + len(missing), out_dir / "REPORT.md")
    return {"written": [str(p) for p in written], "missing": missing, "tables": tables, "refs": refs,
            "majority": majority, "table3": t3, "gradnorm": gn_check, "facts": facts}


def score_legend(settings: Settings) -> str:
    return (f"Scores: ours = mean over the experiment's seeds (± std across seeds where it has more than one; "
            f"Seeds: how many) [{settings.ci:.0%} bootstrap interval over dev examples]; paper = as published "
            "(— where the paper has no such row: a row of ours alone, such as the sweep's best recipe). "
            "The bootstrap covers the sampling of dev examples, the ± std training randomness. "
            "Majority class: the most frequent label of the scored dev examples. A row marked "
            f"\"did not learn\" has the lower end of its interval on {task_list(LEARN_METRICS, 'or')} accuracy at or "
            "below the majority-class rate.")


def difference_legend(settings: Settings, ref: str) -> str:
    return (f"Differences from {ref}: the point difference [{settings.ci:.0%} paired bootstrap interval over the same "
            f"dev examples]; where both rows have two or more seeds also `seeds [...]`, a {settings.ci:.0%} Welch t "
            "interval on the seed means (training randomness). `resolved`: neither interval contains 0; "
            "`~noise (...)`: the named interval contains 0; `resolved (bootstrap only)`: a row has fewer than two "
            "seeds, so only the bootstrap applied and training randomness is not covered. Decided on unrounded "
            "numbers.")


def gradnorm_alphas(rows4: list[Row], runs: dict, facts: dict, params_path, profile) -> dict:
    """{alpha: (row label, [Run])} for Table 4's rows; alpha as the runs recorded it, else as configured."""
    out: dict = {}
    for row in rows4:
        for exp in row.experiments:
            alpha = next((f["gn_alpha"] for f in facts.get(exp, []) if f.get("gn_alpha") is not None), None)
            if alpha is None:
                alpha = load_config(params_path, exp, profile=profile).train.gn_alpha
            out.setdefault(float(alpha), (row.label, []))[1].extend(runs.get(exp, []))
    return out


def write_figures(fig_dir: Path, tables: dict, majority: dict, runs: dict, facts: dict, alphas: dict) -> list[Path]:
    """Every figure of REPORT.md; one whose data is missing says so instead of failing."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    main_metrics = [m for m in HEADLINE_METRICS if m in table_metrics(tables[2])]
    figs.ablation_scores(tables[2], majority, main_metrics, fig_dir / "ablation_scores.png",
                         "Table 2: dev scores per ablation")
    figs.ablation_scores(tables[1], majority, table_metrics(tables[1]), fig_dir / "table1_sentiment.png",
                         "Table 1: pretrain vs fine-tune")
    by_label = {r.label: r for r in tables[4]}
    figs.alpha_sensitivity([(a, by_label[label]) for a, (label, _) in alphas.items()],
                           fig_dir / "alpha_sensitivity.png")
    ordered = list(dict.fromkeys(e for t in (1, 2, 4) for r in tables[t] for e in r.experiments))
    histories = {e: [r.history for r in runs[e] if r.history] for e in ordered if e in runs}
    limits = sorted({f["eval_limit"] for fs in facts.values() for f in fs if f.get("eval_limit") is not None})
    figs.dev_curves({e: h for e, h in histories.items() if h}, fig_dir / "dev_curves.png", limits,
                    did_not_learn_experiments(tables, runs))
    steps = {e: [r.steps for r in runs[e] if r.steps is not None] for e in ordered if e in runs}
    steps = {e: s for e, s in steps.items() if s}
    titles = {e: f"{e} (alpha={a:g})" for a, (_, rs) in alphas.items() for e in {r.experiment for r in rs}}
    figs.gradnorm_weights(steps, fig_dir / "gradnorm_weights.png", titles)
    figs.pcgrad_conflicts(steps, fig_dir / "pcgrad_conflicts.png")
    figs.ours_vs_paper([r for t in (1, 2, 4) for r in tables[t]], fig_dir / "ours_vs_paper.png")
    return [fig_dir / f for f in FIGURES]


def did_not_learn_experiments(tables: dict, runs: dict) -> set[str]:
    """The experiments behind a row's did-not-learn task (a Table 1 row has one experiment per task)."""
    return {e for rows in tables.values() for row in rows for m in row.did_not_learn for e in row.experiments
            if any(TASK_OF_METRIC.get(m) in r.preds for r in runs.get(e, []))}


def _write_table(stem: Path, md: str, frame: pd.DataFrame, display: pd.DataFrame, caption: str) -> list[Path]:
    pio.write_text(stem.with_suffix(".md"), md)
    pio.write_with(stem.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    pio.write_text(stem.with_suffix(".tex"), latex(display, caption, f"tab:{stem.name}"))
    return [stem.with_suffix(s) for s in (".md", ".csv", ".tex")]


# ---------------------------------------------------------------- Table 3 and its test predictions


def pick_test_run(best: Row, runs: dict, metric: str) -> tuple[Run | None, str]:
    """The run whose test predictions stand for the row: the seed with the best dev `metric`
    (metrics.json; the first seed on a tie or where none has it), and why."""
    candidates = [r for e in best.experiments for r in runs.get(e, [])]
    if not candidates:
        return None, "no evaluated run"
    if len(candidates) == 1:
        return candidates[0], "its only evaluated seed"
    run = max(candidates, key=lambda r: estimate_point(r, metric))  # max keeps the first of equals
    if not np.isfinite(estimate_point(run, metric)):
        return candidates[0], f"the first of {len(candidates)} seeds (no dev {METRIC_NAMES[metric]} in metrics.json)"
    return run, f"the seed with the best dev {METRIC_NAMES[metric]} of {len(candidates)} evaluated seeds"


def copy_test_predictions(run: Run, prepared_dir: str, out: Path) -> dict:
    """Copy the run's leaderboard files (written by the evaluate stage) into `out`; never predicts.

    Returns {"files": [copied], "missing": [task, ...], "absent_data": [tasks without a test file]}.
    A missing file is logged and reported, not an error.
    """
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config = run.record.get("config") or {}
    tasks = [t for t in ((config.get("train") or {}).get("tasks") or TEST_TASKS) if t in TEST_TASKS]
    files, missing, absent = [], [], []
    prepared = Path(prepared_dir)
    for task in tasks:
        src = run.run_dir / "predictions" / TEST_FILE.format(task=task)
        if src.exists():
            dst = out / src.name
            pio.write_with(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
            files.append(dst)
        elif prepared.is_dir() and not (prepared / f"{task}-test.safetensors").exists():
            absent.append(task)  # the data has no test file for the task (Quora's is optional): nothing to predict
        else:
            missing.append(task)
    if missing:
        log.warning("%s: no test predictions for %s (%s); Table 3 lists them as missing", run.run_dir,
                    ", ".join(missing), ", ".join(TEST_FILE.format(task=t) for t in missing))
    return {"files": files, "missing": missing, "absent_data": absent}


def table3(paper: pd.DataFrame, rows2: list[Row], settings: Settings, runs: dict, prepared_dir: str,
           out_dir: Path) -> dict:
    """The paper's test row; our dev scores of its model and of our best Table 2 model, whose
    test-set predictions (labels are not public) the evaluate stage wrote in the leaderboard format."""
    metrics = list(HEADLINE_METRICS)
    name = METRIC_NAMES[settings.best_metric]
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
                          **{METRIC_NAMES[m]: cell(same.ours.get(m), m in same.did_not_learn) for m in metrics},
                          "Test predictions": "—"})
    copied = {"files": [], "missing": [], "absent_data": []}
    run, why, note = None, "", ""
    out = out_dir / "test_predictions"
    if best is not None:
        run, why = pick_test_run(best, runs, settings.best_metric)
        copied = copy_test_predictions(run, prepared_dir, out)
        listing = ", ".join(f"`{_rel(p)}`" for p in copied["files"]) or "none"
        gaps = []
        if copied["missing"]:
            expected = {t: _rel(run.run_dir / "predictions" / TEST_FILE.format(task=t)) for t in copied["missing"]}
            gaps.append("missing: " + ", ".join(f"{t} (no `{p}`)" for t, p in expected.items()))
        if copied["absent_data"]:
            gaps.append(", ".join(copied["absent_data"]) + ": no test file in the data")
        source = f"from `{_rel(run.run_dir)}`, {why}"
        lines.append({"Row": f"Ours, best dev {name}: {best.label}", "Split": "dev",
                      **{METRIC_NAMES[m]: cell(best.ours.get(m), m in best.did_not_learn) for m in metrics},
                      "Test predictions": "—"})
        lines.append({"Row": f"Ours, best dev {name}: {best.label}", "Split": "test",
                      **{METRIC_NAMES[m]: "not scored (labels not public)" for m in metrics},
                      "Test predictions": f"{listing} ({source}" + (f"; {'; '.join(gaps)}" if gaps else "") + ")"})
        if copied["missing"]:
            note = (f"Test predictions missing for {', '.join(copied['missing'])}: `{_rel(run.run_dir)}` has no "
                    f"{', '.join(f'`predictions/{TEST_FILE.format(task=t)}`' for t in copied['missing'])}. The report "
                    "does not run models; re-run the evaluate stage with `eval.test_predictions: true` for this run.")
        readme = (f"Table 3's leaderboard files: {best.label}, {source}.\n"
                  + (f"\n{note}\n" if note else ""))
    else:
        shutil.rmtree(out, ignore_errors=True)
        readme = "No Table 2 run evaluated yet.\n"
    pio.write_text(out / "README.md", readme)
    frame = pd.DataFrame(lines)
    md = ("The test labels are not public: our test row gives the leaderboard-format predictions of our best "
          f"Table 2 model (by dev {name}) for submission, not scores. They are the files the evaluate stage wrote "
          "for that run, copied; the report never runs a model.\n\n" + markdown(frame)
          + (f"\n**{note}**\n" if note else ""))
    return {"frame": frame, "md": md, "best": best, "run": run, "why": why, "note": note, **copied}


def _rel(path: Path) -> str:
    """A path relative to the working directory (the repository) when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def estimate_point(run: Run, metric: str) -> float:
    value = run.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else -np.inf
