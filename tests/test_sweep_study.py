"""A 2-trial study end to end on the tiny fixtures (frozen prefix from a cache, as on the cpu profile):
every trial scored on the full dev sets with its interval, the summary written, then regenerated from
the storage alone."""
from __future__ import annotations

import argparse

import pytest

from conftest import PARAMS, micro_overrides

SPACE = """
sampler: {seed: 3, n_startup_trials: 2}
pruner: {type: none}
objective: {n_boot: 100, ci: 0.9}
fixed: {model.freeze_layers: 1}
search_space:
  extensions: [relu, cos]
  model.cos_target: {choices: [signed, unit], when: {model.sts_head: cos}}
  model.para_head: [concat, cross]
  model.pooling: [mean, cls]
  train.lr: {low: 5.0e-4, high: 3.0e-3, log: true}
"""


def test_two_trial_study_scores_on_full_dev_and_reports(tmp_path, tiny_backbone, micro_data, prepared, caplog):
    import optuna

    from pipeline import io as pio
    from pipeline.cli import main
    from sweeps.dev_score import avg_interval
    from sweeps.optuna_sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    micro = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared) + ["train.eval_limit=8"]
    args = argparse.Namespace(params=str(PARAMS), profile="cpu", overrides=micro, study="e2e", storage=storage,
                              trials=2, workers=1, space=str(space), reports_dir=str(tmp_path / "reports"))
    summary = run_sweep(args)

    study = optuna.load_study(study_name="e2e", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        run_dir = tmp_path / "runs" / "sweeps" / "e2e" / f"trial-{t.number}"
        metrics = pio.read_json(run_dir / "metrics.json")
        record = pio.read_json(run_dir / "record.json")
        # The objective: the full dev sets (40 rows a task here), not the 8-row selection sample per epoch.
        assert t.user_attrs["n_dev"] == {"sst": 40, "para": 40, "sts": 40}
        assert t.value == pytest.approx(metrics["avg"]) == pytest.approx(t.user_attrs["avg"])
        # its interval: the report's bootstrap over the run's dev predictions, at the space's ci and n_boot
        interval = avg_interval(run_dir / "dev_predictions.csv", {"n_boot": 100, "ci": 0.9, "seed": 20240531})
        assert (t.user_attrs["avg_lo"], t.user_attrs["avg_hi"]) == pytest.approx(interval[1:])
        assert t.user_attrs["avg_lo"] < t.user_attrs["avg_hi"] and t.user_attrs["ci"] == 0.9
        assert sorted(t.intermediate_values) == [1, 2]  # one report per epoch
        assert record["config"]["model"]["freeze_layers"] == 1  # fixed in the space
        assert record["sweep"]["objective"]["avg"] == pytest.approx(t.value)
        assert t.user_attrs["wall_s"] > 0
    assert summary["best_trial"] == study.best_trial.number

    out = tmp_path / "reports" / "e2e"
    page = (out / "SUMMARY.md").read_text()
    assert "dvc exp run" in page and "python -m pipeline train" in page and "90% bootstrap interval" in page
    assert (out / "expected_max.png").exists() and len((out / "trials.csv").read_text().splitlines()) == 3
    texts = {n: (out / n).read_text() for n in ("SUMMARY.md", "trials.csv", "best_params.yaml")}
    caplog.clear()
    assert main(["sweep", "--study", "e2e", "--storage", storage, "--report-only",
                 "--reports-dir", str(tmp_path / "reports")]) == 0
    assert {n: (out / n).read_text() for n in texts} == texts
