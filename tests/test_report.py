"""The report stage from fixture run records the tests write: scores, intervals, noise marking,
every paper row, majority baselines, partial results."""
from __future__ import annotations

import ast
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import PARAMS, ROOT
from pipeline.config import check_study, load_config
from pipeline.errors import PipelineError
from pipeline.evaluate import METRIC_OF_TASK, summarize, task_score
from pipeline.report import FIGURES, run_report, study_experiments
from pipeline.report_stats import Bootstrap, estimate_runs, read_dev_predictions

PAPER = ROOT / "reports" / "paper_results.csv"


def _run(task_preds: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, pd.DataFrame]:
    return {t: pd.DataFrame({"prediction": p, "label": y}, index=pd.Index([f"{t}{i:05d}" for i in range(len(y))]))
            for t, (p, y) in task_preds.items()}


def _acc_task(rng, n: int, correct: float, classes: int = 5):
    y = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < correct, y, (y + 1) % classes)
    return pred, y


def _ids(run):
    return {t: sorted(f.index) for t, f in run.items()}


# ---------------------------------------------------------------- statistics


def test_interval_contains_point_and_shrinks_with_n():
    boot = Bootstrap(n_boot=400, ci=0.95, seed=1)
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 2000):
        y = rng.normal(size=n)
        run = _run({"sst": _acc_task(rng, n, 0.6), "para": _acc_task(rng, n, 0.8, classes=2),
                    "sts": (y + rng.normal(scale=1.0, size=n), y)})
        est = estimate_runs(boot, [run], _ids(run))
        for metric in ("sst_acc", "para_acc", "sts_corr", "avg", "leaderboard_avg"):
            assert est[metric].lo <= est[metric].point <= est[metric].hi, (n, metric)
        frame = run["sst"]
        assert est["sst_acc"].point == pytest.approx(task_score("sst", frame["prediction"], frame["label"]))
        tasks = {m: est[m].point for m in ("sst_acc", "para_acc", "sts_corr")}
        assert est["avg"].point == pytest.approx(summarize(tasks)["avg"])
        widths.append({m: est[m].hi - est[m].lo for m in est})
    for metric in widths[0]:
        assert widths[1][metric] < widths[0][metric] / 2, metric


def test_seed_mean_and_std():
    boot = Bootstrap(n_boot=200, ci=0.95, seed=3)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    seeds = [_run({"sst": (np.where(np.arange(300) < k, y, (y + 1) % 5), y)}) for k in (120, 180, 240)]
    est = estimate_runs(boot, seeds, _ids(seeds[0]))["sst_acc"]
    assert est.n_seeds == 3 and est.point == pytest.approx(0.6)
    assert est.std == pytest.approx(np.std([0.4, 0.6, 0.8], ddof=1))
    one = estimate_runs(boot, seeds[:1], _ids(seeds[0]))["sst_acc"]
    assert np.isnan(one.std) and one.point == pytest.approx(0.4)


