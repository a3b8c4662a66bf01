"""`python -m benchmarks.gpu_step`: the paper profile's training step time on a CUDA GPU.

bert-base-uncased, batch 8 per task (profile `paper`), bf16 autocast and fused AdamW, our
loop's step (`pipeline.train.train_step`, through benchmarks.steps.OurStep) on the prepared data.
Prints one line per balancer and writes reports/gpu_step.json. `--compare-fp32` also times fp32 with the default AdamW
(the before/after of autocast + fused). `--random-init` builds bert-base with random weights
(step time does not depend on them) for a machine without the checkpoint in its HF cache.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import numpy as np
import torch

log = logging.getLogger("benchmarks.gpu_step")


def cuda_check() -> None:
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks.gpu_step needs a CUDA GPU: torch {torch.__version__} sees none "
                 f"(torch.cuda.is_available() is False). Install a CUDA build of torch, e.g. "
                 f'make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"')


def build(bench, random_init: bool):
    from transformers import BertConfig, BertModel

    from pipeline.model import build_model

    backbone = BertModel(BertConfig()) if random_init else None  # BertConfig() is bert-base-uncased's shape
    return build_model(bench.cfg.model, bench.tasks, backbone=backbone).to(bench.device)


def time_steps(bench, model, balancer_name: str, steps: int, warmup: int, amp: bool, fused: bool) -> dict:
    """Median step time over blocks of 10 steps, one CUDA sync per block (as the loop runs: async)."""
    from benchmarks.common import PhaseClock, our_optimizer
    from benchmarks.steps import OurStep
    from pipeline.balancers import make_balancer

    cfg = bench.cfg
    optimizer = (our_optimizer(model, cfg, bench.device) if fused else  # else torch's default AdamW (foreach on CUDA)
                 torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                   weight_decay=cfg.train.weight_decay))
    balancer = make_balancer(balancer_name, model, bench.tasks, cfg.train)
    run = OurStep(bench, model, balancer, optimizer, "bf16" if amp else "fp32", cached=False, phases=False)
    rng = np.random.default_rng(0)
    plan = bench.loop_plan(steps + warmup, rng)
    clock = PhaseClock(bench.device, sync=False)
    for step in plan[:warmup]:
        run(step, clock)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    block, times = 10, []
    timed = plan[warmup:]
    for start in range(0, len(timed), block):
        t0 = time.perf_counter()
        for step in timed[start: start + block]:
            run(step, clock)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / len(timed[start: start + block]))
    step_s = statistics.median(times)
    examples = bench.batch_size * len(bench.tasks)
    return {"balancer": balancer_name, "bf16_autocast": amp, "fused_adamw": fused, "step_s": step_s,
            "examples_per_s": examples / step_s, "steps": len(timed),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", default="paper", help="params.yaml profile (default: paper)")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--balancers", default="sum,pcgrad,gradnorm", help="comma-separated (default: sum,pcgrad,gradnorm)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per balancer (default: 40)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    p.add_argument("--compare-fp32", action="store_true", help="also time fp32 with torch's default (unfused) AdamW")
    p.add_argument("--random-init", action="store_true", help="random bert-base weights (no checkpoint needed)")
    p.add_argument("--out", default="reports/gpu_step.json")
    args = p.parse_args(argv)
    cuda_check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from benchmarks.common import Settings, load_bench
    from pipeline import io as pio
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    try:
        cfg = load_config(args.params, overrides=args.overrides, profile=args.profile)
        bench = load_bench(cfg, Settings(device="cuda", threads=0, mode="gpu"))
        model = build(bench, args.random_init)
    except PipelineError as err:
        hint = "" if args.random_init else " (--random-init times the same architecture without the checkpoint)"
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    runs = []
    for name in [b.strip() for b in args.balancers.split(",") if b.strip()]:
        variants = [(True, True)] + ([(False, False)] if args.compare_fp32 else [])
        for amp, fused in variants:
            r = time_steps(bench, model, name, args.steps, args.warmup, amp, fused)
            runs.append(r)
            print(f"{name:10s} bf16={amp!s:5s} fused={fused!s:5s} step {r['step_s'] * 1000:7.1f} ms  "
                  f"{r['examples_per_s']:7.1f} examples/s  peak {r['peak_memory_gib']:.2f} GiB")
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "backbone": cfg.model.backbone,
           "random_init": args.random_init, "batch_size": cfg.train.batch_size, "tasks": bench.tasks, "runs": runs}
    pio.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
