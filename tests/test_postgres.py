"""A real PostgreSQL server as the Optuna storage: two workers share one study over postgresql://.

The fixture finds the Debian server binaries (/usr/lib/postgresql/*/bin), installing the
`postgresql` package when they are absent and we are root; it starts a throwaway server in a
temp dir on a free 127.0.0.1 port and stops it afterwards.
"""
from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import PARAMS, micro_overrides
from test_sweeps import FAST_SPACE

pytestmark = pytest.mark.slow


def _server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _install() -> str:
    """apt-get the server; returns why it could not, or ''."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    for cmd in (install, ["apt-get", "update", "-qq"], install):  # a stale package list needs an update first
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if cmd is install and result.returncode == 0:
            return ""
    return (result.stderr or result.stdout).strip()[-300:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _server_bin()
    if bindir is None:
        why = _install()
        bindir = _server_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries not found and not installable "
                        f"({why or 'no initdb after install'})")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="minbert-pg-"))  # not under pytest's 0700 tmp: the server user must enter it
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*cmd: str) -> None:
        result = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{cmd[0]} failed: {result.stderr or result.stdout}"

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start",
        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(postgres_url, tmp_path, tiny_backbone, micro_data, prepared):
    import optuna

    from pipeline.tracking import load_records
    from sweeps.optuna_sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text(FAST_SPACE)
    args = argparse.Namespace(params=str(PARAMS), profile="cpu", study="pg", storage=postgres_url, trials=2, workers=2,
                              overrides=micro_overrides(tmp_path, tiny_backbone, micro_data, prepared),
                              base_experiment=None, space=str(space), reports_dir=str(tmp_path / "reports"))
    summary = run_sweep(args)
    trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) == 2 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # one trial from each worker process
    records = load_records(tmp_path / "runs" / "sweeps" / "pg")
    assert sorted(r["sweep"]["trial"] for r in records) == [0, 1]
    assert all(r["sweep"]["storage"] == postgres_url for r in records)
    assert summary["best_trial"] in (0, 1) and (tmp_path / "reports" / "pg" / "best_params.yaml").exists()
