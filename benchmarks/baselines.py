"""The loops our step is measured against, written the way the CS224N starter code trains.

`StarterLoop` (the headline baseline): each batch's sentences are tokenised at step time, as the
starter's `collate_fn` does (`tokenizer(..., padding=True, truncation=True)`: padded to the
batch's longest sequence), batches come in shuffled order (no length bucketing), the backbone
runs eager attention in fp32, every layer trains, the task losses are summed into one backward,
and AdamW is torch's plain per-parameter loop (neither fused nor foreach; the starter's own AdamW
is such a loop). With `pad_to=128` the same loop pads every batch to 128 tokens instead (the
older, cruder baseline, kept as a secondary row).

Deliberate sameness, so that the comparison measures the loop and not the model: the same
`MultitaskBert` heads and losses (`model.loss`), the same examples, the same truncation as
`prepare`, and pair sentences stacked [s1; s2] into one encoder pass as our model encodes them
(the starter encodes s1 and s2 in two passes, each padded to its own longest).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Bench, PhaseClock
from pipeline.data import SPECS, read_task_file, resolve_data_dir
from pipeline.errors import PipelineError


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


def plain_adamw(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW as a loop over parameters (foreach and fused off): the starter's kind of optimizer."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             foreach=False, fused=False)


class StarterLoop:
    """The starter-style loop on `model` (eager attention, fp32, nothing frozen); `pad_to` fixes the width."""

    def __init__(self, bench: Bench, model, tokenizer, texts: dict[str, RawTexts], pad_to: int | None = None):
        self.bench, self.model, self.tokenizer, self.texts, self.pad_to = bench, model, tokenizer, texts, pad_to
        if model.frozen_layers:
            raise PipelineError("the starter loop trains every layer: build its model with model.freeze_layers=0")
        self.optimizer = plain_adamw(model, bench.cfg.train.lr, bench.cfg.train.weight_decay)

    def batch(self, task: str, idx: np.ndarray) -> dict:
        """Tokenise the batch's sentences now, truncated as prepare did, padded to the longest (or to pad_to)."""
        bench, texts = self.bench, self.texts[task]
        max_length = bench.max_length if self.pad_to is None else min(bench.max_length, self.pad_to)
        kw = dict(truncation=True, max_length=max_length, return_tensors="pt",
                  padding=True if self.pad_to is None else "max_length")
        s1 = [texts.s1[i] for i in idx]
        batch = {"labels": bench.train[task].labels[idx]}
        if not texts.s2:
            enc = self.tokenizer(s1, **kw)
        elif bench.cross and task == "para":  # [CLS] s1 [SEP] s2 [SEP], truncated as collate joins them
            enc = self.tokenizer(s1, [texts.s2[i] for i in idx], **{**kw, "max_length": 2 * max_length - 1})
            batch["cross"] = True
        else:
            enc = self.tokenizer(s1 + [texts.s2[i] for i in idx], **kw)
            batch["pair_size"] = len(idx)
        keys = ("input_ids", "attention_mask") + (("token_type_ids",) if batch.get("cross") else ())
        for key in keys:
            value = enc[key]
            if self.pad_to is not None and value.shape[1] < self.pad_to:
                value = F.pad(value, (0, self.pad_to - value.shape[1]), value=bench.pad_id if key == "input_ids" else 0)
            batch[key] = value
        return {k: (v.to(bench.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def step(self, step: dict[str, np.ndarray], clock: PhaseClock) -> None:
        """Tokenise, forward each task, one backward of the summed losses, AdamW."""
        self.model.set_precision(self.bench.device, "fp32")
        self.model.train()
        losses = []
        for task in self.bench.tasks:
            with clock("tokenize"):
                batch = self.batch(task, step[task])
            with clock("forward"):
                losses.append(self.model.loss(task, batch))
        with clock("backward"):
            torch.stack(losses).sum().backward()
        with clock("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def batches(self, step: dict[str, np.ndarray]) -> dict[str, dict]:
        return {t: self.batch(t, step[t]) for t in self.bench.tasks}

    def block(self, plan: list[dict]) -> dict[str, float]:
        clock = PhaseClock(self.bench.device)
        for step in plan:
            self.step(step, clock)
        return dict(clock.times)
