"""`python -m pipeline sweep`: an Optuna study over the extensions and hyperparameters.

One storage holds the study: a local SQLite file by default, or a shared
postgresql://... database for workers on many machines. Every trial is one
call of pipeline.train.train() on the base config plus the sampled overrides,
so it leaves the usual run folder and record under runs/sweeps/<study>/trial-<n>/.
Each epoch's dev score on the selection sample (train.eval_limit rows per task)
goes to the pruner; a trial that finishes is scored on the full dev sets by the
evaluate step (pipeline.stages.run_evaluate), and that score, with its bootstrap
interval, is the objective. Heartbeats mark a trial whose worker died as FAIL
and queue it again; the retry resumes from the dead trial's last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import load_config, parse_override
from pipeline.errors import ConfigError, NonFiniteLossError, PipelineError
from sweeps.pruners import build_pruner, describe
from sweeps.space import DEFAULT_SPACE, Space, load_space, mlm_folder, suggest
from sweeps.storage import make_storage, redact, storage_errors

log = logging.getLogger("sweeps.optuna")

STUDIES_DIR = Path("sweeps/studies")
SPEC_ENV = "MINBERT_SWEEP_SPEC"


@dataclass
class SweepSpec:
    """Everything a worker needs; built from the CLI arguments and passed to worker processes as JSON."""

    params: str = "params.yaml"
    profile: str | None = None
    overrides: list = field(default_factory=list)
    study: str = "minbert"
    storage: str | None = None
    trials: int = 20
    workers: int = 1
    base_experiment: str | None = None
    space: str = str(DEFAULT_SPACE)
    sampler_seed: int | None = None
    reports_dir: str = "reports/sweeps"
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 3
    lock_timeout: float = 60.0
    pruner: str | None = None  # another pruner type than the space file's (its Optuna defaults)

    @classmethod
    def from_args(cls, args) -> "SweepSpec":
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if getattr(args, f.name, None) is not None}
        spec = cls(**given)
        spec.validate()
        return spec

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.study):
            raise ConfigError(f"--study {self.study!r}: use letters, digits, '_', '.', '-' (it names folders)")
        for name in ("trials", "workers", "heartbeat_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"--grace-period={self.grace_period} must exceed "
                              f"--heartbeat-interval={self.heartbeat_interval}")
        if self.max_retry < 0 or self.lock_timeout <= 0:
            raise ConfigError("--max-retry must be >= 0 and --lock-timeout > 0")

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        path = (STUDIES_DIR / f"{self.study}.db").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def base_overrides(self) -> dict:
        return dict(parse_override(o) for o in self.overrides)

    def config(self, extra: dict | None = None):
        return load_config(self.params, experiment=self.base_experiment,
                           overrides={**self.base_overrides(), **(extra or {})}, profile=self.profile)

    def load_space(self) -> Space:
        """The search space, every value checked against this sweep's config; --pruner applied."""
        return load_space(self.space, self.config).with_pruner(self.pruner)

    def base(self, space: Space) -> dict:
        """What the study was started with (kept in the storage, so --report-only needs nothing else)."""
        return {"params": self.params, "profile": self.profile, "base_experiment": self.base_experiment,
                "overrides": list(self.overrides), "space": self.space, "pruner": space.pruner,
                "objective": space.objective}


