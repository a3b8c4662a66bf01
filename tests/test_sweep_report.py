"""The study summary, regenerated from a fixture storage (fake trials written with Optuna, no training):
its files, its `dvc exp run -S` line applied by DVC's own parser, and the expected-max estimators
against a hand-worked example."""
from __future__ import annotations

import csv
import math
import shlex
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PARAMS

# ------------------------------------------------------------------ expected max, by hand


def test_expected_max_matches_the_hand_worked_example():
    """Scores [0.1, 0.3, 0.2]: sorted v = (0.1, 0.2, 0.3), N = 3.

    Without replacement (Tang et al. 2020), P(max = v_(i)) = C(i-1, n-1) / C(3, n):
      n=1: 1/3 each                      E = 0.2    E[x^2] = 0.14/3, var = 0.14/3 - 0.04 = 0.02/3
      n=2: (0, 1/3, 2/3)                 E = (0.2 + 0.6)/3 = 0.8/3   (the pairs' maxima 0.2, 0.3, 0.3)
                                         var = (0.04 + 2 * 0.09)/3 - (0.8/3)^2 = 0.02/9
      n=3: (0, 0, 1)                     E = 0.3, var = 0
    With replacement (Dodge et al. 2019), P(max = v_(i)) = (i/3)^n - ((i-1)/3)^n:
      n=1: (1/3, 1/3, 1/3)               E = 0.2
      n=2: (1/9, 3/9, 5/9)               E = (0.1 + 0.6 + 1.5)/9 = 2.2/9
      n=3: (1/27, 7/27, 19/27)           E = (0.1 + 1.4 + 5.7)/27 = 7.2/27 = 0.8/3
      n=4: (1/81, 15/81, 65/81)          E = (0.1 + 3.0 + 19.5)/81 = 22.6/81 (n may exceed N)
    """
    from sweeps.expected_max import (
        expected_max,
        expected_max_curve,
        weights_with_replacement,
        weights_without_replacement,
    )

    scores = [0.1, 0.3, 0.2]
    tang = {1: (0.2, math.sqrt(0.02 / 3)), 2: (0.8 / 3, math.sqrt(0.02 / 9)), 3: (0.3, 0.0)}
    for n, (mean, std) in tang.items():
        assert expected_max(scores, n) == pytest.approx((mean, std), abs=1e-12), n
    dodge = {1: 0.2, 2: 2.2 / 9, 3: 7.2 / 27, 4: 22.6 / 81}
    for n, mean in dodge.items():
        assert expected_max(scores, n, replacement=True)[0] == pytest.approx(mean, abs=1e-12), n
    # Dodge's spread at n = 2: sum_i w_i (v_i - E)^2, in exact fractions
    v, w = [Fraction(1, 10), Fraction(2, 10), Fraction(3, 10)], [Fraction(1, 9), Fraction(3, 9), Fraction(5, 9)]
    e = sum(a * b for a, b in zip(w, v))
    assert expected_max(scores, 2, replacement=True)[1] == pytest.approx(
        math.sqrt(float(sum(a * (b - e) ** 2 for a, b in zip(w, v)))), abs=1e-12)
    assert list(weights_without_replacement(3, 2)) == pytest.approx([0, 1 / 3, 2 / 3])
    assert list(weights_with_replacement(3, 3)) == pytest.approx([1 / 27, 7 / 27, 19 / 27])
    curve = expected_max_curve(scores)
    assert list(curve.n) == [1, 2, 3] and list(curve.mean) == pytest.approx([0.2, 0.8 / 3, 0.3])
    with pytest.raises(ValueError):
        expected_max(scores, 4)  # without replacement n cannot exceed N


def test_expected_max_properties_on_random_scores():
    from sweeps.expected_max import expected_max_curve

    scores = np.random.default_rng(0).normal(0.6, 0.05, 25)
    tang, dodge = expected_max_curve(scores), expected_max_curve(scores, replacement=True)
    assert tang.mean[0] == pytest.approx(scores.mean()) == pytest.approx(dodge.mean[0])
    assert tang.mean[-1] == pytest.approx(scores.max()) and tang.std[-1] == pytest.approx(0.0)
    assert np.all(np.diff(tang.mean) >= -1e-12) and np.all(np.diff(dodge.mean) >= -1e-12)
    assert np.all(tang.mean[1:] >= dodge.mean[1:] - 1e-12)  # with replacement repeats draws: lower


