"""The benchmark code paths in smoke mode on the tiny random BERT: wiring, the JSON schema, the baselines,
the FLOP count and the repro timing, not timings."""
import datetime as dt
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import flops, repro_timing
from benchmarks.baselines import StarterLoop, raw_texts
from benchmarks.common import Settings, build_models, load_bench
from benchmarks.run import SCHEMA_VERSION, run_benchmarks
from pipeline.model import load_tokenizer

METRICS = ("train_speedup_full_vs_starter", "train_speedup_cpu_vs_starter", "train_speedup_full_vs_naive_pad128",
           "train_examples_per_s", "train_tokens_per_s", "matmul_peak_fp32_gflops", "matmul_peak_bf16_gflops",
           "train_step_peak_share_fp32", "train_step_peak_share_bf16", "pcgrad_overhead", "gradnorm_overhead",
           "upgrad_overhead", "pcgrad_vs_torchjd_time_ratio", "pcgrad_vs_torchjd_agreement",
           "gradnorm_vs_library_time_ratio", "gradnorm_vs_library_agreement", "adamw_fused_speedup",
           "eval_sentences_per_s", "train_peak_rss_mb", "make_repro_wall_s", "dvc_repro_noop_wall_s")
FIELDS = {"value", "target", "direction", "pass", "unit", "target_source", "machine_dependent", "note", "details"}
SMALL_PEAK = {"fp32": {"torch.matmul": 64, "F.linear": 64}, "bf16": {"torch.matmul": 32, "F.linear": 32}}


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmarks set torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def small_peak(monkeypatch):
    """The matmul peak on small matrices: the smoke runs check wiring, not the machine."""
    monkeypatch.setattr(flops, "SIZES", SMALL_PEAK)


@pytest.fixture
def frozen_cfg(make_cfg, tmp_path):
    """The cpu profile shrunk to the tiny BERT, its lower layer frozen and read from a prefix cache in tmp_path."""
    return lambda *extra: make_cfg("model.freeze_layers=1", f"data.prefix_dir={tmp_path / 'prefix'}", *extra)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_the_schema(frozen_cfg, tmp_path):
    res = run_benchmarks(frozen_cfg(), Settings.smoke(memory=False), tmp_path)
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["schema_version"] == res["schema_version"] == SCHEMA_VERSION
    assert saved["mode"] == "smoke" and saved["machine"]["torch"] == torch.__version__
    assert saved["machine"]["threads"] == 1
    assert saved["config"]["frozen_layers"] == 1 and saved["config"]["prefix_cache"]
    for name in METRICS:
        m = saved["metrics"][name]
        assert set(m) == FIELDS, name
        if m["target"] is not None and m["value"] is not None:
            assert m["pass"] == (m["value"] >= m["target"] if m["direction"] == ">=" else m["value"] <= m["target"])
        else:
            assert m["pass"] is None
    for name in ("train_speedup_full_vs_starter", "train_speedup_cpu_vs_starter", "train_speedup_full_vs_naive_pad128",
                 "pcgrad_overhead", "gradnorm_overhead", "upgrad_overhead", "train_examples_per_s",
                 "eval_sentences_per_s", "pcgrad_vs_torchjd_time_ratio", "adamw_fused_speedup",
                 "matmul_peak_fp32_gflops", "matmul_peak_bf16_gflops", "train_step_peak_share_fp32",
                 "train_step_peak_share_bf16"):
        assert _positive(saved["metrics"][name]["value"]), name
    sides = saved["metrics"]["train_speedup_full_vs_starter"]["details"]["sides"]
    assert set(sides) == {"starter", "naive_pad128", "full", "cpu", "cpu_bf16"}
    assert sides["starter"]["attention"] == sides["naive_pad128"]["attention"] == "eager"
    assert sides["full"]["attention"] != "eager" and sides["full"]["frozen_layers"] == 0
    assert sides["cpu"]["frozen_layers"] == 1 and sides["cpu_bf16"]["precision"] == "bf16"
    assert sides["naive_pad128"]["padding_share"] > sides["starter"]["padding_share"] >= sides["full"]["padding_share"]
    # Same examples; the frozen, cached step does fewer FLOPs than full fine-tuning on the same batches.
    assert sides["cpu"]["gflop_per_step"] < sides["full"]["gflop_per_step"] <= sides["starter"]["gflop_per_step"]
    assert "emulated" in saved["metrics"]["train_step_peak_share_bf16"]["note"] or \
        saved["metrics"]["matmul_peak_bf16_gflops"]["details"]["native"]
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
    assert prof["steps"] == 1 and prof["top_ops"] and prof["prefix_cache"]
    assert set(prof["phases_share"]) >= {"collate", "forward", "backward", "optimizer", "step_other"}
    md = (tmp_path / "benchmarks.md").read_text()
    for name in METRICS:
        assert f"`{name}`" in md
    assert "Counting rules" in md and "starter-style loop" in md


