"""Using a trained run: evaluate on another labelled folder, predict on new sentences, export to a
Hugging Face folder; each on tiny runs trained once for the module, and each with its bad inputs."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PARAMS, ROOT, micro_overrides, write_micro_data

# Two runs: mean pooling over a frozen lower layer (Cos STS, ReLU heads), and the pooler with every
# layer training and a cross-encoder paraphrase head.
RUNS = {
    "mean": ["model.freeze_layers=1", "model.pooling=mean", "model.heads=relu", "model.sts_head=cos"],
    "pooler": ["model.pooling=pooler", "model.para_head=cross"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone, micro_data, prepared) -> dict[str, Path]:
    from pipeline.config import load_config
    from pipeline.stages import run_evaluate
    from pipeline.train import train

    out = {}
    for name, extra in RUNS.items():
        tmp = tmp_path_factory.mktemp(f"run-{name}")
        cfg = load_config(PARAMS, profile="cpu", overrides=micro_overrides(tmp, tiny_backbone, micro_data, prepared)
                          + ["train.epochs=1", "train.precision=fp32", *extra])
        train(cfg, run_dir=tmp / "run")
        run_evaluate(cfg, run_dir=tmp / "run")
        out[name] = tmp / "run"
    return out


@pytest.fixture
def run(runs) -> Path:
    return runs["mean"]


def cli(*args: str) -> int:
    from pipeline.cli import main

    return main([str(a) for a in args])


def one_error(caplog) -> str:
    """The single one-line error the CLI logged."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- evaluate --data-dir


def other_folder(tmp_path: Path) -> Path:
    """Fresh labelled SST and Quora dev files (no STS), one SST row with a byte that is not UTF-8."""
    folder = write_micro_data(tmp_path / "other", rows=20, seed=7)
    for name in list(folder.iterdir()):
        if name.name not in ("ids-sst-dev.csv", "quora-dev.csv"):
            name.unlink()
    with open(folder / "ids-sst-dev.csv", "ab") as fh:
        fh.write(b"20\tbadbyte\tcaf\xe9 movie\t3\n")
    return folder


def test_evaluate_on_another_folder(run, tmp_path, caplog):
    folder = other_folder(tmp_path)
    own = lambda: {k: v for k, v in snapshot(run).items() if not k.startswith("eval/")}  # noqa: E731
    before = own()
    assert "metrics.json" in before and "dev_predictions.csv" in before
    assert cli("evaluate", "--params", PARAMS, "--run-dir", run, "--data-dir", folder, "--name", "fresh") == 0
    assert own() == before  # metrics.json and everything else of the run byte-identical
    out = run / "eval" / "fresh"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.csv", "report.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == {"sst": 20, "para": 20} and metrics["skipped"] == {"sts": "no sts-dev.csv or sts-train.csv"}
    assert metrics["files"] == {"sst": "ids-sst-dev.csv", "para": "quora-dev.csv"} and metrics["bad_rows"] == 1
    preds = pd.read_csv(out / "predictions.csv")
    for task, metric in (("sst", "sst_acc"), ("para", "para_acc")):
        part = preds[preds.task == task]
        assert metrics[metric] == pytest.approx((part.prediction == part.label).mean())
        lo, hi = metrics["intervals"][metric]
        assert lo <= metrics[metric] <= hi
    assert "sts_corr" not in metrics and "badbyte" not in set(preds.id)
    report = json.loads((out / "report.json").read_text())
    assert report["bad_rows"] == [{"file": "ids-sst-dev.csv", "line": 22, "reason": "not valid UTF-8 (byte 0xe9)"}]
    assert report["max_length"] == 32
    assert any("sts: skipped" in r.getMessage() for r in caplog.records)
    # the same name again: the folder is replaced whole, nothing left aside
    assert cli("evaluate", "--params", PARAMS, "--run-dir", run, "--data-dir", folder, "--name", "fresh") == 0
    assert "fresh" in {p.name for p in (run / "eval").iterdir()} and not list((run / "eval").glob(".*"))
    assert json.loads((out / "metrics.json").read_text())["sst_acc"] == metrics["sst_acc"]


