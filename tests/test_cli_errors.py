"""Every subcommand's bad inputs through the CLI: exit code 2, one error line naming the bad
parameter, file or folder, no traceback, nothing written; each is checked before any model or
data is loaded (a stand-in weights file that cannot load proves the order). Also the listings
that make the parameters findable: `params`, `experiments`, a bare `-e`."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline import cli
from pipeline.config import SECTION_CLASSES

PARAMS_TEXT = """\
profile: tiny
data: {prepared_dir: prepared, prefix_dir: prefix, cache_dir: raw}
tracking: {runs_dir: runs}
mlm: {output_dir: mlm}
profiles:
  tiny: {data: {}, model: {}, train: {epochs: 3}, eval: {}, mlm: {}}
seeds: [7]
experiments:
  base: {extensions: [], set: {}}
  relu_mlm: {extensions: [relu, mlm], set: {train: {lr: 0.001}}}
train_groups: {backbone: [base], mlm: [relu_mlm]}
"""
UNWRITABLE = "/proc/no-such-dir/out"  # /proc takes no new entries, not even for root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with params.yaml (and a data folder), made the working directory."""
    (tmp_path / "params.yaml").write_text(PARAMS_TEXT)
    (tmp_path / "data").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _prepared(root: Path) -> None:
    (root / "prepared").mkdir()
    (root / "prepared" / "report.json").write_text("{}")


