"""Stage functions behind the CLI: evaluate and summary (prepare: pipeline/prepare.py, cache: pipeline/cache.py,
training: pipeline/train.py)."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import io as pio
from pipeline.config import config_from_dict
from pipeline.data import tokenizer_info
from pipeline.errors import PipelineError
from pipeline.evaluate import (
    predict,
    score_tasks,
    write_dev_predictions,
    write_leaderboard_file,
)
from pipeline.model import build_model
from pipeline.runtime import pick_device, resolve_precision
from pipeline.train import BEST, load_task_data, open_prefix_cache

log = logging.getLogger(__name__)


def load_trained(run_dir: Path, device):
    """Model and config of a finished run, from best.safetensors (weights + config metadata)."""
    path = run_dir / BEST
    if not path.exists():
        raise PipelineError(f"{path}: no trained model; run the train stage first")
    with safe_open(str(path), framework="pt") as fh:
        cfg = config_from_dict(json.loads(fh.metadata()["config"]))
    model = build_model(cfg.model, list(cfg.train.tasks))
    model.load_state_dict(load_file(str(path)))
    model.set_precision(device, resolve_precision(cfg.train.precision, device))
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
    # The trained run's own config says which backbone (MLM or not) and frozen prefix the weights sit on.
    prefix = open_prefix_cache(dataclasses.replace(trained_cfg, data=cfg.data), model)
    dev = load_task_data(cfg, tasks, "dev", prefix, cfg.eval.dev_limit)
    scores, preds = score_tasks(model, dev, pad_id, batch, device)
    out = run_dir / "predictions"
    for t in tasks:
        write_leaderboard_file(out / f"{t}-dev-output.csv", t, dev[t].ids, preds[t])
        if cfg.eval.test_predictions and (Path(prepared) / f"{t}-test.safetensors").exists():
            test = load_task_data(cfg, [t], "test", prefix)[t]
            write_leaderboard_file(out / f"{t}-test-output.csv", t, test.ids,
                                   predict(model, test, pad_id, batch, device))
    write_dev_predictions(run_dir / "dev_predictions.csv", dev, preds)
    record = pio.read_json(run_dir / "record.json") if (run_dir / "record.json").exists() else {}
    ran = record.get("metrics") or {}
    metrics = {**scores, "n_dev": {t: len(d) for t, d in dev.items()}, "seed": trained_cfg.train.seed,
               "experiment": trained_cfg.name, "precision": model.precision, "freeze_layers": model.frozen_layers,
               "steps": ran.get("steps")}
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
