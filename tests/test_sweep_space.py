"""One search space, two front ends: every key of sweeps/optuna_space.yaml checked against the config
(a refused value is one line naming it), its conditions honoured by every sampled trial, and the W&B
sweep file generated from it: the committed one is what the generator writes, W&B's own sweep engine
accepts it, it carries the same keys, and the entry point applies the same conditions."""
from __future__ import annotations

import argparse

import pytest
import yaml

from conftest import PARAMS, ROOT
from test_wandb import generated_runs, sweep_engine  # noqa: F401 (the fixture)


def compose_cpu(extra: dict, base: dict | None = None):
    from pipeline.config import load_config

    return load_config(PARAMS, profile="cpu", overrides={**(base or {}), **extra})


@pytest.fixture(scope="module")
def space():
    from sweeps.space import DEFAULT_SPACE, load_space

    return load_space(DEFAULT_SPACE, compose_cpu)


def raw_space() -> dict:
    from sweeps.space import DEFAULT_SPACE

    return yaml.safe_load(DEFAULT_SPACE.read_text())


def test_space_covers_the_switches_and_the_model_and_train_parameters(space):
    from pipeline.config import EXTENSIONS
    from sweeps.space import SWITCHES

    # The switches come from the config's one list: every extension that is not a balancer value.
    assert SWITCHES == tuple(e for e, implied in EXTENSIONS.items() if "train.balancer" not in implied)
    assert space.switches == ["relu", "cos", "loop", "mlm"]
    keys = {p.key for p in space.params} | set(space.fixed)  # searched, or pinned for the cpu study
    assert keys >= {"train.balancer", "train.gn_alpha", "model.pooling", "model.cos_target", "model.pair_features",
                    "model.para_head", "train.lr", "train.head_lr", "train.lr_schedule", "train.warmup_ratio",
                    "model.dropout", "train.batch_size", "train.epochs"}
    by = {p.key: p for p in space.params}
    assert by["train.lr"].log and by["train.head_lr"].log
    assert by["train.gn_alpha"].when == {"train.balancer": ["gradnorm"]}
    assert by["model.cos_target"].when == {"model.sts_head": ["cos"]}
    assert by["train.batch_size"].choices and all(isinstance(b, int) for b in by["train.batch_size"].choices)
    # The cpu study keeps the profile's frozen prefix: another k needs another prefix cache.
    assert space.fixed["model.freeze_layers"] == compose_cpu({}).model.freeze_layers
    epochs = by["train.epochs"].choices if "train.epochs" in by else [space.fixed["train.epochs"]]
    assert space.max_epochs == max(epochs)


def every_key() -> list[str]:
    raw = raw_space()
    return [k for k in raw["search_space"] if k != "extensions"] + [f"fixed:{k}" for k in raw.get("fixed") or {}]


@pytest.mark.parametrize("key", every_key())
def test_every_key_refuses_a_bad_value_in_one_line_naming_it(tmp_path, key):
    """The default file with one key's values replaced by one the config refuses."""
    from pipeline.config import field_default
    from pipeline.errors import ConfigError
    from sweeps.space import load_space

    raw = raw_space()
    section, name = ("fixed", key[6:]) if key.startswith("fixed:") else ("search_space", key)
    default = field_default(name)
    bad = "not-a-value" if not isinstance(default, str) or name == "train.balancer" else "zz-unknown"
    spec = raw[section][name]
    if section == "fixed":
        raw[section][name] = -1 if isinstance(default, int) else bad
    elif isinstance(spec, dict):
        raw[section][name] = {**{k: v for k, v in spec.items() if k not in ("low", "high", "log")}, "choices": [bad]}
    else:
        raw[section][name] = [bad]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_space(path, compose_cpu)
    message = str(err.value)
    assert str(path) in message and name in message and "\n" not in message
    good = raw_space()[section][name]
    choices = good if isinstance(good, list) else (good.get("choices") if isinstance(good, dict) else None)
    if choices and isinstance(default, str):  # a choice parameter: the message lists what the config allows
        assert all(str(c) in message for c in choices), message