def test_our_sides_train_through_pipeline_train_step(frozen_cfg, monkeypatch):
    """Every step of ours is pipeline.train.train_step itself (looked up at call time), with its phases labelled."""
    import pipeline.train
    from benchmarks import train_speed

    calls = []
    real = pipeline.train.train_step

    def counting(model, batches, balancer, optimizer, scheduler=None):
        calls.append((model, sorted(batches), "hidden" in next(iter(batches.values()))))
        return real(model, batches, balancer, optimizer, scheduler)

    monkeypatch.setattr(pipeline.train, "train_step", counting)
    bench = load_bench(frozen_cfg(), Settings.smoke())
    models = build_models(bench)
    out = train_speed.bench_train_speed(bench, models)
    d = out["train_speedup_full_vs_starter"]["details"]
    ours = ("full", "cpu", "cpu_bf16")
    per_side = bench.settings.warmup + d["rounds"] * d["steps_per_block"]
    assert len(calls) == len(ours) * per_side
    assert sum(m is models.full for m, _, _ in calls) == per_side
    assert sum(m is models.cpu for m, _, _ in calls) == 2 * per_side
    assert all(tasks == sorted(bench.tasks) for _, tasks, _ in calls)
    assert all(cached == (m is models.cpu) for m, _, cached in calls)  # the profile's step reads the cache
    for side in ours:
        assert {"collate", "forward", "backward", "optimizer", "step_other"} <= set(d["sides"][side]["phases_s"])
    # The labels are gone after the step: the model's and optimizer's own methods are back.
    assert "loss" not in vars(models.cpu) and "step" not in vars(models.full)