def test_paired_difference_marks_noise_and_flips_when_large():
    boot = Bootstrap(n_boot=500, ci=0.95, seed=5)
    rng = np.random.default_rng(2)
    n = 400
    pred, y = _acc_task(rng, n, 0.5)
    base = estimate_runs(boot, [_run({"sst": (pred, y)})], {"sst": [f"sst{i:05d}" for i in range(n)]})["sst_acc"]
    ids = {"sst": [f"sst{i:05d}" for i in range(n)]}
    nudged = pred.copy()
    nudged[:4] = y[:4]  # at most 4 more right: inside the noise
    small = boot.difference(estimate_runs(boot, [_run({"sst": (nudged, y)})], ids)["sst_acc"], base)
    better = pred.copy()
    better[: n // 2] = y[: n // 2]  # half the examples fixed: a large, real difference
    large = boot.difference(estimate_runs(boot, [_run({"sst": (better, y)})], ids)["sst_acc"], base)
    assert small.within_noise and small.lo <= small.point <= small.hi
    assert not large.within_noise and large.lo > 0
    # Pairing: the difference's interval is much tighter than either score's.
    assert (small.hi - small.lo) < (base.hi - base.lo)


def test_bad_dev_predictions_is_one_line_error(tmp_path):
    bad = tmp_path / "dev_predictions.csv"
    bad.write_text("task,id,prediction\nsst,a,1\n")
    with pytest.raises(PipelineError, match="dev_predictions.csv: missing column"):
        read_dev_predictions(bad)


# ---------------------------------------------------------------- the stage


def test_params_experiments_cover_every_paper_row():
    params = yaml.safe_load(PARAMS.read_text())
    study = study_experiments(params)
    others = [n for n in params["experiments"] if n not in study]  # the quality candidates: not study rows
    assert all(not params["experiments"][n].get("rows") for n in others)
    assert [p for p in check_study(params) if not any(f"experiments.{n} is in no train_groups" in p
                                                       for n in others)] == []
    broken = yaml.safe_load(PARAMS.read_text())
    broken["train_groups"]["backbone"].remove("baseline")
    broken["train_groups"]["mlm"].append("baseline")
    del broken["profiles"]["cpu"]["eval"]
    problems = check_study(broken)
    assert "experiments.baseline belongs in train_groups.backbone, not mlm" in problems
    assert "profiles.cpu.eval is missing (DVC stages depend on it; use {})" in problems
    paper = pd.read_csv(PAPER)
    rows = {(r["table"], r["label"]) for n in study for r in params["experiments"][n]["rows"]}
    for _, rec in paper[paper["table"] != 3].iterrows():
        assert (rec["table"], rec["experiment"]) in rows, rec["experiment"]
    # Table 4's alpha = 1.0 row is Table 2's last row: one experiment, trained once.
    shared = [n for n in study if {r["table"] for r in params["experiments"][n]["rows"]} == {2, 4}]
    assert len(shared) == 1 and load_config(PARAMS, shared[0]).train.gn_alpha == 1.0


@pytest.fixture
def study(tmp_path, prepared):
    """The real params.yaml pointed at the micro prepared data and a scratch runs folder."""
    params = yaml.safe_load(PARAMS.read_text())
    params["data"]["prepared_dir"] = str(prepared)
    params["tracking"]["runs_dir"] = str(tmp_path / "runs")
    params["mlm"]["output_dir"] = str(tmp_path / "mlm")
    params["report"].update(paper_results=str(PAPER), n_boot=100)
    params["profile"] = "micro"
    params["extra_seeds"] = []  # one seed per experiment unless a test adds more
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, params


def write_run(params: dict, prepared, exp: str, seed: int, skill: float, rng, *, majority: tuple = (),
              metrics: dict | None = None, test_tasks=("sst", "sts"), gn_weights=None) -> Path:
    """A fixture run: predictions right with probability `skill` (tasks in `majority`: the majority
    label for every example), plus the files the stages write. `gn_weights(step, task_index, alpha)`
    sets the logged GradNorm weights."""
    from pipeline.data import load_split

    cfg = load_config(params["__path__"], exp)
    run_dir = cfg.run_dir.parent / f"s{seed}"
    frames, scores = [], {}
    for task in cfg.train.tasks:
        data = load_split(prepared, task, "dev")
        y = data.labels.numpy()
        if task in majority:
            values, counts = np.unique(y, return_counts=True)
            pred = np.full(len(y), values[np.argmax(counts)])
        elif task == "sts":
            pred = np.where(rng.random(len(y)) < skill, y, rng.uniform(0, 5, len(y)))
        else:
            classes = 5 if task == "sst" else 2
            pred = np.where(rng.random(len(y)) < skill, y, (y + 1) % classes)
        frames.append(pd.DataFrame({"task": task, "id": data.ids, "prediction": pred, "label": y}))
        scores[METRIC_OF_TASK[task]] = task_score(task, pred, y)
    run_dir.mkdir(parents=True)
    pd.concat(frames).to_csv(run_dir / "dev_predictions.csv", index=False)
    (run_dir / "metrics.json").write_text(json.dumps({**summarize(scores), "seed": seed, "experiment": exp,
                                                      **(metrics or {})}))
    (run_dir / "history.json").write_text(json.dumps([{"epoch": e, "steps": 3, **summarize(scores)} for e in (1, 2)]))
    gn_weights = gn_weights or (lambda s, i, alpha: 1.0 + 0.01 * s * (i - 1))
    steps = []
    for s in range(1, 7):
        entry = {"step": s, "epoch": 1 + (s > 3)}
        if cfg.train.balancer == "gradnorm":
            entry |= {f"gn_weight_{t}": gn_weights(s, i, cfg.train.gn_alpha) for i, t in enumerate(cfg.train.tasks)}
        if cfg.train.balancer == "pcgrad":
            entry["pcgrad_conflict_share"] = (s % 3) / 3
        steps.append(entry)
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))
    (run_dir / "record.json").write_text(json.dumps({"name": exp, "status": "completed", "config": cfg.to_dict(),
                                                     "wall_time_s": 1.0}))
    preds = run_dir / "predictions"
    preds.mkdir()
    for task in test_tasks:
        (preds / f"{task}-test-output.csv").write_text(f"id \t Predicted \n{task}{seed} , 1 \n")
    return run_dir


