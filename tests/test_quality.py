"""benchmarks/quality.py on the tiny random BERT: candidates composed from params.yaml alone, several
seeds, the frozen-prefix fast path, the paired comparison, merging, and one-line errors."""
import json
import logging
import math

import numpy as np
import pytest
import yaml

from benchmarks import quality
from conftest import PARAMS, ROOT, micro_overrides
from pipeline.config import load_config, read_params

CANDIDATES = ["quality_bi_encoder", "quality_cross_encoder"]


def _setup(tmp_path, tiny_backbone, micro_data, prepared):
    """A copy of params.yaml with a micro quality block, and the -S overrides that shrink every run to the fixtures."""
    params = yaml.safe_load(PARAMS.read_text())
    params["quality"].update(bar={"sst_acc": 0.0, "para_acc": 0.0, "sts_corr": 2.0},
                             probe={"pair_train_rows": 20, "Cs": [0.1, 1.0]},
                             candidates=CANDIDATES, compare=["quality_cross_encoder", "quality_bi_encoder"])
    params["quality"].pop("profiles", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    sets = [a for o in micro_overrides(tmp_path, tiny_backbone, micro_data, prepared) for a in ("-S", o)]
    return path, sets


def test_params_yaml_quality_block_and_candidates_compose():
    params = read_params(PARAMS)
    spec = quality.read_spec(params)
    # The hand-picked recipe against the sweep's best params, each on the profile it was made for.
    assert spec.candidates == ["quality_cross_encoder", "sweep_cpu"] and spec.compare == spec.candidates
    assert spec.profiles == {"sweep_cpu": "cpu"}
    assert set(spec.bar) == set(quality.METRICS) and len(spec.seeds) >= 3
    cross = load_config(PARAMS, experiment="quality_cross_encoder", profile=spec.profile)
    bi = load_config(PARAMS, experiment="quality_bi_encoder", profile=spec.profile)
    assert (cross.model.para_head, bi.model.para_head, bi.model.pair_features) == ("cross", "concat", "sbert")
    assert cross.train.schedule == "loop" and cross.model.heads == "relu" and cross.model.sts_head == "cos"
    assert cross.model.freeze_layers == 0
    # The quality profile never shares the study's prepared data or prefix cache.
    study = load_config(PARAMS)
    assert cross.data.prepared_dir != study.data.prepared_dir and cross.data.prefix_dir != study.data.prefix_dir
    # The sweep's recipe on its profile is the study's run of it (the Table 2 row `sweep_cpu`).
    sweep = load_config(PARAMS, experiment="sweep_cpu", profile=spec.profiles["sweep_cpu"])
    assert sweep.to_dict() == load_config(PARAMS, experiment="sweep_cpu").to_dict()


def test_stored_results_match_what_params_yaml_composes():
    """reports/quality.json's recorded configs are what the candidates compose to now (else it is stale:
    rerun `make quality`)."""
    params = read_params(PARAMS)
    spec = quality.read_spec(params)
    res = quality.read_results(ROOT / "reports" / "quality.json")
    stored = [n for n in spec.candidates if n in res["candidates"]]
    assert stored, "reports/quality.json holds none of quality.candidates"
    for name in stored:
        entry = res["candidates"][name]
        cli = [f"{k}={json.dumps(v)}" for k, v in (entry["composition"].get("-S") or {}).items()]
        cfg = load_config(PARAMS, experiment=name, profile=spec.profiles.get(name, spec.profile), overrides=cli)
        for section in ("model", "train"):
            for key, value in (entry["recipe"].get(section) or {}).items():
                if key not in quality.NOT_RECIPE:
                    assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"


def test_seeds_fast_path_and_paired_comparison(tmp_path, tiny_backbone, micro_data, prepared, caplog, capfd):
    params, sets = _setup(tmp_path, tiny_backbone, micro_data, prepared)
    out, runs = tmp_path / "out", tmp_path / "runs" / "quality"
    fast = ["-S", "model.freeze_layers=1"]  # after the micro overrides, so it wins
    argv = ["--params", str(params), "--out", str(out), *sets, *fast]
    caplog.set_level(logging.INFO)
    assert quality.main(argv + ["--only", "probe," + ",".join(CANDIDATES), "--seeds", "2"]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert list(res["candidates"]) == CANDIDATES and res["schema_version"] == quality.SCHEMA_VERSION
    assert set(res["probe"]["scores"]) >= set(quality.METRICS)
    for name in CANDIDATES:
        cand = res["candidates"][name]
        assert list(cand["runs"]) == ["11711", "1"] and cand["recipe"]["model"]["freeze_layers"] == 1
        for seed, run in cand["runs"].items():
            run_dir = runs / name / f"s{seed}"
            assert run["run_dir"] == str(run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert all(run["scores"][m] == metrics[m] for m in quality.METRICS)  # the pipeline's own numbers
            record = json.loads((run_dir / "record.json").read_text())["config"]
            assert record["train"]["seed"] == int(seed) and record["model"]["freeze_layers"] == 1
            assert record["model"]["para_head"] == ("cross" if name == "quality_cross_encoder" else "concat")
            assert run["steps"] > 0 and run["train_s"] <= run["wall_s"]
    # One prefix cache, built once before training, with the cross-encoder's pair sequences.
    caches = [p for p in (tmp_path / "prefix").iterdir() if p.is_dir()]
    assert len(caches) == 1 and json.loads((caches[0] / "manifest.json").read_text())["cross"] is True
    built = [r for r in caplog.records if r.name == "pipeline.cache" and "building it" in r.getMessage()]
    assert len(built) == 1
    assert "building it" not in capfd.readouterr().err  # no training process rebuilt it
    # The comparison: seed means, the report's paired bootstrap and a Welch interval (two seeds a side).
    comp = res["comparison"]
    assert (comp["a"], comp["b"], comp["bootstrap"]) == ("quality_cross_encoder", "quality_bi_encoder", True)
    for m in (*quality.METRICS, "avg"):
        e = comp["metrics"][m]
        a = np.mean([r["scores"][m] for r in res["candidates"]["quality_cross_encoder"]["runs"].values()])
        b = np.mean([r["scores"][m] for r in res["candidates"]["quality_bi_encoder"]["runs"].values()])
        assert e["diff"] == pytest.approx(a - b) and e["lo"] <= e["hi"] and e["seed_lo"] <= e["seed_hi"]
    md = (out / "quality.md").read_text()
    assert "| frozen probe |" in md and "≥ 2.00" in md and "| no |" in md and "✗" in md
    row = next(line for line in md.splitlines() if line.startswith("| quality_bi_encoder | quality | 2 |"))
    assert row.count(" ± ") == len(quality.SHOWN)
    assert "## Paired comparison: quality_cross_encoder − quality_bi_encoder" in md
    assert "paired bootstrap interval" in md and "; seeds [" in md
    assert "on the selection sample" in md

    # Render only, after the runs' prediction files are gone: the stored bootstrap of the same runs stays.
    for path in runs.glob("*/s*/dev_predictions.csv"):
        path.unlink()
    assert quality.main(argv + ["--render"]) == 0
    assert json.loads((out / "quality.json").read_text())["comparison"] == comp


def _fake_run(calls, profiles=None):
    def run(name, seed, args, profile, run_dir):
        calls.append((name, seed, tuple(args.overrides)))
        if profiles is not None:
            profiles[name] = profile
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text("{}")  # what marks a finished run
        base = 0.5 + 0.01 * seed + (0.1 if "cross" in name else 0.0)
        scores = {"sst_acc": base, "para_acc": base, "sts_corr": base}
        return {"scores": {**scores, "avg": base}, "n_dev": {}, "train_s": 60.0, "wall_s": 90.0, "steps": 10,
                "best_epoch": 1, "history": [{"epoch": 1, "steps": 10, "train_time_s": 60.0, **scores}],
                "run_dir": str(run_dir)}
    return run


def test_merge_experiment_seed_list_and_changed_config(tmp_path, tiny_backbone, micro_data, prepared, monkeypatch):
    params, sets = _setup(tmp_path, tiny_backbone, micro_data, prepared)
    calls = []
    monkeypatch.setattr(quality, "run_candidate", _fake_run(calls))
    out = tmp_path / "out"
    argv = ["--params", str(params), "--out", str(out), *sets]
    assert quality.main(argv + ["--only", *CANDIDATES, "--seed-list", "1,2"]) == 0
    assert [(n, s) for n, s, _ in calls] == [(n, s) for n in CANDIDATES for s in (1, 2)]
    first = json.loads((out / "quality.json").read_text())
    comp = first["comparison"]
    assert comp["bootstrap"] is False and comp["metrics"]["sst_acc"]["diff"] == pytest.approx(0.1)
    from pipeline.report_stats import welch_interval

    welch = welch_interval([0.61, 0.62], [0.51, 0.52], 0.95)  # the fake scores: cross 0.1 above bi, seed by seed
    assert (comp["metrics"]["sst_acc"]["seed_lo"], comp["metrics"]["sst_acc"]["seed_hi"]) == pytest.approx(welch)
    assert welch[0] > 0
    assert "resolved (seeds only)" in (out / "quality.md").read_text()

    # --experiment adds any experiment as a candidate; without --only only it trains; the rest stays.
    calls.clear()
    assert quality.main(argv + ["--experiment", "baseline", "--seeds", "1",
                                "--compare", "baseline,quality_bi_encoder"]) == 0
    assert calls == [("baseline", 11711, tuple(a for a in sets if a != "-S"))]
    res = json.loads((out / "quality.json").read_text())
    assert list(res["candidates"]) == [*CANDIDATES, "baseline"]
    assert all(res["candidates"][n] == first["candidates"][n] for n in CANDIDATES)
    assert res["comparison"]["a"] == "baseline"
    assert "| baseline | quality | 1 |" in (out / "quality.md").read_text()

    # A candidate whose composed config changed starts its runs afresh; same config: seeds merge.
    calls.clear()
    assert quality.main(argv + ["--only", "quality_bi_encoder", "--seed-list", "3", "-S", "model.dropout=0.2"]) == 0
    assert list(json.loads((out / "quality.json").read_text())["candidates"]["quality_bi_encoder"]["runs"]) == ["3"]
    assert quality.main(argv + ["--only", "quality_bi_encoder", "--seed-list", "4", "-S", "model.dropout=0.2"]) == 0
    bi = json.loads((out / "quality.json").read_text())["candidates"]["quality_bi_encoder"]
    assert list(bi["runs"]) == ["3", "4"] and bi["composition"]["-S"]["model.dropout"] == 0.2


def test_profiles_per_candidate_and_stored_seeds_kept(tmp_path, tiny_backbone, micro_data, prepared, monkeypatch):
    params, sets = _setup(tmp_path, tiny_backbone, micro_data, prepared)
    spec = yaml.safe_load(params.read_text())
    spec["quality"]["profiles"] = {"quality_bi_encoder": "micro"}
    params.write_text(yaml.safe_dump(spec, sort_keys=False))
    calls, profiles = [], {}
    monkeypatch.setattr(quality, "run_candidate", _fake_run(calls, profiles))
    out = tmp_path / "out"
    argv = ["--params", str(params), "--out", str(out), *sets, "--only", *CANDIDATES, "--seeds", "2"]
    assert quality.main(argv) == 0
    assert profiles == {"quality_bi_encoder": "micro", "quality_cross_encoder": "quality"}
    res = json.loads((out / "quality.json").read_text())
    assert res["candidates"]["quality_bi_encoder"]["profile"] == "micro"
    md = (out / "quality.md").read_text()
    assert "| quality_bi_encoder | micro | 2 |" in md and "| quality_cross_encoder | quality | 2 |" in md
    # Run again (as after a stop): the stored seeds of the same config are kept, a new one trains;
    # a stored seed whose run folder is gone (a fresh clone) trains again.
    calls.clear()
    assert quality.main(argv[:-1] + ["3"]) == 0
    assert [(n, s) for n, s, _ in calls] == [(n, 2) for n in CANDIDATES]
    calls.clear()
    (tmp_path / "runs" / "quality" / "quality_bi_encoder" / "s1" / "metrics.json").unlink()
    assert quality.main(argv) == 0
    assert [(n, s) for n, s, _ in calls] == [("quality_bi_encoder", 1)]
    calls.clear()
    assert quality.main(argv + ["--retrain"]) == 0
    assert [(n, s) for n, s, _ in calls] == [(n, s) for n in CANDIDATES for s in (11711, 1)]
    # A profile that does not exist, or a candidate that is not one, is one line before training.
    for bad, expected in (({"quality_bi_encoder": "nosuch"}, "quality.profiles.quality_bi_encoder='nosuch' is not"),
                          ({"baseline": "cpu"}, "quality.profiles.baseline: not one of quality.candidates")):
        spec["quality"]["profiles"] = bad
        params.write_text(yaml.safe_dump(spec, sort_keys=False))
        with pytest.raises(quality.ConfigError, match=expected.replace("(", r"\(")):
            quality.read_spec(read_params(params), str(params))


def test_schema_1_results_render_without_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "quality.json").write_text((ROOT / "reports" / "quality.json").read_text())
    legacy = json.loads((out / "quality.json").read_text())
    assert quality.main(["--params", str(PARAMS), "--out", str(out), "--render"]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert res["schema_version"] == quality.SCHEMA_VERSION
    if legacy.get("schema_version", 1) == 1:
        for old, cand in legacy["candidates"].items():
            run = res["candidates"][f"quality_{old}"]["runs"]["11711"]
            assert run["scores"]["para_acc"] == cand["scores"]["para_acc"]
    md = (out / "quality.md").read_text()
    shown = [n for n, c in res["candidates"].items() if c.get("runs")]
    assert shown and all(f"| {n} | " in md for n in shown) and "| frozen probe |" in md


def test_bad_inputs_fail_in_one_line_before_training(tmp_path, tiny_backbone, micro_data, prepared, caplog,
                                                      monkeypatch):
    params, sets = _setup(tmp_path, tiny_backbone, micro_data, prepared)
    monkeypatch.setattr(quality, "run_candidate", lambda *a: pytest.fail("trained despite a bad input"))
    out = tmp_path / "out"
    base = ["--params", str(params), "--out", str(out), *sets]
    broken = yaml.safe_load(params.read_text())
    broken["experiments"]["quality_bi_encoder"]["extensions"] = ["relu", "warp"]
    bad_ext = tmp_path / "bad_ext.yaml"
    bad_ext.write_text(yaml.safe_dump(broken, sort_keys=False))
    del broken["quality"]["bar"]
    no_bar = tmp_path / "no_bar.yaml"
    no_bar.write_text(yaml.safe_dump(broken, sort_keys=False))
    cases = [
        (base + ["--only", "nosuch"], "--only: unknown candidate(s) nosuch"),
        (base + ["--experiment", "nosuch"], "--experiment: unknown experiment(s) nosuch"),
        (base + ["--seeds", "9"], "--seeds 9: quality.seeds lists 3 seed(s)"),
        (base + ["--compare", "a"], "--compare a: name two different candidates"),
        (base + ["-S", "train.nosuch=1"], "unknown parameter 'train.nosuch'"),
        (["--params", str(bad_ext), "--out", str(out), *sets], "unknown extension 'warp'"),
        (["--params", str(no_bar), "--out", str(out), *sets], "quality.bar is missing"),
    ]
    for argv, expected in cases:
        caplog.clear()
        assert quality.main(argv) == 2, expected
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], (expected, errors)
    assert not out.exists()  # nothing half-written


def test_verdicts_use_the_seed_mean():
    cand = {"runs": {"1": {"scores": {"sst_acc": 0.50, "para_acc": 0.9, "sts_corr": 0.9}, "wall_s": 100},
                     "2": {"scores": {"sst_acc": 0.40, "para_acc": 0.9, "sts_corr": 0.9}, "wall_s": 200}}}
    v = quality.verdicts(cand, {"sst_acc": 0.46, "para_acc": 0.8, "sts_corr": 0.85}, budget_min=2.6)
    assert v == {"sst_acc": False, "para_acc": True, "sts_corr": True, "budget": True}  # mean SST 0.45 < 0.46
    assert quality._score([0.5, 0.4]) == f"0.450 ± {np.std([0.5, 0.4], ddof=1):.3f}"
    assert math.isnan(quality._mean_std([])[0])
