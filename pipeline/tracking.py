"""Run records on disk (the embedded tracker) and optional Weights & Biases logging.

Every run, whoever starts it (DVC, Optuna, a W&B agent, the CLI), writes
`<run_dir>/record.json`: resolved config, git commit, data checksums, backbone,
per-epoch history, final metrics, wall time and status
(running / completed / failed / pruned, with the error).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import time
from pathlib import Path

from pipeline import io as pio

log = logging.getLogger(__name__)

RECORD = "record.json"


def git_commit() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def data_checksums(prepared_dir: str | Path) -> dict:
    report = Path(prepared_dir) / "report.json"
    if not report.exists():
        return {}
    files = pio.read_json(report).get("files", {})
    return {name: info.get("sha256") for name, info in files.items() if info.get("sha256")}


class RunRecord:
    """The run's self-describing record, rewritten atomically on every change."""

    def __init__(self, run_dir: str | Path, cfg, kind: str = "train", origin: str | None = None):
        self.path = Path(run_dir) / RECORD
        self.t0 = time.time()
        previous = pio.read_json(self.path) if self.path.exists() else {}
        self.data = {
            "name": cfg.name,
            "kind": kind,
            "origin": origin or os.environ.get("MINBERT_ORIGIN", "cli"),
            "status": "running",
            "config": cfg.to_dict(),
            "backbone": cfg.model.init_from or cfg.model.backbone,
            "git": git_commit(),
            "data_checksums": data_checksums(cfg.data.prepared_dir),
            "started_at": previous.get("started_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
            "wall_time_s": previous.get("wall_time_s", 0.0),
            "history": previous.get("history", []),
            "metrics": previous.get("metrics", {}),
            "error": None,
        }
        self._base_wall = self.data["wall_time_s"]
        self.save()

    def save(self) -> None:
        self.data["wall_time_s"] = round(self._base_wall + time.time() - self.t0, 3)
        pio.write_json(self.path, self.data)

    def set_history(self, history: list[dict]) -> None:
        self.data["history"] = history
        self.save()

    def finish(self, status: str, metrics: dict | None = None, error: str | None = None) -> None:
        self.data["status"] = status
        if metrics is not None:
            self.data["metrics"] = metrics
        self.data["error"] = error
        self.data["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self.save()


def load_records(runs_dir: str | Path = "runs") -> list[dict]:
    """Every run record under runs_dir, with its folder."""
    out = []
    for path in sorted(Path(runs_dir).glob(f"**/{RECORD}")):
        try:
            rec = pio.read_json(path)
        except ValueError:
            log.warning("%s: unreadable run record skipped", path)
            continue
        rec["run_dir"] = str(path.parent)
        out.append(rec)
    return out


class WandbTracker:
    """Thin W&B wrapper: offline without an API key, never prompts, always finishes."""

    def __init__(self, cfg, run_dir: Path, enabled: bool):
        self.run = None
        if not enabled or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.tracking.wandb_project, name=f"{cfg.name}-s{cfg.train.seed}",
                              config=cfg.to_dict(), dir=str(run_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
