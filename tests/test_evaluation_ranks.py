"""Evaluation on any number of ranks: every held-out sample is scored exactly once whatever the split
(counts that do not divide, fewer samples than ranks), and the figures equal those of one rank.

Each case runs the real task's `evaluate` (its readers, DALI decoders, rank slices and collectives)
in 1, 2 and 3 gloo processes. The module is a stand-in whose output for a sample depends only on
that sample's decoded image and text, so the exact figure over all samples is known from one rank
and from the data itself."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import ROOT, downstream_paths, free_port
from soho_ds.config import load_config
from soho_ds.data.shards import list_shards, sample_sizes
from soho_ds.runtime.dist import DistInfo

pytestmark = pytest.mark.slow  # 1, 2 and 3 gloo processes per case


class PretrainStandIn(nn.Module):
    """acc/itm of a batch = the mean valid width of its images; acc/mlm = their mean valid height."""

    def forward(self, batch):
        sizes = batch["image_sizes"].float()
        return {"acc/itm": sizes[:, 1].mean(), "acc/mlm": sizes[:, 0].mean()}


class ClassifierStandIn(nn.Module):
    """Right (the labelled class, VQA's best-scored answer) where the image's red channel sums above the
    mean colour and the text has an even number of tokens, or neither; wrong (the next class) elsewhere."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def logits(self, batch):
        truth = batch["labels"] if "labels" in batch else batch["targets"].argmax(1)
        bright = batch["images"][:, 0].flatten(1).sum(1) > 0
        even = batch["attention_mask"].sum(1) % 2 == 0
        pred = torch.where(bright == even, truth, (truth + 1) % self.num_classes)
        return nn.functional.one_hot(pred, self.num_classes).float()


class SizeEncoder(nn.Module):
    def encode_image(self, images, sizes):
        return sizes


class SizeScorer(nn.Module):
    def score_all(self, model, visual, input_ids, attention_mask, chunk=None):
        return visual[:, 1].float()[:, None] * 1000 + attention_mask.sum(1).float()[None, :]


class RetrievalStandIn(nn.Module):
    """ITM score of a pair = the image's valid width x 1000 + the caption's token count."""

    def __init__(self):
        super().__init__()
        self.model, self.itm_head = SizeEncoder(), SizeScorer()


# (case, split root, examples kept): pretraining held-out splits of 5 and 2 samples (micro-batch 2:
# no rank count divides 5; 2 is fewer than 3 ranks), task splits cut to counts that do not divide.
CASES = [("pretrain", "held_out5", 0), ("pretrain", "held_out2", 0), ("vqa", "downstream", 5),
         ("vqa", "downstream", 2), ("snli_ve", "downstream", 7), ("retrieval", "downstream", 5),
         ("pretrain_retrieval", "held_out5", 0)]


def _task_and_module(case: str, root: str, keep: int, info: DistInfo, out: str):
    if case == "pretrain_retrieval":  # the real tiny model, the same weights on every rank; square images
        from launching import TINY_MODEL  # (no padding, so an image's scores do not depend on its batch)
        from soho_ds.pretrain.model import SohoPretrainer
        from soho_ds.pretrain.task import PretrainTask

        cfg = load_config(ROOT / "configs" / "pretrain_synthetic.yaml", TINY_MODEL + [
            f"data.train_shards={root}/train", "data.val_shards=null", f"data.retrieval_shards={root}/val",
            "data.image_mode=square", "data.image_size=64", "train.retrieval_rerank=2"])
        torch.manual_seed(0)
        return PretrainTask(cfg, info, 2, stride=32), SohoPretrainer(cfg.model, cfg.pretrain).eval()
    if case == "pretrain":
        from soho_ds.pretrain.task import PretrainTask

        cfg = load_config(ROOT / "configs" / "pretrain_synthetic.yaml",
                          [f"data.train_shards={root}/train", f"data.val_shards={root}/val",
                           "data.shorter_side=32", "data.longer_side=48", "train.eval_batches=100",
                           "model.bert_dir=null", "model.backbone_weights=null"])
        return PretrainTask(cfg, info, 2, stride=32), PretrainStandIn()
    from soho_ds.tasks import TASKS

    config = {"vqa": "finetune_vqa_synthetic.yaml", "snli_ve": "finetune_snli_ve_synthetic.yaml",
              "retrieval": "finetune_retrieval_synthetic.yaml"}[case]
    cfg = load_config(ROOT / "configs" / config, downstream_paths(case, Path(root)) + [
        "model.bert_dir=null", "model.backbone_weights=null", f"train.output_dir={out}"])
    task = TASKS[case](cfg, info, 2)
    if case == "vqa":
        task.eval_questions = task.eval_questions[:keep]
        return task, ClassifierStandIn(len(task.vocab))
    if case == "snli_ve":
        task.eval_examples = task.eval_examples[:keep]
        return task, ClassifierStandIn(3)
    task.eval_images_list = task.eval_images_list[:keep]
    return task, RetrievalStandIn()


def _evaluate(rank: int, world: int, port: int, roots: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    try:
        results = []
        for i, (case, root, keep) in enumerate(CASES):
            task, module = _task_and_module(case, roots[root], keep, info, f"{out}/run{world}_{i}")
            results.append(task.evaluate(module, torch.device("cpu"), torch.float32))
        with open(f"{out}/{world}_{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def evaluations(downstream, tmp_path_factory):
    """{world size: [per rank: [metrics of each of CASES]]} for 1, 2 and 3 ranks, and the split roots."""
    from soho_ds.data.shards import index_shards
    from soho_ds.synthetic.shards import make_dataset

    out = tmp_path_factory.mktemp("evaluations")
    roots = {"downstream": str(downstream)}
    for n in (5, 2):
        root = out / f"held_out{n}"
        make_dataset(root, num_train=12, num_val=n, samples_per_shard=42, image_size=40, seed=8, non_square=0.5)
        index_shards(f"{root}/val")
        index_shards(f"{root}/train")
        roots[f"held_out{n}"] = str(root)
    results = {}
    for world in (1, 2, 3):
        mp.start_processes(_evaluate, args=(world, free_port(), roots, str(out)), nprocs=world, start_method="spawn")
        results[world] = [json.loads((out / f"{world}_{r}.json").read_text()) for r in range(world)]
    return results, roots


@pytest.mark.parametrize("case", [0, 1])
def test_pretraining_evaluation_scores_every_held_out_sample_once_on_1_2_and_3_ranks(evaluations, case):
    from soho_ds.data.pipeline import ImageSpec, ShardLoader

    results, roots = evaluations
    val = f"{roots[CASES[case][1]]}/val"
    # the reference: each held-out sample decoded alone, its valid size read
    spec = ImageSpec(mode="aspect", shorter_side=32, longer_side=48)
    sizes = torch.cat([b.image_sizes for b in ShardLoader(val, 1, spec, train=False, num_threads=1,
                                                          device="cpu").epochs()]).float()
    assert len(sizes) == len(sample_sizes(list_shards(val))[0])
    assert len({tuple(s) for s in sizes.tolist()}) > 1  # the figure tells samples apart
    expected = {"acc/itm": sizes[:, 1].mean().item(), "acc/mlm": sizes[:, 0].mean().item()}
    for world, per_rank in results.items():
        for rank, metrics in enumerate(per_rank):
            assert metrics[case] == pytest.approx(expected, rel=1e-6), (world, rank)


def test_retrieval_while_pretraining_is_the_same_on_1_2_and_3_ranks(evaluations):
    """Each rank encodes its slice of the held-out images; the ITC first stage and the ITM rerank meet
    across ranks: every image and caption is ranked once and the recall is that of one rank."""
    results, roots = evaluations
    one = results[1][0][6]
    import tarfile

    captions = 0
    for shard in list_shards(f"{roots['held_out5']}/val"):
        with tarfile.open(shard) as tar:
            captions += sum(len(json.load(tar.extractfile(m))["captions"]) for m in tar if m.name.endswith(".json"))
    assert one["retrieval/images"] == 5.0 and one["retrieval/captions"] == captions
    assert one["retrieval/rsum"] == pytest.approx(sum(one[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i")
                                                      for k in (1, 5, 10)))
    for world, per_rank in results.items():
        for rank, metrics in enumerate(per_rank):
            assert metrics[6] == pytest.approx(one, rel=1e-6), (world, rank)


@pytest.mark.parametrize("case", [2, 3, 4, 5])
def test_task_evaluation_is_the_same_on_1_2_and_3_ranks(evaluations, case):
    """Task evaluations slice their examples by rank: with counts that do not divide (and fewer
    examples than ranks) the metric is that of one rank, over exactly the examples kept."""
    results, _ = evaluations
    name, _, keep = CASES[case]
    one = results[1][0][case]
    count = {"vqa": "num_questions", "snli_ve": "num_examples", "retrieval": "num_images"}[name]
    assert one[count] == keep
    assert 0 < one[{"vqa": "vqa_accuracy", "snli_ve": "accuracy", "retrieval": "t2i_r1"}[name]] < 100
    for world, per_rank in results.items():
        for rank, metrics in enumerate(per_rank):
            assert metrics[case] == pytest.approx(one, rel=1e-6), (world, rank)
