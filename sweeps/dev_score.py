"""A trial's dev avg with its bootstrap interval, from the dev_predictions.csv the evaluate step writes.

The resampling is the report's own (pipeline.report_stats.Bootstrap): resample b of a task draws
the same example positions for every trial scored on the same examples, so the replicates of two
trials pair up and their difference has a paired interval (dev-example difficulty cancels). The
avg's replicate b is the mean of the three tasks' replicates b.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report_stats import Bootstrap, read_dev_predictions
from pipeline.tasks import MULTITASK, task_score


def avg_replicates(path: str | Path, boot: Bootstrap) -> tuple[float, np.ndarray]:
    """(dev avg, its B bootstrap replicates) of one run's dev_predictions.csv (examples ordered by id)."""
    frames = read_dev_predictions(path)
    points, reps = [], []
    for task in MULTITASK:
        frame = frames[task].sort_index()
        pred, label = frame["prediction"].to_numpy(), frame["label"].to_numpy()
        points.append(task_score(task, pred, label))
        reps.append(boot.replicates(task, pred, label))
    return float(np.mean(points)), np.mean(reps, axis=0)


def make_bootstrap(objective: dict) -> Bootstrap:
    return Bootstrap(objective["n_boot"], objective["ci"], objective["seed"])


def avg_interval(path: str | Path, objective: dict) -> tuple[float, float, float]:
    """(avg, lo, hi): the dev avg and its percentile bootstrap interval at objective['ci']."""
    boot = make_bootstrap(objective)
    point, reps = avg_replicates(path, boot)
    lo, hi = boot.interval(reps)
    return point, lo, hi


def paired_difference(path_a: str | Path, path_b: str | Path, objective: dict) -> tuple[float, float, float]:
    """avg(a) - avg(b) and its paired bootstrap interval (both runs scored on the same dev examples)."""
    boot = make_bootstrap(objective)
    a, reps_a = avg_replicates(path_a, boot)
    b, reps_b = avg_replicates(path_b, boot)
    lo, hi = boot.interval(reps_a - reps_b)
    return a - b, lo, hi
