"""Metrics, prediction files and the evaluate stage.

Metric keys are the same everywhere (metrics.json, the report, W&B, Optuna):
sst_acc, para_acc, sts_corr, cfimdb_acc, avg (the paper's plain mean of the three)
and leaderboard_avg ((sst + para + (sts + 1) / 2) / 3, the CS224N leaderboard's).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import io as pio
from pipeline.data import TaskData, collate, to_device

log = logging.getLogger(__name__)

METRIC_OF_TASK = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_corr", "cfimdb": "cfimdb_acc"}
# The CS224N leaderboard's file names and header words.
LEADERBOARD = {"sst": ("sst", "Predicted_Sentiment"), "para": ("para", "Predicted_Is_Paraphrase"),
               "sts": ("sts", "Predicted_Similiary"), "cfimdb": ("cfimdb", "Predicted_Sentiment")}


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
    return pearson(pred, gold) if task == "sts" else accuracy(pred, np.asarray(gold).astype(int))


def summarize(scores: dict[str, float]) -> dict[str, float]:
    """Add the paper's avg and the leaderboard average when all three multitask scores exist."""
    out = dict(scores)
    if all(k in scores for k in ("sst_acc", "para_acc", "sts_corr")):
        s, p, c = scores["sst_acc"], scores["para_acc"], scores["sts_corr"]
        out["avg"] = (s + p + c) / 3
        out["leaderboard_avg"] = (s + p + (c + 1) / 2) / 3
    elif len(scores) == 1:
        out["avg"] = next(iter(scores.values()))
    return out


@torch.inference_mode()
def predict(model, data: TaskData, pad_id: int, batch_size: int, device, desc: str = "") -> np.ndarray:
    """Predictions in data order, batched by length for speed."""
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    out = np.zeros(len(data), dtype=np.float32)
    cross = data.pair and data.task == "para" and model.cfg.para_head == "cross"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    for start in tqdm(range(0, len(order), batch_size), desc=desc or f"eval {data.task}-{data.split}",
                      leave=False, disable=None):
        idx = order[start: start + batch_size]
        batch = to_device(collate(data, idx, pad_id, cross=cross), device)
        with autocast:
            out[idx] = model.predict(data.task, batch).float().cpu().numpy()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def score_tasks(model, dev: dict[str, TaskData], pad_id: int, batch_size: int, device) -> tuple[dict, dict]:
    """Dev metrics for every task, plus the raw predictions."""
    scores, preds = {}, {}
    for task, data in dev.items():
        preds[task] = predict(model, data, pad_id, batch_size, device)
        scores[METRIC_OF_TASK[task]] = task_score(task, preds[task], data.labels.numpy())
    return summarize(scores), preds


def write_leaderboard_file(path: Path, task: str, ids: list[str], preds: np.ndarray) -> None:
    """CS224N format: a header line, then `id , prediction` per example."""
    _, header = LEADERBOARD[task]
    fmt = (lambda v: f"{v:.4f}") if task == "sts" else (lambda v: str(int(v)))
    lines = [f"id \t {header} \n"] + [f"{i} , {fmt(p)} \n" for i, p in zip(ids, preds)]
    pio.write_text(path, "".join(lines))


def write_dev_predictions(path: Path, dev: dict[str, TaskData], preds: dict[str, np.ndarray]) -> None:
    """One row per dev example (task, id, prediction, label): what the report bootstraps over."""
    import pandas as pd

    frames = [pd.DataFrame({"task": task, "id": data.ids, "prediction": preds[task], "label": data.labels.numpy()})
              for task, data in dev.items()]
    frame = pd.concat(frames, ignore_index=True)
    pio.write_with(path, lambda tmp: frame.to_csv(tmp, index=False))
