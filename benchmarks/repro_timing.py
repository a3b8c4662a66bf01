"""`make repro`, timed: run `dvc repro`, relay its output live, and split the wall time by stage.

    python -m benchmarks.repro_timing [--started T0] [--installed T1] [--install-marker FILE]
                                      [--then CMD] [--out reports/repro_timing.json] -- dvc repro [ARGS]

The Makefile's `repro` target calls it with T0 (when `make repro` started) and T1 (when the
install step ended; `--install-marker .venv/.installed` says whether it ran or was up to date).
Every line dvc and the stage commands print is relayed at once (stdout to stdout, stderr to
stderr) and timestamped on arrival. DVC prints `Running stage '<name>':` before a stage's command;
the stage ends at `Updating lock file 'dvc.lock'` (printed once its outputs are saved, when its lock
entry changed), else at the next stage's line or dvc's exit, so a stage's span includes DVC saving
its outputs and, without the lock-file line, checking the next stage (a stage dvc skips costs only
that check). Stages map to
categories by name: prepare, cache, pretrain-mlm (MLM), train@ / train-mlm@ (training and
evaluation, see below), evaluate@ (evaluation), report; the rest of dvc's wall time (checking
which stages changed, hashing, git/dvc init) is `dvc`, and `--then` (the summary table) is `summary`.

A train stage runs `train --evaluate` in one process; its run record (runs/study/<exp>/s<seed>/record.json)
splits it: `stage_start` until the record opened (imports, model and data loading, the prefix
cache check), `training` = the epochs' train_time_s (the optimizer steps), `evaluation` = the rest
of the record's span (per-epoch selection on the dev sample, checkpoints) plus the final dev
evaluation up to metrics.json, and `dvc` after it (process exit, saving the outputs). A stage
without a matching record counts whole as `training`.

Writes reports/repro_timing.json and .md. A run in which no stage ran records only
`dvc_repro_noop_s`; a failed run is recorded under `last_failed_attempt` and keeps the last good
timing. The exit status is dvc's (or the `--then` command's, if dvc succeeded and it failed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "repro_timing.json"
CATEGORIES = ("install", "prepare", "cache", "mlm", "training", "evaluation", "report", "stage_start", "dvc",
              "summary", "other_stages")

RUNNING = re.compile(r"Running stage '([^']+)'")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
LOCKED = re.compile(r"Updating lock file")


@dataclass
class Event:
    t: float        # time.time() when the line arrived
    line: str
    stream: str = "stdout"


def category(stage: str) -> str:
    """The category of a DVC stage name (matrix stages are `<stage>@<values>`)."""
    base = stage.split("@", 1)[0].lower()
    if base.startswith("prepare"):
        return "prepare"
    if "cache" in base:
        return "cache"
    if base.startswith("pretrain") or base in ("mlm", "pretrain-mlm"):
        return "mlm"
    if base.startswith("train"):
        return "training"
    if base.startswith("eval"):
        return "evaluation"
    if base.startswith("report"):
        return "report"
    return "other_stages"


def stage_spans(events: list[Event], end: float, last_closed: bool = True) -> list[dict]:
    """The stages in dvc's output, in order: name, how (ran, restored, skipped, unfinished), start, end.

    A stage ends at the lock-file update that saves it, else at the next stage's line (DVC logs the
    update only when the lock entry changed), else when dvc exits; `last_closed=False` (dvc failed)
    marks a stage still open then as unfinished.
    """
    spans: list[dict] = []
    open_span = None

    def close(t: float, how: str | None = None) -> None:
        nonlocal open_span
        if open_span is not None:
            open_span["end"] = t
            if how:
                open_span["how"] = how
            open_span = None

    for ev in events:
        if m := (RUNNING.search(ev.line) or RESTORED.search(ev.line)):
            close(ev.t)
            open_span = {"name": m.group(1), "how": "ran" if RUNNING.search(ev.line) else "restored",
                         "start": ev.t, "end": None}
            spans.append(open_span)
        elif m := SKIPPED.search(ev.line):
            close(ev.t)
            spans.append({"name": m.group(1), "how": "skipped", "start": ev.t, "end": ev.t})
        elif LOCKED.search(ev.line):
            close(ev.t)
    if open_span is not None and not last_closed:
        close(end, "unfinished")
    close(end)
    return spans


def _timestamp(value) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except (TypeError, ValueError):
        return None


def split_train_stage(name: str, start: float, end: float, runs_dir: Path) -> dict | None:
    """{category: seconds} of a `train@<exp>-<seed>` stage from its run record, or None without a matching one."""
    if "@" not in name or "-" not in name.split("@", 1)[1]:
        return None
    exp, seed = name.split("@", 1)[1].rsplit("-", 1)
    run = runs_dir / exp / f"s{seed}"
    try:
        record = json.loads((run / "record.json").read_text())
    except (OSError, ValueError):
        return None
    opened, finished = _timestamp(record.get("started_at")), _timestamp(record.get("finished_at"))
    slack = 2.0  # the record's clock and ours are the same, the lines arrive a little late
    if opened is None or finished is None or not (start - slack <= opened <= finished <= end + slack):
        return None  # a record from another run
    history = record.get("history") or []
    if not history and (run / "history.json").exists():
        history = json.loads((run / "history.json").read_text())
    opened, finished = max(opened, start), min(finished, end)
    training = min(sum(float(h.get("train_time_s", 0.0)) for h in history), finished - opened)
    metrics = run / "metrics.json"
    evaluated = end  # without a metrics.json of this run, the rest of the stage counts as evaluation
    if metrics.exists() and finished <= metrics.stat().st_mtime <= end + slack:
        evaluated = min(metrics.stat().st_mtime, end)
    return {"stage_start": opened - start, "training": training,
            "evaluation": (finished - opened - training) + (evaluated - finished), "dvc": end - evaluated}


def split(events: list[Event], dvc_start: float, dvc_end: float, runs_dir: Path, started: float | None = None,
          installed: float | None = None, summary_s: float = 0.0, exit_status: int = 0) -> dict:
    """The wall time of `make repro` by category, and per stage."""
    started = dvc_start if started is None else started
    installed = started if installed is None else installed
    totals = {c: 0.0 for c in CATEGORIES}
    totals["install"] = installed - started
    stages = []
    for span in stage_spans(events, dvc_end, last_closed=exit_status == 0):
        wall = span["end"] - span["start"]
        cat = category(span["name"])
        parts = split_train_stage(span["name"], span["start"], span["end"], runs_dir) if (
            cat == "training" and span["how"] == "ran") else None
        parts = parts or {cat: wall}
        for k, v in parts.items():
            totals[k] += v
        stages.append({"name": span["name"], "category": cat, "how": span["how"],
                       "start_s": round(span["start"] - started, 3), "wall_s": round(wall, 3),
                       "split_s": {k: round(v, 3) for k, v in parts.items()}})
    in_stages = sum(s["wall_s"] for s in stages)
    totals["dvc"] += (dvc_end - dvc_start - in_stages) + (dvc_start - installed)
    totals["summary"] = summary_s
    total = installed - started + (dvc_end - installed) + summary_s
    return {"make_repro_s": round(total, 3), "dvc_repro_s": round(dvc_end - dvc_start, 3),
            "split_s": {k: round(v, 3) for k, v in totals.items()},
            "split_share": {k: round(v / total, 4) if total > 0 else 0.0 for k, v in totals.items()},
            "stages": stages, "stages_run": sum(s["how"] in ("ran", "restored") for s in stages),
            "stages_skipped": sum(s["how"] == "skipped" for s in stages)}


# ---------------------------------------------------------------- running dvc


def _write(stream, data: bytes) -> None:
    try:
        out = getattr(stream, "buffer", None)
        if out is not None:
            out.write(data)
        else:
            stream.write(data.decode(errors="replace"))
        stream.flush()
    except (BrokenPipeError, ValueError):  # the reader went away: keep draining dvc
        pass


def run_streaming(cmd: list[str], env: dict | None = None) -> tuple[int, list[Event]]:
    """Run cmd, relay its stdout/stderr as they come, and timestamp each line. Returns (exit status, events)."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Ctrl-C reaches dvc from the terminal itself; this process stays to relay and record its exit.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda sig, frame: proc.send_signal(sig))}
    events: list[Event] = []
    sel = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): ("stdout", sys.stdout), proc.stderr.fileno(): ("stderr", sys.stderr)}
    pending = {fd: b"" for fd in streams}
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    try:
        while sel.get_map():
            for key, _ in sel.select():
                fd = key.fd
                name, target = streams[fd]
                chunk = os.read(fd, 65536)
                now = time.time()
                if not chunk:
                    sel.unregister(fd)
                    if pending[fd]:
                        events.append(Event(now, pending[fd].decode(errors="replace"), name))
                    continue
                _write(target, chunk)
                lines = (pending[fd] + chunk).split(b"\n")
                pending[fd] = lines.pop()
                events.extend(Event(now, line.decode(errors="replace").rstrip("\r"), name) for line in lines)
        rc = proc.wait()
    finally:
        sel.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (128 - rc if rc < 0 else rc), events


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}