def make_sampler(space: Space, spec: SweepSpec, worker: int, n_existing: int):
    """TPE seeded from (seed, worker, trials so far): workers differ, a resumed study does not replay its start."""
    import numpy as np
    import optuna

    base = spec.sampler_seed if spec.sampler_seed is not None else space.sampler.get("seed", 0)
    seed = int(np.random.SeedSequence([base, worker, n_existing]).generate_state(1)[0])
    options = {k: v for k, v in space.sampler.items() if k != "seed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `group` is 'experimental' in Optuna's terms
        return optuna.samplers.TPESampler(seed=seed, **options)


def make_pruner(space: Space):
    """The space file's pruner (sweeps/pruners.py), steps being epochs."""
    return build_pruner(space.pruner, space.max_epochs)


def finished_trials(study) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


class StopAtTarget:
    """Stop a worker once finished plus running trials reach the target, over all workers and machines."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study, trial) -> None:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        if len(study.get_trials(deepcopy=False, states=states)) >= self.target:
            study.stop()


class Objective:
    """One trial = one train() call, pruned on the per-epoch selection score, then scored on the full
    dev sets: its value is the full-dev `avg` of the best epoch's weights, its user attrs the bootstrap
    interval of that value and the task scores."""

    def __init__(self, spec: SweepSpec, space: Space, base_cfg, extra: dict):
        self.spec, self.space, self.extra = spec, space, extra
        self.mlm_dir = mlm_folder(base_cfg)
        self.runs_root = Path(base_cfg.tracking.runs_dir) / "sweeps" / spec.study
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial) -> float:
        import optuna

        from pipeline.tracking import run_origin, update_record
        from pipeline.train import train

        chosen = suggest(trial, self.space, self.mlm_dir)
        run_dir = self.runs_root / f"trial-{trial.number}"
        # Trial lost its system_attrs in Optuna 5; the storage still has them.
        retry_of = trial.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        if retry_of is not None:  # a retried trial carries the dead trial's user attrs: resume its checkpoint
            _copy_run(trial.user_attrs.get("run_dir"), run_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", chosen)
        trial.set_user_attr("worker", self.worker_id)
        cfg = self.spec.config({**self.extra, **chosen, "name": f"{self.spec.study}-trial-{trial.number}"})

        def report(epoch: int, scores: dict) -> None:
            trial.report(float(scores["avg"]), epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"selection avg {scores['avg']:.4f} after epoch {epoch + 1} is below "
                                         f"the pruner's rule ({self.space.pruner['type']})")

        started, scored = time.time(), {}
        try:
            with run_origin("optuna"):
                best = train(cfg, run_dir=run_dir, on_epoch_end=report)
            scored = score_trial(cfg, run_dir, self.space.objective)
            for key, value in {**scored, "selection_avg": float(best["avg"]),
                               "best_epoch": best.get("best_epoch")}.items():
                trial.set_user_attr(key, value)
        finally:
            trial.set_user_attr("wall_s", round(time.time() - started, 2))
            update_record(run_dir, origin="optuna", sweep={
                "study": self.spec.study, "trial": trial.number, "params": dict(trial.params), "overrides": chosen,
                "storage": redact(self.spec.storage_url), "worker": self.worker_id, "retry_of": retry_of,
                "objective": scored})
        return scored["avg"]


def score_trial(cfg, run_dir: Path, objective: dict) -> dict:
    """The objective of a finished trial: the evaluate step on the dev sets (objective.dev_limit rows per
    task, 0: all; no test predictions), and the bootstrap interval of its avg."""
    from pipeline.stages import run_evaluate
    from sweeps.dev_score import avg_interval

    eval_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, dev_limit=objective["dev_limit"], test_predictions=False))
    metrics = run_evaluate(eval_cfg, run_dir=run_dir)
    _, lo, hi = avg_interval(run_dir / "dev_predictions.csv", objective)  # the file's rounding: lo, hi only
    out = {k: float(metrics[k]) for k in ("avg", "sst_acc", "para_acc", "sts_corr") if k in metrics}
    out.update(avg_lo=lo, avg_hi=hi, ci=objective["ci"], n_dev=metrics.get("n_dev"))
    return out


def _copy_run(source: str | None, target: Path) -> None:
    if not source or not Path(source).is_dir() or target.exists():
        return  # another machine's folder, or this retry already started: train() resumes what is there
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("record.json", "wandb"))
    log.info("retry resumes %s from the checkpoint of %s", target, source)


def run_worker(spec: SweepSpec, worker: int, budget: int) -> None:
    """Run up to `budget` trials of the study in this process."""
    import optuna

    extra = {}
    base_cfg = spec.config()
    if spec.workers > 1 and base_cfg.train.threads == 0:  # N workers share the cores instead of each taking all
        extra["train.threads"] = max(1, (os.cpu_count() or 1) // spec.workers)
    space = spec.load_space()
    storage = make_storage(spec)
    with storage_errors(spec):
        study = optuna.load_study(study_name=spec.study, storage=storage, pruner=make_pruner(space))
        study.sampler = make_sampler(space, spec, worker, len(study.get_trials(deepcopy=False)))
        log.info("worker %d (%s): up to %d trial(s) of study %s", worker, os.getpid(), budget, spec.study)
        study.optimize(Objective(spec, space, base_cfg, extra), n_trials=budget, callbacks=[StopAtTarget(spec.trials)],
                       catch=(NonFiniteLossError,), gc_after_trial=True)


def _spawn_workers(spec: SweepSpec, count: int, budget: int) -> None:
    payload = dataclasses.asdict(dataclasses.replace(spec, workers=count))
    # The spec travels in the environment, not argv: a storage URL's password must not show in `ps`.
    procs = [subprocess.Popen([sys.executable, "-m", "sweeps.optuna_sweep", str(i)],
                              env={**os.environ, SPEC_ENV: json.dumps({**payload, "worker": i, "budget": budget})})
             for i in range(count)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C or a kill of the parent: stop the workers too (heartbeats re-queue their trials)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    failed = [c for c in codes if c != 0]
    if failed:
        raise PipelineError(f"{len(failed)} of {count} sweep workers failed (exit codes {codes}); "
                            "their errors are logged above")


def run_sweep(args) -> dict:
    """Create or resume the study, run its trials on `--workers` processes, write the reports."""
    import optuna

    from pipeline.data import tokenizer_info
    from sweeps.optuna_report import write_reports

    spec = SweepSpec.from_args(args)
    base_cfg = spec.config()
    tokenizer_info(base_cfg.data.prepared_dir)  # a bad config or unprepared data fails here, not in each trial
    if not base_cfg.multitask:
        raise ConfigError(f"train.tasks={base_cfg.train.tasks}: the sweep's objective is the multitask dev avg; "
                          "train sst, para and sts together")
    space = spec.load_space()
    log.info("study %s: pruner %s; objective: dev avg on %s, %g%% bootstrap interval", spec.study,
             describe(space.pruner), "the full dev sets" if not space.objective["dev_limit"]
             else f"{space.objective['dev_limit']} dev rows per task", 100 * space.objective["ci"])
    storage = make_storage(spec)
    with storage_errors(spec):
        # Created once here, before any worker starts: concurrent creation of a new SQLite file fails.
        study = optuna.create_study(study_name=spec.study, storage=storage, direction="maximize",
                                    pruner=make_pruner(space), load_if_exists=True)
        base = spec.base(space)
        if "base" not in study.user_attrs:
            study.set_user_attr("base", base)
        elif study.user_attrs["base"] != base:
            log.warning("study %s was started with %s; continuing it with %s",
                        spec.study, study.user_attrs["base"], base)
        remaining = spec.trials - finished_trials(study)
    if remaining <= 0:
        log.info("study %s already has %d finished trials (--trials %d)",
                 spec.study, spec.trials - remaining, spec.trials)
    elif spec.workers == 1 or remaining == 1:
        run_worker(dataclasses.replace(spec, workers=1), 0, remaining)
    else:  # no more workers than trials left: each runs its share, StopAtTarget evens out the rest
        count = min(spec.workers, remaining)
        _spawn_workers(spec, count, math.ceil(remaining / count))
    with storage_errors(spec):
        study = optuna.load_study(study_name=spec.study, storage=storage)
        done = finished_trials(study)
        if done < spec.trials:
            log.warning("study %s has %d of %d finished trials; rerun the same command to continue",
                        spec.study, done, spec.trials)
        return write_reports(study, spec)


def export_wandb(args) -> str:
    """`--export-wandb FILE`: the W&B sweep file of the search space (sweeps/wandb_export.py)."""
    from sweeps.wandb_export import export_wandb as write

    path = write(SweepSpec.from_args(args).load_space(), args.export_wandb, args.method)
    log.info("wrote %s (W&B %s sweep of %s)", path, args.method, args.space or DEFAULT_SPACE)
    return path


def report_only(args) -> dict:
    """Write reports/sweeps/<study>/ again from the storage alone (no trial runs): the study's stored
    base (params, profile, overrides, space, pruner, objective) wins over the command line's."""
    import optuna

    from sweeps.optuna_report import write_reports

    spec = SweepSpec.from_args(args)
    if not spec.storage and not (STUDIES_DIR / f"{spec.study}.db").exists():
        raise ConfigError(f"{STUDIES_DIR / (spec.study + '.db')}: no study storage; name it with --storage URL")
    storage = make_storage(spec)
    with storage_errors(spec):
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if spec.study not in names:
            raise ConfigError(f"{redact(spec.storage_url)}: no study '{spec.study}' "
                              f"(it holds {', '.join(names) or 'none'})")
        study = optuna.load_study(study_name=spec.study, storage=storage)
        base = study.user_attrs.get("base") or {}
        stored = {k: base[k] for k in ("params", "profile", "base_experiment", "overrides", "space") if k in base}
        return write_reports(study, dataclasses.replace(spec, **stored))


def _worker_main() -> int:
    """Entry of a worker process started by run_sweep (`python -m sweeps.optuna_sweep N`,
    spec in $MINBERT_SWEEP_SPEC)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if SPEC_ENV not in os.environ:
        log.error("sweeps.optuna_sweep is started by `python -m pipeline sweep --workers N`, not by hand")
        return 2
    payload: dict[str, Any] = json.loads(os.environ[SPEC_ENV])
    worker, budget = payload.pop("worker"), payload.pop("budget")
    try:
        run_worker(SweepSpec(**payload), worker, budget)
    except PipelineError as err:
        log.error("worker %d: %s", worker, err)
        return 2
    except KeyboardInterrupt:
        log.error("worker %d: interrupted", worker)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
