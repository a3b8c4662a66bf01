"""torch.profiler over a few of our training steps: the top operators and the host syncs per step."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Bench, PhaseClock, make_adamw
from benchmarks.steps import loop_step
from pipeline.balancers import make_balancer

log = logging.getLogger(__name__)

PHASES = ("collate", "forward", "loss_check", "backward", "optimizer", "log")
# A tensor read as a Python number (.item(), float(), `if t:`): free on CPU, a host-device sync on CUDA.
SYNC_OPS = ("aten::_local_scalar_dense",)


def scalar_reads(bench: Bench, model, balancer_names: tuple[str, ...]) -> dict:
    """Tensor-to-Python-number reads per step and phase, for each balancer (one profiled step each)."""
    cfg = bench.cfg
    rng = np.random.default_rng([bench.settings.seed, 6])
    step = bench.loop_plan(1, rng)[0]
    out = {}
    for name in balancer_names:
        optimizer = make_adamw(model, bench.device, cfg.train.lr, cfg.train.weight_decay, train_cfg=cfg.train)
        balancer = make_balancer(name, model, bench.tasks, cfg.train)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop_step(model, optimizer, balancer, step, bench, PhaseClock(bench.device))
        out[name] = dict(sorted(Counter(_phase_of(e) for e in prof.events() if e.name in SYNC_OPS).items()))
    return out


def profile_steps(bench: Bench, model, balancer_name: str = "sum", top: int = 12) -> dict:
    s, cfg = bench.settings, bench.cfg
    rng = np.random.default_rng([s.seed, 5])
    plan = bench.loop_plan(s.profile_steps + 1, rng)
    optimizer = make_adamw(model, bench.device, cfg.train.lr, cfg.train.weight_decay, train_cfg=cfg.train)
    balancer = make_balancer(balancer_name, model, bench.tasks, cfg.train)
    model.train()
    loop_step(model, optimizer, balancer, plan[0], bench, PhaseClock(bench.device))  # warm-up
    clock = PhaseClock(bench.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in plan[1:]:
            loop_step(model, optimizer, balancer, step, bench, clock)
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
    return {"balancer": balancer_name, "steps": steps, "step_s": wall / steps,
            "phases_share": {k: v / wall for k, v in clock.times.items()},
            "phases_s_per_step": {k: v / steps for k, v in clock.times.items()},
            "top_ops": top_ops, "host_syncs_per_step": syncs,
            "host_syncs_per_step_by_phase": {k: v / steps for k, v in sorted(by_phase.items())},
            "top_ops_by_phase": top_by_phase,
            "scalar_reads_per_step_by_balancer": scalar_reads(bench, model, ("pcgrad", "gradnorm", "upgrad")),
            "note": "self CPU time of torch operators under torch.profiler (profiling adds overhead); "
                    "phases are wall-clock shares of the same steps"}


def _phase_of(event) -> str:
    """The benchmark phase (record_function label) an operator ran under."""
    while event is not None and event.name not in PHASES:
        event = event.cpu_parent
    return event.name if event is not None else "other"
