"""`python -m benchmarks.run`: every benchmark side by side, into reports/benchmarks.json and benchmarks.md."""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import sys
import time
from pathlib import Path

from benchmarks.common import Settings, attention_of, build_models, load_bench, machine_info

log = logging.getLogger("benchmarks")

SCHEMA_VERSION = 2  # 2: starter-loop headline, FLOP shares, train_step phases
NOTES = [
    "Every step of ours is `pipeline.train.train_step` itself (benchmarks/steps.py::OurStep, which collates the "
    "loop's batches and calls it; phases come from labelling the calls it makes into the model, the balancer and "
    "the optimizer). No copy of the training step lives in benchmarks/.",
    "The headline baseline is a loop written as the CS224N starter code trains (benchmarks/baselines.py): "
    "tokenisation at step time, padding to the batch's longest sequence, shuffled batches, eager attention, fp32, "
    "every layer trained, summed task losses, plain AdamW. `full` is our step on the same computation (every layer, "
    "fp32); `cpu` is the cpu profile's step (model.freeze_layers with the prefix cache, train.precision resolved for "
    "this machine). Every side sees the same examples: ours as the loop draws them (a window of the epoch sampler, "
    "length-bucketed), the baselines the same examples shuffled and cut into batches in that order.",
    "The prefix cache is the `cache` stage's output (data.prefix_dir), built by the benchmark first when missing or "
    "stale (`prefix_cache_s` in the config block); its one-off cost is not in the step times.",
    "FLOP/s: matrix-product FLOPs counted analytically per batch (benchmarks/flops.py; forward 2*N*P_l + 4*n*L^2*d per "
    "layer, backward twice that for trained layers, less for the first layer above a frozen prefix, nothing for "
    "cached layers), executed on the padded shapes, over the median step time; the peak is a large matmul timed in "
    "the same process on the same threads. bf16 on a CPU without AVX-512 BF16/AMX is emulated: reported, not a "
    "native peak.",
    "The balancer overheads run the profile's model through `pipeline.balancers.make_balancer` on the same batches; "
    "`upgrad` stands for the torchjd aggregators.",
    "`make_repro_wall_s` and `dvc_repro_noop_wall_s` come from `make repro` itself (benchmarks/repro_timing.py writes "
    "`reports/repro_timing.json`, split by install, prepare, cache, MLM, training, evaluation and report); "
    "`python -m benchmarks.run --only repro` folds a new file into these reports without rerunning the rest.",
    "`make bench` runs torch on one thread (`BENCH_ARGS=--threads 0` gives torch's default): on this shared 2-core "
    "machine, two threads per process left OpenMP workers waiting on each other and inflated step times many-fold "
    "while other jobs ran. Every side of every comparison runs under the same setting.",
    "The paper profile's GPU step time: `python -m benchmarks.gpu_step` on a CUDA machine (bf16 autocast, fused "
    "AdamW).",
]


SECTIONS = ("train_speed", "overhead", "pcgrad_library", "gradnorm_library", "optimizer", "eval", "memory", "repro",
            "profile")


