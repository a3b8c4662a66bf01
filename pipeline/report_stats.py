"""Intervals for the report: bootstrap over dev examples, spread over training seeds, paired differences.

Two kinds of noise, two intervals:

- the **bootstrap** resamples dev *examples* (with replacement, B times). Resample b of a task
  uses the same example ids for every experiment, so the difference of two experiments'
  replicates is a paired bootstrap: example difficulty cancels. It covers the sampling of the
  dev set, not training randomness.
- the **seeds** (runs of one experiment under several training seeds) cover training randomness
  (initialisation, data order, dropout). Two rows with >= 2 seeds each get a Welch t interval
  on the difference of their seed means.

A difference is *resolved* only when neither interval contains zero; where a row has fewer than
two seeds only the bootstrap applies (Difference.basis says which).

This module is read-only and torch-free: the metric functions below are those of
pipeline.evaluate (tests/test_report.py checks they agree), repeated here so that the report
never imports the training or model code.
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
from pipeline.tasks import METRIC_OF_TASK, TASKS, accuracy, pearson, summarize, task_score  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("task", "id", "prediction", "label")


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of two (B, n) arrays; 0 where either row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    sx, sy = np.sqrt((xc * xc).sum(axis=1)), np.sqrt((yc * yc).sum(axis=1))
    den = sx * sy
    ok = (x.std(axis=1) > 0) & (y.std(axis=1) > 0) & (den > 0)
    r = np.zeros(len(x))
    r[ok] = (xc * yc).sum(axis=1)[ok] / den[ok]
    return np.clip(r, -1.0, 1.0)


# ---------------------------------------------------------------- reading predictions


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


# ---------------------------------------------------------------- estimates and differences


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
    points: tuple = ()  # the score of each seed


@dataclass
class Difference:
    """a - b: the paired bootstrap interval (dev sampling) and, with >= 2 seeds a side, a Welch t
    interval on the seed means (training randomness). Decided on unrounded numbers."""
    point: float
    lo: float
    hi: float
    seed_lo: float = math.nan
    seed_hi: float = math.nan

    @property
    def has_seed_interval(self) -> bool:
        return not (math.isnan(self.seed_lo) or math.isnan(self.seed_hi))

    @property
    def bootstrap_contains_zero(self) -> bool:
        return bool(self.lo <= 0.0 <= self.hi)

    @property
    def seeds_contain_zero(self) -> bool | None:
        """None where a row has fewer than two seeds (no across-seed interval)."""
        return bool(self.seed_lo <= 0.0 <= self.seed_hi) if self.has_seed_interval else None

    @property
    def resolved(self) -> bool:
        """Neither interval contains zero (only the bootstrap where seeds are missing)."""
        return not self.bootstrap_contains_zero and not self.seeds_contain_zero

    @property
    def within_noise(self) -> bool:
        return not self.resolved

    @property
    def basis(self) -> str:
        return "bootstrap + seeds" if self.has_seed_interval else "bootstrap only"

    @property
    def marker(self) -> str:
        """What the difference is, spelled out: resolved, or which noise it is within."""
        if self.resolved:
            return "resolved" if self.has_seed_interval else "resolved (bootstrap only)"
        why = [w for w, inside in (("dev sampling", self.bootstrap_contains_zero),
                                   ("seeds", self.seeds_contain_zero)) if inside]
        return f"~noise ({', '.join(why)})"


def welch_interval(a: list[float], b: list[float], ci: float) -> tuple[float, float]:
    """Welch t interval of mean(a) - mean(b) (unequal variances); needs >= 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    d = float(np.mean(a) - np.mean(b))
    va, vb = float(np.var(a, ddof=1)) / len(a), float(np.var(b, ddof=1)) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical scores across seeds on both sides: no spread to widen the interval
        return d, d
    df = (va + vb) ** 2 / ((va ** 2) / (len(a) - 1) + (vb ** 2) / (len(b) - 1))
    from scipy.stats import t  # late: scipy.stats is slow to import

    half = float(t.ppf(1.0 - (1.0 - ci) / 2.0, df)) * se
    return d - half, d + half


class Bootstrap:
    """Seeded resampling shared by every experiment, so that differences are paired.

    n_boot, ci and seed come from params.yaml's report block; there are no defaults here.
    """

    def __init__(self, n_boot: int, ci: float, seed: int):
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
        """The task score of each resample (vectorised task_score)."""
        idx = self.indices(task, len(label))
        if not TASKS[task].accuracy_metric:  # a correlation task (task_score: Pearson r)
            return _pearson_rows(np.asarray(pred, dtype=float)[idx], np.asarray(label, dtype=float)[idx])
        right = np.asarray(pred) == np.asarray(label).astype(int)  # bool: (B, n) gathers stay small
        return right[idx].mean(axis=1)

    def interval(self, reps: np.ndarray) -> tuple[float, float]:
        tail = (1.0 - self.ci) / 2.0
        lo, hi = np.quantile(reps, [tail, 1.0 - tail])
        return float(lo), float(hi)

    def estimate(self, points: list[float], reps: np.ndarray, n: int) -> Estimate:
        lo, hi = self.interval(reps)
        std = float(np.std(points, ddof=1)) if len(points) > 1 else math.nan
        return Estimate(float(np.mean(points)), lo, hi, std, len(points), n, reps, tuple(float(p) for p in points))

    def difference(self, a: Estimate, b: Estimate) -> Difference:
        """a - b: paired bootstrap (same resampled examples) and, with >= 2 seeds each, Welch t on the seeds."""
        lo, hi = self.interval(a.reps - b.reps)
        seed_lo, seed_hi = welch_interval(list(a.points), list(b.points), self.ci)
        return Difference(a.point - b.point, lo, hi, seed_lo, seed_hi)


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


