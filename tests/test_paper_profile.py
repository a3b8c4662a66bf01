"""The `paper` profile, what a GPU user runs, end to end through the real CLI on CPU: a randomly
initialised bert-base-shaped BERT stands in for bert-base-uncased; prepare, then train and
evaluate Cos + ReLU + PCG + Loop, shrunk by overrides to two steps on a few rows."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS, ROOT, write_micro_data

pytestmark = pytest.mark.slow

EXPERIMENT = "cos_relu_pcg_loop"
# data.limit: rows kept per file. Loop trains every task at SST's train size, so 12 rows make 2 steps
# (8 + 4) exactly when the batch is the paper's 8 (batch 4: 3 steps, 16: 1); a step of bert-base on 2 CPU
# cores with PCGrad takes ~10-25 s, most of this test's time.
ROWS = 12
STEPS = 2
BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072}


@pytest.fixture(scope="module")
def bert_base_random(tmp_path_factory) -> Path:
    """bert-base-uncased's shape and vocabulary, random weights (no download)."""
    import torch
    from transformers import BertConfig, BertModel

    from pipeline.model import load_tokenizer

    folder = tmp_path_factory.mktemp("bert-base-random")
    torch.manual_seed(0)
    BertModel(BertConfig(**BERT_BASE)).save_pretrained(folder)
    load_tokenizer("embedded").save_pretrained(folder)  # the embedded MiniLM's is bert-base-uncased's vocabulary
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MINBERT_DATA_DIR", "MINBERT_PROFILE")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_paper_profile_prepare_train_evaluate(tmp_path, bert_base_random):
    paper = yaml.safe_load(PARAMS.read_text())["profiles"]["paper"]
    data = write_micro_data(tmp_path / "data", rows=24)
    overrides = [
        f"model.backbone={bert_base_random}", f"data.data_dir={data}", f"data.limit={ROWS}",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"tracking.runs_dir={tmp_path / 'runs'}",
        "train.epochs=1", "train.epoch_fraction=1.0", "train.eval_limit=8", "eval.dev_limit=8", "train.threads=2",
    ]
    common = ["--params", str(PARAMS), "--profile", "paper", *(a for o in overrides for a in ("-S", o))]

    res = _cli("prepare", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("train", "-e", EXPERIMENT, "--evaluate", *common)
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "runs" / "adhoc" / EXPERIMENT / "s11711"  # --profile: not the study folder
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("sst_acc", "para_acc", "sts_corr"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics)

    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "completed" and record["backbone"] == str(bert_base_random)
    cfg = record["config"]
    # the paper profile's settings reached the run ...
    assert cfg["train"]["batch_size"] == paper["train"]["batch_size"] == 8
    assert cfg["model"]["dropout"] == paper["model"]["dropout"] == 0.3
    assert cfg["train"]["lr"] == paper["train"]["lr"] and cfg["data"]["max_length"] == paper["data"]["max_length"]
    # ... with the experiment's switches on top, and our shrinking overrides last
    assert (cfg["model"]["heads"], cfg["model"]["sts_head"], cfg["train"]["balancer"], cfg["train"]["schedule"]) == \
           ("relu", "cos", "pcgrad", "loop")
    assert cfg["train"]["epochs"] == 1 and cfg["model"]["backbone"] == str(bert_base_random)
    # batch 8 really was the batch: ROWS SST rows under Loop -> STEPS steps
    history = json.loads((run / "history.json").read_text())
    assert [h["steps"] for h in history] == [STEPS]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == STEPS and all(math.isfinite(s[f"loss_{t}"]) for s in steps for t in ("sst", "para", "sts"))
    assert any((run / "predictions").glob("*-test-output.csv"))  # the paper profile also writes test predictions
