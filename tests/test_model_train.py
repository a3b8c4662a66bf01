"""The multitask model and the training loop on the tiny random BERT."""
import json

import numpy as np
import pytest
import torch

from pipeline.data import collate, load_split
from pipeline.model import build_model
from pipeline.train import BEST, train


@pytest.mark.parametrize("overrides", [
    [],
    ["model.heads=relu"],
    ["model.sts_head=cos", "model.pooling=mean"],
    ["model.para_head=cross", "model.pooling=cls"],
])
def test_heads_shapes_and_finite_losses(make_cfg, prepared, overrides):
    cfg = make_cfg(*overrides)
    model = build_model(cfg.model, ["sst", "para", "sts"])
    for task in ("sst", "para", "sts"):
        data = load_split(prepared, task, "train")
        batch = collate(data, np.arange(5), 0, cross=(task == "para" and cfg.model.para_head == "cross"))
        out = model(task, batch)
        assert out.shape == ((5, 5) if task == "sst" else (5,))
        assert torch.isfinite(model.loss(task, batch))
        pred = model.predict(task, batch)
        if task == "sts" and cfg.model.sts_head == "cos":
            assert pred.min() >= 0 and pred.max() <= 5


def test_relu_head_widths(make_cfg):
    cfg = make_cfg("model.heads=relu", "model.relu_widths=[256, 64]")
    model = build_model(cfg.model, ["sst", "para", "sts"])
    linears = lambda m: [(l.in_features, l.out_features) for l in m if isinstance(l, torch.nn.Linear)]
    h = model.bert.config.hidden_size
    assert linears(model.heads["sst"]) == [(h, 256), (256, 64), (64, 5)]
    assert linears(model.heads["para"]) == [(2 * h, 512), (512, 64), (64, 1)]


def test_pretrain_mode_freezes_backbone(make_cfg):
    model = build_model(make_cfg("model.mode=pretrain").model, ["sst"])
    assert not any(p.requires_grad for p in model.bert.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())


def test_train_writes_outputs_and_same_seed_same_metrics(make_cfg, tmp_path):
    cfg = make_cfg()
    a = train(cfg, run_dir=tmp_path / "a")
    b = train(cfg, run_dir=tmp_path / "b")
    assert a == b
    assert set(a) >= {"sst_acc", "para_acc", "sts_corr", "avg", "best_epoch"}
    run = tmp_path / "a"
    assert (run / BEST).exists() and (run / "checkpoint" / "model.safetensors").exists()
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "completed" and record["config"]["train"]["lr"] == cfg.train.lr
    steps = [json.loads(l) for l in (run / "steps.jsonl").read_text().splitlines()]
    assert steps and all("loss_sst" in s for s in steps)
    c = train(make_cfg("train.seed=5"), run_dir=tmp_path / "c")
    assert c != a


def test_training_reduces_loss(make_cfg, tmp_path):
    cfg = make_cfg("train.epochs=4", "train.epoch_fraction=1.0", "train.lr=3e-3")
    train(cfg, run_dir=tmp_path / "r")
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert history[-1]["train_loss_sts"] < history[0]["train_loss_sts"]


def test_single_task_sentiment(make_cfg, tmp_path):
    best = train(make_cfg("train.tasks=[cfimdb]", "model.mode=pretrain"), run_dir=tmp_path / "cf")
    assert "cfimdb_acc" in best and best["avg"] == best["cfimdb_acc"]


def test_nonfinite_loss_stops_and_marks_failed(make_cfg, tmp_path, monkeypatch):
    from pipeline.errors import NonFiniteLossError
    from pipeline.model import MultitaskBert

    real = MultitaskBert.loss
    monkeypatch.setattr(MultitaskBert, "loss", lambda self, t, b: real(self, t, b) * (float("nan") if t == "sts" else 1))
    with pytest.raises(NonFiniteLossError, match="task sts loss is nan at epoch 1 step 1"):
        train(make_cfg(), run_dir=tmp_path / "nan")
    record = json.loads((tmp_path / "nan" / "record.json").read_text())
    assert record["status"] == "failed" and "task sts" in record["error"]
    skipped = train(make_cfg("train.on_nonfinite=skip", "train.epochs=1"), run_dir=tmp_path / "skip")
    assert skipped["skipped_batches"] if "skipped_batches" in skipped else True
    record = json.loads((tmp_path / "skip" / "record.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["skipped_batches"] > 0
