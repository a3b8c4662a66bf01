"""`python -m pipeline <stage>`: one subcommand per pipeline stage."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.errors import DataError, PipelineError

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
    "params": "list the parameters (section.field): type, default, the value params.yaml gives, allowed values, help",
    "experiments": "list the experiments of params.yaml: extensions, `set` overrides, seeds, paper rows",
}
PARAMS_HINT = ("Parameters: `python -m pipeline params [SECTION]` lists every key with its type, default, allowed "
               "values and help; `python -m pipeline experiments` (or `-e` alone) lists the experiments.")
# The project modules `dispatch` imports per subcommand (pipeline.config: those that call _load);
# tests/test_dvc_deps.py follows their imports to check each DVC stage's code deps.
STAGE_MODULES = {
    "prepare": ("pipeline.config", "pipeline.prepare"),
    "pretrain-mlm": ("pipeline.config", "pipeline.mlm"),
    "train": ("pipeline.config", "pipeline.train", "pipeline.stages"),  # pipeline.stages: --evaluate
    "evaluate": ("pipeline.config", "pipeline.stages", "pipeline.external"),  # pipeline.external: --data-dir
    "predict": "pipeline.predict",
    "export": "pipeline.export",
    "report": ("pipeline.config", "pipeline.report"),
    "sweep": "sweeps.optuna_sweep",
    "summary": "pipeline.stages",
    "cache": ("pipeline.config", "pipeline.cache"),
    "params": "pipeline.config",
    "experiments": "pipeline.config",
}


LIST_EXPERIMENTS = object()  # the value of a bare `-e`: list the experiments instead of running


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _config_args(p: argparse.ArgumentParser, experiment: bool = True, overrides: bool = True) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None,
                   help="profile from params.yaml (cpu, paper, micro, ...); default: its `profile` key")
    if experiment:
        p.add_argument("--experiment", "-e", nargs="?", const=LIST_EXPERIMENTS, default=None, metavar="NAME",
                       help="experiment name from params.yaml `experiments`; -e alone lists them")
        p.add_argument("--seed", type=int, default=None, help="override train.seed")
    if overrides:
        p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter, e.g. -S train.lr=1e-4 (repeatable; "
                            "`python -m pipeline params` lists them)")
    else:  # taken only to be refused with the reason (dispatch), not as an unknown argument
        p.add_argument("--set", "-S", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m pipeline", epilog=PARAMS_HINT,
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
    p = sub.add_parser("train", help=STAGE_HELP["train"], description=STAGE_HELP["train"], epilog=PARAMS_HINT)
    _config_args(p)
    p.add_argument("--run-dir", default=None,
                   help="output folder (default: runs/study/<experiment>/s<seed>; with -S or --profile, "
                        "runs/adhoc/<experiment>/s<seed>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--evaluate", action="store_true",
                   help="then run the evaluate stage in the same process (saves a process start per experiment)")
    p = sub.add_parser("evaluate", help=STAGE_HELP["evaluate"], description=STAGE_HELP["evaluate"])
    _config_args(p)
    p.add_argument("--run-dir", default=None,
                   help="run folder (default: as for train: runs/study/<experiment>/s<seed>, or runs/adhoc/... "
                        "with -S or --profile)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="score on the labelled CS224N-format files in DIR instead of the prepared dev sets: "
                        "writes RUN/eval/NAME/ (metrics with bootstrap intervals, predictions, bad-row report) "
                        "and leaves the run's metrics.json alone")
    p.add_argument("--name", default=None, help="with --data-dir: the folder under RUN/eval (default: DIR's name)")
    p.add_argument("--strict", action="store_true", help="with --data-dir: fail on the first bad row")
    p = sub.add_parser("report", help=STAGE_HELP["report"], description=STAGE_HELP["report"])
    _config_args(p, experiment=False, overrides=False)  # it reads the params file and the run records only
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
    p.add_argument("--pruner", default=None, metavar="TYPE",
                   help="another pruner type than the space file's (none, median, hyperband, ...: sweeps/pruners.py), "
                        "with Optuna's defaults")
    p.add_argument("--report-only", action="store_true",
                   help="only write reports/sweeps/<study>/ again from the storage (no trials run)")
    p.add_argument("--export-wandb", default=None, metavar="FILE",
                   help="only write a W&B sweep file generated from the search space (see --method)")
    p.add_argument("--method", default="bayes", choices=("bayes", "random", "grid"),
                   help="W&B search method of --export-wandb (default: bayes)")
    p = sub.add_parser("summary", help=STAGE_HELP["summary"], description=STAGE_HELP["summary"])
    p.add_argument("--runs-dir", default="runs", help="runs folder (default: runs)")
    p = sub.add_parser("params", help=STAGE_HELP["params"], description=STAGE_HELP["params"], epilog=PARAMS_HINT)
    p.add_argument("section", nargs="?", default=None, metavar="SECTION",
                   help="a section such as train, or one key such as train.lr (default: every section)")
    p.add_argument("--params", default=None,
                   help="params file whose values (with its profile) are shown beside the defaults "
                        "(default: params.yaml when there is one)")
    p.add_argument("--profile", default=None, help="profile to show the values of (default: the file's `profile` key)")
    p = sub.add_parser("experiments", help=STAGE_HELP["experiments"], description=STAGE_HELP["experiments"])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    text = "predict with a trained run: one sentence (or tab-separated pair) per input line, one prediction per line"
    p = sub.add_parser("predict", help=text, description=text)
    p.add_argument("--run-dir", required=True, help="a trained run folder (holds best.safetensors)")
    p.add_argument("--task", required=True, metavar="TASK", help="sst, para, sts (or cfimdb): one the run trained on")
    p.add_argument("--input", default="-", help="input file, '-' for standard input (default)")
    p.add_argument("--output", default="-", help="output file, '-' for standard output (default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sentences per batch (default: the run's eval.batch_size)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    text = "write a trained run as a Hugging Face folder: encoder, tokenizer, heads.safetensors, model card"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("--run-dir", required=True, help="a trained run folder (holds best.safetensors)")
    p.add_argument("--out", required=True, help="the new folder to write (refused when it exists and is not empty)")
    p.add_argument("--params", default="params.yaml",
                   help="params file whose report block sets the dev intervals' bootstrap (default: params.yaml)")
    for choice in {id(c): c for c in sub.choices.values()}.values():  # `-v` after the subcommand too
        try:
            choice.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="debug logging")
        except argparse.ArgumentError:  # the subcommand has a -v of its own
            pass
    return parser


def _load(args, **extra):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    for key, value in extra.items():
        overrides.append(f"{key}={value}")
    cfg = load_config(args.params, experiment=getattr(args, "experiment", None), overrides=overrides,
                      profile=args.profile)
    if args.stage in ("train", "evaluate") and not args.run_dir and _adhoc(args):
        args.run_dir = str(cfg.adhoc_run_dir)
        log.info("-S/--profile given: the run folder is %s (the study's runs/study/... stays untouched)", args.run_dir)
    _preflight(args, cfg)
    return cfg


# Overrides that change where a run is logged or how many threads it uses, not what it computes.
NEUTRAL_OVERRIDES = ("tracking.", "train.threads=")


def _adhoc(args) -> bool:
    """A run whose config differs from params.yaml's: it must not overwrite the study's run folder."""
    return args.profile is not None or any(not o.startswith(NEUTRAL_OVERRIDES) for o in args.overrides)


BEST = "best.safetensors"  # pipeline.train.BEST, not imported: pipeline.train loads torch and transformers


def _check_prepared(cfg) -> None:
    path = Path(cfg.data.prepared_dir) / "report.json"  # what pipeline.data.tokenizer_info reads first
    if not path.exists():
        raise DataError(f"{path}: prepared data missing; run `python -m pipeline prepare` first")


def _check_writable(path: str | Path, what: str) -> None:
    """`path` is a folder, or can be made one, where a file can be created; else one line naming it.
    Probed with an unnamed temporary file in the nearest existing folder: nothing is left behind."""
    path = Path(path)
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise PipelineError(f"{what} {path}: {'it' if base == path else base} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        where = "cannot write in it" if base == path else f"cannot be created in {base}"
        raise PipelineError(f"{what} {path}: {where} ({err.strerror})") from None


def _preflight(args, cfg) -> None:
    """What a stage reads and where it writes, checked in a few file-system calls before it loads a
    model or data: a missing input or an unwritable output is one line at once, not a traceback later."""
    data = cfg.data
    if args.stage == "prepare":
        chosen = data.data_dir or os.environ.get("MINBERT_DATA_DIR", "")
        if chosen and not Path(chosen).expanduser().is_dir():
            raise DataError(f"data folder {chosen} does not exist (set by data.data_dir or MINBERT_DATA_DIR)")
        from pipeline import config  # torch-free

        if not chosen and not (config.SHARED_DATA / "SHA256SUMS").is_file():
            _check_writable(data.cache_dir, "data.cache_dir")  # the official files are downloaded there
        _check_writable(data.prepared_dir, "data.prepared_dir")
    elif args.stage == "cache":
        if cfg.model.freeze_layers > 0:
            _check_prepared(cfg)
        _check_writable(data.prefix_dir, "data.prefix_dir")
    elif args.stage == "pretrain-mlm":
        _check_prepared(cfg)
        _check_writable(cfg.mlm.output_dir, "mlm.output_dir")
    elif args.stage in ("train", "evaluate"):
        run_dir = Path(args.run_dir or cfg.run_dir)
        if args.stage == "evaluate" and not (run_dir / BEST).exists():
            raise PipelineError(f"{run_dir / BEST}: no trained model; run the train stage first")
        if not getattr(args, "data_dir", None):  # evaluate --data-dir scores other files
            _check_prepared(cfg)
        _check_writable(run_dir, "--run-dir" if args.run_dir else "run folder (tracking.runs_dir)")
        if args.stage == "train" and cfg.model.freeze_layers > 0:
            _check_writable(data.prefix_dir, "data.prefix_dir")  # the prefix cache is built when missing


def _width() -> int | None:
    """Wrap listings to the terminal; piped, one line per row (for grep)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _list_experiments(params_path: str) -> None:
    from pipeline.config import experiments_table

    print(experiments_table(params_path, width=_width()))