@pytest.mark.parametrize("body, named", [
    ("search_space: {train.nope: [1, 2]}", "train.nope"),
    ("search_space: {train.balancer: [sum, nosuch]}", "train.balancer"),
    ("search_space: {train.lr: {low: 0.0, high: 1.0e-3, log: true}}", "train.lr"),
    ("search_space: {train.gn_alpha: {low: 0.0, high: 3.0, when: {train.balancer: gradnorm}}, "
     "train.balancer: [sum]}", "when"),
    ("search_space: {extensions: [relu, gn], train.lr: [1.0e-3]}", "gn"),
    ("sampler: {seed: -1}\nsearch_space: {train.lr: [1.0e-3]}", "sampler"),
    ("search_space: {train.gn_alpha: {low: 0.0, high: 3.0, when: {train.balancer: nosuch}}, "
     "train.balancer: [sum]}", "train.balancer"),  # 'when' names a later key
    ("search_space: {train.balancer: [sum, pcgrad], "
     "train.gn_alpha: {low: 0.0, high: 3.0, when: {train.balancer: gradnorm}}}", "gradnorm"),  # never chosen
    ("search_space: {train.lr: {low: 1.0e-4, high: 1.0e-3}, model.dropout: {low: 0.1, high: 0.2, "
     "when: {train.lr: 1.0e-4}}}", "train.lr"),  # a condition on a range
    ("search_space: {extensions: [cos], model.sts_head: [concat, cos]}", "model.sts_head"),  # a switch's key
    ("fixed: {train.lr: 1.0e-4}\nsearch_space: {train.lr: [1.0e-3]}", "train.lr"),  # fixed and searched
    ("search_space: {train.batch_size: {low: 8, high: 32, int: false}}", "train.batch_size"),
    ("search_space: {model.pooling: {low: 0, high: 1}}", "model.pooling"),
    ("search_space: {model.dropout: {low: 0.0, high: 1.5}}", "model.dropout"),  # the config's own range
    ("search_space: {model.relu_widths: [[16, 8]]}", "model.relu_widths"),
    ("objective: {ci: 1.5}\nsearch_space: {train.lr: [1.0e-4]}", "ci"),
    ("objective: {metric: loss}\nsearch_space: {train.lr: [1.0e-4]}", "objective.metric"),
    ("sampler: {group: maybe}\nsearch_space: {train.lr: [1.0e-4]}", "sampler.group"),
    ("bogus: 1\nsearch_space: {train.lr: [1.0e-4]}", "bogus"),
])
def test_bad_conditions_and_blocks_are_one_line_errors(tmp_path, body, named):
    from pipeline.errors import ConfigError
    from sweeps.space import load_space

    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, compose_cpu)
    assert str(path) in str(err.value) and named in str(err.value) and "\n" not in str(err.value)


def test_sampled_trials_honour_every_condition(space):
    """200 random trials: a conditional key is sampled exactly when its conditions hold, and every
    trial's overrides compose into a valid config."""
    import optuna

    from sweeps.space import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    conditional = [p for p in space.params if p.when]
    assert conditional
    seen = {p.key: set() for p in conditional}
    for _ in range(200):
        trial = study.ask()
        chosen = suggest(trial, space, mlm_dir="models/mlm-x")
        values = {**chosen, **{k: v for k, v in trial.params.items() if k.startswith("ext.")}}
        for p in conditional:
            holds = all(values.get(k) in accepted for k, accepted in p.when.items())
            assert (p.key in chosen) == holds == (p.key in trial.params), (p.key, values)
            seen[p.key].add(holds)
        study.tell(trial, 0.0)
    assert all(s == {True, False} for s in seen.values())  # each condition was both met and not
    compose_cpu(chosen)


