"""prepare -> train -> evaluate through the CLI, as DVC runs it, on micro data."""
import json
import subprocess
import sys

import pytest

from conftest import PARAMS, ROOT, micro_overrides, write_micro_data

pytestmark = pytest.mark.slow


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_help_lists_stages():
    res = _cli("--help")
    for stage in ("prepare", "pretrain-mlm", "train", "evaluate", "report", "sweep"):
        assert stage in res.stdout
    res = _cli("train", "--help")
    assert "--experiment" in res.stdout and "KEY=VALUE" in res.stdout


def test_prepare_train_evaluate(tmp_path, tiny_backbone):
    data = write_micro_data(tmp_path / "data", rows=24)
    overrides = micro_overrides(tmp_path, tiny_backbone, data) + ["eval.test_predictions=true"]
    sets = [a for o in overrides for a in ("-S", o)]
    assert _cli("prepare", *sets).returncode == 0
    res = _cli("train", "-e", "baseline", *sets)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _cli("evaluate", "-e", "baseline", *sets)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "adhoc" / "baseline" / "s11711"  # -S overrides: not the study folder
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"sst_acc", "para_acc", "sts_corr", "avg", "leaderboard_avg"} <= set(metrics)
    assert metrics["avg"] == pytest.approx((metrics["sst_acc"] + metrics["para_acc"] + metrics["sts_corr"]) / 3)
    for name in ("sst-dev-output.csv", "sst-test-output.csv", "para-dev-output.csv", "sts-dev-output.csv",
                 "sts-test-output.csv"):
        lines = (run / "predictions" / name).read_text().splitlines()
        assert lines[0].startswith("id") and len(lines) == 25
    assert "sst_acc=" in res.stderr


def test_bad_param_is_one_line_error(tmp_path):
    res = _cli("train", "-S", "train.batch_size=0")
    assert res.returncode == 2 and "train.batch_size=0 must be > 0" in res.stderr and "Traceback" not in res.stderr


def test_overrides_route_a_run_away_from_the_study_folder():
    from pipeline.cli import _adhoc, build_parser
    from pipeline.config import load_config

    parse = build_parser().parse_args
    assert not _adhoc(parse(["train", "-e", "baseline", "--seed", "1"]))  # what dvc.yaml runs
    assert not _adhoc(parse(["train", "-e", "baseline", "-S", "train.threads=1", "-S", "tracking.wandb=true"]))
    assert _adhoc(parse(["train", "-e", "baseline", "-S", "train.lr=1e-4"]))
    assert _adhoc(parse(["train", "-e", "baseline", "--profile", "paper"]))
    cfg = load_config(str(PARAMS), experiment="baseline")
    assert cfg.run_dir.parts[-4:] == ("runs", "study", "baseline", f"s{cfg.train.seed}")
    assert cfg.adhoc_run_dir.parts[-4:] == ("runs", "adhoc", "baseline", f"s{cfg.train.seed}")
