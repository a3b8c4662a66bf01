"""Training throughput: our step against a starter-style loop on the same examples, and its FLOP/s.

Sides, interleaved in rounds after one warm-up step each (same examples on every side):

- `starter`: the CS224N starter code's way (benchmarks/baselines.py): tokenise at step time, pad
  to the batch's longest sequence, shuffled batches, eager attention, fp32, every layer trains,
  summed losses, plain AdamW. The headline baseline.
- `naive_pad128`: the same loop padding every batch to 128 tokens (secondary row).
- `full`: our step (`pipeline.train.train_step`, benchmarks/steps.py) with every layer training in
  fp32: the starter's computation, our loop (pre-tokenised length-bucketed batches, SDPA, fused AdamW).
- `cpu`: our step as the profile trains it: model.freeze_layers with the prefix cache, the
  profile's precision and balancer.
- `cpu_bf16` (or `cpu_fp32`): the same step in the other precision, for the FLOP/s in both.

FLOP/s: executed FLOPs of each side's timed steps (benchmarks/flops.py) / the side's median block
time, as a share of the matmul peak measured in this section, before and after the rounds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from benchmarks import flops
from benchmarks.baselines import StarterLoop, raw_texts
from benchmarks.common import (
    Bench,
    Models,
    attention_of,
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
from pipeline.model import load_tokenizer
from pipeline.runtime import bf16_native

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 2.0
FLOP_NOTE = ("executed FLOPs of the timed steps (matrix products only: forward 2*N*P_l + 4*n*L^2*d per layer run, "
             "backward 2x forward for trained layers, less the Q/K/V input gradient above a frozen prefix, nothing "
             "for cached layers; benchmarks/flops.py) / median step time")


@dataclass
class Side:
    runner: object          # has .block(plan) -> {phase: s} and .batches(step) -> {task: batch}
    model: object
    plan: list
    warm: list
    precision: str
    what: str


def _counts(bench: Bench, side: Side) -> dict:
    """Token positions and FLOPs of one block of `side` (computed outside the timing, on the same batches)."""
    real = padded = 0
    total = {"total": 0.0, "useful_total": 0.0, "forward": 0.0, "backward": 0.0}
    for step in side.plan:
        batches = side.runner.batches(step)
        for batch in batches.values():
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        f = flops.step_flops(side.model, batches)
        for k in total:
            total[k] += f[k]
    return {"real_tokens": real, "padded_tokens": padded, "flops": total}


def build_sides(bench: Bench, models: Models) -> dict[str, Side]:
    s, cfg, tasks = bench.settings, bench.cfg, bench.tasks
    rng = np.random.default_rng([s.seed, 1])
    plan_ours, plan_shuffled = bench.plans(s.steps, rng)
    warm_ours, warm_shuffled = bench.plans(s.warmup, rng)
    tokenizer = load_tokenizer(cfg.model.backbone)
    texts = raw_texts(bench)
    cached = bench.train_cached is not None
    profile_balancer = cfg.train.balancer if len(tasks) > 1 else "sum"
    cpu_balancer = make_balancer(profile_balancer, models.cpu, tasks, cfg.train)
    cpu_optimizer = our_optimizer(models.cpu, cfg, bench.device)
    frozen = models.cpu.frozen_layers
    cpu_what = (f"our step, the profile's model: {frozen} frozen layers"
                + (" read from the prefix cache" if cached else "") + f", {profile_balancer} balancer")
    sides = {
        "starter": Side(StarterLoop(bench, models.starter, tokenizer, texts), models.starter, plan_shuffled,
                        warm_shuffled, "fp32", "starter-style loop: tokenise at step time, pad to the batch's longest, "
                                           "eager attention, fp32, every layer trains, summed losses, plain AdamW"),
        "naive_pad128": Side(StarterLoop(bench, models.starter, tokenizer, texts, pad_to=s.naive_pad), models.starter,
                             plan_shuffled, warm_shuffled, "fp32",
                             f"the starter-style loop padding every batch to {s.naive_pad} tokens"),
        "full": Side(OurStep(bench, models.full, make_balancer("sum", models.full, tasks, cfg.train),
                             our_optimizer(models.full, cfg, bench.device), "fp32", cached=False),
                     models.full, plan_ours, warm_ours, "fp32",
                     "our step, every layer trains, fp32 (the starter's computation): pre-tokenised, length-bucketed "
                     "batches, SDPA, fused AdamW, summed losses"),
        "cpu": Side(OurStep(bench, models.cpu, cpu_balancer, cpu_optimizer, bench.precision, cached), models.cpu,
                    plan_ours, warm_ours, bench.precision, f"{cpu_what}, {bench.precision}"),
    }
    if s.other_precision:
        other = "bf16" if bench.precision == "fp32" else "fp32"
        sides[f"cpu_{other}"] = Side(OurStep(bench, models.cpu, cpu_balancer, cpu_optimizer, other, cached),
                                     models.cpu, plan_ours, warm_ours, other, f"{cpu_what}, {other}")
    return sides


def bench_train_speed(bench: Bench, models: Models) -> dict:
    """Timed blocks of `steps` steps per side, interleaved; ratios are medians of per-round ratios."""
    s = bench.settings
    sides = build_sides(bench, models)
    counts = {name: _counts(bench, side) for name, side in sides.items()}
    peak_before = flops.matmul_peak(bench.device, s.peak_reps)

    def warmup():
        for side in sides.values():
            side.runner.block(side.warm)

    log.info("train speed: %s; %d steps per block, up to %d rounds (batch %d, %d tasks)", ", ".join(sides),
             len(sides["cpu"].plan), s.rounds, bench.batch_size, len(bench.tasks))
    runs = interleaved({n: (lambda r, side=side: side.runner.block(side.plan)) for n, side in sides.items()},
                       s.rounds, s.min_rounds, s.train_budget_s, warmup)
    peaks = flops.merge_peaks(peak_before, flops.matmul_peak(bench.device, s.peak_reps))
    steps = len(sides["cpu"].plan)
    examples = steps * bench.batch_size * len(bench.tasks)
    real = counts["cpu"]["real_tokens"]
    detail = {}
    for name, side in sides.items():
        t = median_total(runs[name])
        c = counts[name]
        achieved = c["flops"]["total"] / t
        detail[name] = {"what": side.what, "precision": side.precision, "attention": attention_of(side.model),
                        "frozen_layers": side.model.frozen_layers, "median_block_s": t, "step_s": t / steps,
                        "examples_per_s": examples / t, "tokens_per_s": real / t,
                        "padded_tokens": c["padded_tokens"], "padding_share": 1 - real / c["padded_tokens"],
                        "phases_s": median_phases(runs[name]), "spread": spread(runs[name]),
                        "gflop_per_step": c["flops"]["total"] / steps / 1e9,
                        "useful_gflop_per_step": c["flops"]["useful_total"] / steps / 1e9,
                        "achieved_gflops": achieved / 1e9,
                        "peak_share": achieved / 1e9 / peaks[side.precision]["gflops"]}
    common = dict(sides=detail, examples_per_block=examples, steps_per_block=steps, rounds=len(runs["cpu"]),
                  real_tokens=real, tokens_per_s_counts="non-padding tokens; every side sees the same examples")

    def speedup(base: str, ours: str, target=None, note="") -> dict:
        return metric(paired_ratio(runs[base], runs[ours]), target, ">=" if target else None, "x", note=note,
                      ratio_of_medians=detail[base]["median_block_s"] / detail[ours]["median_block_s"],
                      cause=speedup_causes(detail[base]["phases_s"], detail[ours]["phases_s"]),
                      base=base, ours=ours, **common)

    out = {
        "train_speedup_full_vs_starter": speedup(
            "starter", "full", TARGET_SPEEDUP,
            "starter-style loop / our full fine-tuning step, same computation (every layer, fp32), same examples"),
        "train_speedup_cpu_vs_starter": speedup(
            "starter", "cpu",
            note=f"starter-style loop (full fine-tuning) / the cpu profile's step ({detail['cpu']['what']})"),
        "train_speedup_full_vs_naive_pad128": speedup(
            "naive_pad128", "full", TARGET_SPEEDUP,
            f"secondary: the starter-style loop padded to {s.naive_pad} tokens / our full fine-tuning step"),
        "train_examples_per_s": metric(detail["cpu"]["examples_per_s"], unit="examples/s", machine_dependent=True,
                                       note="the cpu profile's step; a pair counts as one example",
                                       **{n: d["examples_per_s"] for n, d in detail.items()}),
        "train_tokens_per_s": metric(detail["cpu"]["tokens_per_s"], unit="tokens/s", machine_dependent=True,
                                     note="the cpu profile's step; non-padding tokens",
                                     **{n: d["tokens_per_s"] for n, d in detail.items()}),
    }
    out.update(flop_metrics(bench, detail, peaks))
    return out


def flop_metrics(bench: Bench, detail: dict, peaks: dict) -> dict:
    native = bf16_native(bench.device)
    bf16_note = "native bf16" if native else ("emulated: this CPU has no AVX-512 BF16 or AMX, so bf16 products run "
                                              "through oneDNN's conversion path (not a native peak)")
    threads = {"threads": bench.settings.threads or None}
    out = {"matmul_peak_fp32_gflops": metric(peaks["fp32"]["gflops"], unit="GFLOP/s", machine_dependent=True,
                                             note="a large fp32 matmul on this machine, best of torch.matmul and "
                                                  "F.linear, before and after the rounds", **peaks["fp32"], **threads),
           "matmul_peak_bf16_gflops": metric(peaks["bf16"]["gflops"], unit="GFLOP/s", machine_dependent=True,
                                             note=f"the same in bf16; {bf16_note}", native=native, **peaks["bf16"],
                                             **threads)}
    table = {n: {k: d[k] for k in ("precision", "gflop_per_step", "useful_gflop_per_step", "achieved_gflops",
                                   "peak_share", "step_s")} for n, d in detail.items()}
    for precision in ("fp32", "bf16"):
        name = next((n for n in ("cpu", f"cpu_{precision}") if n in detail and detail[n]["precision"] == precision),
                    None)
        note = (f"the cpu profile's step in {precision}: executed matmul FLOPs (benchmarks/flops.py) / step time, "
                f"as a share of the {precision} matmul peak")
        if precision == "bf16" and not native:
            note += "; bf16 is emulated on this CPU, not a native peak"
        value = detail[name]["peak_share"] if name else None
        out[f"train_step_peak_share_{precision}"] = metric(
            value, unit="share", machine_dependent=True, note=note if name else f"no {precision} side was timed",
            side=name, peak_gflops=peaks[precision]["gflops"], sides=table, flops=FLOP_NOTE,
            formula=flops.formula())
    return out


def speedup_causes(base: dict, ours: dict) -> dict:
    """Where the baseline's extra time goes, per phase (seconds per block, baseline minus ours)."""
    out = {"batch_preparation": base.get("tokenize", 0.0) - ours.get("collate", 0.0)}
    for phase in ("forward", "backward", "optimizer"):
        out[phase] = base.get(phase, 0.0) - ours.get(phase, 0.0)
    out["step_other"] = -ours.get("step_other", 0.0)
    return out