def _run_with_weights(root: Path) -> Path:
    """A run folder whose best.safetensors is no safetensors file: any attempt to load it fails."""
    run = root / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"not weights")
    return run


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def _main(argv: list[str], caplog, capsys) -> tuple[int, list[str], str]:
    """cli.main in-process: its exit code, its ERROR log lines, what it printed to stderr."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    code = cli.main(argv)  # an uncaught exception here would be a traceback at the command line
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR], err


SETUP = {"prepared": _prepared, "run": _run_with_weights, "both": lambda r: (_prepared(r), _run_with_weights(r))}

# (argv, files the case needs, the error line's expected text); paths relative to the work folder
CASES = {
    # prepare
    "prepare: data folder missing": (["prepare", "-S", "data.data_dir=nowhere"], None,
                                     "data folder nowhere does not exist (set by data.data_dir"),
    "prepare: output not creatable": (["prepare", "-S", "data.data_dir=data", "-S", f"data.prepared_dir={UNWRITABLE}"],
                                      None, f"data.prepared_dir {UNWRITABLE}: cannot be created in /proc ("),
    "prepare: output under a file": (["prepare", "-S", "data.data_dir=data", "-S", "data.prepared_dir=a-file/p"],
                                     None, "data.prepared_dir a-file/p: a-file is not a folder"),
    "prepare: download folder not creatable": (["prepare", "-S", f"data.cache_dir={UNWRITABLE}"], None,
                                               f"data.cache_dir {UNWRITABLE}: cannot be created in /proc"),
    "prepare: bad value": (["prepare", "-S", "data.max_length=4"], None, "data.max_length=4 must be at least 8"),
    "prepare: unknown profile": (["prepare", "--profile", "gpu9"], None, "unknown profile 'gpu9'"),
    # cache
    "cache: unprepared": (["cache", "-S", "model.freeze_layers=2"], None,
                          "prepared/report.json: prepared data missing; run `python -m pipeline prepare` first"),
    "cache: output not creatable": (["cache", "-S", f"data.prefix_dir={UNWRITABLE}"], None,
                                    f"data.prefix_dir {UNWRITABLE}: cannot be created in /proc"),
    "cache: negative layers": (["cache", "-S", "model.freeze_layers=-1"], None, "model.freeze_layers=-1 must be >= 0"),
    # pretrain-mlm
    "pretrain-mlm: unprepared": (["pretrain-mlm"], None, "prepared/report.json: prepared data missing"),
    "pretrain-mlm: output not creatable": (["pretrain-mlm", "-S", f"mlm.output_dir={UNWRITABLE}"], "prepared",
                                           f"mlm.output_dir {UNWRITABLE}: cannot be created in /proc"),
    "pretrain-mlm: bad value": (["pretrain-mlm", "-S", "mlm.mask_prob=1.5"], None, "mlm.mask_prob=1.5 must lie in"),
    # train
    "train: unknown experiment": (["train", "-e", "nope"], None, "unknown experiment 'nope'"),
    "train: unknown key": (["train", "-S", "train.nokey=1"], None, "unknown parameter 'train.nokey'; train has"),
    "train: unknown section": (["train", "-S", "nosection.x=1"], None, "unknown parameter 'nosection.x'"),
    "train: not a number": (["train", "-S", "train.lr=fast"], None, "train.lr='fast' must be a number"),
    "train: not a choice": (["train", "-S", "model.heads=deep"], None, "model.heads='deep' is not one of linear, relu"),
    "train: override without =": (["train", "-S", "train.lr"], None, "override 'train.lr' must look like"),
    "train: params file missing": (["train", "--params", "missing.yaml"], None, "missing.yaml: params file not found"),
    "train: unprepared": (["train", "-e", "base"], None, "prepared/report.json: prepared data missing"),
    "train: run folder not creatable": (["train", "-e", "base", "--run-dir", UNWRITABLE], "prepared",
                                        f"--run-dir {UNWRITABLE}: cannot be created in /proc ("),
    "train: run folder under a file": (["train", "-e", "base", "--run-dir", "a-file/run"], "prepared",
                                       "--run-dir a-file/run: a-file is not a folder"),
    "train: run folder is a file": (["train", "-e", "base", "--run-dir", "a-file"], "prepared",
                                    "--run-dir a-file: it is not a folder"),
    "train: runs_dir not creatable": (["train", "-e", "base", "-S", f"tracking.runs_dir={UNWRITABLE}"], "prepared",
                                      f"run folder (tracking.runs_dir) {UNWRITABLE}/"),
    # evaluate: the run folder, then the prepared data, before the weights are read
    "evaluate: no trained run": (["evaluate", "-e", "base", "--run-dir", "run"], "prepared",
                                 "run/best.safetensors: no trained model; run the train stage first"),
    "evaluate: no trained run (default folder)": (["evaluate", "-e", "base"], "prepared",
                                                  "/base/s11711/best.safetensors: no trained model"),
    "evaluate: unprepared": (["evaluate", "-e", "base", "--run-dir", "run"], "run",
                             "prepared/report.json: prepared data missing"),
    "evaluate: unknown experiment": (["evaluate", "-e", "nope", "--run-dir", "run"], "both",
                                     "unknown experiment 'nope'"),
    # report
    "report: -S refused": (["report", "-S", "train.lr=1"], None, "report takes no -S overrides (got train.lr=1)"),
    "report: output not creatable": (["report", "--out", UNWRITABLE], None,
                                     f"--out {UNWRITABLE}: cannot be created in /proc"),
    "report: params file missing": (["report", "--params", "missing.yaml"], None,
                                    "missing.yaml: params file not found"),
    "report: params file not YAML": (["report", "--params", "a-file"], None, "a-file: expected a mapping"),
    # summary, listings
    "summary: runs folder missing": (["summary", "--runs-dir", "nowhere"], None, "--runs-dir nowhere: no such folder"),
    "params: unknown section": (["params", "trian"], None,
                                "unknown section 'trian'; sections: data, model, train, mlm, eval, tracking"),
    "params: unknown key": (["params", "train.nokey"], None, "unknown parameter 'train.nokey'; train has tasks"),
    "params: params file missing": (["params", "--params", "missing.yaml"], None,
                                    "missing.yaml: params file not found"),
    "params: unknown profile": (["params", "--profile", "gpu9"], None, "unknown profile 'gpu9'"),
    "experiments: params file missing": (["experiments", "--params", "missing.yaml"], None,
                                         "missing.yaml: params file not found"),
    "-e alone: params file missing": (["train", "-e", "--params", "missing.yaml"], None,
                                      "missing.yaml: params file not found"),
    # sweep basics
    "sweep: no trials": (["sweep", "--trials", "0"], "prepared", "--trials=0 must be >= 1"),
    "sweep: unknown base experiment": (["sweep", "--base-experiment", "nope"], "prepared", "unknown experiment 'nope'"),
    "sweep: unprepared": (["sweep"], None, "prepared/report.json: prepared data missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, workdir, caplog, capsys, monkeypatch):
    argv, setup, message = CASES[case]
    # As on a machine without the shared data mirror, and outside make (which exports MINBERT_DATA_DIR).
    monkeypatch.setattr("pipeline.config.SHARED_DATA", workdir / "no-shared-mirror")
    monkeypatch.delenv("MINBERT_DATA_DIR", raising=False)
    if setup:
        SETUP[setup](workdir)
    before = _tree(workdir)
    code, errors, _ = _main(argv, caplog, capsys)
    assert code == 2, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]
    assert _tree(workdir) == before, "a failed command wrote something"


@pytest.mark.parametrize("argv, message", [
    (["trian"], "argument STAGE: invalid choice: 'trian'"),
    ([], "the following arguments are required: STAGE"),
    (["train", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["params", "train", "model"], "unrecognized arguments: model"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("python -m pipeline"), err
    assert "--help" in err  # where to look next


def test_verbose_is_taken_before_and_after_the_subcommand():
    parse = cli.build_parser().parse_args
    assert parse(["-v", "train"]).verbose and parse(["train", "-v"]).verbose and parse(["summary", "--verbose"]).verbose
    assert not parse(["train"]).verbose


def test_verbose_after_the_subcommand_still_one_error_line(workdir, caplog, capsys):
    code, errors, _ = _main(["train", "-v", "-e", "nope"], caplog, capsys)
    assert code == 2 and len(errors) == 1 and "unknown experiment 'nope'" in errors[0]


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/data/locked.csv"), "/data/locked.csv: Permission denied"),
    (OSError(30, "Read-only file system", "/ro/runs/x"), "/ro/runs/x: Read-only file system"),
    (OSError(18, "Invalid cross-device link", "/a/tmp", None, "/b/out"), "/a/tmp -> /b/out: Invalid cross-device link"),
])
def test_oserror_on_a_path_is_one_line(error, line, caplog):
    def action():
        raise error

    caplog.set_level(logging.INFO)
    assert cli.run_guarded(action) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [line]


def test_oserror_without_a_path_keeps_its_traceback():
    def action():
        raise OSError("a bug, not a user's path")

    with pytest.raises(OSError, match="a bug"):
        cli.run_guarded(action)


def test_best_name_matches_the_trainer():
    from pipeline.train import BEST

    assert cli.BEST == BEST


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_command_line_stderr_is_exactly_one_line(workdir):
    """As a user sees it: the issue's cases print one log line on stderr and nothing else."""
    _prepared(workdir)
    before = _tree(workdir)
    for args, message in [(("train", "-e", "base", "--run-dir", UNWRITABLE), f"--run-dir {UNWRITABLE}: cannot be"),
                          (("report", "-S", "train.lr=1"), "report takes no -S overrides")]:
        res = _cli(workdir, *args)
        lines = res.stderr.splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert " ERROR pipeline: " in lines[0] and message in lines[0], lines[0]
        assert res.stdout == ""
    assert _tree(workdir) == before


