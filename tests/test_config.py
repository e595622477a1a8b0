import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from soho_ds.config import ConfigError, ShardSource, TrainConfig, load_config
from soho_ds.runtime.engine import (load_ds_config, param_groups, resolve_batch, resolve_precision,
                                    validate_ds_config)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load(synthetic_data, downstream, tmp_path):
    """Every shipped config passes validation once its data paths point at files that exist here,
    and states its image mode."""
    from conftest import downstream_paths

    backbone = tmp_path / "resnet18_concepts.pth"  # what tools/pretrain_backbone.py writes (make data)
    backbone.touch()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if "base" in tree:  # a recipe plus what it changes: its base states the rest
            base = yaml.safe_load((path.parent / tree["base"]).read_text())
            tree = {**base, **{k: {**base.get(k, {}), **v} if isinstance(v, dict) else v for k, v in tree.items()}}
        assert tree["data"]["image_mode"] in ("aspect", "square"), path
        task = (tree.get("task") or {}).get("name")
        if task:
            overrides = downstream_paths(task, downstream)
            assert set(tree.get("model") or {}) <= {"use_vd", "dropout"}, path  # the checkpoint carries the rest
        else:
            overrides = [f"data.train_shards={synthetic_data}/train", f"data.val_shards={synthetic_data}/val"]
        if (tree.get("model") or {}).get("backbone_weights"):
            assert tree["model"]["backbone_weights"] == "data/synthetic/resnet18_concepts.pth", path
            overrides.append(f"model.backbone_weights={backbone}")
        cfg = load_config(path, overrides)
        assert cfg.source == str(path) and cfg.task.name == (task or "")
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        ds = load_ds_config(path)
        validate_ds_config(resolve_batch(ds, 2, str(path)), str(path))
        assert ds["zero_optimization"]["stage"] == 2


def test_real_recipes_are_sohos():
    coco = load_config(ROOT / "configs/pretrain_coco_vg.yaml", ["data.train_shards=null"])
    assert (coco.data.image_mode, coco.data.shorter_side, coco.data.longer_side) == ("aspect", 600, 1000)
    assert coco.model.pool_last and coco.pretrain.mvm_unit == "pair" and coco.pretrain.mvm_prob == 0.015
    assert coco.train.cnn_optimizer == "sgd" and coco.train.cnn_lr_mult == 100
    vqa = load_config(ROOT / "configs/finetune_vqa.yaml", ["task.train_file=null", "task.train_answers=null",
                                                           "task.eval_file=/", "task.eval_answers=null",
                                                           "task.image_root=/"])
    assert vqa.data.train_shorter_sides == (400, 500, 600, 700, 800) and vqa.data.shorter_side == 600
    assert vqa.data.longer_side == 1000 and not vqa.model.use_vd and "{subtype}" in vqa.task.image_pattern
    # the schedule, budget and dictionary of the released config
    t = coco.train
    assert (t.max_steps, t.epochs, t.epoch_unit, t.lr_decay, t.lr_milestones) == (0, 40, "caption_groups", "multistep",
                                                                              (25, 35))
    assert (t.warmup_steps, round(t.warmup_factor, 4), t.lr_gamma, t.max_loss_scale) == (500, 0.3333, 0.1, 128)
    assert (coco.model.vd_variant, coco.model.vd_momentum, coco.data.captions_per_image) == ("official", 0.4, 4)
    # the heads and objectives of the official code
    assert (coco.model.pooling, coco.model.itm_bias, coco.model.gate) == ("raw_cls", False, "official")
    p = coco.pretrain
    assert (p.mvm_head, p.mvm_pairs, p.mlm_pairs, t.decay_norms_and_biases) == ("official", "all", "all", True)
    # VQA: SOHO's head, optimiser groups, clipping and schedule, trained on train + val
    shipped = yaml.safe_load((ROOT / "configs/finetune_vqa.yaml").read_text())["task"]
    assert [Path(f).name for f in shipped["train_file"]] == ["v2_OpenEnded_mscoco_train2014_questions.json",
                                                             "v2_OpenEnded_mscoco_val2014_questions.json"]
    assert len(shipped["train_answers"]) == 2 and shipped["eval_answers"] is None
    assert (vqa.task.head, vqa.task.head_dropout, vqa.task.num_answers) == ("soho", 0.5, 3129)
    v = vqa.train
    assert (v.epochs, v.lr_decay, v.lr_milestones, v.gradient_clipping) == (20, "multistep", (12, 16), 4.0)
    assert (v.lr, v.cnn_optimizer, v.cnn_lr_mult, v.cnn_momentum) == (1e-4, "sgd", 100, 0.9)


