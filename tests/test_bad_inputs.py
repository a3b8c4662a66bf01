"""A corpus of broken data files and bad parameters, through the CLI's main(): each is a one-line
error naming the file, line or parameter, exit code 2, no traceback and nothing written, or, for
a bad row, the row counted in data/prepared/report.json while the good rows are kept."""
from __future__ import annotations

import json
import logging

import pytest
import yaml

from conftest import PARAMS, micro_overrides, write_micro_data
from pipeline import cli
from pipeline.data import MAX_LINE_CHARS, MAX_SENTENCE_CHARS

ROWS = 12  # rows per micro file; line 1 is the header


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("-S", o)]


def _main(argv: list[str], caplog, capfd) -> tuple[int, list[str]]:
    """Run the CLI in-process; return its exit code and ERROR lines, checking no traceback was printed."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    code = cli.main(argv)  # an uncaught exception here is a traceback at the command line
    assert "Traceback" not in capfd.readouterr().err
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _assert_one_line_error(code: int, errors: list[str], *needles: str) -> None:
    assert code == 2, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    for needle in needles:
        assert needle in errors[0], errors[0]


# ------------------------------------------------------------------ broken files: the whole prepare stops


def _non_utf8_header(path):
    path.write_bytes(path.read_bytes().replace(b"sentence", b"phras\xe9", 1))  # latin-1, in the header


def _semicolons(path):
    path.write_text(path.read_text().replace("\t", ";"))


def _drop_last_column(path):
    path.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in path.read_text().splitlines()))


FILE_CASES = {
    "non-UTF-8 header": ("ids-sst-train.csv", _non_utf8_header, ":1: header is not valid UTF-8 (byte 0xe9)"),
    "UTF-16 file": ("sts-train.csv", lambda p: p.write_bytes(p.read_text().encode("utf-16")),
                    ": UTF-16 text (byte-order mark), not UTF-8"),
    "empty file": ("quora-dev.csv", lambda p: p.write_bytes(b""), ": file is empty"),
    "blank file": ("sts-dev.csv", lambda p: p.write_text("\n\r\n  \n"), ": file is empty"),
    "byte-order mark only": ("ids-cfimdb-train.csv", lambda p: p.write_bytes(b"\xef\xbb\xbf\n"), ": file is empty"),
    "missing file": ("sts-train.csv", lambda p: p.unlink(), ": file not found"),
    "wrong delimiter": ("ids-cfimdb-dev.csv", _semicolons, ":1: header is not tab-separated"),
    "no valid row": ("quora-dev.csv", lambda p: p.write_text(p.read_text().replace("\t", ",").replace(",", "\t", 4)),
                     f": none of its {ROWS} rows is valid (line 2: expected 5 tab-separated fields, found 1)"),
    "missing column": ("sts-dev.csv", _drop_last_column,
                       ":1: header ['', 'id', 'sentence1', 'sentence2'] lacks column(s) similarity"),
    "header only": ("quora-train.csv", lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"),
                    ": header only, no data rows"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_broken_file_stops_prepare_with_one_line(case, tmp_path, tiny_backbone, caplog, capfd):
    name, corrupt, message = FILE_CASES[case]
    data = write_micro_data(tmp_path / "data", rows=ROWS)
    corrupt(data / name)
    out = tmp_path / "prepared"
    code, errors = _main(["prepare", *_sets(micro_overrides(tmp_path, tiny_backbone, data, out))], caplog, capfd)
    _assert_one_line_error(code, errors, f"{data / name}{message}")
    assert not out.exists(), "nothing is written when a file is broken"


# ------------------------------------------------------------------ broken rows: counted, the rest kept

LONG_LINE = "x" * (MAX_LINE_CHARS + 10)
LONG_SENTENCE = "word " * (MAX_SENTENCE_CHARS // 5 + 10)


def _insert(path, line_no: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines.insert(line_no - 1, text)
    path.write_text("\n".join(lines) + "\n")


# (file, line the bad row gets, row, what the report must say); inserted in this order.
BAD_ROWS = [
    ("ids-sst-train.csv", 3, '90\tq1\t"a quote that never closes\t3', "unclosed quote"),
    ("ids-sst-train.csv", ROWS + 3, "91\tr1\tfine words\t9", "sentiment 9 outside [0, 4]"),
    ("ids-sst-train.csv", ROWS + 4, "92\tr2\tfine words\t-1", "sentiment -1 outside [0, 4]"),
    ("quora-train.csv", ROWS + 2, "90,c1,What is it?,Why is it?,1.0", "expected 5 tab-separated fields, found 1"),
    ("quora-train.csv", ROWS + 3, "91\tc2\tWhat is it?\tWhy is it?\t2.0", "is_duplicate 2.0 outside [0, 1]"),
    ("sts-train.csv", 2, "90\tm1\tone sentence\t3.0", "expected 5 tab-separated fields, found 4"),
    ("sts-train.csv", ROWS + 3, "91\tm2\tone\ttwo\t3.0\textra", "expected 5 tab-separated fields, found 6"),
    ("sts-dev.csv", ROWS + 2, "90\tn1\tone\ttwo\tnan", "similarity is nan"),
    ("sts-dev.csv", ROWS + 3, "91\tn2\tone\ttwo\t5.5", "similarity 5.5 outside [0, 5]"),
    ("ids-cfimdb-train.csv", 4, f"90\tl1\t{LONG_LINE}\t1", f"line longer than {MAX_LINE_CHARS} characters"),
    ("ids-cfimdb-train.csv", ROWS + 3, f"91\tl2\t{LONG_SENTENCE}\t1",
     f"sentence longer than {MAX_SENTENCE_CHARS} characters"),
]


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path, tiny_backbone, caplog, capfd):
    data = write_micro_data(tmp_path / "data", rows=ROWS)
    for name, line_no, row, _ in BAD_ROWS:
        _insert(data / name, line_no, row)
    dev = data / "ids-sst-dev.csv"  # a byte-order mark and Windows line ends are not errors
    dev.write_bytes(b"\xef\xbb\xbf" + dev.read_text().replace("\n", "\r\n").encode())
    out = tmp_path / "prepared"
    code, errors = _main(["prepare", *_sets(micro_overrides(tmp_path, tiny_backbone, data, out))], caplog, capfd)
    assert code == 0 and errors == []
    report = json.loads((out / "report.json").read_text())
    found = {(b["file"], b["line"]): b["reason"] for b in report["bad_rows"]}
    assert set(found) == {(name, line) for name, line, _, _ in BAD_ROWS}
    for name, line, _, reason in BAD_ROWS:
        assert reason in found[(name, line)], (name, line, found[(name, line)])
    for name, info in report["files"].items():
        if "rows" in info:
            assert info["kept"] == ROWS, f"{name}: a bad row cost good rows"
            assert info["rows"] == ROWS + sum(1 for n, *_ in BAD_ROWS if n == name)
    assert json.loads((out / "sst-dev.ids.json").read_text())[0] == "sstd00000"
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare:")]
    assert len(summary) == 1 and f"{len(BAD_ROWS)} bad rows skipped" in summary[0]


# ------------------------------------------------------------------ bad parameters

PARAM_CASES = {
    "unknown aggregator": (["-S", "train.balancer=magic"], "train.balancer='magic' is unknown"),
    "negative alpha": (["-S", "train.gn_alpha=-0.5"], "train.gn_alpha=-0.5 must be >= 0"),
    "zero lr": (["-S", "train.lr=0"], "train.lr=0.0 must be > 0"),
    "negative lr": (["-S", "train.lr=-1e-5"], "train.lr=-1e-05 must be > 0"),
    "batch size 0": (["-S", "train.batch_size=0"], "train.batch_size=0 must be > 0"),
    "dropout 1": (["-S", "model.dropout=1.0"], "model.dropout=1.0 must lie in [0, 1)"),
    "negative dropout": (["-S", "model.dropout=-0.1"], "model.dropout=-0.1 must lie in [0, 1)"),
    "lr not a number": (["-S", "train.lr=fast"], "train.lr='fast' must be a number"),
    "unknown extension": (["-e", "broken"], "experiments.broken.extensions: unknown extension 'warp'"),
    "backbone path": (["-S", "model.backbone=/no/such/bert"], "model.backbone='/no/such/bert': no such directory"),
    "model id offline": (["-S", "model.backbone=no-such-org/no-such-bert"],
                         "model.backbone='no-such-org/no-such-bert': cannot load the model (HF_HUB_OFFLINE=1"),
}


@pytest.fixture
def bad_params_file(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    params["experiments"]["broken"] = {"label": "Broken", "extensions": ["relu", "warp"]}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def small_vocab_backbone(tmp_path):
    """A BERT whose embedding table is smaller than the vocabulary the data was tokenised with."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "small-vocab")
    return tmp_path / "small-vocab"