def profile_name(params: Path) -> str | None:
    try:
        m = re.search(r"^profile:\s*([\w-]+)", params.read_text(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def record(result: dict, out: Path, exit_status: int) -> dict:
    """Fold one measurement into the timing file (see the module docstring) and write the .md beside it."""
    previous = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text())
        except ValueError:
            previous = {}
    if exit_status != 0:
        data = {**previous, "last_failed_attempt": {**result, "exit_status": exit_status}}
    elif result["stages_run"] == 0:
        data = {**previous, "dvc_repro_noop_s": result["dvc_repro_s"], "noop_measured_at": result["measured_at"]}
    else:
        keep = {k: previous[k] for k in ("dvc_repro_noop_s", "noop_measured_at") if k in previous}
        data = {**result, **keep, "exit_status": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(render(data))
    tmp.replace(md)
    return data


def render(data: dict) -> str:
    lines = ["# `make repro` wall time", ""]
    if "make_repro_s" not in data:
        lines.append("No complete `make repro` recorded yet.")
    else:
        total = data["make_repro_s"]
        lines += [f"{total:.0f} s ({total / 60:.1f} min) on {data.get('machine', {}).get('cpu', '?')} "
                  f"({data.get('machine', {}).get('cpu_count', '?')} cores), profile `{data.get('profile')}`, "
                  f"measured {data.get('measured_at', '?')}; {data.get('conditions', '')}.", "",
                  "| part | seconds | share |", "|---|---:|---:|"]
        for k, v in data["split_s"].items():
            if v or k in ("install", "prepare", "cache", "mlm", "training", "evaluation", "report"):
                lines.append(f"| {k} | {v:.1f} | {data['split_share'][k]:.1%} |")
        ran = [s for s in data.get("stages", []) if s["how"] != "skipped"]
        lines += ["", f"{len(ran)} stages ran, {data.get('stages_skipped', 0)} skipped.", "",
                  "| stage | wall s | split |", "|---|---:|---|"]
        for s in sorted(ran, key=lambda s: -s["wall_s"]):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in s["split_s"].items())
            lines.append(f"| `{s['name']}` | {s['wall_s']:.1f} | {parts} |")
    if "dvc_repro_noop_s" in data:
        lines += ["", f"A `dvc repro` with nothing to do: {data['dvc_repro_noop_s']:.1f} s "
                      f"(measured {data.get('noop_measured_at', '?')})."]
    if "last_failed_attempt" in data:
        f = data["last_failed_attempt"]
        lines += ["", f"The last failed attempt ({f.get('measured_at')}, exit status {f['exit_status']}) is kept "
                      f"in the JSON; the numbers above are from the last complete run."]
    lines += ["", "How: " + " ".join((__doc__ or "").split("\n\n")[2:4]).replace("\n", " ")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: python -m benchmarks.repro_timing [options] -- dvc repro [ARGS]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m benchmarks.repro_timing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--started", type=float, default=None, help="time.time() when `make repro` started")
    p.add_argument("--installed", type=float, default=None, help="time.time() when its install step ended")
    p.add_argument("--install-marker", default=None, help="file the install step touches (did it run?)")
    p.add_argument("--then", default=None, help="a command to run (and time) after dvc succeeds")
    p.add_argument("--runs-dir", default="runs/study", help="the study's run folders (default: runs/study)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    if not cmd:
        sys.exit("benchmarks.repro_timing: no command after --")
    load_start = machine()["load_average"]
    dvc_start = time.time()
    dvc_rc, events = run_streaming(cmd)
    dvc_end = time.time()
    rc, summary_s = dvc_rc, 0.0
    if rc == 0 and args.then:
        t = time.time()
        rc = subprocess.run(shlex.split(args.then)).returncode
        summary_s = time.time() - t
    result = split(events, dvc_start, dvc_end, Path(args.runs_dir), args.started, args.installed, summary_s,
                   exit_status=dvc_rc)
    marker = Path(args.install_marker) if args.install_marker else None
    install_ran = bool(marker and marker.exists() and args.started is not None
                       and marker.stat().st_mtime >= args.started)
    complete = install_ran and result["stages_skipped"] == 0 and rc == 0
    result.update(measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(cmd), profile=profile_name(Path(args.params)),
                  machine={**machine(), "load_average_start": load_start}, install_ran=install_ran,
                  complete=complete,
                  conditions=("install included (fresh venv), every stage ran" if complete else
                              f"install {'ran' if install_ran else 'was up to date'}, "
                              f"{result['stages_skipped']} stages skipped by dvc"))
    data = record(result, Path(args.out), rc)
    if rc == 0 and result["stages_run"]:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in data["split_s"].items() if v >= 0.5)
        print(f"make repro: {data['make_repro_s']:.0f} s ({parts}) -> {args.out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
