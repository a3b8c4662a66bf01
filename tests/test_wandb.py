"""Weights & Biases: what a tracked run logs and that it always finishes, an offline run's files,
and the W&B sweep YAMLs, expanded by W&B's own sweep engine, accepted by the entry point."""
from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS, ROOT, micro_overrides

STEP_KEYS = {"loss_sst", "loss_para", "loss_sts"}


class FakeRun:
    """Stands in for a wandb Run: records what the tracker sends."""

    def __init__(self, **init_kwargs):
        self.init_kwargs, self.logged, self.finished = init_kwargs, [], []
        self.summary, self.config = {}, FakeConfig()

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    runs = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "run", None)
    return runs


def test_tracked_run_logs_config_and_metrics_with_metrics_json_keys(make_cfg, tmp_path, fake_wandb):
    from pipeline.stages import run_evaluate
    from pipeline.train import train

    cfg = make_cfg("tracking.wandb=true")
    train(cfg, run_dir=tmp_path / "run")
    metrics = run_evaluate(cfg, run_dir=tmp_path / "run")
    (run,) = fake_wandb
    assert run.init_kwargs["config"] == cfg.to_dict() and run.init_kwargs["mode"] == "offline"
    steps = [v for _, v in run.logged if "loss_sst" in v]
    epochs = [v for _, v in run.logged if "avg" in v]
    assert steps and all(STEP_KEYS <= set(v) for v in steps)
    assert len(epochs) == cfg.train.epochs
    assert all(set(v) == {k for k, x in metrics.items() if isinstance(x, float)} for v in epochs)
    assert [s for s, _ in run.logged] == sorted(s for s, _ in run.logged)  # W&B needs non-decreasing steps
    assert run.summary["avg"] == max(v["avg"] for v in epochs) and run.finished == [0]


def test_tracked_run_finishes_when_training_fails(make_cfg, tmp_path, fake_wandb):
    from pipeline import io as pio
    from pipeline.train import train

    def boom(epoch, scores):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        train(make_cfg("tracking.wandb=true"), run_dir=tmp_path / "run", on_epoch_end=boom)
    (run,) = fake_wandb
    assert run.finished == [1]
    record = pio.read_json(tmp_path / "run" / "record.json")
    assert record["status"] == "failed" and "disk on fire" in record["error"]


def test_active_run_is_reused_and_left_to_its_owner(make_cfg, tmp_path, fake_wandb, monkeypatch):
    import wandb

    from pipeline.tracking import WandbTracker

    owner = FakeRun()
    monkeypatch.setattr(wandb, "run", owner)
    cfg = make_cfg("tracking.wandb=true")
    tracker = WandbTracker(cfg, tmp_path, enabled=True)
    tracker.log({"avg": 0.5}, step=3)
    tracker.finish(exit_code=0)
    assert not fake_wandb and owner.logged == [(3, {"avg": 0.5})]
    assert owner.config["train"] == cfg.to_dict()["train"] and owner.finished == []


def test_mode_is_offline_without_a_key(tmp_path, monkeypatch):
    from pipeline.tracking import wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "offline"  # no netrc at all
    netrc.write_text("machine example.org login me password x\n")
    assert wandb_mode() == "offline"
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")  # what `wandb login` writes
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_mode() == "online"