def dispatch(args) -> int:
    if getattr(args, "experiment", None) is LIST_EXPERIMENTS:  # `-e` without a name
        _list_experiments(args.params)
        return 0
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
        if args.data_dir:
            from pipeline.external import run_evaluate_other

            cfg = _load(args, **({"data.strict": "true"} if args.strict else {}))
            run_evaluate_other(cfg, run_dir=args.run_dir or cfg.run_dir, data_dir=args.data_dir, name=args.name,
                               params_path=args.params)
        elif args.name or args.strict:
            raise PipelineError("evaluate: --name and --strict apply to --data-dir only")
        else:
            from pipeline.stages import run_evaluate

            run_evaluate(_load(args), run_dir=args.run_dir)
    elif args.stage == "report":
        if args.overrides:
            raise PipelineError(f"report takes no -S overrides (got {args.overrides[0]}): it reads the params file "
                                "and the run records only; edit the params file, or pass --params FILE / --profile")
        from pipeline.config import read_params

        read_params(args.params)  # a missing or broken params file, then an unwritable --out: one line at once
        _check_writable(args.out, "--out")
        from pipeline.report import run_report

        run_report(args.params, out_dir=args.out, profile=args.profile)
    elif args.stage == "sweep":
        from sweeps.optuna_sweep import export_wandb, report_only, run_sweep

        if args.export_wandb:
            export_wandb(args)
        elif args.report_only:
            report_only(args)
        else:
            run_sweep(args)
    elif args.stage == "summary":
        if not Path(args.runs_dir).is_dir():
            raise PipelineError(f"--runs-dir {args.runs_dir}: no such folder (nothing trained yet?)")
        from pipeline.stages import run_summary

        print(run_summary(args.runs_dir))
    elif args.stage == "params":
        from pipeline.config import params_table

        # Without --params: params.yaml's values when there is one, else the defaults alone.
        params = args.params or ("params.yaml" if args.profile or Path("params.yaml").exists() else None)
        print(params_table(args.section, params, args.profile, width=_width()))
    elif args.stage == "experiments":
        _list_experiments(args.params)
    elif args.stage == "predict":
        from pipeline.predict import run_predict

        run_predict(args.run_dir, args.task, args.input, args.output, batch_size=args.batch_size,
                    device_name=args.device)
    elif args.stage == "export":
        from pipeline.export import run_export

        run_export(args.run_dir, args.out, params_path=args.params)
    return 0


def run_guarded(action, verbose: bool = False) -> int:
    """Logging set up, offline defaults, then `action()`; a PipelineError, or an OSError on a named
    path (permission denied, read-only file system, no space left), becomes one line and exit 2
    (with `-v` its traceback too). Other exceptions are bugs: they keep their traceback."""
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
        log.debug("raised here:", exc_info=True)
        log.error("%s", err)
        return 2
    except OSError as err:
        if err.filename is None:
            raise
        log.debug("raised here:", exc_info=True)
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        log.error("%s: %s", where, err.strerror or err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error (printed in one line by Parser.error)
        return int(done.code or 0)
    return run_guarded(lambda: dispatch(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
