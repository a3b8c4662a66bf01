"""Shared fixtures: a tiny random BERT, micro task files the tests write themselves, and the
real params.yaml composed and shrunk to them (no separate test config)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"

WORDS = ("good bad great awful movie film plot actor boring fun dull sharp witty slow fast "
         "question answer how what why best way learn python money time people world").split()


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


def write_micro_data(folder: Path, rows: int = 40, seed: int = 0) -> Path:
    """CS224N-format files of `rows` synthetic rows each (tab-separated, the official headers)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def sentiment(name, classes, labelled=True):
        lines = ["\tid\tsentence\tsentiment" if labelled else "0\t\tid\tsentence"]
        for i in range(rows):
            if labelled:
                lines.append(f"{i}\t{name}{i:05d}\t{_sentence(rng)}\t{rng.randrange(classes)}")
            else:
                lines.append(f"{i + 1}\t{float(i)}\t{name}t{i:05d}\t{_sentence(rng)}")
        return "\n".join(lines) + "\n"

    def pairs(name, label_col, score, labelled=True):
        header = "\tid\tsentence1\tsentence2" + (f"\t{label_col}" if labelled else "")
        lines = [header]
        for i in range(rows):
            row = f"{i}\t{name}{i:05d}\t{_sentence(rng)}\t{_sentence(rng)}"
            if labelled:
                row += f"\t{round(rng.uniform(0, 5), 1) if score else float(rng.randrange(2))}"
            lines.append(row)
        return "\n".join(lines) + "\n"

    files = {
        "ids-sst-train.csv": sentiment("sst", 5), "ids-sst-dev.csv": sentiment("sstd", 5),
        "ids-sst-test-student.csv": sentiment("sst", 5, labelled=False),
        "ids-cfimdb-train.csv": sentiment("cf", 2), "ids-cfimdb-dev.csv": sentiment("cfd", 2),
        "ids-cfimdb-test-student.csv": sentiment("cf", 2, labelled=False),
        "quora-train.csv": pairs("q", "is_duplicate", False), "quora-dev.csv": pairs("qd", "is_duplicate", False),
        "sts-train.csv": pairs("s", "similarity", True), "sts-dev.csv": pairs("sd", "similarity", True),
        "sts-test-student.csv": pairs("st", "similarity", True, labelled=False),
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def make_tiny_backbone(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with the embedded model's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from pipeline.model import load_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    load_tokenizer("embedded").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    return write_micro_data(tmp_path_factory.mktemp("micro-data"))


def micro_overrides(tmp: Path, backbone: Path, data_dir: Path, prepared: Path | None = None) -> list[str]:
    return [
        f"data.data_dir={data_dir}", f"data.prepared_dir={prepared or tmp / 'prepared'}", "data.max_length=32",
        f"model.backbone={backbone}", "model.relu_widths=[16, 8]", f"tracking.runs_dir={tmp / 'runs'}",
        "train.batch_size=4", "train.epochs=2", "train.epoch_fraction=0.5", "train.lr=1e-3", "train.eval_limit=0",
        "train.device=cpu", "train.threads=1", f"mlm.output_dir={tmp / 'mlm'}", "mlm.epochs=1", "mlm.batch_size=4",
        # the cpu profile's partial fine-tuning and sizes undone: tests opt in to the prefix cache
        "model.freeze_layers=0", "train.min_epoch_steps=0", "train.head_lr=0", "eval.dev_limit=0",
        f"data.prefix_dir={tmp / 'prefix'}",
    ]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_backbone, micro_data) -> Path:
    """Micro data prepared once with the tiny backbone's tokenizer."""
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare

    tmp = tmp_path_factory.mktemp("prepared-root")
    cfg = load_config(PARAMS, overrides=micro_overrides(tmp, tiny_backbone, micro_data), profile="cpu")
    run_prepare(cfg)
    return Path(cfg.data.prepared_dir)


@pytest.fixture
def make_cfg(tmp_path, tiny_backbone, micro_data, prepared):
    """The real params.yaml, shrunk to the tiny model and micro data; extra overrides on top."""
    from pipeline.config import load_config

    def make(*overrides: str, experiment: str | None = None):
        return load_config(PARAMS, experiment=experiment, profile="cpu",
                           overrides=micro_overrides(tmp_path, tiny_backbone, micro_data, prepared) + list(overrides))

    return make