def estimate_runs(boot: Bootstrap, seeds: list[dict[str, pd.DataFrame]],
                  ids: dict[str, list[str]]) -> dict[str, Estimate]:
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


# ---------------------------------------------------------------- the majority class


def dev_labels(runs: list[dict[str, pd.DataFrame]],
               ids: dict[str, list[str]]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per task, the dev labels of the scored examples (`ids`), read from the runs' dev_predictions.

    Taken from what the runs were scored on, not from a prefix of the prepared file: the evaluate
    stage scores a fixed random sample when eval.dev_limit is set. Runs that disagree on a label
    are logged (they were scored against different data).
    """
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for task, keep in ids.items():
        frames = [run[task] for run in runs if task in run]
        if not frames or not keep:
            continue
        labels = frames[0].loc[keep, "label"]
        for other in frames[1:]:
            if not np.allclose(other.loc[keep, "label"].to_numpy(dtype=float), labels.to_numpy(dtype=float)):
                log.warning("%s: runs disagree on dev labels (prepared from different data?); the majority class "
                            "uses the first run's", task)
                break
        out[task] = (list(keep), labels.to_numpy())
    return out


def constant_prediction(task: str, labels: np.ndarray) -> np.ndarray:
    """The majority-class predictor: the most frequent dev label, for every example."""
    values, counts = np.unique(labels, return_counts=True)
    return np.full(len(labels), values[np.argmax(counts)])


def majority_estimates(boot: Bootstrap, labels: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, Estimate]:
    """Scores of predicting each task's majority dev label (for STS a constant: Pearson 0).

    Accuracy of the constant majority label = the majority-class rate of the scored dev examples.
    """
    run = {task: pd.DataFrame({"prediction": constant_prediction(task, y), "label": y}, index=pd.Index(ids, name="id"))
           for task, (ids, y) in labels.items()}
    ids = {task: sorted(frame.index) for task, frame in run.items()}
    return estimate_runs(boot, [run], ids)


# ---------------------------------------------------------------- GradNorm: does alpha move the weights?

GN_PREFIX = "gn_weight_"
# Below this, two weight trajectories count as the same. GradNorm's weights sum to the number of
# tasks (3) and Adam moves each by about train.gn_lr (0.025) per step early on, so 1e-3 is a small
# share of a single step.
GN_ALPHA_TOL = 1e-3


def gradnorm_trajectory(steps: pd.DataFrame | None) -> pd.DataFrame | None:
    """The gn_weight_* columns of a steps.jsonl frame, indexed by step (None without them)."""
    if steps is None or "step" not in steps.columns:
        return None
    cols = sorted(c for c in steps.columns if c.startswith(GN_PREFIX))
    if not cols:
        return None
    frame = steps.drop_duplicates("step", keep="last").set_index("step")[cols].astype(float).sort_index()
    return frame.dropna(how="all")


def compare_gradnorm_alphas(runs: dict[float, dict[int, pd.DataFrame]], tol: float = GN_ALPHA_TOL) -> dict | None:
    """Do GradNorm's task-weight trajectories differ across alpha?

    `runs`: {alpha: {seed: steps frame}}. Runs of the same seed are compared (same data order and
    initialisation, so only alpha differs); without a seed common to every alpha, the seed means.
    Returns the largest absolute difference of any task weight over the common steps
    (`max_trajectory_diff`) and at the last common step (`max_final_diff`), the pair of alphas where
    the largest occurs, the per-alpha final weights, and `differ` (trajectory difference > tol).
    None with fewer than two alphas that logged weights.
    """
    traj = {a: {s: t for s, f in seeds.items() if (t := gradnorm_trajectory(f)) is not None and len(t)}
            for a, seeds in runs.items()}
    traj = {a: v for a, v in sorted(traj.items()) if v}
    if len(traj) < 2:
        return None
    common = sorted(set.intersection(*(set(v) for v in traj.values())))
    if common:
        groups = [{a: v[s] for a, v in traj.items()} for s in common]
        basis = f"runs of the same seed ({', '.join(map(str, common))})"
    else:
        groups = [{a: pd.concat(list(v.values())).groupby(level=0).mean() for a, v in traj.items()}]
        basis = "seed means (no seed is common to every alpha)"
    best, final_best, pair, n_steps = 0.0, 0.0, None, None
    for group in groups:
        alphas = list(group)
        for i, a in enumerate(alphas):
            for b in alphas[i + 1:]:
                fa, fb = group[a], group[b]
                cols = sorted(set(fa.columns) & set(fb.columns))
                steps = fa.index.intersection(fb.index)
                if not cols or not len(steps):
                    continue
                diff = (fa.loc[steps, cols] - fb.loc[steps, cols]).abs().to_numpy()
                n_steps = len(steps) if n_steps is None else min(n_steps, len(steps))
                if pair is None or np.nanmax(diff) > best:
                    best, pair = float(np.nanmax(diff)), (a, b)
                final_best = max(final_best, float(np.nanmax(diff[-1])))
    if pair is None:
        return None
    finals = {a: pd.concat([t.iloc[[-1]] for t in v.values()]).mean().rename(lambda c: c.removeprefix(GN_PREFIX))
              .to_dict() for a, v in traj.items()}
    return {"alphas": list(traj), "max_trajectory_diff": best, "max_final_diff": final_best, "pair": pair,
            "common_steps": n_steps, "basis": basis, "tol": tol, "differ": best > tol, "final_weights": finals}
