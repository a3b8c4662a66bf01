"""The frozen-prefix cache and the precision switch, on the tiny BERT.

Cached training must equal uncached training with the same layers frozen; a cache built for
other weights, data, k or max length, or a torn one, is never read.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import cache, runtime
from pipeline.data import collate, load_split, tokenizer_info
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.train import load_task_data, make_optimizer, open_prefix_cache, train, train_step

TASKS = ["sst", "para", "sts"]


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model, TASKS)
    model.set_precision(torch.device("cpu"), "fp32")
    return model


def _step_batches(cfg, data, cached: bool):
    pad = tokenizer_info(cfg.data.prepared_dir)["pad_id"]
    out = {}
    for t in TASKS:
        idx = np.arange(min(4, len(data[t])))
        batch = collate(data[t], idx, pad)
        assert ("hidden" in batch) == cached
        out[t] = batch
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_cached_prefix_step_equals_uncached(make_cfg, monkeypatch, dtype, tol):
    """One step, same weights and batches: losses and every gradient agree (exactly up to float
    tolerance with an fp32 cache; to half precision with the fp16 cache the stage writes)."""
    monkeypatch.setattr(cache, "STORE_DTYPE", dtype)
    cfg = make_cfg("model.freeze_layers=1", "model.dropout=0.0",
                   f"data.prefix_dir={make_cfg().data.prefix_dir}-{dtype}")
    results = []
    for cached in (False, True):
        model = _model(cfg)
        model.eval()  # no dropout anywhere: the two paths must compute the same function
        prefix = open_prefix_cache(cfg, model) if cached else None
        data = load_task_data(cfg, TASKS, "train", prefix)
        optimizer = make_optimizer(model, cfg.train, "cpu")
        from pipeline.balancers import make_balancer

        balancer = make_balancer("sum", model, TASKS, cfg.train)
        losses = {t: model.loss(t, b) for t, b in _step_batches(cfg, data, cached).items()}
        balancer.backward(losses)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({t: v.item() for t, v in losses.items()}, grads))
        optimizer.zero_grad()
    (l0, g0), (l1, g1) = results
    assert l0.keys() == l1.keys() and g0.keys() == g1.keys()
    assert not any(n.startswith("bert.embeddings") or ".layer.0." in n for n in g0)  # frozen: no gradients
    for t in l0:
        assert l1[t] == pytest.approx(l0[t], rel=tol, abs=tol)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=tol * 10, atol=tol)


def test_cache_keyed_by_weights_data_k_and_length(make_cfg, tmp_path):
    cfg = make_cfg("model.freeze_layers=1", f"data.prefix_dir={tmp_path / 'prefix'}")
    model = _model(cfg)
    folder = cache.ensure(cfg, model)
    manifest = folder / cache.MANIFEST
    built = manifest.stat().st_mtime_ns
    assert cache.ensure(cfg, model) == folder and manifest.stat().st_mtime_ns == built  # valid: reused

    meta = cache.fingerprint(cfg, model)
    assert cache.stale_reason(folder, meta) is None
    assert "weights" in cache.stale_reason(folder, {**meta, "weights": "other"})
    assert "data" in cache.stale_reason(folder, {**meta, "data": "other"})
    assert "max_length" in cache.stale_reason(folder, {**meta, "max_length": 16})
    assert "cross" in cache.stale_reason(folder, meta, cross=True)

    # Other frozen weights (another backbone, or the same one changed): another folder.
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[5] += 1.0
    assert cache.cache_dir(cfg, cache.fingerprint(cfg, model)) != folder
    # A trainable layer changing (what the MLM stage does above the prefix) keeps the key.
    model = _model(cfg)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight += 1.0
    assert cache.fingerprint(cfg, model) == meta
    # Another k: another folder.
    cfg2 = make_cfg("model.freeze_layers=2", f"data.prefix_dir={tmp_path / 'prefix'}")
    folder2 = cache.ensure(cfg2, _model(cfg2))
    assert folder2 != folder and json.loads((folder2 / cache.MANIFEST).read_text())["freeze_layers"] == 2


def test_torn_or_stale_cache_is_never_read(make_cfg, tmp_path):
    cfg = make_cfg("model.freeze_layers=1", f"data.prefix_dir={tmp_path / 'prefix'}")
    model = _model(cfg)
    folder = cache.ensure(cfg, model)
    (folder / cache.MANIFEST).unlink()  # as if killed before the manifest was written
    assert cache.stale_reason(folder, cache.fingerprint(cfg, model)) == "incomplete cache (no manifest)"
    assert cache.ensure(cfg, model) == folder and (folder / cache.MANIFEST).exists()  # rebuilt

    # Leftover temporary folders of a killed build are not caches.
    (folder.parent / f".{folder.name}.123.tmp").mkdir()
    assert cache.stale_reason(folder, cache.fingerprint(cfg, model)) is None

    # A split whose token counts differ from the prepared data is refused when attached.
    prefix = cache.PrefixCache(folder)
    data = load_split(cfg.data.prepared_dir, "sst", "dev")
    data.s1 = (data.s1[0], data.s1[1] + 1)
    with pytest.raises(PipelineError, match="stale"):
        prefix.attach(data)
    shutil.rmtree(folder)


def test_pretrain_mode_runs_the_frozen_rest_on_the_cache(make_cfg, tmp_path):
    """Heads only (model.mode=pretrain) on a cache of 1 layer: the 2nd layer runs frozen on top."""
    cfg = make_cfg("model.freeze_layers=1", "model.mode=pretrain", "train.tasks=[sst]", "train.epochs=1",
                   f"data.prefix_dir={tmp_path / 'prefix'}")
    best = train(cfg, run_dir=tmp_path / "run")
    assert np.isfinite(best["sst_acc"])
    model = build_model(cfg.model, ["sst"])
    assert model.frozen_layers == 2 and model.prefix_layers == 1
    assert [p for p in model.bert.parameters() if p.requires_grad] == []
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["metrics"]["freeze_layers"] == 2 and record["metrics"]["precision"] == "fp32"


def test_train_step_trains_only_the_upper_layers(make_cfg, tmp_path):
    cfg = make_cfg("model.freeze_layers=1", f"data.prefix_dir={tmp_path / 'prefix'}")
    model = _model(cfg)
    data = load_task_data(cfg, TASKS, "train", open_prefix_cache(cfg, model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from pipeline.balancers import make_balancer

    entry = train_step(model, _step_batches(cfg, data, True), make_balancer("sum", model, TASKS, cfg.train),
                       make_optimizer(model, cfg.train, "cpu"))
    assert set(entry) >= {"loss_sst", "loss_para", "loss_sts", "lr"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".layer.1." in n for n in changed) and any(n.startswith("heads.") for n in changed)
    assert not any(n.startswith("bert.embeddings") or ".layer.0." in n for n in changed)


def test_freeze_layers_beyond_the_backbone_is_one_line_error(make_cfg):
    with pytest.raises(Exception, match="freeze_layers=3 but the backbone has 2 layers"):
        build_model(make_cfg("model.freeze_layers=3").model, TASKS)


def test_precision_auto_uses_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    probe = runtime.cpu_has_native_bf16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated if need be
    with pytest.raises(PipelineError, match="train.precision"):
        runtime.resolve_precision("fp16", cpu)
    assert isinstance(probe.__wrapped__(), bool)  # the real probe runs here


def test_bf16_autocasts_the_encoder_but_not_heads_or_losses(make_cfg):
    cfg = make_cfg()
    model = _model(cfg)
    model.set_precision(torch.device("cpu"), "bf16")
    data = load_task_data(cfg, TASKS, "train")
    seen = []
    hook = model.heads["sst"][0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    inner = model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    loss = model.loss("sst", _step_batches(cfg, data, False)["sst"])
    hook.remove()
    inner.remove()
    assert torch.bfloat16 in seen and seen[-1] == torch.float32  # encoder bf16, head input fp32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
