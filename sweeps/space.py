"""The Optuna search space: read from a YAML file, sampled per trial into config overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.config import EXTENSIONS, SECTION_CLASSES
from pipeline.errors import ConfigError

Check = Callable[[str, Any], None]  # raises ConfigError when the config refuses key=value

DEFAULT_SPACE = Path(__file__).with_name("optuna_space.yaml")
# The on/off switches of the paper; GN and PCG are values of train.balancer instead.
SWITCHES = ("relu", "cos", "loop", "mlm")


@dataclass
class Param:
    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: dict = field(default_factory=dict)


@dataclass
class Space:
    path: str
    switches: list[str]
    params: list[Param]
    sampler: dict
    pruner: dict


def config_check(base_cfg) -> Check:
    """check(key, value) against the typed config, from a composed config (no params.yaml re-read)."""
    from pipeline.config import _set, config_from_dict  # _set: the parser's own name and type check

    def check(key: str, value: Any) -> None:
        tree: dict = {}
        _set(tree, key, value)
        section, name = key.split(".")
        data = base_cfg.to_dict()
        data[section][name] = tree[section][name]
        config_from_dict(data)  # the section's own range and choice checks

    return check


def off_value(key: str) -> Any:
    """The baseline value of a parameter an extension switches (the dataclass default)."""
    section, name = key.split(".")
    f = {f.name: f for f in dataclasses.fields(SECTION_CLASSES[section])}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _check_value(check: Check, where: str, key: str, value: Any) -> None:
    try:  # the typed config is the one judge of what a parameter accepts
        check(key, value)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _param(where: str, key: str, spec: Any, earlier: set[str], check: Check) -> Param:
    if key.count(".") != 1 or key.split(".")[0] not in SECTION_CLASSES:
        raise ConfigError(f"{where}: '{key}' is not a config parameter (section.field)")
    if key == "model.init_from":
        raise ConfigError(f"{where}: model.init_from is the `mlm` switch of `extensions`, not a parameter")
    if key == "train.balancer" and spec == "all":
        from pipeline.balancers import known_balancers

        spec = known_balancers()
    when = {}
    if isinstance(spec, dict):
        when = spec.get("when") or {}
        if not isinstance(when, dict) or any(k not in earlier for k in when):
            raise ConfigError(f"{where}: 'when' must name parameters listed above {key}")
    if isinstance(spec, list) or (isinstance(spec, dict) and "choices" in spec):
        choices = spec if isinstance(spec, list) else spec["choices"]
        if not choices:
            raise ConfigError(f"{where}: {key} has no choices")
        for choice in choices:
            _check_value(check, where, key, choice)
        return Param(key, choices=list(choices), when=when)
    if isinstance(spec, dict) and {"low", "high"} <= set(spec):
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(f"{where}: {key} needs numbers low < high, got {low!r}, {high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: {key} on a log scale needs low > 0")
        for bound in (low, high):
            _check_value(check, where, key, bound)
        return Param(key, low=low, high=high, log=bool(spec.get("log")), integer=bool(spec.get("int")), when=when)
    raise ConfigError(f"{where}: {key} must be a list of choices or {{low, high}}, got {spec!r}")


def load_space(path: str | Path, check: Check) -> Space:
    """Read a search-space file; `check(key, value)` composes the sweep's config with each value.

    Every problem is a one-line ConfigError naming the file and the key.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: search-space file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    unknown = set(raw) - {"sampler", "pruner", "search_space"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; "
                          "expected sampler, pruner, search_space")
    entries = raw.get("search_space") or {}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: search_space must map parameters to their ranges")
    switches = entries.pop("extensions", []) or []
    bad = [s for s in switches if s not in SWITCHES]
    if bad:
        raise ConfigError(f"{path}: search_space.extensions: {', '.join(map(str, bad))} not among {', '.join(SWITCHES)}"
                          " (GN and PCG are train.balancer values)")
    earlier = {f"ext.{s}" for s in switches}
    params = []
    for key, spec in entries.items():
        params.append(_param(f"{path}: search_space.{key}", key, spec, earlier, check))
        earlier.add(key)
    sampler, pruner = raw.get("sampler") or {}, raw.get("pruner") or {}
    for name, block, allowed in (("sampler", sampler, {"seed", "n_startup_trials"}),
                                 ("pruner", pruner, {"n_startup_trials", "n_warmup_steps"})):
        extra = set(block) - allowed
        if extra or any(not isinstance(v, int) or v < 0 for v in block.values()):
            raise ConfigError(f"{path}: {name} takes non-negative integers {', '.join(sorted(allowed))}")
    return Space(str(path), list(switches), params, sampler, pruner)


def mlm_folder(cfg) -> str | None:
    """The further-pretrained backbone folder, when pretrain-mlm has written it."""
    folder = Path(cfg.mlm.output_dir)
    return str(folder) if (folder / "config.json").exists() else None


def suggest(trial, space: Space, mlm_dir: str | None) -> dict:
    """Sample one trial's settings; returns config overrides {section.field: value}."""
    overrides: dict[str, Any] = {}
    chosen: dict[str, Any] = {}
    for ext in space.switches:
        if ext == "mlm" and not mlm_dir:
            continue
        chosen[f"ext.{ext}"] = on = trial.suggest_categorical(f"ext.{ext}", [False, True])
        for key, value in EXTENSIONS[ext].items():
            overrides[key] = (mlm_dir if ext == "mlm" else value) if on else off_value(key)
    for p in space.params:
        if any(chosen.get(k) != v for k, v in p.when.items()):
            continue
        if p.choices is not None:
            value = trial.suggest_categorical(p.key, p.choices)
        elif p.integer:
            value = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            value = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)
        chosen[p.key] = overrides[p.key] = value
    return overrides
