import pytest

from conftest import PARAMS
from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_precedence_defaults_profile_experiment_override():
    cfg = load_config(PARAMS, experiment="baseline", profile="cpu", overrides=["train.lr=3e-4"])
    assert cfg.name == "baseline"
    assert cfg.train.batch_size == 16          # from the cpu profile
    assert cfg.train.lr == pytest.approx(3e-4)  # the override wins, "3e-4" parsed as a number
    assert cfg.model.backbone == "embedded"


def test_paper_profile_is_the_papers_setting():
    cfg = load_config(PARAMS, profile="paper")
    assert (cfg.model.backbone, cfg.train.batch_size, cfg.train.epochs) == ("bert-base-uncased", 8, 25)
    assert cfg.train.lr == pytest.approx(1e-5) and cfg.model.dropout == pytest.approx(0.3)


def test_extensions_map_to_config(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("experiments:\n  all:\n    extensions: [relu, cos, loop, gn, mlm]\n")
    cfg = load_config(params, experiment="all")
    assert cfg.model.heads == "relu" and cfg.model.sts_head == "cos"
    assert cfg.train.schedule == "loop" and cfg.train.balancer == "gradnorm"
    assert cfg.model.init_from == cfg.mlm.output_dir == "models/mlm"
    # The mlm extension follows mlm.output_dir, wherever it points.
    moved = load_config(params, experiment="all", overrides=["mlm.output_dir=elsewhere/mlm"])
    assert moved.model.init_from == "elsewhere/mlm"


@pytest.mark.parametrize("override, needle", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("train.gn_alpha=-0.5", "train.gn_alpha"),
    ("train.balancer=magic", "train.balancer"),
    ("model.heads=deep", "model.heads"),
    ("train.lrr=1", "train.lrr"),
    ("nosection=1", "nosection"),
    ("train.epochs=two", "train.epochs"),
])
def test_bad_params_name_the_parameter(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, overrides=[override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_experiment_profile_and_extension(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        load_config(PARAMS, experiment="nope")
    with pytest.raises(ConfigError, match="unknown profile 'gpu9'"):
        load_config(PARAMS, profile="gpu9")
    params = tmp_path / "p.yaml"
    params.write_text("experiments:\n  x:\n    extensions: [warp]\n")
    with pytest.raises(ConfigError, match="unknown extension 'warp'"):
        load_config(params, experiment="x")


def test_invalid_yaml_names_file_and_line(tmp_path):
    params = tmp_path / "bad.yaml"
    params.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(params)
