"""The study's pruner, chosen in the space file's `pruner:` block and built from Optuna's own classes.

    pruner:
      type: hyperband          # one of PRUNERS
      reduction_factor: 3      # any keyword of that Optuna class (the options each takes are its own)
      patience: 1              # optional: wrap it in optuna.pruners.PatientPruner (with min_delta)

Steps are epochs (1-based): train() calls back after every epoch with the dev score of the
selection sample (train.eval_limit rows per task), and that is what the pruner compares.
Optuna's WilcoxonPruner is not offered: it compares per-instance scores (a step is one
evaluation instance, the same set for every trial), not the points of a learning curve.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

from pipeline.errors import ConfigError

# type in the space file -> Optuna class name
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
}
WRAPPER = ("patience", "min_delta")  # optuna.pruners.PatientPruner around any of them


def pruner_class(kind: str):
    import optuna

    return getattr(optuna.pruners, PRUNERS[kind])


def pruner_options(kind: str) -> list[str]:
    """The keyword options of a pruner type: its Optuna class's own signature."""
    params = inspect.signature(pruner_class(kind).__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def parse_pruner(block: Any, where: str) -> dict:
    """Check a `pruner:` block's names (values are checked by building it); returns it with its type."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: must map type and options, e.g. {{type: median, n_warmup_steps: 2}}")
    block = dict(block)
    kind = block.setdefault("type", "median")
    if kind not in PRUNERS:
        raise ConfigError(f"{where}.type={kind!r} is not one of {', '.join(PRUNERS)}")
    allowed = pruner_options(kind)
    for name in block:
        if name != "type" and name not in allowed and name not in WRAPPER:
            raise ConfigError(f"{where}.{name} is not an option of the {kind} pruner; it takes "
                              f"{', '.join(allowed + list(WRAPPER)) or ', '.join(WRAPPER)}")
    if "min_delta" in block and "patience" not in block:
        raise ConfigError(f"{where}.min_delta needs patience (it belongs to the patient wrapper)")
    return block


def build_pruner(block: dict, max_epochs: int, where: str = "pruner"):
    """The Optuna pruner of a parsed block; hyperband's max_resource defaults to the longest trial's epochs.

    A value Optuna refuses is a one-line ConfigError naming the option.
    """
    import optuna

    kind = block["type"]
    options = {k: v for k, v in block.items() if k != "type" and k not in WRAPPER}
    if kind == "hyperband":
        options.setdefault("max_resource", max_epochs)
    if kind == "successive_halving":
        options.setdefault("min_resource", 1)  # 'auto' would guess it from the first finished trial
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PatientPruner and some options are 'experimental' in Optuna's terms
            pruner = pruner_class(kind)(**options) if kind != "none" else None
            if kind == "hyperband":  # its brackets are successive-halving pruners, built lazily: check them now
                optuna.pruners.SuccessiveHalvingPruner(
                    min_resource=options.get("min_resource", 1), reduction_factor=options.get("reduction_factor", 3),
                    bootstrap_count=options.get("bootstrap_count", 0))
            if "patience" in block:
                pruner = optuna.pruners.PatientPruner(pruner, patience=block["patience"],
                                                      min_delta=block.get("min_delta", 0.0))
    except (TypeError, ValueError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in block.items() if k != "type")
        raise ConfigError(f"{where}: the {kind} pruner refuses {shown} ({str(err).splitlines()[0]})") from None
    return pruner if pruner is not None else optuna.pruners.NopPruner()


def describe(block: dict) -> str:
    """'hyperband (reduction_factor=3, min_resource=1) with patience 1' for reports and logs."""
    options = ", ".join(f"{k}={v}" for k, v in block.items() if k not in ("type", *WRAPPER))
    text = block["type"] + (f" ({options})" if options else "")
    if "patience" in block:
        text += f", patient wrapper (patience={block['patience']}, min_delta={block.get('min_delta', 0.0)})"
    return text
