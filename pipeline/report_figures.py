"""The report's figures (matplotlib, PNG). Each takes plain data and writes one file atomically;
with nothing to plot it still writes a figure that says so, so a partial study has a full report.

With several seeds per experiment, a line is the seed mean and a shaded band the min-max over seeds."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline import io as pio  # noqa: E402
from pipeline.report_tables import METRIC_NAMES, Row  # noqa: E402
from pipeline.tasks import MULTITASK_METRICS, TASKS  # noqa: E402

TASK_METRICS = MULTITASK_METRICS
# One look per task, so that tasks with equal values (GradNorm's weights all start at 1) stay visible:
# the first line is drawn widest and each later one narrower on top, each with its own dash and marker.
TASK_STYLES = ({"ls": "-", "marker": "o", "lw": 3.2}, {"ls": "--", "marker": "s", "lw": 2.2},
               {"ls": ":", "marker": "^", "lw": 1.6}, {"ls": "-.", "marker": "D", "lw": 1.2})


def seed_band(frames: list[pd.DataFrame], x: str, y: str) -> pd.DataFrame:
    """Per x, the mean, min and max of y over the frames (one per seed) that have it; empty without any."""
    parts = [f[[x, y]].dropna().drop_duplicates(x, keep="last").set_index(x)[y].astype(float)
             for f in frames if x in f.columns and y in f.columns]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=["mean", "min", "max", "n"])
    wide = pd.concat(parts, axis=1)
    return pd.DataFrame({"mean": wide.mean(axis=1), "min": wide.min(axis=1), "max": wide.max(axis=1),
                         "n": wide.notna().sum(axis=1)}).sort_index()


def _band(ax, band: pd.DataFrame, color, label: str, **style) -> None:
    """The seed mean as a line; with more than one seed, the min-max band shaded behind it."""
    ax.plot(band.index, band["mean"], color=color, label=label, **style)
    if (band["n"] > 1).any():
        ax.fill_between(band.index, band["min"], band["max"], color=color, alpha=0.18, lw=0)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    # "tight" keeps legends placed outside the axes inside the image.
    pio.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _empty(path: Path, title: str, why: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    _save(fig, path)


def ablation_scores(rows: list[Row], majority: dict, metrics: list[str], path: Path, title: str) -> None:
    """Per metric: our score with its interval per row, the paper's as a cross, majority class dashed."""
    if not any(r.ours for r in rows):
        _empty(path, title, "no evaluated runs yet")
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.45 * len(rows) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    y = np.arange(len(rows))[::-1]
    labelled: set = set()

    def once(label: str) -> str | None:  # each legend entry once, from whichever row first has it
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for ax, m in zip(axes, metrics):
        for yi, row in zip(y, rows):
            est = row.ours.get(m)
            if est is not None:
                ax.errorbar(est.point, yi, xerr=[[est.point - est.lo], [est.hi - est.point]], fmt="o", color="C0",
                            capsize=3, label=once("ours: seed mean (95% CI)"))
                if est.n_seeds > 1:
                    ax.plot(est.points, [yi] * len(est.points), "o", mfc="none", ms=4, color="C0", alpha=0.6,
                            label=once("ours: each seed"))
            if m in row.paper:
                ax.plot(row.paper[m], yi, "x", color="C3", label=once("paper"))
        if m in majority:
            ax.axvline(majority[m].point, ls="--", color="grey", lw=1, label=once("majority class"))
        ax.set_title(METRIC_NAMES[m])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r.label for r in rows])
    handles, labels = [sum(parts, []) for parts in zip(*(ax.get_legend_handles_labels() for ax in axes))]
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title)
    _save(fig, path)


def alpha_sensitivity(points: list[tuple[float, Row]], path: Path) -> None:
    """Table 4: each task's dev score against GradNorm's alpha, ours with intervals, the paper's dashed."""
    title = "GradNorm alpha sensitivity (Table 4)"
    if not any(r.ours for _, r in points):
        _empty(path, title, "no evaluated Table 4 runs yet")
        return
    points = sorted(points, key=lambda p: p[0])
    metrics = ["avg", *TASK_METRICS]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
    for ax, m in zip(axes, metrics):
        xs = [a for a, r in points if m in r.ours]
        est = [r.ours[m] for a, r in points if m in r.ours]
        if est:
            ax.errorbar(xs, [e.point for e in est], yerr=[[e.point - e.lo for e in est], [e.hi - e.point for e in est]],
                        fmt="o-", capsize=3, label="ours (95% CI)")
        px = [a for a, r in points if m in r.paper]
        ax.plot(px, [r.paper[m] for a, r in points if m in r.paper], "x--", color="C3", label="paper")
        ax.set_xlabel("alpha")
        ax.set_title(METRIC_NAMES[m])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    _save(fig, path)


