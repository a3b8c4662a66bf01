"""A W&B sweep file generated from the Optuna search space, so the two front ends share one definition:
`python -m pipeline sweep --export-wandb FILE [--method bayes|random|grid] [--space SPACE]`.

Mapping, key by key:
- `extensions` switch s        -> `ext.s: {values: [false, true]}`
- `fixed` key: v                -> `key: {value: v}`
- choices [a, b]                -> `key: {values: [a, b]}`
- {low, high}                   -> `distribution: uniform`; `log: true` -> `log_uniform_values`;
                                   integers: `int_uniform` (`q_log_uniform_values` with q 1 on a log scale)
- `when:` conditions            -> W&B has none: every key is sampled in every run, and the entry point
                                   (sweeps.wandb_entry, which the file starts with `--space` pointing at the
                                   same space file) applies the space's conditions through the same
                                   `resolve()` as Optuna: an inactive key is dropped, logged and listed in
                                   the run record (`wandb.inactive`). W&B's own importance panel still sees
                                   the dropped values; judge conditional keys on the runs where they apply.
- pruner hyperband / successive_halving -> `early_terminate: {type: hyperband, min_iter, eta}` (W&B's only
                                   early stopping); the other pruners have no W&B counterpart and the file
                                   says so.
The objective is the same: the entry point puts the evaluate step's dev `avg` (params.yaml's eval.dev_limit,
the full dev sets on the cpu and paper profiles) into the run summary; per-epoch `avg` values on the
selection sample are what W&B's Hyperband compares.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline import io as pio
from pipeline.errors import ConfigError
from sweeps.space import Space

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("bayes", "random", "grid")


def _space_path(space: Space) -> str:
    """The space file as the agent sees it from the repository root (relative when inside it)."""
    path = Path(space.path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def wandb_parameters(space: Space, method: str) -> dict:
    params: dict = {}
    for s in space.switches:
        params[f"ext.{s}"] = {"values": [False, True]}
    for key, value in space.fixed.items():
        params[key] = {"value": value}
    for p in space.params:
        if p.choices is not None:
            params[p.key] = {"values": list(p.choices)}
            continue
        if method == "grid":
            raise ConfigError(f"{space.path}: search_space.{p.key} is a range; --method grid needs choices "
                              "for every parameter (use bayes or random)")
        if p.integer:
            dist = {"distribution": "q_log_uniform_values", "q": 1} if p.log else {"distribution": "int_uniform"}
            params[p.key] = {**dist, "min": int(p.low), "max": int(p.high)}
        else:
            dist = "log_uniform_values" if p.log else "uniform"
            params[p.key] = {"distribution": dist, "min": float(p.low), "max": float(p.high)}
    return params


def wandb_config(space: Space, method: str = "bayes", name: str | None = None) -> dict:
    """The W&B sweep config of a search space (a dict in W&B's sweep schema)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    config = {
        "name": name or f"minbert-{method}",
        "program": "sweeps/wandb_entry.py",
        "command": ["${env}", "${interpreter}", "-m", "sweeps.wandb_entry", "--space", _space_path(space),
                    "${args_no_hyphens}"],
        "method": method,
        "metric": {"name": "avg", "goal": "maximize"},
    }
    pruner = space.pruner
    if pruner["type"] in ("hyperband", "successive_halving") and method != "grid":
        config["early_terminate"] = {"type": "hyperband", "min_iter": int(pruner.get("min_resource", 1)),
                                     "eta": int(pruner.get("reduction_factor", 3 if pruner["type"] == "hyperband"
                                                                            else 4))}
    config["parameters"] = wandb_parameters(space, method)
    return config


def wandb_yaml(space: Space, method: str = "bayes") -> str:
    config = wandb_config(space, method)
    pruner = space.pruner["type"]
    stopping = (f"early stopping: W&B's Hyperband, from the space's {pruner} pruner" if "early_terminate" in config
                else f"no early stopping: the space's {pruner} pruner has no W&B counterpart (W&B has Hyperband only)")
    header = [
        f"# GENERATED from {_space_path(space)} by",
        f"#   python -m pipeline sweep --export-wandb FILE --method {method}",
        "# Do not edit: change the space file and regenerate (tests/test_sweep_space.py checks they agree).",
        f"# W&B {method} search over the same keys as the Optuna study;",
        f"# {stopping}.",
        "# `when:` conditions: W&B samples every key in every run; sweeps.wandb_entry (given the space with",
        "# --space) drops the keys whose conditions fail, as the Optuna study never samples them.",
        "# ext.mlm applies once `python -m pipeline pretrain-mlm` has written mlm.output_dir (else dropped).",
        "#   wandb sweep FILE && wandb agent ENTITY/PROJECT/SWEEP_ID   (from the repository root)",
    ]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
    return "\n".join(header) + "\n" + body


def export_wandb(space: Space, path: str | Path, method: str = "bayes") -> str:
    text = wandb_yaml(space, method)
    pio.write_text(path, text)
    return os.fspath(path)
