"""CS224N task files: locate or download, validate every row, tokenise once, batch.

The prepare stage writes, per task and split, a safetensors file of token ids
(flat array + offsets, no pickles) and a JSON list of example ids, plus
`report.json` listing every bad row with file, line and reason.
"""
from __future__ import annotations

import codecs
import csv
import logging
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from pipeline import config
from pipeline import io as pio
from pipeline.errors import DataError

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"
MAX_SENTENCE_CHARS = 100_000
MAX_LINE_CHARS = 10 * MAX_SENTENCE_CHARS
csv.field_size_limit(MAX_LINE_CHARS)
_LINE_END = re.compile(r"\r\n|\r|\n")  # what a CSV reader ends lines on; not str.splitlines' Unicode breaks
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")
# UTF-32 LE before UTF-16 LE: the one's mark begins with the other's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass(frozen=True)
class FileSpec:
    task: str
    split: str
    filename: str
    text_cols: tuple[str, ...]
    label_col: str | None
    label_range: tuple[float, float] | None = None
    integer_label: bool = True
    optional: bool = False  # absent from the offline mirror (the Quora test pairs)

    @property
    def pair(self) -> bool:
        return len(self.text_cols) == 2


FILES = [
    FileSpec("sst", "train", "ids-sst-train.csv", ("sentence",), "sentiment", (0, 4)),
    FileSpec("sst", "dev", "ids-sst-dev.csv", ("sentence",), "sentiment", (0, 4)),
    FileSpec("sst", "test", "ids-sst-test-student.csv", ("sentence",), None),
    FileSpec("cfimdb", "train", "ids-cfimdb-train.csv", ("sentence",), "sentiment", (0, 1)),
    FileSpec("cfimdb", "dev", "ids-cfimdb-dev.csv", ("sentence",), "sentiment", (0, 1)),
    FileSpec("cfimdb", "test", "ids-cfimdb-test-student.csv", ("sentence",), None),
    FileSpec("para", "train", "quora-train.csv", ("sentence1", "sentence2"), "is_duplicate", (0, 1)),
    FileSpec("para", "dev", "quora-dev.csv", ("sentence1", "sentence2"), "is_duplicate", (0, 1)),
    FileSpec("para", "test", "quora-test-student.csv", ("sentence1", "sentence2"), None, optional=True),
    FileSpec("sts", "train", "sts-train.csv", ("sentence1", "sentence2"), "similarity", (0, 5), integer_label=False),
    FileSpec("sts", "dev", "sts-dev.csv", ("sentence1", "sentence2"), "similarity", (0, 5), integer_label=False),
    FileSpec("sts", "test", "sts-test-student.csv", ("sentence1", "sentence2"), None),
]
SPECS = {(s.task, s.split): s for s in FILES}
from pipeline.tasks import NUM_CLASSES  # noqa: E402,F401 (re-exported)

# ---------------------------------------------------------------- locating files


def resolve_data_dir(data_dir: str, cache_dir: str) -> Path:
    """The folder holding the task files: a param, then $MINBERT_DATA_DIR, then ../shared/data/cs224n
    beside the checkout (what the Makefile exports), else download into the cache."""
    chosen = data_dir or os.environ.get("MINBERT_DATA_DIR", "")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist (set by data.data_dir or MINBERT_DATA_DIR)")
        return path
    if (config.SHARED_DATA / "SHA256SUMS").is_file():
        return config.SHARED_DATA
    return download_official(Path(cache_dir))


def _known_checksums(folder: Path) -> dict[str, str]:
    sums = folder / "SHA256SUMS"
    if not sums.exists():
        return {}
    out = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0]
    return out


