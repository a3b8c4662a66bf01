"""`python -m pipeline <stage>`: one subcommand per pipeline stage."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

STAGE_HELP = {
    "prepare": "validate and tokenise the CS224N files into data/prepared (bad rows reported in report.json)",
    "pretrain-mlm": "further pretrain the backbone on SST sentences with masked language modelling",
    "cache": "compute the frozen prefix (embeddings + lower model.freeze_layers layers) of every prepared split once",
    "train": "train one experiment (multitask or single-task sentiment); resumes from its checkpoint",
    "evaluate": "score a trained run on dev, write metrics.json and CS224N prediction files",
    "report": "regenerate tables, figures and REPORT.md from the run records",
    "sweep": "run an Optuna study over extensions and hyperparameters",
    "summary": "print every evaluated run's dev scores",
}
# The project modules `dispatch` imports per subcommand (pipeline.config: those that call _load);
# tests/test_dvc_deps.py follows their imports to check each DVC stage's code deps.
STAGE_MODULES = {
    "prepare": ("pipeline.config", "pipeline.prepare"),
    "pretrain-mlm": ("pipeline.config", "pipeline.mlm"),
    "train": ("pipeline.config", "pipeline.train", "pipeline.stages"),  # pipeline.stages: --evaluate
    "evaluate": ("pipeline.config", "pipeline.stages"),
    "report": "pipeline.report",
    "sweep": "sweeps.optuna_sweep",
    "summary": "pipeline.stages",
    "cache": ("pipeline.config", "pipeline.cache"),
}


def _config_args(p: argparse.ArgumentParser, experiment: bool = True) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None,
                   help="profile from params.yaml (cpu, paper, micro, ...); default: its `profile` key")
    if experiment:
        p.add_argument("--experiment", "-e", default=None, help="experiment name from params.yaml `experiments`")
        p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. -S train.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Multitask BERT ablation pipeline (SST-5, Quora, STS-B).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    p = sub.add_parser("prepare", help=STAGE_HELP["prepare"], description=STAGE_HELP["prepare"])
    _config_args(p, experiment=False)
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    p = sub.add_parser("pretrain-mlm", help=STAGE_HELP["pretrain-mlm"], description=STAGE_HELP["pretrain-mlm"])
    _config_args(p, experiment=False)
    p = sub.add_parser("cache", help=STAGE_HELP["cache"], description=STAGE_HELP["cache"])
    _config_args(p, experiment=False)
    p = sub.add_parser("train", help=STAGE_HELP["train"], description=STAGE_HELP["train"])
    _config_args(p)
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<experiment>/s<seed>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--evaluate", action="store_true",
                   help="then run the evaluate stage in the same process (saves a process start per experiment)")
    p = sub.add_parser("evaluate", help=STAGE_HELP["evaluate"], description=STAGE_HELP["evaluate"])
    _config_args(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<experiment>/s<seed>)")
    p = sub.add_parser("report", help=STAGE_HELP["report"], description=STAGE_HELP["report"])
    _config_args(p, experiment=False)
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p = sub.add_parser("sweep", help=STAGE_HELP["sweep"], description=STAGE_HELP["sweep"])
    _config_args(p, experiment=False)
    p.add_argument("--study", default="minbert", help="study name (the same name resumes it)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: a local SQLite file); postgresql://... for many machines")
    p.add_argument("--trials", type=int, default=20,
                   help="finished trials the study should hold, over all workers and machines "
                        "(a resumed study runs the rest)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--base-experiment", default=None, help="experiment whose config the search starts from")
    p.add_argument("--space", default=None, help="search-space YAML (default: sweeps/optuna_space.yaml)")
    p.add_argument("--sampler-seed", type=int, default=None, help="TPE sampler seed (default: the space file's)")
    p.add_argument("--reports-dir", default=None, help="where best params and figures go (default: reports/sweeps)")
    p.add_argument("--heartbeat-interval", type=int, default=None, metavar="S",
                   help="seconds between a running trial's heartbeats (default: 60)")
    p.add_argument("--grace-period", type=int, default=None, metavar="S",
                   help="seconds without a heartbeat before a trial is failed and retried (default: 2x the interval)")
    p.add_argument("--max-retry", type=int, default=None, help="retries of a trial whose worker died (default: 3)")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for a locked or unreachable storage before failing (default: 60)")
    p = sub.add_parser("summary", help=STAGE_HELP["summary"], description=STAGE_HELP["summary"])
    p.add_argument("--runs-dir", default="runs", help="runs folder (default: runs)")
    return parser


def _load(args, **extra):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    for key, value in extra.items():
        overrides.append(f"{key}={value}")
    return load_config(args.params, experiment=getattr(args, "experiment", None), overrides=overrides,
                       profile=args.profile)


def dispatch(args) -> int:
    if args.stage == "prepare":
        from pipeline.prepare import run_prepare

        run_prepare(_load(args, **({"data.strict": "true"} if args.strict else {})))
    elif args.stage == "pretrain-mlm":
        from pipeline.mlm import run_mlm

        run_mlm(_load(args))
    elif args.stage == "cache":
        from pipeline.cache import run_cache

        run_cache(_load(args))
    elif args.stage == "train":
        from pipeline.train import train

        cfg = _load(args)
        best = train(cfg, run_dir=args.run_dir, resume=not args.no_resume)
        log.info("%s best dev: %s", cfg.name, " ".join(f"{k}={v:.4f}" for k, v in best.items() if isinstance(v, float)))
        if args.evaluate:
            from pipeline.stages import run_evaluate

            run_evaluate(cfg, run_dir=args.run_dir)
    elif args.stage == "evaluate":
        from pipeline.stages import run_evaluate

        run_evaluate(_load(args), run_dir=args.run_dir)
    elif args.stage == "report":
        from pipeline.report import run_report

        run_report(args.params, out_dir=args.out, profile=args.profile)
    elif args.stage == "sweep":
        from sweeps.optuna_sweep import run_sweep

        run_sweep(args)
    elif args.stage == "summary":
        from pipeline.stages import run_summary

        print(run_summary(args.runs_dir))
    return 0


def run_guarded(action, verbose: bool = False) -> int:
    """Logging set up, offline defaults, then `action()`; a PipelineError becomes one line and exit 2."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        action()
        return 0
    except PipelineError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: dispatch(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
