"""Score a trained run on another folder of labelled CS224N-format files (`evaluate --data-dir`).

The files are validated as the prepare stage validates them (the same row checks, the same
bad-row report) and tokenised with the run's own tokenizer and maximum length; data/prepared and
the prefix cache are not read (a run with frozen layers runs its whole encoder on the new data).
Per task the dev file is scored (ids-sst-dev.csv, quora-dev.csv, sts-dev.csv, ...), or the train
file where the folder has no dev file; tasks without either are skipped and listed.

Results go to RUN/eval/NAME/: metrics.json (the run's metric keys, bootstrap intervals with the
report's settings, what was scored and skipped), predictions.csv (task, id, prediction, label, as
dev_predictions.csv) and report.json (the bad rows). The folder is written aside and swapped in
whole; the run's own metrics.json is never touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from pipeline import io as pio
from pipeline.config import read_params
from pipeline.data import SPECS, FileSpec, TaskData, _tokenize, read_task_file
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.tasks import METRIC_OF_TASK

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
SPLITS = ("dev", "train")  # which labelled file of a task is scored, in order of preference
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def labelled_specs(task: str) -> list[FileSpec]:
    return [SPECS[(task, s)] for s in SPLITS if (task, s) in SPECS and SPECS[(task, s)].label_col]


def find_task_files(folder: Path, tasks: list[str]) -> tuple[dict[str, FileSpec], dict[str, str]]:
    """Per task, the labelled file the folder holds; and the tasks skipped, with why."""
    found, skipped = {}, {}
    for task in tasks:
        present = [s for s in labelled_specs(task) if (folder / s.filename).is_file()]
        if present:
            found[task] = present[0]
            if len(present) > 1:
                log.info("%s: scoring %s (also present, not scored: %s)", task, present[0].filename,
                         ", ".join(s.filename for s in present[1:]))
        else:
            skipped[task] = "no " + " or ".join(s.filename for s in labelled_specs(task))
    return found, skipped


def read_folder(folder: Path, specs: dict[str, FileSpec], tokenizer, max_length: int, strict: bool,
                backbone: str) -> tuple[dict, dict[str, TaskData]]:
    """Validate and tokenise the given files as `prepare` does: the report (same layout as
    data/prepared/report.json) and one TaskData per task."""
    report = {"source": str(folder), "backbone": backbone, "max_length": max_length, "files": {}, "bad_rows": []}
    parsed = {}
    for task, spec in specs.items():
        path = folder / spec.filename
        examples, bad, rows = read_task_file(path, spec)
        if not examples.ids:
            raise DataError(f"{path}: none of its {rows} rows is valid (line {bad[0].line}: {bad[0].reason})")
        report["files"][spec.filename] = {"sha256": pio.sha256_file(path), "rows": rows,
                                          "kept": len(examples.ids), "bad": len(bad)}
        report["bad_rows"].extend(vars(b) for b in bad)
        parsed[task] = (spec, examples)
    if strict and report["bad_rows"]:
        first = report["bad_rows"][0]
        raise DataError(f"{folder / first['file']}:{first['line']}: {first['reason']} "
                        f"({len(report['bad_rows'])} bad rows in all; strict mode)")
    data = {}
    for task, (spec, ex) in parsed.items():
        tensors = {"labels": np.asarray(ex.labels, dtype=np.float32)}
        for key, sentences in (("s1", ex.s1), ("s2", ex.s2)):
            if sentences:
                tensors[f"{key}_ids"], tensors[f"{key}_offsets"] = _tokenize(tokenizer, sentences, max_length)
        data[task] = TaskData(task, spec.split, tensors, ex.ids)
    bad_by_file: dict[str, int] = {}
    for b in report["bad_rows"]:
        bad_by_file[b["file"]] = bad_by_file.get(b["file"], 0) + 1
    report["summary"] = {"rows": sum(f["rows"] for f in report["files"].values()),
                         "bad": len(report["bad_rows"]), "bad_by_file": bad_by_file}
    return report, data


# ---------------------------------------------------------------- intervals


def bootstrap_from_params(params_path: str | Path):
    """The report's Bootstrap (params.yaml `report:` n_boot, ci, seed), so intervals match the report's."""
    from pipeline.report_stats import Bootstrap

    block = read_params(params_path).get("report") or {}
    missing = [k for k in ("n_boot", "ci", "seed") if block.get(k) is None]
    if missing:
        raise ConfigError(f"{params_path}: report.{missing[0]} missing (the bootstrap intervals use the report's "
                          "n_boot, ci and seed)")
    for key, kinds in (("n_boot", (int,)), ("ci", (int, float)), ("seed", (int,))):
        if isinstance(block[key], bool) or not isinstance(block[key], kinds):
            raise ConfigError(f"{params_path}: report.{key}={block[key]!r} must be a number")
    return Bootstrap(block["n_boot"], float(block["ci"]), block["seed"])


def intervals(boot, frames: dict) -> dict[str, list[float]]:
    """{metric: [lo, hi]} of one run's predictions ({task: frame of prediction, label indexed by id})."""
    from pipeline.report_stats import estimate_runs

    ids = {task: sorted(frame.index) for task, frame in frames.items() if len(frame)}
    return {metric: [est.lo, est.hi] for metric, est in estimate_runs(boot, [frames], ids).items()}


