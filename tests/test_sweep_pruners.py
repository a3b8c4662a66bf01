"""The pruner chosen in the space file is the one the study runs: for each type, a trial below its rule
is pruned at the step (epoch) the rule says, with Optuna fed made-up per-epoch values (no training);
the replay benchmark (sweeps/compare_pruners.py) on made-up curves."""
from __future__ import annotations

import warnings

import pytest

from conftest import PARAMS

# Four finished trials; trial i reports 0.50 + 0.01 i + 0.1 (s - 1) after epoch s = 1..4, so at epoch s
# their values are 0.5 + 0.1 (s - 1) + {0, 0.01, 0.02, 0.03}: median 0.515 + 0.1 (s - 1), their 25th
# percentile 0.5075 + 0.1 (s - 1), and each later trial is the best so far at every epoch.
GOOD = [[0.50 + 0.01 * i + 0.1 * s for s in range(4)] for i in range(4)]
FLAT_LOW = [0.1, 0.1, 0.1, 0.1]      # below every rule from the first epoch
DROPS = [0.5, 0.2, 0.2, 0.2]         # fine after epoch 1, then falls
STALLS = [0.5, 0.7, 0.7, 0.7]        # good early (0.7 > the median 0.615 at epoch 2), then stops improving


def first_pruned_step(block: dict, curve: list[float], max_epochs: int = 4) -> int | None:
    """Run GOOD to the end under the pruner, then `curve`; the epoch at which it is pruned (None: never)."""
    import optuna

    from sweeps.pruners import build_pruner, parse_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = build_pruner(parse_pruner(block, "pruner"), max_epochs)
    study = optuna.create_study(study_name="fixed-name", direction="maximize", pruner=pruner)
    for values in GOOD:
        trial = study.ask()
        for step, value in enumerate(values, 1):
            trial.report(value, step)
            assert not trial.should_prune(), (block, "a good trial was pruned")
        study.tell(trial, values[-1])
    trial = study.ask()
    for step, value in enumerate(curve, 1):
        trial.report(value, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if trial.should_prune():
                return step
    return None


@pytest.mark.parametrize("block, flat_low, drops, stalls", [
    # none: nothing is ever pruned
    ({"type": "none"}, None, None, None),
    # median, pruning from epoch 2 (n_warmup_steps: steps before it are safe): a trial whose best value so far
    # is below the finished trials' median at that epoch goes. FLAT_LOW and DROPS (best 0.5 < 0.615) at
    # epoch 2; STALLS passes epoch 2 (0.7 > 0.615) but not epoch 3 (0.7 < 0.715).
    ({"type": "median", "n_startup_trials": 2, "n_warmup_steps": 2}, 2, 2, 3),
    # percentile 25 from epoch 3: every curve's best is below 0.7075 at epoch 3
    ({"type": "percentile", "percentile": 25.0, "n_startup_trials": 2, "n_warmup_steps": 3}, 3, 3, 3),
    # threshold: any value below 0.3 from epoch 1 (FLAT_LOW at 1, DROPS at 2, STALLS never)
    ({"type": "threshold", "lower": 0.3}, 1, 2, None),
    # successive halving, rungs at epochs 2 and 4 (min_resource 2, reduction factor 2): a trial continues
    # past a rung only in the top half of the trials that reached it. STALLS is the best at epoch 2 (0.7)
    # and below all four at epoch 4 (0.7 < 0.8).
    ({"type": "successive_halving", "min_resource": 2, "reduction_factor": 2}, 2, 2, 4),
    # hyperband with one bracket (floor(log_3(4 / 2)) + 1 = 1; max_resource defaults to the 4 epochs):
    # its rung at epoch 2 keeps the top third (STALLS, the best there); the next rung (6) lies past the end.
    ({"type": "hyperband", "min_resource": 2, "reduction_factor": 3}, 2, 2, None),
    # patient wrapper alone: prune when the best of the last patience + 1 = 2 epochs is below the best
    # before them: DROPS at epoch 3 (max(0.2, 0.2) < 0.5); FLAT_LOW and STALLS never get worse.
    ({"type": "none", "patience": 1}, None, 3, None),
    # patient around median: both must agree; DROPS at epoch 3 (patience says so, and 0.5 < 0.715)
    ({"type": "median", "n_startup_trials": 2, "patience": 1}, None, 3, None),
])
def test_trial_below_the_rule_is_pruned_at_the_expected_epoch(block, flat_low, drops, stalls):
    assert first_pruned_step(block, FLAT_LOW) == flat_low
    assert first_pruned_step(block, DROPS) == drops
    assert first_pruned_step(block, STALLS) == stalls


def test_every_pruner_type_is_tested():
    from sweeps.pruners import PRUNERS

    tested = {"none", "median", "percentile", "threshold", "successive_halving", "hyperband"}
    assert set(PRUNERS) == tested


def test_space_file_pruner_is_the_studys(tmp_path):
    import optuna

    from pipeline.config import load_config
    from sweeps.optuna_sweep import make_pruner
    from sweeps.space import load_space

    compose = lambda extra: load_config(PARAMS, profile="cpu", overrides=extra)  # noqa: E731
    path = tmp_path / "space.yaml"
    path.write_text("pruner: {type: hyperband, reduction_factor: 2, patience: 2, min_delta: 0.01}\n"
                    "search_space: {train.epochs: [3, 6], train.lr: {low: 1.0e-4, high: 1.0e-3, log: true}}\n")
    space = load_space(path, compose)
    pruner = make_pruner(space)
    assert isinstance(pruner, optuna.pruners.PatientPruner)
    inner = pruner._wrapped_pruner
    assert isinstance(inner, optuna.pruners.HyperbandPruner)
    assert inner._max_resource == 6 and inner._reduction_factor == 2  # the longest trial's epochs
    assert isinstance(make_pruner(space.with_pruner("none")), optuna.pruners.NopPruner)  # --pruner none


@pytest.mark.parametrize("block, named", [
    ("{type: wilcoxon}", "pruner.type"),
    ("{type: median, reduction_factor: 3}", "pruner.reduction_factor"),
    ("{type: hyperband, reduction_factor: 1}", "reduction_factor=1"),
    ("{type: median, min_delta: 0.1}", "pruner.min_delta"),
    ("{type: median, patience: -1}", "patience=-1"),
    ("[median]", "pruner"),
])
def test_bad_pruner_block_is_one_line_error(tmp_path, block, named):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from sweeps.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(f"pruner: {block}\nsearch_space: {{train.lr: [1.0e-4]}}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, lambda extra: load_config(PARAMS, profile="cpu", overrides=extra))
    assert str(path) in str(err.value) and named in str(err.value) and "\n" not in str(err.value)
    if "type: wilcoxon" in block:
        assert "median" in str(err.value) and "hyperband" in str(err.value)  # the allowed types


def test_replay_compares_pruners_at_equal_budget():
    from sweeps.compare_pruners import Curve, compare

    # 12 trials of 4 epochs at 1 unit each; finals rise with the curve level, trial 11 is the best.
    curves = [Curve(i, {s: 0.3 + 0.04 * i + 0.01 * s for s in range(1, 5)}, 0.4 + 0.04 * i, 1.0) for i in range(12)]
    blocks = [{"type": "none"}, {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1}]
    rows = compare(curves, blocks, [0.5, 1.0], orders=20, seed=1)
    by = {(r["block"]["type"], r["budget"]): r for r in rows}
    full = by[("none", 1.0)]
    assert full["p_top"] == 1.0 and full["finished"] == 12 and full["best_mean"] == pytest.approx(0.4 + 0.04 * 11)
    half_none, half_median = by[("none", 0.5)], by[("median", 0.5)]
    assert half_none["started"] == 6  # half the budget: half the trials, run to the end
    assert half_median["started"] > half_none["started"]  # pruning buys more trials with the same budget
    assert half_median["p_top"] > half_none["p_top"]  # and here finds the best one more often
