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
from pipeline.config import config_from_dict, study_dir
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
    """Score the best checkpoint on the full dev sets; write metrics.json and prediction files.

    Returns the scores plus `n_dev` (dev rows per task), which the file leaves to record.json."""
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
    # metrics.json holds scores only (what `dvc metrics` and `dvc exp show` list); a single-task run has no
    # `avg` (it would be its one task's score under another name). What the evaluation ran on goes to the record.
    combined = () if len(tasks) > 1 else ("avg", "leaderboard_avg")
    metrics = {k: v for k, v in scores.items() if k not in combined}
    pio.write_json(run_dir / "metrics.json", metrics)
    record_path = run_dir / "record.json"
    if record_path.exists():
        record = pio.read_json(record_path)
        record["evaluation"] = {"n_dev": {t: len(d) for t, d in dev.items()}, "precision": model.precision,
                                "freeze_layers": model.frozen_layers,
                                "test_predictions": bool(cfg.eval.test_predictions)}
        pio.write_json(record_path, record)
    log.info("%s dev: %s", trained_cfg.name,
             " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    return {**metrics, "n_dev": {t: len(d) for t, d in dev.items()}}


def run_summary(runs_dir: str | Path = "runs") -> str:
    """A plain-text table of every study run's dev metrics (printed after `make repro`)."""
    from pipeline.tasks import TASKS

    keys = [t.metric for t in TASKS.values()] + ["avg"]
    rows = []
    for path in sorted(study_dir(runs_dir).glob("*/s*/metrics.json")):
        m = pio.read_json(path)
        rows.append((path.parent.parent.name, path.parent.name.removeprefix("s"), *(m.get(k) for k in keys)))
    if not rows:
        return f"no evaluated runs under {study_dir(runs_dir)} yet"
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    header = ("experiment", "seed", *keys)
    table = [header] + [tuple(fmt(v) for v in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)
