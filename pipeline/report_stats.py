"""Bootstrap intervals over dev examples: one run's scores, seed means, paired differences.

Every interval resamples dev *examples* (with replacement, B times). Resample b of a task
uses the same example ids for every experiment, so the difference of two experiments'
replicates is a paired bootstrap: example difficulty cancels and even one seed shows
which differences exceed the noise of a finite dev set. Scores come from
pipeline.evaluate (task_score, summarize), never a second implementation.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.evaluate import METRIC_OF_TASK, summarize, task_score

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("task", "id", "prediction", "label")


def read_dev_predictions(path: str | Path) -> dict[str, pd.DataFrame]:
    """dev_predictions.csv (task, id, prediction, label) -> {task: frame indexed by id}."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"task": str, "id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: unreadable dev predictions ({str(err).splitlines()[0]})") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(PREDICTION_COLUMNS)}")
    out = {}
    for task, part in frame.groupby("task", sort=False):
        if task not in METRIC_OF_TASK:
            raise PipelineError(f"{path}: unknown task '{task}'")
        part = part.drop_duplicates("id").set_index("id")
        out[task] = part[["prediction", "label"]]
    return out


@dataclass
class Estimate:
    """A score: mean over seeds, its bootstrap interval, the spread across seeds."""
    point: float
    lo: float
    hi: float
    std: float          # across seeds; nan with one seed
    n_seeds: int
    n: int              # dev examples per resample (0 for combined metrics)
    reps: np.ndarray = field(repr=False)  # the B bootstrap replicates of the seed mean


@dataclass
class Difference:
    point: float
    lo: float
    hi: float

    @property
    def within_noise(self) -> bool:
        """The interval contains 0: the data cannot tell this difference from none."""
        return bool(self.lo <= 0.0 <= self.hi)


class Bootstrap:
    """Seeded resampling shared by every experiment, so that differences are paired."""

    def __init__(self, n_boot: int = 1000, ci: float = 0.95, seed: int = 0):
        if n_boot < 10:
            raise PipelineError(f"report.n_boot={n_boot} must be at least 10")
        if not 0 < ci < 1:
            raise PipelineError(f"report.ci={ci} must lie in (0, 1)")
        self.n_boot, self.ci, self.seed = int(n_boot), float(ci), int(seed)
        self._indices: dict[tuple[str, int], np.ndarray] = {}

    def indices(self, task: str, n: int) -> np.ndarray:
        """(B, n) example positions; the same for every experiment scored on the same n examples."""
        key = (task, n)
        if key not in self._indices:
            rng = np.random.default_rng([self.seed, zlib.crc32(task.encode()), n])
            self._indices[key] = rng.integers(0, n, size=(self.n_boot, n))
        return self._indices[key]

    def replicates(self, task: str, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
        idx = self.indices(task, len(label))
        return np.array([task_score(task, pred[i], label[i]) for i in idx])

    def interval(self, reps: np.ndarray) -> tuple[float, float]:
        tail = (1.0 - self.ci) / 2.0
        lo, hi = np.quantile(reps, [tail, 1.0 - tail])
        return float(lo), float(hi)

    def estimate(self, points: list[float], reps: np.ndarray, n: int) -> Estimate:
        lo, hi = self.interval(reps)
        std = float(np.std(points, ddof=1)) if len(points) > 1 else math.nan
        return Estimate(float(np.mean(points)), lo, hi, std, len(points), n, reps)

    def difference(self, a: Estimate, b: Estimate) -> Difference:
        """a - b, paired: both estimates' replicates come from the same resampled examples."""
        lo, hi = self.interval(a.reps - b.reps)
        return Difference(a.point - b.point, lo, hi)


def canonical_ids(runs: list[dict[str, pd.DataFrame]]) -> dict[str, list[str]]:
    """Per task, the dev ids every run scored (sorted): the examples all intervals resample."""
    ids: dict[str, set] = {}
    for run in runs:
        for task, frame in run.items():
            ids[task] = set(frame.index) if task not in ids else ids[task] & set(frame.index)
    for task, common in ids.items():
        most = max(len(run[task]) for run in runs if task in run)
        if most > len(common):
            log.warning("%s: %d dev rows are not scored by every run; intervals use the %d common ones",
                        task, most - len(common), len(common))
    return {task: sorted(s) for task, s in ids.items()}


def estimate_runs(boot: Bootstrap, seeds: list[dict[str, pd.DataFrame]], ids: dict[str, list[str]]) -> dict[str, Estimate]:
    """Scores of one experiment over its seeds: per task metric, plus avg / leaderboard_avg."""
    if not seeds:
        return {}
    tasks = [t for t in seeds[0] if all(t in s for s in seeds) and ids.get(t)]
    per_seed_points: list[dict[str, float]] = [{} for _ in seeds]
    reps: dict[str, np.ndarray] = {}
    out: dict[str, Estimate] = {}
    for task in tasks:
        metric = METRIC_OF_TASK[task]
        task_reps = []
        for k, run in enumerate(seeds):
            frame = run[task].loc[ids[task]]
            pred, label = frame["prediction"].to_numpy(), frame["label"].to_numpy()
            per_seed_points[k][metric] = task_score(task, pred, label)
            task_reps.append(boot.replicates(task, pred, label))
        reps[metric] = np.mean(task_reps, axis=0)
        out[metric] = boot.estimate([p[metric] for p in per_seed_points], reps[metric], len(ids[task]))
    # The combined metrics are linear in the task scores, so summarize() applies to replicates too.
    combined = summarize(reps) if len(reps) > 1 else {}
    for metric in ("avg", "leaderboard_avg"):
        if metric in combined:
            points = [summarize(p)[metric] for p in per_seed_points]
            out[metric] = boot.estimate(points, np.asarray(combined[metric]), 0)
    return out


def constant_prediction(task: str, labels: np.ndarray) -> np.ndarray:
    """The majority-class predictor: the most frequent dev label, for every example."""
    values, counts = np.unique(labels, return_counts=True)
    return np.full(len(labels), values[np.argmax(counts)])


def majority_estimates(boot: Bootstrap, labels: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, Estimate]:
    """Scores of predicting each task's majority dev label (for STS a constant: Pearson 0)."""
    run = {task: pd.DataFrame({"prediction": constant_prediction(task, y), "label": y}, index=pd.Index(ids, name="id"))
           for task, (ids, y) in labels.items()}
    ids = {task: sorted(frame.index) for task, frame in run.items()}
    return estimate_runs(boot, [run], ids)