# ------------------------------------------------------------------ a fixture storage


def write_dev_predictions(folder: Path, quality: float, seed: int) -> None:
    """A made-up dev_predictions.csv: right on a `quality` share of each task's 60 examples."""
    rng = np.random.default_rng(seed)
    rows = ["task,id,prediction,label"]
    for task, classes in (("sst", 5), ("para", 2), ("sts", None)):
        for i in range(60):
            if classes:
                label = int(rng.integers(classes))
                pred = label if rng.random() < quality else (label + 1) % classes
            else:
                label = round(float(rng.uniform(0, 5)), 1)
                pred = label * quality + (1 - quality) * float(rng.uniform(0, 5))
            rows.append(f"{task},{task}{i:03d},{pred},{label}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev_predictions.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def fixture_study(tmp_path):
    """A study of 8 finished and 2 pruned fake trials, stored in SQLite as a sweep stores them."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from pipeline.config import load_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'fx.db'}"
    study = optuna.create_study(study_name="fx", storage=url, direction="maximize")
    objective = {"dev_limit": 0, "n_boot": 200, "ci": 0.95, "seed": 5}
    study.set_user_attr("base", {"params": str(PARAMS), "profile": "cpu", "base_experiment": None,
                                 "overrides": ["train.threads=2"], "space": "sweeps/optuna_space.yaml",
                                 "pruner": {"type": "median", "n_startup_trials": 8, "n_warmup_steps": 2},
                                 "objective": objective})
    mlm_dir = load_config(PARAMS, profile="cpu").mlm.output_dir
    dists = {"ext.relu": CategoricalDistribution([False, True]), "ext.mlm": CategoricalDistribution([False, True]),
             "model.pooling": CategoricalDistribution(["mean", "cls"]),
             "train.lr": FloatDistribution(1e-5, 1e-3, log=True), "model.dropout": FloatDistribution(0.0, 0.5)}
    rng = np.random.default_rng(1)
    for i in range(10):
        params = {"ext.relu": bool(i % 2), "ext.mlm": i % 3 == 0, "model.pooling": ["mean", "cls"][i % 2 == 0],
                  "train.lr": float(10 ** rng.uniform(-5, -3)), "model.dropout": float(rng.uniform(0, 0.5))}
        overrides = {"model.freeze_layers": 5, "model.heads": "relu" if params["ext.relu"] else "linear",
                     "model.init_from": mlm_dir if params["ext.mlm"] else "", "model.pooling": params["model.pooling"],
                     "train.lr": params["train.lr"], "model.dropout": params["model.dropout"]}
        level = 0.4 + 0.03 * i + (0.05 if params["model.pooling"] == "mean" else 0.0)
        pruned = i in (2, 5)
        curve = {s: level - 0.1 + 0.03 * s for s in range(1, (3 if pruned else 5))}
        run_dir = tmp_path / "runs" / f"trial-{i}"
        if i in (7, 9):
            write_dev_predictions(run_dir, 0.5 + 0.03 * i, seed=i)
        attrs = {"overrides": overrides, "run_dir": str(run_dir), "wall_s": 60.0 + i,
                 "selection_avg": curve[max(curve)]}
        if not pruned:
            attrs.update(avg_lo=level - 0.02, avg_hi=level + 0.02, sst_acc=level - 0.1, para_acc=level + 0.2,
                         sts_corr=level - 0.1, best_epoch=4)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            value=None if pruned else level, params=params, distributions=dists, intermediate_values=curve,
            user_attrs=attrs))
    return url, study


def report_only(url: str, out: Path, study: str = "fx") -> int:
    from pipeline.cli import main

    return main(["sweep", "--study", study, "--storage", url, "--report-only", "--reports-dir", str(out)])


def test_summary_regenerates_from_the_storage(tmp_path, fixture_study):
    from dvc.utils.hydra import apply_overrides

    from pipeline.config import load_config

    url, study = fixture_study
    assert report_only(url, tmp_path / "reports") == 0
    out = tmp_path / "reports" / "fx"
    best = study.best_trial
    assert best.number == 9  # level 0.4 + 0.27 + 0.05 (mean pooling): the highest finished

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["PRUNED" if i in (2, 5) else "COMPLETE" for i in range(10)]
    assert {"number", "avg", "avg_lo", "avg_hi", "sst_acc", "wall_s", "epochs", "train.lr", "ext.relu"} <= set(rows[0])
    assert float(rows[9]["avg"]) == pytest.approx(best.value, abs=1e-5)
    assert rows[9]["avg_lo"] and not rows[2]["avg"] and rows[2]["epochs"] == "2"
    assert yaml.safe_load((out / "best_params.yaml").read_text()) == best.user_attrs["overrides"]
    for name in ("history", "intermediate_values", "importances", "expected_max"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    summary = (out / "SUMMARY.md").read_text()
    assert "## Best trial: 9" in summary and f"{best.value:.4f}" in summary
    assert "--report-only" in summary and "train.threads=2" in summary  # sweep-only overrides named, not applied
    top = summary[summary.index("## Top trials"):summary.index("## Expected")].splitlines()
    runner_up = next(line for line in top if line.startswith("| 7 |"))  # both run folders hold predictions
    assert not runner_up.endswith("— | — |") and runner_up.split("|")[7].strip().startswith("-")
    assert next(line for line in top if line.startswith("| 8 |")).endswith("— | — |")  # no run folder here
    assert "Tang et al. 2020" in summary and "Dodge et al. 2019" in summary
    expected = summary[summary.index("## Expected"):summary.index("## Parameter")].splitlines()
    tang_8 = float(next(line for line in expected if line.startswith("| 8 |")).split("|")[3])
    values = sorted(t.value for t in study.trials if t.value is not None)
    assert tang_8 == pytest.approx(max(values), abs=1e-4)  # all 8 finished trials: the best one, surely

    # The `dvc exp run -S ...` line, applied by DVC's own parser, gives the best trial's config.
    dvc_line = next(line for line in summary.splitlines() if line.startswith("dvc exp run"))
    assert "python -m pipeline train" in summary
    words = shlex.split(dvc_line)
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    apply_overrides(params, [words[i + 1] for i, w in enumerate(words) if w == "-S"])
    cfg = load_config(params, experiment="sweep_fx", profile="cpu")
    for key, value in best.user_attrs["overrides"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value), key
    groups = yaml.safe_load(params.read_text())["train_groups"]
    assert "sweep_fx" in groups["mlm" if best.params["ext.mlm"] else "backbone"]  # after MLM when it uses it

    # Again from the same storage: the same files.
    texts = {n: (out / n).read_text() for n in ("trials.csv", "SUMMARY.md", "best_params.yaml", "best_trial.json")}
    assert report_only(url, tmp_path / "reports") == 0
    assert {n: (out / n).read_text() for n in texts} == texts


def test_too_few_trials_still_report_and_a_missing_study_is_one_line(tmp_path, caplog):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(study_name="one", storage=url, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"train.lr": 1e-4},
                                              distributions={"train.lr": optuna.distributions.FloatDistribution(
                                                  1e-5, 1e-3, log=True)},
                                              user_attrs={"overrides": {"train.lr": 1e-4}}))
    assert report_only(url, tmp_path / "reports", "one") == 0
    out = tmp_path / "reports" / "one"
    assert not (out / "importances.png").exists() and (out / "expected_max.png").exists()
    assert "Not computed: needs at least 2 finished trials (has 1)" in (out / "SUMMARY.md").read_text()

    caplog.clear()
    assert report_only(url, tmp_path / "reports", "nosuch") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "nosuch" in errors[0] and "one" in errors[0] and "\n" not in errors[0]


def test_compare_pruners_replays_the_fixture_study(tmp_path, fixture_study):
    from sweeps.compare_pruners import main

    url, _ = fixture_study
    out = tmp_path / "reports" / "fx"
    assert main(["--study", "fx", "--storage", url, "--orders", "5", "--budgets", "0.5", "1.0",
                 "--out", str(out)]) == 0
    text = (out / "pruners.md").read_text()
    assert "## Budget 50%" in text and "| none |" in text and "hyperband" in text
    assert "median (n_startup_trials=8, n_warmup_steps=2)" in text  # the study's own pruner is a candidate
    assert report_only(url, tmp_path / "reports") == 0
    assert "pruners.md" in (out / "SUMMARY.md").read_text()