@pytest.mark.parametrize("stage", ["train", "prepare"])
def test_bad_params_fail_with_one_line_and_write_nothing(stage, tmp_path, tiny_backbone, micro_data, prepared,
                                                         bad_params_file, small_vocab_backbone, caplog, capfd):
    """Every case through `train` (the prepared data exists, so a bad backbone fails when the model
    loads) and the backbone cases through `prepare` (when the tokenizer loads)."""
    cases = PARAM_CASES if stage == "train" else {k: PARAM_CASES[k] for k in ("backbone path", "model id offline")}
    if stage == "train":
        cases = {**cases, "backbone of another vocabulary": (
            ["-S", f"model.backbone={small_vocab_backbone}"], "embeds 500 tokens but")}
    run, out = tmp_path / "run", tmp_path / "prepared-again"
    for case, (args, message) in cases.items():
        base = micro_overrides(tmp_path, tiny_backbone, micro_data, prepared if stage == "train" else out)
        argv = [stage, "--params", str(bad_params_file), *_sets(base), *args]
        if stage == "train":
            argv += ["--run-dir", str(run)]
        else:
            message = message.replace("the model", "the tokenizer")
        code, errors = _main(argv, caplog, capfd)
        _assert_one_line_error(code, errors, message)
        assert not run.exists() and not out.exists() and not (tmp_path / "runs").exists(), f"{case}: wrote output"