class SpyTokenizer:
    """The real tokenizer, counting its calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def test_starter_loop_tokenises_at_step_time_and_pads_to_the_longest(make_cfg):
    cfg = make_cfg()
    bench = load_bench(cfg, Settings.smoke())
    models = build_models(bench, full=False)
    texts = raw_texts(bench)
    spy = SpyTokenizer(load_tokenizer(cfg.model.backbone))
    starter = StarterLoop(bench, models.starter, spy, texts)
    assert isinstance(starter.optimizer, torch.optim.AdamW)
    assert not starter.optimizer.defaults["fused"] and not starter.optimizer.defaults["foreach"]
    ours_plan, shuffled = bench.plans(2, np.random.default_rng(0))
    for task in bench.tasks:  # same examples on both sides, other batching
        assert sorted(np.concatenate([s[task] for s in ours_plan]).tolist()) == \
            sorted(np.concatenate([s[task] for s in shuffled]).tolist())
    step = shuffled[0]
    before = [p.detach().clone() for p in models.starter.parameters()]
    starter.block([step])
    assert spy.calls == len(bench.tasks)  # one tokenizer call per task batch, inside the step
    assert any(not torch.equal(a, b) for a, b in zip(before, models.starter.parameters()))  # it trained
    for task in bench.tasks:
        batch = starter.batch(task, step[task])
        ours = bench.collate(task, step[task])
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # the batch's longest, not a fixed width
        assert batch["input_ids"].shape[1] < bench.max_length or int(lengths.max()) == bench.max_length
        for row in range(ours["input_ids"].shape[0]):  # the same tokens prepare stored
            real = ours["input_ids"][row][ours["attention_mask"][row].bool()]
            assert torch.equal(batch["input_ids"][row][batch["attention_mask"][row].bool()], real)
        fixed = StarterLoop(bench, models.starter, spy, texts, pad_to=bench.settings.naive_pad).batch(task, step[task])
        assert fixed["input_ids"].shape[1] == bench.settings.naive_pad
        assert torch.equal(fixed["attention_mask"].sum(1), lengths)


def test_flop_formula_on_a_known_shape():
    """One trained layer above one cached layer, hand-counted: d=4, 2 layers of 4d^2 + 2*d*8 weights."""
    d, f = 4, 8
    p, qkv = 4 * d * d + 2 * d * f, 3 * d * d
    dims = flops.Dims(hidden=d, layer_params=[p, p], qkv_params=[qkv, qkv], layer_trains=[False, True],
                      frozen_layers=1, embeddings_train=False, pooler_params=d * d, pooler_trains=True,
                      pooling="pooler", heads={"sst": [d * 5]})
    rows, width, examples = 3, 5, 3
    n_tok, sq = rows * width, rows * width ** 2
    fwd, bwd = flops.pass_flops(dims, rows, n_tok, sq, cached_layers=1, examples=examples, task="sst")
    layer = 2 * n_tok * p + 4 * sq * d
    assert fwd == layer + 2 * rows * d * d + 2 * examples * d * 5
    assert bwd == (2 * layer - 2 * n_tok * qkv) + 2 * (2 * rows * d * d) + 2 * (2 * examples * d * 5)
    # Not cached but frozen: the lower layer runs forward only.
    fwd_live, bwd_live = flops.pass_flops(dims, rows, n_tok, sq, cached_layers=0, examples=examples, task="sst")
    assert fwd_live == fwd + layer and bwd_live == bwd
    # Full fine-tuning: every layer trains, every input needs its gradient: backward = 2 x forward.
    full = flops.Dims(**{**vars(dims), "layer_trains": [True, True], "frozen_layers": 0, "embeddings_train": True})
    fwd_full, bwd_full = flops.pass_flops(full, rows, n_tok, sq, cached_layers=0, examples=examples, task="sst")
    assert fwd_full == fwd_live and bwd_full == 2 * fwd_full


@pytest.mark.parametrize("frozen", [False, True])
def test_flop_formula_matches_torch_flop_counter(frozen_cfg, make_cfg, frozen):
    """The analytic count equals torch.utils.flop_counter's on the tiny BERT with eager attention (whose products
    the counter sees), for full fine-tuning and for a frozen layer read from the prefix cache."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = frozen_cfg() if frozen else make_cfg()
    bench = load_bench(cfg, Settings.smoke())
    model = build_models(bench, full=False, starter=False).cpu
    model.bert.set_attn_implementation("eager")
    model.train()
    step = bench.loop_plan(1, np.random.default_rng(3))[0]
    batches = bench.batches(step, cached=frozen)
    assert ("hidden" in batches["sst"]) == frozen
    expected = flops.step_flops(model, batches)
    with FlopCounterMode(display=False) as counter:
        torch.stack([model.loss(t, b) for t, b in batches.items()]).sum().backward()
    assert counter.get_total_flops() == pytest.approx(expected["total"], rel=1e-9)
    assert expected["useful_total"] <= expected["total"]


# ---------------------------------------------------------------- make repro timing


