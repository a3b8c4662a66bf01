"""Balancer step overhead against the plain sum, and our PCGrad / GradNorm against library implementations."""
from __future__ import annotations

import logging
import statistics
import time

import numpy as np
import torch

from benchmarks.common import (
    Bench,
    agreement,
    flat_grad,
    interleaved,
    median_phases,
    median_total,
    metric,
    our_optimizer,
    paired_ratio,
    spread,
)
from benchmarks.steps import OurStep
from pipeline.balancers import make_balancer

log = logging.getLogger(__name__)

TARGET_OVERHEAD = 1.10
OVERHEAD_METHODS = ("pcgrad", "gradnorm", "upgrad")  # upgrad: the torchjd aggregator benchmarked
AGREEMENT_TOLERANCE = 1e-4  # max |ours - theirs| / max |theirs| for the same algorithm on the same input


def bench_overheads(bench: Bench, model) -> dict:
    """Step time of each balancer relative to the summed loss: one step each per round, on the same batch.

    Each step is `pipeline.train.train_step` on the profile's model and batches (benchmarks/steps.py).
    """
    s, cfg = bench.settings, bench.cfg
    rng = np.random.default_rng([s.seed, 2])
    plan = bench.loop_plan(s.overhead_rounds, rng)
    warm = bench.loop_plan(s.warmup, rng)
    optimizer = our_optimizer(model, cfg, bench.device)
    names = ("sum", *OVERHEAD_METHODS)
    balancers = {n: make_balancer(n, model, bench.tasks, cfg.train) for n in names}
    cached = bench.train_cached is not None
    steps = {n: OurStep(bench, model, b, optimizer, bench.precision, cached) for n, b in balancers.items()}

    combine_s = {n: [] for n in names}
    for n, b in balancers.items():  # time the combine step of the Jacobian methods on its own
        if hasattr(b, "combine"):
            b.combine = _clocked(b.combine, combine_s[n], bench.device)

    def step(name, batch):
        return steps[name].block([batch])

    def warmup():
        for n in names:
            for batch in warm:
                step(n, batch)

    log.info("balancer overhead: %s, up to %d rounds", ", ".join(names), len(plan))
    runs = interleaved({n: (lambda r, n=n: step(n, plan[r])) for n in names}, len(plan),
                       min(len(plan), max(s.min_rounds, 3)), s.overhead_budget_s, warmup)
    base = median_total(runs["sum"])
    base_phases = median_phases(runs["sum"])
    out = {}
    for name in OVERHEAD_METHODS:
        phases = median_phases(runs[name])
        extra = {k: phases.get(k, 0.0) - base_phases.get(k, 0.0) for k in phases}
        out[f"{name}_overhead"] = metric(
            paired_ratio(runs[name], runs["sum"]), TARGET_OVERHEAD, "<=", "x",
            note=f"{name} step time / summed-loss step time on the same batch (median over rounds)",
            median_step_s=median_total(runs[name]), sum_median_step_s=base, phases_s=phases,
            sum_phases_s=base_phases, extra_s_by_phase=extra, largest_extra_phase=max(extra, key=extra.get),
            spread=spread(runs[name]), sum_spread=spread(runs["sum"]), rounds=len(runs[name]),
            ratio_of_medians=median_total(runs[name]) / base,
            ratio_of_minimums=min_total(runs[name]) / min_total(runs["sum"]),
            combine_s=statistics.median(combine_s[name]) if combine_s[name] else None)
    return out


def _clocked(fn, sink: list, device):
    """fn, also appending each call's wall time to sink."""
    def wrapper(*args, **kwargs):
        t = _timed(lambda: sink.append(fn(*args, **kwargs)), device)["total"]
        out = sink.pop()
        sink.append(t)
        return out
    return wrapper


def min_total(runs: list[dict]) -> float:
    """The fastest round: interference from other processes only ever adds time."""
    return min(sum(r.values()) for r in runs)


def _timed(fn, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"total": time.perf_counter() - start}


def _forward(model, bench: Bench, step: dict, seed: int) -> dict:
    """The task losses of one step, on the profile's batches (the model autocasts its encoder itself)."""
    torch.manual_seed(seed)  # identical dropout masks for both sides
    model.set_precision(bench.device, bench.precision)
    model.train()
    batches = bench.batches(step, cached=bench.train_cached is not None)
    return {task: model.loss(task, batches[task]) for task in bench.tasks}


class _ReplayOrder:
    """Stands in for PCGradBalancer's rng so that it projects in the order torchjd drew."""

    def __init__(self, perms: list[list[int]]):
        self.perms, self.calls = list(perms), 0

    def shuffle(self, items: list) -> None:
        perm = self.perms[self.calls]
        self.calls += 1
        items[:] = [j for j in perm if j in items]