def run_benchmarks(cfg, settings: Settings, out_dir: str | Path | None = "reports",
                   sections: tuple[str, ...] | None = None) -> dict:
    """Run the benchmarks on cfg's prepared data and backbone; write benchmarks.json/.md into out_dir.

    With `sections`, only those run, and their results replace the same entries of an
    existing benchmarks.json (e.g. `--only repro` after reports/repro_timing.json appears).
    """
    from benchmarks import balancers_bench, profile_step, resources, train_speed
    from benchmarks.findings import findings
    from benchmarks.report import render
    from pipeline import io as pio

    start = time.perf_counter()
    bench = load_bench(cfg, settings)
    res = {"schema_version": SCHEMA_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "mode": settings.mode, "machine": machine_info(settings), "settings": settings.to_dict(),
           "config": {"backbone": cfg.model.backbone, "batch_size": cfg.train.batch_size, "tasks": bench.tasks,
                      "prepared_dir": str(cfg.data.prepared_dir), "max_length": bench.max_length,
                      "para_head": cfg.model.para_head, "eval_batch_size": cfg.eval.batch_size},
           "metrics": {}, "profile": None, "section_s": {}, "findings": [], "notes": list(NOTES)}
    chosen = [n for n in SECTIONS if not sections or n in sections]
    models = None
    if set(chosen) - {"memory", "repro"}:  # the others measure on the models
        models = build_models(bench, full="train_speed" in chosen, starter="train_speed" in chosen)
        res["machine"]["attention_ours"] = attention_of(models.cpu)
        res["config"].update(precision=bench.precision, frozen_layers=models.cpu.frozen_layers,
                             prefix_cache=models.cache_folder, prefix_cache_s=models.cache_s,
                             balancer=cfg.train.balancer)
    ours = models.cpu if models is not None else None
    run = {
        "train_speed": lambda: train_speed.bench_train_speed(bench, models),
        "overhead": lambda: balancers_bench.bench_overheads(bench, ours),
        "pcgrad_library": lambda: balancers_bench.bench_pcgrad_library(bench, ours),
        "gradnorm_library": lambda: balancers_bench.bench_gradnorm_library(bench, ours),
        "optimizer": lambda: resources.bench_optimizer(bench, ours),
        "eval": lambda: resources.bench_eval(bench, ours),
        "memory": lambda: resources.bench_memory(bench),
        "repro": resources.repro_timings,
    }
    for name in chosen:
        t0 = time.perf_counter()
        log.info("benchmark section: %s", name)
        if name == "profile":
            res["profile"] = profile_step.profile_steps(bench, ours)
        else:
            res["metrics"].update(run[name]())
        res["section_s"][name] = time.perf_counter() - t0
        if name == "train_speed" and models is not None:  # the full fine-tuning twins serve that section only
            models.full = models.starter = None
        gc.collect()
    res["machine"]["load_average_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - start
    if out_dir is None:
        res["findings"] = findings(res)
        return res
    out_dir = Path(out_dir)
    previous = out_dir / "benchmarks.json"
    if sections and previous.exists():
        old = pio.read_json(previous)
        if old.get("schema_version") == SCHEMA_VERSION and old.get("mode") == res["mode"]:
            old["metrics"].update(res["metrics"])
            old["section_s"].update(res["section_s"])
            old["profile"] = res["profile"] or old.get("profile")
            old["updated"] = {"at": res["created"], "sections": chosen}
            old["notes"] = res["notes"]
            res = old
    res["findings"] = findings(res)
    pio.write_json(out_dir / "benchmarks.json", res)
    pio.write_text(out_dir / "benchmarks.md", render(res))
    log.info("wrote %s and %s in %.0f s", out_dir / "benchmarks.json", out_dir / "benchmarks.md",
             time.perf_counter() - start)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default="cpu", help="params.yaml profile (default: cpu)")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. -S train.batch_size=8 (repeatable)")
    p.add_argument("--out", default="reports", help="folder for benchmarks.json and benchmarks.md (default: reports)")
    p.add_argument("--smoke", action="store_true", help="a couple of steps per benchmark: checks wiring, not speed")
    p.add_argument("--only", action="append", default=None, metavar="SECTION", choices=SECTIONS,
                   help="run only this section, updating its entries in an existing benchmarks.json "
                        f"({', '.join(SECTIONS)}); repeatable")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed block")
    p.add_argument("--rounds", type=int, default=None, help="at most this many interleaved rounds per comparison")
    p.add_argument("--threads", type=int, default=Settings.threads,
                   help=f"torch CPU threads, 0 for torch's default (default: {Settings.threads})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    hf_logging.set_verbosity_error()
    try:
        cfg = load_config(args.params, overrides=args.overrides, profile=args.profile)
        kw = {k: v for k, v in (("steps", args.steps), ("rounds", args.rounds)) if v is not None}
        kw.update(threads=args.threads, device=args.device)
        settings = Settings.smoke(**kw) if args.smoke else Settings.full(**kw)
        if not (Path(cfg.data.prepared_dir) / "report.json").exists():
            from pipeline.prepare import run_prepare

            log.info("%s is missing: running the prepare stage first", cfg.data.prepared_dir)
            run_prepare(cfg)
        run_benchmarks(cfg, settings, args.out, tuple(args.only) if args.only else None)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
