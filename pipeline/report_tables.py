"""The paper's tables as data frames: our scores with intervals beside the paper's, as CSV, Markdown and LaTeX.

Rows come from reports/paper_results.csv (the paper's order and labels) plus any extra row
an experiment in params.yaml declares; a row without runs shows as missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.report_stats import Bootstrap, Difference, Estimate, summarize
from pipeline.tasks import COMBINED_TITLES, METRIC_TITLES, MULTITASK_METRICS, TASKS

# Column headers of every metric, in table order (pipeline.tasks: the registry's titles).
METRIC_NAMES = METRIC_TITLES
# The paper's results file: a row per table row, a column per metric it reports (a task the
# paper has no column for, such as one added to the registry later, reads as not reported).
PAPER_METRICS = ("avg", *(t.metric for t in TASKS.values()))
PAPER_COLUMNS = ("table", "split", "experiment")
MAJORITY = "Majority class (dev)"
MISSING = "missing"
DID_NOT_LEARN = "did not learn"
# Where "did not learn" is judged: an accuracy task, whose majority-class rate is a floor.
# (A correlation task such as STS: the constant predictor scores 0.)
LEARN_METRICS = tuple(t.metric for t in TASKS.values() if t.accuracy_metric)
# The task metrics each combined metric averages.
COMPONENTS = {m: MULTITASK_METRICS for m in COMBINED_TITLES}


def read_paper_results(path: str | Path) -> pd.DataFrame:
    """The paper's published numbers, one row per table row."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: the paper's results file is missing (report.paper_results)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PipelineError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in PAPER_COLUMNS if c not in frame.columns]
    if missing or not any(m in frame.columns for m in PAPER_METRICS):
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing) or 'for every metric'}; expected "
                            f"{', '.join(PAPER_COLUMNS)} and some of {', '.join(PAPER_METRICS)}")
    for i, value in enumerate(frame["table"], start=2):
        if not isinstance(value, (int, np.integer)):
            raise PipelineError(f"{path}: line {i}: table={value!r} is not an integer")
    return frame


def paper_scores(record: pd.Series) -> dict[str, float]:
    """A paper row's scores, plus the leaderboard average computed from them (not published)."""
    scores = {m: float(record[m]) for m in PAPER_METRICS if m in record and pd.notna(record[m])}
    tasks = {m: scores[m] for m in MULTITASK_METRICS if m in scores}
    if len(tasks) == len(MULTITASK_METRICS):
        scores["leaderboard_avg"] = summarize(tasks)["leaderboard_avg"]
    return scores


@dataclass
class Row:
    table: int
    label: str
    experiments: list[str] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    ours: dict[str, Estimate] = field(default_factory=dict)
    diff: dict[str, Difference] = field(default_factory=dict)
    did_not_learn: dict[str, float] = field(default_factory=dict)  # metric -> the majority-class rate it missed

    @property
    def missing(self) -> bool:
        return not self.ours

    def learned(self, metric: str) -> bool:
        """False when the row did not learn the metric's task, or (combined metrics) any task in it."""
        return not any(m in self.did_not_learn for m in (metric, *COMPONENTS.get(metric, ())))


def table_rows(paper: pd.DataFrame, experiments: dict, table: int) -> list[Row]:
    """The rows of one table, in the paper's order, each with the experiments that fill it."""
    rows: dict[str, Row] = {}
    for _, rec in paper[paper["table"] == table].iterrows():
        rows[str(rec["experiment"])] = Row(table, str(rec["experiment"]), paper=paper_scores(rec))
    for name, spec in experiments.items():
        for entry in (spec or {}).get("rows") or []:
            if int(entry.get("table", -1)) == table:
                label = str(entry.get("label") or name)
                rows.setdefault(label, Row(table, label)).experiments.append(name)
    return list(rows.values())


def table_metrics(rows: list[Row]) -> list[str]:
    """The table's columns: the metrics the paper reports in it (plus the leaderboard average)."""
    present = {m for r in rows for m in r.paper} | {m for r in rows for m in r.ours}
    return [m for m in METRIC_NAMES if m in present and (m != "leaderboard_avg" or "avg" in present)]


def attach(rows: list[Row], estimates: dict[str, dict[str, Estimate]]) -> None:
    """Give each row the scores of the experiments that fill it."""
    for row in rows:
        for exp in row.experiments:
            for metric, est in estimates.get(exp, {}).items():
                row.ours.setdefault(metric, est)


def find_row(tables: dict[int, list[Row]], table: int, label: str | None) -> Row | None:
    """A row by label: in the table itself first, then in the others (Table 4 against Table 2's Baseline)."""
    order = [table] + [t for t in tables if t != table]
    return next((r for t in order for r in tables.get(t, []) if r.label == label), None)


def mark_did_not_learn(rows: list[Row], majority: dict[str, Estimate]) -> None:
    """A row did not learn a task when the lower end of its interval is not above the majority-class
    rate of the same dev examples (decided on unrounded numbers)."""
    for row in rows:
        row.did_not_learn = {m: majority[m].point for m in LEARN_METRICS
                             if m in row.ours and m in majority and row.ours[m].lo <= majority[m].point}


def differences(rows: list[Row], ref: Row | None, boot: Bootstrap) -> None:
    """Paired-bootstrap differences of every row from the reference row."""
    if ref is None:
        return
    for row in rows:
        if row is not ref:
            row.diff = {m: boot.difference(est, ref.ours[m]) for m, est in row.ours.items() if m in ref.ours}


# ---------------------------------------------------------------- rendering


