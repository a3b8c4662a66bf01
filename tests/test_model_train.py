"""The multitask model and the training loop on the tiny random BERT."""
import json
import math

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
    linears = lambda m: [(lin.in_features, lin.out_features) for lin in m if isinstance(lin, torch.nn.Linear)]
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
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
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
    monkeypatch.setattr(MultitaskBert, "loss",
                        lambda self, t, b: real(self, t, b) * (float("nan") if t == "sts" else 1))
    with pytest.raises(NonFiniteLossError, match="task sts loss is nan at epoch 1 step 1"):
        train(make_cfg(), run_dir=tmp_path / "nan")
    record = json.loads((tmp_path / "nan" / "record.json").read_text())
    assert record["status"] == "failed" and "task sts" in record["error"]
    skipped = train(make_cfg("train.on_nonfinite=skip", "train.epochs=1"), run_dir=tmp_path / "skip")
    # every step has a NaN sts loss, so every batch is skipped; the run still completes and is scored
    assert skipped["best_epoch"] == 1
    assert all(math.isfinite(skipped[k]) for k in ("sst_acc", "para_acc", "sts_corr", "avg"))
    history = json.loads((tmp_path / "skip" / "history.json").read_text())
    record = json.loads((tmp_path / "skip" / "record.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["skipped_batches"] == history[0]["steps"] > 0
    assert not (tmp_path / "skip" / "steps.jsonl").read_text().strip()  # no optimizer step was logged


def test_cos_target_unit_and_signed(make_cfg, prepared):
    """Cos head: MSE against labels/5 (unit) or 2*labels/5-1 (signed); predictions map back onto 0..5."""
    data = load_split(prepared, "sts", "train")
    batch = collate(data, np.arange(6), 0)
    y = batch["labels"].float()
    for target, to_cos in (("unit", lambda s: s / 5), ("signed", lambda s: s * 2 / 5 - 1)):
        torch.manual_seed(0)
        model = build_model(make_cfg("model.sts_head=cos", f"model.cos_target={target}").model, ["sts"]).eval()
        cos = model("sts", batch)
        assert torch.allclose(model.loss("sts", batch), torch.nn.functional.mse_loss(cos, to_cos(y)))
        assert torch.allclose(to_cos(model.predict("sts", batch)), cos, atol=1e-6)


def test_sbert_pair_features(make_cfg, prepared):
    """pair_features=sbert feeds [u; v; |u-v|; u*v] to the bi-encoder pair heads."""
    cfg = make_cfg("model.pair_features=sbert", "model.heads=relu", "model.relu_widths=[8, 4]")
    model = build_model(cfg.model, ["sst", "para", "sts"]).eval()
    h = model.bert.config.hidden_size
    assert model.heads["para"][0].in_features == model.heads["sts"][0].in_features == 4 * h
    u, v = torch.randn(3, h), torch.randn(3, h)
    assert torch.equal(model.pair_input(u, v), torch.cat([u, v, (u - v).abs(), u * v], dim=-1))
    batch = collate(load_split(prepared, "para", "train"), np.arange(5), 0)
    assert model("para", batch).shape == (5,)
    cross = build_model(make_cfg("model.pair_features=sbert", "model.para_head=cross").model, ["para"])
    assert cross.heads["para"][0].in_features == h  # a cross-encoder sees one sequence: no pair features


def test_head_lr_is_a_second_parameter_group(make_cfg):
    from pipeline.train import make_optimizer

    model = build_model(make_cfg().model, ["sst", "para", "sts"])
    assert len(make_optimizer(model, make_cfg().train, torch.device("cpu")).param_groups) == 1
    opt = make_optimizer(model, make_cfg("train.lr=2e-5", "train.head_lr=1e-3").train, torch.device("cpu"))
    backbone, heads = opt.param_groups
    assert (backbone["lr"], heads["lr"]) == (2e-5, 1e-3)
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    assert len(backbone["params"]) + len(heads["params"]) == len([p for p in model.parameters() if p.requires_grad])
