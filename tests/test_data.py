"""The validator against broken files the tests write, and the sampling schedules."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, write_micro_data
from pipeline.data import SPECS, collate, epoch_sample, epoch_size, length_batches, load_split, read_task_file
from pipeline.errors import DataError

SST = SPECS[("sst", "train")]
QUORA = SPECS[("para", "train")]
STS = SPECS[("sts", "train")]


def _write(tmp_path, text, name="f.csv", raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text)
    return path


def test_good_file_parses_quoted_fields(tmp_path):
    path = _write(tmp_path, '\tid\tsentence\tsentiment\n0\ta\t"He said ""hi"" there"\t3\n1\tb\tplain\t0\n')
    ex, bad, rows = read_task_file(path, SST)
    assert ex.ids == ["a", "b"] and ex.s1[0] == 'He said "hi" there' and ex.labels == [3.0, 0.0]
    assert bad == [] and rows == 2


@pytest.mark.parametrize("row, reason", [
    ("2\tc\tfine\t7", "outside [0, 4]"),
    ("2\tc\tfine\t2.5", "not a whole class"),
    ("2\tc\tfine\tabc", "not a number"),
    ("2\tc\tfine\tnan", "is nan"),
    ("2\tc\tfine\t", "empty sentiment"),
    ("2\tc\t  \t1", "empty sentence"),
    ("2\tc\tfine", "expected 4 tab-separated fields, found 3"),
    ("2\tc\tfine\t1\textra", "found 5"),
    ("2\ta\tdup id\t1", "duplicate id a"),
    ("2\t\tno id\t1", "empty id"),
])
def test_bad_rows_are_reported_with_line_and_reason(tmp_path, row, reason):
    path = _write(tmp_path, f"\tid\tsentence\tsentiment\n0\ta\tgood one\t3\n{row}\n1\tz\tlast\t1\n")
    ex, bad, rows = read_task_file(path, SST)
    assert rows == 3 and len(bad) == 1 and ex.ids == ["a", "z"]
    assert bad[0].line == 3 and reason in bad[0].reason and bad[0].file == "ids-sst-train.csv"


def test_sts_and_quora_ranges(tmp_path):
    path = _write(tmp_path, "\tid\tsentence1\tsentence2\tsimilarity\n0\ta\tx\ty\t4.6\n1\tb\tx\ty\t5.2\n")
    ex, bad, _ = read_task_file(path, STS)
    assert ex.labels == [pytest.approx(4.6)] and "outside [0, 5]" in bad[0].reason
    path = _write(tmp_path, "\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx\ty\t1.0\n1\tb\tx\ty\t2.0\n2\tc\tx\t\t\n")
    ex, bad, _ = read_task_file(path, QUORA)
    assert ex.labels == [1.0] and len(bad) == 2
    assert bad[1].reason == "empty sentence2; empty is_duplicate"


def test_bom_and_crlf_are_tolerated(tmp_path):
    text = "\tid\tsentence\tsentiment\r\n0\ta\tgood\t3\r\n1\tb\tbad\t0\r\n"
    path = _write(tmp_path, "", raw=b"\xef\xbb\xbf" + text.encode())
    ex, bad, _ = read_task_file(path, SST)
    assert ex.ids == ["a", "b"] and ex.labels == [3.0, 0.0] and not bad


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("id,sentence,sentiment\n0,a,1\n", "not tab-separated"),
    ("\tid\ttext\tsentiment\n0\ta\tx\t1\n", "lacks column(s) sentence"),
    ("\tid\tsentence\tsentiment\n", "no data rows"),
])
def test_file_level_problems_fail_with_one_line(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as err:
        read_task_file(path, SST)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_undecodable_row_is_one_bad_row(tmp_path):
    raw = (b"\xef\xbb\xbf\tid\tsentence\tsentiment\r\n0\ta\tcaf\xc3\xa9 ok\t1\r\n1\tb\tcaf\xe9 latin-1\t2\r\n"
           b"2\tc\tfine\t3\r\n3\td\tlast\t0")
    ex, bad, rows = read_task_file(_write(tmp_path, "", raw=raw), SST)
    assert rows == 4 and ex.ids == ["a", "c", "d"] and ex.s1[0] == "caf\u00e9 ok" and ex.labels == [1.0, 3.0, 0.0]
    assert [(b.file, b.line, b.reason) for b in bad] == [("ids-sst-train.csv", 3, "not valid UTF-8 (byte 0xe9)")]


@pytest.mark.parametrize("raw, message", [
    ("\tid\tsentence\tsentiment\n0\ta\tok\t1\n".encode("utf-16"), "UTF-16 text (byte-order mark)"),
    ("\tid\tsentence\tsentiment\n0\ta\tok\t1\n".encode("utf-32"), "UTF-32 text (byte-order mark)"),
    ("\tid\tsentence\tsentiment\n0\ta\tok\t1\n".encode("utf-16-le"), ":1: NUL byte"),
    ("\tid\tsentence\tsentiment\n0\ta\tcaf\u00e9\t1\n1\tb\tna\u00efve\t2\n2\tc\tok\t3\n".encode("latin-1"),
     "not UTF-8 text (2 of 3 rows undecodable, first at line 2"),
    (b"\tid\tsentence\tsentiment\xe9\n0\ta\tok\t1\n", ":1: header is not valid UTF-8 (byte 0xe9)"),
])
def test_file_that_is_not_utf8_fails_with_one_line(tmp_path, raw, message):
    path = _write(tmp_path, "", raw=raw)
    with pytest.raises(DataError) as err:
        read_task_file(path, SST)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_prepare_counts_an_undecodable_row_and_strict_fails(tmp_path, tiny_backbone):
    from pipeline.config import DataConfig
    from pipeline.data import prepare
    from pipeline.model import load_tokenizer

    data = write_micro_data(tmp_path / "data", rows=6)
    with open(data / "sts-dev.csv", "ab") as fh:
        fh.write(b"6\tsdbad\tna\xefve\tsentence\t2.5\n")
    tokenizer = load_tokenizer(str(tiny_backbone))
    cfg = DataConfig(data_dir=str(data), prepared_dir=str(tmp_path / "prep"), max_length=16)
    report = prepare(cfg, tokenizer, str(tiny_backbone))
    assert report["bad_rows"] == [{"file": "sts-dev.csv", "line": 8, "reason": "not valid UTF-8 (byte 0xef)"}]
    assert report["files"]["sts-dev.csv"] | {"sha256": ""} == {"sha256": "", "rows": 7, "kept": 6, "bad": 1}
    assert len(json.loads((tmp_path / "prep" / "sts-dev.ids.json").read_text())) == 6
    strict = DataConfig(data_dir=str(data), prepared_dir=str(tmp_path / "strict"), max_length=16, strict=True)
    with pytest.raises(DataError, match=r"sts-dev.csv:8: not valid UTF-8 \(byte 0xef\) \(1 bad rows in all; strict"):
        prepare(strict, tokenizer, str(tiny_backbone))
    assert not (tmp_path / "strict").exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_task_file(tmp_path / "nope.csv", SST)


def _run_prepare(tmp_path, data_dir, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline", "prepare", "-S", f"data.data_dir={data_dir}",
                           "-S", f"data.prepared_dir={tmp_path / 'prep'}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prepare_cli_reports_bad_rows_and_strict_fails(tmp_path):
    data = write_micro_data(tmp_path / "data", rows=12)
    with open(data / "quora-train.csv", "a") as fh:
        fh.write("99\tbadrow\tWhat?\tWhy?\t\n")
    res = _run_prepare(tmp_path, data)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert report["bad_rows"] == [{"file": "quora-train.csv", "line": 14, "reason": "empty is_duplicate"}]
    assert "1 bad rows skipped (quora-train.csv: 1)" in res.stderr
    assert len(json.loads((tmp_path / "prep" / "para-train.ids.json").read_text())) == 12
    shutil.rmtree(tmp_path / "prep")
    res = _run_prepare(tmp_path, data, "--strict")
    assert res.returncode == 2 and "quora-train.csv:14: empty is_duplicate" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "prep" / "report.json").exists()


@pytest.mark.slow
def test_prepare_cli_missing_folder_and_broken_file(tmp_path):
    res = _run_prepare(tmp_path, tmp_path / "absent")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    data = write_micro_data(tmp_path / "data", rows=5)
    (data / "sts-dev.csv").write_text("id,sentence1,sentence2,similarity\n1,a,b,3\n")
    res = _run_prepare(tmp_path, data)
    assert res.returncode == 2 and "sts-dev.csv:1: header is not tab-separated" in res.stderr
    assert not (tmp_path / "prep").exists() or not any((tmp_path / "prep").iterdir())


def test_shared_mirror_bad_quora_rows_reported(tmp_path):
    mirror = ROOT.parent / "shared" / "data" / "cs224n"
    if not mirror.exists():
        pytest.skip("offline mirror ../shared/data/cs224n not present")
    bad = []
    for key in (("para", "train"), ("para", "dev")):
        _, rows, _ = read_task_file(mirror / SPECS[key].filename, SPECS[key])
        bad += rows
    assert [b.file for b in bad] == ["quora-train.csv", "quora-dev.csv"]
    assert all("empty is_duplicate" in b.reason for b in bad)


# ------------------------------------------------------------------ schedules


def test_epoch_sample_subsamples_and_repeats():
    rng = np.random.default_rng(0)
    small = epoch_sample(10, 25, rng)
    assert len(small) == 25 and set(small) == set(range(10))
    counts = np.bincount(small, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3           # two full passes + 5 extra
    big = epoch_sample(100, 30, rng)
    assert len(big) == 30 and len(set(big)) == 30             # subsample without repeats


def test_epoch_size_baseline_vs_loop():
    sizes = {"sst": 8544, "para": 14000, "sts": 6040}
    assert epoch_size("baseline", sizes, 1.0) == 6040
    assert epoch_size("loop", sizes, 1.0) == 8544
    assert epoch_size("loop", sizes, 0.1) == 854
    assert epoch_size("baseline", {"cfimdb": 1707}, 1.0) == 1707


def test_length_batches_cover_everything_and_reduce_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 60, size=400)
    idx = rng.permutation(400)
    batches = length_batches(idx, lengths, 16, np.random.default_rng(2))
    assert sorted(np.concatenate(batches).tolist()) == list(range(400))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    naive = sum(len(idx[i:i + 16]) * lengths[idx[i:i + 16]].max() for i in range(0, 400, 16))
    assert padded < 0.8 * naive


def test_collate_pairs_and_cross(prepared):
    data = load_split(prepared, "para", "train")
    idx = np.array([0, 1, 2])
    b = collate(data, idx, pad_id=0)
    assert b["input_ids"].shape[0] == 6 and b["pair_size"] == 3
    s1 = data.s1[0][data.s1[1][0]: data.s1[1][1]]
    assert b["input_ids"][0, : len(s1)].tolist() == s1.tolist() and b["attention_mask"][0].sum() == len(s1)
    c = collate(data, idx, pad_id=0, cross=True)
    s2 = data.s2[0][data.s2[1][0]: data.s2[1][1]]
    n = len(s1) + len(s2) - 1
    assert c["input_ids"][0, :n].tolist() == s1.tolist() + s2[1:].tolist()
    assert c["token_type_ids"][0, :n].tolist() == [0] * len(s1) + [1] * (len(s2) - 1)


def test_data_dir_order_param_env_shared_mirror(tmp_path, monkeypatch):
    from pipeline import data as data_mod

    mirror, env_dir, param_dir = tmp_path / "mirror", tmp_path / "env", tmp_path / "param"
    for d in (mirror, env_dir, param_dir):
        d.mkdir()
    (mirror / "SHA256SUMS").write_text("")
    monkeypatch.setattr("pipeline.config.SHARED_DATA", mirror)
    monkeypatch.delenv("MINBERT_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    assert data_mod.resolve_data_dir("", str(cache)) == mirror
    monkeypatch.setenv("MINBERT_DATA_DIR", str(env_dir))
    assert data_mod.resolve_data_dir("", str(cache)) == env_dir
    assert data_mod.resolve_data_dir(str(param_dir), str(cache)) == param_dir
    assert not cache.exists()  # nothing downloaded
