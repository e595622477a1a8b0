import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from soho_ds.config import ModelConfig  # noqa: E402


def pytest_collection_modifyitems(items):
    """A test that builds an engine in this process (the world_of_one fixture, directly or through a
    trained-model fixture) trains: it is slow, and `make test-fast` leaves it out."""
    for item in items:
        if "world_of_one" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_config(**overrides) -> ModelConfig:
    """The smallest SOHO that exercises every part: ResNet-18, 2 BERT layers, K=32."""
    values = dict(backbone="resnet18", pool_last=False, hidden_size=64, num_layers=2, num_heads=2,
                  intermediate_size=128, vd_size=32, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """120 train images in 3 shards (+5 malformed samples, one of each kind), 40 val images in 1 shard;
    shorter side 64 px, a third of them 4:3 or 3:4."""
    from soho_ds.synthetic.shards import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, num_train=120, num_val=40, samples_per_shard=42, image_size=64, seed=3, malformed=5,
                 non_square=0.35)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from soho_ds.data.text import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def downstream(tmp_path_factory) -> Path:
    """Synthetic retrieval / VQA / NLVR2 / SNLI-VE sets in the real formats: 160 train, 40 eval images."""
    from soho_ds.synthetic.downstream import make_downstream

    out = tmp_path_factory.mktemp("downstream")
    make_downstream(out, num_train=160, num_eval=40, image_size=64, seed=5, non_square=0.35)
    return out


def downstream_paths(task: str, root: Path) -> list[str]:
    """--set overrides pointing a task config's files at the synthetic set under `root`."""
    files = {
        "retrieval": {"train_file": "retrieval/dataset_synthetic.json", "eval_file": "retrieval/dataset_synthetic.json"},
        "vqa": {"train_file": "vqa/questions_train.json", "train_answers": "vqa/annotations_train.json",
                "eval_file": "vqa/questions_val.json", "eval_answers": "vqa/annotations_val.json"},
        "nlvr2": {"train_file": "nlvr2/train.json", "eval_file": "nlvr2/dev.json"},
        "snli_ve": {"train_file": "snli_ve/snli_ve_train.jsonl", "eval_file": "snli_ve/snli_ve_dev.jsonl"},
    }[task]
    return [f"task.{k}={root / v}" for k, v in files.items()] + [f"task.image_root={root / 'images'}"]


@pytest.fixture(scope="session")
def world_of_one():
    """This pytest process as a world of one (gloo), for in-process engine and finetune tests. DeepSpeed
    caches its groups, so the world is made once per session; at the end it is destroyed and the
    distributed environment variables are restored, so nothing is left behind."""
    import torch.distributed as dist

    from soho_ds.runtime.dist import init_distributed

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    info = init_distributed()
    yield info
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


GROUNDED_STEPS = 80  # SOHO's objectives pass held-out ITM 0.7 by step 80 on every seed (docs/grounding.md)