# ------------------------------------------------------------------ W&B files from the same space


def export(tmp_path, method: str = "bayes", **kw):
    from pipeline.cli import main

    out = tmp_path / f"wandb_{method}.yaml"
    argv = ["sweep", "--params", str(PARAMS), "--profile", "cpu", "--export-wandb", str(out), "--method", method]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return main(argv), out


def test_committed_wandb_bayes_file_is_what_the_generator_writes(tmp_path):
    rc, out = export(tmp_path)
    assert rc == 0
    assert out.read_text() == (ROOT / "sweeps" / "wandb_bayes.yaml").read_text(), \
        "regenerate: python -m pipeline sweep --export-wandb sweeps/wandb_bayes.yaml"


@pytest.mark.parametrize("method", ["bayes", "random"])
def test_generated_file_validates_and_carries_the_spaces_keys(tmp_path, method, space, sweep_engine):  # noqa: F811
    from sweeps.wandb_entry import run_config

    rc, out = export(tmp_path, method)
    config = yaml.safe_load(out.read_text())
    assert rc == 0 and config["method"] == method
    sweep_engine.SweepConfig(config)  # W&B's schema validation
    assert list(config["parameters"]) == space.keys()
    assert config["command"][2:6] == ["-m", "sweeps.wandb_entry", "--space", "sweeps/optuna_space.yaml"]
    runs = generated_runs(sweep_engine, config)
    assert len(runs) >= 2
    base = ["mlm.output_dir=/nonexistent/mlm"]  # no MLM backbone here: ext.mlm is dropped, as Optuna drops it
    for settings in runs:
        cfg, dropped = run_config(settings, PARAMS, "cpu", base, space=str(ROOT / "sweeps" / "optuna_space.yaml"))
        assert cfg.model.freeze_layers == 5  # fixed
        assert (cfg.model.heads == "relu") == settings["ext.relu"]
        assert (cfg.train.schedule == "loop") == settings["ext.loop"]
        gn = settings["train.balancer"] == "gradnorm"
        assert ("train.gn_alpha" in dropped) == (not gn)
        assert cfg.train.gn_alpha == (pytest.approx(settings["train.gn_alpha"]) if gn else 1.0)
        assert ("model.cos_target" in dropped) == (not settings["ext.cos"])
        assert ("ext.mlm" in dropped) == settings["ext.mlm"] and cfg.model.init_from == ""
        for key in ("train.lr", "model.dropout", "train.batch_size", "train.epochs", "model.pooling"):
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == pytest.approx(settings[key]), key


def test_grid_export_needs_choices_and_the_grid_files_use_the_spaces_keys(tmp_path, space, caplog):
    rc, out = export(tmp_path, "grid")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert rc == 2 and not out.exists()
    assert len(errors) == 1 and "grid" in errors[0] and "range" in errors[0] and "\n" not in errors[0]
    # The hand-written grids (Table 2, Table 4's alpha) vary keys the space also has.
    for name in ("wandb_grid.yaml", "wandb_gn_alpha.yaml"):
        keys = set(yaml.safe_load((ROOT / "sweeps" / name).read_text())["parameters"])
        assert keys - {"extensions"} <= set(space.keys()), name


def test_pruner_override_and_hyperband_export(tmp_path, sweep_engine):  # noqa: F811
    rc, out = export(tmp_path, pruner="hyperband")
    config = yaml.safe_load(out.read_text())
    assert rc == 0 and config["early_terminate"] == {"type": "hyperband", "min_iter": 1, "eta": 3}
    sweep_engine.SweepConfig(config)
    from pipeline.errors import ConfigError
    from sweeps.optuna_sweep import SweepSpec

    with pytest.raises(ConfigError, match="--pruner 'wilcoxon' is not one of none, median"):
        SweepSpec.from_args(argparse.Namespace(pruner="wilcoxon", params=str(PARAMS), profile="cpu")).load_space()