def bench_pcgrad_library(bench: Bench, model) -> dict:
    """Our PCGrad combine vs torchjd.aggregation.PCGrad on one real per-task gradient matrix."""
    from torchjd.aggregation import PCGrad

    s = bench.settings
    rng = np.random.default_rng([s.seed, 3])
    step = bench.loop_plan(1, rng)[0]
    ours = make_balancer("pcgrad", model, bench.tasks, bench.cfg.train)
    model.train()
    model.zero_grad(set_to_none=True)
    G = ours.task_gradients(_forward(model, bench, step, s.seed)).clone()
    model.zero_grad(set_to_none=True)
    lib = PCGrad()
    T = G.shape[0]
    # torchjd draws one torch.randperm(T) per task; replay the same draws into ours.
    torch.manual_seed(s.seed)
    perms = [torch.randperm(T).tolist() for _ in range(T)]
    torch.manual_seed(s.seed)
    theirs = lib(G)
    saved_rng, ours.rng = ours.rng, _ReplayOrder(perms)
    mine, _ = ours.combine(G)
    if ours.rng.calls != T:
        raise RuntimeError("PCGradBalancer.combine no longer draws its projection order through .rng.shuffle; "
                           "update benchmarks/balancers_bench.py to replay torchjd's order")
    ours.rng = saved_rng
    agree = agreement(mine, theirs)
    gram = G.double() @ G.double().T
    conflicts = int((gram[np.triu_indices(T, 1)] < 0).sum())
    fns = {"ours": lambda: ours.combine(G), "torchjd": lambda: lib(G)}
    runs = interleaved({n: (lambda r, fn=fn: _timed(fn, bench.device)) for n, fn in fns.items()}, s.library_rounds,
                       s.min_rounds, s.library_budget_s, warmup=lambda: [fn() for fn in fns.values()])
    t_ours, t_lib = median_total(runs["ours"]), median_total(runs["torchjd"])
    return {
        "pcgrad_vs_torchjd_time_ratio": metric(paired_ratio(runs["ours"], runs["torchjd"]), 1.0, "<=", "x",
                                               target_source="benchmark",
                                               note="our combine time / torchjd PCGrad time on the same gradient "
                                                    "matrix",
                                               ours_s=t_ours, torchjd_s=t_lib, shape=list(G.shape),
                                               rounds=len(runs["ours"])),
        "pcgrad_vs_torchjd_agreement": metric(agree["max_rel_diff"], AGREEMENT_TOLERANCE, "<=", "",
                                              target_source="benchmark",
                                              note="max |ours - torchjd| / max |torchjd|, torchjd's projection order "
                                                   "replayed", conflicting_pairs=conflicts, **agree),
    }


def bench_gradnorm_library(bench: Bench, model) -> dict:
    """Our GradNorm vs gradnorm-pytorch's GradNormLossWeighter on the same losses (first step, same dropout)."""
    try:
        from gradnorm_pytorch import GradNormLossWeighter
    except ImportError:
        note = "gradnorm-pytorch is not installed (pip install -e '.[bench]')"
        return {"gradnorm_vs_library_time_ratio": metric(None, note=note),
                "gradnorm_vs_library_agreement": metric(None, note=note)}
    s, tc = bench.settings, bench.cfg.train
    rng = np.random.default_rng([s.seed, 4])
    step = bench.loop_plan(1, rng)[0]
    T = len(bench.tasks)
    shared = model.shared_parameters()
    model.train()

    def fresh():
        ours = make_balancer("gradnorm", model, bench.tasks, tc)
        theirs = GradNormLossWeighter(num_losses=T, learning_rate=tc.gn_lr, restoring_force_alpha=tc.gn_alpha,
                                      grad_norm_parameters=model.shared_layer())
        return ours, theirs

    # Agreement on the first step: both take L_i(0) from it, so the targets are mean(G) on both sides.
    ours, theirs = fresh()
    model.zero_grad(set_to_none=True)
    ours.backward(_forward(model, bench, step, s.seed))
    w_ours, g_ours = ours.weights.grad.detach().clone(), flat_grad(shared)
    model.zero_grad(set_to_none=True)
    losses = _forward(model, bench, step, s.seed)
    theirs([losses[t] for t in bench.tasks], grad_step=False)
    # gradnorm-pytorch takes the mean of |G_i - target_i| where we (and the paper) take the sum.
    w_theirs, g_theirs = theirs.loss_weights_grad.detach().clone() * T, flat_grad(shared)
    model.zero_grad(set_to_none=True)
    weights = agreement(w_ours, w_theirs)
    network = agreement(g_ours, g_theirs)

    # Timing: the balancing work only (the forward pass before it is the same on both sides and untimed).
    ours, theirs = fresh()

    def side(name):
        model.zero_grad(set_to_none=True)
        losses = _forward(model, bench, step, s.seed)
        if name == "ours":
            return _timed(lambda: (ours.backward(losses), ours.after_step()), bench.device)
        return _timed(lambda: theirs([losses[t] for t in bench.tasks]), bench.device)

    runs = interleaved({n: (lambda r, n=n: side(n)) for n in ("ours", "gradnorm_pytorch")}, s.library_rounds,
                       s.min_rounds, s.library_budget_s, warmup=lambda: (side("ours"), side("gradnorm_pytorch")))
    model.zero_grad(set_to_none=True)
    t_ours, t_lib = median_total(runs["ours"]), median_total(runs["gradnorm_pytorch"])
    return {
        "gradnorm_vs_library_time_ratio": metric(
            paired_ratio(runs["ours"], runs["gradnorm_pytorch"]), 1.0, "<=", "x", target_source="benchmark",
            note="our GradNorm backward / gradnorm-pytorch's, same losses",
            ours_s=t_ours, gradnorm_pytorch_s=t_lib, rounds=len(runs["ours"])),
        "gradnorm_vs_library_agreement": metric(
            weights["max_rel_diff"], AGREEMENT_TOLERANCE, "<=", "", target_source="benchmark",
            note="task-weight gradient on the first step, max |ours - theirs x T| / max |theirs x T|",
            task_weight_grad=weights, task_weight_grad_ours=w_ours.tolist(), task_weight_grad_theirs=w_theirs.tolist(),
            shared_grad=network,
            shared_grad_note="gradnorm-pytorch backpropagates its GradNorm loss through create_graph gradient norms, "
                             "so a second-order term reaches the network's gradient; ours keeps the network's "
                             "gradient exactly that of sum_i w_i L_i"),
    }
