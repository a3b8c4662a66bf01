"""The benchmark code paths in smoke mode on the tiny random BERT: wiring and the JSON schema, not timings."""
import json
import math

import numpy as np
import pytest
import torch

from benchmarks.common import Settings, load_bench
from benchmarks.run import run_benchmarks
from benchmarks.steps import naive_batch, raw_texts
from pipeline.model import load_tokenizer

METRICS = ("train_speedup_vs_naive", "train_examples_per_s", "train_tokens_per_s", "pcgrad_overhead",
           "gradnorm_overhead", "upgrad_overhead", "pcgrad_vs_torchjd_time_ratio", "pcgrad_vs_torchjd_agreement",
           "gradnorm_vs_library_time_ratio", "gradnorm_vs_library_agreement", "adamw_fused_speedup", "eval_sentences_per_s",
           "train_peak_rss_mb", "make_repro_wall_s", "dvc_repro_noop_wall_s")
FIELDS = {"value", "target", "direction", "pass", "unit", "target_source", "machine_dependent", "note", "details"}


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmarks set torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_the_schema(make_cfg, tmp_path):
    res = run_benchmarks(make_cfg(), Settings.smoke(memory=False), tmp_path)
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["schema_version"] == res["schema_version"] == 1
    assert saved["mode"] == "smoke" and saved["machine"]["torch"] == torch.__version__
    assert saved["machine"]["threads"] == 1
    for name in METRICS:
        m = saved["metrics"][name]
        assert set(m) == FIELDS, name
        if m["target"] is not None and m["value"] is not None:
            assert m["pass"] == (m["value"] >= m["target"] if m["direction"] == ">=" else m["value"] <= m["target"])
        else:
            assert m["pass"] is None
    for name in ("train_speedup_vs_naive", "pcgrad_overhead", "gradnorm_overhead", "upgrad_overhead",
                 "train_examples_per_s", "eval_sentences_per_s", "pcgrad_vs_torchjd_time_ratio", "adamw_fused_speedup"):
        assert _positive(saved["metrics"][name]["value"]), name
    speed = saved["metrics"]["train_speedup_vs_naive"]["details"]
    assert speed["sides"]["naive"]["attention"] == "eager"
    assert speed["padding_share_naive"] > speed["padding_share_ours"]
    # Same algorithm, same input: the implementations must agree (correctness, not speed).
    assert saved["metrics"]["pcgrad_vs_torchjd_agreement"]["pass"] is True
    gn = saved["metrics"]["gradnorm_vs_library_agreement"]
    try:
        import gradnorm_pytorch  # noqa: F401
        assert gn["pass"] is True
    except ImportError:
        assert gn["value"] is None and "gradnorm-pytorch" in gn["note"]
    assert saved["metrics"]["train_peak_rss_mb"]["value"] is None  # memory=False
    prof = saved["profile"]
    assert prof["steps"] == 1 and prof["top_ops"] and set(prof["phases_share"]) >= {"forward", "backward", "optimizer"}
    md = (tmp_path / "benchmarks.md").read_text()
    for name in METRICS:
        assert f"`{name}`" in md


def test_naive_batch_holds_the_same_tokens_as_ours(make_cfg):
    cfg = make_cfg()
    bench = load_bench(cfg, Settings.smoke())
    texts = raw_texts(bench)
    tokenizer = load_tokenizer(cfg.model.backbone)
    ours_plan, naive_plan = bench.plans(2, np.random.default_rng(0))
    for task in bench.tasks:
        ours_idx = np.concatenate([s[task] for s in ours_plan])
        naive_idx = np.concatenate([s[task] for s in naive_plan])
        assert sorted(ours_idx.tolist()) == sorted(naive_idx.tolist())  # same examples, other batching
        idx = naive_plan[0][task]
        naive = naive_batch(tokenizer, texts[task], idx, task, bench)
        ours = bench.collate(task, idx)
        assert naive["input_ids"].shape[1] == bench.settings.naive_pad
        for row in range(ours["input_ids"].shape[0]):
            real = ours["input_ids"][row][ours["attention_mask"][row].bool()]
            assert torch.equal(naive["input_ids"][row][naive["attention_mask"][row].bool()], real)


def test_repro_timings_read_from_file(tmp_path, monkeypatch):
    from benchmarks import resources

    monkeypatch.setattr(resources, "REPRO_TIMING", tmp_path / "reports" / "repro_timing.json")
    monkeypatch.setattr(resources, "ROOT", tmp_path)
    absent = resources.repro_timings()
    assert absent["make_repro_wall_s"]["value"] is None and "not recorded" in absent["make_repro_wall_s"]["note"]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "repro_timing.json").write_text(json.dumps({"make_repro_s": 321.5, "dvc_repro_noop_s": 2.5}))
    got = resources.repro_timings()
    assert got["make_repro_wall_s"]["value"] == 321.5 and got["dvc_repro_noop_wall_s"]["value"] == 2.5


def test_only_a_section_updates_the_existing_report(make_cfg, tmp_path, monkeypatch):
    from benchmarks import resources

    monkeypatch.setattr(resources, "REPRO_TIMING", tmp_path / "repro_timing.json")
    monkeypatch.setattr(resources, "ROOT", tmp_path)
    cfg = make_cfg()
    first = run_benchmarks(cfg, Settings.smoke(memory=False), tmp_path, sections=("eval", "repro"))
    assert set(first["metrics"]) == {"eval_sentences_per_s", "make_repro_wall_s", "dvc_repro_noop_wall_s"}
    (tmp_path / "repro_timing.json").write_text(json.dumps({"make_repro_s": 300.0, "dvc_repro_noop_s": 4.0}))
    run_benchmarks(cfg, Settings.smoke(memory=False), tmp_path, sections=("repro",))
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["metrics"]["eval_sentences_per_s"] == first["metrics"]["eval_sentences_per_s"]  # kept
    assert saved["metrics"]["make_repro_wall_s"]["value"] == 300.0 and saved["updated"]["sections"] == ["repro"]
    assert "300" in (tmp_path / "benchmarks.md").read_text()


def test_gpu_step_without_cuda_fails_clearly(monkeypatch):
    from benchmarks import gpu_step

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu_step.main([])
    assert "needs a CUDA GPU" in str(exc.value.code)


@pytest.mark.slow
def test_peak_memory_of_a_short_training_subprocess(make_cfg):
    from benchmarks.resources import bench_memory

    bench = load_bench(make_cfg(), Settings.smoke(memory=True))
    m = bench_memory(bench)["train_peak_rss_mb"]
    assert m["value"] >= m["details"]["rss_after_imports_mb"] > 0
    assert m["details"]["steps"] == bench.settings.memory_steps
