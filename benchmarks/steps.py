"""One training step of our loop, and of a deliberately naive loop, each split into timed phases.

`loop_step` is the body of the step in `pipeline.train.train` (collate from the
pre-tokenised split, per-task `model.loss`, the finite-loss check, `balancer.backward`,
AdamW, the per-step log entry). `train()` has no step function to call, so the
benchmark keeps this copy; keep the two in step (see reports/benchmarks.md, notes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Bench, PhaseClock, autocast
from pipeline.data import SPECS, read_task_file, resolve_data_dir
from pipeline.errors import NonFiniteLossError, PipelineError


def loop_step(model, optimizer, balancer, step: dict[str, np.ndarray], bench: Bench, clock: PhaseClock) -> None:
    """Our loop's step on the batches `step` (task -> example indices)."""
    losses = {}
    for task in bench.tasks:
        with clock("collate"):
            batch = bench.collate(task, step[task])
        with clock("forward"), autocast(bench.device, bench.amp):
            losses[task] = model.loss(task, batch)
    with clock("loss_check"):
        stacked = torch.stack([losses[t].detach() for t in bench.tasks]).float().cpu()
        if not torch.isfinite(stacked).all():
            raise NonFiniteLossError(f"benchmark step produced a non-finite loss: {stacked.tolist()}")
    with clock("backward"):
        stats = balancer.backward(losses)
    with clock("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balancer.after_step()
    with clock("log"):  # the loop's per-step log entry (steps.jsonl): reads every statistic to the host
        values = torch.stack([v.detach().float() for v in stats.values()]).cpu().tolist() if stats else []
        {**{f"loss_{t}": float(stacked[i]) for i, t in enumerate(bench.tasks)}, **dict(zip(stats, values))}


@dataclass
class RawTexts:
    """A task's training sentences as text, row-aligned with its prepared split."""

    s1: list[str]
    s2: list[str]


def raw_texts(bench: Bench) -> dict[str, RawTexts]:
    """Read the raw training files prepare read, and check they line up with data/prepared (same ids, order)."""
    cfg = bench.cfg
    source = Path(bench.raw_source)
    if not bench.raw_source or not source.is_dir():
        source = resolve_data_dir(cfg.data.data_dir, cfg.data.cache_dir)
    out = {}
    for task in bench.tasks:
        spec = SPECS[(task, "train")]
        examples, _, _ = read_task_file(source / spec.filename, spec)
        prepared = bench.train[task]
        if examples.ids[: len(prepared)] != list(prepared.ids):
            raise PipelineError(f"{source / spec.filename}: rows differ from {cfg.data.prepared_dir}; "
                                f"re-run `python -m pipeline prepare`")
        out[task] = RawTexts(examples.s1[: len(prepared)], examples.s2[: len(prepared)])
    return out


def naive_batch(tokenizer, texts: RawTexts, idx: np.ndarray, task: str, bench: Bench) -> dict:
    """Tokenise the batch's sentences now, truncated like prepare did, padded to the fixed naive width."""
    pad_to = bench.settings.naive_pad
    max_length = min(bench.max_length, pad_to)
    kw = dict(truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    s1 = [texts.s1[i] for i in idx]
    batch = {"labels": bench.train[task].labels[idx]}
    if not texts.s2:
        enc = tokenizer(s1, **kw)
    elif bench.cross and task == "para":
        enc = tokenizer(s1, [texts.s2[i] for i in idx], **kw)
        batch["cross"] = True
    else:
        enc = tokenizer(s1 + [texts.s2[i] for i in idx], **kw)
        batch["pair_size"] = len(idx)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in enc:
            value = enc[key]
            batch[key] = F.pad(value, (0, pad_to - value.shape[1]), value=bench.pad_id if key == "input_ids" else 0)
    return {k: (v.to(bench.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def naive_step(model, optimizer, tokenizer, texts: dict[str, RawTexts], step: dict[str, np.ndarray],
               bench: Bench, clock: PhaseClock) -> None:
    """The naive loop's step: tokenise now, pad to a fixed width, eager attention (the model's), summed loss."""
    losses = []
    for task in bench.tasks:
        with clock("tokenize"):
            batch = naive_batch(tokenizer, texts[task], step[task], task, bench)
        with clock("forward"), autocast(bench.device, bench.amp):
            losses.append(model.loss(task, batch))
    with clock("backward"):
        torch.stack(losses).sum().backward()
    with clock("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
