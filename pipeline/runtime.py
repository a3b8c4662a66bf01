"""What every training process shares: device and precision choice, seeding, checkpoints.

Used by the multitask loop (train.py), the MLM stage (mlm.py), evaluation and the benchmarks,
so that autocast, device selection and the checkpoint format exist once.

A checkpoint is a folder: model.safetensors, trainer.pt (optimizer state, RNG state and one
named slot per extra stateful object: the balancer, the lr scheduler, the MLM masking state),
steps.jsonl and state.json. It is written beside the final one and swapped in, so a kill at
any moment leaves one complete checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline import io as pio
from pipeline.errors import NonFiniteLossError, PipelineError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
PRECISIONS = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------- device, precision, seeds


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX), where autocast pays off.

    Without them (AVX2 machines) oneDNN emulates bf16 and a step gets slower, not faster.
    """
    probe = getattr(torch._C, "_cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(probe, name, None)
        if fn is not None and fn():
            return True
    try:  # older torch: read the kernel's flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device does bf16 natively, fp32 elsewhere; fp32 and bf16 stay as asked."""
    if name not in PRECISIONS:
        raise PipelineError(f"train.precision={name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return name


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the encoder, or nothing. Master weights stay fp32 either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    epoch: int = 0          # epochs completed
    step_in_epoch: int = 0  # steps completed inside the current epoch
    global_step: int = 0
    best_score: float = -float("inf")
    best_epoch: int = -1
    skipped_batches: int = 0
    history: list = field(default_factory=list)
    params: dict = field(default_factory=dict)  # trajectory parameters of the run, checked on resume


def save_checkpoint(run_dir: Path, model, optimizer, state: TrainState, steps: list[dict],
                    extra: dict | None = None) -> None:
    """Write checkpoint.tmp/, then swap it in. `extra` maps slot names to objects with state_dict()."""
    final, new, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}{pio.TMP_SUFFIX}", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(new / "model.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "rng": rng,
               **{name: obj.state_dict() for name, obj in (extra or {}).items() if obj is not None}}
    torch.save(trainer, new / "trainer.pt")
    (new / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (new / "state.json").write_text(json.dumps(asdict(state)))
    for f in new.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        discard(old)
        final.rename(old)
    new.rename(final)
    discard(old)


def read_slot(path: Path, name: str):
    """One named slot of a checkpoint's trainer.pt (memory-mapped: checks read it before loading weights)."""
    return torch.load(path / "trainer.pt", weights_only=True, map_location="cpu", mmap=True).get(name)


def load_checkpoint(path: Path, model, optimizer, extra: dict | None = None) -> tuple[TrainState, list[dict]]:
    """Restore model, optimizer, RNG and every named slot in `extra` that the checkpoint holds."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(trainer["optimizer"])
    for name, obj in (extra or {}).items():
        if obj is not None and name in trainer:  # a slot missing from an older checkpoint keeps its fresh state
            obj.load_state_dict(trainer[name])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    state = TrainState(**json.loads((path / "state.json").read_text()))
    steps = [json.loads(line) for line in (path / "steps.jsonl").read_text().splitlines() if line]
    return state, steps


def discard(folder: Path) -> None:
    """Delete a folder so that a kill half-way leaves only scratch: renamed to *.tmp first, then removed."""
    if folder.exists():
        trash = folder.with_name(f"{folder.name}.trash{pio.TMP_SUFFIX}")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (run_dir / name / "state.json").exists():
            return run_dir / name
    return None


def check_weights_finite(model, where: str) -> None:
    """Refuse to checkpoint a model an update has made non-finite: the last good checkpoint stays."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise NonFiniteLossError(f"weights {bad[0]}{more} became non-finite {where}; the last good checkpoint is kept")