def test_report_has_every_table_row_figure_and_majority(study, prepared):
    path, params = study
    params["__path__"] = path
    rng = np.random.default_rng(7)
    for exp in study_experiments(params):
        write_run(params, prepared, exp, 11711, skill=0.9 if exp == "cos_relu_loop" else 0.5, rng=rng)
    out = path.parent / "reports"
    result = run_report(path, out_dir=out)
    paper = pd.read_csv(PAPER)
    for t in (1, 2, 3, 4):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"table{t}.{ext}").stat().st_size > 0
    for t in (1, 2, 4):
        frame = pd.read_csv(out / "tables" / f"table{t}.csv")
        for _, rec in paper[paper["table"] == t].iterrows():
            row = frame[frame["row"] == rec["experiment"]]
            assert len(row) == 1, rec["experiment"]
            for m in ("avg", "sst_acc", "para_acc", "sts_corr", "cfimdb_acc"):
                if pd.notna(rec[m]):
                    assert pd.notna(row[m].iloc[0]) and row[m + "_paper"].iloc[0] == pytest.approx(rec[m])
        majority = frame[frame["row"] == "Majority class (dev)"].iloc[0]
        from pipeline.data import load_split

        for task, metric in (("sst", "sst_acc"), ("para", "para_acc"), ("cfimdb", "cfimdb_acc")):
            if metric in frame.columns:
                _, counts = np.unique(load_split(prepared, task, "dev").labels.numpy(), return_counts=True)
                assert majority[metric] == pytest.approx(counts.max() / counts.sum())
        if "sts_corr" in frame.columns:
            assert majority["sts_corr"] == 0.0  # a constant prediction has no correlation
    t2 = pd.read_csv(out / "tables" / "table2.csv").set_index("row")
    assert not t2.loc["Baseline + Cos + ReLU + Loop", "avg_within_noise"]  # 0.9 vs 0.5 skill: real
    assert "Baseline + Cos + ReLU + Loop" in (out / "tables" / "table3.md").read_text()
    assert (out / "test_predictions" / "sst-test-output.csv").exists()
    for name in FIGURES:
        assert (out / "figures" / name).stat().st_size > 1000, name
    report = (out / "REPORT.md").read_text()
    for label in paper["experiment"]:
        assert label in report
    assert "missing" not in pd.read_csv(out / "tables" / "table2.csv").to_string()
    assert result["missing"] == []
    # Every GN run logged the same weights whatever its alpha: the report says alpha did not matter.
    assert result["gradnorm"]["max_trajectory_diff"] == 0 and not result["gradnorm"]["differ"]
    assert "Alpha did not matter within this run length" in report
    # What DVC's views read: a few headline numbers, and the data of the top-level plots.
    headline = json.loads((out / "metrics.json").read_text())
    # The study's experiments are the columns of `dvc exp show`: avg first, each experiment in params order.
    assert list(headline)[0] == "avg"
    multitask = [e for e in study_experiments(params) if e not in headline.get("sst_acc", {})
                 and e not in headline.get("cfimdb_acc", {})]
    assert list(headline["avg"]) == multitask
    assert headline["avg"]["cos_relu_loop"] == pytest.approx(t2.loc["Baseline + Cos + ReLU + Loop", "avg"], abs=1e-4)
    assert headline["avg"]["baseline"] == pytest.approx(t2.loc["Baseline", "avg"], abs=1e-4)
    assert set(headline["sst_acc"]) == {"sst_pretrain", "sst_finetune"}
    assert set(headline["cfimdb_acc"]) == {"cfimdb_pretrain", "cfimdb_finetune"}
    assert sum(len(block) for block in headline.values()) == len(study_experiments(params))
    assert all(isinstance(v, float) for block in headline.values() for v in block.values())  # metrics only
    scores = json.loads((out / "plots" / "scores.json").read_text())
    assert {r["experiment"] for r in scores} >= {"baseline", "cos_relu_loop"}
    curves = json.loads((out / "plots" / "dev_curves.json").read_text())
    assert {c["run"] for c in curves} == {f"{e}/s11711" for e in study_experiments(params)}
    assert {c["epoch"] for c in curves} == {1, 2}


def test_missing_runs_show_as_missing(study, prepared):
    path, params = study
    params["__path__"] = path
    write_run(params, prepared, "baseline", 11711, skill=0.6, rng=np.random.default_rng(0))
    # An experiment outside train_groups (a quality candidate) is not part of the study: never read.
    write_run(params, prepared, "quality_bi_encoder", 11711, skill=0.6, rng=np.random.default_rng(1))
    out = path.parent / "reports"
    result = run_report(path, out_dir=out)
    md = (out / "tables" / "table2.md").read_text()
    assert "| Baseline + ReLU | missing |" in md
    study = study_experiments(params)
    groups = params["train_groups"]
    assert "quality_bi_encoder" not in study and len(study) == len(groups["backbone"]) + len(groups["mlm"])
    assert len(result["missing"]) == len(study) - 1
    assert "quality_bi_encoder" not in (out / "REPORT.md").read_text() and "quality_bi_encoder" not in result["facts"]
    assert pd.read_csv(out / "tables" / "table4.csv")["avg"].iloc[:4].isna().all()
    for name in FIGURES:
        assert (out / "figures" / name).exists()
    assert "Missing:" in (out / "REPORT.md").read_text()


# ---------------------------------------------------------------- seeds, noise, did-not-learn, read-only


def _est(point: float, lo: float, hi: float, points=()):
    from pipeline.report_stats import Estimate

    return Estimate(point, lo, hi, float(np.std(points, ddof=1)) if len(points) > 1 else math.nan,
                    max(len(points), 1), 100, np.zeros(10), tuple(points) or (point,))


