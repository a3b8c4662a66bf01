"""The frozen-prefix cache: the outputs of the embeddings and the lower k layers, computed once.

With `model.freeze_layers: k` those modules never change during training and run in eval mode,
so their output for a sentence is a constant. The `cache` stage computes it for every prepared
task split (each sentence of a pair, and for Quora the joined cross-encoder sequence too) and
stores it unpadded in half precision, one safetensors file per split, beside a manifest that
fingerprints what the states depend on: the frozen weights themselves (embeddings + lower k
layers), the prepared data, k and the maximum length. Training, per-epoch selection and
evaluation read it instead of running those layers; a cache whose fingerprint differs from the
run's is never read (the run builds the right one first).

Because the key is the frozen weights, not a backbone name, a backbone whose lower k layers
did not change (the MLM stage trains only the layers the task training trains) shares the
cache of the backbone it started from.

Layout: <prefix_dir>/k<k>-<digest>/{manifest.json, <task>-<split>.safetensors}, written into a
temporary folder and renamed into place, so a kill leaves either the old cache or the new one.
Quora's joined cross-encoder sequences are included when model.para_head is cross.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline import io as pio
from pipeline.data import FILES, TaskData, collate, load_split, tokenizer_info
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
STORE_DTYPE = torch.float16  # half precision on disk and in memory; upcast per batch
MAX_PAIR_LENGTH = 512  # collate's cap on a joined cross-encoder sequence


def frozen_digest(model) -> str:
    """SHA-256 of the frozen prefix's weights (embeddings + lower k layers): what the cached states depend on."""
    h = hashlib.sha256()
    for module in model.prefix_modules():
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_digest(prepared_dir: str | Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(prepared_dir).glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(pio.sha256_file(p).encode())
    return h.hexdigest()


def fingerprint(cfg, model) -> dict:
    """What the cached states depend on; a cache is read only when all of it matches."""
    return {"format": FORMAT, "freeze_layers": model.prefix_layers, "weights": frozen_digest(model),
            "data": _data_digest(cfg.data.prepared_dir), "max_length": cfg.data.max_length,
            "dtype": str(STORE_DTYPE).removeprefix("torch.")}


def cache_dir(cfg, meta: dict) -> Path:
    return Path(cfg.data.prefix_dir) / f"k{meta['freeze_layers']}-{meta['weights'][:16]}"


def _splits(prepared_dir: Path) -> list[tuple[str, str]]:
    return [(s.task, s.split) for s in FILES if (prepared_dir / f"{s.task}-{s.split}.safetensors").exists()]


def _parts(data: TaskData, cross: bool) -> list[str]:
    if not data.pair:
        return ["s1"]
    return ["s1", "s2", "cross"] if cross and data.task == "para" else ["s1", "s2"]


@torch.inference_mode()
def _prefix_states(
    model, data: TaskData, part: str, pad_id: int, batch_size: int, device
) -> tuple[torch.Tensor, np.ndarray]:
    """Flat [tokens, hidden] states of one part of a split, in example order, and their offsets."""
    if part == "cross":
        a, b = np.diff(data.s1[1]), np.diff(data.s2[1])
        lengths = np.minimum(a + b - 1, MAX_PAIR_LENGTH)
    else:
        lengths = np.diff(getattr(data, part)[1])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = torch.empty((int(offsets[-1]), model.bert.config.hidden_size), dtype=STORE_DTYPE)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = collate(data, idx, pad_id, cross=part == "cross")
        if part == "s2":  # collate stacks [s1; s2] for pairs: keep the second half
            n = batch["pair_size"]
            ids, mask = batch["input_ids"][n:], batch["attention_mask"][n:]
        elif part == "s1" and data.pair:
            n = batch["pair_size"]
            ids, mask = batch["input_ids"][:n], batch["attention_mask"][:n]
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
        width = int(mask.sum(1).max())  # the pad width of this part alone
        ids, mask = ids[:, :width], mask[:, :width]
        types = batch.get("token_type_ids")
        types = types[:, :width].to(device) if types is not None else None
        hidden = model.prefix(ids.to(device), mask.to(device), types).to("cpu", STORE_DTYPE)
        for row, i in enumerate(idx):
            flat[offsets[i]: offsets[i + 1]] = hidden[row, : lengths[i]]
    return flat, offsets


def build(cfg, model, meta: dict | None = None, batch_size: int | None = None) -> Path:
    """Compute the prefix cache of `model`'s frozen layers over every prepared split; returns its folder."""
    if not model.prefix_layers:
        raise PipelineError("model.freeze_layers=0: every layer trains, there is no frozen prefix to cache")
    meta = dict(meta or fingerprint(cfg, model))
    cross = cfg.model.para_head == "cross"
    out = cache_dir(cfg, meta)
    device = next(model.parameters()).device
    prepared = Path(cfg.data.prepared_dir)
    pad_id = tokenizer_info(prepared)["pad_id"]
    was_training = model.training
    model.eval()
    tmp = out.with_name(f".{out.name}.{int(time.time() * 1e6)}{pio.TMP_SUFFIX}")
    tmp.mkdir(parents=True)
    try:
        started, files = time.time(), {}
        for task, split in tqdm(_splits(prepared), desc=f"prefix cache k={model.prefix_layers}", disable=None):
            data = load_split(prepared, task, split)
            tensors = {}
            for part in _parts(data, cross):
                flat, offsets = _prefix_states(model, data, part, pad_id, batch_size or cfg.eval.batch_size, device)
                tensors[f"{part}_hidden"], tensors[f"{part}_offsets"] = flat, torch.from_numpy(offsets)
            name = f"{task}-{split}.safetensors"
            save_file(tensors, str(tmp / name))
            files[name] = {"examples": len(data),
                           "tokens": {p: int(tensors[f"{p}_offsets"][-1]) for p in _parts(data, cross)}}
        size = sum(p.stat().st_size for p in tmp.iterdir())
        meta.update(cross=cross, files=files, bytes=size, seconds=round(time.time() - started, 1))
        pio.write_json(tmp / MANIFEST, meta)  # last: a folder without a manifest is never read
        pio.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    log.info("prefix cache, k=%d: %.0f MB in %s (%.0f s)", model.prefix_layers, size / 2**20, out, meta["seconds"])
    return out


def stale_reason(folder: Path, expected: dict, cross: bool = False) -> str | None:
    """Why the cache in `folder` must not be read for `expected`, or None when it is valid."""
    path = folder / MANIFEST
    if not path.exists():
        return "no cache" if not folder.exists() else "incomplete cache (no manifest)"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable manifest"
    changed = [k for k in expected if saved.get(k) != expected[k]]
    if changed:
        return "built for other " + ", ".join(changed)
    if cross and not saved.get("cross"):
        return "built without the cross-encoder's pair sequences"
    missing = [n for n in saved.get("files", {}) if not (folder / n).exists()]
    return f"missing {missing[0]}" if missing else None


def ensure(cfg, model) -> Path | None:
    """The valid prefix cache folder for `model`'s frozen layers, built first when missing or stale;
    None when nothing is frozen."""
    if not cfg.model.freeze_layers or not model.prefix_layers:  # pretrain mode alone runs its frozen backbone live
        return None
    meta = fingerprint(cfg, model)
    folder = cache_dir(cfg, meta)
    reason = stale_reason(folder, meta, cross=cfg.model.para_head == "cross")
    if reason is not None:
        log.info("prefix cache %s: %s; building it", folder, reason)
        build(cfg, model, meta)
    return folder


class PrefixCache:
    """The cached states of one folder, loaded per split on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / MANIFEST).read_text())
        self.k = int(self.meta["freeze_layers"])

    def attach(self, data: TaskData) -> TaskData:
        """Give `data` its cached states (checked against its token offsets); returns it."""
        path = self.folder / f"{data.task}-{data.split}.safetensors"
        if not path.exists():
            raise PipelineError(f"{path}: the prefix cache has no {data.task} {data.split} split; rebuild it "
                                f"(python -m pipeline cache)")
        tensors = load_file(str(path))
        hidden = {}
        for part in ("s1", "s2", "cross"):
            if f"{part}_hidden" not in tensors:
                continue
            offsets = tensors[f"{part}_offsets"].numpy()
            if part in ("s1", "s2") and not np.array_equal(offsets, getattr(data, part)[1]):
                raise PipelineError(f"{path}: {part} token counts differ from {data.task}-{data.split} in the "
                                    f"prepared data; the cache is stale, rebuild it")
            hidden[part] = (tensors[f"{part}_hidden"], offsets)
        data.hidden, data.hidden_layers = hidden, self.k
        return data


def run_cache(cfg) -> Path:
    """The cache stage: the frozen prefix (model.freeze_layers) of the backbone, over every prepared split."""
    from pipeline.model import build_model
    from pipeline.runtime import pick_device, resolve_precision

    out = Path(cfg.data.prefix_dir)
    out.mkdir(parents=True, exist_ok=True)  # DVC's output, empty when nothing is frozen
    if cfg.model.freeze_layers <= 0:
        log.info("model.freeze_layers=0: every layer trains, nothing to cache (%s left empty)", out)
        return out
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    model = build_model(cfg.model, ["sst"]).to(device)
    model.set_precision(device, resolve_precision(cfg.train.precision, device))
    return ensure(cfg, model)
