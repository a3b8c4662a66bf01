"""The packaged small pretrained BERT: loads offline and takes a real train step."""
import numpy as np
import pytest
import torch

from pipeline.data import collate, load_split
from pipeline.model import build_model, load_tokenizer, resolve_backbone

pytestmark = pytest.mark.slow


def test_embedded_backbone_train_step(make_cfg, prepared):
    cfg = make_cfg("model.backbone=embedded")
    assert resolve_backbone("embedded").endswith("model")
    model = build_model(cfg.model, ["sst", "para", "sts"])
    assert model.bert.config.hidden_size == 384 and model.bert.config.num_hidden_layers == 6
    assert len(load_tokenizer("embedded")) == 30522
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    data = load_split(prepared, "sts", "train")  # prepared with the same bert-base-uncased vocabulary
    batch = collate(data, np.arange(8), 0)
    loss = model.loss("sts", batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.weight)


def test_unknown_backbone_offline_is_clear(make_cfg):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="model.backbone='no-such-org/no-such-model'"):
        build_model(make_cfg("model.backbone=no-such-org/no-such-model").model, ["sst"])