def download_official(cache: Path) -> Path:
    """Fetch the official starter-repository files once, recording their SHA-256 in cache/SHA256SUMS.

    Later runs verify every cached file against that record, so a truncated or
    altered file is caught instead of silently trained on.
    """
    cache.mkdir(parents=True, exist_ok=True)
    sums = _known_checksums(cache)
    changed = False
    for spec in FILES:
        target = cache / spec.filename
        if target.exists():
            if spec.filename in sums and pio.sha256_file(target) != sums[spec.filename]:
                raise DataError(f"{target}: checksum differs from {cache / 'SHA256SUMS'}; "
                                "delete the file to download it again")
            continue
        url = OFFICIAL_URL + spec.filename
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            if spec.optional and err.code == 404:
                continue
            raise DataError(f"cannot download {url} (HTTP {err.code}); "
                            "set MINBERT_DATA_DIR or data.data_dir to a folder holding the CS224N files") from None
        except (urllib.error.URLError, OSError) as err:
            raise DataError(
                f"cannot download {url} ({getattr(err, 'reason', err)}); offline? set MINBERT_DATA_DIR or "
                f"data.data_dir to a folder holding the CS224N files"
            ) from None
        pio.write_with(target, lambda tmp, payload=payload: tmp.write_bytes(payload))
        sums[spec.filename] = pio.sha256_file(target)
        changed = True
    if changed:
        pio.write_text(cache / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    return cache


# ---------------------------------------------------------------- reading and validating


@dataclass
class BadRow:
    file: str
    line: int
    reason: str


@dataclass
class Examples:
    ids: list[str] = field(default_factory=list)
    s1: list[str] = field(default_factory=list)
    s2: list[str] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)


def _decode_lines(path: Path) -> tuple[list[str], dict[int, str]]:
    """The file's lines without their line ends, and {line number: why} for those that are not UTF-8.

    A few undecodable rows are bad rows like any other (their text here is empty). A file that is
    not UTF-8 text at all stops with one line naming it: a UTF-16 or UTF-32 byte-order mark, a NUL
    byte (UTF-16 without a mark, or binary), an undecodable header, or most rows undecodable.
    """
    raw = path.read_bytes()
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            raise DataError(f"{path}: {name} text (byte-order mark), not UTF-8; save it as UTF-8")
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}:{line}: NUL byte: not UTF-8 text (UTF-16 or a binary file?); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is tolerated, not an error
    except UnicodeDecodeError:
        text = None
    if text is not None:  # the whole file decodes: the common case
        if not text.strip():
            raise DataError(f"{path}: file is empty")
        lines = _LINE_END.split(text)
        if lines[-1] == "":  # the final line end
            lines.pop()
        return lines, {}
    # Line ends are single bytes that never occur inside a UTF-8 sequence, so the bytes split
    # where the text would.
    parts = _LINE_END_BYTES.split(raw.removeprefix(codecs.BOM_UTF8))
    if parts[-1] == b"":
        parts.pop()
    lines, undecodable = [], {}
    for line_no, part in enumerate(parts, start=1):
        try:
            lines.append(part.decode("utf-8"))
        except UnicodeDecodeError as err:
            undecodable[line_no] = f"not valid UTF-8 (byte 0x{part[err.start]:02x})"
            lines.append("")
    if 1 in undecodable:
        raise DataError(f"{path}:1: header is {undecodable[1]}; save the file as UTF-8")
    rows = len(lines) - 1
    if 2 * len(undecodable) > rows:
        first = min(undecodable)
        raise DataError(f"{path}: not UTF-8 text ({len(undecodable)} of {rows} rows undecodable, first at line "
                        f"{first}: {undecodable[first]}); save it as UTF-8")
    return lines, undecodable


def _split_row(line: str) -> tuple[list[str], str | None]:
    """One physical line as tab-separated fields, or why it cannot be read.

    Rows are parsed line by line, so a stray quote spoils its own row only: a reader over
    the whole file would run on to the next closing quote and swallow the rows between.
    """
    if len(line) > MAX_LINE_CHARS:
        return [], f"line longer than {MAX_LINE_CHARS} characters"
    return next(csv.reader((line,), delimiter="\t", quotechar='"'), []), None