def test_a_recipes_clipping_replaces_the_deepspeed_jsons():
    from soho_ds.runtime.engine import with_gradient_clipping

    ds = load_ds_config(ROOT / "ds_configs/zero2.json")
    assert with_gradient_clipping(ds, None) == ds and ds["gradient_clipping"] == 10.0
    assert with_gradient_clipping(ds, 4.0) == {**ds, "gradient_clipping": 4.0} and ds["gradient_clipping"] == 10.0


def test_classifier_heads_are_the_modules_named(tmp_path):
    from torch import nn

    from soho_ds.config import CLASSIFIER_HEADS
    from soho_ds.models import heads

    assert CLASSIFIER_HEADS == heads.CLASSIFIER_HEADS  # the leaf config module lists the module's heads
    soho = heads.classifier_head("soho", 768, 768, 3129, 0.5)
    assert [type(m) for m in soho] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (soho[0].in_features, soho[0].out_features, soho[2].p, soho[3].out_features) == (768, 3072, 0.5, 3129)
    mlp = heads.classifier_head("mlp", 128, 64, 2)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features) == (128, 128)
    run = tmp_path / "run.yaml"
    run.write_text("task:\n  name: vqa\n  head: lstm\n")
    with pytest.raises(ConfigError, match=r"run.yaml: task.head must be one of \('mlp', 'soho'\), got 'lstm'"):
        load_config(run)


