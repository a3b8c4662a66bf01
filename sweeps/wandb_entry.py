"""Entry point of W&B sweeps: `wandb agent` runs `python -m sweeps.wandb_entry key=value ...`.

It opens the W&B run, reads the sweep's parameters from `wandb.config`, maps
them onto the typed config, then calls the pipeline's own train() and
run_evaluate(), so a W&B sweep trains exactly what `dvc repro` trains.
Parameter keys are config parameters (`train.lr`, `model.dropout`, ...) plus
  extensions   the paper's switches joined by '+', e.g. cos+relu+pcg (or 'baseline')
  experiment   a params.yaml experiment to start from
  profile      a params.yaml profile
Runs go to <runs_dir>/wandb/<sweep id>/<run id>/ with the usual run record.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import EXTENSIONS, SECTION_CLASSES, load_config, parse_override
from pipeline.errors import ConfigError

log = logging.getLogger("sweeps.wandb")

SPECIAL = ("experiment", "profile", "extensions")


def parse_extensions(value: Any) -> list[str]:
    """'cos+relu' / ['cos', 'relu'] / 'baseline' -> ['cos', 'relu']."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", "+").split("+")
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    names = [n for n in names if n not in ("baseline", "none")]
    unknown = [n for n in names if n not in EXTENSIONS]
    if unknown:
        raise ConfigError(f"extensions={value!r}: unknown {', '.join(unknown)} (known: {', '.join(EXTENSIONS)})")
    return names


def split_settings(settings: dict) -> tuple[str | None, str | None, list[str], dict]:
    """W&B parameters -> (experiment, profile, extensions, {section.field: value})."""
    overrides: dict[str, Any] = {}
    for key, value in settings.items():
        if key.startswith("_") or key in SPECIAL:  # _wandb and friends are W&B's own
            continue
        if isinstance(value, dict) and key in SECTION_CLASSES:  # nested form {'train': {'lr': ...}}
            overrides.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            overrides[key] = value
    experiment = settings.get("experiment") or None
    profile = settings.get("profile") or None
    return experiment, profile, parse_extensions(settings.get("extensions")), overrides


def config_from_settings(settings: dict, params: str = "params.yaml", profile: str | None = None,
                         base: list[str] | None = None, extra: dict | None = None):
    """The typed config of one sweep run; a bad key or value is a one-line ConfigError naming it."""
    experiment, sweep_profile, extensions, overrides = split_settings(settings)
    base_overrides = dict(parse_override(o) for o in (base or []))
    profile = sweep_profile or profile

    def compose(ext_overrides: dict):
        # Like an experiment: its extensions first, then explicit parameters win.
        return load_config(params, experiment=experiment, profile=profile,
                           overrides={**base_overrides, **ext_overrides, **overrides, **(extra or {})})

    ext_overrides = {k: v for ext in extensions if ext != "mlm" for k, v in EXTENSIONS[ext].items()}
    if "mlm" in extensions:  # the further-pretrained backbone lives where this config's mlm stage writes it
        ext_overrides["model.init_from"] = compose(ext_overrides).mlm.output_dir
    return compose(ext_overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.wandb_entry", description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="sweep parameters (the agent passes them; the run's wandb.config has the last word)")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile from params.yaml; default: its `profile` key")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="base override under the sweep's parameters (repeatable)")
    p.add_argument("--no-evaluate", action="store_true", help="train only; skip the evaluate stage")
    return p


def run(args) -> dict:
    """Open the W&B run, train and evaluate the configuration it holds; return the dev metrics."""
    import wandb

    from pipeline.stages import run_evaluate
    from pipeline.tracking import run_origin, update_record, wandb_mode
    from pipeline.train import train

    settings = dict(parse_override(s) for s in args.settings)
    base_cfg = config_from_settings({}, args.params, args.profile, args.overrides)
    runs_dir = Path(base_cfg.tracking.runs_dir) / "wandb"
    runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    wb_run = wandb.init(project=os.environ.get("WANDB_PROJECT") or base_cfg.tracking.wandb_project, config=settings,
                        dir=str(runs_dir), mode=wandb_mode(),
                        settings=wandb.Settings(console="off", silent=True, init_timeout=120))
    exit_code = 1
    try:
        settings = dict(wb_run.config)  # under an agent this holds the sweep's choice
        sweep_id = os.environ.get("WANDB_SWEEP_ID") or "no-sweep"
        cfg = config_from_settings(settings, args.params, args.profile, args.overrides,
                                   extra={"tracking.wandb": True, "name": f"wandb-{wb_run.id}"})
        if cfg.model.init_from and not (Path(cfg.model.init_from) / "config.json").exists():
            raise ConfigError(f"model.init_from={cfg.model.init_from}: no pretrained backbone there; "
                              "run `python -m pipeline pretrain-mlm` first")
        run_dir = runs_dir / sweep_id / wb_run.id
        try:
            with run_origin("wandb"):
                train(cfg, run_dir=run_dir)
        finally:
            update_record(run_dir, origin="wandb",
                          wandb={"run_id": wb_run.id, "sweep_id": sweep_id, "params": settings})
        metrics = {} if args.no_evaluate else run_evaluate(cfg, run_dir=run_dir)
        wb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, float)})
        exit_code = 0
        return metrics
    finally:
        wb_run.finish(exit_code=exit_code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.cli import run_guarded

    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