def test_evaluate_strict_fails_on_the_undecodable_row(run, tmp_path, caplog):
    folder = other_folder(tmp_path)
    assert cli("evaluate", "--params", PARAMS, "--run-dir", run, "--data-dir", folder, "--name", "strict",
               "--strict") == 2
    assert "ids-sst-dev.csv:22: not valid UTF-8 (byte 0xe9)" in one_error(caplog)
    assert not (run / "eval" / "strict").exists()


@pytest.mark.parametrize("case, message", [
    ("missing run", "no trained model"),
    ("no known files", "no labelled file of the run's tasks"),
    ("no such folder", "no such folder"),
    ("utf-16 file", "UTF-16 text"),
    ("bad name", "--name '../x'"),
])
def test_evaluate_bad_input_is_one_line(runs, tmp_path, caplog, case, message):
    run, folder, name = runs["pooler"], tmp_path / "data", "x"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a task file\n")
    if case == "missing run":
        run = tmp_path / "absent-run"
        write_micro_data(folder, rows=5)
    elif case == "no such folder":
        folder = tmp_path / "absent"
    elif case == "utf-16 file":
        text = "\tid\tsentence1\tsentence2\tsimilarity\n0\ta\tx\ty\t3\n"
        (folder / "sts-dev.csv").write_text(text, encoding="utf-16")
    elif case == "bad name":
        name = "../x"
    before = snapshot(run) if run.exists() else None
    assert cli("evaluate", "--params", PARAMS, "--run-dir", run, "--data-dir", folder, "--name", name) == 2
    assert message in one_error(caplog)
    assert (snapshot(run) if run.exists() else None) == before and not (tmp_path / "absent-run").exists()


# ---------------------------------------------------------------- predict


def test_predict_stdin_to_stdout_subprocess(run):
    long = " ".join(["good"] * 80)  # beyond data.max_length=32 tokens
    text = "a good fun movie\n\nboring and dull\n" + long + "\n"
    res = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--run-dir", str(run), "--task", "sst"],
                         input=text, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[4] == ""  # one line per input line, the empty one kept
    for line in (lines[0], lines[2], lines[3]):
        label, *probs = line.split("\t")
        probs = np.array(probs, dtype=float)
        assert len(probs) == 5 and probs.sum() == pytest.approx(1.0, abs=1e-3) and int(label) == probs.argmax()
    assert "1 empty input line(s)" in res.stderr and "line 2" in res.stderr
    assert "1 input line(s) longer than 32 tokens, truncated: line 4" in res.stderr


def test_predict_agrees_with_evaluate(run, tmp_path, monkeypatch, capsys):
    """Sentences of a labelled folder through predict give the labels evaluate --data-dir gives them."""
    folder = other_folder(tmp_path)
    assert cli("evaluate", "--params", PARAMS, "--run-dir", run, "--data-dir", folder, "--name", "agree") == 0
    preds = pd.read_csv(run / "eval" / "agree" / "predictions.csv")
    rows = pd.read_csv(folder / "quora-dev.csv", sep="\t", dtype=str)
    pairs = "".join(f"{a}\t{b}\n" for a, b in zip(rows.sentence1, rows.sentence2))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pairs.encode())))
    capsys.readouterr()
    assert cli("predict", "--run-dir", run, "--task", "para", "--batch-size", 3) == 0
    out = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(out) == len(rows)
    assert [int(label) for _, label in out] == preds[preds.task == "para"].prediction.astype(int).tolist()
    assert all(0.0 <= float(p) <= 1.0 and (float(p) > 0.5) == (label == "1") for p, label in out)


@pytest.mark.parametrize("which, task", [("mean", "sts"), ("pooler", "sts"), ("pooler", "para")])
def test_predict_pairs_to_a_file(runs, tmp_path, which, task):
    source = tmp_path / "in.txt"
    source.write_text("how to learn python\twhat is the best way to learn python\n\t\nslow film\tfast movie\n")
    target = tmp_path / "out.txt"
    assert cli("predict", "--run-dir", runs[which], "--task", task, "--input", source, "--output", target) == 0
    lines = target.read_text().split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    for line in (lines[0], lines[2]):
        if task == "sts":
            assert 0.0 <= float(line) <= 5.0
        else:
            prob, label = line.split("\t")
            assert 0.0 <= float(prob) <= 1.0 and label in ("0", "1")


