"""Metrics and prediction files (the evaluate stage itself is pipeline/stages.py run_evaluate).

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
from pipeline.tasks import METRIC_OF_TASK, TASKS, accuracy, pearson, summarize, task_score  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# The CS224N leaderboard's file names and header words.
LEADERBOARD = {t.name: (t.name, t.leaderboard_header) for t in TASKS.values()}


@torch.inference_mode()
def predict(model, data: TaskData, pad_id: int, batch_size: int, device, desc: str = "") -> np.ndarray:
    """Predictions in data order, batched by length for speed."""
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    out = np.zeros(len(data), dtype=np.float32)
    cross = data.pair and data.task == "para" and model.cfg.para_head == "cross"
    for start in tqdm(range(0, len(order), batch_size), desc=desc or f"eval {data.task}-{data.split}",
                      leave=False, disable=None):
        idx = order[start: start + batch_size]
        batch = to_device(collate(data, idx, pad_id, cross=cross), device)
        out[idx] = model.predict(data.task, batch).float().cpu().numpy()  # the model autocasts its encoder
    return out


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
    fmt = (lambda v: f"{v:.4f}") if TASKS[task].pair_kind == "score" else (lambda v: str(int(v)))
    lines = [f"id \t {header} \n"] + [f"{i} , {fmt(p)} \n" for i, p in zip(ids, preds)]
    pio.write_text(path, "".join(lines))


def write_dev_predictions(path: Path, dev: dict[str, TaskData], preds: dict[str, np.ndarray]) -> None:
    """One row per dev example (task, id, prediction, label): what the report bootstraps over."""
    import pandas as pd

    frames = [pd.DataFrame({"task": task, "id": data.ids, "prediction": preds[task], "label": data.labels.numpy()})
              for task, data in dev.items()]
    frame = pd.concat(frames, ignore_index=True)
    pio.write_with(path, lambda tmp: frame.to_csv(tmp, index=False))
