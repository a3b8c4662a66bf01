"""The search space, one definition for both front ends: read from a YAML file (sweeps/optuna_space.yaml),
sampled per Optuna trial, exported to a W&B sweep file (sweeps/wandb_export.py) and applied to a W&B run
(sweeps/wandb_entry.py) by the same `resolve()`.

Every value is checked against the typed config when the file loads (pipeline.config is the one judge
of what a parameter accepts), so a refused value is a one-line ConfigError naming the file, the key and
what the config allows.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.config import EXTENSIONS, SECTION_CLASSES, field_default
from pipeline.errors import ConfigError, PipelineError
from sweeps.pruners import PRUNERS, build_pruner, parse_pruner

Compose = Callable[[dict], Any]  # {section.field: value} -> the sweep's Config with them (ConfigError if refused)
Check = Callable[[str, Any], None]

DEFAULT_SPACE = Path(__file__).with_name("optuna_space.yaml")
# The paper's on/off switches (ReLU, Cos, Loop, MLM); GN and PCG are values of train.balancer instead.
SWITCHES = tuple(name for name, implied in EXTENSIONS.items() if "train.balancer" not in implied)
SECTIONS = ("sampler", "pruner", "objective", "fixed", "search_space")
SAMPLER_OPTIONS = {"seed": int, "n_startup_trials": int, "n_ei_candidates": int, "group": bool, "constant_liar": bool}
OBJECTIVE_DEFAULTS = {"dev_limit": 0, "n_boot": 1000, "ci": 0.95, "seed": 20240531}
SKIP = object()  # what a `pick` returns for a parameter it has no value for


@dataclass
class Param:
    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: dict = field(default_factory=dict)  # key -> the values under which this parameter is active

    def active(self, values: dict) -> bool:
        """All conditions hold on the values chosen so far (a key not chosen fails its condition)."""
        return all(k in values and values[k] in accepted for k, accepted in self.when.items())


@dataclass
class Space:
    path: str
    switches: list[str]
    params: list[Param]
    fixed: dict
    sampler: dict
    pruner: dict
    objective: dict
    max_epochs: int  # the most epochs a trial can run (hyperband's max_resource)

    def keys(self) -> list[str]:
        """Every name a trial's settings can hold: ext.<switch>, then the fixed and the searched parameters."""
        return [f"ext.{s}" for s in self.switches] + list(self.fixed) + [p.key for p in self.params]

    def with_pruner(self, kind: str | None) -> "Space":
        """The same space with another pruner type (its Optuna defaults unless the file already uses it)."""
        if kind is None or kind == self.pruner["type"]:
            return self
        if kind not in PRUNERS:
            raise ConfigError(f"--pruner {kind!r} is not one of {', '.join(PRUNERS)}")
        block = parse_pruner({"type": kind}, f"--pruner {kind}")
        build_pruner(block, self.max_epochs, f"--pruner {kind}")
        return Space(**{**self.__dict__, "pruner": block})


@contextlib.contextmanager
def _quiet_config():
    """Composing the config once per checked value repeats its params.yaml warnings: shown once elsewhere."""
    logger = logging.getLogger("pipeline.config")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def config_check(compose: Compose) -> Check:
    """check(key, value): compose the sweep's config with key=value; the config's own checks judge it."""

    def check(key: str, value: Any) -> None:
        with _quiet_config():
            compose({key: value})

    return check


def _check_value(check: Check, where: str, key: str, value: Any) -> None:
    try:
        check(key, value)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _key(where: str, key: str) -> None:
    section, _, name = key.partition(".")
    if section not in SECTION_CLASSES or not name:
        raise ConfigError(f"{where}: '{key}' is not a config parameter (section.field, sections: "
                          f"{', '.join(SECTION_CLASSES)})")
    try:
        field_default(key)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if key == "model.init_from":
        raise ConfigError(f"{where}: model.init_from is the `mlm` switch of `extensions`, not a parameter")


def _is_int_field(key: str) -> bool:
    default = field_default(key)
    return isinstance(default, int) and not isinstance(default, bool)


