"""`python -m benchmarks.quality`: dev quality on the embedded default, against a frozen-backbone probe.

Everything comes from params.yaml. The candidates are experiments (`quality.candidates`, plus any
`--experiment NAME`), each composed by pipeline.config.load_config under its profile
(`quality.profiles.NAME`, else `--profile`, else `quality.profile`; plus `-S` overrides) and trained
under each of `quality.seeds` (`--seeds N`: the first N) as a real pipeline run (`python -m pipeline
train -e NAME --seed S --evaluate`), timed and scored on full dev. A recipe is its experiment on its
profile: the sweep's best params were searched on the cpu profile's budget and frozen prefix, so
they are trained there, beside a hand-picked recipe that trains every layer for longer. The
`quality:` block holds what is not an experiment: the bar, the time budget, the probe settings
and the pair of candidates compared.

The probe is what the backbone knows before any fine-tuning: per task of the multitask set, a
logistic regression on frozen sentence embeddings (a classification), on Sentence-BERT pair
features (a binary pair task) or the zero-shot cosine (a score task).

Results merge into reports/quality.json by candidate and seed: a seed stored for the same composed
config whose run folder is still here is kept, not retrained (so a stopped check resumes where it
stopped; `--retrain` trains it again; a fresh clone has no run folders and trains everything), and
a candidate whose composed config changed starts its runs afresh.
reports/quality.md is rendered from it: per candidate the mean ± std over seeds beside the bar,
and a paired comparison of two candidates with the report's intervals (pipeline.report_stats: a
paired bootstrap over the dev rows, each replicate the mean over seeds, and a Welch t interval
over the seeds).

With `-S model.freeze_layers=K` the runs take the frozen-prefix fast path: the prefix cache (in the
profile's data.prefix_dir, never the study's) is built once before training, with the
cross-encoder's joined pair sequences when a candidate needs them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import io as pio
from pipeline.errors import ConfigError, PipelineError
from pipeline.tasks import METRIC_TITLES, MULTITASK, MULTITASK_METRICS, TASKS, summarize, task_score

log = logging.getLogger("benchmarks.quality")

METRICS = MULTITASK_METRICS  # the bar's metrics, each task's own
SHOWN = (*METRICS, "avg")    # the columns of quality.md
SCHEMA_VERSION = 2
# Config fields that do not change what a run learns (left out when deciding whether stored runs still apply).
NOT_RECIPE = ("seed", "device", "threads", "checkpoint_every")
SPEC_KEYS = ("profile", "profiles", "candidates", "seeds", "compare", "bar", "budget_minutes", "probe")
OPTIONAL_KEYS = ("compare", "profiles")


@dataclass
class Spec:
    """params.yaml's `quality:` block."""
    profile: str
    profiles: dict  # candidate -> the profile it trains under, where not `profile`
    candidates: list[str]
    seeds: list[int]
    compare: list[str]
    bar: dict
    budget_minutes: float
    probe: dict


def _ints(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value)


