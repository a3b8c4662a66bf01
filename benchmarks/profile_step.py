"""torch.profiler over a few of our training steps: the top operators and the host syncs per step.

The steps are `pipeline.train.train_step` itself (benchmarks/steps.py::OurStep) on the profile's
model and batches (prefix cache and precision included); phases come from labelling the calls
train_step makes, so operators are attributed to forward, backward, optimizer, or `step_other`
(train_step's own finite-loss check and log entry).
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Bench, PhaseClock, our_optimizer
from benchmarks.steps import PHASES, OurStep
from pipeline.balancers import make_balancer

log = logging.getLogger(__name__)

# A tensor read as a Python number (.item(), float(), `if t:`): free on CPU, a host-device sync on CUDA.
SYNC_OPS = ("aten::_local_scalar_dense",)


def scalar_reads(bench: Bench, model, balancer_names: tuple[str, ...]) -> dict:
    """Tensor-to-Python-number reads per step and phase, for each balancer (one profiled step each)."""
    rng = np.random.default_rng([bench.settings.seed, 6])
    step = bench.loop_plan(1, rng)[0]
    out = {}
    for name in balancer_names:
        run = _our_step(bench, model, name)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(step, PhaseClock(bench.device))
        out[name] = dict(sorted(Counter(_phase_of(e) for e in prof.events() if e.name in SYNC_OPS).items()))
    return out


def profile_steps(bench: Bench, model, balancer_name: str = "sum", top: int = 12) -> dict:
    s = bench.settings
    rng = np.random.default_rng([s.seed, 5])
    plan = bench.loop_plan(s.profile_steps + 1, rng)
    run = _our_step(bench, model, balancer_name)
    run(plan[0], PhaseClock(bench.device))  # warm-up
    clock = PhaseClock(bench.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in plan[1:]:
            run(step, clock)
    steps = len(plan) - 1
    events = prof.key_averages()
    ops = [e for e in events if e.key not in PHASES]
    total_self = sum(e.self_cpu_time_total for e in ops) or 1.0
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top_ops = [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1000.0 / steps,
                "share_of_self_cpu": e.self_cpu_time_total / total_self, "calls_per_step": e.count / steps}
               for e in ops[:top]]
    syncs = sum(e.count for e in events if e.key in SYNC_OPS) / steps
    by_phase = Counter(_phase_of(e) for e in prof.events() if e.name in SYNC_OPS)
    op_phase: dict[tuple[str, str], float] = defaultdict(float)
    for e in prof.events():
        if e.name not in PHASES:
            op_phase[(e.name, _phase_of(e))] += e.self_cpu_time_total
    top_by_phase = {}
    for phase in PHASES:
        items = sorted(((op, t) for (op, ph), t in op_phase.items() if ph == phase), key=lambda kv: -kv[1])[:4]
        top_by_phase[phase] = [{"op": op, "self_cpu_ms_per_step": t / 1000.0 / steps} for op, t in items]
    wall = clock.total()
    return {"balancer": balancer_name, "steps": steps, "step_s": wall / steps, "precision": bench.precision,
            "frozen_layers": model.frozen_layers, "prefix_cache": bench.train_cached is not None,
            "phases_share": {k: v / wall for k, v in clock.times.items()},
            "phases_s_per_step": {k: v / steps for k, v in clock.times.items()},
            "top_ops": top_ops, "host_syncs_per_step": syncs,
            "host_syncs_per_step_by_phase": {k: v / steps for k, v in sorted(by_phase.items())},
            "top_ops_by_phase": top_by_phase,
            "scalar_reads_per_step_by_balancer": scalar_reads(bench, model, ("pcgrad", "gradnorm", "upgrad")),
            "note": "self CPU time of torch operators under torch.profiler (profiling adds overhead); "
                    "phases are wall-clock shares of the same steps"}


def _our_step(bench: Bench, model, balancer_name: str) -> OurStep:
    """train_step on the profile's model, batches and precision, with a fresh optimizer and balancer."""
    return OurStep(bench, model, make_balancer(balancer_name, model, bench.tasks, bench.cfg.train),
                   our_optimizer(model, bench.cfg, bench.device), bench.precision,
                   cached=bench.train_cached is not None)


def _phase_of(event) -> str:
    """The benchmark phase (record_function label) an operator ran under."""
    while event is not None and event.name not in PHASES:
        event = event.cpu_parent
    return event.name if event is not None else "other"
