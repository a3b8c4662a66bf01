"""The MLM extension: masking statistics, the pretrain-mlm stage on the tiny BERT, and resume after a kill."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import mlm
from pipeline.errors import PipelineError
from pipeline.mlm import IGNORE, MaskedLM, checkpoint_root, mask_tokens, run_mlm
from pipeline.model import build_model, load_backbone

VOCAB = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = [PAD, UNK, CLS, SEP, MASK]


def _batch(rows=400, width=60, seed=0):
    """[CLS] words [SEP] [PAD]..., with some [UNK] inside the sentences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (rows, width), generator=g)
    lengths = torch.randint(5, width + 1, (rows,), generator=g)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids[torch.rand(rows, width, generator=g) < 0.05] = UNK
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def _mask(ids, attention, seed=1, prob=0.15):
    return mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, prob, torch.Generator().manual_seed(seed))


def test_masking_rates_80_10_10():
    ids, attention = _batch()
    masked, labels = _mask(ids, attention)
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != IGNORE
    n = int(chosen.sum())
    rate = n / int(candidates.sum())  # ~19k candidates: sd of the rate ~0.003
    assert abs(rate - 0.15) < 0.012, rate
    to_mask = (masked[chosen] == MASK).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    replaced = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03 and abs(replaced - 0.1) < 0.025 and abs(unchanged - 0.1) < 0.025, \
        (to_mask, replaced, unchanged)
    assert torch.equal(labels[chosen], ids[chosen])


def test_masking_rate_follows_mask_prob():
    ids, attention = _batch(seed=3)
    candidates = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    _, labels = _mask(ids, attention, prob=0.4)
    assert abs(int((labels != IGNORE).sum()) / int(candidates.sum()) - 0.4) < 0.015


def test_special_and_padding_never_chosen_labels_ignored_elsewhere():
    ids, attention = _batch(seed=2)
    masked, labels = _mask(ids, attention, prob=0.9)  # a high rate, so a leak would show
    protected = (attention == 0) | torch.isin(ids, torch.tensor(SPECIAL))
    assert protected.sum() > 0
    assert (labels[protected] == IGNORE).all()
    assert torch.equal(masked[protected], ids[protected])  # specials and padding untouched
    unchosen = labels == IGNORE
    assert torch.equal(masked[unchosen], ids[unchosen])


def test_random_replacements_are_valid_non_special_ids():
    ids, attention = _batch(seed=4)
    masked, labels = _mask(ids, attention, prob=0.9)
    changed = (labels != IGNORE) & (masked != MASK) & (masked != ids)
    assert changed.sum() > 1000
    repl = masked[changed]
    assert (repl >= 0).all() and (repl < VOCAB).all()
    assert not torch.isin(repl, torch.tensor(SPECIAL)).any()


def test_masking_is_reproducible_from_the_generator_state():
    ids, attention = _batch(rows=50)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    first = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, 0.15, g)
    second = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, 0.15, g)
    assert not torch.equal(first[1], second[1])  # the generator moves on
    g.set_state(state)
    again = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, 0.15, g)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("tie", [False, True])
def test_head_is_two_layer_relu_to_vocab_and_loss_only_on_chosen(tiny_backbone, tie):
    torch.manual_seed(0)
    model = MaskedLM(load_backbone(str(tiny_backbone)), tie_decoder=tie).eval()
    h = model.bert.config.hidden_size
    linears = [(m.in_features, m.out_features) for m in model.head if isinstance(m, torch.nn.Linear)]
    if tie:  # second layer: the word-embedding matrix itself, not a copy
        assert linears == [(h, h)]
        emb = model.bert.get_input_embeddings().weight
        assert emb.shape == (VOCAB, h) and not any(p is emb for p in model.head.parameters())
    else:
        assert linears == [(h, h), (h, VOCAB)]
    assert any(isinstance(m, torch.nn.ReLU) for m in model.head)
    ids, attention = _batch(rows=4, width=12)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[2, 5] = ids[0, 3], ids[2, 5]
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    logits, targets = model.chosen_logits(batch)
    assert logits.shape == (2, VOCAB) and targets.tolist() == [ids[0, 3].item(), ids[2, 5].item()]
    full = model.vocab_logits(model.bert(input_ids=ids, attention_mask=attention).last_hidden_state)
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(model.loss(batch), expected, atol=1e-5)


# ---------------------------------------------------------------- the stage

FAST = ["mlm.fraction=1.0", "mlm.epochs=2", "mlm.lr=1e-3", "mlm.batch_size=4"]  # 40 sentences: 10 steps/epoch


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_run_mlm_writes_a_loadable_backbone(make_cfg, tiny_backbone):
    cfg = make_cfg(*FAST)
    metrics = run_mlm(cfg)
    out = Path(cfg.mlm.output_dir)
    assert not checkpoint_root(out).exists()  # removed once the output is in place
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2]
    assert 0 <= on_disk["mlm_dev_acc"] <= 1 and on_disk["history"][-1]["mlm_dev_tokens"] > 0
    assert on_disk["history"][1]["mlm_dev_loss"] < on_disk["history"][0]["mlm_dev_loss"]  # it learns
    assert on_disk["steps"] == 20

    trained, original = _weights(out), _weights(tiny_backbone)
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
    backbone = load_backbone(str(out))
    assert backbone.config.hidden_size == 32
    model = build_model(make_cfg(f"model.init_from={out}").model, ["sst", "para", "sts"])
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


