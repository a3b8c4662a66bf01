"""The one training loop: every experiment, sweep trial and test goes through `train()`.

Checkpoints hold everything a resume needs (model, optimizer, balancer state,
RNG state, position in the epoch schedule), so a run killed at any point and
started again with the same command ends with exactly the same metrics.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline import io as pio
from pipeline.balancers import make_balancer
from pipeline.data import collate, epoch_sample, epoch_size, length_batches, load_split, to_device, tokenizer_info
from pipeline.errors import ConfigError, NonFiniteLossError
from pipeline.evaluate import score_tasks
from pipeline.model import build_model
from pipeline.runtime import (
    CHECKPOINT,
    TrainState,
    check_weights_finite,
    find_checkpoint,
    load_checkpoint,
    pick_device,
    resolve_precision,
    save_checkpoint,
    seed_everything,
)
from pipeline.tracking import RunRecord, WandbTracker

log = logging.getLogger(__name__)

BEST = "best.safetensors"
HISTORY = "history.json"
STEPS = "steps.jsonl"


# May differ between a run and its resume: they do not change the trajectory (epochs extends it).
RESUMABLE_CHANGES = ("train.epochs", "train.device", "train.threads", "train.checkpoint_every")


def trajectory_params(cfg) -> dict:
    """The model and train parameters that fix a run's trajectory, flat."""
    flat = {f"{sec}.{k}": v for sec in ("model", "train") for k, v in asdict(getattr(cfg, sec)).items()}
    free = set(RESUMABLE_CHANGES)
    if cfg.train.lr_schedule != "constant" or cfg.train.warmup_ratio:
        free.discard("train.epochs")  # a decaying or warming schedule is laid out over all epochs
    return {k: v for k, v in flat.items() if k not in free}


def check_resumable(ckpt: Path, params: dict) -> None:
    """Refuse, in one line, to continue a checkpoint written with other parameters."""
    saved = json.loads((ckpt / "state.json").read_text()).get("params") or params  # older checkpoints: none
    changed = [k for k in sorted(set(saved) | set(params)) if saved.get(k) != params.get(k)]
    if changed:
        diff = ", ".join(f"{k}={saved.get(k)!r}->{params.get(k)!r}" for k in changed)
        raise ConfigError(f"{ckpt}: checkpoint was written with other parameters ({diff}); "
                          f"restore them to resume, or start over with --no-resume")