def prediction_frames(data: dict[str, TaskData], preds: dict[str, np.ndarray]) -> dict:
    import pandas as pd

    return {task: pd.DataFrame({"prediction": preds[task], "label": d.labels.numpy()}, index=pd.Index(d.ids, name="id"))
            for task, d in data.items()}


# ---------------------------------------------------------------- the command


def result_name(data_dir: Path, name: str | None) -> str:
    name = name if name is not None else data_dir.resolve().name
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (a folder name under {EVAL_DIR}/)")
    return name


def run_evaluate_other(cfg, run_dir: str | Path, data_dir: str | Path, name: str | None = None,
                       params_path: str | Path = "params.yaml") -> dict:
    """Score the run at `run_dir` on the labelled files in `data_dir`; write RUN/eval/NAME/; return its metrics."""
    from pipeline.evaluate import score_tasks, write_dev_predictions
    from pipeline.model import load_tokenizer
    from pipeline.runtime import pick_device
    from pipeline.stages import load_trained
    from pipeline.train import BEST

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if not (run_dir / BEST).exists():
        raise PipelineError(f"{run_dir / BEST}: no trained model; run the train stage first")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder")
    name = result_name(data_dir, name)
    boot = bootstrap_from_params(params_path)
    device = pick_device(cfg.train.device)
    model, trained = load_trained(run_dir, device)
    tasks = list(trained.train.tasks)
    specs, skipped = find_task_files(data_dir, tasks)
    if not specs:
        wanted = ", ".join(s.filename for t in tasks for s in labelled_specs(t))
        raise DataError(f"{data_dir}: no labelled file of the run's tasks ({', '.join(tasks)}); "
                        f"expected one of {wanted}")
    for task, why in skipped.items():
        log.warning("%s: skipped (%s in %s)", task, why, data_dir)
    tokenizer = load_tokenizer(trained.model.backbone)
    report, data = read_folder(data_dir, specs, tokenizer, trained.data.max_length, cfg.data.strict,
                               trained.model.backbone)
    s = report["summary"]
    log.info("%s: %d rows read, %d bad rows skipped (%s)", data_dir, s["rows"], s["bad"],
             ", ".join(f"{f}: {n}" for f, n in s["bad_by_file"].items()) or "none")
    scores, preds = score_tasks(model, data, tokenizer.pad_token_id, cfg.eval.batch_size, device)
    if len(data) == 1:  # no `avg` of one task (it would be that task's score under another name)
        scores = {k: v for k, v in scores.items() if k not in ("avg", "leaderboard_avg")}
    frames = prediction_frames(data, preds)
    spans = intervals(boot, frames)
    metrics = {**scores, "intervals": spans, "ci": boot.ci, "n_boot": boot.n_boot,
               "n": {t: len(d) for t, d in data.items()}, "files": {t: spec.filename for t, spec in specs.items()},
               "skipped": skipped, "bad_rows": s["bad"], "data_dir": str(data_dir), "name": name,
               "run_dir": str(run_dir), "experiment": trained.name, "seed": trained.train.seed,
               "precision": model.precision, "freeze_layers": model.frozen_layers}
    out = run_dir / EVAL_DIR / name
    tmp = out.parent / f".{name}.{os.getpid()}{pio.TMP_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        pio.write_json(tmp / "metrics.json", metrics)
        pio.write_json(tmp / "report.json", report)
        write_dev_predictions(tmp / "predictions.csv", data, preds)
        pio.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s on %s: %s%s; written to %s", trained.name, name,
             " ".join(f"{m}={scores[m]:.4f} [{lo:.4f}, {hi:.4f}]" for m, (lo, hi) in spans.items()
                      if m in METRIC_OF_TASK.values() or m == "avg"),
             f"; skipped {', '.join(skipped)}" if skipped else "", out)
    return metrics