_REAL_LOSS, _REAL_SAVE = MaskedLM.loss, mlm.save_checkpoint


class _Steps:
    """Counts training-loss calls; the `kill`-th raises, as a SIGKILL would stop the process there.
    Also notes the count at every checkpoint, so a test knows where a resume must start."""

    def __init__(self, monkeypatch, kill: int = 0):
        self.calls, self.at_checkpoint = 0, []

        def loss(model, batch):
            self.calls += 1
            if self.calls == kill:
                raise KeyboardInterrupt(f"simulated kill at training step {kill}")
            return _REAL_LOSS(model, batch)

        def save(*args):
            _REAL_SAVE(*args)
            self.at_checkpoint.append(self.calls)

        monkeypatch.setattr(MaskedLM, "loss", loss)
        monkeypatch.setattr(mlm, "save_checkpoint", save)


_REFERENCE: dict = {}


def _reference(make_cfg, tmp_path, monkeypatch) -> dict:
    """One uninterrupted run, shared by the resume cases (same config, so the same result)."""
    if not _REFERENCE:
        steps = _Steps(monkeypatch)
        returned = run_mlm(make_cfg(*FAST, f"mlm.output_dir={tmp_path / 'ref'}"))
        _REFERENCE.update(calls=steps.calls, returned=json.dumps(returned), weights=_weights(tmp_path / "ref"),
                          metrics=(tmp_path / "ref" / "metrics.json").read_text())
    return _REFERENCE


@pytest.mark.parametrize("every,kill", [
    (3, 13),  # killed in epoch 2, a few steps after a mid-epoch checkpoint
    (0, 13),  # epoch-end checkpoints only: resumes from the end of epoch 1
    (0, 4),   # killed before any checkpoint: the restart runs everything
])
def test_resume_after_kill_is_bit_identical(make_cfg, tmp_path, monkeypatch, every, kill):
    ref = _reference(make_cfg, tmp_path, monkeypatch)
    assert ref["calls"] > kill

    cfg = make_cfg(*FAST, f"mlm.output_dir={tmp_path / 'killed'}", f"mlm.checkpoint_every={every}")
    killed = _Steps(monkeypatch, kill)
    with pytest.raises(KeyboardInterrupt):
        run_mlm(cfg)
    out = tmp_path / "killed"
    assert not out.exists()  # nothing half-written where init_from would read it
    assert checkpoint_root(out).exists() == bool(killed.at_checkpoint)
    done = killed.at_checkpoint[-1] if killed.at_checkpoint else 0
    assert done < kill
    resumed = _Steps(monkeypatch)
    metrics = run_mlm(cfg)
    assert resumed.calls == ref["calls"] - done  # it resumed from the last checkpoint, not from scratch
    assert json.dumps(metrics) == ref["returned"]
    assert (out / "metrics.json").read_text() == ref["metrics"]
    a, b = _weights(out), ref["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_root(out).exists()


def test_resume_refuses_a_checkpoint_with_other_parameters(make_cfg, tmp_path, monkeypatch):
    out = tmp_path / "m"
    _Steps(monkeypatch, kill=4)
    with pytest.raises(KeyboardInterrupt):
        run_mlm(make_cfg(*FAST, f"mlm.output_dir={out}", "mlm.checkpoint_every=2"))
    monkeypatch.undo()
    with pytest.raises(PipelineError, match=r"mlm\.lr=0\.001->0\.01.*delete"):
        run_mlm(make_cfg(*FAST, f"mlm.output_dir={out}", "mlm.checkpoint_every=2", "mlm.lr=1e-2"))
    assert not out.exists()


def test_save_backbone_replaces_an_existing_output_whole(make_cfg, tmp_path, tiny_backbone):
    out = tmp_path / "mlm"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    (tmp_path / ".mlm.123.abcd.tmp").mkdir()  # left by a run killed while saving
    mlm.save_backbone(out, load_backbone(str(tiny_backbone)), str(tiny_backbone), {"mlm_dev_acc": 0.5})
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "metrics.json").read_text()) == {"mlm_dev_acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlm"]  # no temp or .old folder left


@pytest.mark.slow
def test_cli_run_killed_with_sigkill_resumes_bit_identical(make_cfg, tmp_path, tiny_backbone, micro_data, prepared):
    """`python -m pipeline pretrain-mlm`, SIGKILLed mid-run, then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import PARAMS, ROOT, micro_overrides

    run = [*FAST[:1], "mlm.epochs=4", *FAST[2:], "mlm.checkpoint_every=2"]
    out = tmp_path / "cli"
    sets = [a for o in micro_overrides(tmp_path, tiny_backbone, micro_data, prepared) + run + [f"mlm.output_dir={out}"]
            for a in ("-S", o)]
    cmd = [sys.executable, "-m", "pipeline", "pretrain-mlm", "--params", str(PARAMS), "--profile", "cpu", *sets]
    state = checkpoint_root(out) / "checkpoint" / "state.json"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["global_step"] >= 12:  # in epoch 2
                    break
            except (OSError, ValueError):
                pass  # not written yet, or being swapped in
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    from pipeline.cli import main

    assert main(cmd[3:]) == 0  # the same command again (in-process: spares a second torch import)

    reference = run_mlm(make_cfg(*run, f"mlm.output_dir={tmp_path / 'ref'}"))
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(reference))
    a, b = _weights(out), _weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint_root(out).exists()
