"""Training throughput of our loop against a deliberately naive loop on the same examples and backbone."""
from __future__ import annotations

import logging

import numpy as np

from benchmarks.common import (Bench, PhaseClock, attention_of, interleaved, make_adamw, median_phases, median_total,
                               metric, paired_ratio, spread)
from benchmarks.steps import loop_step, naive_step, raw_texts
from pipeline.balancers import make_balancer
from pipeline.model import load_tokenizer

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 2.0


def token_counts(bench: Bench, plan: list[dict]) -> dict:
    """Real (non-padding) tokens and padded positions of our batches; the naive loop pads to a fixed width."""
    real = padded = rows = 0
    for step in plan:
        for task in bench.tasks:
            batch = bench.collate(task, step[task])
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            rows += batch["input_ids"].shape[0]
    return {"real_tokens": real, "our_padded_tokens": padded, "naive_padded_tokens": rows * bench.settings.naive_pad}


def bench_train_speedup(bench: Bench, ours, naive) -> dict:
    """Timed blocks of `steps` steps per side, interleaved; the headline is the median of per-round ratios."""
    s, cfg = bench.settings, bench.cfg
    rng = np.random.default_rng([s.seed, 1])
    plan_ours, plan_naive = bench.plans(s.steps, rng)
    warm_ours, warm_naive = bench.plans(s.warmup, rng)
    tokenizer = load_tokenizer(cfg.model.backbone)
    texts = raw_texts(bench)
    opt_ours = make_adamw(ours, bench.device, cfg.train.lr, cfg.train.weight_decay, train_cfg=cfg.train)
    opt_naive = make_adamw(naive, bench.device, cfg.train.lr, cfg.train.weight_decay)  # a plain torch AdamW
    balancer = make_balancer("sum", ours, bench.tasks, cfg.train)
    ours.train()
    naive.train()

    def run_ours(plan):
        clock = PhaseClock(bench.device)
        for step in plan:
            loop_step(ours, opt_ours, balancer, step, bench, clock)
        return dict(clock.times)

    def run_naive(plan):
        clock = PhaseClock(bench.device)
        for step in plan:
            naive_step(naive, opt_naive, tokenizer, texts, step, bench, clock)
        return dict(clock.times)

    def warmup():
        run_ours(warm_ours)
        run_naive(warm_naive)

    log.info("train speed: %d steps per block, up to %d rounds (batch %d, %d tasks)", len(plan_ours), s.rounds,
             bench.batch_size, len(bench.tasks))
    runs = interleaved({"ours": lambda r: run_ours(plan_ours), "naive": lambda r: run_naive(plan_naive)},
                       s.rounds, s.min_rounds, s.train_budget_s, warmup)
    counts = token_counts(bench, plan_ours)
    examples = len(plan_ours) * bench.batch_size * len(bench.tasks)
    t_ours, t_naive = median_total(runs["ours"]), median_total(runs["naive"])
    speedup = paired_ratio(runs["naive"], runs["ours"])
    side = {}
    for name, t in (("ours", t_ours), ("naive", t_naive)):
        side[name] = {"median_block_s": t, "examples_per_s": examples / t, "tokens_per_s": counts["real_tokens"] / t,
                      "phases_s": median_phases(runs[name]), "spread": spread(runs[name])}
    side["ours"]["attention"], side["naive"]["attention"] = attention_of(ours), attention_of(naive)
    details = dict(sides=side, examples_per_block=examples, steps_per_block=len(plan_ours), rounds=len(runs["ours"]),
                   ratio_of_medians=t_naive / t_ours,
                   tokens_per_s_counts="non-padding tokens; both sides see the same examples", **counts,
                   padding_share_ours=1 - counts["real_tokens"] / counts["our_padded_tokens"],
                   padding_share_naive=1 - counts["real_tokens"] / counts["naive_padded_tokens"],
                   cause=speedup_causes(side))
    return {
        "train_speedup_vs_naive": metric(speedup, TARGET_SPEEDUP, ">=", "x",
                                         note="naive / our time for the same examples on the same backbone (median over rounds)",
                                         **details),
        "train_examples_per_s": metric(side["ours"]["examples_per_s"], unit="examples/s", machine_dependent=True,
                                       note="our loop; a pair counts as one example",
                                       naive=side["naive"]["examples_per_s"]),
        "train_tokens_per_s": metric(side["ours"]["tokens_per_s"], unit="tokens/s", machine_dependent=True,
                                     note="our loop; non-padding tokens", naive=side["naive"]["tokens_per_s"]),
    }


def speedup_causes(side: dict) -> dict:
    """Where the naive loop's extra time goes, per phase (seconds per block, naive minus ours)."""
    ours, naive = side["ours"]["phases_s"], side["naive"]["phases_s"]
    prep = {"ours": ours.get("collate", 0.0), "naive": naive.get("tokenize", 0.0)}
    out = {"batch_preparation": prep["naive"] - prep["ours"]}
    for phase in ("forward", "backward", "optimizer"):
        out[phase] = naive.get(phase, 0.0) - ours.get(phase, 0.0)
    return out