def test_disabled_mode_logs_nothing(make_cfg, tmp_path, monkeypatch):
    from pipeline.tracking import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = WandbTracker(make_cfg("tracking.wandb=true"), tmp_path, enabled=True)
    tracker.log({"avg": 1.0})
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_offline_run_without_api_key_writes_its_files(make_cfg, tmp_path, monkeypatch):
    import wandb

    from pipeline.train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)  # no mode, no key, no login: offline by itself
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no user settings either
    train(make_cfg("tracking.wandb=true"), run_dir=tmp_path / "run")
    assert wandb.run is None  # finished
    (data,) = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    keys = (*STEP_KEYS, "sst_acc", "avg", "gn_alpha")  # step and epoch metrics, and the config
    # W&B's service process may still be writing the file when finish() returns on a loaded machine.
    deadline = time.monotonic() + 60
    while not all(k.encode() in data.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    blob = data.read_bytes()
    for key in keys:
        assert key.encode() in blob, key


# ------------------------------------------------------------------ W&B sweep YAMLs and entry point


@pytest.fixture(scope="session")
def sweep_engine():
    """W&B's sweep engine (PyPI `sweeps`), kept beside the venv and loaded under another name:
    its top-level package `sweeps` would shadow this project's, and its metadata must not pull numpy<2."""
    target = Path(sys.prefix) / "wandb-sweeps"
    init = target / "sweeps" / "__init__.py"
    if not init.exists():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                 "--target", str(target), "sweeps==0.2.0"], capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not init.exists():
            pytest.skip(f"W&B sweep engine (PyPI sweeps==0.2.0) not installable: {result.stderr.strip()[-300:]}")
    spec = importlib.util.spec_from_file_location("wandb_sweeps", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["wandb_sweeps"] = module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it still speaks pydantic v1 config names
        spec.loader.exec_module(module)
    return module


def generated_runs(engine, config: dict) -> list[dict]:
    """Every run of a grid, or a few of a Bayesian sweep fed made-up results, as plain settings."""
    runs = []
    for i in range(200 if config["method"] == "grid" else 6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = engine.next_run(config, runs, validate=True)
        if run is None:
            break
        run.state = engine.RunState.finished
        run.summary_metrics = {config["metric"]["name"]: 0.3 + 0.01 * ((i * 7) % 5)}
        runs.append(run)
    return [{k: v["value"] for k, v in r.config.items()} for r in runs]


def sweep_files() -> list[Path]:
    return sorted((ROOT / "sweeps").glob("wandb_*.yaml"))


def test_sweep_yamls_cover_the_papers_ablations():
    rows = list(csv.DictReader(open(ROOT / "reports" / "paper_results.csv")))
    grid = yaml.safe_load((ROOT / "sweeps" / "wandb_grid.yaml").read_text())
    as_set = lambda text: frozenset(e for e in text.split("+") if e and e != "baseline")
    assert {as_set(v) for v in grid["parameters"]["extensions"]["values"]} == \
           {as_set(r["extensions"]) for r in rows if r["table"] == "2"}
    alpha = yaml.safe_load((ROOT / "sweeps" / "wandb_gn_alpha.yaml").read_text())
    table4 = [r for r in rows if r["table"] == "4"]
    assert sorted(alpha["parameters"]["train.gn_alpha"]["values"]) == sorted(float(r["gn_alpha"]) for r in table4)
    assert {as_set(alpha["parameters"]["extensions"]["value"])} == {as_set(r["extensions"]) for r in table4}
    assert {p.name for p in sweep_files()} >= {"wandb_grid.yaml", "wandb_bayes.yaml"}


@pytest.mark.parametrize("name", ["wandb_grid.yaml", "wandb_gn_alpha.yaml", "wandb_bayes.yaml"])
def test_sweep_yaml_runs_are_accepted_by_the_entry_point(name, sweep_engine, tmp_path, tiny_backbone, micro_data,
                                                         prepared):
    from sweeps.wandb_entry import run_config, split_settings

    config = yaml.safe_load((ROOT / "sweeps" / name).read_text())
    sweep_engine.SweepConfig(config)  # W&B's schema validation
    assert config["command"][2:4] == ["-m", "sweeps.wandb_entry"] and config["metric"]["name"] == "avg"
    command = config["command"]  # the files generated from the search space pass it to the entry point
    space = str(ROOT / command[command.index("--space") + 1]) if "--space" in command else None
    runs = generated_runs(sweep_engine, config)
    if config["method"] == "grid":  # every combination, once
        assert len(runs) == math.prod(len(p.get("values", [None])) for p in config["parameters"].values())
    assert len({tuple(sorted(r.items())) for r in runs}) == len(runs) >= 2
    micro = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared)
    for settings in runs:
        cfg, dropped = run_config(settings, PARAMS, "cpu", micro, space=space)
        for key, value in settings.items():
            if "." in key and not key.startswith("ext.") and key not in dropped:
                section, field = key.split(".")
                assert getattr(getattr(cfg, section), field) == pytest.approx(value), key
        ext = split_settings(settings)[2]  # `extensions` and ext.<name> switches alike
        assert (cfg.model.heads == "relu") == ("relu" in ext) and (cfg.model.sts_head == "cos") == ("cos" in ext)
        assert (cfg.train.schedule == "loop") == ("loop" in ext)
        assert (cfg.model.init_from == cfg.mlm.output_dir) == ("mlm" in ext and "ext.mlm" not in dropped)
        if "train.balancer" not in settings:
            assert cfg.train.balancer == ("gradnorm" if "gn" in ext else "pcgrad" if "pcg" in ext else "sum")


def test_entry_point_applies_the_spaces_conditions(tmp_path, tiny_backbone, micro_data, prepared):
    from pipeline import io as pio
    from sweeps.wandb_entry import main

    space = tmp_path / "space.yaml"
    space.write_text("search_space:\n  extensions: [relu]\n  train.balancer: [sum, gradnorm]\n"
                     "  train.gn_alpha: {low: 0.0, high: 3.0, when: {train.balancer: gradnorm}}\n")
    micro = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared)
    argv = ["ext.relu=true", "train.balancer=sum", "train.gn_alpha=2.5", "--space", str(space),
            "--params", str(PARAMS), "--profile", "cpu", "--no-evaluate"]
    assert main(argv + [f for o in micro for f in ("-S", o)]) == 0
    (run_dir,) = list((tmp_path / "runs" / "wandb" / "no-sweep").iterdir())
    record = pio.read_json(run_dir / "record.json")
    assert record["wandb"]["inactive"] == ["train.gn_alpha"]  # sampled by W&B, dropped: the balancer is sum
    c = record["config"]
    assert (c["model"]["heads"], c["train"]["balancer"], c["train"]["gn_alpha"]) == ("relu", "sum", 1.0)