def _param(where: str, key: str, spec: Any, possible: dict, check: Check) -> Param:
    """One search_space entry; `possible` maps each earlier name to the values it can take (None: any)."""
    _key(where, key)
    if key == "train.balancer" and spec == "all":
        from pipeline.balancers import known_balancers

        spec = known_balancers()
    when: dict = {}
    if isinstance(spec, dict):
        extra = set(spec) - {"choices", "low", "high", "log", "int", "when"}
        if extra:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(extra))}; "
                              "use choices, or low/high (log, int), and when")
        raw_when = spec.get("when") or {}
        if not isinstance(raw_when, dict):
            raise ConfigError(f"{where}: 'when' must map earlier parameters to a value or a list of values")
        for name, accepted in raw_when.items():
            accepted = list(accepted) if isinstance(accepted, list) else [accepted]
            if name not in possible:
                raise ConfigError(f"{where}: 'when' names {name}, which is not a switch (ext.<name>), a fixed "
                                  f"parameter, a parameter a switch sets, or a parameter listed above {key}")
            if possible[name] is None:
                raise ConfigError(f"{where}: 'when' on {name}, a range; conditions need a choice parameter")
            never = [v for v in accepted if v not in possible[name]]
            if never:
                raise ConfigError(f"{where}: 'when' {name}={never[0]!r} never happens; {name} takes "
                                  f"{', '.join(map(str, possible[name]))}")
            when[name] = accepted
    if isinstance(spec, list) or (isinstance(spec, dict) and "choices" in spec):
        choices = spec if isinstance(spec, list) else spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {key} needs a non-empty list of choices")
        for choice in choices:
            if not isinstance(choice, (str, int, float, bool)):
                raise ConfigError(f"{where}: {key} choice {choice!r} must be a single value (a string or a number)")
            _check_value(check, where, key, choice)
        return Param(key, choices=list(choices), when=when)
    if isinstance(spec, dict) and {"low", "high"} <= set(spec):
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(f"{where}: {key} needs numbers low < high, got {low!r}, {high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: {key} on a log scale needs low > 0")
        integer = bool(spec.get("int", _is_int_field(key)))
        if _is_int_field(key) and not integer:
            raise ConfigError(f"{where}: {key} is an integer parameter; drop `int: false`")
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: {key} is an integer parameter; low and high must be integers")
        if not isinstance(field_default(key), (int, float)) or isinstance(field_default(key), bool):
            raise ConfigError(f"{where}: {key} is not numeric; list its choices instead of low/high")
        for bound in (low, high):
            _check_value(check, where, key, bound)
        return Param(key, low=low, high=high, log=bool(spec.get("log")), integer=integer, when=when)
    raise ConfigError(f"{where}: {key} must be a list of choices, {{choices: [...], when: ...}} "
                      f"or {{low: x, high: y}}, got {spec!r}")


def _block(raw: dict, name: str, path: Path) -> dict:
    block = raw.get(name)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: {name} must be a mapping")
    return dict(block)


def _sampler(block: dict, path: Path) -> dict:
    for name, value in block.items():
        kind = SAMPLER_OPTIONS.get(name)
        if kind is None:
            raise ConfigError(f"{path}: sampler.{name} is not an option; the TPE sampler here takes "
                              f"{', '.join(SAMPLER_OPTIONS)}")
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            what = "a non-negative integer" if kind is int else "true or false"
            raise ConfigError(f"{path}: sampler.{name}={value!r} must be {what}")
    return block


def _objective(block: dict, path: Path) -> dict:
    extra = set(block) - set(OBJECTIVE_DEFAULTS)
    if extra:
        raise ConfigError(f"{path}: objective.{sorted(extra)[0]} is not an option; it takes "
                          f"{', '.join(OBJECTIVE_DEFAULTS)}")
    out = {**OBJECTIVE_DEFAULTS, **block}
    for name in ("dev_limit", "n_boot", "seed"):
        if not isinstance(out[name], int) or isinstance(out[name], bool) or out[name] < 0:
            raise ConfigError(f"{path}: objective.{name}={out[name]!r} must be a non-negative integer")
    from pipeline.report_stats import Bootstrap

    try:  # the report's own bootstrap checks n_boot and ci
        Bootstrap(out["n_boot"], out["ci"], out["seed"])
    except (PipelineError, TypeError) as err:
        raise ConfigError(f"{path}: objective: {err}") from None
    return out


def _max_epochs(params: list[Param], fixed: dict, compose: Compose) -> int:
    for p in params:
        if p.key == "train.epochs":
            return int(max(p.choices) if p.choices is not None else p.high)
    if "train.epochs" in fixed:
        return int(fixed["train.epochs"])
    with _quiet_config():
        return int(compose({}).train.epochs)