@pytest.mark.parametrize("task, text, message", [
    ("nlvr2", "  train_file: [a.json, b.json]\n", r"task.train_file: a list of files is read by the vqa task only"),
    ("vqa", "  train_file: [{q}, {q}]\n  train_answers: [{a}]\n",
     r"task.train_file lists 2 question files and task.train_answers 1 annotation files"),
    ("vqa", "  train_file: [{q}, {missing}]\n  train_answers: [{a}, {a}]\n",
     r"task.train_file path does not exist: .*/missing.json"),
])
def test_a_list_of_training_files_is_vqas_and_pairs_questions_with_answers(tmp_path, task, text, message):
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text("{}")
    a.write_text("{}")
    run = tmp_path / "run.yaml"
    run.write_text(f"task:\n  name: {task}\n  eval_file: {q}\n  image_root: {tmp_path}\n"
                   + text.format(q=q, a=a, missing=tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=message):
        load_config(run)


@pytest.mark.parametrize("text, message", [
    ("model:\n  backbone: resnet18\n  hiden_size: 64\n", r"run.yaml: model: unknown key\(s\) \['hiden_size'\]"),
    ("model:\n  num_layers: two\n", r"run.yaml: model.num_layers: expected int, got str"),
    ("model:\n  backbone: resnet19\n", r"run.yaml: model.backbone must be one of"),
    ("data:\n  crop_scale: [0.5]\n", r"run.yaml: data.crop_scale: expected a list of 2 values"),
    ("data:\n  image_mode: square\n  image_size: 100\n", r"run.yaml: data.image_size must be a multiple of 64, the "
                                                         r"CNN stride with model.pool_last"),
    ("model:\n  pool_last: true\ndata:\n  image_mode: square\n  image_size: 96\n", r"multiple of 64"),
    ("data:\n  image_mode: squashed\n", r"run.yaml: data.image_mode must be one of"),
    ("model:\n  gate: conv\n", r"run.yaml: model.gate must be one of \('linear', 'official'\)"),
    ("model:\n  pooling: max\n", r"run.yaml: model.pooling must be one of \('cls', 'raw_cls', 'mean'\)"),
    ("pretrain:\n  mvm_head: mlp\n", r"run.yaml: pretrain.mvm_head must be one of \('projected', 'official'\)"),
    ("pretrain:\n  mlm_pairs: some\n", r"run.yaml: pretrain.mlm_pairs must be one of \('matched', 'all'\)"),
    ("train:\n  epoch_unit: tokens\n", r"run.yaml: train.epoch_unit must be one of"),
    ("train:\n  warmup_ratio: 1.5\n", r"run.yaml: train.warmup_ratio must be in \[0, 1\)"),
    ("train:\n  gradient_clipping: -1\n", r"run.yaml: train.gradient_clipping must be at least 0"),
    ("data:\n  shorter_side: 600\n  longer_side: 500\n", r"run.yaml: data.longer_side must be at least"),
    ("pretrain:\n  mvm_unit: caption\n", r"run.yaml: pretrain.mvm_unit must be one of"),
    ("train:\n  cnn_optimizer: lamb\n", r"run.yaml: train.cnn_optimizer must be one of"),
    ("train:\n  warmup_steps: 50\n  max_steps: 10\n", r"run.yaml: train.warmup_steps must be in"),
    ("model:\n  bert_dir: /nonexistent/bert\n", r"run.yaml: model.bert_dir path does not exist"),
    ("model: [1, 2\n", r"run.yaml: not valid YAML"),
    ("optimizer:\n  lr: 1\n", r"run.yaml: top level: unknown key\(s\) \['optimizer'\]"),
    ("train:\n  lr: 1.0e-4\n  max_steps: 10\n  lr: 1.0e-3\n",
     r"run.yaml:4: 'lr' is given twice \(first at line 2\); keep one"),
    ("train:\n  lr: 1.0e-4\nmodel:\n  num_layers: 2\ntrain:\n  max_steps: 10\n",
     r"run.yaml:5: 'train' is given twice \(first at line 1\)"),
    ("train:\n  lr: .inf\n", r"run.yaml: train.lr: must be a finite number, got inf"),
    ("train:\n  cnn_lr_mult: .nan\n", r"run.yaml: train.cnn_lr_mult: must be a finite number, got nan"),
    ("train:\n  lr: 0\n", r"run.yaml: train.lr must be positive"),
    ("train:\n  max_steps: 0\n", r"run.yaml: train.max_steps must be positive, or 0 with train.epochs set"),
    ("train:\n  lr_decay: step\n", r"run.yaml: train.lr_decay must be one of"),
    ("train:\n  lr_decay: multistep\n  warmup_factor: 0.5\n", r"run.yaml: train.lr_milestones must list"),
    ("train:\n  lr_decay: multistep\n  lr_milestones: [50]\n", r"train.warmup_factor must be positive for a "
                                                                  r"multistep warm-up"),
    ("train:\n  lr_decay: linear\n  warmup_factor: 0.3\n", r"train.warmup_factor applies to lr_decay multistep"),
    ("train:\n  lr_decay: multistep\n  warmup_steps: 0\n  lr_milestones: [50, 20]\n",
     r"train.lr_milestones must be positive and increasing"),
    ("train:\n  lr_decay: multistep\n  warmup_steps: 0\n  lr_milestones: [2.5]\n",
     r"train.lr_milestones must be whole steps \(or set train.epochs"),
    ("train:\n  lr_decay: multistep\n  warmup_steps: 0\n  lr_milestones: [5]\n  lr_gamma: 0\n",
     r"train.lr_gamma must be in \(0, 1\]"),
    ("train:\n  lr: -1.0e-4\n", r"run.yaml: train.lr must be positive"),
    ("data:\n  train_shards: [a, {name: b, shards: b}]\n", r"run.yaml: data.train_shards: give every entry as a "
                                                           r"source \{name, shards, weight\} or none; paths \['a'\]"),
    ("data:\n  train_shards: [{name: b, shards: x}, {name: b, shards: y}]\n", r"source name 'b' is given twice"),
    ("data:\n  train_shards: [{name: cc 3m, shards: x}]\n", r"source name 'cc 3m' must be letters"),
    ("data:\n  train_shards: [{name: vg, shards: x, weight: -1}]\n", r"source 'vg' weight must be positive"),
    ("data:\n  train_shards: [{name: vg}]\n", r"source 'vg' names no shards"),
    ("data:\n  train_shards: [{name: vg, shard: x}]\n", r"data.train_shards: unknown key\(s\) \['shard'\]"),
])
def test_broken_config_is_refused_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_square_side_only_needs_stride_32_without_pool_last(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  pool_last: false\ndata:\n  image_mode: square\n  image_size: 96\n"))
    assert cfg.model.stride == 32 and cfg.data.image_size == 96


def test_overrides_pass_through_the_same_validation(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n  warmup_steps: 1\n")
    assert load_config(path, ["train.lr=2e-4", "model.num_layers=3"]).train.lr == 2e-4
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"train.lr: must be a finite number, got inf"):
        load_config(path, ["train.lr=.inf"])
    several = load_config(path, ["data.train_shards=[a, b]", "data.val_shards=c"])
    assert several.data.train_shards == ("a", "b") and several.data.val_shards == ("c",)
    assert several.data.train_sources == (ShardSource("train", ("a", "b"), 1.0),)
    mixed = load_config(path, ["data.train_shards=[{name: coco, shards: [c1, c2]}, {name: cc3m, shards: s3://b/cc, "
                               "weight: 0.5}]"])
    assert mixed.data.train_sources == (ShardSource("coco", ("c1", "c2"), 1.0),
                                        ShardSource("cc3m", ("s3://b/cc",), 0.5))
    assert mixed.data.train_paths == ("c1", "c2", "s3://b/cc")
    # the saved run config (plain mappings) reads back to the same sources
    from soho_ds.config import saved_run_config
    assert saved_run_config(mixed.to_dict(), "saved").data.train_sources == mixed.data.train_sources
    # a saved config is held to the same ranges as a YAML (its paths need not exist)
    broken = mixed.to_dict()
    broken["model"]["vd_momentum"] = 1.5
    with pytest.raises(ConfigError, match=r"saved: model.vd_momentum must be in \[0, 1\)"):
        saved_run_config(broken, "saved")


def test_a_model_saved_before_sohos_choices_were_the_defaults_loads_as_it_was_trained(tmp_path):
    """A run config written before model.pooling/itm_bias/gate/vd_variant existed was trained with the
    former defaults: it reads back with them (and its weights load), while a new config gets SOHO's."""
    from conftest import tiny_model_config
    from soho_ds.config import RunConfig, saved_run_config
    from soho_ds.models.soho import SohoModel

    fresh = RunConfig(model=tiny_model_config())
    assert (fresh.model.pooling, fresh.model.itm_bias, fresh.model.gate, fresh.model.vd_variant) == (
        "raw_cls", False, "official", "official")
    old = fresh.to_dict()
    for key in ("pooling", "itm_bias", "gate", "vd_variant"):
        del old["model"][key]
    read = saved_run_config(old, "old.yaml").model
    assert (read.pooling, read.itm_bias, read.gate, read.vd_variant) == ("cls", True, "linear", "soho_ds")
    trained = SohoModel(tiny_model_config(pooling="cls", gate="linear", vd_variant="soho_ds"))
    SohoModel(read).load_state_dict(trained.state_dict())  # strict: the same parameters and buffers
    # a finetune from it (--init) takes the same architecture
    finetune = load_config(write(tmp_path, "model:\n  dropout: 0.0\n"), checkpoint_config=(old, "old.yaml")).model
    assert (finetune.pooling, finetune.itm_bias, finetune.gate, finetune.vd_variant) == (
        "cls", True, "linear", "soho_ds")


def test_the_checkpoint_carries_the_model(tmp_path):
    """--init's run config supplies the architecture; a finetune YAML may change only the finetune
    keys; a contradiction is refused naming the key; weight sources are refused."""
    saved = {"model": {"backbone": "resnet18", "pool_last": False, "hidden_size": 64, "num_layers": 2,
                       "num_heads": 2, "intermediate_size": 128, "vd_size": 32, "use_vd": True, "dropout": 0.1,
                       "backbone_weights": "/somewhere/weights.pth", "bert_dir": "pkg:x/y"},
             "data": {"tokenizer_dir": None}}
    ckpt = (saved, "ckpt/run_config.yaml")
    ok = write(tmp_path, "model:\n  use_vd: false\n  dropout: 0.0\n  hidden_size: 64\n")
    cfg = load_config(ok, checkpoint_config=ckpt)
    m = cfg.model
    assert (m.backbone, m.hidden_size, m.num_layers, m.pool_last, m.vd_size) == ("resnet18", 64, 2, False, 32)
    assert not m.use_vd and m.dropout == 0.0  # the finetune's own choices
    assert m.backbone_weights is None and m.bert_dir is None  # the weights come from the checkpoint
    with pytest.raises(ConfigError, match=r"other.yaml: model.pool_last is True but the checkpoint was trained with "
                                          r"False \(ckpt/run_config.yaml\)"):
        load_config(write(tmp_path, "model:\n  pool_last: true\n", "other.yaml"), checkpoint_config=ckpt)
    with pytest.raises(ConfigError, match=r"model.hidden_size is 768"):
        load_config(ok, ["model.hidden_size=768"], checkpoint_config=ckpt)
    with pytest.raises(ConfigError, match=r"model.backbone_weights: the weights come from the checkpoint"):
        load_config(write(tmp_path, "model:\n  backbone_weights: /x.pth\n", "other.yaml"), checkpoint_config=ckpt)


def test_deepspeed_config_is_checked_by_deepspeeds_own_model_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        load_ds_config(write(tmp_path, "{broken", "ds.json"))
    with pytest.raises(ConfigError, match=r"ds.json: 'gradient_clipping' given twice in one object; keep one"):
        load_ds_config(write(tmp_path, '{"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, '
                                       '"gradient_clipping": 10.0}', "ds.json"))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is required"):
        load_ds_config(write(tmp_path, json.dumps({"train_batch_size": 8}), "ds.json"))
    with pytest.raises(ConfigError, match=r"ds.json: train_micro_batch_size_per_gpu must be a positive integer, "
                                          r"got '2'"):
        load_ds_config(write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": "2"}), "ds.json"))
    seven = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 7}}
    with pytest.raises(ConfigError, match=r"ds.json: DeepSpeed refuses this config"):
        validate_ds_config(resolve_batch(seven, 1, "ds.json"), "ds.json")
    wrong_type = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "fp16": {"enabled": True, "loss_scale_window": "often"}}
    with pytest.raises(ConfigError, match=r"ds.json: DeepSpeed refuses this config"):
        validate_ds_config(resolve_batch(wrong_type, 1, "ds.json"), "ds.json")
    stage3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match=r"zero_optimization.stage must be 1 or 2"):
        validate_ds_config(resolve_batch(stage3, 1, "ds.json"), "ds.json")