def test_entry_point_trains_and_evaluates_a_sweep_run(tmp_path, tiny_backbone, micro_data, prepared):
    from pipeline import io as pio
    from sweeps.wandb_entry import main

    micro = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared)
    argv = ["extensions=cos+relu+pcg", "train.lr=0.002", "--params", str(PARAMS), "--profile", "cpu"]
    assert main(argv + [f for o in micro for f in ("-S", o)]) == 0
    (run_dir,) = list((tmp_path / "runs" / "wandb" / "no-sweep").iterdir())
    record, metrics = pio.read_json(run_dir / "record.json"), pio.read_json(run_dir / "metrics.json")
    assert record["origin"] == "wandb" and record["status"] == "completed"
    assert record["wandb"]["params"] == {"extensions": "cos+relu+pcg", "train.lr": 0.002}
    c = record["config"]
    chosen = (c["model"]["heads"], c["model"]["sts_head"], c["train"]["balancer"], c["train"]["lr"])
    assert chosen == ("relu", "cos", "pcgrad", 0.002)
    assert isinstance(metrics["avg"], float)


def test_entry_point_bad_parameter_is_one_line_error(tmp_path, tiny_backbone, micro_data, prepared, caplog):
    from sweeps.wandb_entry import main

    micro = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared)
    sets = [f for o in micro for f in ("-S", o)]
    assert main(["train.nope=1", "--params", str(PARAMS), "--profile", "cpu", *sets]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "train.nope" in errors[0] and "\n" not in errors[0]
    assert not list((tmp_path / "runs").glob("**/record.json"))