def read_spec(params: dict, source: str = "params.yaml") -> Spec:
    """The `quality:` block, checked: every problem is a one-line ConfigError naming the key."""
    block = params.get("quality")
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: no `quality:` block (the quality check's candidates, seeds, bar and probe)")
    unknown = sorted(set(block) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{source}: quality.{unknown[0]} is unknown; known: {', '.join(SPEC_KEYS)}")
    missing = [k for k in SPEC_KEYS if k not in OPTIONAL_KEYS and block.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: quality.{missing[0]} is missing")
    experiments = params.get("experiments") or {}
    candidates = block["candidates"]
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise ConfigError(f"{source}: quality.candidates must be a list of experiment names")
    for name in candidates:
        if name not in experiments:
            raise ConfigError(f"{source}: quality.candidates: '{name}' is not an experiment "
                              f"(params.yaml defines {', '.join(experiments) or 'none'})")
    profiles = block.get("profiles") or {}
    known_profiles = params.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: quality.profiles must map candidate names to profiles")
    for name, prof in profiles.items():
        if name not in candidates:
            raise ConfigError(f"{source}: quality.profiles.{name}: not one of quality.candidates "
                              f"({', '.join(candidates)})")
        if prof not in known_profiles:
            raise ConfigError(f"{source}: quality.profiles.{name}={prof!r} is not a profile "
                              f"(params.yaml defines {', '.join(known_profiles) or 'none'})")
    if not _ints(block["seeds"]) or len(set(block["seeds"])) != len(block["seeds"]):
        raise ConfigError(f"{source}: quality.seeds={block['seeds']!r} must be a list of distinct integers")
    bar = block["bar"]
    if not isinstance(bar, dict) or set(bar) != set(METRICS):
        raise ConfigError(f"{source}: quality.bar must name exactly {', '.join(METRICS)}")
    for metric, value in bar.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: quality.bar.{metric}={value!r} must be a number")
    budget = block["budget_minutes"]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"{source}: quality.budget_minutes={budget!r} must be a positive number")
    probe = block["probe"]
    if not isinstance(probe, dict) or set(probe) - {"pair_train_rows", "Cs"}:
        raise ConfigError(f"{source}: quality.probe takes pair_train_rows and Cs")
    rows = probe.get("pair_train_rows", 4000)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        raise ConfigError(f"{source}: quality.probe.pair_train_rows={rows!r} must be a positive integer")
    cs = probe.get("Cs", [0.01, 0.1, 1.0])
    if not isinstance(cs, list) or not cs or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                     and c > 0 for c in cs):
        raise ConfigError(f"{source}: quality.probe.Cs={cs!r} must be a list of positive numbers")
    compare = block.get("compare") or []
    if compare and (not isinstance(compare, list) or len(compare) != 2 or compare[0] == compare[1]
                    or not all(isinstance(c, str) for c in compare)):
        raise ConfigError(f"{source}: quality.compare={compare!r} must name two different candidates")
    return Spec(str(block["profile"]), {str(k): str(v) for k, v in profiles.items()}, list(candidates),
                list(block["seeds"]), list(compare), dict(bar),
                float(budget), {"pair_train_rows": rows, "Cs": [float(c) for c in cs]})


def _names(values: list[str] | None) -> list[str]:
    """`a,b c` -> [a, b, c] (comma- or space-separated, first occurrence kept)."""
    return list(dict.fromkeys(n for v in values or [] for n in v.replace(",", " ").split()))


def pick_seeds(spec: Spec, count: int | None, explicit: list[str] | None) -> list[int]:
    """--seed-list A,B (those), --seeds N (the first N of quality.seeds), else every seed of quality.seeds."""
    if explicit:
        try:
            seeds = [int(s) for s in _names(explicit)]
        except ValueError:
            raise ConfigError(f"--seed-list {','.join(explicit)}: seeds must be integers") from None
        return seeds
    if count is None:
        return list(spec.seeds)
    if not 1 <= count <= len(spec.seeds):
        raise ConfigError(f"--seeds {count}: quality.seeds lists {len(spec.seeds)} seed(s) "
                          f"({', '.join(map(str, spec.seeds))}); add seeds there or use --seed-list")
    return spec.seeds[:count]


def ensure_prepared(cfg) -> None:
    """Run the prepare stage into cfg's prepared_dir unless it already holds this data and tokenisation."""
    from pipeline.prepare import run_prepare

    report = Path(cfg.data.prepared_dir) / "report.json"
    if report.exists():
        done = json.loads(report.read_text())
        if (done.get("backbone"), done.get("max_length"), done.get("limit")) == (
                cfg.model.backbone, cfg.data.max_length, cfg.data.limit):
            return
    log.info("preparing %s (max_length %d)", cfg.data.prepared_dir, cfg.data.max_length)
    run_prepare(cfg)


def ensure_caches(cfgs: list) -> list[Path]:
    """Build each prefix cache the runs will read, once, before any of them starts.

    Runs that share prepared data, backbone and frozen layers share a cache; it includes the
    cross-encoder's joined pair sequences when any of them has model.para_head cross (a cache
    without them would be rebuilt whole by the first cross-encoder run). Nothing is built for
    runs that train every layer (model.freeze_layers 0).
    """
    from pipeline.cache import run_cache

    groups: dict[tuple, list] = {}
    for cfg in cfgs:
        if cfg.model.freeze_layers > 0:
            key = (cfg.data.prepared_dir, cfg.data.prefix_dir, cfg.data.max_length, cfg.model.backbone,
                   cfg.model.init_from, cfg.model.freeze_layers)
            groups.setdefault(key, []).append(cfg)
    built = []
    for group in groups.values():
        cfg = next((c for c in group if c.model.para_head == "cross"), group[0])
        folder = run_cache(cfg)
        if folder is not None:
            built.append(Path(folder))
    return built


# ---------------------------------------------------------------- the frozen probe


def _embed(model, data, pad_id: int, batch_size: int, device) -> tuple[np.ndarray, np.ndarray | None]:
    """Sentence embeddings of a split (both sides for pairs), in data order."""
    import torch
    from tqdm import tqdm

    from pipeline.data import collate, to_device

    model.eval()
    hidden = model.bert.config.hidden_size
    e1 = np.zeros((len(data), hidden), dtype=np.float32)
    e2 = np.zeros_like(e1) if data.pair else None
    order = np.argsort(data.lengths, kind="stable")
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=f"embed {data.task}-{data.split}", leave=False,
                          disable=None):
            idx = order[start: start + batch_size]
            batch = to_device(collate(data, idx, pad_id), device)
            emb = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            emb = emb.float().cpu().numpy()
            if data.pair:
                n = batch["pair_size"]
                e1[idx], e2[idx] = emb[:n], emb[n:]
            else:
                e1[idx] = emb
    return e1, e2


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
    return (u * v).sum(1) / np.maximum(nu * nv, 1e-12)