def test_global_batch_is_the_configured_one_at_every_world_size():
    ds = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 48}
    for world, accum in ((1, 12), (2, 6), (3, 4), (4, 3), (12, 1)):
        got = resolve_batch(ds, world, "ds.json")
        assert (got["train_batch_size"], got["gradient_accumulation_steps"]) == (48, accum)
    with pytest.raises(ConfigError, match=r"ds.json: train_batch_size 48 is not a multiple of micro-batch 4 x world "
                                          r"size 5"):
        resolve_batch(ds, 5, "ds.json")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 2 contradicts"):
        resolve_batch({**ds, "gradient_accumulation_steps": 2}, 2, "ds.json")
    # Without a global batch, DeepSpeed's own rule: it grows with the world.
    got = resolve_batch({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 3, "ds.json")
    assert (got["train_batch_size"], got["gradient_accumulation_steps"]) == (24, 2)


def test_precision_resolution():
    fp16 = {"fp16": {"enabled": True}}
    gpu = resolve_precision(fp16, "cuda")
    # buffers are never cast (BatchNorm statistics and the VD stay fp32)
    assert gpu["fp16"]["enabled"] and not gpu["bf16"]["enabled"] and "data_types" not in gpu
    cpu = resolve_precision(fp16, "cpu")
    assert not cpu["fp16"]["enabled"]  # never fp16 on the CPU: bf16 or fp32 by the CPU's instructions
    bf16 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    forced = resolve_precision(bf16, "cpu", "bf16")
    assert forced["bf16"]["enabled"] and forced["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = resolve_precision(bf16, "cuda", "fp32")
    # fp32 gradient accumulation belongs to bf16 parameters: DeepSpeed refuses it beside fp32 ones
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"] and fp32["data_types"] == {}


def _engine_lrs(cfg: TrainConfig, steps: int) -> list[float]:
    from soho_ds.runtime.dist import init_distributed
    from soho_ds.runtime.engine import build_engine

    init_distributed()
    model = torch.nn.Linear(2, 2)
    engine = build_engine(model, cfg, {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                                       "zero_optimization": {"stage": 2}})
    lrs = []
    for _ in range(steps):
        lrs.append(engine.get_lr()[0])
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()
    return lrs


def test_lr_schedule_is_transformers_warm_up_then_decay(world_of_one):
    lin = _engine_lrs(TrainConfig(lr=1.0, max_steps=10, warmup_steps=2, lr_decay="linear"), 10)
    assert lin == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    cos = _engine_lrs(TrainConfig(lr=1.0, max_steps=4, warmup_steps=0, lr_decay="cosine"), 4)
    assert cos == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    const = _engine_lrs(TrainConfig(lr=0.5, max_steps=4, warmup_steps=1, lr_decay="constant"), 4)
    assert const == pytest.approx([0.0, 0.5, 0.5, 0.5])


def test_multistep_schedule_warms_up_from_its_factor_and_steps_down_at_each_milestone(world_of_one):
    """SOHO's schedule (mmcv's linear warm-up from 1/3, x0.1 at each milestone) through the engine, against
    rates worked by hand: warm-up factor 1/3 + 2/3 * step/3 for three steps, then 1, x0.1 at steps 5 and 7."""
    cfg = TrainConfig(lr=1.0, max_steps=9, warmup_steps=3, warmup_factor=1 / 3, lr_decay="multistep",
                      lr_milestones=(5, 7), lr_gamma=0.1)
    assert _engine_lrs(cfg, 9) == pytest.approx([1 / 3, 5 / 9, 7 / 9, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert _engine_lrs(dataclasses.replace(cfg, warmup_steps=0), 6) == pytest.approx([1, 1, 1, 1, 1, 0.1])


def test_each_group_follows_the_schedule_from_its_own_rate_and_a_saved_schedule_resumes_exactly():
    from soho_ds.runtime.engine import build_scheduler

    cfg = TrainConfig(lr=1.0, max_steps=12, warmup_steps=4, warmup_factor=0.25, lr_decay="multistep",
                      lr_milestones=(6, 9), lr_gamma=0.5)

    def optimizer():
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 100.0},
                                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], lr=1.0)

    def factor(step):  # by hand: the warm-up line from 0.25 to 1 over 4 steps, halved at 6 and at 9
        return (0.25 + 0.75 * min(step, 4) / 4) * 0.5 ** sum(step >= m for m in (6, 9))

    opt = optimizer()
    schedule = build_scheduler(opt, cfg)
    rates = []
    for step in range(12):
        rates.append([g["lr"] for g in opt.param_groups])
        if step == 5:
            saved = schedule.state_dict()
        opt.step()
        schedule.step()
    assert rates == [pytest.approx([100 * factor(s), factor(s)]) for s in range(12)]
    opt2 = optimizer()
    resumed = build_scheduler(opt2, cfg)
    resumed.load_state_dict(saved)
    for group, rate in zip(opt2.param_groups, rates[5]):
        group["lr"] = rate  # the optimizer's own state carries its rates (DeepSpeed restores both)
    after = []
    for _ in range(6, 12):
        opt2.step()
        resumed.step()
        after.append([g["lr"] for g in opt2.param_groups])
    assert after == [pytest.approx(r) for r in rates[6:]]


def test_a_budget_in_epochs_becomes_steps_of_the_global_batch():
    """SOHO's 40 epochs with steps at 25 and 35: an epoch is the training set over the global batch."""
    cfg = TrainConfig(max_steps=0, epochs=40, warmup_steps=10, warmup_factor=1 / 3, lr_decay="multistep",
                      lr_milestones=(25, 35))
    steps = cfg.in_steps(samples=1000, global_batch=64, source="run.yaml")
    assert (steps.max_steps, steps.lr_milestones, steps.epochs) == (625, (391.0, 547.0), 0.0)  # 15.625 per epoch
    assert cfg.in_steps(1000, 64, "run.yaml") == steps and steps.in_steps(None, 64, "run.yaml") == steps
    given = dataclasses.replace(cfg, max_steps=100).in_steps(1000, 64, "run.yaml")
    assert given.max_steps == 100 and given.lr_milestones == (391.0, 547.0)  # an explicit budget wins
    with pytest.raises(ConfigError, match=r"run.yaml: train.epochs needs the size of the training set"):
        cfg.in_steps(None, 64, "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: train.warmup_steps 10 is more than the run's 7 steps"):
        cfg.in_steps(samples=10, global_batch=64, source="run.yaml")  # 40 epochs of 10 images at 64: 7 steps
    # ViLT's warm-up: a tenth of the run, whichever way the budget is given
    vilt = TrainConfig(max_steps=0, epochs=10, warmup_steps=100, warmup_ratio=0.1, lr_decay="linear")
    assert vilt.in_steps(1000, 64, "run.yaml").warmup_steps == 16  # 157 steps
    assert TrainConfig(max_steps=2000, warmup_ratio=0.1).in_steps(None, 64, "run.yaml").warmup_steps == 200


def test_param_groups_give_the_cnn_and_the_heads_their_multipliers_and_skip_decay_on_norms():
    from conftest import tiny_model_config
    from soho_ds.config import PretrainConfig
    from soho_ds.pretrain.model import SohoPretrainer

    model = SohoPretrainer(tiny_model_config(), PretrainConfig(itc_weight=1.0))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-4, cnn_lr_mult=10.0, head_lr_mult=5.0,
                                                                     decay_norms_and_biases=False))}
    assert groups["cnn"]["lr"] == pytest.approx(1e-3) and groups["transformer"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(5e-4)
    assert groups["transformer_no_decay"]["weight_decay"] == 0.0
    assert {g["optimizer"] for g in groups.values()} == {"adamw"}
    head = {id(p) for g in ("head", "head_no_decay") for p in groups[g]["params"]}
    heads = (model.mlm_head, model.itm_head, model.mvm_head, model.itc_head)
    tied = {id(model.model.word_embeddings.weight)}  # the MLM decoder is the word embedding
    assert head == {id(p) for h in heads for p in h.parameters()} - tied
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable
    sgd = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-4, cnn_optimizer="sgd", cnn_lr_mult=100.0))}
    assert sgd["cnn"]["optimizer"] == "sgd" and sgd["cnn"]["weight_decay"] == 1e-4 and sgd["cnn"]["lr"] == 1e-2
    assert sgd["transformer"]["optimizer"] == "adamw" and sgd["transformer"]["weight_decay"] == 0.01