def _num(x: float | None, signed: bool = False) -> str:
    """Three decimals; a non-zero number that would print as 0.000 keeps two significant digits,
    so an interval end is never shown as a zero it is not."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    if abs(x) < 0.0005:
        return f"{x:+.1e}" if signed else f"{x:.1e}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def seeds_text(row: Row) -> str:
    """How many seeds each score of the row averages ('3', or 'SST Acc. 3, CFIMDB Acc. 1' when they differ)."""
    counts = {m: e.n_seeds for m, e in row.ours.items() if m in METRIC_NAMES}
    if not counts:
        return "—"
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"{METRIC_NAMES[m]} {n}" for m, n in counts.items() if m not in COMPONENTS)


def cell(est: Estimate | None, did_not_learn: bool = False) -> str:
    """'mean ± std across seeds [bootstrap CI]' (± std only with several seeds), flagged when not learned."""
    if est is None:
        return MISSING
    spread = f" ± {est.std:.3f}" if est.n_seeds > 1 else ""
    flag = f" ({DID_NOT_LEARN})" if did_not_learn else ""
    return f"{est.point:.3f}{spread} [{_num(est.lo)}, {_num(est.hi)}]{flag}"


def diff_cell(d: Difference | None) -> str:
    """'+0.012 [+0.004, +0.020]; seeds [-0.010, +0.030] ~noise (seeds)': both intervals, the verdict spelled out."""
    if d is None:
        return "—"
    seeds = f"; seeds [{_num(d.seed_lo, True)}, {_num(d.seed_hi, True)}]" if d.has_seed_interval else ""
    return f"{_num(d.point, True)} [{_num(d.lo, True)}, {_num(d.hi, True)}]{seeds} {d.marker}"


def to_frame(rows: list[Row], metrics: list[str], majority: dict[str, Estimate]) -> pd.DataFrame:
    """Machine-readable table: one line per row, every number in its own column."""
    records = []
    for row in rows + [Row(rows[0].table if rows else 0, MAJORITY, ours=majority)]:
        rec = {"table": row.table, "row": row.label, "experiments": "+".join(row.experiments),
               "n_seeds": max((e.n_seeds for e in row.ours.values()), default=0)}
        for m in metrics:
            est, d = row.ours.get(m), row.diff.get(m)
            rec.update({m: est.point if est else np.nan, f"{m}_lo": est.lo if est else np.nan,
                        f"{m}_hi": est.hi if est else np.nan, f"{m}_std": est.std if est else np.nan,
                        f"{m}_n_seeds": est.n_seeds if est else 0,
                        f"{m}_n": est.n if est else np.nan, f"{m}_paper": row.paper.get(m, np.nan),
                        f"{m}_majority": majority[m].point if m in majority else np.nan,
                        f"{m}_did_not_learn": (m in row.did_not_learn) if est and row.label != MAJORITY else None,
                        f"{m}_diff": d.point if d else np.nan, f"{m}_diff_lo": d.lo if d else np.nan,
                        f"{m}_diff_hi": d.hi if d else np.nan,
                        f"{m}_diff_seed_lo": d.seed_lo if d else np.nan,
                        f"{m}_diff_seed_hi": d.seed_hi if d else np.nan,
                        f"{m}_diff_basis": d.basis if d else None,
                        f"{m}_resolved": d.resolved if d else None,
                        f"{m}_within_noise": d.within_noise if d else None})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def display_frame(rows: list[Row], metrics: list[str], majority: dict[str, Estimate]) -> pd.DataFrame:
    """Human-readable scores: ours (mean ± std across seeds) [95% CI] beside the paper's, per metric."""
    out = []
    for row in rows:
        rec = {"Row": row.label, "Seeds": seeds_text(row) if not row.missing else "0"}
        for m in metrics:
            rec[f"{METRIC_NAMES[m]} ours"] = (cell(row.ours.get(m), m in row.did_not_learn)
                                              if not row.missing else MISSING)
            rec[f"{METRIC_NAMES[m]} paper"] = _num(row.paper.get(m, math.nan))
        out.append(rec)
    rec = {"Row": MAJORITY, "Seeds": "—"}
    for m in metrics:
        rec[f"{METRIC_NAMES[m]} ours"] = cell(majority.get(m)) if m in majority else "—"
        rec[f"{METRIC_NAMES[m]} paper"] = "—"
    out.append(rec)
    return pd.DataFrame(out)


def diff_frame(rows: list[Row], metrics: list[str], ref: Row | None) -> pd.DataFrame:
    """Differences from the reference row: ours (paired bootstrap CI, seed CI, verdict) and the paper's."""
    out = []
    for row in rows:
        if row is ref:
            continue
        rec = {"Row": row.label}
        for m in metrics:
            text = diff_cell(row.diff.get(m)) if not row.missing else MISSING
            if row.diff.get(m) is not None and not (row.learned(m) and (ref is None or ref.learned(m))):
                text += f" ({DID_NOT_LEARN}: {row.label if not row.learned(m) else ref.label})"
            rec[f"Δ {METRIC_NAMES[m]} ours"] = text
            paper = (row.paper.get(m, math.nan) - ref.paper.get(m, math.nan)) if ref else math.nan
            rec[f"Δ {METRIC_NAMES[m]} paper"] = _num(paper, signed=True)
        out.append(rec)
    return pd.DataFrame(out)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, which we do not ship)."""
    def esc(v) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(esc(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(esc(v) for v in rec) + " |" for rec in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def latex(frame: pd.DataFrame, caption: str, label: str) -> str:
    """LaTeX for pdflatex too: the dash and the plus-minus sign as LaTeX spells them."""
    text = frame.to_latex(index=False, escape=True, caption=caption, label=label)
    return text.replace("—", "--").replace("±", r"$\pm$")