def _exact(n: int, right: int, y: np.ndarray) -> np.ndarray:
    """Predictions right on exactly the first `right` of n examples."""
    return np.where(np.arange(n) < right, y, (y + 1) % 5)


def test_report_metrics_match_evaluate():
    """The report's torch-free metrics are pipeline.evaluate's, replicate by replicate."""
    from pipeline import evaluate, report_stats

    assert report_stats.METRIC_OF_TASK == evaluate.METRIC_OF_TASK
    rng = np.random.default_rng(4)
    y5 = rng.integers(0, 5, 200)
    p5 = np.where(rng.random(200) < 0.6, y5, (y5 + 1) % 5)
    ys = rng.uniform(0, 5, 200)
    boot = Bootstrap(n_boot=20, ci=0.95, seed=0)
    for task, p, y in (("sst", p5, y5), ("para", (p5 % 2).astype(float), (y5 % 2).astype(float)),
                       ("sts", ys + rng.normal(size=200), ys), ("sts", np.ones(200), ys)):
        assert report_stats.task_score(task, p, y) == pytest.approx(evaluate.task_score(task, p, y))
        loop = [evaluate.task_score(task, p[i], y[i]) for i in boot.indices(task, len(y))]
        np.testing.assert_allclose(boot.replicates(task, p, y), loop, atol=1e-12)
    scores = {"sst_acc": 0.5, "para_acc": 0.7, "sts_corr": 0.4}
    assert report_stats.summarize(scores) == pytest.approx(evaluate.summarize(scores))


def test_resolved_needs_both_intervals_to_exclude_zero():
    from scipy import stats

    from pipeline.report_stats import Difference, welch_interval
    from pipeline.report_tables import diff_cell

    both = Difference(0.05, 0.01, 0.09, 0.02, 0.08)
    seeds_straddle = Difference(0.05, 0.01, 0.09, -0.03, 0.13)
    boot_straddle = Difference(0.05, -0.01, 0.11, 0.02, 0.08)
    one_seed = Difference(0.05, 0.01, 0.09)
    assert both.resolved and both.marker == "resolved" and both.basis == "bootstrap + seeds"
    assert not seeds_straddle.resolved and seeds_straddle.marker == "~noise (seeds)"
    assert not boot_straddle.resolved and boot_straddle.marker == "~noise (dev sampling)"
    assert one_seed.resolved and one_seed.marker == "resolved (bootstrap only)" and one_seed.basis == "bootstrap only"
    # Decided on unrounded numbers and printed so that a bound is never shown as a zero it is not.
    tiny = Difference(0.01, 0.0003, 0.02)
    touching = Difference(0.01, 0.0, 0.02)
    assert tiny.resolved and diff_cell(tiny) == "+0.010 [+3.0e-04, +0.020] resolved (bootstrap only)"
    assert not touching.resolved and diff_cell(touching) == "+0.010 [0, +0.020] ~noise (dev sampling)"
    assert "0.000" not in diff_cell(Difference(-0.0002, -0.0004, -0.0001)) + diff_cell(tiny)
    assert "seeds [+0.020, +0.080] resolved" in diff_cell(both)
    # Welch t on the seed means, as by hand.
    a, b = [0.61, 0.63, 0.60], [0.55, 0.50, 0.58, 0.52]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    half = stats.t.ppf(0.975, (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)) * math.sqrt(va + vb)
    d = np.mean(a) - np.mean(b)
    assert welch_interval(a, b, 0.95) == pytest.approx((d - half, d + half))
    assert all(math.isnan(x) for x in welch_interval([0.6], b, 0.95))
    # Through Bootstrap.difference: a tight paired bootstrap but seeds that scatter is not resolved.
    boot = Bootstrap(n_boot=300, ci=0.95, seed=2)
    y = np.random.default_rng(3).integers(0, 5, 400)
    ids = {"sst": [f"sst{i:05d}" for i in range(400)]}
    noisy = estimate_runs(boot, [_run({"sst": (_exact(400, k, y), y)}) for k in (360, 200, 280)], ids)["sst_acc"]
    steady = estimate_runs(boot, [_run({"sst": (_exact(400, k, y), y)}) for k in (240, 220, 260)], ids)["sst_acc"]
    diff = boot.difference(noisy, steady)
    assert diff.point == pytest.approx(0.1) and not diff.bootstrap_contains_zero
    assert diff.seeds_contain_zero and not diff.resolved and diff.marker == "~noise (seeds)"


