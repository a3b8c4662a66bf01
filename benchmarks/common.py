"""Shared pieces of the benchmarks: settings, the data/model setup, a phase clock and side-by-side timing."""
from __future__ import annotations

import contextlib
import inspect
import math
import logging
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

    steps: int = 2              # training steps per timed block of the loop-vs-naive comparison
    rounds: int = 5             # at most this many interleaved rounds per comparison; medians over rounds
    min_rounds: int = 2         # at least this many, even past a time budget
    warmup: int = 1             # untimed steps per side before timing
    overhead_rounds: int = 12   # balancer overhead: one step per balancer per round, the same batch
    library_rounds: int = 7     # PCGrad / GradNorm against the libraries
    eval_rounds: int = 3
    # Time budgets (seconds) that cap the rounds, so `make bench` ends in time on a busy machine.
    train_budget_s: float = 150.0
    overhead_budget_s: float = 100.0
    library_budget_s: float = 30.0
    eval_budget_s: float = 20.0
    naive_pad: int = 128        # the naive loop pads every batch to this many tokens
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
                    eval_examples=8, memory_steps=2, profile_steps=1, naive_pad=32, mode="smoke")
        return cls(**{**base, **kw})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Bench:
    """What every benchmark measures on: the config, the prepared data and the batch plan."""

    cfg: object
    tasks: list
    device: torch.device
    pad_id: int
    train: dict
    dev: dict
    batch_size: int
    cross: bool
    max_length: int             # the truncation prepare used (data/prepared/report.json)
    amp: bool                   # bf16 autocast on CUDA, as the loop does
    raw_source: str             # the folder prepare read the raw files from
    settings: Settings

    def collate(self, task: str, idx) -> dict:
        from pipeline.data import to_device

        return to_device(collate(self.train[task], idx, self.pad_id, cross=self.cross and task == "para"), self.device)

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
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tasks = list(cfg.train.tasks)
    prepared = cfg.data.prepared_dir
    report = pio.read_json(Path(prepared) / "report.json") if (Path(prepared) / "report.json").exists() else {}
    return Bench(cfg=cfg, tasks=tasks, device=torch.device(settings.device),
                 pad_id=tokenizer_info(prepared)["pad_id"], amp=True, max_length=int(report.get("max_length", 512)),
                 raw_source=str(report.get("source", "")),
                 train={t: load_split(prepared, t, "train") for t in tasks},
                 dev={t: load_split(prepared, t, "dev") for t in tasks},
                 batch_size=cfg.train.batch_size, cross=cfg.model.para_head == "cross", settings=settings)


def build_models(bench: Bench, naive: bool = True):
    """Our model (the backbone's default attention, SDPA) and a naive twin with eager attention, same weights."""
    from transformers import AutoModel

    from pipeline.model import build_model, resolve_backbone

    ours = build_model(bench.cfg.model, bench.tasks).to(bench.device)
    if not naive:
        return ours, None
    eager = AutoModel.from_pretrained(resolve_backbone(bench.cfg.model.backbone), attn_implementation="eager")
    naive = build_model(bench.cfg.model, bench.tasks, backbone=eager).to(bench.device)
    naive.load_state_dict(ours.state_dict())
    return ours, naive


def attention_of(model) -> str:
    return str(getattr(model.bert.config, "_attn_implementation", "unknown"))


def autocast(device: torch.device, enabled: bool = True):
    """What the loop uses: bf16 autocast on CUDA, nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_adamw(model, device: torch.device, lr: float, weight_decay: float, fused: bool = True,
               train_cfg=None):
    """AdamW as the loop makes it: fused on CUDA (or the loop's own factory, should it grow one)."""
    import pipeline.train

    factory = getattr(pipeline.train, "make_optimizer", None)
    if factory is not None and train_cfg is not None and fused:
        return factory(model, train_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused and device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


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
