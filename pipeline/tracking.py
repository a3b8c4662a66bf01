"""Run records on disk (the embedded tracker) and optional Weights & Biases logging.

Every run, whoever starts it (DVC, Optuna, a W&B agent, the CLI), writes
`<run_dir>/record.json`: resolved config, git commit, data checksums, backbone,
per-epoch history, final metrics, wall time and status
(running / completed / failed / pruned, with the error).
"""
from __future__ import annotations

import contextlib
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

    def __init__(self, run_dir: str | Path, cfg, kind: str = "train", origin: str | None = None, resume: bool = True):
        self.path = Path(run_dir) / RECORD
        self.t0 = time.time()
        # A resumed run keeps its history and wall time; a fresh start (no checkpoint) starts a fresh record.
        previous = pio.read_json(self.path) if resume and self.path.exists() else {}
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


@contextlib.contextmanager
def run_origin(name: str):
    """Records written inside the block say who started the run (optuna, wandb, ...)."""
    previous = os.environ.get("MINBERT_ORIGIN")
    os.environ["MINBERT_ORIGIN"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MINBERT_ORIGIN", None)
        else:
            os.environ["MINBERT_ORIGIN"] = previous


def update_record(run_dir: str | Path, **fields) -> bool:
    """Merge top-level fields into an existing record (sweep metadata, a lost worker's status)."""
    path = Path(run_dir) / RECORD
    if not path.exists():
        return False
    try:
        rec = pio.read_json(path)
    except ValueError:
        log.warning("%s: unreadable run record left as it is", path)
        return False
    rec.update(fields)
    pio.write_json(path, rec)
    return True


def wandb_mode() -> str:
    """$WANDB_MODE if set; online with a key (WANDB_API_KEY or `wandb login`'s netrc entry); else offline.

    Offline never prompts and never waits on the network; `wandb sync` uploads such runs later.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbTracker:
    """Thin W&B wrapper: offline without an API key, never prompts, always finishes what it started.

    A run already active in this process (a W&B sweep agent's, opened by
    sweeps/wandb_entry.py) is reused and left for its owner to finish.
    Metric keys are those of metrics.json and steps.jsonl, so a W&B sweep's
    `metric: avg` sees every epoch's dev score.
    """

    def __init__(self, cfg, run_dir: Path, enabled: bool):
        self.run, self.owned = None, False
        if not enabled or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        if wandb.run is not None:
            self.run = wandb.run
            self.run.config.update(cfg.to_dict(), allow_val_change=True)
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(project=cfg.tracking.wandb_project, name=f"{cfg.name}-s{cfg.train.seed}",
                                  config=cfg.to_dict(), dir=str(run_dir), mode=wandb_mode(), reinit="finish_previous",
                                  settings=wandb.Settings(console="off", silent=True, init_timeout=120))
            self.owned = True
        except Exception as err:  # tracking is optional: a W&B outage must not cost the training run
            log.warning("W&B logging off for this run: %s",
                        str(err).strip().splitlines()[0] if str(err).strip() else err)
            self.run = None

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run this tracker opened (called from train()'s `finally`, so also on failure)."""
        run, owned = self.run, self.owned
        self.run, self.owned = None, False
        if run is not None and owned:
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # never mask the training error that may be on its way out
                log.warning("W&B finish failed: %s", err)
