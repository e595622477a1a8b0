import json
from pathlib import Path

import pytest

from soho_ds.runtime.config import ConfigError, load_config, load_ds_config, resolve_batch
from soho_ds.runtime.engine import lr_factor, param_groups, resolve_precision
from soho_ds.runtime.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load(synthetic_data, downstream, tmp_path):
    """Every shipped config passes validation once its data paths point at files that exist here."""
    import yaml

    from conftest import downstream_paths

    backbone = tmp_path / "resnet18_concepts.pth"  # what tools/pretrain_backbone.py writes (make data)
    backbone.touch()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        task = (tree.get("task") or {}).get("name")
        if task:
            overrides = downstream_paths(task, downstream)
        else:
            overrides = [f"data.train_shards={synthetic_data}/train", f"data.val_shards={synthetic_data}/val"]
        if tree["model"].get("backbone_weights"):
            assert tree["model"]["backbone_weights"] == "data/synthetic/resnet18_concepts.pth", path
            overrides.append(f"model.backbone_weights={backbone}")
        cfg = load_config(path, overrides)
        assert cfg.source == str(path) and cfg.task.name == (task or "")
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        assert load_ds_config(path)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("text, message", [
    ("model:\n  backbone: resnet18\n  hiden_size: 64\n", r"run.yaml: model: unknown key\(s\) \['hiden_size'\]"),
    ("model:\n  num_layers: two\n", r"run.yaml: model.num_layers: expected int, got str"),
    ("model:\n  backbone: resnet19\n", r"run.yaml: model.backbone must be one of"),
    ("data:\n  crop_scale: [0.5]\n", r"run.yaml: data.crop_scale: expected a list of 2 values"),
    ("data:\n  image_size: 100\n", r"run.yaml: data.image_size must be a multiple of 32"),
    ("train:\n  warmup_steps: 50\n  max_steps: 10\n", r"run.yaml: train.warmup_steps must be in"),
    ("data:\n  train_shards: /nonexistent/shards\n", r"run.yaml: data.train_shards matches no .tar file"),
    ("model:\n  bert_dir: /nonexistent/bert\n", r"run.yaml: model.bert_dir path does not exist"),
    ("model: [1, 2\n", r"run.yaml: not valid YAML"),
    ("optimizer:\n  lr: 1\n", r"run.yaml: top level: unknown key\(s\) \['optimizer'\]"),
])
def test_broken_config_is_refused_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_overrides_pass_through_the_same_validation(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n  warmup_steps: 1\n")
    assert load_config(path, ["train.lr=2e-4", "model.num_layers=3"]).train.lr == 2e-4
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["train.lrr=1e-4"])


def test_deepspeed_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        load_ds_config(write(tmp_path, "{broken", "ds.json"))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is required"):
        load_ds_config(write(tmp_path, json.dumps({"train_batch_size": 8}), "ds.json"))



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
    assert gpu["fp16"]["enabled"] and not gpu["bf16"]["enabled"] and gpu["data_types"]["buffer_dtype"] == "fp16"
    cpu = resolve_precision(fp16, "cpu")
    assert not cpu["fp16"]["enabled"]  # never fp16 on the CPU: bf16 or fp32 by the CPU's instructions
    forced = resolve_precision(fp16, "cpu", "bf16")
    assert forced["bf16"]["enabled"] and forced["data_types"]["buffer_dtype"] == "bf16"
    fp32 = resolve_precision(fp16, "cuda", "fp32")
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"] and "buffer_dtype" not in fp32["data_types"]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr_decay="linear")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0)
    cos = TrainConfig(max_steps=100, warmup_steps=0, lr_decay="cosine")
    assert lr_factor(50, cos) == pytest.approx(0.5)


def test_param_groups_give_the_cnn_and_the_heads_their_multipliers_and_skip_decay_on_norms():
    from conftest import tiny_model_config
    from soho_ds.pretrain.model import SohoPretrainer
    from soho_ds.runtime.config import PretrainConfig

    model = SohoPretrainer(tiny_model_config(), PretrainConfig(itc_weight=1.0))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-4, cnn_lr_mult=10.0, head_lr_mult=5.0))}
    assert groups["cnn"]["lr"] == pytest.approx(1e-3) and groups["transformer"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(5e-4)
    assert groups["transformer_no_decay"]["weight_decay"] == 0.0
    head = {id(p) for g in ("head", "head_no_decay") for p in groups[g]["params"]}
    heads = (model.mlm_head, model.itm_head, model.mvm_head, model.itc_head)
    tied = {id(model.model.fusion.word_embeddings.weight)}  # the MLM decoder is the word embedding
    assert head == {id(p) for h in heads for p in h.parameters()} - tied
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable


def test_engine_optimizer_is_torchs_fused_adamw_and_matches_it_step_for_step():
    """ZeRO-2 runs the client AdamW over flat partitions; with the fused kernel (one pass instead of
    ~8 over memory) its update must still equal plain torch AdamW + norm clipping on the
    unflattened parameters (clipping stated: DeepSpeed clips at 1.0 when the JSON says nothing)."""
    import copy

    import torch

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
        reference(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
    for p, q in zip(engine.module.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