def _fake_run(runs, exp, seed, opened, finished, train_times, metrics_at):
    """A run folder as `train --evaluate` leaves it: the record's span and epochs, metrics.json at metrics_at."""
    run = runs / exp / f"s{seed}"
    run.mkdir(parents=True)
    iso = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()  # noqa: E731
    (run / "record.json").write_text(json.dumps({"started_at": iso(opened), "finished_at": iso(finished),
                                                 "history": [{"epoch": i + 1, "train_time_s": t}
                                                             for i, t in enumerate(train_times)]}))
    (run / "metrics.json").write_text("{}")
    os.utime(run / "metrics.json", (metrics_at, metrics_at))


def test_repro_timing_splits_a_dvc_output_stream(tmp_path):
    E = repro_timing.Event
    t0 = 1_800_000_000.0
    runs = tmp_path / "runs"
    # train@baseline-11711 runs from t0+100 to t0+200: record opened at +110, 60 s of epochs, closed at +180,
    # metrics.json at +195: stage_start 10, training 60, evaluation 10 + 15, dvc 5.
    _fake_run(runs, "baseline", 11711, t0 + 110, t0 + 180, [30.0, 30.0], t0 + 195)
    events = [E(t0 + 1, "Running stage 'prepare':"), E(t0 + 1, "> python -m pipeline prepare"),
              E(t0 + 20, "12:00:00 INFO prepare: done", "stderr"), E(t0 + 21, "Updating lock file 'dvc.lock'"),
              E(t0 + 22, "Running stage 'cache':"), E(t0 + 40, "Updating lock file 'dvc.lock'"),
              E(t0 + 41, "Running stage 'pretrain-mlm':"), E(t0 + 98, ""),  # no lock line: ends at the next stage
              E(t0 + 99, "Stage 'train@sst_pretrain-11711' didn't change, skipping"),
              E(t0 + 100, "Running stage 'train@baseline-11711':"),
              E(t0 + 200, "Updating lock file 'dvc.lock'"),
              E(t0 + 201, "Running stage 'train-mlm@gn-11711':"),  # no record: counted whole as training
              E(t0 + 231, "Running stage 'report':"), E(t0 + 260, "Updating lock file 'dvc.lock'")]
    res = repro_timing.split(events, dvc_start=t0, dvc_end=t0 + 262, runs_dir=runs, started=t0 - 150,
                             installed=t0 - 2, summary_s=3.0)
    s = res["split_s"]
    assert s["install"] == pytest.approx(148) and s["summary"] == pytest.approx(3)
    assert s["prepare"] == pytest.approx(20) and s["cache"] == pytest.approx(18) and s["mlm"] == pytest.approx(58)
    assert s["training"] == pytest.approx(60 + 30) and s["evaluation"] == pytest.approx(25)
    assert s["stage_start"] == pytest.approx(10) and s["report"] == pytest.approx(29)
    # dvc: before the first stage (1), between prepare/cache, cache/mlm and the two train stages (3), the skipped
    # stage's check (1), after the train stage's metrics.json (5), after report (2), git/dvc init (2).
    assert s["dvc"] == pytest.approx(1 + 3 + 1 + 5 + 2 + 2)
    assert res["make_repro_s"] == pytest.approx(150 + 262 + 3) == pytest.approx(sum(s.values()))
    assert res["stages_run"] == 6 and res["stages_skipped"] == 1
    train = next(x for x in res["stages"] if x["name"] == "train@baseline-11711")
    assert train["split_s"] == {"stage_start": 10.0, "training": 60.0, "evaluation": 25.0, "dvc": 5.0}
    assert [repro_timing.category(n) for n in ("pretrain-mlm", "train-mlm@gn-1", "evaluate@x-1", "prefix-cache")] == \
        ["mlm", "training", "evaluation", "cache"]


