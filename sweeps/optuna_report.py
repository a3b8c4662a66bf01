"""What a finished study leaves in reports/sweeps/<study>/: the best params as overrides that
`dvc exp run -S` applies, and optimisation-history, parameter-importance and intermediate-value figures."""
from __future__ import annotations

import logging
import re
import shlex
import warnings
from collections import Counter
from pathlib import Path

import yaml

from pipeline import io as pio
from pipeline.config import EXTENSIONS, experiment_overrides, read_params

log = logging.getLogger("sweeps.optuna")

FIGURES = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "intermediate_values": "plot_intermediate_values",
}


def experiment_key(study: str) -> str:
    """The params.yaml experiment the best trial becomes."""
    return "sweep_" + re.sub(r"[^A-Za-z0-9_]", "_", study)


def hydra_value(value) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ -]*[A-Za-z0-9_]", text) and text.lower() not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_spec(spec, overrides: dict) -> tuple[list[str], dict]:
    """The best trial as params.yaml experiment data: (extensions, flat `set` overrides).

    Its effective settings (the base experiment's, then the trial's) are written as the
    paper's extensions wherever they match one, the rest as explicit parameters.
    """
    flat = experiment_overrides(read_params(spec.params), spec.base_experiment) if spec.base_experiment else {}
    flat.update(overrides)
    extensions = [ext for ext, implied in EXTENSIONS.items() if all(flat.get(k) == v for k, v in implied.items())]
    for ext in extensions:
        for key in EXTENSIONS[ext]:
            flat.pop(key, None)
    return extensions, flat


def dvc_set_args(spec, overrides: dict) -> list[str]:
    """`-S` values that add the best trial to params.yaml as its own experiment.

    The experiment's `set` block outranks the profile, so the tuned values win whatever
    `profile` params.yaml selects; joining a `train_groups` list gives it its own stages.
    """
    key = experiment_key(spec.study)
    extensions, settings = experiment_spec(spec, overrides)
    args = [f"++experiments.{key}.extensions={hydra_value(extensions)}", f"++experiments.{key}.set={{}}"]
    args += [f"++experiments.{key}.set.{k}={hydra_value(v)}" for k, v in settings.items()]
    groups = read_params(spec.params).get("train_groups")
    if isinstance(groups, dict):  # dvc.yaml trains the experiments these lists name
        group = "mlm" if "mlm" in extensions else "backbone"
        names = [n for n in groups.get(group) or [] if n != key] + [key]
        args.append(f"++train_groups.{group}={hydra_value(names)}")
    return args


def _save_figure(study, name: str, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna calls its matplotlib backend 'experimental'
            ax = getattr(ovm, FIGURES[name])(study)
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        pio.write_with(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return True
    except Exception as err:  # e.g. importances need two finished trials: the other files still come
        log.warning("%s: figure skipped (%s: %s)", name, type(err).__name__, err)
        plt.close("all")
        return False


def write_reports(study, spec) -> dict:
    """Write the best params, the dvc command and the figures; return what was written."""
    import optuna

    out = Path(spec.reports_dir) / spec.study
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        log.warning("study %s has no completed trial yet (%s); no reports written", spec.study, dict(counts) or "empty")
        return {}
    best = study.best_trial
    overrides = dict(best.user_attrs.get("overrides", {}))
    header = (f"# Best trial of Optuna study '{spec.study}': trial {best.number}, dev avg {best.value:.4f}\n"
              f"# (profile {spec.profile or 'from params.yaml'}, base experiment {spec.base_experiment or 'none'}"
              + (f", sweep overrides not included: {' '.join(spec.overrides)}" if spec.overrides else "") + ")\n"
              "# Apply with the command in dvc_exp_run.txt, or: python -m pipeline train -S KEY=VALUE ...\n")
    pio.write_text(out / "best_params.yaml", header + yaml.safe_dump(overrides, sort_keys=False))
    set_args = dvc_set_args(spec, overrides)
    key = experiment_key(spec.study)
    command = "dvc exp run " + " ".join(f"-S {shlex.quote(a)}" for a in set_args)
    direct = "python -m pipeline train " + " ".join(
        [f"--profile {shlex.quote(spec.profile)}"] * bool(spec.profile)
        + [f"-e {shlex.quote(spec.base_experiment)}"] * bool(spec.base_experiment)
        + [f"-S {shlex.quote(f'{k}={v}')}" for k, v in {"name": key, **overrides}.items()])
    pio.write_text(out / "dvc_exp_run.txt", (
        f"# Adds the best trial of study '{spec.study}' to params.yaml as experiment '{key}' and runs\n"
        f"# the pipeline in a DVC experiment (only the new experiment's train / evaluate stages run).\n"
        f"{command}\n\n# The same training without DVC:\n{direct}\n"))
    figures = [name for name in FIGURES if _save_figure(study, name, out)]
    summary = {
        "study": spec.study, "best_trial": best.number, "best_value": best.value, "metric": "avg",
        "params": best.params, "overrides": overrides, "run_dir": best.user_attrs.get("run_dir"),
        "experiment": key, "dvc_set": set_args, "trials": dict(counts), "figures": figures,
        "base": {"params": spec.params, "profile": spec.profile, "base_experiment": spec.base_experiment,
                 "overrides": list(spec.overrides)},
    }
    pio.write_json(out / "best_trial.json", summary)
    log.info("study %s: best dev avg %.4f (trial %d); %s", spec.study, best.value, best.number, out)
    return summary
