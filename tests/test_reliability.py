"""Reliability: a run killed with SIGKILL resumes to the same result, nothing on disk is ever
torn, a non-finite loss fails cleanly, and nothing unpickles a file a user was handed."""
from __future__ import annotations

import ast
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, micro_overrides
from pipeline import cli
from pipeline.train import find_checkpoint, train

EPOCHS, CHECKPOINT_EVERY = 2, 2  # micro data: 5 steps an epoch, so checkpoints mid-epoch and at its end


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_backbone, micro_data, prepared):
    """Overrides shared by every run of this module, so their configs are identical."""
    root = tmp_path_factory.mktemp("reliability")
    return root, micro_overrides(root, tiny_backbone, micro_data, prepared) + [
        f"train.epochs={EPOCHS}", f"train.checkpoint_every={CHECKPOINT_EVERY}"]


def _argv(overrides: list[str], run_dir: Path) -> list[str]:
    return ["train", *[a for o in overrides for a in ("-S", o)], "--run-dir", str(run_dir)]


_REFERENCES: dict[str, Path] = {}


def _reference(base, balancer: str, extra: tuple[str, ...] = ()) -> Path:
    """An uninterrupted in-process run with the same config (computed once per balancer and extra overrides)."""
    key = "-".join([balancer, *[e.replace("=", "_") for e in extra]])
    if key not in _REFERENCES:
        from pipeline.config import load_config

        root, overrides = base
        cfg = load_config(ROOT / "params.yaml", overrides=overrides + [f"train.balancer={balancer}", *extra])
        train(cfg, run_dir=root / f"ref-{key}")
        _REFERENCES[key] = root / f"ref-{key}"
    return _REFERENCES[key]


