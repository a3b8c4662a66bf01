"""`python -m benchmarks.quality`: dev quality on the embedded default, against a frozen-backbone probe.

The probe is what the backbone knows before any fine-tuning (logistic regression on frozen
sentence embeddings; zero-shot cosine for STS). Each candidate of benchmarks/quality.yaml is a
real pipeline run (`python -m pipeline train --evaluate`, so the numbers are the pipeline's own),
timed, and scored on full dev. Results merge into reports/quality.json by name; reports/quality.md
is rendered from it, with the bar of the yaml file beside every score.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline import io as pio
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("benchmarks.quality")

METRICS = ("sst_acc", "para_acc", "sts_corr")
LABELS = {"sst_acc": "SST acc", "para_acc": "Quora acc", "sts_corr": "STS r"}
SCHEMA_VERSION = 1


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: quality spec not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    for key in ("bar", "budget_minutes", "probe", "candidates"):
        if key not in spec:
            raise ConfigError(f"{path}: missing top-level key '{key}'")
    if set(spec["bar"]) != set(METRICS):
        raise ConfigError(f"{path}: bar must name exactly {', '.join(METRICS)}")
    for name, cand in (spec["candidates"] or {}).items():
        unknown = set(cand or {}) - {"extensions", "set"}
        if unknown:
            raise ConfigError(f"{path}: candidates.{name} has unknown keys {sorted(unknown)} "
                              f"(allowed: extensions, set)")
    return spec


def candidate_overrides(spec: dict, name: str) -> dict:
    """The flat `section.field` overrides of a candidate: base, then its extensions, then its set."""
    from pipeline.config import EXTENSIONS

    cand = spec["candidates"][name] or {}
    out = dict(spec.get("base") or {})
    for ext in cand.get("extensions") or []:
        if ext not in EXTENSIONS:
            raise ConfigError(f"candidates.{name}.extensions: unknown extension '{ext}' "
                              f"(known: {', '.join(EXTENSIONS)})")
        out.update(EXTENSIONS[ext])
    out.update(cand.get("set") or {})
    return out


def ensure_prepared(cfg) -> None:
    """Run the prepare stage into the spec's prepared_dir unless it already holds this data and tokenisation."""
    from pipeline.prepare import run_prepare

    report = Path(cfg.data.prepared_dir) / "report.json"
    if report.exists():
        done = json.loads(report.read_text())
        if (done.get("backbone"), done.get("max_length"), done.get("limit")) == (
                cfg.model.backbone, cfg.data.max_length, cfg.data.limit):
            return
    log.info("preparing %s (max_length %d)", cfg.data.prepared_dir, cfg.data.max_length)
    run_prepare(cfg)


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
    """Frozen backbone (mean pooling): logistic-regression probes for SST and Quora, zero-shot cosine for STS."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.data import load_split, tokenizer_info
    from pipeline.evaluate import accuracy, pearson
    from pipeline.model import build_model

    start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    mcfg = type(cfg.model)(**{**vars(cfg.model), "pooling": "mean", "mode": "pretrain", "init_from": ""})
    model = build_model(mcfg, tasks=[])
    pad_id = tokenizer_info(cfg.data.prepared_dir)["pad_id"]
    device = torch.device("cpu")
    bs = cfg.eval.batch_size

    def split(task, name, limit=0):
        return load_split(cfg.data.prepared_dir, task, name).subset(limit)

    def classifier():  # L2 strength chosen by 5-fold cross-validation on the training embeddings
        cs = [float(c) for c in probe.get("Cs", [0.01, 0.1, 1.0])]
        return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=cs, cv=5, max_iter=3000))

    sst_train, sst_dev = split("sst", "train"), split("sst", "dev")
    x_train, _ = _embed(model, sst_train, pad_id, bs, device)
    x_dev, _ = _embed(model, sst_dev, pad_id, bs, device)
    clf = classifier().fit(x_train, sst_train.labels.numpy().astype(int))
    sst = accuracy(clf.predict(x_dev), sst_dev.labels.numpy().astype(int))
    sst_c = clf[-1].C_[0]

    n_pairs = int(probe.get("para_train_pairs", 4000))
    para_train, para_dev = split("para", "train", n_pairs), split("para", "dev")
    u, v = _embed(model, para_train, pad_id, bs, device)
    clf = classifier().fit(pair_features(u, v), para_train.labels.numpy().astype(int))
    u, v = _embed(model, para_dev, pad_id, bs, device)
    para = accuracy(clf.predict(pair_features(u, v)), para_dev.labels.numpy().astype(int))

    sts_dev = split("sts", "dev")
    u, v = _embed(model, sts_dev, pad_id, bs, device)
    sts = pearson(cosine(u, v), sts_dev.labels.numpy())
    return {"scores": {"sst_acc": sst, "para_acc": para, "sts_corr": sts},
            "C": {"sst": float(sst_c), "para": float(clf[-1].C_[0])},
            "n_dev": {"sst": len(sst_dev), "para": len(para_dev), "sts": len(sts_dev)},
            "para_train_pairs": len(para_train), "wall_s": round(time.perf_counter() - start, 1),
            "method": "backbone frozen, mean pooling; logistic regressions on standardised features, L2 strength "
                      "by 5-fold cross-validation on train; SST: the embedding (all train); "
                      f"Quora: logistic regression on [u; v; |u-v|; u*v] of {len(para_train)} train pairs; "
                      "STS: cosine of the two embeddings, no training"}


# ---------------------------------------------------------------- fine-tuned candidates


def run_candidate(name: str, spec: dict, params: str, profile: str, runs_dir: Path) -> dict:
    """Train and evaluate one candidate in a pipeline process; its scores, time and config."""
    overrides = candidate_overrides(spec, name)
    from pipeline.config import load_config

    cfg = load_config(params, overrides=overrides, profile=profile)  # a bad candidate fails here, in one line
    run_dir = runs_dir / name
    cmd = [sys.executable, "-m", "pipeline", "train", "--params", params, "--profile", profile,
           "--run-dir", str(run_dir), "--no-resume", "--evaluate"]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"]
    log.info("candidate %s: %s", name, " ".join(cmd[2:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise PipelineError(f"candidate {name}: the pipeline exited with {proc.returncode} (see the log above)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    return {"scores": {m: metrics[m] for m in METRICS}, "n_dev": metrics.get("n_dev"),
            "train_s": round(sum(h["train_time_s"] for h in history), 1), "wall_s": round(wall, 1),
            "steps": sum(h["steps"] for h in history), "best_epoch": max(history, key=lambda h: h["avg"])["epoch"],
            "history": [{k: h[k] for k in ("epoch", "steps", "train_time_s", *METRICS) if k in h} for h in history],
            "overrides": overrides, "profile": profile,
            "config": {"model": vars(cfg.model), "train": {k: v for k, v in vars(cfg.train).items()
                                                            if k not in ("device", "threads", "checkpoint_every")}}}


# ---------------------------------------------------------------- report


def verdicts(result: dict, bar: dict, budget_min: float) -> dict:
    out = {m: result["scores"][m] >= bar[m] for m in METRICS}
    if "train_s" in result:
        out["budget"] = result["wall_s"] <= budget_min * 60
    return out


def render(res: dict) -> str:
    bar, budget = res["bar"], res["budget_minutes"]
    lines = ["# Quality on the embedded default", "",
             f"Generated by `make quality` (`python -m benchmarks.quality`) from `{res['spec']}`; "
             f"last update {res['updated']}. Full dev sets; the bar is the one set for the best combination "
             f"trained for at most {budget} minutes on this machine's CPU.", "",
             "| run | " + " | ".join(LABELS[m] for m in METRICS) + " | train min | wall min | steps | meets bar |",
             "|---|" + "---:|" * (len(METRICS) + 3) + "---|",
             "| bar | " + " | ".join(f"≥ {bar[m]:.2f}" for m in METRICS) + f" | | ≤ {budget} | | |"]
    probe = res.get("probe")
    if probe:
        lines.append("| frozen probe | " + " | ".join(f"{probe['scores'][m]:.3f}" for m in METRICS)
                     + f" | – | {probe['wall_s'] / 60:.1f} | – | – |")
    for name, r in res.get("candidates", {}).items():
        v = verdicts(r, bar, budget)
        marks = [f"{r['scores'][m]:.3f}" + ("" if v[m] else " ✗") for m in METRICS]
        ok = all(v.values())
        lines.append(f"| {name} | " + " | ".join(marks) + f" | {r['train_s'] / 60:.1f} | {r['wall_s'] / 60:.1f} | "
                     f"{r['steps']} | {'yes' if ok else 'no'} |")
    lines += ["", "✗: below the bar. *train min*: the training loop alone; *wall min*: the whole pipeline process "
              "(start, training, per-epoch selection on a dev sample, final full-dev evaluation)."]
    if probe:
        lines += ["", f"Frozen probe: {probe['method']}."]
    for name, r in res.get("candidates", {}).items():
        lines += ["", f"## {name}", "", "Overrides on the `" + r["profile"] + "` profile: "
                  + ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) + ".", "",
                  "| epoch | steps | train s | " + " | ".join(LABELS[m] for m in METRICS) + " |",
                  "|---:|---:|---:|" + "---:|" * len(METRICS)]
        for h in r["history"]:
            lines.append(f"| {h['epoch']} | {h['steps']} | {h['train_time_s']:.0f} | "
                         + " | ".join(f"{h[m]:.3f}" for m in METRICS) + " |")
        lines.append("")
        lines.append(f"Per-epoch scores are on the selection sample (`train.eval_limit`); the table above is full dev "
                     f"for the best epoch ({r['best_epoch']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="benchmarks/quality.yaml")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME",
                   help="run only these candidates (and 'probe'); the rest of reports/quality.json stays")
    p.add_argument("--runs-dir", default="runs/quality")
    p.add_argument("--out", default="reports")
    args = p.parse_args(argv)

    def action():
        from pipeline.config import load_config

        spec = read_spec(args.spec)
        names = list(spec["candidates"])
        wanted = names + ["probe"] if args.only is None else args.only
        unknown = [n for n in wanted if n not in names and n != "probe"]
        if unknown:
            raise ConfigError(f"--only: unknown candidate(s) {', '.join(unknown)}; {args.spec} has {', '.join(names)}")
        out = Path(args.out)
        path = out / "quality.json"
        res = json.loads(path.read_text()) if path.exists() else {"candidates": {}}
        base = load_config(args.params, overrides=dict(spec.get("base") or {}), profile=args.profile)
        ensure_prepared(base)
        if "probe" in wanted:
            res["probe"] = run_probe(base, spec["probe"])
            log.info("probe: %s", res["probe"]["scores"])
        for name in [n for n in wanted if n != "probe"]:
            res.setdefault("candidates", {})[name] = run_candidate(name, spec, args.params, args.profile,
                                                                   Path(args.runs_dir))
            log.info("%s: %s in %.1f min", name, res["candidates"][name]["scores"],
                     res["candidates"][name]["wall_s"] / 60)
        res["candidates"] = {n: res["candidates"][n] for n in names if n in res.get("candidates", {})}
        res.update(schema_version=SCHEMA_VERSION, spec=args.spec, bar=spec["bar"],
                   budget_minutes=spec["budget_minutes"],
                   updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        pio.write_json(path, res)
        pio.write_text(out / "quality.md", render(res))
        log.info("wrote %s and %s", path, out / "quality.md")

    from pipeline.cli import run_guarded

    return run_guarded(action)


if __name__ == "__main__":
    sys.exit(main())
