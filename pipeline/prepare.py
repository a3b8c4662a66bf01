"""The prepare stage: validate and tokenise the CS224N files once (pipeline/data.py does the work)."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import prepare
from pipeline.model import load_tokenizer

log = logging.getLogger(__name__)


def run_prepare(cfg) -> dict:
    tokenizer = load_tokenizer(cfg.model.backbone)
    report = prepare(cfg.data, tokenizer, cfg.model.backbone)
    s = report["summary"]
    detail = ", ".join(f"{f}: {n}" for f, n in s["bad_by_file"].items()) or "none"
    log.info("prepare: %d rows read, %d bad rows skipped (%s); details in %s", s["rows"], s["bad"], detail,
             Path(cfg.data.prepared_dir) / "report.json")
    return report
