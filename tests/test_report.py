"""The report stage from fixture run records the tests write: scores, intervals, noise marking,
every paper row, majority baselines, partial results."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import PARAMS, ROOT
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.evaluate import METRIC_OF_TASK, summarize, task_score
from pipeline.report import FIGURES, check_study, run_report
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
        assert est["avg"].point == pytest.approx(summarize({m: est[m].point for m in ("sst_acc", "para_acc", "sts_corr")})["avg"])
        widths.append({m: est[m].hi - est[m].lo for m in est})
    for metric in widths[0]:
        assert widths[1][metric] < widths[0][metric] / 2, metric


def test_seed_mean_and_std():
    boot = Bootstrap(n_boot=200, seed=3)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    seeds = [_run({"sst": (np.where(np.arange(300) < k, y, (y + 1) % 5), y)}) for k in (120, 180, 240)]
    est = estimate_runs(boot, seeds, _ids(seeds[0]))["sst_acc"]
    assert est.n_seeds == 3 and est.point == pytest.approx(0.6)
    assert est.std == pytest.approx(np.std([0.4, 0.6, 0.8], ddof=1))
    one = estimate_runs(boot, seeds[:1], _ids(seeds[0]))["sst_acc"]
    assert np.isnan(one.std) and one.point == pytest.approx(0.4)


def test_paired_difference_marks_noise_and_flips_when_large():
    boot = Bootstrap(n_boot=500, seed=5)
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
    assert check_study(params) == []
    broken = yaml.safe_load(PARAMS.read_text())
    broken["train_groups"]["backbone"].remove("baseline")
    broken["train_groups"]["mlm"].append("baseline")
    del broken["profiles"]["cpu"]["eval"]
    problems = check_study(broken)
    assert "experiments.baseline belongs in train_groups.backbone, not mlm" in problems
    assert "profiles.cpu.eval is missing (DVC stages depend on it; use {})" in problems
    paper = pd.read_csv(PAPER)
    rows = {(r["table"], r["label"]) for spec in params["experiments"].values() for r in spec["rows"]}
    for _, rec in paper[paper["table"] != 3].iterrows():
        assert (rec["table"], rec["experiment"]) in rows, rec["experiment"]
    # Table 4's alpha = 1.0 row is Table 2's last row: one experiment, trained once.
    shared = [n for n, s in params["experiments"].items() if {r["table"] for r in s["rows"]} == {2, 4}]
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
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, params


def write_run(params: dict, prepared, exp: str, seed: int, skill: float, rng) -> None:
    """A fixture run: predictions right with probability `skill`, plus the files the stages write."""
    from pipeline.data import load_split

    cfg = load_config(params["__path__"], exp)
    run_dir = cfg.run_dir.parent / f"s{seed}"
    frames, scores = [], {}
    for task in cfg.train.tasks:
        data = load_split(prepared, task, "dev")
        y = data.labels.numpy()
        if task == "sts":
            pred = np.where(rng.random(len(y)) < skill, y, rng.uniform(0, 5, len(y)))
        else:
            classes = 5 if task == "sst" else 2
            pred = np.where(rng.random(len(y)) < skill, y, (y + 1) % classes)
        frames.append(pd.DataFrame({"task": task, "id": data.ids, "prediction": pred, "label": y}))
        scores[METRIC_OF_TASK[task]] = task_score(task, pred, y)
    run_dir.mkdir(parents=True)
    pd.concat(frames).to_csv(run_dir / "dev_predictions.csv", index=False)
    (run_dir / "metrics.json").write_text(json.dumps({**summarize(scores), "seed": seed, "experiment": exp}))
    (run_dir / "history.json").write_text(json.dumps([{"epoch": e, "steps": 3, **summarize(scores)} for e in (1, 2)]))
    steps = []
    for s in range(1, 7):
        entry = {"step": s, "epoch": 1 + (s > 3)}
        if cfg.train.balancer == "gradnorm":
            entry |= {f"gn_weight_{t}": 1.0 + 0.01 * s * (i - 1) for i, t in enumerate(cfg.train.tasks)}
        if cfg.train.balancer == "pcgrad":
            entry["pcgrad_conflict_share"] = (s % 3) / 3
        steps.append(entry)
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))
    (run_dir / "record.json").write_text(json.dumps({"name": exp, "status": "completed", "config": cfg.to_dict(),
                                                     "wall_time_s": 1.0}))
    preds = run_dir / "predictions"
    preds.mkdir()
    (preds / "sst-test-output.csv").write_text("id \t Predicted_Sentiment \nx , 1 \n")


def test_report_has_every_table_row_figure_and_majority(study, prepared):
    path, params = study
    params["__path__"] = path
    rng = np.random.default_rng(7)
    for exp in params["experiments"]:
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


def test_missing_runs_show_as_missing(study, prepared):
    path, params = study
    params["__path__"] = path
    write_run(params, prepared, "baseline", 11711, skill=0.6, rng=np.random.default_rng(0))
    out = path.parent / "reports"
    result = run_report(path, out_dir=out)
    md = (out / "tables" / "table2.md").read_text()
    assert "| Baseline + ReLU | missing |" in md
    assert len(result["missing"]) == len(params["experiments"]) - 1
    assert pd.read_csv(out / "tables" / "table4.csv")["avg"].iloc[:4].isna().all()
    for name in FIGURES:
        assert (out / "figures" / name).exists()
    assert "Missing:" in (out / "REPORT.md").read_text()


def test_table3_predicts_test_set_when_evaluate_wrote_none(make_cfg, tmp_path, prepared):
    """The cpu profile may skip test predictions in evaluate: the report then predicts them for Table 3's model."""
    from pipeline.data import load_split
    from pipeline.report import Run, write_test_predictions
    from pipeline.train import train

    cfg = make_cfg("train.epochs=1")
    train(cfg)
    run = Run("baseline", cfg.train.seed, cfg.run_dir, {}, {}, [], None, {})
    files = write_test_predictions(run, str(prepared), tmp_path / "test_predictions")
    assert {p.name for p in files} == {"sst-test-output.csv", "sts-test-output.csv"}  # no Quora test file
    for path in files:
        task = path.name.split("-")[0]
        lines = path.read_text().splitlines()
        assert lines[0].startswith("id") and len(lines) == len(load_split(prepared, task, "test")) + 1
