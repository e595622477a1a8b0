"""Each finetune driver end to end on its synthetic counterpart (real file formats), in one process."""
import json

import pytest

from launching import finetune_in_process

TINY = ["model.backbone=resnet18", "model.freeze_stem=false", "model.hidden_size=64", "model.num_layers=2",
        "model.num_heads=2", "model.intermediate_size=128", "model.vd_size=32", "data.image_size=64",
        "data.max_text_len=20", "train.warmup_steps=5", "train.log_every=10", "train.lr=1e-3",
        "model.bert_dir=null", "model.backbone_weights=null", "train.head_lr_mult=1"]


def run_finetune(task, config, downstream, tmp_path, steps, extra=()):
    """From random initialisation: the tiny model, no pretrained stand-ins."""
    return finetune_in_process(task, config, downstream, tmp_path / task, steps, TINY + list(extra))


@pytest.mark.slow
def test_vqa_finetune_beats_the_most_frequent_answer(downstream, tmp_path):
    from soho_ds.tasks.vqa import read_vqa, vqa_accuracy

    metrics = run_finetune("vqa", "finetune_vqa_synthetic.yaml", downstream, tmp_path, steps=120)
    train = read_vqa(downstream / "vqa/questions_train.json", downstream / "vqa/annotations_train.json")
    val = read_vqa(downstream / "vqa/questions_val.json", downstream / "vqa/annotations_val.json")
    most_common = max({a for q in train for a in q.answers}, key=lambda a: sum(a in q.answers for q in train))
    chance = 100 * sum(vqa_accuracy(most_common, list(q.answers)) for q in val) / len(val)
    assert metrics["num_questions"] == len(val)  # the full split, not a sample
    assert metrics["vqa_accuracy"] > chance + 10, (metrics, chance)
    results = json.loads((tmp_path / "vqa" / "run" / "vqa_results.json").read_text())
    assert len(results) == len(val) and set(results[0]) == {"question_id", "answer"}


@pytest.mark.slow
def test_snli_ve_finetune_beats_chance(downstream, tmp_path):
    metrics = run_finetune("snli_ve", "finetune_snli_ve_synthetic.yaml", downstream, tmp_path, steps=100)
    assert metrics["num_examples"] == 120
    assert metrics["accuracy"] > 33.3 + 15, metrics


@pytest.mark.slow
def test_nlvr2_finetune_beats_chance(downstream, tmp_path):
    metrics = run_finetune("nlvr2", "finetune_nlvr2_synthetic.yaml", downstream, tmp_path, steps=100)
    assert metrics["num_examples"] == 40
    assert metrics["accuracy"] > 50 + 10, metrics


@pytest.mark.slow
def test_retrieval_finetune_scores_the_full_split_and_its_folds(downstream, tmp_path):
    metrics = run_finetune("retrieval", "finetune_retrieval_synthetic.yaml", downstream, tmp_path, steps=20,
                           extra=["task.eval_folds=2"])
    assert metrics["num_images"] == 40 and metrics["num_texts"] == 200  # every test image, every caption
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "2fold/t2i_r1"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    assert (tmp_path / "retrieval" / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000020"