def test_interval_rounding_never_contradicts_the_verdict():
    """However small or close to 0 the bounds, an interval that excludes 0 prints both bounds on one side of
    it (never as "+0.000"), one that contains 0 prints them around it, and the marker says which."""
    import re

    from pipeline.report_stats import Difference
    from pipeline.report_tables import diff_cell

    rng = np.random.default_rng(0)
    for _ in range(3000):
        scale = 10.0 ** rng.integers(-7, 0)
        lo, hi = np.sort(rng.normal(scale=scale, size=2))
        seed_lo, seed_hi = np.sort(rng.normal(scale=scale, size=2))
        diff = Difference(float((lo + hi) / 2), float(lo), float(hi), float(seed_lo), float(seed_hi))
        text = diff_cell(diff)
        printed = [[float(v) for v in group.split(", ")] for group in re.findall(r"\[([^\]]+)\]", text)]
        for (a, b), (x, y) in zip(printed, [(lo, hi), (seed_lo, seed_hi)]):
            if x > 0 or y < 0:  # excludes 0: no bound prints as zero, both keep their sign
                assert a != 0 and b != 0 and (a > 0) == (b > 0) == (x > 0), (text, x, y)
            else:
                assert a <= 0 <= b, (text, x, y)
        assert text.endswith(diff.marker) and diff.marker.startswith("resolved") == diff.resolved
        assert "0.000" not in text  # the symptom: a bound that is not zero printed as zero