FAKE_DVC = """
import sys, time
print("Running stage 'prepare':", flush=True)
print("prepare log line", file=sys.stderr, flush=True)
time.sleep(0.2)
print("Updating lock file 'dvc.lock'", flush=True)
print("Stage 'report' didn't change, skipping", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_repro_timing_relays_output_and_passes_the_exit_status(tmp_path, capfd):
    out = tmp_path / "reports" / "repro_timing.json"
    fake = tmp_path / "fake_dvc.py"
    fake.write_text(FAKE_DVC)
    args = ["--runs-dir", str(tmp_path / "runs"), "--params", str(tmp_path / "none.yaml"), "--out", str(out), "--",
            sys.executable, str(fake)]
    assert repro_timing.main(args + ["0"]) == 0
    captured = capfd.readouterr()
    assert "Running stage 'prepare':" in captured.out and "prepare log line" in captured.err
    good = json.loads(out.read_text())
    assert good["exit_status"] == 0 and good["stages_run"] == 1 and good["split_s"]["prepare"] >= 0.2
    assert not good["complete"]  # a stage was skipped and no install ran
    assert "prepare" in out.with_suffix(".md").read_text()
    # A failed run: dvc's exit status comes back and the last good timing stays.
    assert repro_timing.main(args + ["3"]) == 3
    failed = json.loads(out.read_text())
    assert failed["make_repro_s"] == good["make_repro_s"] and failed["last_failed_attempt"]["exit_status"] == 3
    # A run with nothing to do records the no-op time only.
    (tmp_path / "noop.py").write_text("print(\"Stage 'prepare' didn't change, skipping\")")
    assert repro_timing.main(args[:-2] + [sys.executable, str(tmp_path / "noop.py")]) == 0
    noop = json.loads(out.read_text())
    assert noop["make_repro_s"] == good["make_repro_s"] and noop["dvc_repro_noop_s"] > 0


def test_repro_timings_read_from_file(tmp_path, monkeypatch):
    from benchmarks import resources

    monkeypatch.setattr(resources, "REPRO_TIMING", tmp_path / "reports" / "repro_timing.json")
    monkeypatch.setattr(resources, "ROOT", tmp_path)
    absent = resources.repro_timings()
    assert absent["make_repro_wall_s"]["value"] is None and "not recorded" in absent["make_repro_wall_s"]["note"]
    (tmp_path / "reports").mkdir()
    timing = {"make_repro_s": 321.5, "dvc_repro_noop_s": 2.5, "split_s": {"install": 100.0, "training": 221.5},
              "split_share": {"install": 0.311, "training": 0.689}}
    (tmp_path / "reports" / "repro_timing.json").write_text(json.dumps(timing))
    got = resources.repro_timings()
    assert got["make_repro_wall_s"]["value"] == 321.5 and got["dvc_repro_noop_wall_s"]["value"] == 2.5
    assert got["make_repro_wall_s"]["details"]["split_s"]["training"] == 221.5


def test_only_a_section_updates_the_existing_report(make_cfg, tmp_path, monkeypatch):
    from benchmarks import resources

    monkeypatch.setattr(resources, "REPRO_TIMING", tmp_path / "repro_timing.json")
    monkeypatch.setattr(resources, "ROOT", tmp_path)
    cfg = make_cfg()
    first = run_benchmarks(cfg, Settings.smoke(memory=False), tmp_path, sections=("eval", "repro"))
    assert set(first["metrics"]) == {"eval_sentences_per_s", "make_repro_wall_s", "dvc_repro_noop_wall_s"}
    (tmp_path / "repro_timing.json").write_text(json.dumps({"make_repro_s": 300.0, "dvc_repro_noop_s": 4.0,
                                                            "split_s": {"training": 300.0},
                                                            "split_share": {"training": 1.0}}))
    run_benchmarks(cfg, Settings.smoke(memory=False), tmp_path, sections=("repro",))
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["metrics"]["eval_sentences_per_s"] == first["metrics"]["eval_sentences_per_s"]  # kept
    assert saved["metrics"]["make_repro_wall_s"]["value"] == 300.0 and saved["updated"]["sections"] == ["repro"]
    md = (tmp_path / "benchmarks.md").read_text()
    assert "300" in md and "wall time by part" in md


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
