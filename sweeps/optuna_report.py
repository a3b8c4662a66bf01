"""What a study leaves in reports/sweeps/<study>/, regenerated from its storage alone
(`python -m pipeline sweep --study NAME --report-only`):

    trials.csv            one row per trial: state, params, full-dev avg with its interval, task scores,
                          selection score, epochs run, wall time
    history.png           every trial's full-dev avg with its interval, and the best so far
    intermediate_values.png  the per-epoch selection scores the pruner saw
    importances.png       fANOVA parameter importances (Optuna's), when enough trials finished
    expected_max.png      expected best dev avg vs number of trials and vs compute (Tang et al. 2020,
                          Dodge et al. 2019), with the +- one std band
    best_params.yaml      the best trial's config overrides
    best_trial.json       the same, with its scores and the study's counts
    dvc_exp_run.txt       the ready `dvc exp run -S ...` and `python -m pipeline train -S ...` lines
    SUMMARY.md            all of it in one page
"""
from __future__ import annotations

import csv
import io
import logging
import math
import re
import shlex
import warnings
from collections import Counter
from pathlib import Path

import yaml

from pipeline import io as pio
from pipeline.config import EXTENSIONS, experiment_overrides, read_params
from pipeline.errors import ConfigError
from sweeps.expected_max import expected_max_curve
from sweeps.pruners import describe

log = logging.getLogger("sweeps.optuna")

FIGURES = ("history", "intermediate_values", "importances", "expected_max")
SCORES = ("avg", "avg_lo", "avg_hi", "sst_acc", "para_acc", "sts_corr", "selection_avg")
EXPECTED_AT = (1, 2, 5, 10, 20, 40, 80)



