"""The packaged small pretrained BERT: loads offline and takes a real train step."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig

from pipeline.data import collate, load_split
from pipeline.model import build_model, load_tokenizer, resolve_backbone

pytestmark = pytest.mark.slow


def test_embedded_backbone_train_step(make_cfg, prepared):
    cfg = make_cfg("model.backbone=embedded")
    # the packaged folder holds a real 6-layer, 384-wide BERT and its bert-base-uncased tokenizer
    config = AutoConfig.from_pretrained(resolve_backbone("embedded"))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)
    tokenizer = load_tokenizer("embedded")
    assert len(tokenizer) == 30522
    ids = tokenizer("A gripping, beautifully acted film.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a gripping, beautifully acted film."
    model = build_model(cfg.model, ["sst", "para", "sts"])
    assert model.bert.config.hidden_size == 384 and model.bert.config.num_hidden_layers == 6
    # pretrained, not random, weights: a paraphrase embeds closer than an unrelated sentence
    with torch.no_grad():
        enc = tokenizer(["a good movie", "a great film", "the stock market fell"], padding=True, return_tensors="pt")
        states = model.bert.eval()(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1)
        emb = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    model.train()
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
