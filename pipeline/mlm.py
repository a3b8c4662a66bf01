"""The MLM extension: further pretrain the backbone with masked language modelling on SST sentences.

`pretrain-mlm` writes `mlm.output_dir` as a complete backbone folder (config, weights,
tokenizer, metrics.json) that `model.init_from` and `load_backbone` read. It checkpoints
into `<output_dir>.ckpt/` with pipeline/runtime.py's checkpoint helpers: outside the output folder,
because DVC empties a stage's outputs before running it. A killed run started again with
the same command resumes there and ends bit-identical to an uninterrupted one. The
checkpoint folder is deleted once the output is in place: it holds the optimizer state
(twice the model's size) and the MLM head, which nothing downstream reads.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import io as pio
from pipeline.data import collate, epoch_sample, length_batches, load_split, to_device, tokenizer_info
from pipeline.errors import ConfigError, NonFiniteLossError, PipelineError
from pipeline.model import load_backbone, load_tokenizer
from pipeline.runtime import (
    TrainState,
    autocast,
    find_checkpoint,
    load_checkpoint,
    pick_device,
    read_slot,
    resolve_precision,
    save_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that are not predicted (cross_entropy's ignore_index)
METRICS = "metrics.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    """`models/mlm` -> `models/mlm.ckpt`: beside the output, never inside it."""
    out = Path(output_dir)
    return out.with_name(out.name + ".ckpt")


# ---------------------------------------------------------------- masking


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids, mask_id: int, vocab_size: int,
                mask_prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `mask_prob` of the real, non-special tokens; of those 80% -> [MASK],
    10% -> a random non-special token, 10% unchanged. Labels hold the original id at chosen
    positions and -100 elsewhere. All randomness comes from `generator`, so a saved generator
    state replays the same masks.
    """
    def draw(fn, *args):  # drawn on the generator's device, so a CPU generator serves any batch
        return fn(*args, generator=generator, device=generator.device).to(input_ids.device)

    special = torch.as_tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = candidates & (draw(torch.rand, input_ids.shape) < mask_prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = draw(torch.rand, input_ids.shape)
    # Random replacements skip special ids: a stray [CLS] or [PAD] mid-sentence teaches nothing.
    vocab = torch.arange(vocab_size, dtype=input_ids.dtype, device=input_ids.device)
    allowed = vocab[~torch.isin(vocab, special)]
    random_ids = allowed[draw(torch.randint, len(allowed), input_ids.shape)]
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    masked[to_random] = random_ids[to_random]
    return masked, labels


# ---------------------------------------------------------------- model


class MaskedLM(nn.Module):
    """The backbone plus the paper's two-layer ReLU head to vocabulary logits.

    With `tie_decoder` the second layer's weight is the backbone's word-embedding matrix
    (BERT's own MLM practice), so a backbone that ships without an MLM head, like the
    embedded sentence-embedding model, gets meaningful gradients from the first step
    instead of those of a random 30k-way classifier.
    """

    def __init__(self, backbone: nn.Module, tie_decoder: bool = True, freeze_layers: int = 0):
        super().__init__()
        self.bert = backbone
        # Partial fine-tuning: the same lower layers as the task training stay frozen (and in eval
        # mode), so the MLM backbone keeps the frozen prefix, and its cache, of the backbone.
        self.frozen = [backbone.embeddings, *backbone.encoder.layer[:freeze_layers]] if freeze_layers else []
        for module in self.frozen:
            module.requires_grad_(False)
        hidden, vocab = backbone.config.hidden_size, backbone.config.vocab_size
        self.tie_decoder = tie_decoder
        if tie_decoder:
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden))
            self.decoder_bias = nn.Parameter(torch.zeros(vocab))
        else:
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                                      nn.Linear(hidden, vocab))

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.head(hidden)
        if self.tie_decoder:
            return F.linear(h, self.bert.get_input_embeddings().weight, self.decoder_bias)
        return h

    def chosen_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the chosen positions only: the head never sees the other ~85%."""
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        chosen = batch["labels"] != IGNORE
        return self.vocab_logits(hidden[chosen]), batch["labels"][chosen]

    def loss(self, batch: dict) -> torch.Tensor:
        logits, targets = self.chosen_logits(batch)
        return F.cross_entropy(logits.float(), targets)


class _MaskingState:
    """The checkpoint's `masking` slot: the masking generator and the run's parameters."""

    def __init__(self, generator: torch.Generator, fingerprint: str):
        self.generator, self.fingerprint = generator, fingerprint

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _fingerprint(cfg, info: dict) -> str:
    """What fixes the MLM trajectory; epochs, checkpoint_every and output_dir may change on resume."""
    m = cfg.mlm
    return json.dumps({"model.backbone": cfg.model.backbone, "mlm.lr": m.lr, "mlm.batch_size": m.batch_size,
                       "mlm.mask_prob": m.mask_prob, "mlm.seed": m.seed, "mlm.fraction": m.fraction,
                       "mlm.tie_decoder": m.tie_decoder,
                       "train.weight_decay": cfg.train.weight_decay, "data.max_length": cfg.data.max_length,
                       "data.limit": cfg.data.limit, "vocab_size": info["vocab_size"],
                       "model.freeze_layers": cfg.model.freeze_layers,
                       "train.precision": resolve_precision(cfg.train.precision, pick_device(cfg.train.device))},
                      sort_keys=True)


def _check_resumable(ckpt: Path, fingerprint: str) -> None:
    """Refuse, in one line, a checkpoint written with other parameters, before any weight is loaded."""
    try:
        saved = read_slot(ckpt, "masking")["fingerprint"]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise PipelineError(f"{ckpt}: unreadable MLM checkpoint ({type(err).__name__}); "
                            f"delete {ckpt.parent} to start over") from None
    if saved != fingerprint:
        old, new = json.loads(saved), json.loads(fingerprint)
        diff = ", ".join(f"{k}={old.get(k)!r}->{new.get(k)!r}" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k))
        raise PipelineError(f"{ckpt}: checkpoint was written with other parameters ({diff}); "
                            f"restore them to resume, or delete {ckpt.parent} to start over")


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_mlm(model: MaskedLM, data, info: dict, mask_prob: float, seed: int, batch_size: int, device,
                 precision: str = "fp32") -> dict:
    """Masked-token accuracy and mean loss on `data`, with the masks of a fresh generator seeded `seed`."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    order = np.argsort(data.lengths, kind="stable")  # fixed batches of similar length
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = collate(data, order[start: start + batch_size], info["pad_id"])
        ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], info["special_ids"], info["mask_id"],
                                  info["vocab_size"], mask_prob, generator)
        if not (labels != IGNORE).any():
            continue
        batch = to_device({"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}, device)
        with autocast(device, precision):
            logits, targets = model.chosen_logits(batch)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    model.train()
    return {"mlm_dev_acc": correct / max(count, 1), "mlm_dev_loss": loss_sum / max(count, 1), "mlm_dev_tokens": count}


# ---------------------------------------------------------------- output


def save_backbone(out_dir: Path, backbone: nn.Module, backbone_name: str, metrics: dict) -> None:
    """Write the backbone, tokenizer and metrics into a temp folder beside out_dir, then swap it in.

    A kill between the two renames leaves `.<name>.old.tmp` and no out_dir; the checkpoint is only
    deleted after this returns, so the same command then saves again.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    # mkdir, not mkdtemp: the folder keeps the umask's permissions once renamed into place
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        backbone.save_pretrained(tmp)
        load_tokenizer(backbone_name).save_pretrained(tmp)
        pio.write_json(tmp / METRICS, metrics)
        pio.replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the stage


def run_mlm(cfg) -> dict:
    """Further pretrain cfg.model.backbone on SST train sentences; save it to cfg.mlm.output_dir; return its metrics."""
    mc = cfg.mlm
    out_dir, ckpt_root = Path(mc.output_dir), checkpoint_root(mc.output_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(mc.seed)
    device = pick_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    info = tokenizer_info(cfg.data.prepared_dir)
    train_data = load_split(cfg.data.prepared_dir, "sst", "train")
    dev_data = load_split(cfg.data.prepared_dir, "sst", "dev")

    backbone = load_backbone(cfg.model.backbone)
    if info["vocab_size"] > backbone.config.vocab_size:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} has {backbone.config.vocab_size} token embeddings "
                          f"but {cfg.data.prepared_dir} was tokenised with {info['vocab_size']}; "
                          "run prepare with this backbone")
    if cfg.model.freeze_layers > len(backbone.encoder.layer):
        raise ConfigError(f"model.freeze_layers={cfg.model.freeze_layers} but the backbone has "
                          f"{len(backbone.encoder.layer)} layers")
    model = MaskedLM(backbone, tie_decoder=cfg.mlm.tie_decoder, freeze_layers=cfg.model.freeze_layers).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=mc.lr, weight_decay=cfg.train.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(mc.seed)
    masking = _MaskingState(generator, _fingerprint(cfg, info))

    state, steps_log = TrainState(), []
    ckpt = find_checkpoint(ckpt_root)
    if ckpt is not None:
        _check_resumable(ckpt, masking.fingerprint)
        state, steps_log = load_checkpoint(ckpt, model, optimizer, {"masking": masking})
        log.info("resuming MLM pretraining from %s at epoch %d step %d", ckpt, state.epoch, state.step_in_epoch)

    per_epoch = max(1, int(round(len(train_data) * mc.fraction)))
    for epoch in range(state.epoch, mc.epochs):
        rng = np.random.default_rng([mc.seed, epoch])  # the epoch's sentences and batches, rebuilt on resume
        batches = length_batches(epoch_sample(len(train_data), per_epoch, rng), train_data.lengths, mc.batch_size, rng)
        model.train()
        bar = tqdm(range(state.step_in_epoch, len(batches)), desc=f"mlm epoch {epoch + 1}/{mc.epochs}",
                   initial=state.step_in_epoch, total=len(batches), leave=False, disable=None)
        for step in bar:
            batch = collate(train_data, batches[step], info["pad_id"])
            ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], info["special_ids"],
                                      info["mask_id"], info["vocab_size"], mc.mask_prob, generator)
            value = None
            if (labels != IGNORE).any():  # a batch of very short sentences can draw no token at all
                batch = to_device({"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels},
                                  device)
                with autocast(device, precision):
                    loss = model.loss(batch)
                value = loss.item()  # one host sync per step, needed to stop before a non-finite update
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"MLM loss is {value} at epoch {epoch + 1} step {step + 1}")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{value:.3f}")
            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            steps_log.append({"step": state.global_step, "epoch": epoch + 1, "loss": value})
            if (mc.checkpoint_every and state.global_step % mc.checkpoint_every == 0
                    and state.step_in_epoch < len(batches)):
                save_checkpoint(ckpt_root, model, optimizer, state, steps_log, {"masking": masking})
        bar.close()
        # The epoch's mean loss comes from the step log, which a resume restores, not from a running sum.
        losses = [s["loss"] for s in steps_log if s["epoch"] == epoch + 1 and s["loss"] is not None]
        dev = evaluate_mlm(model, dev_data, info, mc.mask_prob, mc.seed, cfg.eval.batch_size, device, precision)
        state.history.append({"epoch": epoch + 1, "steps": len(batches),
                              "train_loss": sum(losses) / len(losses) if losses else None, **dev})
        log.info("mlm epoch %d: train_loss=%.4f mlm_dev_acc=%.4f mlm_dev_loss=%.4f", epoch + 1,
                 state.history[-1]["train_loss"] or math.nan, dev["mlm_dev_acc"], dev["mlm_dev_loss"])
        state.epoch, state.step_in_epoch = epoch + 1, 0
        save_checkpoint(ckpt_root, model, optimizer, state, steps_log, {"masking": masking})

    last = state.history[-1]
    metrics = {"mlm_dev_acc": last["mlm_dev_acc"], "mlm_dev_loss": last["mlm_dev_loss"],
               "train_loss": last["train_loss"],
               "epochs": last["epoch"], "steps": state.global_step, "backbone": cfg.model.backbone,
               "history": state.history}
    save_backbone(out_dir, model.bert, cfg.model.backbone, metrics)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # only after the output is safely in place
    log.info("MLM backbone saved to %s (mlm_dev_acc=%.4f); start an experiment from it with model.init_from=%s",
             out_dir, metrics["mlm_dev_acc"], out_dir)
    return metrics
