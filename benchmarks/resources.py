"""Evaluation throughput, peak resident memory of a short training run, and the repro wall times.

`python -m benchmarks.resources CONFIG_JSON OUT_JSON` is the child process whose
peak RSS is measured: it runs the real `pipeline.train.train` for a few steps.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Bench, interleaved, median_total, metric, paired_ratio
from pipeline import io as pio
from pipeline.data import epoch_size
from pipeline.evaluate import predict

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
REPRO_TIMING = ROOT / "reports" / "repro_timing.json"


def bench_eval(bench: Bench, model) -> dict:
    """Sentences per second of pipeline.evaluate.predict over a dev sample of every task (the profile's model,
    reading the prefix cache when it has one, as the pipeline's evaluation does)."""
    s = bench.settings
    dev = {t: d.subset(s.eval_examples) for t, d in bench.eval_dev().items()}
    sentences = sum(len(d) * (2 if d.pair and not (bench.cross and t == "para") else 1) for t, d in dev.items())
    batch_size = bench.cfg.eval.batch_size

    def run(r=0):
        start = time.perf_counter()
        for data in dev.values():
            predict(model, data, bench.pad_id, batch_size, bench.device)
        return {"total": time.perf_counter() - start}

    runs = interleaved({"eval": run}, s.eval_rounds, s.min_rounds, s.eval_budget_s, warmup=run)["eval"]
    model.train()
    t = median_total(runs)
    return {"eval_sentences_per_s": metric(sentences / t, unit="sentences/s", machine_dependent=True,
                                           note="pipeline.evaluate.predict (inference_mode, length-sorted batches); "
                                                "a bi-encoder pair counts as two sentences",
                                           sentences=sentences, median_s=t, rounds=len(runs), batch_size=batch_size,
                                           precision=model.precision, frozen_layers=model.frozen_layers,
                                           prefix_cache=bench.dev_cached is not None)}


def memory_config(bench: Bench, run_root: Path) -> dict:
    """The benchmark's config, shrunk to `memory_steps` steps of one epoch and a small dev check."""
    s = bench.settings
    cfg = bench.cfg.to_dict()
    sizes = {t: len(d) for t, d in bench.train.items()}
    base = epoch_size(cfg["train"]["schedule"], sizes, 1.0)
    cfg["train"].update(epochs=1, epoch_fraction=min(100.0, s.memory_steps * bench.batch_size / base),
                        eval_limit=min(32, s.eval_examples), checkpoint_every=0, threads=s.threads,
                        device=s.device)
    for key in ("prepared_dir", "prefix_dir"):
        if cfg["data"].get(key):
            cfg["data"][key] = str(Path(cfg["data"][key]).resolve())
    cfg["tracking"].update(runs_dir=str(run_root / "runs"), wandb=False)
    return cfg


def bench_memory(bench: Bench) -> dict:
    """Peak resident memory of a child process that runs a short real training."""
    s = bench.settings
    if not s.memory:
        return {"train_peak_rss_mb": metric(None, unit="MiB", machine_dependent=True,
                                            note="skipped in this mode (settings.memory is false)")}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        pio.write_json(tmp / "config.json", memory_config(bench, tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.resources", str(tmp / "config.json"),
                               str(tmp / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"memory benchmark child failed (exit {proc.returncode}): {tail}")
        out = pio.read_json(tmp / "out.json")
    return {"train_peak_rss_mb": metric(out["peak_rss_mb"], unit="MiB", machine_dependent=True,
                                        note="peak RSS (VmHWM) of a process running pipeline.train.train for a few "
                                             "steps plus its end-of-epoch dev check",
                                        rss_after_imports_mb=out["rss_after_imports_mb"], steps=out["steps"],
                                        train_s=out["train_s"], process_wall_s=wall)}


def repro_timings() -> dict:
    """`make repro` and no-op `dvc repro` wall times, measured outside `make bench` (by `make repro` itself,
    benchmarks/repro_timing.py) and read from reports/repro_timing.json."""
    note = (f"written by `make repro` (benchmarks/repro_timing.py) into {REPRO_TIMING.relative_to(ROOT)}; "
            "not recorded yet")
    data = {}
    if REPRO_TIMING.exists():
        data = pio.read_json(REPRO_TIMING)
        note = f"read from {REPRO_TIMING.relative_to(ROOT)}"
    noop_keys = ("dvc_repro_noop_s", "noop_measured_at")
    extra = {k: v for k, v in data.items() if k not in ("make_repro_s", *noop_keys, "last_failed_attempt")}
    conditions = data.get("conditions")
    return {"make_repro_wall_s": metric(data.get("make_repro_s"), unit="s", machine_dependent=True,
                                        note=note + (f" ({conditions})" if conditions and "make_repro_s" in data
                                                     else "")
                                        + ("" if "make_repro_s" in data or not data else "; not recorded yet"),
                                        **extra),
            "dvc_repro_noop_wall_s": metric(data.get("dvc_repro_noop_s"), unit="s", machine_dependent=True,
                                            note=note + ("" if "dvc_repro_noop_s" in data or not data
                                                         else "; not recorded yet"),
                                            measured_at=data.get("noop_measured_at"))}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MiB.

    Linux carries ru_maxrss across fork + exec, so a child started by a big parent would
    report the parent's peak; VmHWM in /proc/self/status belongs to this image only.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux units (KiB); macOS uses bytes


def _child(config_path: str, out_path: str) -> None:
    from pipeline.config import config_from_dict
    from pipeline.train import train

    after_imports = _peak_rss_mb()
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    run_dir = Path(cfg.tracking.runs_dir) / "memory"
    start = time.perf_counter()
    train(cfg, run_dir=run_dir, resume=False)
    train_s = time.perf_counter() - start
    steps = sum(1 for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip())
    pio.write_json(out_path, {"peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": after_imports,
                              "steps": steps, "train_s": train_s})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.resources CONFIG_JSON OUT_JSON")
    _child(sys.argv[1], sys.argv[2])


def bench_optimizer(bench: Bench, model) -> dict:
    """AdamW step time: torch's default on CPU (a loop over parameters) vs the fused kernel the loop uses
    (pipeline.train.make_optimizer), on the trainable parameters of the profile's model. Same parameters,
    same (random) gradients, interleaved rounds.
    """
    import torch

    s, tc = bench.settings, bench.cfg.train
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(s.seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p) * 1e-3
    variants = {"default": {}, "fused": {"fused": True}}
    optimizers = {n: torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **kw)
                  for n, kw in variants.items()}

    def step(name):
        start = time.perf_counter()
        optimizers[name].step()
        return {"total": time.perf_counter() - start}

    runs = interleaved({n: (lambda r, n=n: step(n)) for n in variants}, s.library_rounds, s.min_rounds,
                       s.library_budget_s, warmup=lambda: [step(n) for n in variants])
    t_default, t_fused = median_total(runs["default"]), median_total(runs["fused"])
    n_params = sum(p.numel() for p in params)
    return {"adamw_fused_speedup": metric(
        paired_ratio(runs["default"], runs["fused"]), unit="x",
        note="AdamW step: torch's default CPU AdamW / the fused kernel the loop uses (make_optimizer), same parameters",
        default_s=t_default, fused_s=t_fused, parameters=n_params, rounds=len(runs["default"]))}