def dev_curves(histories: dict[str, list[list[dict]]], path: Path, eval_limits: list | None = None,
               did_not_learn: set | None = None) -> None:
    """Per task, the selection score after each epoch: per experiment the mean over its seeds
    (`histories[exp]` holds one history per seed), shaded min-max; experiments in `did_not_learn` dashed.

    These per-epoch scores are on the selection sample (train.eval_limit dev rows per task),
    not the full dev set the tables score; the title says so.
    """
    limits = [x for x in (eval_limits or []) if x is not None]
    if limits and all(x > 0 for x in limits):
        sample = f"{'/'.join(map(str, limits))} dev rows per task (train.eval_limit)"
        title = f"Dev scores per epoch on the small selection sample ({sample}), not the full dev set"
    elif limits and all(x == 0 for x in limits):
        title = "Dev scores per epoch on the selection sample (train.eval_limit=0: every dev row)"
    else:
        title = "Dev scores per epoch on the selection sample (train.eval_limit rows per task), not the full dev set"
    if not histories:
        _empty(path, title, "no training histories yet")
        return
    did_not_learn = did_not_learn or set()
    present = {m for hs in histories.values() for hist in hs for h in hist for m in h}
    metrics = [t.metric for t in TASKS.values() if t.metric in TASK_METRICS or t.metric in present]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    colors = (lambda k: plt.cm.tab10(k % 10)) if len(histories) <= 10 else (lambda k: plt.cm.tab20(k % 20))
    epochs = sorted({h["epoch"] for hs in histories.values() for hist in hs for h in hist if "epoch" in h})
    for ax, m in zip(axes, metrics):
        for k, (name, hists) in enumerate(histories.items()):
            band = seed_band([pd.DataFrame(hist) for hist in hists if hist], "epoch", m)
            if len(band):
                n = len([h for h in hists if h])
                label = (name + (f" ({n} seeds)" if n > 1 else "")
                         + (" — did not learn" if name in did_not_learn else ""))
                _band(ax, band, colors(k), label, marker="o", ms=3,
                      lw=1.8 if name in did_not_learn else 1, ls="--" if name in did_not_learn else "-")
        ax.set_xlabel("epoch")
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(METRIC_NAMES[m])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score on the selection sample")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def gradnorm_weights(steps: dict[str, list[pd.DataFrame]], path: Path, titles: dict | None = None) -> None:
    """GradNorm's task weights w_i over training steps, one panel per GN experiment (titled with its alpha).

    Each task has its own line style, marker and width, drawn widest first, so a task whose weight
    equals another's (all start at 1) shows around it instead of hiding under it. Seed mean, min-max band.
    """
    title = "GradNorm task weights over steps"
    steps = {k: [f for f in v if any(c.startswith("gn_weight_") for c in f.columns)] for k, v in steps.items()}
    steps = {k: v for k, v in steps.items() if v}
    if not steps:
        _empty(path, title, "no GradNorm runs with step logs yet")
        return
    titles = titles or {}
    ncols = min(3, len(steps))
    nrows = -(-len(steps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax, (name, frames) in zip(axes.flat, steps.items()):
        cols = sorted({c for f in frames for c in f.columns if c.startswith("gn_weight_")})
        for i, col in enumerate(cols):
            band = seed_band(frames, "step", col)
            style = dict(TASK_STYLES[i % len(TASK_STYLES)])
            task = col.removeprefix("gn_weight_")
            label = TASKS[task].label if task in TASKS else task
            _band(ax, band, f"C{i}", label, markevery=max(1, len(band) // 8), ms=5,
                  mfc="none" if i == 0 else None, zorder=2 + i, **style)
        n = len(frames)
        ax.set_title(titles.get(name, name) + (f", {n} seeds" if n > 1 else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("task weight w_i")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0), fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def pcgrad_conflicts(steps: dict[str, list[pd.DataFrame]], path: Path) -> None:
    """Running share of task pairs whose gradients conflict, per step: seed mean, min-max band."""
    title = "PCGrad: running share of conflicting task pairs over steps"
    steps = {k: [f for f in v if "pcgrad_conflict_share" in f.columns] for k, v in steps.items()}
    steps = {k: v for k, v in steps.items() if v}
    if not steps:
        _empty(path, title, "no PCGrad runs with step logs yet")
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for k, (name, frames) in enumerate(steps.items()):
        running = [pd.DataFrame({"step": f["step"],
                                 "share": f["pcgrad_conflict_share"].astype(float).expanding().mean()}) for f in frames]
        band = seed_band(running, "step", "share")
        label = f"{name} (running mean" + (f", {len(frames)} seeds)" if len(frames) > 1 else ")")
        _band(ax, band, f"C{k}", label, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("conflicting pairs / all pairs")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def ours_vs_paper(rows: list[Row], path: Path) -> None:
    """Every row of every table: our score (with interval) against the paper's; the diagonal is agreement."""
    title = "Ours vs the paper, every row"
    pairs = [(m, r) for r in rows for m in r.paper if m in r.ours]
    if not pairs:
        _empty(path, title, "no evaluated runs yet")
        return
    metrics = [m for m in METRIC_NAMES if any(p[0] == m for p in pairs)]
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for k, m in enumerate(metrics):
        sel = [r for mm, r in pairs if mm == m]
        ax.errorbar([r.paper[m] for r in sel], [r.ours[m].point for r in sel],
                    yerr=[[r.ours[m].point - r.ours[m].lo for r in sel], [r.ours[m].hi - r.ours[m].point for r in sel]],
                    fmt="o", ms=4, capsize=2, color=f"C{k}", label=METRIC_NAMES[m])
    low = min([0.0] + [min(r.paper[m], r.ours[m].lo) for m, r in pairs])  # STS Pearson can be negative
    lims = [low - 0.02, 1.0]
    ax.plot(lims, lims, "--", color="grey", lw=1)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_xlabel("paper")
    ax.set_ylabel("ours (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)
