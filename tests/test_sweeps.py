"""Optuna sweeps on the micro config: the search space, a 4-trial study on 2 workers that resumes,
a killed worker's trial failed and retried, best params that `dvc exp run -S` applies, and a
locked storage failing in one line. (The space file's every key: tests/test_sweep_space.py; pruners:
test_sweep_pruners.py; the study report and expected max: test_sweep_report.py.)"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS, ROOT, micro_overrides

# Quick balancers only (the default space also holds solver-backed torchjd aggregators);
# lr kept where the micro model does not diverge.
FAST_SPACE = """
sampler: {seed: 7, n_startup_trials: 2}
pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
objective: {n_boot: 200}
search_space:
  extensions: [relu, cos, loop, mlm]
  train.balancer: [sum, gradnorm, pcgrad, upgrad]
  train.gn_alpha: {low: 0.0, high: 3.0, when: {train.balancer: gradnorm}}
  train.batch_size: [4, 8]
  train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
  model.dropout: {low: 0.0, high: 0.5}
"""


@pytest.fixture
def micro(tmp_path, tiny_backbone, micro_data, prepared) -> list[str]:
    return micro_overrides(tmp_path, tiny_backbone, micro_data, prepared)


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(FAST_SPACE)
    return path


def sweep_args(tmp_path: Path, micro: list[str], space: Path, **kw) -> argparse.Namespace:
    args = dict(params=str(PARAMS), profile="cpu", overrides=list(micro), study="micro",
                storage=f"sqlite:///{tmp_path / 'micro.db'}", trials=4, workers=1, base_experiment=None,
                space=str(space), reports_dir=str(tmp_path / "reports"), heartbeat_interval=1, grace_period=3)
    args.update(kw)
    return argparse.Namespace(**args)


def cli_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--params", args.params, "--profile", args.profile, "--study", args.study, "--storage", args.storage,
             "--trials", str(args.trials), "--workers", str(args.workers), "--space", args.space,
             "--reports-dir", args.reports_dir, "--heartbeat-interval", str(args.heartbeat_interval),
             "--grace-period", str(args.grace_period)]
    return flags + [f for o in args.overrides for f in ("-S", o)]


# ------------------------------------------------------------------ search space (fast)


def compose_cpu(extra: dict):
    """The cpu profile's config with overrides: what a sweep's space is checked against."""
    from pipeline.config import load_config

    return load_config(PARAMS, profile="cpu", overrides=extra)


def test_default_space_covers_every_switch_and_balancer(make_cfg):
    import optuna

    from pipeline.balancers import known_balancers
    from sweeps.space import DEFAULT_SPACE, load_space, suggest

    space = load_space(DEFAULT_SPACE, compose_cpu)
    assert set(space.switches) == {"relu", "cos", "loop", "mlm"}
    by_key = {p.key: p for p in space.params}
    assert by_key["train.balancer"].choices == known_balancers()
    assert by_key["train.lr"].log and by_key["train.gn_alpha"].when == {"train.balancer": ["gradnorm"]}

    gn = {"ext.relu": True, "ext.cos": False, "ext.loop": True, "ext.mlm": True, "train.balancer": "gradnorm",
          "train.gn_alpha": 1.5, "train.batch_size": 16, "train.lr": 1e-4, "model.dropout": 0.2,
          "model.pooling": "mean", "model.para_head": "cross", "model.pair_features": "sbert", "train.head_lr": 1e-3,
          "train.lr_schedule": "linear", "train.warmup_ratio": 0.1, "train.epochs": 4}
    chosen = suggest(optuna.trial.FixedTrial(gn), space, mlm_dir="models/mlm-x")
    assert chosen["model.heads"] == "relu" and chosen["model.sts_head"] == "concat"
    assert chosen["train.schedule"] == "loop" and chosen["model.init_from"] == "models/mlm-x"
    assert chosen["train.gn_alpha"] == 1.5 and chosen["model.freeze_layers"] == 5  # fixed in the file
    assert "model.cos_target" not in chosen  # its condition (the Cos head) does not hold
    cfg = make_cfg(*(f"{k}={v}" for k, v in chosen.items()))
    assert (cfg.model.heads, cfg.train.balancer, cfg.train.gn_alpha, cfg.train.lr) == ("relu", "gradnorm", 1.5, 1e-4)

    plain = {k: v for k, v in gn.items() if k not in ("ext.mlm", "train.gn_alpha")} | {"train.balancer": "upgrad"}
    chosen = suggest(optuna.trial.FixedTrial(plain), space, mlm_dir=None)  # no MLM folder: no MLM switch
    assert "model.init_from" not in chosen and "train.gn_alpha" not in chosen


def test_sampler_is_seeded_per_worker_and_per_resume(space_file):
    import optuna

    from sweeps.optuna_sweep import SweepSpec, make_sampler
    from sweeps.space import load_space, suggest

    space = load_space(space_file, compose_cpu)
    spec = SweepSpec()

    def first_params(worker: int, existing: int) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(space, spec, worker, existing))
        return suggest(study.ask(), space, None)

    assert first_params(0, 0) == first_params(0, 0)  # reproducible
    assert first_params(1, 0) != first_params(0, 0)  # two workers do not start on the same point
    assert first_params(0, 4) != first_params(0, 0)  # a resumed study does not replay its first trials


def test_bad_storage_options_and_data_fail_before_any_trial(tmp_path, micro, space_file):
    from pipeline.errors import ConfigError, PipelineError
    from sweeps.optuna_sweep import run_sweep

    with pytest.raises(ConfigError, match="--storage"):
        run_sweep(sweep_args(tmp_path, micro, space_file, storage="redis://localhost/0"))
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(sweep_args(tmp_path, micro, space_file, workers=0))
    with pytest.raises(ConfigError, match="train.nope"):
        run_sweep(sweep_args(tmp_path, micro + ["train.nope=1"], space_file))
    with pytest.raises(PipelineError, match="pipeline prepare"):
        run_sweep(sweep_args(tmp_path, micro + [f"data.prepared_dir={tmp_path / 'unprepared'}"], space_file))
    assert not (tmp_path / "micro.db").exists()


def test_locked_storage_fails_in_one_line(tmp_path, micro, space_file, caplog):
    from pipeline.cli import main

    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, never letting go
    try:
        args = sweep_args(tmp_path, micro, space_file, storage=f"sqlite:///{db}")
        t0 = time.time()
        rc = main(["sweep", *cli_flags(args), "--lock-timeout", "1"])
        elapsed = time.time() - t0
    finally:
        holder.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert rc == 2 and elapsed < 60
    assert len(errors) == 1 and "locked" in errors[0] and str(db) in errors[0] and "\n" not in errors[0]


def test_full_disk_is_one_line_error():
    import errno

    import sqlalchemy.exc

    from pipeline.errors import PipelineError
    from sweeps.optuna_sweep import SweepSpec
    from sweeps.storage import storage_errors

    spec = SweepSpec(storage="postgresql://me:secret@db.example/optuna")
    full_db = sqlalchemy.exc.OperationalError("INSERT ...", {},
                                              Exception("could not extend file: disk is full\nDETAIL: ..."))
    full_disk = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoint")
    for raised, expected in ((full_disk, "/runs/x/checkpoint"), (full_db, "postgresql://me:***@db.example/optuna")):
        with pytest.raises(PipelineError) as err:
            with storage_errors(spec):
                raise raised
        assert "disk full" in str(err.value) and expected in str(err.value) and "secret" not in str(err.value)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------ studies (subprocess workers)


@pytest.mark.slow
def test_two_workers_run_four_trials_then_the_study_resumes(tmp_path, micro, space_file):
    import optuna
    from dvc.utils.hydra import apply_overrides

    from pipeline.config import load_config
    from pipeline.tracking import load_records
    from sweeps.optuna_sweep import run_sweep

    args = sweep_args(tmp_path, micro, space_file, workers=2, trials=4)
    summary = run_sweep(args)
    study = optuna.load_study(study_name="micro", storage=args.storage)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials

    records = {r["sweep"]["trial"]: r for r in load_records(tmp_path / "runs" / "sweeps" / "micro")}
    assert sorted(records) == [t.number for t in trials]
    for t in trials:
        rec = records[t.number]
        assert rec["origin"] == "optuna"
        assert rec["status"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t.state.name]
        assert rec["sweep"]["params"] == t.params
        assert t.intermediate_values == {h["epoch"]: h["avg"] for h in rec["history"]}  # every epoch reported
        if t.state.name == "COMPLETE":  # the objective: the evaluate step's full-dev avg, with its interval
            metrics = yaml.safe_load((Path(rec["run_dir"]) / "metrics.json").read_text())
            assert t.value == pytest.approx(metrics["avg"]) == pytest.approx(rec["sweep"]["objective"]["avg"])
            assert t.user_attrs["avg_lo"] < t.user_attrs["avg_hi"]

    out = tmp_path / "reports" / "micro"
    best = study.best_trial
    assert summary["best_trial"] == best.number
    assert yaml.safe_load((out / "best_params.yaml").read_text()) == best.user_attrs["overrides"]
    for name in ("history", "intermediate_values", "expected_max"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "dvc exp run" in (out / "SUMMARY.md").read_text()

    # The written `dvc exp run -S ...` line, applied by DVC's own parser, yields the best trial's config.
    line = next(x for x in (out / "dvc_exp_run.txt").read_text().splitlines() if x.startswith("dvc exp run"))
    words = shlex.split(line)
    set_args = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    params = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params)
    apply_overrides(params, set_args)
    cfg = load_config(params, experiment=summary["experiment"], profile="cpu")
    for key, value in best.user_attrs["overrides"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value), key
    assert (load_config(params, experiment="baseline", profile="cpu")
            == load_config(PARAMS, experiment="baseline", profile="cpu"))
    groups = yaml.safe_load(params.read_text()).get("train_groups")
    if groups is not None:  # dvc.yaml trains what these lists name
        assert sum(summary["experiment"] in (names or []) for names in groups.values()) == 1

    # The same study name resumes: one more trial to reach 5, numbered on, on a point not tried before.
    run_sweep(sweep_args(tmp_path, micro, space_file, workers=1, trials=5))
    trials = optuna.load_study(study_name="micro", storage=args.storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert trials[4].state.name in ("COMPLETE", "PRUNED") and all(trials[4].params != t.params for t in trials[:4])


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried_from_its_checkpoint(tmp_path, micro, space_file):
    import optuna

    from pipeline import io as pio
    from sweeps.optuna_sweep import run_sweep

    args = sweep_args(tmp_path, micro, space_file, study="hb", trials=1)
    # A worker that would train for long: killed once its first epoch is checkpointed.
    slow = argparse.Namespace(**{**vars(args), "overrides": micro + ["train.epochs=500"]})
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", *cli_flags(slow)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    state = tmp_path / "runs" / "sweeps" / "hb" / "trial-0" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert alive and state.exists(), (tmp_path / "worker.log").read_text()[-2000:]
    killed = optuna.load_study(study_name="hb", storage=args.storage).get_trials(deepcopy=False)
    assert [t.state.name for t in killed] == ["RUNNING"]  # what a dead worker leaves behind

    time.sleep(args.grace_period + 1)  # its heartbeat goes stale
    run_sweep(args)  # another worker, with the normal (short) training
    trials = optuna.load_study(study_name="hb", storage=args.storage).get_trials(deepcopy=False)
    assert trials[0].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == trials[0].params

    runs = tmp_path / "runs" / "sweeps" / "hb"
    dead = pio.read_json(runs / "trial-0" / "record.json")
    again = pio.read_json(runs / f"trial-{retried[0].number}" / "record.json")
    assert dead["status"] == "failed" and "WorkerLost" in dead["error"]
    assert again["status"] == "completed" and again["sweep"]["retry_of"] == 0
    assert again["history"][0] == dead["history"][0]  # epoch 1 resumed from the checkpoint, not retrained
