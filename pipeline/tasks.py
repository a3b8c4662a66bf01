"""What the project knows about each task, and the metrics, in one torch-free place.

The model, the evaluate step and the report all read these tables (the report without torch).
Adding a task: an entry in TASKS plus its FileSpecs in pipeline/data.py (and a head shape in
pipeline/model.py when it is neither a sentence classification nor a sentence-pair score).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    metric: str                     # metric key everywhere: metrics.json, the report, W&B, Optuna
    leaderboard_header: str         # the CS224N prediction file's header word
    num_classes: int | None = None  # sentence classification (cross-entropy); None: a pair task
    pair_kind: str = ""             # "binary" (logit, BCE) or "score" (0-5 regression)
    title: str = ""                 # how the report and quality.md name the task ("Quora"); default: the name
    metric_title: str = ""          # the metric's column header, as the paper's tables write it ("Para Acc.")

    @property
    def label(self) -> str:
        return self.title or self.name

    @property
    def metric_label(self) -> str:
        return self.metric_title or self.metric

    @property
    def accuracy_metric(self) -> bool:
        """Scored by accuracy (a classification: the majority class is a floor), not by correlation."""
        return self.pair_kind != "score"


TASKS = {
    "sst": Task("sst", "sst_acc", "Predicted_Sentiment", num_classes=5, title="SST", metric_title="SST Acc."),
    "para": Task("para", "para_acc", "Predicted_Is_Paraphrase", pair_kind="binary", title="Quora",
                 metric_title="Para Acc."),
    "sts": Task("sts", "sts_corr", "Predicted_Similiary", pair_kind="score", title="STS", metric_title="STS Corr."),
    "cfimdb": Task("cfimdb", "cfimdb_acc", "Predicted_Sentiment", num_classes=2, title="CFIMDB",
                   metric_title="CFIMDB Acc."),
}
MULTITASK = ("sst", "para", "sts")  # the paper's three, trained together
METRIC_OF_TASK = {t.name: t.metric for t in TASKS.values()}
NUM_CLASSES = {t.name: t.num_classes for t in TASKS.values() if t.num_classes}
TASK_OF_METRIC = {t.metric: t.name for t in TASKS.values()}
MULTITASK_METRICS = tuple(TASKS[t].metric for t in MULTITASK)
# The combined metrics summarize() adds over the multitask scores, with their column headers.
COMBINED_TITLES = {"avg": "Avg.", "leaderboard_avg": "Leaderboard avg."}
# Every metric's column header, in table order: avg, each task's metric (registry order), leaderboard_avg.
METRIC_TITLES = {"avg": COMBINED_TITLES["avg"], **{t.metric: t.metric_label for t in TASKS.values()},
                 "leaderboard_avg": COMBINED_TITLES["leaderboard_avg"]}


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if len(gold) == 0:
        return float("nan")
    return float((pred == gold).mean())


def pearson(pred, gold) -> float:
    pred, gold = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if len(gold) < 2 or np.std(pred) == 0 or np.std(gold) == 0:
        return 0.0  # a constant prediction carries no correlation
    from scipy.stats import pearsonr  # here, not at module level: scipy.stats adds ~1.5 s to every CLI start

    return float(pearsonr(pred, gold).statistic)


def task_score(task: str, pred, gold) -> float:
    """The task's metric: Pearson r for a score task, accuracy otherwise."""
    return pearson(pred, gold) if TASKS[task].pair_kind == "score" else accuracy(pred, np.asarray(gold).astype(int))


def summarize(scores: dict) -> dict:
    """Add the paper's avg and the leaderboard average when all three multitask scores exist."""
    out = dict(scores)
    keys = [TASKS[t].metric for t in MULTITASK]
    if all(k in scores for k in keys):
        s, p, c = (scores[k] for k in keys)
        out["avg"] = (s + p + c) / 3
        out["leaderboard_avg"] = (s + p + (c + 1) / 2) / 3
    elif len(scores) == 1:
        out["avg"] = next(iter(scores.values()))
    return out