def _reference_step(reference, x, clip):
    reference(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)


def test_engine_optimizer_is_torchs_fused_adamw_and_matches_it_step_for_step(world_of_one):
    """ZeRO-2 runs the client AdamW over flat partitions; with the fused kernel (one pass instead of
    ~8 over memory) its update must still equal plain torch AdamW + norm clipping on the
    unflattened parameters (clipping stated: DeepSpeed clips at 1.0 when the JSON says nothing)."""
    import copy

    from soho_ds.runtime.dist import init_distributed
    from soho_ds.runtime.engine import build_engine

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, lr_decay="constant", weight_decay=0.1)
    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
          "gradient_clipping": 0.5}
    engine = build_engine(model, cfg, ds)
    assert all(g["fused"] for g in engine.optimizer.optimizer.param_groups)
    ref_opt = torch.optim.AdamW(param_groups(reference, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).square().mean())
        engine.step()
        ref_opt.zero_grad()
        _reference_step(reference, x, 0.5)
        ref_opt.step()
    for p, q in zip(engine.module.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _TwoPart(torch.nn.Module):
    """A 'backbone' (SGD in SOHO's recipe) and a 'fusion' part (AdamW), as param_groups sees names."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
        self.fusion = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.fusion(self.backbone(x))


def test_sgd_for_the_cnn_and_adamw_for_the_rest_match_plain_torch_step_for_step(world_of_one):
    """SOHO's optimizer recipe under one ZeRO-2 client optimizer equals torch.optim.SGD (momentum,
    weight decay, 100x lr) on the CNN plus torch.optim.AdamW on the rest, step for step."""
    import copy

    from soho_ds.runtime.dist import init_distributed
    from soho_ds.runtime.engine import SGDAdamW, build_engine

    init_distributed()
    torch.manual_seed(0)
    model = _TwoPart()
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, lr_decay="constant", cnn_optimizer="sgd", cnn_lr_mult=100.0,
                      cnn_momentum=0.9, cnn_weight_decay=1e-4, weight_decay=0.01)
    engine = build_engine(model, cfg, {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
                                       "zero_optimization": {"stage": 2}, "gradient_clipping": 10.0})
    assert isinstance(engine.basic_optimizer, SGDAdamW)
    groups = param_groups(reference, cfg)
    sgd = torch.optim.SGD([g for g in groups if g["optimizer"] == "sgd"], lr=0.1, momentum=0.9)
    adamw = torch.optim.AdamW([g for g in groups if g["optimizer"] == "adamw"], lr=1e-3, betas=cfg.betas,
                              eps=cfg.eps)
    for step in range(4):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).square().mean())
        engine.step()
        sgd.zero_grad()
        adamw.zero_grad()
        _reference_step(reference, x, 10.0)
        sgd.step()
        adamw.step()
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    state = engine.basic_optimizer.state_dict()["state"]
    assert {"momentum_buffer"} <= {k for s in state.values() for k in s} and {"exp_avg"} <= {k for s in
                                                                                              state.values() for k in s}


def test_each_parts_rate_follows_the_schedule_times_its_multiplier(world_of_one):
    """What the console and TensorBoard show as lr (the transformer's: train.lr's schedule) and the CNN's
    and heads' rates beside it."""
    from soho_ds.runtime.dist import init_distributed
    from soho_ds.runtime.engine import build_engine, part_rates

    class Parts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.backbone, self.model.fusion = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 1)

        def forward(self, x):
            return self.head(self.model.fusion(self.model.backbone(x)))

    init_distributed()
    cfg = TrainConfig(lr=1.0, max_steps=4, warmup_steps=2, lr_decay="linear", cnn_lr_mult=10.0, head_lr_mult=5.0)
    engine = build_engine(Parts(), cfg, {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                                         "zero_optimization": {"stage": 2}})
    seen = []
    for _ in range(3):
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()
        seen.append(part_rates(engine))
    assert seen == [pytest.approx({"cnn": 5.0, "transformer": 0.5, "head": 2.5}),
                    pytest.approx({"cnn": 10.0, "transformer": 1.0, "head": 5.0}),
                    pytest.approx({"cnn": 5.0, "transformer": 0.5, "head": 2.5})]


