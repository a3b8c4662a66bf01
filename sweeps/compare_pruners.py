"""Compare pruners on the same compute budget by replaying a finished study's learning curves (no training).

    python -m sweeps.compare_pruners --study NAME [--storage URL] [--budgets 0.25 0.5 0.75]
                                     [--orders 100] [--candidates FILE] [--out DIR]

Each of the study's trials is a curve: the selection-sample dev avg it reported after every epoch (what
a pruner sees), the compute each epoch cost (its wall time over its epochs; --unit epochs counts epochs)
and, for a finished trial, its full-dev avg (the objective). For every candidate pruner and every budget
(a share of what running all curves to the end costs), the trials are replayed in many random orders
into a fresh in-memory Optuna study with that pruner: each trial reports its epochs until the pruner
stops it or the budget runs out. What counts is the best full-dev avg among the trials that finished
within the budget: a pruner pays off when the compute it saves buys more trials than the good ones it
cuts. `none` at budget 1.0 finds the study's best by construction.

Read the table with its caveats: the replay keeps the trials the study's sampler chose, in shuffled
orders (an informed sampler such as TPE would have chosen others after different pruning); a trial the
study itself pruned has no future beyond its last epoch, so it counts as pruned there in every replay,
which favours the study's own pruner. For a clean comparison run the study with `--pruner none`.
Candidates are pruner blocks of the space file's form (sweeps/pruners.py), as a YAML list (--candidates).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from pipeline import io as pio
from pipeline.errors import ConfigError, PipelineError
from sweeps.pruners import build_pruner, describe, parse_pruner

log = logging.getLogger("sweeps.compare_pruners")

DEFAULT_CANDIDATES = [
    {"type": "none"},
    {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
    {"type": "median", "n_startup_trials": 8, "n_warmup_steps": 2},
    {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 1, "patience": 1},
    {"type": "percentile", "percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1},
    {"type": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"type": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    {"type": "hyperband", "min_resource": 1, "reduction_factor": 2},
    {"type": "hyperband", "min_resource": 1, "reduction_factor": 3},
]


@dataclass
class Curve:
    number: int
    values: dict          # epoch -> selection-sample dev avg
    final: float | None   # full-dev avg of a finished trial; None: the study pruned it
    step_cost: float      # compute of one epoch (seconds, or 1 with --unit epochs)

    @property
    def cost(self) -> float:
        return self.step_cost * len(self.values)


def study_curves(study, unit: str = "seconds") -> list[Curve]:
    """The replayable trials: finished (a full curve and a final score) and pruned (a partial curve)."""
    from sweeps.optuna_report import wall_seconds

    curves = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED") or not t.intermediate_values:
            continue
        wall = wall_seconds(t)
        step_cost = wall / len(t.intermediate_values) if unit == "seconds" and wall else 1.0
        curves.append(Curve(t.number, dict(t.intermediate_values),
                            float(t.value) if t.state.name == "COMPLETE" else None, step_cost))
    return curves


def replay(curves: list[Curve], order, block: dict, max_epochs: int, budget: float, name: str) -> dict:
    """Run the curves in `order` under one pruner until `budget` is spent; what it found."""
    import optuna

    study = optuna.create_study(study_name=name, direction="maximize", sampler=optuna.samplers.RandomSampler(0),
                                pruner=build_pruner(block, max_epochs))
    spent, best, best_number, started, finished, out_of_budget = 0.0, None, None, 0, 0, False
    for i in order:
        c = curves[i]
        if spent + c.step_cost > budget + 1e-9:
            break
        trial, started, pruned = study.ask(), started + 1, False
        for step in sorted(c.values):
            if spent + c.step_cost > budget + 1e-9:
                out_of_budget = True
                break
            spent += c.step_cost
            trial.report(c.values[step], step)
            if trial.should_prune():
                pruned = True
                break
        if out_of_budget:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        if pruned or c.final is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, c.final)
        finished += 1
        if best is None or c.final > best:
            best, best_number = c.final, c.number
    return {"best": best, "best_trial": best_number, "started": started, "finished": finished, "spent": spent}


def compare(curves: list[Curve], candidates: list[dict], budgets: list[float], orders: int = 100,
            seed: int = 0, max_epochs: int | None = None) -> list[dict]:
    """Mean outcome of each candidate at each budget share, over `orders` random orders of the trials."""
    if not any(c.final is not None for c in curves):
        raise PipelineError("the study has no finished trial with per-epoch values to replay")
    max_epochs = max_epochs or max(max(c.values) for c in curves)
    total = sum(c.cost for c in curves)
    top = max(c.final for c in curves if c.final is not None)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(curves)) for _ in range(orders)]
    rows = []
    with tqdm(total=len(candidates) * len(budgets) * orders, desc="replaying", disable=None) as bar:
        for block in candidates:
            for share in budgets:
                runs = []
                for k, perm in enumerate(perms):
                    runs.append(replay(curves, perm, block, max_epochs, share * total, f"replay-{k}"))
                    bar.update()
                found = [r["best"] for r in runs if r["best"] is not None]
                rows.append({
                    "pruner": describe(block), "block": block, "budget": share,
                    "best_mean": float(np.mean(found)) if found else math.nan,
                    "best_std": float(np.std(found)) if found else math.nan,
                    "regret_mean": float(np.mean([top - b for b in found])) if found else math.nan,
                    "p_top": float(np.mean([r["best"] == top for r in runs])),
                    "p_none": float(np.mean([r["best"] is None for r in runs])),
                    "started": float(np.mean([r["started"] for r in runs])),
                    "finished": float(np.mean([r["finished"] for r in runs])),
                })
    return rows


def table(rows: list[dict], study: str, n: int, unit: str, orders: int, top: float) -> str:
    out = [f"# Pruners compared on study `{study}`", "",
           f"{n} replayable trials (best full-dev avg {top:.4f}); {orders} random orders per cell; budget = share "
           f"of the {unit} all curves cost run to the end. `best` is the mean (± std over orders) of the best "
           "full-dev avg among trials finished within the budget; `P(top)` how often that is the study's best "
           "trial; `none found` how often no trial finished. Caveats: sweeps/compare_pruners.py.", ""]
    for share in sorted({r["budget"] for r in rows}):
        out += [f"## Budget {100 * share:g}%", "",
                "| pruner | best | ± | regret | P(top) | none found | trials started | finished |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["budget"] == share), key=lambda r: -np.nan_to_num(r["best_mean"])):
            out.append(f"| {r['pruner']} | {r['best_mean']:.4f} | {r['best_std']:.4f} | {r['regret_mean']:.4f} | "
                       f"{r['p_top']:.2f} | {r['p_none']:.2f} | {r['started']:.1f} | {r['finished']:.1f} |")
        out.append("")
    return "\n".join(out)


def load_candidates(path: str | None) -> list[dict]:
    if not path:
        return [dict(c) for c in DEFAULT_CANDIDATES]
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the candidates ({err})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a YAML list of pruner blocks ({{type: median, ...}})")
    return [parse_pruner(block, f"{path}: candidate {i + 1}") for i, block in enumerate(raw)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.compare_pruners", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", default=None, help="storage URL (default: sqlite:///sweeps/studies/<study>.db)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="budget shares to compare at (default: 0.25 0.5 0.75 1.0)")
    p.add_argument("--orders", type=int, default=100, help="random trial orders per cell (default: 100)")
    p.add_argument("--unit", choices=("seconds", "epochs"), default="seconds", help="what the budget counts")
    p.add_argument("--candidates", default=None, help="YAML list of pruner blocks (default: a built-in set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the orders")
    p.add_argument("--out", default=None, help="output folder (default: reports/sweeps/<study>)")
    return p


def run(args) -> str:
    import optuna

    if args.orders < 1 or any(not 0 < b <= 1 for b in args.budgets):
        raise ConfigError("--orders must be >= 1 and every --budgets share in (0, 1]")
    storage = args.storage or f"sqlite:///{Path('sweeps/studies') / (args.study + '.db')}"
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"{storage}: no study storage; name it with --storage URL")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        raise ConfigError(f"{storage}: no study '{args.study}'") from None
    candidates = load_candidates(args.candidates)
    own = (study.user_attrs.get("base") or {}).get("pruner")
    if own and own not in candidates:
        candidates.append(own)
    curves = study_curves(study, args.unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = compare(curves, candidates, args.budgets, args.orders, args.seed)
    top = max(c.final for c in curves if c.final is not None)
    text = table(rows, args.study, len(curves), args.unit, args.orders, top)
    out = Path(args.out or Path("reports/sweeps") / args.study)
    pio.write_text(out / "pruners.md", text + "\n")
    pio.write_json(out / "pruners.json", {"study": args.study, "unit": args.unit, "orders": args.orders,
                                          "trials": len(curves), "top": top, "rows": rows})
    print(text)
    return str(out / "pruners.md")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.cli import run_guarded

    return run_guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
