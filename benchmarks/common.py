"""Shared pieces of the benchmarks: settings, the data/model setup, a phase clock and side-by-side timing."""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.profiler import record_function

from pipeline import io as pio
from pipeline.data import collate, epoch_sample, length_batches, load_split, tokenizer_info

log = logging.getLogger(__name__)

# length_batches sorts windows of this many batches; the plans sample one such window per task.
BUCKET = inspect.signature(length_batches).parameters["bucket"].default


@dataclass
class Settings:
    """How much each benchmark measures. `full()` fits `make bench` in 10 minutes on 2 cores."""

    steps: int = 2              # training steps per timed block of the loop comparisons
    rounds: int = 5             # at most this many interleaved rounds per comparison; medians over rounds
    min_rounds: int = 2         # at least this many, even past a time budget
    warmup: int = 1             # untimed steps per side before timing
    overhead_rounds: int = 12   # balancer overhead: one step per balancer per round, the same batch
    library_rounds: int = 7     # PCGrad / GradNorm against the libraries
    eval_rounds: int = 3
    # Time budgets (seconds) that cap the rounds, so `make bench` ends in time on a busy machine.
    train_budget_s: float = 200.0
    overhead_budget_s: float = 100.0
    library_budget_s: float = 30.0
    eval_budget_s: float = 20.0
    naive_pad: int = 128        # the secondary baseline pads every batch to this many tokens
    other_precision: bool = True  # also time the profile's step in the other precision (fp32 <-> bf16)
    peak_reps: int = 3          # timed calls per kernel of the matmul peak (best of them)
    eval_examples: int = 64     # dev examples per task for the evaluation throughput
    memory_steps: int = 3       # steps of the short training run whose peak memory is measured
    memory: bool = True         # run that training in a subprocess (the smoke test may skip it)
    profile_steps: int = 1
    # One thread by default: on a shared 2-core machine, torch's default of one thread per core
    # makes OpenMP workers spin-wait on each other and step times balloon; 0 means torch's default.
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    mode: str = "full"

    @classmethod
    def full(cls, **kw) -> "Settings":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "Settings":
        """Every code path, a couple of steps each: for the test suite, not for numbers."""
        base = dict(steps=2, rounds=1, min_rounds=1, warmup=1, overhead_rounds=1, library_rounds=1, eval_rounds=1,
                    eval_examples=8, memory_steps=2, profile_steps=1, naive_pad=32, peak_reps=1, mode="smoke")
        return cls(**{**base, **kw})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Bench:
    """What every benchmark measures on: the config, the prepared data and the batch plan.

    `train` / `dev` hold token ids; `train_cached` / `dev_cached` the same splits with the
    profile model's frozen-prefix states attached (None when every layer trains).
    """

    cfg: object
    tasks: list
    device: torch.device
    pad_id: int
    train: dict
    dev: dict
    batch_size: int
    cross: bool
    max_length: int             # the truncation prepare used (data/prepared/report.json)
    precision: str              # the profile's train.precision, resolved for the device (auto: bf16 only if native)
    raw_source: str             # the folder prepare read the raw files from
    settings: Settings
    train_cached: dict | None = None
    dev_cached: dict | None = None

    def collate(self, task: str, idx, cached: bool = False) -> dict:
        from pipeline.data import to_device

        data = (self.train_cached if cached and self.train_cached else self.train)[task]
        return to_device(collate(data, idx, self.pad_id, cross=self.cross and task == "para"), self.device)

    def batches(self, step: dict, cached: bool = False) -> dict:
        """One collated batch per task, on the device, as the loop feeds train_step."""
        return {t: self.collate(t, step[t], cached) for t in self.tasks}

    def eval_dev(self) -> dict:
        """The dev splits the profile's model is evaluated on (cached states when it has a frozen prefix)."""
        return self.dev_cached or self.dev

    def loop_plan(self, steps: int, rng: np.random.Generator) -> list[dict]:
        """`steps` batches per task as the loop makes them: a window of the epoch sampler, length-bucketed."""
        window = self.batch_size * BUCKET * max(1, math.ceil(steps / BUCKET))
        per_task = {t: length_batches(epoch_sample(len(self.train[t]), window, rng), self.train[t].lengths,
                                      self.batch_size, rng)[:steps] for t in self.tasks}
        return [{t: per_task[t][s] for t in self.tasks} for s in range(min(map(len, per_task.values())))]

    def plans(self, steps: int, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
        """Our batches, and the same examples cut into batches in shuffled order (no length bucketing)."""
        ours = self.loop_plan(steps, rng)
        examples = {t: rng.permutation(np.concatenate([step[t] for step in ours])) for t in self.tasks}
        b = self.batch_size
        naive = [{t: examples[t][s * b: (s + 1) * b] for t in self.tasks} for s in range(len(ours))]
        return ours, naive


def load_bench(cfg, settings: Settings) -> Bench:
    from pipeline.runtime import resolve_precision

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tasks = list(cfg.train.tasks)
    prepared = cfg.data.prepared_dir
    report = pio.read_json(Path(prepared) / "report.json") if (Path(prepared) / "report.json").exists() else {}
    device = torch.device(settings.device)
    return Bench(cfg=cfg, tasks=tasks, device=device, pad_id=tokenizer_info(prepared)["pad_id"],
                 precision=resolve_precision(cfg.train.precision, device),
                 max_length=int(report.get("max_length", 512)), raw_source=str(report.get("source", "")),
                 train={t: load_split(prepared, t, "train") for t in tasks},
                 dev={t: load_split(prepared, t, "dev") for t in tasks},
                 batch_size=cfg.train.batch_size, cross=cfg.model.para_head == "cross", settings=settings)


@dataclass
class Models:
    """The models the benchmarks train, all from the same initial weights.

    cpu: the profile's model as the pipeline trains it (model.freeze_layers, train.precision,
    the prefix cache); full: every layer trains, fp32, the backbone's default attention (SDPA);
    starter: the same with eager attention, for the starter-style baselines.
    """

    cpu: object
    full: object | None = None
    starter: object | None = None
    cache_s: float = 0.0            # opening (or building) the prefix cache
    cache_folder: str | None = None


def open_prefix(cfg, model):
    """pipeline.train.open_prefix_cache, whichever of its signatures (cfg) or (cfg, model) it has."""
    import pipeline.train

    fn = pipeline.train.open_prefix_cache
    return fn(cfg, model) if len(inspect.signature(fn).parameters) >= 2 else fn(cfg)


def build_models(bench: Bench, full: bool = True, starter: bool = True) -> Models:
    """The profile's model (with its prefix cache attached to `bench`), and the full fine-tuning twins."""
    import dataclasses

    from transformers import AutoModel

    from pipeline.model import build_model, resolve_backbone
    from pipeline.train import load_task_data

    cfg = bench.cfg
    cpu = build_model(cfg.model, bench.tasks).to(bench.device)
    cpu.set_precision(bench.device, bench.precision)
    start = time.perf_counter()
    prefix = open_prefix(cfg, cpu) if cpu.frozen_layers else None
    models = Models(cpu=cpu, cache_s=time.perf_counter() - start)
    if prefix is not None:
        models.cache_folder = str(getattr(prefix, "folder", ""))
        bench.train_cached = load_task_data(cfg, bench.tasks, "train", prefix)
        bench.dev_cached = load_task_data(cfg, bench.tasks, "dev", prefix)
    log.info("profile model: %s, %d frozen layers%s (%.1f s to open the prefix cache)", bench.precision,
             cpu.frozen_layers, ", prefix cache" if prefix is not None else "", models.cache_s)
    full_cfg = dataclasses.replace(cfg.model, freeze_layers=0)
    if full:
        backbone = copy.deepcopy(cpu.bert)
        backbone.requires_grad_(True)  # the copy carries the profile model's frozen flags
        models.full = build_model(full_cfg, bench.tasks, backbone=backbone).to(bench.device)
        models.full.load_state_dict(cpu.state_dict())
        models.full.set_precision(bench.device, "fp32")
    if starter:
        source = resolve_backbone(cfg.model.init_from or cfg.model.backbone)
        eager = AutoModel.from_pretrained(source, attn_implementation="eager")
        models.starter = build_model(full_cfg, bench.tasks, backbone=eager).to(bench.device)
        models.starter.load_state_dict(cpu.state_dict())
        models.starter.set_precision(bench.device, "fp32")
    return models


def attention_of(model) -> str:
    return str(getattr(model.bert.config, "_attn_implementation", "unknown"))


def our_optimizer(model, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the loop builds it (pipeline.train.make_optimizer: fused, the heads' group if any)."""
    from pipeline.train import make_optimizer

    return make_optimizer(model, cfg.train, device)


class PhaseClock:
    """Wall time per named phase (synchronising CUDA at the edges); labels also show in torch.profiler.

    sync=False leaves CUDA asynchronous (phase times then mean little; time whole blocks instead).
    """

    def __init__(self, device: torch.device, sync: bool = True):
        self.device, self.synchronise = device, sync
        self.times: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.synchronise and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        with record_function(name):
            yield
        self.sync()
        self.times[name] += time.perf_counter() - start

    def total(self) -> float:
        return sum(self.times.values())


def interleaved(blocks: dict[str, Callable[[int], dict]], rounds: int, min_rounds: int = 1,
                budget_s: float | None = None, warmup: Callable[[], None] | None = None) -> dict[str, list[dict]]:
    """Run the blocks side by side for up to `rounds` rounds; return per-block lists of phase times.

    `blocks[name](r)` runs side `name` in round r and returns {phase: seconds}. The order
    rotates each round, so slow spells of a shared machine hit every side. Rounds stop
    early (never before `min_rounds`) once another would pass `budget_s` (warm-up included).
    """
    start = time.perf_counter()
    if warmup is not None:
        warmup()
    names = list(blocks)
    out: dict[str, list[dict]] = {n: [] for n in names}
    first = time.perf_counter()
    for r in range(rounds):
        now = time.perf_counter()
        if r >= min_rounds and budget_s is not None and (now - start) + (now - first) / r > budget_s:
            log.info("time budget of %.0f s reached after %d rounds", budget_s, r)
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out[name].append(blocks[name](r))
    return out


def paired_ratio(runs_a: list[dict], runs_b: list[dict]) -> float:
    """Median over rounds of total(a) / total(b): pairs cancel drift in the machine's load."""
    return statistics.median(sum(a.values()) / sum(b.values()) for a, b in zip(runs_a, runs_b))


def median_total(runs: list[dict]) -> float:
    return statistics.median(sum(r.values()) for r in runs)


def median_phases(runs: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def spread(runs: list[dict]) -> float:
    """(max - min) / median of the block totals: how noisy this side's rounds were."""
    totals = [sum(r.values()) for r in runs]
    med = statistics.median(totals)
    return (max(totals) - min(totals)) / med if med > 0 else 0.0


def metric(value, target=None, direction: str | None = None, unit: str = "", machine_dependent: bool = False,
           note: str = "", target_source: str = "issue", **details) -> dict:
    """One entry of benchmarks.json: value, target, pass/fail and the numbers behind it.

    target_source: "issue" (a target the project set) or "benchmark" (a bar this suite sets,
    e.g. agreement tolerance or not slower than the library).
    """
    passed = None
    if value is not None and target is not None:
        passed = bool(value >= target) if direction == ">=" else bool(value <= target)
    return {"value": value, "target": target, "direction": direction, "pass": passed, "unit": unit,
            "target_source": target_source if target is not None else None,
            "machine_dependent": machine_dependent, "note": note, "details": details}


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    ours, theirs = ours.double().reshape(-1), theirs.double().reshape(-1)
    diff = (ours - theirs).abs().max().item()
    scale = max(ours.abs().max().item(), theirs.abs().max().item(), 1e-30)
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "cosine": cos,
            "relative_norm_of_difference": ((ours - theirs).norm() / ours.norm().clamp_min(1e-30)).item()}


def machine_info(settings: Settings) -> dict:
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "device": settings.device, "load_average_start": list(os.getloadavg())}
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
