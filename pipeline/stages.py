"""Stage functions behind the CLI: prepare, evaluate, summary. Training lives in train.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import io as pio
from pipeline.config import config_from_dict
from pipeline.data import load_split, prepare, tokenizer_info, SPECS
from pipeline.errors import PipelineError
from pipeline.evaluate import (METRIC_OF_TASK, predict, score_tasks, summarize, task_score, write_dev_predictions,
                               write_leaderboard_file)
from pipeline.model import build_model, load_tokenizer
from pipeline.train import BEST, pick_device

log = logging.getLogger(__name__)


def run_prepare(cfg) -> dict:
    tokenizer = load_tokenizer(cfg.model.backbone)
    report = prepare(cfg.data, tokenizer, cfg.model.backbone)
    s = report["summary"]
    detail = ", ".join(f"{f}: {n}" for f, n in s["bad_by_file"].items()) or "none"
    log.info("prepare: %d rows read, %d bad rows skipped (%s); details in %s", s["rows"], s["bad"], detail,
             Path(cfg.data.prepared_dir) / "report.json")
    return report


def load_trained(run_dir: Path, device):
    """Model and config of a finished run, from best.safetensors (weights + config metadata)."""
    path = run_dir / BEST
    if not path.exists():
        raise PipelineError(f"{path}: no trained model; run the train stage first")
    with safe_open(str(path), framework="pt") as fh:
        cfg = config_from_dict(json.loads(fh.metadata()["config"]))
    model = build_model(cfg.model, list(cfg.train.tasks))
    model.load_state_dict(load_file(str(path)))
    return model.to(device), cfg


def run_evaluate(cfg, run_dir: Path | None = None) -> dict:
    """Score the best checkpoint on the full dev sets; write metrics.json and prediction files."""
    run_dir = Path(run_dir or cfg.run_dir)
    device = pick_device(cfg.train.device)
    model, trained_cfg = load_trained(run_dir, device)
    prepared = cfg.data.prepared_dir
    pad_id = tokenizer_info(prepared)["pad_id"]
    tasks = list(trained_cfg.train.tasks)
    batch = cfg.eval.batch_size
    dev = {t: load_split(prepared, t, "dev").subset(cfg.eval.dev_limit) for t in tasks}
    scores, preds = score_tasks(model, dev, pad_id, batch, device)
    out = run_dir / "predictions"
    for t in tasks:
        write_leaderboard_file(out / f"{t}-dev-output.csv", t, dev[t].ids, preds[t])
        if cfg.eval.test_predictions and (Path(prepared) / f"{t}-test.safetensors").exists():
            test = load_split(prepared, t, "test")
            write_leaderboard_file(out / f"{t}-test-output.csv", t, test.ids,
                                   predict(model, test, pad_id, batch, device))
    write_dev_predictions(run_dir / "dev_predictions.csv", dev, preds)
    metrics = {**scores, "n_dev": {t: len(d) for t, d in dev.items()}, "seed": trained_cfg.train.seed,
               "experiment": trained_cfg.name}
    pio.write_json(run_dir / "metrics.json", metrics)
    log.info("%s dev: %s", trained_cfg.name,
             " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    return metrics


def run_summary(runs_dir: str = "runs") -> str:
    """A plain-text table of every run's dev metrics (printed after `make repro`)."""
    rows = []
    for path in sorted(Path(runs_dir).glob("*/s*/metrics.json")):
        m = pio.read_json(path)
        rows.append((m.get("experiment", path.parent.parent.name), m.get("seed"),
                     *(m.get(k) for k in ("sst_acc", "para_acc", "sts_corr", "cfimdb_acc", "avg"))))
    if not rows:
        return "no evaluated runs yet"
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    header = ("experiment", "seed", "sst_acc", "para_acc", "sts_corr", "cfimdb_acc", "avg")
    table = [header] + [tuple(fmt(v) for v in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