def _repo_relative(path) -> str:
    """A path under the working directory as a relative one (no machine's absolute path in a committed summary)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, TypeError):
        return str(path)

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


def _mlm_output_dir(spec) -> str | None:
    try:
        return spec.config().mlm.output_dir
    except Exception:  # a report regenerated where params.yaml moved on: the MLM folder is then written out
        return None


def experiment_spec(spec, overrides: dict) -> tuple[list[str], dict]:
    """The best trial as params.yaml experiment data: (extensions, flat `set` overrides).

    Its effective settings (the base experiment's, then the trial's) are written as the
    paper's extensions wherever they match one, the rest as explicit parameters.
    """
    flat = experiment_overrides(read_params(spec.params), spec.base_experiment) if spec.base_experiment else {}
    flat.update(overrides)
    mlm_dir = _mlm_output_dir(spec)
    if mlm_dir and flat.get("model.init_from") == mlm_dir:  # the MLM switch: follows mlm.output_dir
        flat["model.init_from"] = EXTENSIONS["mlm"]["model.init_from"]
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


def commands(spec, overrides: dict) -> tuple[list[str], str, str]:
    """(dvc -S values, the `dvc exp run` line, the `python -m pipeline train` line) of the best params."""
    set_args = dvc_set_args(spec, overrides)
    key = experiment_key(spec.study)
    dvc_line = "dvc exp run " + " ".join(f"-S {shlex.quote(a)}" for a in set_args)
    direct = "python -m pipeline train " + " ".join(
        [f"--profile {shlex.quote(spec.profile)}"] * bool(spec.profile)
        + [f"-e {shlex.quote(spec.base_experiment)}"] * bool(spec.base_experiment)
        + [f"-S {shlex.quote(f'{k}={v}')}" for k, v in {"name": key, **overrides}.items()]) + " --evaluate"
    return set_args, dvc_line, direct


# ---------------------------------------------------------------- trials as rows


def wall_seconds(trial) -> float | None:
    if "wall_s" in trial.user_attrs:
        return float(trial.user_attrs["wall_s"])
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_rows(study) -> tuple[list[dict], list[str]]:
    """One dict per trial (trials.csv) and the parameter columns, in the order trials first used them."""
    trials = study.get_trials(deepcopy=False)
    params: list[str] = []
    for t in trials:
        params += [k for k in t.params if k not in params]
    rows = []
    for t in trials:
        attrs = t.user_attrs
        row = {"number": t.number, "state": t.state.name,
               **{k: (t.value if k == "avg" else attrs.get(k)) for k in SCORES},
               "epochs": t.last_step, "wall_s": wall_seconds(t),
               "start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None}
        row.update({k: t.params.get(k) for k in params})
        rows.append(row)
    return rows, params


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def trials_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    pio.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}))
    plt.close(fig)


def plot_history(rows: list[dict], ci: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if done:
        x = [r["number"] for r in done]
        y = [r["avg"] for r in done]
        lo = [r["avg"] - r["avg_lo"] if r["avg_lo"] is not None else 0 for r in done]
        hi = [r["avg_hi"] - r["avg"] if r["avg_hi"] is not None else 0 for r in done]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o", ms=4, capsize=2, color="tab:blue",
                    label=f"finished trial: full-dev avg, {100 * ci:g}% bootstrap interval")
        best, steps = -math.inf, []
        for r in done:
            best = max(best, r["avg"])
            steps.append(best)
        ax.step(x, steps, where="post", color="tab:red", label="best so far")
    pruned = [r["number"] for r in rows if r["state"] == "PRUNED"]
    if pruned:
        ax.plot(pruned, [0.0] * len(pruned), "x", color="tab:gray", transform=ax.get_xaxis_transform(),
                clip_on=False, label="pruned (no full-dev score)")
    ax.set_xlabel("trial")
    ax.set_ylabel("dev avg (full dev sets)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_intermediate(study, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:gray", "FAIL": "tab:red", "RUNNING": "tab:orange"}
    for t in study.get_trials(deepcopy=False):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], "-o", ms=2, lw=0.8, alpha=0.7,
                    color=colors.get(t.state.name, "black"))
    for state, color in colors.items():
        ax.plot([], [], color=color, label=state.lower())
    ax.set_xlabel("epoch")
    ax.set_ylabel("selection-sample dev avg (what the pruner sees)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def importances(study) -> tuple[dict, str]:
    """fANOVA importances over the parameters every finished trial has, or ({}, why not)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials (has {len(done)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as err:
        return {}, str(err).splitlines()[0]
    if not found:
        return {}, "no parameter is shared by every finished trial and varies"
    return {k: float(v) for k, v in found.items()}, ""


def plot_importances(found: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(found)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.35 * len(names)))
    ax.barh(names, [found[n] for n in names], color="tab:blue")
    ax.set_xlabel("fANOVA importance for the full-dev avg (sums to 1)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def expected_curves(rows: list[dict]) -> dict | None:
    """Expected best full-dev avg after n trials (both estimators) and the compute it costs."""
    values = [r["avg"] for r in rows if r["state"] == "COMPLETE" and r["avg"] is not None]
    if not values:
        return None
    spent = sum(r["wall_s"] or 0.0 for r in rows if r["state"] in ("COMPLETE", "PRUNED", "FAIL"))
    return {"tang": expected_max_curve(values), "dodge": expected_max_curve(values, replacement=True),
            "seconds_per_trial": spent / len(values), "n": len(values)}


def plot_expected(curves: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    per = curves["seconds_per_trial"]
    for ax, scale, label in ((axes[0], 1.0, "finished trials n"),
                             (axes[1], per / 60.0, "compute, minutes (n x mean wall time per finished trial, "
                                                   "pruned and failed trials' time included)")):
        for name, style, title in (("tang", "-", "unbiased, without replacement (Tang et al. 2020)"),
                                   ("dodge", "--", "with replacement (Dodge et al. 2019)")):
            c = curves[name]
            x = c.n * scale
            ax.plot(x, c.mean, style, label=title, color="tab:blue" if name == "tang" else "tab:orange")
            ax.fill_between(x, c.mean - c.std, c.mean + c.std, alpha=0.2 if name == "tang" else 0.1,
                            color="tab:blue" if name == "tang" else "tab:orange")
        ax.set_xlabel(label, fontsize=8 if scale != 1.0 else 10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("expected best dev avg (+- 1 std)")
    axes[0].legend(fontsize=8, loc="lower right")
    _save(fig, path)


# ---------------------------------------------------------------- the summary page


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def paired_rows(rows: list[dict], objective: dict, top: int = 5) -> list[dict]:
    """The best finished trials with their paired-bootstrap difference to the best (when their run
    folders, holding dev_predictions.csv, are on this machine)."""
    from sweeps.dev_score import paired_difference

    done = sorted((r for r in rows if r["state"] == "COMPLETE" and r["avg"] is not None),
                  key=lambda r: -r["avg"])[:top]
    out = []
    for r in done:
        entry = {**r, "diff": None}
        a, b = r.get("run_dir"), done[0].get("run_dir")
        if r is not done[0] and a and b and (Path(a) / "dev_predictions.csv").exists() \
                and (Path(b) / "dev_predictions.csv").exists():
            entry["diff"] = paired_difference(Path(a) / "dev_predictions.csv", Path(b) / "dev_predictions.csv",
                                              objective)
        out.append(entry)
    return out


def _profile_of(spec) -> str:
    """The profile the trials composed under: --profile, else the params file's own `profile:` key."""
    if spec.profile:
        return spec.profile
    try:
        name = read_params(spec.params).get("profile")
    except ConfigError:  # a summary still renders when the params file has gone or is broken
        name = None
    return f"{name} (the params file's `profile:`)" if name else "the params file's `profile:`"


def summary_page(study, spec, base: dict, rows: list[dict], params: list[str], best, overrides: dict,
                 found: dict, why_not: str, curves: dict | None, figures: list[str], lines: tuple) -> str:
    from sweeps.storage import redact

    objective = base.get("objective") or {}
    ci = objective.get("ci", 0.95)
    counts = Counter(r["state"] for r in rows)
    hours = sum(r["wall_s"] or 0.0 for r in rows) / 3600
    dvc_line, direct = lines
    out = [f"# Optuna study `{spec.study}`", ""]
    out += [f"- Base: `{spec.params}`, profile `{_profile_of(spec)}`"
            + (f", experiment `{spec.base_experiment}`" if spec.base_experiment else "")
            + (f", sweep overrides `{' '.join(spec.overrides)}` (not part of the best params)" if spec.overrides
               else ""),
            f"- Space: `{_repo_relative(base.get('space', spec.space))}`; pruner: "
            + (describe(base["pruner"]) if base.get("pruner") else "not recorded"),
            "- Objective: dev `avg` (mean of sst_acc, para_acc, sts_corr) of the best epoch's weights on "
            + ("the full dev sets" if not objective.get("dev_limit") else f"{objective['dev_limit']} dev rows a task")
            + f", with its {100 * ci:g}% bootstrap interval over dev examples ({objective.get('n_boot', '?')} "
              "resamples); per-epoch scores on the selection sample (train.eval_limit) only feed the pruner.",
            f"- Trials: {', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))}; "
            f"{hours:.2f} h of trial wall time.", ""]
    out += [f"## Best trial: {best.number}", "",
            f"Full-dev avg **{best.value:.4f}** [{_fmt(best.user_attrs.get('avg_lo'))}, "
            f"{_fmt(best.user_attrs.get('avg_hi'))}]: SST {_fmt(best.user_attrs.get('sst_acc'))}, "
            f"Quora {_fmt(best.user_attrs.get('para_acc'))}, STS {_fmt(best.user_attrs.get('sts_corr'))}; "
            f"{_fmt(wall_seconds(best), 0)} s.", "", "| parameter | value |", "|---|---|"]
    out += [f"| `{k}` | `{v}` |" for k, v in overrides.items()]
    out += ["", "Apply it as a DVC experiment (adds it to params.yaml as "
            f"`{experiment_key(spec.study)}`, trains and evaluates it):", "", "```bash", dvc_line, "```", "",
            "or without DVC:", "", "```bash", direct, "```", ""]
    run_dirs = {t.number: t.user_attrs.get("run_dir") for t in study.get_trials(deepcopy=False)}
    top = paired_rows([{**r, "run_dir": run_dirs.get(r["number"])} for r in rows], objective) if objective else []
    if top:
        out += ["## Top trials", "",
                f"Δ is the paired bootstrap difference to the best trial ({100 * ci:g}% interval, same dev "
                "examples resampled for both); — where a run folder is not on this machine.", "",
                "| trial | dev avg | interval | SST | Quora | STS | Δ to best | Δ interval |",
                "|---|---|---|---|---|---|---|---|"]
        for r in top:
            d = r["diff"]
            out.append(f"| {r['number']} | {_fmt(r['avg'])} | [{_fmt(r['avg_lo'])}, {_fmt(r['avg_hi'])}] | "
                       f"{_fmt(r['sst_acc'])} | {_fmt(r['para_acc'])} | {_fmt(r['sts_corr'])} | "
                       + (f"{d[0]:+.4f} | [{d[1]:+.4f}, {d[2]:+.4f}] |" if d else "— | — |"))
        out.append("")
    out += ["## Expected best dev avg vs number of trials", ""]
    if curves:
        tang, dodge, n = curves["tang"], curves["dodge"], curves["n"]
        at = sorted({k for k in EXPECTED_AT if k <= n} | {n})
        out += ["What a study of n finished trials would be expected to reach, from the "
                f"{n} finished here: the unbiased estimator of Tang et al. 2020 (n trials drawn without "
                "replacement from the observed ones) and, beside it, the original of Dodge et al. 2019 (with "
                "replacement, biased low for n near N); ± is the std of the best of n. Pruned trials have no "
                "full-dev score and are left out; their time is in the compute column. The estimators treat "
                "trials as independent draws, which TPE's later, informed trials are not: read the curve as "
                "that of this study's trial mix.", "",
                "| n | compute (min) | expected best (Tang) | ± | expected best (Dodge) | ± |",
                "|---|---|---|---|---|---|"]
        for k in at:
            out.append(f"| {k} | {k * curves['seconds_per_trial'] / 60:.1f} | {tang.mean[k - 1]:.4f} | "
                       f"{tang.std[k - 1]:.4f} | {dodge.mean[k - 1]:.4f} | {dodge.std[k - 1]:.4f} |")
        if n >= 4:
            half = n // 2
            gain = tang.mean[n - 1] - tang.mean[half - 1]
            width = (best.user_attrs.get("avg_hi", best.value) - best.user_attrs.get("avg_lo", best.value)) / 2
            out += ["", f"From {half} to {n} trials the expected best rose by {gain:+.4f} (Tang), against a "
                        f"{100 * ci:g}% interval half-width of about {width:.4f} on one trial's score."]
        out.append("")
    else:
        out += ["No finished trial yet.", ""]
    out += ["## Parameter importances (fANOVA)", ""]
    if found:
        out += ["Over the parameters every finished trial has (conditional ones, such as `train.gn_alpha`, "
                "are left out by Optuna).", "", "| parameter | importance |", "|---|---|"]
        out += [f"| `{k}` | {v:.3f} |" for k, v in found.items()]
    else:
        out.append(f"Not computed: {why_not}.")
    out += ["", "## Files", ""]
    out += [f"- `{name}.png`" for name in figures]
    out += ["- `trials.csv`: every trial (state, parameters, full-dev avg with interval, task scores, "
            "selection score, epochs run, wall seconds)",
            "- `best_params.yaml`, `best_trial.json`, `dvc_exp_run.txt`"]
    if (Path(spec.reports_dir) / spec.study / "pruners.md").exists():
        out.append("- `pruners.md`: the pruners compared on this study's curves at equal budgets")
    out += ["", "Regenerate this folder from the storage (no trial runs):", "", "```bash",
            f"python -m pipeline sweep --study {shlex.quote(spec.study)} --report-only"
            + (f" --storage {shlex.quote(redact(spec.storage))}" if spec.storage else "")
            + (f" --reports-dir {shlex.quote(spec.reports_dir)}" if spec.reports_dir != "reports/sweeps" else ""),
            "```", ""]
    return "\n".join(out)


def write_reports(study, spec) -> dict:
    """Write the study's folder under spec.reports_dir; return the summary (best_trial.json)."""
    import optuna

    from sweeps.storage import redact

    out = Path(spec.reports_dir) / spec.study
    base = study.user_attrs.get("base") or {}
    rows, params = trial_rows(study)
    counts = Counter(r["state"] for r in rows)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        log.warning("study %s has no completed trial yet (%s); no reports written", spec.study, dict(counts) or "empty")
        return {}
    best = study.best_trial
    overrides = dict(best.user_attrs.get("overrides", {}))
    header = (f"# Best trial of Optuna study '{spec.study}': trial {best.number}, full-dev avg {best.value:.4f}\n"
              f"# (profile {_profile_of(spec)}, base experiment {spec.base_experiment or 'none'}"
              + (f", sweep overrides not included: {' '.join(spec.overrides)}" if spec.overrides else "") + ")\n"
              "# Apply with the command in dvc_exp_run.txt, or: python -m pipeline train -S KEY=VALUE ...\n")
    pio.write_text(out / "best_params.yaml", header + yaml.safe_dump(overrides, sort_keys=False))
    set_args, dvc_line, direct = commands(spec, overrides)
    key = experiment_key(spec.study)
    pio.write_text(out / "dvc_exp_run.txt", (
        f"# Adds the best trial of study '{spec.study}' to params.yaml as experiment '{key}' and runs\n"
        f"# the pipeline in a DVC experiment (only the new experiment's train / evaluate stages run).\n"
        f"{dvc_line}\n\n# The same training without DVC:\n{direct}\n"))
    pio.write_text(out / "trials.csv", trials_csv(rows))
    ci = (base.get("objective") or {}).get("ci", 0.95)
    figures = []
    plot_history(rows, ci, out / "history.png")
    figures.append("history")
    plot_intermediate(study, out / "intermediate_values.png")
    figures.append("intermediate_values")
    found, why_not = importances(study)
    if found:
        plot_importances(found, out / "importances.png")
        figures.append("importances")
    else:
        log.warning("importances skipped: %s", why_not)
    curves = expected_curves(rows)
    if curves:
        plot_expected(curves, out / "expected_max.png")
        figures.append("expected_max")
    pio.write_text(out / "SUMMARY.md", summary_page(study, spec, base, rows, params, best, overrides, found,
                                                    why_not, curves, figures, (dvc_line, direct)))
    summary = {
        "study": spec.study, "best_trial": best.number, "best_value": best.value, "metric": "avg",
        "interval": [best.user_attrs.get("avg_lo"), best.user_attrs.get("avg_hi")],
        "scores": {k: best.user_attrs.get(k) for k in ("sst_acc", "para_acc", "sts_corr", "selection_avg")},
        "params": best.params, "overrides": overrides, "run_dir": best.user_attrs.get("run_dir"),
        "experiment": key, "dvc_set": set_args, "trials": dict(counts), "figures": figures,
        "importances": found,
        "storage": redact(spec.storage_url) if spec.storage else None,
        "base": {"params": spec.params, "profile": spec.profile, "base_experiment": spec.base_experiment,
                 "overrides": list(spec.overrides), "space": base.get("space", spec.space),
                 "pruner": base.get("pruner"), "objective": base.get("objective")},
    }
    pio.write_json(out / "best_trial.json", summary)
    log.info("study %s: best full-dev avg %.4f (trial %d); %s", spec.study, best.value, best.number, out)
    return summary