def run_probe(cfg, probe: dict) -> dict:
    """The frozen backbone (mean pooling) on each multitask task, by the kind of task the registry says:
    a classification or a binary pair task gets a logistic regression, a score task the zero-shot cosine."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.data import load_split, tokenizer_info
    from pipeline.model import build_model

    start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    mcfg = type(cfg.model)(**{**vars(cfg.model), "pooling": "mean", "mode": "pretrain", "init_from": "",
                              "freeze_layers": 0})
    model = build_model(mcfg, tasks=[])
    pad_id = tokenizer_info(cfg.data.prepared_dir)["pad_id"]
    device = torch.device("cpu")
    bs = cfg.eval.batch_size
    pair_rows = int(probe["pair_train_rows"])

    def classifier():  # L2 strength chosen by 5-fold cross-validation on the training embeddings
        return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(probe["Cs"]), cv=5, max_iter=3000))

    def features(data):
        u, v = _embed(model, data, pad_id, bs, device)
        return pair_features(u, v) if data.pair else u

    scores, strengths, n_dev, n_train, how = {}, {}, {}, {}, []
    for name in MULTITASK:
        task = TASKS[name]
        dev = load_split(cfg.data.prepared_dir, name, "dev")
        n_dev[name] = len(dev)
        if task.pair_kind == "score":
            u, v = _embed(model, dev, pad_id, bs, device)
            scores[task.metric] = task_score(name, cosine(u, v), dev.labels.numpy())
            how.append(f"{task.label}: cosine of the two embeddings, no training")
            continue
        train = load_split(cfg.data.prepared_dir, name, "train").subset(pair_rows if task.pair_kind else 0)
        clf = classifier().fit(features(train), train.labels.numpy().astype(int))
        scores[task.metric] = task_score(name, clf.predict(features(dev)), dev.labels.numpy())
        strengths[name], n_train[name] = float(clf[-1].C_[0]), len(train)
        how.append(f"{task.label}: logistic regression on "
                   + (f"[u; v; |u-v|; u*v] of {len(train)} train pairs" if task.pair_kind
                      else f"the embedding ({len(train)} train sentences)"))
    return {"scores": summarize(scores), "C": strengths, "n_dev": n_dev, "train_rows": n_train,
            "wall_s": round(time.perf_counter() - start, 1),
            "method": "backbone frozen, mean pooling; logistic regressions on standardised features, L2 strength "
                      "by 5-fold cross-validation on train; " + "; ".join(how)}


# ---------------------------------------------------------------- fine-tuned candidates


def recipe(cfg) -> dict:
    """What a candidate's runs learn from: the composed model and train config (not seed or threads) and the data."""
    return {"model": vars(cfg.model), "train": {k: v for k, v in vars(cfg.train).items() if k not in NOT_RECIPE},
            "data": {"max_length": cfg.data.max_length, "limit": cfg.data.limit}}


