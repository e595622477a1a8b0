"""Pretraining grounds words in pixels, and a retrieval finetune gains from it (issues 3 and 4).

One pretraining run, shared by the module: `make demo`'s (configs/pretrain_synthetic.yaml: the
concept-trained ResNet stand-in for ImageNet weights, MiniLM's pretrained BERT layers, MLM + MVM +
ITM + ITC) through the real entry point with 2 gloo ranks, on the demo's synthetic set. Then
retrieval is finetuned twice with the same data, steps and seed: from that checkpoint and from
random initialisation (no checkpoint, no stand-ins).
"""
import json
import math

import pytest

from conftest import ROOT
from launching import ENV, finetune_in_process, launch_pretrain

PRETRAIN_STEPS = 250  # configs/pretrain_synthetic.yaml
FINETUNE_STEPS = 40


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    """`make demo`'s pretraining, as it runs there: same data (seed), stand-in CNN, config and launcher."""
    import torch

    from soho_ds.data.synthetic import make_dataset, make_downstream
    from soho_ds.pretrain.backbone_init import train_concept_classifier

    root = tmp_path_factory.mktemp("grounding")
    make_dataset(root / "shards", num_train=2000, num_val=200, samples_per_shard=250, image_size=128, seed=0)
    make_downstream(root / "downstream", num_train=160, num_eval=20, image_size=128, seed=12)
    state, report = train_concept_classifier(f"{root}/shards/train", f"{root}/shards/val")
    torch.save(state, root / "resnet18_concepts.pth")
    run = root / "pretrain"
    log = launch_pretrain(
        "configs/pretrain_synthetic.yaml", ranks=2, ds_config=ROOT / "ds_configs" / "zero2_cpu_demo.json",
        overrides=[f"data.train_shards={root}/shards/train", f"data.val_shards={root}/shards/val",
                   f"model.backbone_weights={root}/resnet18_concepts.pth", f"train.output_dir={run}",
                   "train.eval_every=125"],
        env=ENV)
    return {"root": root, "run": run, "log": log, "concepts": report}


@pytest.mark.slow
def test_pretraining_matches_captions_to_held_out_images_well_above_chance(grounded):
    evals = [json.loads(line) for line in (grounded["run"] / "eval.jsonl").read_text().splitlines()]
    first, last = evals[0], evals[-1]
    assert last["step"] == PRETRAIN_STEPS
    # 50% negatives: chance is 0.5. make demo measured 0.594 at step 150 and 0.749 at 250.
    assert last["acc/itm"] > 0.65, evals
    assert last["loss/itm"] < first["loss/itm"] - 0.05, evals
    assert grounded["concepts"].first_loss > 2 * grounded["concepts"].last_loss  # the stand-in CNN learned


@pytest.mark.slow
def test_retrieval_from_pretraining_beats_chance_and_random_initialisation(grounded, tmp_path):
    pretrained = finetune_in_process(
        "retrieval", "finetune_retrieval_synthetic.yaml", grounded["root"] / "downstream", tmp_path / "pretrained",
        steps=FINETUNE_STEPS, init=grounded["run"] / "checkpoints",
        sets=["train.warmup_steps=4", f"model.backbone_weights={grounded['root']}/resnet18_concepts.pth"])
    scratch = finetune_in_process(
        "retrieval", "finetune_retrieval_synthetic.yaml", grounded["root"] / "downstream", tmp_path / "scratch",
        steps=FINETUNE_STEPS, sets=["train.warmup_steps=4", "model.backbone_weights=null", "model.bert_dir=null"])
    assert pretrained["num_images"] == 20 and pretrained["num_texts"] == 100
    # a random ranking: text -> image R@K = K/20; image -> text (5 true captions of 100) 1 - C(95,K)/C(100,K)
    chance = {**{f"t2i_r{k}": 100 * k / 20 for k in (1, 5, 10)},
              **{f"i2t_r{k}": 100 * (1 - math.comb(95, k) / math.comb(100, k)) for k in (1, 5, 10)}}
    rsum = lambda m: sum(m[key] for key in chance)  # noqa: E731
    # measured in CI: pretrained rsum 295 (t2i R@10 71, i2t R@10 90), random init 150, chance 150
    assert rsum(pretrained) > rsum(chance) + 75, (pretrained, chance)
    assert pretrained["t2i_r10"] > chance["t2i_r10"] + 10 and pretrained["i2t_r10"] > chance["i2t_r10"] + 20
    assert rsum(pretrained) > rsum(scratch) + 60, (pretrained, scratch)