def _tensors_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{a.name} differs"


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical outcome: history (bar wall time), step log, record metrics, best and final weights,
    optimizer and balancer state."""
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_time_s"} for e in h]
    history, ref_history = (json.loads((d / "history.json").read_text()) for d in (run, ref))
    assert strip(history) == strip(ref_history)
    assert (run / "steps.jsonl").read_text() == (ref / "steps.jsonl").read_text()
    rec, ref_rec = (json.loads((d / "record.json").read_text()) for d in (run, ref))
    assert rec["status"] == "completed" and rec["metrics"] == ref_rec["metrics"]
    _tensors_equal(run / "best.safetensors", ref / "best.safetensors")
    _tensors_equal(run / "checkpoint" / "model.safetensors", ref / "checkpoint" / "model.safetensors")
    st, ref_st = (torch.load(d / "checkpoint" / "trainer.pt", weights_only=True) for d in (run, ref))
    assert "model" not in st  # weights live in model.safetensors only
    for key in ("optimizer", "balancer"):
        mine, theirs = _flatten(st[key]), _flatten(ref_st[key])
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            assert (torch.equal(v, theirs[k]) if isinstance(v, torch.Tensor) else v == theirs[k]), f"{key}.{k} differs"
    assert not list(run.rglob("*.tmp")), "scratch files left behind"


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(obj, (list, tuple)) and not all(isinstance(x, (int, float)) for x in obj):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


# ------------------------------------------------------------------ resume after SIGKILL (real CLI)

# Loaded through PYTHONPATH into the CLI process: after the Nth optimizer step (balancer.after_step)
# it drops a flag file and sleeps, so the test kills it at a known point. The command is unchanged.
STALL_HOOK = '''
import os
if os.environ.get("STALL_AT_STEP"):
    import time
    import pipeline.train as _train
    _make = _train.make_balancer
    def _stalling(*args, **kwargs):
        balancer = _make(*args, **kwargs)
        after, done = balancer.after_step, [0]
        def after_step():
            after()
            done[0] += 1
            if done[0] == int(os.environ["STALL_AT_STEP"]):
                open(os.environ["STALL_FLAG"], "w").close()
                time.sleep(600)
        balancer.after_step = after_step
        return balancer
    _train.make_balancer = _stalling
'''


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("model.freeze_layers=1", "train.precision=bf16")],
                         ids=["full-fp32", "prefix-cache-bf16"])
def test_sigkill_mid_epoch_then_same_command_resumes_bit_identical(base, tmp_path, extra):
    """GradNorm run killed in epoch 2, after a mid-epoch checkpoint and during a later step, then
    started again with the same command (also with the frozen-prefix cache and bf16 autocast)."""
    root, overrides = base
    overrides = overrides + ["train.balancer=gradnorm", *extra]
    ref = _reference(base, "gradnorm", extra)
    per_epoch = json.loads((ref / "history.json").read_text())[0]["steps"]
    stall = per_epoch + 3  # one of the two steps before it is a checkpoint step
    run, flag = tmp_path / "run", tmp_path / "stalled"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(STALL_HOOK)
    cmd = [sys.executable, "-m", "pipeline", *_argv(overrides, run)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hook"), "STALL_AT_STEP": str(stall), "STALL_FLAG": str(flag)}
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        deadline = time.time() + 240
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), f"run never reached step {stall}: {(tmp_path / 'killed.log').read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["step_in_epoch"] > 0  # mid-epoch 2 ...
    assert state["global_step"] == per_epoch + state["step_in_epoch"] < stall  # ... and work after it lost
    assert json.loads((run / "record.json").read_text())["status"] == "running"

    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # the same command
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {run} from its checkpoint at epoch 2 step {state['step_in_epoch'] + 1}" in res.stderr
    assert_same_run(run, ref)
    gn = torch.load(run / "checkpoint" / "trainer.pt", weights_only=True)["balancer"]
    assert gn["initial_losses"] is not None and not torch.equal(gn["weights"], torch.ones(3))  # state was live

    from pipeline.config import load_config
    from pipeline.stages import run_evaluate

    cfg = load_config(ROOT / "params.yaml", overrides=overrides)
    assert run_evaluate(cfg, run) == run_evaluate(cfg, ref)
    assert (run / "metrics.json").read_text() == (ref / "metrics.json").read_text()


def test_resume_refuses_other_parameters_and_extends_epochs(base, tmp_path, caplog, capfd):
    """Same command resumes; a changed lr is refused in one line, touching nothing; more epochs extend
    the run to exactly what a run of that length gives."""
    root, overrides = base
    run = tmp_path / "run"
    assert cli.main(_argv(overrides + ["train.epochs=1"], run)) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO)
    assert cli.main(_argv(overrides + ["train.epochs=1", "train.lr=0.002"], run)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "other parameters (train.lr=0.001->0.002)" in errors[0] and "\n" not in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli.main(_argv(overrides, run)) == 0  # train.epochs=2 now
    assert_same_run(run, _reference(base, "sum"))


# ------------------------------------------------------------------ kills at random and chosen points


def _fork_cli(argv: list[str], hook=None) -> int:
    """The CLI's main() in a forked child (no 5 s of imports per kill); returns the pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 70
        try:
            if hook is not None:
                hook()
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _poll(pid: int, seconds: float) -> int | None:
    """The child's exit code if it ends within `seconds`, else None (it is still running)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    return None


def _kill_after(pid: int, delay: float) -> int:
    code = _poll(pid, delay)
    if code is not None:
        return code
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _wait(pid: int, timeout: float = 180) -> int:
    code = _poll(pid, timeout)
    if code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("child run did not finish")
    return code


def _training_started(pid: int, run: Path, t0: float) -> bool:
    """Wait until the child has written its run record (model built, loop about to start)."""
    record = run / "record.json"
    while not (record.exists() and record.stat().st_mtime >= t0):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.002)
    return True


def assert_every_output_parses(run: Path) -> None:
    """Every file a reader (DVC, a sweep, the report) could pick up is complete; scratch ends in .tmp."""
    if not run.exists():
        return
    for path in run.rglob("*"):
        if path.is_dir() or any(p.name.endswith(".tmp") for p in [path, *path.relative_to(run).parents]):
            continue
        name = path.name
        if name.endswith(".jsonl"):
            [json.loads(line) for line in path.read_text().splitlines()]
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".safetensors"):
            load_file(str(path))
        elif name.endswith(".pt"):
            torch.load(path, weights_only=True)
        else:
            raise AssertionError(f"unexpected output {path}")
    for ckpt in (run / "checkpoint", run / "checkpoint.old"):
        if ckpt.exists():
            assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "trainer.pt", "steps.jsonl", "state.json"}


@pytest.mark.slow
def test_random_kills_leave_parseable_files_and_resume_identically(base, tmp_path):
    """PCGrad (its own RNG) killed at seeded random moments, checked after each kill, then finished."""
    root, overrides = base
    overrides = overrides + ["train.balancer=pcgrad"]
    ref = _reference(base, "pcgrad")
    timing = tmp_path / "timing"
    t0 = time.time()
    pid = _fork_cli(_argv(overrides, timing))
    assert _training_started(pid, timing, t0)
    t_start = time.time()
    assert _wait(pid) == 0
    training = time.time() - t_start
    run, rng, kills = tmp_path / "run", random.Random(7), 0
    for _ in range(10):  # within half a training time of the loop starting: most kills land mid-training
        if kills == 3:
            break
        t0 = time.time()
        pid = _fork_cli(_argv(overrides, run))
        if _training_started(pid, run, t0):
            code = _kill_after(pid, rng.uniform(0.05, 0.5) * training)
            kills += code == -signal.SIGKILL
        else:
            code = _wait(pid)
        assert code in (0, -signal.SIGKILL), f"run failed with exit code {code}"
        assert_every_output_parses(run)
        if code == 0 and kills < 3:  # finished unkilled (a loaded machine): start over for more kills
            shutil.rmtree(run)
    assert kills >= 2, "the runs finished before they could be killed"
    assert _wait(_fork_cli(_argv(overrides, run))) == 0
    assert_same_run(run, ref)


def _die_when(predicate):
    """A child hook: SIGKILL this process the moment predicate(args) holds inside the wrapped call."""
    def wrap(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if predicate("before", name, args):
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if predicate("after", name, args):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(module, name, wrapper)
    return wrap


@pytest.mark.slow
def test_kills_at_chosen_points_resume_identically(base, tmp_path):
    """Killed (1) between writing history.json's temp file and renaming it, (2) right after the last
    checkpoint; each time the files parse, and the finished run equals the uninterrupted one."""
    import pipeline.io
    import pipeline.train

    root, overrides = base
    overrides = overrides + ["train.balancer=pcgrad"]
    run = tmp_path / "run"

    def in_rename_of_history():
        _die_when(lambda when, name, args: when == "before" and Path(args[1]).name == "history.json")(
            pipeline.io.os, "replace")

    def after_last_checkpoint():
        _die_when(lambda when, name, args: when == "after" and args[3].epoch == EPOCHS)(
            pipeline.train, "save_checkpoint")

    assert _wait(_fork_cli(_argv(overrides, run), in_rename_of_history)) == -signal.SIGKILL
    assert list(run.glob(".history.json.*.tmp")) and not (run / "history.json").exists()
    assert_every_output_parses(run)
    assert _wait(_fork_cli(_argv(overrides, run), after_last_checkpoint)) == -signal.SIGKILL
    assert json.loads((run / "checkpoint" / "state.json").read_text())["epoch"] == EPOCHS
    assert not list(run.glob(".*.tmp")), "a restart clears what a killed writer left"
    assert_every_output_parses(run)
    assert _wait(_fork_cli(_argv(overrides, run))) == 0
    assert_same_run(run, _reference(base, "pcgrad"))


def test_atomic_writes_keep_old_file_and_umask(tmp_path):
    from pipeline import io as pio

    target = tmp_path / "metrics.json"
    pio.write_json(target, {"avg": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not owner-only

    def broken(tmp):
        tmp.write_text('{"avg": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pio.write_with(target, broken)
    assert json.loads(target.read_text()) == {"avg": 1} and not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ non-finite loss / weights


@pytest.mark.parametrize("what, message", [
    ("loss", "task sts loss is nan at epoch 1 step 4"),
    ("weights", "became non-finite at epoch 1 step 4"),
])
def test_nonfinite_keeps_last_good_checkpoint_and_cli_fails(base, tmp_path, monkeypatch, caplog, capfd, what, message):
    """NaN at step 4 (a checkpoint step): the step-2 checkpoint stays, loadable; one-line error, exit 2."""
    import pipeline.train
    from pipeline.model import MultitaskBert

    root, overrides = base
    run, saved = tmp_path / "run", []
    real_save = pipeline.train.save_checkpoint

    def recording_save(run_dir, model, optimizer, state, steps, *rest):
        real_save(run_dir, model, optimizer, state, steps, *rest)
        saved.append((state.global_step, {k: v.clone() for k, v in model.state_dict().items()}))

    monkeypatch.setattr(pipeline.train, "save_checkpoint", recording_save)
    calls = {"sts": 0, "step": 0}
    if what == "loss":
        real_loss = MultitaskBert.loss

        def loss(self, task, batch):
            out = real_loss(self, task, batch)
            calls[task] = calls.get(task, 0) + 1
            return out * float("nan") if task == "sts" and calls["sts"] == 4 else out

        monkeypatch.setattr(MultitaskBert, "loss", loss)
    else:
        real_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            calls["step"] += 1
            if calls["step"] == 4:
                with torch.no_grad():
                    self.param_groups[0]["params"][-1].fill_(float("inf"))
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    caplog.set_level(logging.INFO)
    assert cli.main(_argv(overrides, run)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert "Traceback" not in capfd.readouterr().err
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "failed" and message in record["error"]
    assert [s for s, _ in saved] == [2]  # nothing saved at or after the bad step
    ckpt = find_checkpoint(run)
    assert json.loads((ckpt / "state.json").read_text())["global_step"] == 2
    on_disk = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(on_disk[k], v) for k, v in saved[-1][1].items())
    assert all(torch.isfinite(v).all() for v in on_disk.values())
    torch.load(ckpt / "trainer.pt", weights_only=True)
    assert not (run / "best.safetensors").exists()


# ------------------------------------------------------------------ safe loading

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that could unpickle, or saves weights other than as safetensors."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            const = lambda key, kw=kw: isinstance(kw.get(key), ast.Constant) and kw[key].value
            attr = node.func.attr
            if owner == "torch" and attr == "load" and const("weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            elif attr in ("read_pickle", "Unpickler") or (owner in PICKLE_MODULES and attr.startswith("load")):
                found.append(f"{where}: {owner}.{attr}")
            elif attr == "load" and const("allow_pickle") is True:
                found.append(f"{where}: load(allow_pickle=True)")
            elif attr == "save_pretrained" and "safe_serialization" in kw and const("safe_serialization") is not True:
                found.append(f"{where}: save_pretrained without safetensors")
            elif owner == "torch" and attr == "save" and node.args and _holds_weights(node.args[0]):
                found.append(f"{where}: torch.save of model weights ({ast.unparse(node.args[0])[:60]})")
    return found


WEIGHT_OWNERS = ("model", "bert", "backbone", "encoder", "head")


def _holds_weights(arg: ast.expr) -> bool:
    """A model (or its state_dict) passed to torch.save, directly or inside a container."""
    for node in ast.walk(arg):
        target = node.func.value if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                     and node.func.attr == "state_dict") else None
        if target is not None and any(w in ast.unparse(target).lower() for w in WEIGHT_OWNERS):
            return True
    return isinstance(arg, (ast.Name, ast.Attribute)) and any(w in ast.unparse(arg).lower() for w in WEIGHT_OWNERS)


def test_scanner_catches_unsafe_code():
    bad = ("import pickle\nimport torch\nx = torch.load(p)\ny = torch.load(p, weights_only=False)\n"
           "z = pickle.loads(b)\nimport numpy as np\nnp.load(p, allow_pickle=True)\n"
           "torch.save(model.state_dict(), p)\nm.save_pretrained(d, safe_serialization=False)\n"
           "from torch import load\nimport pandas as pd\npd.read_pickle(p)\n")
    flagged = {int(f.split(":")[1]) for f in unsafe_calls(bad)}
    assert flagged == {i for i, line in enumerate(bad.splitlines(), 1)
                       if not line.startswith("import ") or "pickle" in line}
    assert unsafe_calls("torch.save({'opt': opt.state_dict(), 'w': self.bert.state_dict()}, p)\n"
                        "torch.save(model, p)\n")[1:]
    good = ("import torch\nx = torch.load(p, weights_only=True, map_location='cpu')\n"
            "torch.save({'optimizer': optimizer.state_dict(), 'model_step': 3}, p)\n")
    assert unsafe_calls(good) == []


def test_project_never_unpickles_and_saves_weights_as_safetensors():
    files = [p for d in ("pipeline", "sweeps", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    assert any(p.name == "train.py" for p in files)
    problems = [f for p in files for f in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert problems == []
    loads = sum(p.read_text().count("torch.load(") for p in files)
    assert loads >= 1  # the checkpoint's trainer state, checked above to use weights_only=True


def test_lr_schedule_resumes_identically_and_fixes_the_epoch_count(base, tmp_path):
    """A warmed-up, linearly decaying lr with a separate head lr: killed right after a mid-epoch checkpoint,
    the same command ends bit-identical to an uninterrupted run; more epochs are refused (the decay is laid
    out over the run)."""
    import pipeline.train
    from pipeline.config import load_config

    root, overrides = base
    overrides = overrides + ["train.lr_schedule=linear", "train.warmup_ratio=0.3", "train.head_lr=0.01"]
    ref = tmp_path / "ref"
    train(load_config(ROOT / "params.yaml", overrides=overrides), run_dir=ref)
    lrs = [json.loads(line)["lr"] for line in (ref / "steps.jsonl").read_text().splitlines()]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[0] < lrs[peak] and lrs[-1] < lrs[peak]  # warms up, then decays
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))

    run = tmp_path / "run"

    def after_mid_epoch_checkpoint():
        _die_when(lambda when, name, args: when == "after" and args[3].epoch == 1 and args[3].step_in_epoch > 0)(
            pipeline.train, "save_checkpoint")

    assert _wait(_fork_cli(_argv(overrides, run), after_mid_epoch_checkpoint)) == -signal.SIGKILL
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["step_in_epoch"] > 0
    assert _wait(_fork_cli(_argv(overrides, run))) == 0
    assert_same_run(run, ref)
    assert _wait(_fork_cli(_argv(overrides + ["train.epochs=3"], run))) == 2