def make_optimizer(model, train_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel on CPU and CUDA alike (benchmarks: ~3.6x faster step).

    With train.head_lr set, the task heads form a second parameter group at that rate.
    """
    heads = model.head_parameters() if train_cfg.head_lr else []
    in_heads = {id(p) for p in heads}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_heads]
    groups = [g for g in ({"params": rest}, {"params": heads, "lr": train_cfg.head_lr}) if g["params"]]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)


def make_scheduler(optimizer, train_cfg, steps_per_epoch: int):
    """train.lr_schedule with train.warmup_ratio, over epochs x steps_per_epoch steps (transformers' schedulers)."""
    from transformers import get_scheduler

    total = max(1, train_cfg.epochs * steps_per_epoch)
    warmup = int(round(train_cfg.warmup_ratio * total))
    name = train_cfg.lr_schedule
    if name == "constant":
        name = "constant_with_warmup" if warmup else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def save_best(run_dir: Path, model, cfg, scores: dict) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg.to_dict()), "scores": json.dumps(scores)}
    pio.write_with(run_dir / BEST, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# ---------------------------------------------------------------- the loop


class NonFiniteBatch(NonFiniteLossError):
    """A task loss was NaN/inf; nothing was updated (the caller skips the batch or stops)."""


def train_step(model, batches: dict[str, dict], balancer, optimizer, scheduler=None) -> dict:
    """One optimizer step over one batch per task, the balancer included; returns the step's log entry.

    `batches` maps each task to a collated batch already on the model's device. The losses are
    checked for finiteness before any update (one host read for all of them); a non-finite one
    raises NonFiniteBatch with the gradients cleared. The loop, the benchmarks and the sweeps all
    train through this function.
    """
    tasks = list(batches)
    losses = {t: model.loss(t, batches[t]) for t in tasks}
    stacked = torch.stack([losses[t].detach() for t in tasks]).float().cpu()
    if not torch.isfinite(stacked).all():  # one host sync per step, needed to act before the update
        bad = tasks[int((~torch.isfinite(stacked)).nonzero()[0])]
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteBatch(f"task {bad} loss is {stacked[tasks.index(bad)].item()}")
    stats = balancer.backward(losses)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    balancer.after_step()
    # One host read for all balancer statistics (one sync on CUDA, not one per value).
    values = torch.stack([v.detach().float() for v in stats.values()]).cpu().tolist() if stats else []
    return {**{f"loss_{t}": float(stacked[i]) for i, t in enumerate(tasks)}, **dict(zip(stats.keys(), values)),
            "lr": lr}


def open_prefix_cache(cfg, model):
    """The frozen-prefix cache of `model` (built first if missing or stale), or None when every layer trains."""
    from pipeline import cache

    folder = cache.ensure(cfg, model)
    return cache.PrefixCache(folder) if folder is not None else None


def load_task_data(cfg, tasks: list[str], split: str, prefix=None, limit: int = 0) -> dict:
    """Prepared splits of `tasks` (a random `limit` rows each, 0: all), with cached prefix states if given."""
    data = {t: load_split(cfg.data.prepared_dir, t, split) for t in tasks}
    if prefix is not None:
        for d in data.values():
            prefix.attach(d)
    return {t: d.subset(limit) for t, d in data.items()}


def train(cfg, run_dir: str | Path | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
          resume: bool = True) -> dict:
    """Train one experiment and return the best dev scores.

    `on_epoch_end(epoch, scores)` lets a sweep report intermediate values; an
    exception it raises (e.g. optuna.TrialPruned) ends the run with status 'pruned'.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    tasks = list(tc.tasks)
    vocab = tokenizer_info(cfg.data.prepared_dir)
    pad_id = vocab["pad_id"]

    model = build_model(cfg.model, tasks).to(device)
    model.set_precision(device, precision)
    rows = model.bert.get_input_embeddings().num_embeddings
    if vocab["vocab_size"] > rows:  # token ids past the embedding table would fail deep in the first forward
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} embeds {rows} tokens but {cfg.data.prepared_dir} was "
                          f"tokenised with a {vocab['vocab_size']}-token vocabulary; run prepare with this backbone")
    prefix = open_prefix_cache(cfg, model)
    train_data = load_task_data(cfg, tasks, "train", prefix)
    dev_data = load_task_data(cfg, tasks, "dev", prefix, tc.eval_limit)
    optimizer = make_optimizer(model, tc, device)
    balancer = make_balancer(tc.balancer if len(tasks) > 1 else "sum", model, tasks, tc)

    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad backbone or data leaves nothing behind
    pio.remove_stale_temps(run_dir)  # what a killed run was half-way through writing
    for scratch in run_dir.glob(f"{CHECKPOINT}*{pio.TMP_SUFFIX}"):  # staging or half-deleted checkpoints
        shutil.rmtree(scratch, ignore_errors=True)
    params = {**trajectory_params(cfg), "train.precision": precision}  # the precision that ran, not "auto"
    state, steps_log = TrainState(params=params), []
    ckpt = find_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, state.params)  # before the record is touched
    record = RunRecord(run_dir, cfg, resume=ckpt is not None)
    sizes = {t: len(d) for t, d in train_data.items()}
    per_task = max(epoch_size(tc.schedule, sizes, tc.epoch_fraction), tc.min_epoch_steps * tc.batch_size)
    cross = cfg.model.para_head == "cross"
    scheduler = make_scheduler(optimizer, tc, math.ceil(per_task / tc.batch_size))
    extra = {"balancer": balancer, "scheduler": scheduler}
    status, error, tracker = "failed", None, None
    log.info("%s: %s precision, %d frozen layers%s, %d trainable parameters", cfg.name, precision, model.frozen_layers,
             " (prefix cache)" if train_data[tasks[0]].hidden else "",
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    try:  # from here on, whatever happens, the record and the W&B run are closed
        tracker = WandbTracker(cfg, run_dir, cfg.tracking.wandb)
        if ckpt is not None:
            state, steps_log = load_checkpoint(ckpt, model, optimizer, extra)
            state.params = params
            log.info("resuming %s from its checkpoint at epoch %d step %d",
                     run_dir, state.epoch + 1, state.step_in_epoch + 1)
        for epoch in range(state.epoch, tc.epochs):
            rng = np.random.default_rng([tc.seed, epoch])
            schedule = {t: length_batches(epoch_sample(sizes[t], per_task, rng), train_data[t].lengths,
                                          tc.batch_size, rng) for t in tasks}
            n_steps = min(len(b) for b in schedule.values())
            model.train()
            t_epoch = time.time()
            bar = tqdm(range(state.step_in_epoch, n_steps), desc=f"{cfg.name} epoch {epoch + 1}/{tc.epochs}",
                       initial=state.step_in_epoch, total=n_steps, leave=False, disable=None)
            for step in bar:
                batches = {t: to_device(collate(train_data[t], schedule[t][step], pad_id, cross=cross and t == "para"),
                                        device) for t in tasks}
                try:
                    entry = train_step(model, batches, balancer, optimizer, scheduler)
                except NonFiniteBatch as err:
                    where = f"{err} at epoch {epoch + 1} step {step + 1}"
                    if tc.on_nonfinite == "stop":
                        raise NonFiniteLossError(where) from None
                    log.warning("skipping batch: %s", where)
                    scheduler.step()
                    state.skipped_batches += 1
                    state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
                    continue
                state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
                entry = {"step": state.global_step, "epoch": epoch + 1, **entry}
                steps_log.append(entry)
                tracker.log(entry, step=state.global_step)
                if step % 10 == 0:
                    bar.set_postfix({t: f"{entry[f'loss_{t}']:.3f}" for t in tasks})
                if (tc.checkpoint_every and state.global_step % tc.checkpoint_every == 0
                        and state.step_in_epoch < n_steps):
                    check_weights_finite(model, f"at epoch {epoch + 1} step {step + 1}")
                    save_checkpoint(run_dir, model, optimizer, state, steps_log, extra)
            bar.close()
            check_weights_finite(model, f"in epoch {epoch + 1}")
            scores, _ = score_tasks(model, dev_data, pad_id, cfg.eval.batch_size, device)
            # From the step log, not running sums: a run resumed mid-epoch has the epoch's early steps there only.
            done = [s for s in steps_log if s["epoch"] == epoch + 1]
            entry = {"epoch": epoch + 1, "steps": n_steps, "train_time_s": round(time.time() - t_epoch, 2),
                     **{f"train_loss_{t}": sum(s[f"loss_{t}"] for s in done) / max(len(done), 1) for t in tasks},
                     **scores}
            state.history.append(entry)
            log.info("%s epoch %d: %s", cfg.name, epoch + 1,
                     " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
            if scores["avg"] > state.best_score:
                state.best_score, state.best_epoch = scores["avg"], epoch + 1
                save_best(run_dir, model, cfg, scores)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            # Outputs first, checkpoint last: a kill in between replays the epoch and rewrites them the same.
            pio.write_json(run_dir / HISTORY, state.history)
            pio.write_text(run_dir / STEPS, "".join(json.dumps(s) + "\n" for s in steps_log))
            record.set_history(state.history)
            save_checkpoint(run_dir, model, optimizer, state, steps_log, extra)
            tracker.log(scores, step=state.global_step)
            if on_epoch_end is not None:
                on_epoch_end(epoch, scores)
        best = dict(state.history[state.best_epoch - 1]) if state.best_epoch > 0 else {}
        best = {k: v for k, v in best.items() if not k.startswith("train_")} | {"best_epoch": state.best_epoch}
        status = "completed"
        return best
    except BaseException as err:
        status = ("pruned" if type(err).__name__ == "TrialPruned"
                  else ("interrupted" if isinstance(err, KeyboardInterrupt) else "failed"))
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        best_metrics = ({k: v for k, v in state.history[state.best_epoch - 1].items() if not k.startswith("train_")}
                        if state.best_epoch > 0 else {})
        record.finish(status, {**best_metrics, "best_epoch": state.best_epoch, "skipped_batches": state.skipped_batches,
                               "precision": precision, "freeze_layers": model.frozen_layers,
                               "steps": state.global_step}, error)
        if tracker is not None:
            tracker.summary(best_metrics)
            tracker.finish(exit_code=0 if status == "completed" else 1)