def run_candidate(name: str, seed: int, args, profile: str, run_dir: Path) -> dict:
    """Train and evaluate one candidate under one seed in a pipeline process; its scores and time."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--params", args.params, "--profile", profile,
           "--experiment", name, "--seed", str(seed), "--run-dir", str(run_dir), "--no-resume", "--evaluate"]
    for override in args.overrides:
        cmd += ["-S", override]
    log.info("candidate %s, seed %d: %s", name, seed, " ".join(cmd[2:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise PipelineError(f"candidate {name}, seed {seed}: the pipeline exited with {proc.returncode} "
                            "(see the log above)")
    metrics = pio.read_json(run_dir / "metrics.json")
    history = pio.read_json(run_dir / "history.json")
    return {"scores": {m: metrics[m] for m in SHOWN if m in metrics}, "n_dev": metrics.get("n_dev"),
            "train_s": round(sum(h["train_time_s"] for h in history), 1), "wall_s": round(wall, 1),
            "steps": sum(h["steps"] for h in history), "best_epoch": max(history, key=lambda h: h["avg"])["epoch"],
            "history": [{k: h[k] for k in ("epoch", "steps", "train_time_s", *METRICS) if k in h} for h in history],
            "run_dir": str(run_dir)}


# ---------------------------------------------------------------- results file


def upgrade(res: dict) -> dict:
    """A results file of an older schema, in this one.

    Schema 1 kept one run per candidate (seed 11711, the train.seed default), named without the
    `quality_` prefix its experiment has in params.yaml, with overrides of benchmarks/quality.yaml.
    """
    version = res.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return res
    if version != 1:
        raise PipelineError(f"quality.json: schema_version {version} is unknown (this code reads 1 and "
                            f"{SCHEMA_VERSION})")
    candidates = {}
    for name, old in (res.get("candidates") or {}).items():
        seed = str(((old.get("config") or {}).get("train") or {}).get("seed", 11711))
        kept = ("scores", "n_dev", "train_s", "wall_s", "steps", "best_epoch", "history")
        run = {k: old[k] for k in kept if k in old}
        run["scores"] = summarize(run.get("scores") or {})
        candidates[f"quality_{name}"] = {"experiment": f"quality_{name}", "profile": old.get("profile"),
                                         "composition": {f"profile `{old.get('profile')}` + benchmarks/quality.yaml "
                                                         "(before the candidates moved to params.yaml)":
                                                         old.get("overrides") or {}},
                                         "recipe": old.get("config") or {}, "runs": {seed: run}}
    probe = res.get("probe")
    if probe:
        probe = {**probe, "scores": summarize(probe.get("scores") or {})}
    return {**{k: v for k, v in res.items() if k not in ("candidates", "spec", "probe")}, "probe": probe,
            "candidates": candidates, "schema_version": SCHEMA_VERSION}


def read_results(path: Path) -> dict:
    if not path.exists():
        return {"candidates": {}, "schema_version": SCHEMA_VERSION}
    try:
        return upgrade(pio.read_json(path))
    except ValueError as err:
        raise PipelineError(f"{path}: not readable JSON ({err})") from None


def _points(cand: dict, metric: str) -> list[float]:
    return [float(r["scores"][metric]) for r in cand["runs"].values() if metric in (r.get("scores") or {})]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


# ---------------------------------------------------------------- the paired comparison


def compare(res: dict, a: str, b: str, report_block: dict | None) -> dict | None:
    """a - b per metric: the difference of the seed means, the report's paired bootstrap over the dev rows
    (from the runs' dev_predictions.csv, where every run of both still has one) and, with two or more seeds
    a side, a Welch t interval over the seeds. None when either candidate has no runs."""
    from pipeline.report_stats import Bootstrap, canonical_ids, estimate_runs, read_dev_predictions, welch_interval

    ca, cb = (res.get("candidates") or {}).get(a), (res.get("candidates") or {}).get(b)
    if not ca or not cb or not ca.get("runs") or not cb.get("runs"):
        return None
    block = report_block or {}
    missing = [k for k in ("n_boot", "ci", "seed") if k not in block]
    if missing:
        raise ConfigError(f"report.{missing[0]} is missing (the quality comparison uses the report's intervals)")
    boot = Bootstrap(block["n_boot"], block["ci"], block["seed"])
    paths = {side: [Path(r["run_dir"]) / "dev_predictions.csv" for r in c["runs"].values() if r.get("run_dir")]
             for side, c in (("a", ca), ("b", cb))}
    have = all(len(paths[s]) == len(c["runs"]) and all(p.exists() for p in paths[s])
               for s, c in (("a", ca), ("b", cb)))
    est = {}
    if have:
        preds = {s: [read_dev_predictions(p) for p in paths[s]] for s in paths}
        ids = canonical_ids(preds["a"] + preds["b"])
        est = {s: estimate_runs(boot, preds[s], ids) for s in preds}
    out = {"a": a, "b": b, "seeds": {a: list(ca["runs"]), b: list(cb["runs"])}, "n_boot": boot.n_boot, "ci": boot.ci,
           "bootstrap": bool(est), "metrics": {}}
    for m in SHOWN:
        pa, pb = _points(ca, m), _points(cb, m)
        if not pa or not pb:
            continue
        seed_lo, seed_hi = welch_interval(pa, pb, boot.ci)
        entry = {"a": float(np.mean(pa)), "b": float(np.mean(pb)), "diff": float(np.mean(pa) - np.mean(pb)),
                 "seed_lo": seed_lo, "seed_hi": seed_hi, "lo": math.nan, "hi": math.nan}
        if est and m in est["a"] and m in est["b"]:
            d = boot.difference(est["a"][m], est["b"][m])
            entry.update(lo=d.lo, hi=d.hi)
        out["metrics"][m] = entry
    return out


def _difference(entry: dict):
    from pipeline.report_stats import Difference

    return Difference(entry["diff"], entry["lo"], entry["hi"], entry["seed_lo"], entry["seed_hi"])


def _nan(x) -> float:
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------- report


def verdicts(cand: dict, bar: dict, budget_min: float) -> dict:
    """Per bar metric: does the seed mean reach the bar; and does the mean wall time fit the budget."""
    out = {m: _mean_std(_points(cand, m))[0] >= bar[m] for m in METRICS}
    walls = [r["wall_s"] for r in cand["runs"].values() if "wall_s" in r]
    if walls:
        out["budget"] = float(np.mean(walls)) <= budget_min * 60
    return out


def _score(values: list[float]) -> str:
    from pipeline.report_tables import _num

    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "—"
    return _num(mean) + (f" ± {std:.3f}" if len(values) > 1 else "")


def render(res: dict) -> str:
    from pipeline.report_tables import _num, diff_cell

    bar, budget = res["bar"], res["budget_minutes"]
    titles = [METRIC_TITLES[m] for m in SHOWN]
    lines = ["# Quality on the embedded default", "",
             f"Generated by `make quality` (`python -m benchmarks.quality`) from `{res.get('params', 'params.yaml')}` "
             f"(its `quality:` block; each candidate is an experiment there, trained under the profile its row "
             f"names: `quality.profiles`, else `{res.get('profile', '?')}`); last update {res.get('updated', '?')}. "
             "Full dev sets. A score is the mean "
             "over the candidate's seeds (± std across seeds with two or more); the bar is the one set for the best "
             f"candidate trained for at most {budget:g} minutes on this machine's CPU, and a candidate meets it when "
             "every mean does and its mean wall time fits the budget.", "",
             "| run | profile | seeds | " + " | ".join(titles) + " | train min | wall min | steps | meets bar |",
             "|---|---|---:|" + "---:|" * (len(SHOWN) + 3) + "---|",
             "| bar | | | " + " | ".join(f"≥ {bar[m]:.2f}" if m in bar else "" for m in SHOWN)
             + f" | | ≤ {budget:g} | | |"]
    probe = res.get("probe")
    if probe:
        lines.append(f"| frozen probe | {res.get('profile', '?')} | – | "
                     + " | ".join(_num(probe["scores"].get(m)) for m in SHOWN)
                     + f" | – | {probe['wall_s'] / 60:.1f} | – | – |")
    for name, cand in (res.get("candidates") or {}).items():
        if not cand.get("runs"):
            continue
        v = verdicts(cand, bar, budget)
        marks = [_score(_points(cand, m)) + ("" if v.get(m, True) else " ✗") for m in SHOWN]
        runs = list(cand["runs"].values())
        lines.append(f"| {name} | {cand.get('profile') or '?'} | {len(runs)} | " + " | ".join(marks)
                     + f" | {np.mean([r['train_s'] for r in runs]) / 60:.1f}"
                     + f" | {np.mean([r['wall_s'] for r in runs]) / 60:.1f}{'' if v.get('budget', True) else ' ✗'}"
                     + f" | {' / '.join(dict.fromkeys(str(r['steps']) for r in runs))}"
                     + f" | {'yes' if all(v.values()) else 'no'} |")
    lines += ["", "✗: below the bar (or over the budget). *train min*: the training loop alone; *wall min*: the whole "
              "pipeline process (start, training, per-epoch selection on a dev sample, final full-dev evaluation); "
              "both are means over the seeds."]
    if probe:
        lines += ["", f"Frozen probe: {probe['method']}."]

    comp = res.get("comparison")
    if comp and comp.get("metrics"):
        a, b, ci = comp["a"], comp["b"], comp["ci"]
        lines += ["", f"## Paired comparison: {a} − {b}", "",
                  f"Difference of the seed means ({a}: seeds {', '.join(map(str, comp['seeds'][a]))}; {b}: seeds "
                  f"{', '.join(map(str, comp['seeds'][b]))}) "
                  + (f"[{ci:.0%} paired bootstrap interval over the same dev rows, {comp['n_boot']} resamples, each "
                     "replicate the mean over seeds]" if comp["bootstrap"] else
                     "without a paired bootstrap (a run's dev_predictions.csv is gone)")
                  + f"; where both have two or more seeds also `seeds [...]`, a {ci:.0%} Welch t interval over the "
                  "seed scores. `resolved`: no interval contains 0; `~noise (...)`: the named one does. Decided on "
                  "unrounded numbers, as in REPORT.md.", "",
                  f"| metric | {a} | {b} | Δ |", "|---|---:|---:|---|"]
        for m, e in comp["metrics"].items():
            e = {k: _nan(v) if k in ("lo", "hi", "seed_lo", "seed_hi") else v for k, v in e.items()}
            if comp["bootstrap"]:
                delta = diff_cell(_difference(e))
            elif not math.isnan(e["seed_lo"]):
                d = _difference({**e, "lo": -math.inf, "hi": math.inf})
                delta = (f"{_num(e['diff'], True)}; seeds [{_num(e['seed_lo'], True)}, {_num(e['seed_hi'], True)}] "
                         + ("resolved (seeds only)" if not d.seeds_contain_zero else "~noise (seeds)"))
            else:
                delta = f"{_num(e['diff'], True)} (no interval: one seed a side and no dev predictions)"
            lines.append(f"| {METRIC_TITLES[m]} | {_num(e['a'])} | {_num(e['b'])} | {delta} |")

    for name, cand in (res.get("candidates") or {}).items():
        if not cand.get("runs"):
            continue
        lines += ["", f"## {name}", ""]
        for source, overrides in (cand.get("composition") or {}).items():
            lines.append(f"{source}: " + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none") + ".")
            lines.append("")
        eval_limit = ((cand.get("recipe") or {}).get("train") or {}).get("eval_limit")
        frozen = ((cand.get("recipe") or {}).get("model") or {}).get("freeze_layers", 0)
        lines += [f"Frozen lower layers (model.freeze_layers): {frozen or 0}.", "",
                  "| seed | " + " | ".join(titles) + " | best epoch | steps | train min | wall min |",
                  "|---:|" + "---:|" * (len(SHOWN) + 4)]
        for seed, r in cand["runs"].items():
            lines.append(f"| {seed} | " + " | ".join(_num(r["scores"].get(m)) for m in SHOWN)
                         + f" | {r.get('best_epoch', '–')} | {r['steps']} | {r['train_s'] / 60:.1f} | "
                           f"{r['wall_s'] / 60:.1f} |")
        lines += ["", "Per epoch, on the selection sample (`train.eval_limit`"
                  + (f" = {eval_limit} dev rows per task" if eval_limit else "") + "), not full dev:", "",
                  "| seed | epoch | steps | train s | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
                  "|---:|---:|---:|---:|" + "---:|" * len(METRICS)]
        for seed, r in cand["runs"].items():
            for h in r.get("history") or []:
                lines.append(f"| {seed} | {h['epoch']} | {h['steps']} | {h['train_time_s']:.0f} | "
                             + " | ".join(_num(h.get(m)) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml",
                   help="params file with the `quality:` block (default: params.yaml)")
    p.add_argument("--profile", default=None,
                   help="profile the candidates train under, except those quality.profiles names "
                        "(default: quality.profile)")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME",
                   help="train only these candidates (comma- or space-separated; 'probe' for the probe); the rest of "
                        "quality.json stays")
    p.add_argument("--experiment", "-e", action="append", default=[], metavar="NAME",
                   help="add a params.yaml experiment as a candidate (repeatable); without --only, only the added "
                        "ones train")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="train each candidate under the first N seeds of quality.seeds (default: all of them)")
    seeds.add_argument("--seed-list", action="append", default=None, metavar="S[,S]",
                       help="train each candidate under these seeds instead")
    p.add_argument("--compare", default=None, metavar="A,B",
                   help="the pair of candidates quality.md compares, A - B (default: quality.compare)")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter for every candidate and the probe, e.g. -S model.freeze_layers=5 "
                        "(the frozen-prefix fast path)")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default: <tracking.runs_dir>/quality)")
    p.add_argument("--out", default="reports", help="folder of quality.json and quality.md (default: reports)")
    p.add_argument("--retrain", action="store_true",
                   help="train every asked seed again, even those quality.json already holds for the same config")
    p.add_argument("--render", action="store_true",
                   help="train nothing: recompute the comparison and rewrite quality.md from quality.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action():
        from pipeline.config import experiment_overrides, load_config, parse_override, read_params

        params = read_params(args.params)
        spec = read_spec(params, args.params)
        experiments = params.get("experiments") or {}
        added = _names(args.experiment)
        unknown = [n for n in added if n not in experiments]
        if unknown:
            raise ConfigError(f"--experiment: unknown experiment(s) {', '.join(unknown)}; {args.params} defines "
                              f"{', '.join(experiments)}")
        candidates = list(dict.fromkeys(spec.candidates + added))
        if args.render:
            wanted = []
        elif args.only is not None:
            wanted = _names(args.only)
        else:
            wanted = added or candidates + ["probe"]
        unknown = [n for n in wanted if n not in candidates and n != "probe"]
        if unknown:
            raise ConfigError(f"--only: unknown candidate(s) {', '.join(unknown)}; the candidates are "
                              f"{', '.join(candidates)} (quality.candidates, plus --experiment), and probe")
        seeds = pick_seeds(spec, args.seeds, args.seed_list)
        pair = _names([args.compare]) if args.compare else spec.compare
        if pair and (len(pair) != 2 or pair[0] == pair[1]):
            raise ConfigError(f"--compare {args.compare}: name two different candidates, A,B")
        profile = args.profile or spec.profile

        def profile_of(name: str) -> str:
            return spec.profiles.get(name) or profile

        overrides = list(args.overrides)
        cli = dict(parse_override(o) for o in overrides)
        # Every config composed, and so checked, before anything trains.
        base = load_config(args.params, profile=profile, overrides=overrides)
        cfgs = {n: load_config(args.params, experiment=n, profile=profile_of(n), overrides=overrides)
                for n in wanted if n != "probe"}
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path(base.tracking.runs_dir) / "quality"
        out = Path(args.out)
        path = out / "quality.json"
        res = read_results(path)
        res.setdefault("candidates", {})

        def save():
            res["candidates"] = {n: res["candidates"][n] for n in dict.fromkeys([*candidates, *res["candidates"]])
                                 if n in res["candidates"]}
            comp_pair = pair or [n for n in res["candidates"] if res["candidates"][n].get("runs")][:2]
            if len(comp_pair) == 2:
                new = compare(res, comp_pair[0], comp_pair[1], params.get("report"))
                old = res.get("comparison") or {}
                keep = (new is not None and not new["bootstrap"] and old.get("bootstrap")
                        and (old.get("a"), old.get("b"), old.get("seeds")) == (new["a"], new["b"], new["seeds"]))
                if not keep:  # a stored bootstrap of the same runs outlives their deleted prediction files
                    res["comparison"] = new
            res.update(schema_version=SCHEMA_VERSION, params=str(args.params), profile=profile, bar=spec.bar,
                       budget_minutes=spec.budget_minutes,
                       updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            pio.write_json(path, res)
            pio.write_text(out / "quality.md", render(res))

        if wanted:
            for cfg in {c.data.prepared_dir: c for c in [base, *cfgs.values()]}.values():
                ensure_prepared(cfg)
            ensure_caches(list(cfgs.values()))
        if "probe" in wanted:
            res["probe"] = run_probe(base, spec.probe)
            log.info("probe: %s", res["probe"]["scores"])
            save()
        for name, cfg in cfgs.items():
            entry = {"experiment": name, "profile": profile_of(name),
                     "composition": {f"profile `{profile_of(name)}` + experiment `{name}`":
                                     experiment_overrides(params, name),
                                     **({"-S": cli} if cli else {})},
                     "recipe": recipe(cfg)}
            old = res["candidates"].get(name) or {}
            runs = dict(old.get("runs") or {}) if old.get("recipe") == entry["recipe"] else {}
            if old.get("runs") and not runs:
                log.info("%s: its config changed since the stored runs (seeds %s); they are replaced", name,
                         ", ".join(old["runs"]))
            res["candidates"][name] = {**entry, "runs": runs}
            for seed in seeds:
                stored = runs.get(str(seed)) or {}
                if stored and not args.retrain and (Path(stored.get("run_dir", "")) / "metrics.json").is_file():
                    log.info("%s, seed %d: kept from %s (same config, its run is in %s; --retrain trains it "
                             "again)", name, seed, path, stored["run_dir"])
                    continue
                runs[str(seed)] = run_candidate(name, seed, args, profile_of(name), runs_dir / name / f"s{seed}")
                log.info("%s, seed %d: %s in %.1f min", name, seed, runs[str(seed)]["scores"],
                         runs[str(seed)]["wall_s"] / 60)
                save()  # after every run: a stopped quality check keeps what finished
        save()
        log.info("wrote %s and %s", path, out / "quality.md")

    from pipeline.cli import run_guarded

    return run_guarded(action)


if __name__ == "__main__":
    sys.exit(main())
