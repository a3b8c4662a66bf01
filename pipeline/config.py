"""One typed config, composed from params.yaml, a profile, an experiment and overrides.

Order of precedence (later wins): dataclass defaults < params.yaml blocks < the
selected profile < the experiment's `set` block < command-line `key=value` overrides.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.tasks import MULTITASK as TASKS  # noqa: E402
from pipeline.tasks import TASKS as _REGISTRY  # noqa: E402

SENTIMENT_TASKS = tuple(t.name for t in _REGISTRY.values() if t.num_classes)
ALL_TASKS = tuple(_REGISTRY)
# The paper's extension switches and the config changes each stands for.
EXTENSIONS = {
    "relu": {"model.heads": "relu"},
    "cos": {"model.sts_head": "cos"},
    "loop": {"train.schedule": "loop"},
    "gn": {"train.balancer": "gradnorm"},
    "pcg": {"train.balancer": "pcgrad"},
    "mlm": {"model.init_from": "${mlm.output_dir}"},  # resolved by load_config: follows mlm.output_dir
}


def _help(text: str, default: Any, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


_CHOICES: dict[str, tuple] = {}  # "section.field" -> allowed values, recorded by _choice (see allowed_values)


def _choice(section: str, name: str, value: Any, allowed) -> None:
    _CHOICES[f"{section}.{name}"] = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class DataConfig:
    data_dir: str = _help("folder holding the CS224N task files; empty: $MINBERT_DATA_DIR, else download", "")
    cache_dir: str = _help("where downloaded official files are cached", "data/raw")
    prepared_dir: str = _help("output of the prepare stage (validated, tokenised data)", "data/prepared")
    prefix_dir: str = _help("output of the cache stage: frozen-prefix states per backbone and model.freeze_layers",
                            "data/prefix")
    max_length: int = _help("tokens kept per sentence, [CLS] and [SEP] included", 128)
    strict: bool = _help("treat any bad data row as fatal instead of skipping and reporting it", False)
    limit: int = _help("keep only the first N valid rows of every file (0: all); for micro runs", 0)

    def __post_init__(self):
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} must be at least 8")
        if self.limit < 0:
            raise ConfigError(f"data.limit={self.limit} must be >= 0")


@dataclass
class ModelConfig:
    backbone: str = _help("'embedded' (the packaged MiniLM), a HF model id such as bert-base-uncased, "
                          "or a local path", "embedded")
    pooling: str = _help("sentence embedding: pooler (paper: pooled [CLS]), cls (raw [CLS] state) or mean", "pooler")
    dropout: float = _help("dropout on the sentence embedding before every head", 0.3)
    heads: str = _help("linear (paper baseline) or relu (MLP heads, the ReLU extension)", "linear")
    relu_widths: list = _help("hidden widths of the ReLU heads (paper: 256, 64)", [256, 64])
    sts_head: str = _help("concat (linear on [e1;e2], baseline) or cos (cosine of e1, e2: the Cos extension)", "concat")
    cos_target: str = _help("what the Cos head's cosine is regressed on: signed (labels 0..5 -> [-1, 1], the paper) "
                            "or unit (labels -> [0, 1], sentence-transformers' practice: "
                            "unrelated pairs stay orthogonal)",
                            "signed")
    para_head: str = _help("concat (bi-encoder, paper) or cross ([CLS] s1 [SEP] s2 cross-encoder)", "concat")
    pair_features: str = _help("input of the bi-encoder pair heads: concat ([e1;e2], the paper) or "
                               "sbert ([e1;e2;|e1-e2|;e1*e2], Sentence-BERT's classifier features)", "concat")
    mode: str = _help("finetune (all weights train) or pretrain (backbone frozen, heads only)", "finetune")
    freeze_layers: int = _help("partial fine-tuning: the embeddings and the lower k encoder layers stay frozen "
                               "and their outputs come from the prefix cache "
                               "(0: every layer trains, the paper's setting)", 0)
    init_from: str = _help("directory of a further-pretrained backbone (the pretrain-mlm output); empty: none", "")

    def __post_init__(self):
        _choice("model", "pooling", self.pooling, ("pooler", "cls", "mean"))
        _choice("model", "heads", self.heads, ("linear", "relu"))
        _choice("model", "sts_head", self.sts_head, ("concat", "cos"))
        _choice("model", "para_head", self.para_head, ("concat", "cross"))
        _choice("model", "cos_target", self.cos_target, ("signed", "unit"))
        _choice("model", "pair_features", self.pair_features, ("concat", "sbert"))
        _choice("model", "mode", self.mode, ("finetune", "pretrain"))
        if self.freeze_layers < 0:
            raise ConfigError(f"model.freeze_layers={self.freeze_layers} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must lie in [0, 1)")
        if not self.relu_widths or any((not isinstance(w, int)) or w <= 0 for w in self.relu_widths):
            raise ConfigError(f"model.relu_widths={self.relu_widths} must be a non-empty list of positive integers")
        if not self.backbone:
            raise ConfigError("model.backbone is empty: name 'embedded', a model id or a path")


@dataclass
class TrainConfig:
    tasks: list = _help("tasks trained together: sst, para, sts (multitask) "
                        "or one of sst / cfimdb (sentiment only)", list(TASKS))
    schedule: str = _help("baseline (every task sampled to the STS train size per epoch) "
                          "or loop (to the SST train size)", "baseline")
    epoch_fraction: float = _help("scale of the per-epoch sample size (1.0 = the paper's; cpu profile uses less)", 1.0)
    min_epoch_steps: int = _help("at least this many steps per epoch (small tasks such as CFIMDB are repeated, "
                                 "as Loop does; 0: none)", 0)
    balancer: str = _help("how task losses/gradients combine: sum, gradnorm, pcgrad, "
                          "or a torchjd aggregator (upgrad, mgda, cagrad, ...)", "sum")
    gn_alpha: float = _help("GradNorm asymmetry alpha", 1.0)
    gn_lr: float = _help("learning rate of the GradNorm task weights", 0.025)
    lr: float = _help("AdamW learning rate", 1e-5)
    head_lr: float = _help("AdamW learning rate of the task heads (0: train.lr); "
                           "heads start from random, the backbone does not", 0.0)
    lr_schedule: str = _help("learning-rate schedule over the whole run: constant (the paper), linear or cosine decay "
                             "(transformers' schedulers)", "constant")
    warmup_ratio: float = _help("share of the run's steps over which the lr rises linearly from 0 (0: none)", 0.0)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    batch_size: int = _help("examples per task per step", 8)
    epochs: int = _help("training epochs", 25)
    seed: int = _help("seed of sampling, dropout and initialisation", 11711)
    device: str = _help("auto, cpu or cuda", "auto")
    precision: str = _help("auto (bf16 autocast where the device does bf16 natively: a GPU, or a CPU with AVX-512 BF16 "
                           "or AMX; fp32 elsewhere), fp32 or bf16; master weights stay fp32", "auto")
    eval_limit: int = _help("dev examples per task scored after each epoch (0: all)", 0)
    checkpoint_every: int = _help("also checkpoint every N steps inside an epoch (0: only at epoch ends)", 0)
    on_nonfinite: str = _help("stop (fail the run) or skip (drop the batch) when a task loss is NaN/inf", "stop")
    threads: int = _help("CPU threads for torch (0: torch's default)", 0)

    def __post_init__(self):
        _choice("train", "schedule", self.schedule, ("baseline", "loop"))
        _choice("train", "on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        _choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        if not self.tasks or any(t not in ALL_TASKS for t in self.tasks):
            raise ConfigError(f"train.tasks={self.tasks} must name tasks from {', '.join(ALL_TASKS)}")
        if len(self.tasks) > 1 and sorted(self.tasks) != sorted(TASKS):
            raise ConfigError(f"train.tasks={self.tasks}: multitask training takes exactly sst, para, sts")
        _choice("train", "lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.head_lr < 0:
            raise ConfigError(f"train.head_lr={self.head_lr} must be >= 0 (0: the same as train.lr)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must lie in [0, 1)")
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size={self.batch_size} must be > 0")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs={self.epochs} must be > 0")
        if self.gn_alpha < 0:
            raise ConfigError(f"train.gn_alpha={self.gn_alpha} must be >= 0")
        if self.gn_lr <= 0:
            raise ConfigError(f"train.gn_lr={self.gn_lr} must be > 0")
        if not 0 < self.epoch_fraction <= 100:
            raise ConfigError(f"train.epoch_fraction={self.epoch_fraction} must lie in (0, 100]")
        if self.eval_limit < 0 or self.checkpoint_every < 0 or self.threads < 0 or self.min_epoch_steps < 0:
            raise ConfigError("train.eval_limit, train.checkpoint_every, train.threads and train.min_epoch_steps "
                              "must be >= 0")
        from pipeline.balancers import known_balancers  # late: balancers imports torch

        if self.balancer not in known_balancers():
            raise ConfigError(
                f"train.balancer={self.balancer!r} is unknown; choose from {', '.join(known_balancers())}"
            )


@dataclass
class MLMConfig:
    epochs: int = _help("epochs of masked-LM pretraining on SST train sentences", 25)
    lr: float = _help("AdamW learning rate of MLM pretraining", 1e-3)
    batch_size: int = _help("sentences per MLM step", 8)
    mask_prob: float = _help("share of non-special tokens chosen for prediction", 0.15)
    seed: int = _help("seed of masking and dropout", 11711)
    fraction: float = _help("share of SST train sentences used per epoch (1.0: all)", 1.0)
    tie_decoder: bool = _help("the head's vocabulary layer reuses the word embeddings "
                              "(BERT practice; false: a fresh layer)", True)
    output_dir: str = _help("where the further-pretrained backbone is saved", "models/mlm")
    checkpoint_every: int = _help("checkpoint every N steps inside an epoch (0: epoch ends only)", 0)

    def __post_init__(self):
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"mlm.mask_prob={self.mask_prob} must lie in (0, 1)")
        if self.lr <= 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ConfigError("mlm.lr, mlm.batch_size and mlm.epochs must be > 0")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"mlm.fraction={self.fraction} must lie in (0, 1]")


@dataclass
class EvalConfig:
    dev_limit: int = _help("dev examples per task scored by the evaluate stage "
                           "(0: all; the cpu profile scores a fixed prefix)", 0)
    batch_size: int = _help("sentences per evaluation batch", 64)
    test_predictions: bool = _help("also write CS224N test-set prediction files "
                                   "(Table 3 copies the best row's; without them it says they are missing)", True)

    def __post_init__(self):
        if self.dev_limit < 0 or self.batch_size <= 0:
            raise ConfigError("eval.dev_limit must be >= 0 and eval.batch_size > 0")


# The shared data folder beside a checkout (../shared/data/cs224n): the data module reads the task
# files there when it holds its SHA256SUMS and neither data.data_dir nor $MINBERT_DATA_DIR names a
# folder. Here, torch-free, so that the CLI's pre-flight checks see the same path.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cs224n"

STUDY = "study"  # <runs_dir>/study/<experiment>/s<seed>: the DVC study's runs, all the report reads
ADHOC = "adhoc"  # <runs_dir>/adhoc/...: `train -S ...` runs, whose config differs from params.yaml


def study_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / STUDY


@dataclass
class TrackingConfig:
    runs_dir: str = _help("root of the run folders: the study's in <runs_dir>/study (what the report reads), "
                          "ad-hoc runs with -S overrides in <runs_dir>/adhoc, sweeps and quality runs beside them",
                          "runs")
    wandb: bool = _help("log to Weights & Biases (offline without an API key)", False)
    wandb_project: str = _help("W&B project name", "minbert-multitask")


@dataclass
class Config:
    name: str = _help("experiment name (the run folder is runs/study/<name>/s<seed>)", "default")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        """The study's folder for this experiment and seed (dvc.yaml writes the same path)."""
        return study_dir(self.tracking.runs_dir) / self.name / f"s{self.train.seed}"

    @property
    def adhoc_run_dir(self) -> Path:
        """Where a run with command-line overrides goes by default: never over a study run."""
        return Path(self.tracking.runs_dir) / ADHOC / self.name / f"s{self.train.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def multitask(self) -> bool:
        return len(self.train.tasks) > 1


SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "mlm": MLMConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a value against the type of the field's default; ints pass as floats."""
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:  # YAML 1.1 reads "2e-5" as a string
            value = float(value) if isinstance(default, float) else int(value)
        except ValueError:
            pass
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return value
    return value


def _set(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if key == "name":
        tree["name"] = value
        return
    if len(parts) != 2 or parts[0] not in SECTION_CLASSES:
        raise ConfigError(f"unknown parameter '{key}' "
                          f"(expected <section>.<field>, sections: {', '.join(SECTION_CLASSES)})")
    section, name = parts
    known = {f.name: f for f in fields(SECTION_CLASSES[section])}
    if name not in known:
        raise ConfigError(f"unknown parameter '{key}'; {section} has {', '.join(known)}")
    tree.setdefault(section, {})[name] = _coerce(key, value, _default(known[name]))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def field_default(key: str) -> Any:
    """The dataclass default of `section.field` (a ConfigError for an unknown key)."""
    section, _, name = key.partition(".")
    known = {f.name: f for f in fields(SECTION_CLASSES[section])} if section in SECTION_CLASSES else {}
    if name not in known:
        raise ConfigError(f"unknown parameter '{key}'")
    return _default(known[name])


def flatten(block: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists stay values."""
    out = {}
    for k, v in (block or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def experiment_overrides(params: dict, experiment: str) -> dict:
    """The flat overrides an experiment stands for: its extensions, then its explicit `set` block."""
    experiments = params.get("experiments") or {}
    if experiment not in experiments:
        raise ConfigError(f"unknown experiment '{experiment}'; params.yaml defines {', '.join(experiments) or 'none'}")
    spec = experiments[experiment] or {}
    out: dict = {}
    for ext in spec.get("extensions") or []:
        if ext not in EXTENSIONS:
            raise ConfigError(f"experiments.{experiment}.extensions: unknown extension '{ext}' "
                              f"(known: {', '.join(EXTENSIONS)})")
        out.update(EXTENSIONS[ext])
    out.update(flatten(spec.get("set") or {}))
    return out


def experiment_seeds(params: dict, experiment: str) -> list[int]:
    """The seeds an experiment is trained under: `seeds`, plus `extra_seeds` for train_groups.seeded."""
    seeds = list(params.get("seeds") or [TrainConfig.seed])
    if experiment in ((params.get("train_groups") or {}).get("seeded") or []):
        seeds += [s for s in params.get("extra_seeds") or [] if s not in seeds]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds / extra_seeds must be lists of integers (got {seeds!r})")
    return seeds


PROFILE_SECTIONS = ("data", "model", "train", "eval", "mlm")


def check_study(params: dict) -> list[str]:
    """What would break dvc.yaml: an experiment in no or the wrong train_groups list (each in exactly
    one; those with the mlm extension in `mlm`), a missing `extensions`/`set`, a profile without one
    of the sections the stages depend on."""
    problems = [f"profiles.{name}.{section} is missing (DVC stages depend on it; use {{}})"
                for name, spec in (params.get("profiles") or {}).items()
                for section in PROFILE_SECTIONS if section not in (spec or {})]
    experiments = params.get("experiments") or {}
    groups = params.get("train_groups") or {}
    seen: dict[str, str] = {}
    for name in groups.get("seeded") or []:  # also trained under extra_seeds, from the plain backbone
        if name not in (groups.get("backbone") or []):
            problems.append(f"train_groups.seeded: '{name}' must also be in train_groups.backbone")
    for group, names in groups.items():
        if group == "seeded":
            continue
        for name in names or []:
            if name not in experiments:
                problems.append(f"train_groups.{group}: '{name}' is not an experiment")
            elif name in seen:
                problems.append(f"train_groups: '{name}' is in both {seen[name]} and {group}")
            seen[name] = group
    for name, spec in experiments.items():
        wants = "mlm" if "mlm" in ((spec or {}).get("extensions") or []) else "backbone"
        if name not in seen:
            if (spec or {}).get("rows"):  # a paper row the study would miss; others (quality, ad hoc) are fine
                problems.append(f"experiments.{name} is in no train_groups list (DVC never trains it)")
            continue
        elif seen[name] != wants:
            problems.append(f"experiments.{name} belongs in train_groups.{wants}, not {seen[name]}")
        for key in ("extensions", "set"):
            if key not in (spec or {}):
                problems.append(f"experiments.{name}.{key} is missing (its DVC stages depend on it; use [] or {{}})")
        unknown = set((spec or {}).get("extensions") or []) - set(EXTENSIONS)
        if unknown:
            problems.append(f"experiments.{name}.extensions: unknown {sorted(unknown)}")
    return problems


def load_config(
    params_path: str | Path | None = "params.yaml",
    experiment: str | None = None,
    overrides: list[str] | dict | None = None,
    profile: str | None = None,
) -> Config:
    """Compose the typed config; every problem is a one-line ConfigError naming the parameter."""
    params = read_params(params_path) if params_path else {}
    problems = check_study(params) if params.get("experiments") and params.get("train_groups") else []
    # Before anything trains, not at report time. What only DVC needs (an experiment in a
    # train_groups list, with `extensions` and `set` keys) is a warning: the CLI trains it anyway;
    # an unknown extension fails when that experiment is loaded (experiment_overrides).
    dvc_only = ("in no train_groups list", ".extensions is missing", ".set is missing", ".extensions: unknown")
    for problem in [p for p in problems if any(k in p for k in dvc_only)]:
        logging.getLogger(__name__).warning("%s: %s", params_path, problem)
    problems = [p for p in problems if not any(k in p for k in dvc_only)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{params_path}: {problems[0]}{more}")
    flat: dict[str, Any] = {}
    for section in SECTION_CLASSES:
        flat.update(flatten({section: params.get(section) or {}}))
    if isinstance(overrides, dict):
        override_items = list(overrides.items())
    else:
        override_items = [parse_override(o) for o in (overrides or [])]
    profile = (profile or dict(override_items).get("profile") or os.environ.get("MINBERT_PROFILE")
               or params.get("profile"))
    if profile:
        profiles = params.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(f"unknown profile '{profile}'; params.yaml defines {', '.join(profiles) or 'none'}")
        flat.update(flatten(profiles[profile] or {}))
    if experiment:
        flat.update(experiment_overrides(params, experiment))
        flat["name"] = experiment
    for key, value in override_items:
        if key != "profile":
            flat[key] = value
    for key, value in list(flat.items()):  # "${section.field}": another parameter's final value
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            flat[key] = flat[value[2:-1]] if value[2:-1] in flat else field_default(value[2:-1])
    tree: dict = {}
    for key, value in flat.items():
        _set(tree, key, value)
    try:
        sections = {name: cls(**tree.get(name, {})) for name, cls in SECTION_CLASSES.items()}
    except TypeError as err:  # pragma: no cover - _set already checks names
        raise ConfigError(str(err)) from None
    return Config(name=str(tree.get("name", "default")), **sections)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (run records, checkpoints)."""
    return Config(name=d.get("name", "default"), **{k: cls(**d[k]) for k, cls in SECTION_CLASSES.items() if k in d})


# ---------------------------------------------------------------- listings: `python -m pipeline params`, `train -e`


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as `python -m pipeline params` lists it."""

    key: str
    type: str
    default: Any
    value: Any  # after params.yaml's blocks and the profile
    allowed: str
    help: str


def allowed_values(key: str) -> str:
    """What `section.field` accepts beyond its type, as text; '' when any value of its type passes
    (ranges of numbers are checked, and named, when a value is loaded)."""
    if key not in _CHOICES:  # each section's __post_init__ records its choice fields through _choice
        for cls in SECTION_CLASSES.values():
            cls()
    if key in _CHOICES:
        return ", ".join(map(str, _CHOICES[key]))
    if key == "train.balancer":
        from pipeline.balancers import known_balancers  # late: balancers imports torch

        return ", ".join(known_balancers())
    if key == "train.tasks":
        return f"[{', '.join(TASKS)}], or one of {', '.join(ALL_TASKS)}"
    return "true, false" if isinstance(field_default(key), bool) else ""


def param_infos(params_path: str | Path | None = None, profile: str | None = None) -> tuple[list[ParamInfo], str]:
    """Every `section.field` with its type, default, allowed values and help, and its value after
    `params_path`'s blocks and `profile` (default: the file's `profile` key); also what that value
    column stands for ('' without a params file)."""
    cfg = load_config(params_path, profile=profile) if params_path else None
    if params_path:
        chosen = profile or os.environ.get("MINBERT_PROFILE") or read_params(params_path).get("profile")
        source = f"{params_path} with profile {chosen}" if chosen else str(params_path)
    else:
        source = ""
    infos = []
    for section, cls in SECTION_CLASSES.items():
        for f in fields(cls):
            key = f"{section}.{f.name}"
            default = _default(f)
            infos.append(ParamInfo(key=key, type=str(f.type), default=default,
                                   value=getattr(getattr(cfg, section), f.name) if cfg else default,
                                   allowed=allowed_values(key), help=f.metadata.get("help", "")))
    return infos, source


def yaml_text(value: Any) -> str:
    """A value as one would write it in params.yaml or after -S."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def text_table(header: list[str], rows: list[list[str]], wrap: dict[int, int] | None = None) -> str:
    """Plain-text columns; a cell's lines are its own ("\\n"), and those of column i wrap at wrap[i] characters."""
    wrap = wrap or {}

    def lines(i: int, cell: str) -> list[str]:
        return [w for part in cell.split("\n") for w in (textwrap.wrap(part, wrap[i]) or [""] if i in wrap else [part])]

    cells = [[lines(i, c) for i, c in enumerate(row)] for row in [header, *rows]]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]
    out = []
    for row in cells:
        for j in range(max(len(c) for c in row)):
            out.append("  ".join((c[j] if j < len(c) else "").ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(out)


def _fit(header: list[str], rows: list[list[str]], width: int | None, shares: dict[int, float]) -> dict[int, int]:
    """Wrap widths for the columns in `shares` so that the table fits `width` (None: no wrapping)."""
    if not width:
        return {}
    fixed = sum(max(len(r[c]) for r in [header, *rows]) for c in range(len(header)) if c not in shares)
    room = max(width - fixed - 2 * (len(header) - 1), 20 * len(shares))
    return {c: max(12, int(room * share)) for c, share in shares.items()}


def params_table(section: str | None = None, params_path: str | Path | None = None,
                 profile: str | None = None, width: int | None = None) -> str:
    """`python -m pipeline params [SECTION]`: the keys of SECTION (all sections, or one `section.field`)
    with type, default, the value params.yaml and the profile give where it differs, allowed values and
    help; one line per key, or wrapped to `width` characters."""
    if section:
        part, _, name = section.partition(".")
        if part not in SECTION_CLASSES:
            raise ConfigError(f"unknown section '{part}'; sections: {', '.join(SECTION_CLASSES)}")
        known = [f.name for f in fields(SECTION_CLASSES[part])]
        if name and name not in known:
            raise ConfigError(f"unknown parameter '{section}'; {part} has {', '.join(known)}")
    infos, source = param_infos(params_path, profile)
    infos = [i for i in infos if not section or i.key == section or i.key.startswith(f"{section}.")]
    differs = any(i.value != i.default for i in infos)
    header = ["KEY", "TYPE", "DEFAULT", *(["VALUE"] if differs else []), "ALLOWED", "HELP"]
    rows = [[i.key, i.type, yaml_text(i.default),
             *([yaml_text(i.value) if i.value != i.default else ""] if differs else []), i.allowed, i.help]
            for i in infos]
    table = text_table(header, rows, _fit(header, rows, width, {len(header) - 2: 0.3, len(header) - 1: 0.7}))
    if differs:
        note = f"VALUE: what {source} gives, where it differs from the default"
    else:
        note = f"{source} leaves every value listed at its default" if source else "defaults of pipeline/config.py"
    return (f"{table}\n\n{note}\nset one: -S KEY=VALUE on a stage's command line, or in params.yaml "
            "(default < params.yaml < profile < experiment < -S)")


def experiments_table(params_path: str | Path = "params.yaml", width: int | None = None) -> str:
    """`python -m pipeline experiments` / `train -e`: each experiment of the params file with its
    extensions, `set` overrides, seeds and the paper rows it fills."""
    params = read_params(params_path)
    experiments = params.get("experiments") or {}
    if not experiments:
        return f"{params_path} defines no experiments"
    rows = []
    for name, spec in experiments.items():
        spec = spec or {}
        sets = "\n".join(f"{k}={yaml_text(v)}" for k, v in flatten(spec.get("set") or {}).items())
        paper = "\n".join(f"Table {r.get('table')}: {r.get('label')}" for r in spec.get("rows") or []
                          if isinstance(r, dict))
        rows.append([name, " ".join(spec.get("extensions") or []) or "-", sets or "-",
                     " ".join(map(str, experiment_seeds(params, name))), paper])
    header = ["EXPERIMENT", "EXTENSIONS", "SET", "SEEDS", "PAPER ROW"]
    extensions = "; ".join(f"{ext}: {', '.join(f'{k}={v}' for k, v in over.items())}"
                           for ext, over in EXTENSIONS.items())
    return (f"{text_table(header, rows, _fit(header, rows, width, {4: 1.0}))}\n\n"
            f"extensions: {extensions}\n"
            "train one: python -m pipeline train -e NAME (to runs/NAME/s<seed>); "
            "every parameter: python -m pipeline params")
