"""Predictions of a trained run on new sentences (`python -m pipeline predict`).

One input line per example: a sentence (sst, cfimdb) or two tab-separated sentences (para, sts).
One output line per input line, tab-separated:

- sst / cfimdb: the predicted class, then the probability of each class (0, 1, ...)
- para: the probability that the pair is a paraphrase, then the 0/1 label (probability > 0.5)
- sts: the similarity score, clipped to 0-5

An empty input line (or a pair with an empty side) gives an empty output line, so output line n
always answers input line n; such lines are counted in the log. Sentences longer than the run's
data.max_length tokens are truncated there, as in training, and counted. Inputs are tokenised
with the run's tokenizer, batched by length, and run at the run's train.precision (bf16 only where
the device computes it natively: pipeline.runtime.resolve_precision).
"""
from __future__ import annotations

import codecs
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import io as pio
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.tasks import TASKS

log = logging.getLogger(__name__)

_LINE_END = re.compile(rb"\r\n|\r|\n")
_SHOWN = 10  # line numbers listed in a log message


def read_lines(source: str) -> tuple[str, list[str]]:
    """The input's name and its lines (line ends removed); '-' is standard input."""
    if source == "-":
        name, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"--input {path}: no such file")
        name, raw = str(path), path.read_bytes()
    parts = _LINE_END.split(raw.removeprefix(codecs.BOM_UTF8))
    if parts[-1] == b"":
        parts.pop()
    lines = []
    for line_no, part in enumerate(parts, start=1):
        try:
            lines.append(part.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{name}:{line_no}: not valid UTF-8 (byte 0x{part[err.start]:02x})") from None
    return name, lines


def parse_lines(name: str, lines: list[str], pair: bool) -> tuple[list[tuple[str, ...] | None], list[int]]:
    """Per line the sentence(s), or None for an empty line; and the numbers of the empty lines."""
    out, empty = [], []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            out.append(None)
            empty.append(line_no)
            continue
        if not pair:
            out.append((line.strip(),))
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{name}:{line_no}: expected two tab-separated sentences, found {len(fields)} field(s)")
        texts = tuple(f.strip() for f in fields)
        if not all(texts):
            out.append(None)
            empty.append(line_no)
            continue
        out.append(texts)
    return out, empty


def encode(tokenizer, sentences: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids as prepare writes them (truncated at max_length), and which sentences were longer."""
    from pipeline.data import _tokenize

    # Tokenising at max_length + 1 tells which sentences did not fit in max_length.
    _, probe = _tokenize(tokenizer, sentences, max_length + 1)
    too_long = np.diff(probe) > max_length
    flat, offsets = _tokenize(tokenizer, sentences, max_length)
    return flat, offsets, too_long


@torch.inference_mode()
def outputs(model, data, pad_id: int, batch_size: int, device) -> np.ndarray:
    """Class probabilities (sentiment), paraphrase probability, or 0-5 score, in data order; batched by length."""
    from pipeline.data import collate, to_device

    model.eval()
    task = data.task
    spec = TASKS[task]
    cross = data.pair and task == "para" and model.cfg.para_head == "cross"
    out = np.zeros((len(data), spec.num_classes) if spec.num_classes else len(data), dtype=np.float32)
    order = np.argsort(data.lengths, kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc=f"predict {task}", leave=False, disable=None):
        idx = order[start: start + batch_size]
        batch = to_device(collate(data, idx, pad_id, cross=cross), device)
        if spec.num_classes:
            values = torch.softmax(model(task, batch).float(), dim=-1)
        elif spec.pair_kind == "binary":
            values = torch.sigmoid(model(task, batch).float())
        else:
            values = model.predict(task, batch).float().clamp(0.0, 5.0)
        out[idx] = values.cpu().numpy()
    return out


def format_line(task: str, value) -> str:
    spec = TASKS[task]
    if spec.num_classes:
        return "\t".join([str(int(np.argmax(value)))] + [f"{p:.4f}" for p in value])
    if spec.pair_kind == "binary":
        return f"{value:.4f}\t{int(value > 0.5)}"
    return f"{value:.4f}"


def _lines_list(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:_SHOWN]))
    return shown + (f" and {len(numbers) - _SHOWN} more" if len(numbers) > _SHOWN else "")


def run_predict(run_dir: str | Path, task: str, source: str = "-", target: str = "-",
                batch_size: int | None = None, device_name: str = "auto") -> int:
    """Predict `task` for every line of `source`; write one line per input line to `target`. Returns
    the number of predictions."""
    from pipeline.data import TaskData
    from pipeline.model import load_tokenizer
    from pipeline.runtime import pick_device
    from pipeline.stages import load_trained
    from pipeline.train import BEST

    run_dir = Path(run_dir)
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: unknown task; known: {', '.join(TASKS)}")
    if not (run_dir / BEST).exists():
        raise PipelineError(f"{run_dir / BEST}: no trained model; run the train stage first")
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size {batch_size} must be > 0")
    name, lines = read_lines(source)
    spec = TASKS[task]
    pair = spec.num_classes is None
    items, empty = parse_lines(name, lines, pair)
    keep = [i for i, item in enumerate(items) if item is not None]
    if not keep:
        raise DataError(f"{name}: no sentences to predict on (empty input)")
    device = pick_device(device_name)
    model, trained = load_trained(run_dir, device)
    if task not in trained.train.tasks:
        raise ConfigError(f"--task {task}: {run_dir} was trained on {', '.join(trained.train.tasks)} only")
    tokenizer = load_tokenizer(trained.model.backbone)
    max_length = trained.data.max_length
    tensors = {"labels": np.zeros(len(keep), dtype=np.float32)}
    too_long = np.zeros(len(keep), dtype=bool)
    for side, key in enumerate(("s1", "s2")[: 2 if pair else 1]):
        flat, offsets, longer = encode(tokenizer, [items[i][side] for i in keep], max_length)
        tensors[f"{key}_ids"], tensors[f"{key}_offsets"] = flat, offsets
        too_long |= longer
    data = TaskData(task, "input", tensors, [str(i + 1) for i in keep])
    values = outputs(model, data, tokenizer.pad_token_id, batch_size or trained.eval.batch_size, device)
    text = [""] * len(items)
    for row, i in enumerate(keep):
        text[i] = format_line(task, values[row])
    payload = "".join(t + "\n" for t in text)
    if target == "-":
        sys.stdout.write(payload)
        sys.stdout.flush()
    else:
        pio.write_text(target, payload)
    log.info("predict %s: %d of %d lines predicted (%s, %s)", task, len(keep), len(items), model.precision,
             device.type)
    if empty:
        log.warning("%d empty input line(s) left empty in the output: line %s", len(empty), _lines_list(empty))
    if too_long.any():
        longer = [keep[r] + 1 for r in np.flatnonzero(too_long)]
        log.warning("%d input line(s) longer than %d tokens, truncated: line %s", len(longer), max_length,
                    _lines_list(longer))
    return len(keep)