def _unclosed_quote(line: str) -> bool:
    try:
        next(csv.reader((line,), delimiter="\t", quotechar='"', strict=True), None)
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def read_task_file(path: Path, spec: FileSpec) -> tuple[Examples, list[BadRow], int]:
    """Parse one file; return the valid examples, the bad rows and the number of data rows seen."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    lines, undecodable = _decode_lines(path)
    if "\t" not in lines[0]:
        raise DataError(f"{path}:1: header is not tab-separated (got {lines[0][:60]!r})")
    header = [h.strip() for h in _split_row(lines[0])[0]]
    required = ["id", *spec.text_cols] + ([spec.label_col] if spec.label_col else [])
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: header {header} lacks column(s) {', '.join(missing)}")
    col = {name: header.index(name) for name in required}
    out, bad, seen_ids = Examples(), [], set()
    for line_no, line in enumerate(lines[1:], start=2):
        if line_no in undecodable:  # a bad row like any other: counted, reported, skipped (fatal in strict mode)
            bad.append(BadRow(spec.filename, line_no, undecodable[line_no]))
            continue
        row, unreadable = _split_row(line)

        def reject(reason: str, line_no: int = line_no) -> None:
            bad.append(BadRow(spec.filename, line_no, reason))

        if len(row) != len(header):
            found = f"expected {len(header)} tab-separated fields, found {len(row)}"
            reject(unreadable or (f"unclosed quote ({found})" if _unclosed_quote(line) else found))
            continue
        ex_id = row[col["id"]].strip()
        texts = [row[col[c]].strip() for c in spec.text_cols]
        problems = ["empty id"] if not ex_id else []
        problems += [f"empty {c}" for c, t in zip(spec.text_cols, texts) if not t]
        if any(len(t) > MAX_SENTENCE_CHARS for t in texts):
            problems.append(f"sentence longer than {MAX_SENTENCE_CHARS} characters")
        label = 0.0
        if spec.label_col:
            raw = row[col[spec.label_col]].strip()
            label_problem = _label_problem(raw, spec)
            if label_problem:
                problems.append(label_problem)
            else:
                label = float(raw)
        if problems:  # every problem of the row, not just the first
            reject("; ".join(problems))
            continue
        if ex_id in seen_ids:
            reject(f"duplicate id {ex_id}")
            continue
        seen_ids.add(ex_id)
        out.ids.append(ex_id)
        out.s1.append(texts[0])
        if spec.pair:
            out.s2.append(texts[1])
        out.labels.append(label)
    rows = len(lines) - 1
    if rows == 0:
        raise DataError(f"{path}: header only, no data rows")
    return out, bad, rows


def _label_problem(raw: str, spec: FileSpec) -> str | None:
    if raw == "":
        return f"empty {spec.label_col}"
    try:
        value = float(raw)
    except ValueError:
        return f"{spec.label_col} {raw!r} is not a number"
    if math.isnan(value) or math.isinf(value):
        return f"{spec.label_col} is {raw}"
    lo, hi = spec.label_range
    if not lo <= value <= hi:
        return f"{spec.label_col} {raw} outside [{lo:g}, {hi:g}]"
    if spec.integer_label and not value.is_integer():
        return f"{spec.label_col} {raw} is not a whole class number"
    return None


# ---------------------------------------------------------------- prepare stage


def prepare(data_cfg, tokenizer, backbone_id: str) -> dict:
    """Validate and tokenise every task file; write data/prepared atomically; return the report."""
    source = resolve_data_dir(data_cfg.data_dir, data_cfg.cache_dir)
    out_dir = Path(data_cfg.prepared_dir)
    report = {"source": str(source), "backbone": backbone_id, "max_length": data_cfg.max_length,
              "limit": data_cfg.limit, "files": {}, "bad_rows": []}
    parsed = {}
    for spec in FILES:
        path = source / spec.filename
        if spec.optional and not path.exists():
            report["files"][spec.filename] = {"status": "absent (optional)"}
            continue
        examples, bad, rows = read_task_file(path, spec)
        if not examples.ids:  # nothing to train or score on: a wrong delimiter or format throughout
            raise DataError(f"{path}: none of its {rows} rows is valid (line {bad[0].line}: {bad[0].reason})")
        if data_cfg.limit:
            for attr in ("ids", "s1", "s2", "labels"):
                setattr(examples, attr, getattr(examples, attr)[: data_cfg.limit])
        report["files"][spec.filename] = {"sha256": pio.sha256_file(path), "rows": rows,
                                          "kept": len(examples.ids), "bad": len(bad)}
        report["bad_rows"].extend(vars(b) for b in bad)
        parsed[spec] = examples
    if data_cfg.strict and report["bad_rows"]:
        first = report["bad_rows"][0]
        raise DataError(f"{source / first['file']}:{first['line']}: {first['reason']} "
                        f"({len(report['bad_rows'])} bad rows in all; strict mode)")
    for spec, ex in parsed.items():
        tensors = {"labels": np.asarray(ex.labels, dtype=np.float32)}
        for key, sentences in (("s1", ex.s1), ("s2", ex.s2)):
            if sentences:
                flat, offsets = _tokenize(tokenizer, sentences, data_cfg.max_length)
                tensors[f"{key}_ids"], tensors[f"{key}_offsets"] = flat, offsets
        pio.write_with(out_dir / f"{spec.task}-{spec.split}.safetensors",
                       lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
        pio.write_json(out_dir / f"{spec.task}-{spec.split}.ids.json", ex.ids)
    special = {
        "pad_id": tokenizer.pad_token_id, "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
        "mask_id": tokenizer.mask_token_id, "vocab_size": len(tokenizer),
        "special_ids": sorted(set(tokenizer.all_special_ids)),
    }
    report["tokenizer"] = special
    bad_by_file: dict[str, int] = {}
    for b in report["bad_rows"]:
        bad_by_file[b["file"]] = bad_by_file.get(b["file"], 0) + 1
    report["summary"] = {"rows": sum(f.get("rows", 0) for f in report["files"].values()),
                         "bad": len(report["bad_rows"]), "bad_by_file": bad_by_file}
    pio.write_json(out_dir / "report.json", report)
    return report


def _tokenize(tokenizer, sentences: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(sentences, truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for seq in enc for t in seq), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


# ---------------------------------------------------------------- loading prepared data


class TaskData:
    """One task split, tokenised: sentences as slices of a flat id array."""

    def __init__(self, task: str, split: str, tensors: dict, ids: list[str]):
        self.task, self.split, self.ids = task, split, ids
        self.labels = torch.from_numpy(tensors["labels"])
        self.s1 = (torch.from_numpy(tensors["s1_ids"].astype(np.int64)), tensors["s1_offsets"])
        self.s2 = ((torch.from_numpy(tensors["s2_ids"].astype(np.int64)), tensors["s2_offsets"])
                   if "s2_ids" in tensors else None)
        lens = np.diff(self.s1[1])
        if self.s2 is not None:
            lens = np.maximum(lens, np.diff(self.s2[1]))
        self.lengths = lens
        # Cached frozen-prefix states (pipeline/cache.py): part -> (flat [tokens, hidden], offsets).
        self.hidden: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        self.hidden_layers = 0

    @property
    def pair(self) -> bool:
        return self.s2 is not None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int, seed: int = 0) -> "TaskData":
        """n examples drawn at random (a fixed seed, so every run scores the same ones), in file order.

        Not the first n: the CS224N dev files are not shuffled (SST dev is sorted by label).
        """
        if n <= 0 or n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        sub = object.__new__(TaskData)
        sub.__dict__.update(self.__dict__)
        sub.ids = [self.ids[i] for i in rows]
        sub.labels, sub.lengths = self.labels[torch.from_numpy(rows)], self.lengths[rows]
        sub.s1 = _take(self.s1, rows)
        sub.s2 = _take(self.s2, rows) if self.s2 is not None else None
        sub.hidden = {part: _take(h, rows) for part, h in self.hidden.items()}
        return sub


def _take(part: tuple[torch.Tensor, np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The sentences `rows` of a (flat ids, offsets) pair, as a new compact pair."""
    flat, offsets = part
    pieces = [flat[offsets[i]: offsets[i + 1]] for i in rows]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return torch.cat(pieces) if pieces else flat[:0], new_offsets