# ------------------------------------------------------------------ the listings


def test_params_lists_every_key_with_type_default_allowed_and_help(workdir, capsys):
    assert cli.main(["params"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for section, cls in SECTION_CLASSES.items():
        for f in fields(cls):
            line = lines[f"{section}.{f.name}"]  # one line per key when not on a terminal
            assert f.metadata["help"] in line, line
    assert lines["KEY"].split() == ["KEY", "TYPE", "DEFAULT", "VALUE", "ALLOWED", "HELP"]
    assert "linear, relu" in lines["model.heads"] and "finetune, pretrain" in lines["model.mode"]
    assert "gradnorm" in lines["train.balancer"] and "pcgrad" in lines["train.balancer"]
    assert "true, false" in lines["data.strict"]
    # the tiny profile sets train.epochs=3: shown beside the default 25
    assert lines["train.epochs"].split()[1:4] == ["int", "25", "3"]
    assert "params.yaml with profile tiny" in out


def test_params_one_section_or_key(workdir, capsys):
    assert cli.main(["params", "mlm"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.startswith("mlm.")]
    assert keys == [f"mlm.{f.name}" for f in fields(SECTION_CLASSES["mlm"])]
    assert cli.main(["params", "model.mode"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert len(rows) == 1 and "pretrain (backbone frozen" in rows[0]


def test_params_without_a_params_file_lists_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["params", "train"]) == 0
    out = capsys.readouterr().out
    assert "VALUE" not in out.splitlines()[0] and "defaults of pipeline/config.py" in out


@pytest.mark.parametrize("argv", [["train", "-e"], ["evaluate", "-e"], ["experiments"]])
def test_experiments_listed(argv, workdir, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["base"][1:3] == ["-", "-"] and rows["base"][3] == "7"
    assert rows["relu_mlm"][1:5] == ["relu", "mlm", "train.lr=0.001", "7"]
    assert "mlm: model.init_from=" in out  # what each extension stands for
    assert not (workdir / "runs").exists()


def test_help_points_to_the_listings():
    for argv in (["train", "--help"], ["--help"]):
        res = _cli(ROOT, *argv)
        text = " ".join(res.stdout.split())
        assert res.returncode == 0 and "python -m pipeline params [SECTION]` lists every key" in text, res.stdout
        assert "python -m pipeline experiments" in text
    assert "-e alone lists them" in " ".join(_cli(ROOT, "train", "--help").stdout.split())