def load_space(path: str | Path, compose: Compose) -> Space:
    """Read a search-space file; `compose(overrides)` builds the sweep's config with overrides on top.

    Every problem is a one-line ConfigError naming the file and the key.
    """
    path = Path(path)
    check = config_check(compose)
    if not path.exists():
        raise ConfigError(f"{path}: search-space file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(SECTIONS)}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"expected {', '.join(SECTIONS)}")
    entries = _block(raw, "search_space", path)
    if not entries:
        raise ConfigError(f"{path}: search_space must map parameters to their ranges")
    switches = entries.pop("extensions", []) or []
    if not isinstance(switches, list):
        raise ConfigError(f"{path}: search_space.extensions must list switches from {', '.join(SWITCHES)}")
    bad = [s for s in switches if s not in SWITCHES]
    if bad:
        raise ConfigError(f"{path}: search_space.extensions: {', '.join(map(str, bad))} not among "
                          f"{', '.join(SWITCHES)} (GN and PCG are train.balancer values)")
    fixed = _block(raw, "fixed", path)
    implied = {k for s in switches for k in EXTENSIONS[s]}
    possible: dict[str, list | None] = {}
    for key, value in fixed.items():
        where = f"{path}: fixed.{key}"
        _key(where, key)
        if key in entries or key in implied:
            raise ConfigError(f"{where}: also {'searched' if key in entries else 'set by a switch'}; keep one")
        _check_value(check, where, key, value)
        possible[key] = [value]
    for s in switches:
        possible[f"ext.{s}"] = [False, True]
        for key, on in EXTENSIONS[s].items():
            if key != "model.init_from":
                possible[key] = [field_default(key), on]
    params = []
    for key, spec in entries.items():
        param = _param(f"{path}: search_space.{key}", key, spec, possible, check)
        if key in implied:
            raise ConfigError(f"{path}: search_space.{key} is set by a switch of `extensions`; search one of them")
        params.append(param)
        possible[key] = param.choices
    sampler = _sampler(_block(raw, "sampler", path), path)
    max_epochs = _max_epochs(params, fixed, compose)
    pruner = parse_pruner(raw.get("pruner"), f"{path}: pruner")
    build_pruner(pruner, max_epochs, f"{path}: pruner")  # Optuna's own checks of the values, now
    objective = _objective(_block(raw, "objective", path), path)
    return Space(str(path), list(switches), params, fixed, sampler, pruner, objective, max_epochs)


def mlm_folder(cfg) -> str | None:
    """The further-pretrained backbone folder, when pretrain-mlm has written it."""
    folder = Path(cfg.mlm.output_dir)
    return str(folder) if (folder / "config.json").exists() else None


def resolve(space: Space, pick: Callable[[str, Param | None], Any], mlm_dir: str | None) -> dict:
    """One trial's config overrides {section.field: value}: the fixed values, each switch's settings,
    then every parameter whose conditions hold, in file order.

    `pick(name, param)` gives the value of `ext.<switch>` (param None: True or False) or of a parameter:
    Optuna's trial samples it, a W&B run reads it from its sweep settings (SKIP: leave it unset).
    The MLM switch exists only once pretrain-mlm has written the backbone (`mlm_dir`).
    """
    overrides = dict(space.fixed)
    values = dict(space.fixed)  # what conditions see: switches as ext.<name>, parameters as themselves
    for ext in space.switches:
        if ext == "mlm" and not mlm_dir:
            continue
        on = pick(f"ext.{ext}", None)
        if on is SKIP:
            continue
        values[f"ext.{ext}"] = on = bool(on)
        for key, value in EXTENSIONS[ext].items():
            overrides[key] = values[key] = (mlm_dir if ext == "mlm" else value) if on else field_default(key)
    for p in space.params:
        if not p.active(values):
            continue
        value = pick(p.key, p)
        if value is not SKIP:
            overrides[p.key] = values[p.key] = value
    return overrides


def optuna_pick(trial) -> Callable[[str, Param | None], Any]:
    def pick(name: str, p: Param | None) -> Any:
        if p is None:
            return trial.suggest_categorical(name, [False, True])
        if p.choices is not None:
            return trial.suggest_categorical(p.key, p.choices)
        if p.integer:
            return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)

    return pick


def suggest(trial, space: Space, mlm_dir: str | None) -> dict:
    """Sample one Optuna trial's settings; returns config overrides {section.field: value}."""
    return resolve(space, optuna_pick(trial), mlm_dir)