def load_split(prepared_dir: str | Path, task: str, split: str) -> TaskData:
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / f"{task}-{split}.safetensors"
    if not path.exists():
        raise DataError(f"{path}: prepared data missing; run `python -m pipeline prepare` first")
    ids = pio.read_json(prepared_dir / f"{task}-{split}.ids.json")
    return TaskData(task, split, load_file(str(path)), ids)


def tokenizer_info(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "report.json"
    if not path.exists():
        raise DataError(f"{path}: prepared data missing; run `python -m pipeline prepare` first")
    return pio.read_json(path)["tokenizer"]


# ---------------------------------------------------------------- schedules and batches


def epoch_sample(n_items: int, n_target: int, rng: np.random.Generator) -> np.ndarray:
    """n_target indices: whole shuffled passes over the data, then a random subsample for the rest.

    Larger sets are subsampled afresh each epoch; smaller ones are repeated (the Loop extension).
    """
    full, rest = divmod(n_target, n_items)
    parts = [rng.permutation(n_items) for _ in range(full)]
    if rest:
        parts.append(rng.permutation(n_items)[:rest])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def epoch_size(schedule: str, sizes: dict[str, int], fraction: float) -> int:
    """Examples per task per epoch: STS train size (baseline) or SST train size (loop), scaled."""
    if len(sizes) == 1:
        base = next(iter(sizes.values()))
    else:
        base = sizes["sst"] if schedule == "loop" else sizes["sts"]
    return max(1, int(round(base * fraction)))


def length_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int,
                   rng: np.random.Generator, bucket: int = 50) -> list[np.ndarray]:
    """Batches of similar length (less padding) in random order.

    Shuffled indices are cut into windows of `bucket` batches, each window sorted by
    length and split into batches, and the batches then shuffled.
    """
    window = batch_size * bucket
    batches = []
    for start in range(0, len(indices), window):
        chunk = indices[start: start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _seqs(part: tuple[torch.Tensor, np.ndarray], idx: np.ndarray) -> list[torch.Tensor]:
    flat, offsets = part
    return [flat[offsets[i]: offsets[i + 1]] for i in idx]


def _pad_hidden(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    hidden = torch.zeros((len(seqs), width, seqs[0].shape[-1]), dtype=torch.float32)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        hidden[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return hidden, mask


def collate_hidden(data: TaskData, idx: np.ndarray, cross: bool = False) -> dict:
    """A padded batch of cached prefix states (fp32) instead of token ids; the same layout as collate's."""
    idx = np.asarray(idx)
    batch = {"labels": data.labels[idx], "index": torch.from_numpy(idx), "hidden_layers": data.hidden_layers}
    if cross:
        batch["hidden"], batch["attention_mask"] = _pad_hidden(_seqs(data.hidden["cross"], idx))
        batch["cross"] = True
    elif data.pair:
        batch["hidden"], batch["attention_mask"] = _pad_hidden(
            _seqs(data.hidden["s1"], idx) + _seqs(data.hidden["s2"], idx))
        batch["pair_size"] = len(idx)
    else:
        batch["hidden"], batch["attention_mask"] = _pad_hidden(_seqs(data.hidden["s1"], idx))
    return batch


def collate(data: TaskData, idx: np.ndarray, pad_id: int, cross: bool = False, max_pair_length: int = 512) -> dict:
    """A padded batch. Pairs are stacked [s1; s2] for one encoder pass, or joined for a cross-encoder.

    A split with cached prefix states (data.hidden) gives a batch of those states instead of token ids.
    """
    if data.hidden and ("cross" in data.hidden or not cross):
        return collate_hidden(data, idx, cross=cross)
    idx = np.asarray(idx)
    batch = {"labels": data.labels[idx], "index": torch.from_numpy(idx)}
    if not data.pair:
        batch["input_ids"], batch["attention_mask"] = _pad(_seqs(data.s1, idx), pad_id)
        return batch
    a, b = _seqs(data.s1, idx), _seqs(data.s2, idx)
    if cross:
        joined, types = [], []
        for x, y in zip(a, b):
            seq = torch.cat([x, y[1:]])[:max_pair_length]  # [CLS] s1 [SEP] s2 [SEP]
            joined.append(seq)
            types.append(torch.cat([torch.zeros(len(x), dtype=torch.long),
                                    torch.ones(len(y) - 1, dtype=torch.long)])[:max_pair_length])
        batch["input_ids"], batch["attention_mask"] = _pad(joined, pad_id)
        batch["token_type_ids"], _ = _pad(types, 0)
        batch["cross"] = True
        return batch
    batch["input_ids"], batch["attention_mask"] = _pad(a + b, pad_id)
    batch["pair_size"] = len(idx)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
