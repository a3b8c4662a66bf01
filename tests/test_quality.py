"""benchmarks/quality.py on the tiny random BERT: the probe, a candidate through the real pipeline, the report."""
import json

import yaml

from benchmarks import quality
from conftest import ROOT, micro_overrides
from pipeline.config import parse_override


def _spec(tmp_path, tiny_backbone, micro_data, prepared) -> dict:
    base = dict(parse_override(o) for o in micro_overrides(tmp_path, tiny_backbone, micro_data, prepared))
    return {"bar": {"sst_acc": 0.0, "para_acc": 0.0, "sts_corr": 2.0}, "budget_minutes": 30,
            "probe": {"para_train_pairs": 20, "Cs": [0.1, 1.0]}, "base": base,
            "candidates": {"best": {"extensions": ["relu", "cos", "loop"],
                                    "set": {"model.pooling": "mean", "model.cos_target": "unit",
                                            "model.pair_features": "sbert", "train.head_lr": 1e-2,
                                            "train.lr_schedule": "linear", "train.warmup_ratio": 0.2}},
                           "plain": {"set": {}}}}


def test_probe_and_candidates_write_json_and_markdown(tmp_path, tiny_backbone, micro_data, prepared):
    spec_path = tmp_path / "quality.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path, tiny_backbone, micro_data, prepared)))
    out, runs = tmp_path / "out", tmp_path / "qruns"
    argv = ["--spec", str(spec_path), "--params", str(ROOT / "params.yaml"), "--runs-dir", str(runs), "--out", str(out)]
    assert quality.main(argv + ["--only", "probe", "best"]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert set(res["candidates"]) == {"best"}
    for scores in (res["probe"]["scores"], res["candidates"]["best"]["scores"]):
        assert set(scores) == set(quality.METRICS) and all(-1 <= v <= 1 for v in scores.values())
    best = res["candidates"]["best"]
    assert best["config"]["model"]["cos_target"] == "unit" and best["config"]["train"]["schedule"] == "loop"
    assert best["steps"] > 0 and best["train_s"] <= best["wall_s"]
    # The scores are the pipeline's own metrics.json for that run.
    metrics = json.loads((runs / "best" / "metrics.json").read_text())
    assert all(best["scores"][m] == metrics[m] for m in quality.METRICS)
    md = (out / "quality.md").read_text()
    assert "| frozen probe |" in md and "| best |" in md and "≥ 2.00" in md
    assert md.count("✗") >= 1 and "| no |" in md  # an STS bar of 2.0 cannot be met

    assert quality.main(argv + ["--only", "plain"]) == 0  # merges: probe and best stay
    res2 = json.loads((out / "quality.json").read_text())
    assert list(res2["candidates"]) == ["best", "plain"] and res2["probe"] == res["probe"]
    assert res2["candidates"]["best"] == best


def test_bad_spec_and_names_fail_in_one_line(tmp_path, tiny_backbone, micro_data, prepared, caplog):
    spec = _spec(tmp_path, tiny_backbone, micro_data, prepared)
    spec["candidates"]["best"]["extensions"] = ["relu", "warp"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    args = ["--spec", str(path), "--params", str(ROOT / "params.yaml"), "--out", str(out)]
    assert quality.main(args + ["--only", "best"]) == 2
    assert quality.main(args + ["--only", "nosuch"]) == 2
    del spec["bar"]
    path.write_text(yaml.safe_dump(spec))
    assert quality.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "unknown extension 'warp'" in errors[0] and "nosuch" in errors[1]
    assert "missing top-level key 'bar'" in errors[2]
    assert not out.exists()  # nothing half-written
