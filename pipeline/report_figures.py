"""The report's figures (matplotlib, PNG). Each takes plain data and writes one file atomically;
with nothing to plot it still writes a figure that says so, so a partial study has a full report."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines or servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import io as pio  # noqa: E402
from pipeline.report_tables import METRIC_NAMES, Row  # noqa: E402

TASK_METRICS = ("sst_acc", "para_acc", "sts_corr")


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
    for ax, m in zip(axes, metrics):
        for yi, row in zip(y, rows):
            est = row.ours.get(m)
            if est is not None:
                ax.errorbar(est.point, yi, xerr=[[est.point - est.lo], [est.hi - est.point]], fmt="o", color="C0",
                            capsize=3, label="ours (95% CI)" if yi == y[0] else None)
            if m in row.paper:
                ax.plot(row.paper[m], yi, "x", color="C3", label="paper" if yi == y[0] else None)
        if m in majority:
            ax.axvline(majority[m].point, ls="--", color="grey", lw=1, label="majority class")
        ax.set_title(METRIC_NAMES[m])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r.label for r in rows])
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0))
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


def dev_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Per task, the dev score after each epoch, one line per experiment (first seed)."""
    title = "Dev scores over epochs (selection subset)"
    if not histories:
        _empty(path, title, "no training histories yet")
        return
    fig, axes = plt.subplots(1, len(TASK_METRICS), figsize=(4.2 * len(TASK_METRICS), 3.4))
    for ax, m in zip(axes, TASK_METRICS):
        for k, (name, hist) in enumerate(histories.items()):
            pts = [(h["epoch"], h[m]) for h in hist if m in h]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=plt.cm.tab20(k % 20), label=name)
        ax.set_xlabel("epoch")
        epochs = sorted({h["epoch"] for hist in histories.values() for h in hist})
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(METRIC_NAMES[m])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def gradnorm_weights(steps: dict[str, pd.DataFrame], path: Path) -> None:
    """GradNorm's task weights w_i over training steps, one panel per GN experiment."""
    title = "GradNorm task weights over steps"
    steps = {k: v for k, v in steps.items() if any(c.startswith("gn_weight_") for c in v.columns)}
    if not steps:
        _empty(path, title, "no GradNorm runs with step logs yet")
        return
    ncols = min(3, len(steps))
    nrows = -(-len(steps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 2.8 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax, (name, frame) in zip(axes.flat, steps.items()):
        for col in sorted(c for c in frame.columns if c.startswith("gn_weight_")):
            ax.plot(frame["step"], frame[col], lw=1, label=col.removeprefix("gn_weight_"))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("weight")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def pcgrad_conflicts(steps: dict[str, pd.DataFrame], path: Path) -> None:
    """Share of task pairs whose gradients conflict, per step (and its running mean)."""
    title = "PCGrad: share of conflicting task pairs over steps"
    steps = {k: v for k, v in steps.items() if "pcgrad_conflict_share" in v.columns}
    if not steps:
        _empty(path, title, "no PCGrad runs with step logs yet")
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for k, (name, frame) in enumerate(steps.items()):
        share = frame["pcgrad_conflict_share"].astype(float)
        ax.plot(frame["step"], share, ".", ms=3, alpha=0.35, color=f"C{k}")
        ax.plot(frame["step"], share.expanding().mean(), lw=1.5, color=f"C{k}", label=f"{name} (running mean)")
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