def test_report_columns_and_tasks_come_from_the_task_registry(tmp_path):
    from pipeline import report_tables, tasks

    assert list(report_tables.METRIC_NAMES) == ["avg", *(t.metric for t in tasks.TASKS.values()), "leaderboard_avg"]
    assert report_tables.METRIC_NAMES["para_acc"] == tasks.TASKS["para"].metric_title
    assert report_tables.LEARN_METRICS == tuple(t.metric for t in tasks.TASKS.values() if t.pair_kind != "score")
    assert report_tables.COMPONENTS["avg"] == tuple(tasks.TASKS[t].metric for t in tasks.MULTITASK)
    # A task the paper's results file has no column for (one added later) reads as not reported.
    fewer = tmp_path / "paper.csv"
    pd.read_csv(PAPER).drop(columns="cfimdb_acc").to_csv(fewer, index=False)
    frame = report_tables.read_paper_results(fewer)
    assert all("cfimdb_acc" not in report_tables.paper_scores(rec) for _, rec in frame.iterrows())
    pd.read_csv(PAPER).drop(columns="split").to_csv(fewer, index=False)
    with pytest.raises(PipelineError, match="paper.csv: missing column"):
        report_tables.read_paper_results(fewer)
    # No task name or metric key is spelled out in the report's code (prose and file names aside).
    literals = set(tasks.TASKS) | {t.metric for t in tasks.TASKS.values()}
    for path in [*sorted((ROOT / "pipeline").glob("report*.py")), ROOT / "benchmarks" / "quality.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in literals, f"{path.name}:{node.lineno} spells out {node.value!r}"


def test_did_not_learn_is_the_lower_end_against_the_majority_rate():
    from pipeline.report_tables import Row, cell, mark_did_not_learn

    majority = {"para_acc": _est(0.63, 0.55, 0.70), "sst_acc": _est(0.26, 0.2, 0.3), "sts_corr": _est(0.0, 0.0, 0.0)}
    at = Row(2, "at", ours={"para_acc": _est(0.70, 0.63, 0.77), "sst_acc": _est(0.4, 0.3, 0.5),
                            "sts_corr": _est(0.1, -0.5, 0.6), "avg": _est(0.4, 0.3, 0.5)})
    above = Row(2, "above", ours={"para_acc": _est(0.70, 0.6301, 0.77)})
    mark_did_not_learn([at, above], majority)
    assert at.did_not_learn == {"para_acc": 0.63}  # not above the rate: did not learn; STS is not judged
    assert above.did_not_learn == {}
    assert not at.learned("para_acc") and not at.learned("avg") and at.learned("sst_acc")
    assert cell(at.ours["para_acc"], True).endswith("(did not learn)")


def test_row_below_majority_did_not_learn_and_is_left_out_of_counts(study, prepared):
    from pipeline.report_text import survival

    path, params = study
    params["__path__"] = path
    rng = np.random.default_rng(11)
    write_run(params, prepared, "baseline", 11711, skill=0.95, rng=rng, majority=("para",))
    write_run(params, prepared, "relu", 11711, skill=0.95, rng=rng)
    out = path.parent / "reports"
    result = run_report(path, out_dir=out)
    t2 = pd.read_csv(out / "tables" / "table2.csv").set_index("row")
    assert bool(t2.loc["Baseline", "para_acc_did_not_learn"]) and not bool(t2.loc["Baseline", "sst_acc_did_not_learn"])
    assert not bool(t2.loc["Baseline + ReLU", "para_acc_did_not_learn"])
    assert t2.loc["Baseline", "para_acc"] == pytest.approx(t2.loc["Majority class (dev)", "para_acc"])
    assert "(did not learn)" in (out / "tables" / "table2.md").read_text()
    relu = next(r for r in result["tables"][2] if r.label == "Baseline + ReLU")
    # Ours is resolved and in the paper's direction: before, it counted as "same direction".
    assert relu.diff["para_acc"].resolved and relu.diff["para_acc"].point > 0 and relu.paper["para_acc"] > 0.5
    frame, counts, left_out = survival(result["tables"], result["refs"])
    verdict = frame.set_index(["Row", "Metric"])["Verdict"]
    assert verdict[("Baseline + ReLU", "Para Acc.")] == "left out: Baseline did not learn"
    assert verdict[("Baseline + ReLU", "Avg.")] == "left out: Baseline did not learn"
    sst = verdict[("Baseline + ReLU", "SST Acc.")]
    assert sst != "not run yet" and not sst.startswith("left out")
    scored = frame[frame["Verdict"] != "not run yet"]
    assert left_out == scored["Verdict"].str.startswith("left out").sum() >= 2
    assert sum(v for k, v in counts.items() if k != "not run yet") == len(scored) - left_out
    report = (out / "REPORT.md").read_text()
    assert f"Left out because a row did not learn the task (or, for Avg., a task in it): {left_out}." in report
    section = report.split("## Rows that did not learn")[1].split("## ")[0]
    assert "**Baseline** did not learn Quora" in section and "figures/dev_curves.png" in section
    assert "Baseline + ReLU" not in section


def test_several_seeds_give_mean_and_std_per_experiment(study, prepared, monkeypatch):
    from pipeline import report_figures

    path, params = study
    params["seeds"], params["extra_seeds"] = [11711], [1, 2]
    params["train_groups"]["seeded"] = ["baseline", "cos_relu_loop"]
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    params["__path__"] = path
    rng = np.random.default_rng(5)
    skills = {11711: 0.6, 1: 0.75, 2: 0.9}
    dirs = {}
    for seed, skill in skills.items():
        dirs[seed] = write_run(params, prepared, "baseline", seed, skill, rng)
        write_run(params, prepared, "cos_relu_loop", seed, min(skill + 0.05, 1.0), rng)
    write_run(params, prepared, "relu", 11711, 0.7, rng)
    write_run(params, prepared, "relu", 1, 0.7, rng)  # not one of relu's seeds: not collected
    for exp in ("gn_alpha_0_5", "gn_alpha_3_0"):  # weights that depend on alpha
        write_run(params, prepared, exp, 11711, 0.7, rng, gn_weights=lambda s, i, a: 1.0 + 0.01 * s * (i - 1) * a)
    # Run facts: one new-style record (freeze_layers, precision, steps in metrics.json), one old one.
    new = json.loads((dirs[11711] / "metrics.json").read_text())
    new.update(precision="bf16", steps=123, n_dev={"sst": 7, "para": 8, "sts": 9})
    (dirs[11711] / "metrics.json").write_text(json.dumps(new))
    rec = json.loads((dirs[11711] / "record.json").read_text())
    rec["config"]["model"]["freeze_layers"] = 2
    (dirs[11711] / "record.json").write_text(json.dumps(rec))
    old = json.loads((dirs[1] / "record.json").read_text())
    old["config"]["model"].pop("freeze_layers", None)
    old["config"]["train"].pop("precision", None)
    (dirs[1] / "record.json").write_text(json.dumps(old))

    seen = {}
    save = report_figures._save

    def spy(fig, where):
        seen[where.name] = {"title": fig._suptitle.get_text() if fig._suptitle else "",
                            "bands": [len(ax.collections) for ax in fig.axes]}
        save(fig, where)

    monkeypatch.setattr(report_figures, "_save", spy)
    out = path.parent / "reports"
    result = run_report(path, out_dir=out)

    t2 = pd.read_csv(out / "tables" / "table2.csv").set_index("row")
    avgs = [json.loads((dirs[s] / "metrics.json").read_text())["avg"] for s in skills]
    assert t2.loc["Baseline", "avg_n_seeds"] == 3 and t2.loc["Baseline + ReLU", "avg_n_seeds"] == 1
    assert t2.loc["Baseline", "avg"] == pytest.approx(np.mean(avgs))
    assert t2.loc["Baseline", "avg_std"] == pytest.approx(np.std(avgs, ddof=1))
    assert np.isnan(t2.loc["Baseline + ReLU", "avg_std"])
    md = (out / "tables" / "table2.md").read_text()
    assert f"| Baseline | 3 | {np.mean(avgs):.3f} ± {np.std(avgs, ddof=1):.3f} [" in md
    relu_line = next(line for line in md.splitlines() if line.startswith("| Baseline + ReLU | 1 |"))
    assert "±" not in relu_line
    # Both rows with 3 seeds: the across-seed interval applies; against a single-seed row only the bootstrap.
    assert t2.loc["Baseline + Cos + ReLU + Loop", "avg_diff_basis"] == "bootstrap + seeds"
    assert not np.isnan(t2.loc["Baseline + Cos + ReLU + Loop", "avg_diff_seed_lo"])
    assert t2.loc["Baseline + ReLU", "avg_diff_basis"] == "bootstrap only"
    assert ("relu", 1) not in result["missing"] and ("cos", 11711) in result["missing"]
    assert not [m for m in result["missing"] if m[0] in ("baseline", "cos_relu_loop")]
    # What each run was, from record.json and metrics.json, with defaults for the old record.
    facts = {f["seed"]: f for f in result["facts"]["baseline"]}
    assert (facts[11711]["freeze_layers"], facts[11711]["precision"], facts[11711]["steps"]) == (2, "bf16", 123)
    assert facts[11711]["n_dev"] == {"sst": 7, "para": 8, "sts": 9}
    assert (facts[1]["freeze_layers"], facts[1]["precision"], facts[1]["steps"]) == (0, "fp32", 6)
    report = (out / "REPORT.md").read_text()
    assert "| baseline | 11711, 1, 2 (11711, 1, 2) | 2, 0, 1 | bf16, fp32, auto | 123, 6 |" in report
    assert "covers the sampling of the dev set" in report and "cover training randomness" in report
    assert "seeds 11711, 1, 2 for `baseline`, `cos_relu_loop`" in report
    # GradNorm: weights that scale with alpha differ, and the report says by how much.
    gn = result["gradnorm"]
    assert gn["differ"] and gn["max_trajectory_diff"] == pytest.approx(0.01 * 6 * 1 * (3.0 - 0.5))
    assert "The weight trajectories differ across alpha** (by up to 0.15)" in report
    # Figures: the three-seed experiments get a shaded band; dev_curves names the selection sample.
    assert "selection sample" in seen["dev_curves.png"]["title"]
    assert all(n >= 2 for n in seen["dev_curves.png"]["bands"][:3])  # baseline and cos_relu_loop
    assert sum(seen["gradnorm_weights.png"]["bands"]) == 0  # one seed per alpha: no band


def test_figures_seed_bands_and_distinct_task_lines(tmp_path, monkeypatch):
    from pipeline import report_figures as figs

    band = figs.seed_band([pd.DataFrame({"step": [1, 2], "w": [1.0, 2.0]}),
                           pd.DataFrame({"step": [1, 2], "w": [3.0, 4.0]})], "step", "w")
    assert band["mean"].tolist() == [2.0, 3.0]
    assert band["min"].tolist() == [1.0, 2.0] and band["max"].tolist() == [3.0, 4.0]
    seen = {}
    save = figs._save

    def spy(fig, where):
        ax = fig.axes[0]
        seen[where.name] = {"title": fig._suptitle.get_text(), "ylabel": ax.get_ylabel(),
                            "lines": [(ln.get_linestyle(), ln.get_marker(), ln.get_linewidth())
                                      for ln in ax.get_lines()],
                            "bands": len(ax.collections)}
        save(fig, where)

    monkeypatch.setattr(figs, "_save", spy)
    def hist(v):
        return [{"epoch": 1, "sst_acc": v, "para_acc": v, "sts_corr": v},
                {"epoch": 2, "sst_acc": v + 0.1, "para_acc": v, "sts_corr": v}]

    histories = {"a": [hist(0.3), hist(0.4), hist(0.5)], "b": [hist(0.2)]}
    figs.dev_curves(histories, tmp_path / "dev_curves.png", [32], {"b"})
    dev = seen["dev_curves.png"]
    assert "small selection sample" in dev["title"] and "not the full dev set" in dev["title"]
    assert "32 dev rows" in dev["title"] and dev["ylabel"] == "score on the selection sample"
    assert dev["bands"] == 1  # a: three seeds; b: one
    assert dev["lines"][1][0] == "--"  # b did not learn: dashed
    same = pd.DataFrame({"step": [1, 2, 3], **{f"gn_weight_{t}": [1.0, 1.0, 1.0] for t in ("sst", "para", "sts")}})
    figs.gradnorm_weights({"gn": [same, same]}, tmp_path / "gradnorm_weights.png", {"gn": "gn (alpha=1)"})
    lines = seen["gradnorm_weights.png"]["lines"]
    assert len(lines) == 3 and len({(ls, mk) for ls, mk, _ in lines}) == 3  # equal weights, three distinct looks
    assert [lw for *_, lw in lines] == sorted((lw for *_, lw in lines), reverse=True)  # widest drawn first


def test_gradnorm_alpha_check():
    from pipeline.report_stats import compare_gradnorm_alphas

    def steps(scale):
        return pd.DataFrame({"step": [1, 2, 3], "gn_weight_sst": [1.0, 1.0 + scale, 1.0 + 2 * scale],
                             "gn_weight_para": [1.0, 1.0, 1.0], "loss_sst": [1.0, 0.9, 0.8]})

    same = compare_gradnorm_alphas({0.5: {1: steps(0.025)}, 1.5: {1: steps(0.025)}})
    assert same["max_trajectory_diff"] == 0 and not same["differ"] and same["common_steps"] == 3
    moved = compare_gradnorm_alphas({0.5: {1: steps(0.025)}, 1.5: {1: steps(0.03)}, 3.0: {1: steps(0.02)}})
    assert moved["differ"] and moved["max_trajectory_diff"] == pytest.approx(0.02) and moved["pair"] == (1.5, 3.0)
    assert moved["final_weights"][3.0]["sst"] == pytest.approx(1.04)
    apart = compare_gradnorm_alphas({0.5: {1: steps(0.0)}, 1.5: {2: steps(0.0), 3: steps(0.01)}})
    assert apart["basis"].startswith("seed means") and apart["max_trajectory_diff"] == pytest.approx(0.01)
    assert compare_gradnorm_alphas({0.5: {1: steps(0.0)}}) is None
    assert compare_gradnorm_alphas({0.5: {1: steps(0.0)}, 1.5: {1: steps(0.0).drop(columns="gn_weight_sst")
                                                                .drop(columns="gn_weight_para")}}) is None


def test_missing_test_predictions_give_a_note_not_a_crash(study, prepared, caplog):
    path, params = study
    params["__path__"] = path
    rng = np.random.default_rng(2)
    write_run(params, prepared, "cos_relu_loop", 11711, skill=0.95, rng=rng, test_tasks=())  # the best: no files
    write_run(params, prepared, "baseline", 11711, skill=0.5, rng=rng)
    out = path.parent / "reports"
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        result = run_report(path, out_dir=out)
    assert result["table3"]["best"].label == "Baseline + Cos + ReLU + Loop"
    assert result["table3"]["missing"] == ["sst", "sts"] and result["table3"]["absent_data"] == ["para"]
    assert not list((out / "test_predictions").glob("*-test-output.csv"))
    assert "Test predictions missing for sst, sts" in (out / "test_predictions" / "README.md").read_text()
    assert "Test predictions missing for sst, sts" in (out / "REPORT.md").read_text()
    assert any("no test predictions for sst, sts" in r.getMessage() for r in caplog.records)


def test_test_predictions_come_from_the_best_seed(tmp_path):
    from pipeline.report import Run, copy_test_predictions, pick_test_run
    from pipeline.report_tables import Row

    runs = []
    for seed, avg in ((1, 0.5), (2, 0.7), (3, 0.6)):
        run_dir = tmp_path / "runs" / "x" / f"s{seed}"
        (run_dir / "predictions").mkdir(parents=True)
        for task in ("sst", "sts"):
            (run_dir / "predictions" / f"{task}-test-output.csv").write_text(f"id \t Predicted \nseed{seed} , 1 \n")
        runs.append(Run("x", seed, run_dir, {}, {"avg": avg}, [], None, {}))
    run, why = pick_test_run(Row(2, "X", experiments=["x"]), {"x": runs}, "avg")
    assert run.seed == 2 and why == "the seed with the best dev Avg. of 3 evaluated seeds"
    (tmp_path / "prepared").mkdir()  # prepared data without a Quora test file
    copied = copy_test_predictions(run, str(tmp_path / "prepared"), tmp_path / "out")
    assert [p.name for p in copied["files"]] == ["sst-test-output.csv", "sts-test-output.csv"]
    assert copied["missing"] == [] and copied["absent_data"] == ["para"]
    assert "seed2" in (tmp_path / "out" / "sst-test-output.csv").read_text()


FORBIDDEN_IMPORTS = ("torch", "pipeline.model", "pipeline.train", "pipeline.stages", "pipeline.evaluate")


def test_report_modules_import_no_torch_or_model_code():
    """The report is read-only: no report module imports torch or the model, training or evaluation code."""
    files = sorted((ROOT / "pipeline").glob("report*.py"))
    assert {p.name for p in files} >= {"report.py", "report_stats.py", "report_tables.py", "report_figures.py",
                                       "report_text.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS), \
                    f"{path.name}:{node.lineno} imports {name}"
    code = ("import sys, pipeline.report; bad = [m for m in %r if m in sys.modules]; print(bad); sys.exit(bool(bad))"
            % (FORBIDDEN_IMPORTS,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_settings_come_from_params_only(tmp_path):
    import inspect
    from dataclasses import MISSING, fields

    from pipeline.report import Settings

    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(Settings))
    assert all(p.default is inspect.Parameter.empty for p in inspect.signature(Bootstrap).parameters.values())
    params = yaml.safe_load(PARAMS.read_text())
    block = params["report"]
    settings = Settings.from_params(block)
    assert (settings.seed, settings.n_boot, settings.ci) == (block["seed"], block["n_boot"], block["ci"])
    for key in block:
        with pytest.raises(PipelineError, match=rf"^report\.{key} missing") as err:
            Settings.from_params({k: v for k, v in block.items() if k != key})
        assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match=r"report\.n_boot='many' must be int"):
        Settings.from_params({**block, "n_boot": "many"})
    with pytest.raises(PipelineError, match=r"report\.colour: unknown"):
        Settings.from_params({**block, "colour": "red"})
    del params["report"]["seed"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=r"report\.seed missing"):
        run_report(path, out_dir=tmp_path / "reports")
