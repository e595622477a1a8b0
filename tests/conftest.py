import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from soho_ds.runtime.config import ModelConfig  # noqa: E402


def _sweep_orphaned_deepspeed_shm():
    """Runs of DeepSpeed's CPU backend from before soho_ds unlinked them (runtime/dist.py) left 66 MB
    a rank in /dev/shm; on a reused machine they add up to all its RAM. Removes this user's that no
    live process maps."""
    shm = Path("/dev/shm")
    stale = set(shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            stale -= {p for p in stale if str(p) in maps.read_text()}
        except OSError:  # the process ended or is not ours to read
            continue
    for p in stale:
        p.unlink(missing_ok=True)


_sweep_orphaned_deepspeed_shm()


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
    """120 train images in 3 shards (+3 malformed samples), 40 val images in 1 shard, 64 px."""
    from soho_ds.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, num_train=120, num_val=40, samples_per_shard=41, image_size=64, seed=3, malformed=3)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from soho_ds.data.text import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def downstream(tmp_path_factory) -> Path:
    """Synthetic retrieval / VQA / NLVR2 / SNLI-VE sets in the real formats: 160 train, 40 eval images."""
    from soho_ds.data.synthetic import make_downstream

    out = tmp_path_factory.mktemp("downstream")
    make_downstream(out, num_train=160, num_eval=40, image_size=64, seed=5)
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
