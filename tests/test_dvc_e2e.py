"""`dvc repro` of the whole graph on the micro profile, in a scratch git + DVC repository:
every table and figure appears with numbers in every paper row; an unchanged repro does
nothing; one experiment's knob makes only that experiment stale."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, make_tiny_backbone, write_micro_data
from pipeline.report import FIGURES, study_experiments

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
COPY = ("pipeline", "params.yaml", "dvc.yaml", "reports/paper_results.csv", "sweeps/__init__.py")


def _run(repo: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MINBERT_DATA_DIR", "MINBERT_PROFILE")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if not DVC.exists():
        pytest.skip(f"{DVC} not installed")
    repo = tmp_path_factory.mktemp("dvc-study")
    for rel in COPY:
        src, dst = ROOT / rel, repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = repo / "params.yaml"
    text, n = re.subn(r"^profile: \w+$", "profile: micro", params.read_text(), count=1, flags=re.M)
    assert n == 1, "params.yaml has no top-level `profile:` line"
    params.write_text(text)
    micro = yaml.safe_load(text)["profiles"]["micro"]
    write_micro_data(repo / micro["data"]["data_dir"], rows=24)
    make_tiny_backbone(repo / micro["model"]["backbone"])
    for cmd in (["git", "init", "-q"], [str(DVC), "init", "-q"]):
        res = _run(repo, *cmd)
        assert res.returncode == 0, res.stderr
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # dvc.yaml's plot templates
    t0 = time.time()
    res = _run(repo, str(DVC), "repro")
    print(f"first dvc repro: {time.time() - t0:.0f} s")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return repo


def test_repro_writes_every_table_and_figure(repo):
    out = repo / "reports"
    for t in (1, 2, 3, 4):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"table{t}.{ext}").stat().st_size > 0
    for name in FIGURES:
        assert (out / "figures" / name).stat().st_size > 1000, name
    paper = pd.read_csv(out / "paper_results.csv")
    for t in (1, 2, 4):
        ours = pd.read_csv(out / "tables" / f"table{t}.csv").set_index("row")
        for _, rec in paper[paper["table"] == t].iterrows():
            for metric in ("avg", "sst_acc", "para_acc", "sts_corr", "cfimdb_acc"):
                if pd.notna(rec[metric]):
                    assert pd.notna(ours.loc[rec["experiment"], metric]), (t, rec["experiment"], metric)
    assert "not scored (labels not public)" in (out / "tables" / "table3.md").read_text()
    assert any((out / "test_predictions").glob("*-test-output.csv"))
    report = (out / "REPORT.md").read_text()
    import yaml

    from pipeline.config import experiment_seeds

    params = yaml.safe_load((repo / "params.yaml").read_text())
    n_runs = sum(len(experiment_seeds(params, e)) for e in study_experiments(params))
    assert n_runs == 22  # 18 experiments (the paper's 17 and the sweep's best), two under two extra seeds
    assert "| missing" not in (out / "tables" / "table2.md").read_text()
    assert f"Runs evaluated: {n_runs} of {n_runs}" in report


def test_second_repro_does_nothing(repo):
    res = _run(repo, str(DVC), "repro")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Running stage" not in res.stdout
    locked = set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])
    skipped = set(re.findall(r"Stage '([^']+)' didn't change, skipping", res.stdout))
    assert locked and skipped == locked, (locked ^ skipped, res.stdout[-2000:])
    res = _run(repo, str(DVC), "status", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == {}, res.stdout[-2000:]


def test_metrics_and_plots_are_declared(repo):
    res = _run(repo, str(DVC), "metrics", "show", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)
    metrics = metrics[""]["data"] if "" in metrics else metrics  # keyed by revision ("": the workspace)
    assert list(metrics) == ["reports/metrics.json"]  # the headline file only, not 21 per-run files
    headline = metrics["reports/metrics.json"]["data"]
    assert list(headline) == ["avg", "sst_acc", "cfimdb_acc"]  # one column per study experiment
    assert {"baseline", "cos_relu_loop"} <= set(headline["avg"])
    res = _run(repo, str(DVC), "plots", "show", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    plots = json.loads(res.stdout)
    plots = plots.get("data", plots)  # {"data": {plot id: ...}} in DVC 3
    # one chart of every run's curve, four of the experiments' scores, and the report's figures
    assert any("Dev avg per epoch" in name for name in plots), list(plots)
    assert sum("by experiment" in name for name in plots) == 4, list(plots)
    assert any(name.endswith("dev_curves.png") for name in plots), list(plots)
    res = _run(repo, str(DVC), "plots", "show", "-o", str(repo / "plots_html"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_one_experiment_knob_makes_only_it_stale(repo):
    params = repo / "params.yaml"
    before = params.read_text()
    try:
        spec = yaml.safe_load(before)
        spec["experiments"]["relu"]["set"] = {"train": {"lr": 3.0e-3}}
        params.write_text(yaml.safe_dump(spec, sort_keys=False))
        res = _run(repo, str(DVC), "status", "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        stale = set(json.loads(res.stdout)) - {"report"}  # the report reads every experiment's spec
        assert stale == {f"train@relu-{spec['seeds'][0]}"}, stale
    finally:
        params.write_text(before)