@pytest.mark.parametrize("args, stdin, message", [
    (["--task", "para"], "one\ttwo\nno tab on this line\n", "<stdin>:2: expected two tab-separated sentences, found 1"),
    (["--task", "sts"], "a\tb\tc\n", "<stdin>:1: expected two tab-separated sentences, found 3"),
    (["--task", "sst"], "\n  \n", "no sentences to predict on (empty input)"),
    (["--task", "sst"], "", "no sentences to predict on (empty input)"),
    (["--task", "cfimdb"], "good\n", "--task cfimdb: "),
    (["--task", "nope"], "good\n", "--task 'nope': unknown task"),
    (["--task", "sst", "--input", "absent.txt"], "", "absent.txt: no such file"),
    (["--task", "sst"], b"ok\nbad \xff\n", "<stdin>:2: not valid UTF-8"),
    (["--task", "sst", "--run-dir-missing"], "good\n", "no trained model"),
])
def test_predict_bad_input_is_one_line(run, tmp_path, monkeypatch, capsys, caplog, args, stdin, message):
    if "--run-dir-missing" in args:
        args, run = [a for a in args if a != "--run-dir-missing"], tmp_path / "absent-run"
    args = [a if a != "absent.txt" else str(tmp_path / a) for a in args]
    raw = stdin if isinstance(stdin, bytes) else stdin.encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    target = tmp_path / "out.txt"
    assert cli("predict", "--run-dir", run, *args, "--output", target) == 2
    assert message in one_error(caplog)
    assert not target.exists() and capsys.readouterr().out == ""


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("which", ["mean", "pooler"])
def test_export_loads_with_plain_transformers(runs, tmp_path, which):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModel

    from pipeline.stages import load_trained

    run, out = runs[which], tmp_path / "export"
    assert cli("export", "--run-dir", run, "--out", out, "--params", PARAMS) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heads.safetensors",
            "README.md"} <= names
    assert isinstance(AutoModel.from_pretrained(out), torch.nn.Module)
    card = out / "README.md"
    text = card.read_text()
    # The card's own snippet (plain transformers + the pooling it names) reproduces the pipeline's embeddings.
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("THIS_FOLDER", str(out))
    assert "import pipeline" not in code and "from pipeline" not in code
    scope: dict = {}
    exec(code, scope)
    model, cfg = load_trained(run, torch.device("cpu"))
    model.eval()
    batch = scope["batch"]
    with torch.no_grad():
        ref = model.encode(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(scope["emb"], ref, atol=1e-5)
    # The SST head from heads.safetensors, applied by hand, gives the pipeline's logits.
    heads = load_file(str(out / "heads.safetensors"))
    layers = sorted({int(k.split(".")[1]) for k in heads if k.startswith("sst.")})
    x = scope["emb"]
    for n, i in enumerate(layers):
        x = torch.nn.functional.linear(x, heads[f"sst.{i}.weight"], heads[f"sst.{i}.bias"])
        x = torch.relu(x) if n < len(layers) - 1 else x
    with torch.no_grad():
        assert torch.allclose(x, model.heads["sst"](ref), atol=1e-5)
    with safe_open(str(out / "heads.safetensors"), framework="pt") as fh:
        assert fh.metadata()["pooling"] == cfg.model.pooling
    assert f"model.pooling={cfg.model.pooling}" in text and f"(seed {cfg.train.seed})" in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert re.search(rf"\| sst_acc \| {metrics['sst_acc']:.4f} \| \[[0-9.]+, [0-9.]+\] \| 40 \|", text)
    assert "Code: commit" in text and "train.lr" in text


def test_export_refuses_a_non_empty_folder_and_a_missing_run(run, tmp_path, caplog):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("export", "--run-dir", run, "--out", out) == 2
    assert "exists and is not an empty folder" in one_error(caplog)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    caplog.clear()
    assert cli("export", "--run-dir", tmp_path / "absent", "--out", tmp_path / "new") == 2
    assert "no trained model" in one_error(caplog)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