@pytest.fixture(scope="session")
def grounded(tmp_path_factory, world_of_one):
    """`make demo`'s pretraining on its own smaller world, in this process (one rank: the multi-rank
    path is proven by test_pretrain_distributed / test_scale_out): the synthetic shards, the stand-in
    CNN (tools/pretrain_backbone.py's, trained at 64 px instead of 96: half the time, held-out ITM 0.750
    at step 80 against 0.771), configs/pretrain_synthetic.yaml as shipped with
    ds_configs/zero2_cpu_demo.json, for GROUNDED_STEPS of its 120 steps (its rate is constant after
    the warm-up); and a downstream set to finetune on. Shared by every test that needs a trained model."""
    import time

    import torch

    from soho_ds.pretrain.run import pretrain
    from soho_ds.synthetic.backbone import train_concept_classifier
    from soho_ds.synthetic.downstream import make_downstream
    from soho_ds.synthetic.shards import make_dataset

    root = tmp_path_factory.mktemp("grounding")
    t0 = time.time()
    make_dataset(root / "shards", num_train=1200, num_val=200, samples_per_shard=200, image_size=128, seed=0,
                 non_square=0.3)
    make_downstream(root / "downstream", num_train=160, num_eval=20, image_size=128, seed=12, non_square=0.3)
    state, report = train_concept_classifier(f"{root}/shards/train", f"{root}/shards/val", image_size=64)
    torch.save(state, root / "resnet18_concepts.pth")
    run = root / "pretrain"
    metrics = pretrain(ROOT / "configs" / "pretrain_synthetic.yaml", ROOT / "ds_configs" / "zero2_cpu_demo.json",
                       overrides=[f"data.train_shards={root}/shards/train", f"data.val_shards={root}/shards/val",
                                  f"model.backbone_weights={root}/resnet18_concepts.pth", f"train.output_dir={run}",
                                  f"train.max_steps={GROUNDED_STEPS}", "train.eval_every=40"])
    return {"root": root, "run": run, "checkpoint": run / "checkpoints", "concepts": report, "metrics": metrics,
            "downstream": root / "downstream", "seconds": time.time() - t0}


RETRIEVAL_STEPS = 15  # rsum 452 here against 156 from random initialisation (test_grounding.py)


@pytest.fixture(scope="session")
def grounded_retrieval(grounded, tmp_path_factory):
    """The retrieval finetune from the grounded pretraining (make demo's, RETRIEVAL_STEPS long): its
    final metrics and its run folder."""
    from launching import finetune_in_process

    out = tmp_path_factory.mktemp("grounded_retrieval")
    metrics = finetune_in_process("retrieval", "finetune_retrieval_synthetic.yaml", grounded["downstream"], out,
                                  steps=RETRIEVAL_STEPS, init=grounded["checkpoint"], sets=["train.warmup_steps=4"])
    return {"metrics": metrics, "run": out / "run", "checkpoint": out / "run" / "checkpoints"}


@pytest.fixture(scope="session")
def grounded_vqa(grounded, tmp_path_factory):
    """The VQA finetune from the grounded pretraining (configs/finetune_vqa_synthetic.yaml, 40 steps: 47.9
    against the text-only prior's 37.2 here)."""
    from launching import finetune_in_process

    out = tmp_path_factory.mktemp("grounded_vqa")
    metrics = finetune_in_process("vqa", "finetune_vqa_synthetic.yaml", grounded["downstream"], out, steps=40,
                                  init=grounded["checkpoint"], sets=["train.warmup_steps=6"])
    return {"metrics": metrics, "run": out / "run", "checkpoint": out / "run" / "checkpoints"}


FINETUNE_FROM_SCRATCH = ["model.backbone=resnet18", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
                         "model.intermediate_size=128", "model.vd_size=32", "model.bert_dir=null",
                         "model.backbone_weights=null", "model.pool_last=false", "model.freeze_stem=false",
                         "model.dropout=0.0", "data.shorter_side=64", "data.longer_side=96", "data.max_text_len=20",
                         "train.warmup_steps=5", "train.log_every=10", "train.lr=1e-3", "train.head_lr_mult=1"]


@pytest.fixture(scope="session")
def classifier_runs(downstream, tmp_path_factory, world_of_one):
    """The NLVR2 and SNLI-VE drivers from random initialisation with the tiny model, 50 steps, each run
    once for every test that needs it (its learning: test_finetune.py; load_model's agreement with it:
    test_inference.py). task -> {"metrics", "run"}."""
    from launching import finetune_in_process

    runs = {}

    def run(task: str) -> dict:
        if task not in runs:
            out = tmp_path_factory.mktemp(task)
            metrics = finetune_in_process(task, f"finetune_{task}_synthetic.yaml", downstream, out, 50,
                                          FINETUNE_FROM_SCRATCH)
            runs[task] = {"metrics": metrics, "run": out / "run"}
        return runs[task]

    return run