def test_an_epoch_of_caption_groups_counts_each_image_once_per_group_of_its_captions(tmp_path):
    """SOHO's epoch walks every image's captions 4 at a time: images with 1, 5 and 9 captions are 1 + 2 + 3
    groups. The counts come from the shard indexes; an index without them is refused, naming the fix."""
    from PIL import Image

    from soho_ds.data.convert import write_shards
    from soho_ds.data.shards import index_shards, list_shards, read_record, record_path
    from soho_ds.data.sources import Record
    from soho_ds.pretrain.task import check_shards

    records = []
    for i, n in enumerate((1, 5, 9)):
        Image.new("RGB", (64, 48), (60 * i, 90, 120)).save(tmp_path / f"{i}.jpg")
        records.append(Record(f"img{i}", str(tmp_path / f"{i}.jpg"), [f"caption {k} of image {i}" for k in range(n)]))
    write_shards(records, tmp_path / "shards", {"source": "test"}, samples_per_shard=2, workers=1, progress=False)
    sets = [f"data.train_shards={tmp_path}/shards", "data.val_shards=null", "model.backbone_weights=null",
            "train.max_steps=0", "train.epochs=40", "train.warmup_steps=1"]
    by_group = check_shards(load_config(ROOT / "configs/pretrain_synthetic.yaml",
                                        sets + ["train.epoch_unit=caption_groups"]))["train"][0]
    assert (by_group.samples, by_group.caption_groups) == (3, 6)
    assert check_shards(load_config(ROOT / "configs/pretrain_synthetic.yaml", sets))["train"][0].caption_groups is None

    first = list_shards(str(tmp_path / "shards"))[0]
    record = read_record(first)
    del record["captions"]  # an index written before the counts existed
    Path(record_path(first)).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"data.train_shards: train.epoch_unit caption_groups counts each sample's "
                                          r"captions .* index them again with soho-index-shards"):
        check_shards(load_config(ROOT / "configs/pretrain_synthetic.yaml", sets + ["train.epoch_unit=caption_groups"]))
    index_shards(str(tmp_path / "shards"))
    assert check_shards(load_config(ROOT / "configs/pretrain_synthetic.yaml",
                                    sets + ["train.epoch_unit=caption_groups"]))["train"][0].caption_groups == 6


def test_a_config_with_a_base_is_the_base_with_its_own_keys_laid_over(tmp_path):
    semantic = load_config(ROOT / "configs/pretrain_coco_vg_semantic.yaml", ["data.train_shards=null"])
    recipe = load_config(ROOT / "configs/pretrain_coco_vg.yaml", ["data.train_shards=null"])
    assert dataclasses.replace(semantic, semantic=recipe.semantic, source=recipe.source,
                               train=dataclasses.replace(semantic.train, output_dir=recipe.train.output_dir)) == recipe
    s = semantic.semantic
    assert (s.object_weight, s.attribute_weight, s.feature_weight, s.num_objects, s.num_attributes) == (1, 1, 1, 1600,
                                                                                                      400)
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel:\n  hidden_size: 64\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base a.yaml leads back to itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config file not found: .*missing.yaml"):
        load_config(tmp_path / "c.yaml")
