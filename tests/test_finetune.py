"""Each finetune driver end to end on its synthetic counterpart (real file formats), in one process."""
import json

import pytest

from conftest import FINETUNE_FROM_SCRATCH
from launching import finetune_in_process


def run_finetune(task, config, downstream, tmp_path, steps, extra=()):
    """From random initialisation: the tiny model, no pretrained stand-ins."""
    return finetune_in_process(task, config, downstream, tmp_path / task, steps, FINETUNE_FROM_SCRATCH + list(extra))


@pytest.mark.slow
def test_vqa_finetune_beats_the_most_frequent_answer_and_its_vocabulary_travels(grounded, grounded_vqa, tmp_path,
                                                                               world_of_one):
    """The VQA driver's run from the grounded pretraining (conftest; test_grounding.py holds it to the
    stronger text-only prior): the full split scored, results in the server's format, and its checkpoint
    answering test-dev from the questions alone with its own vocabulary."""
    from soho_ds.tasks.vqa import read_vqa, vqa_accuracy

    downstream, metrics = grounded["downstream"], grounded_vqa["metrics"]
    train = read_vqa(downstream / "vqa/questions_train.json", downstream / "vqa/annotations_train.json")
    val = read_vqa(downstream / "vqa/questions_val.json", downstream / "vqa/annotations_val.json")
    most_common = max({a for q in train for a in q.answers}, key=lambda a: sum(a in q.answers for q in train))
    chance = 100 * sum(vqa_accuracy(most_common, list(q.answers)) for q in val) / len(val)
    assert metrics["num_questions"] == len(val)  # the full split, not a sample
    assert metrics["vqa_accuracy"] > chance + 10, (metrics, chance)
    results = json.loads((grounded_vqa["run"] / "vqa_results.json").read_text())
    assert len(results) == len(val) and set(results[0]) == {"question_id", "answer"}
    ckpt = grounded_vqa["checkpoint"]
    vocab = json.loads((ckpt / (ckpt / "latest").read_text() / "answer_vocab.json").read_text())
    # test-dev: questions alone (no train files, no answers), from the finetuned checkpoint
    test_dev = finetune_in_process(
        "vqa", "finetune_vqa_synthetic.yaml", downstream, tmp_path / "test_dev", steps=20, init=ckpt,
        eval_only=True, sets=["task.train_file=null", "task.train_answers=null",
                              f"task.eval_file={downstream}/vqa/questions_test-dev.json", "task.eval_answers=null"])
    assert test_dev["num_questions"] == len(val)
    answers = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "test_dev/run/vqa_results.json").read_text())}
    # the same questions as val: the same answers as the finetune's own evaluation, all from its vocabulary
    assert answers == {r["question_id"]: r["answer"] for r in results} and set(answers.values()) <= set(vocab)


@pytest.mark.slow
def test_snli_ve_finetune_beats_chance(classifier_runs):
    metrics = classifier_runs("snli_ve")["metrics"]
    assert metrics["num_examples"] == 120
    assert metrics["accuracy"] > 33.3 + 15, metrics


@pytest.mark.slow
def test_nlvr2_finetune_learns_its_training_pairs_and_scores_the_full_dev_split(classifier_runs):
    """From random initialisation the tiny model fits NLVR2's training statements; whether it beats
    chance on dev (it sits within +-10 points of 50 over seeds) is tested from the grounded
    pretraining instead (test_grounding.py)."""
    nlvr2 = classifier_runs("nlvr2")
    metrics = nlvr2["metrics"]
    assert metrics["num_examples"] == 40
    rows = [json.loads(line) for line in (nlvr2["run"] / "train.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 0.69 - 0.1 and rows[-1]["loss"] < 0.5, [(r["step"], r["loss"]) for r in rows]
    # images/s counts both images of each example: 16 examples a step are 32 images
    assert all(r["perf/img_per_s"] * r["perf/step_s"] == pytest.approx(32) for r in rows)


@pytest.mark.slow
def test_retrieval_finetune_scores_the_full_split_and_its_folds(downstream, tmp_path, world_of_one):
    metrics = run_finetune("retrieval", "finetune_retrieval_synthetic.yaml", downstream, tmp_path, steps=20,
                           extra=["task.eval_folds=2", "train.best_metric=rsum"])
    assert metrics["num_images"] == 40 and metrics["num_texts"] == 200  # every test image, every caption
    # a fold holds half the images and their captions: each caption's image (each image's captions) meets
    # a subset of the candidates it met in the full split, so no rank gets worse and no recall lower
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert metrics[f"2fold/{d}_r{k}"] >= metrics[f"{d}_r{k}"], (d, k, metrics)
    assert metrics["2fold/rsum"] >= metrics["rsum"]
    assert (tmp_path / "retrieval" / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    # train.best_metric keeps the best evaluation's checkpoint for any task: here the only one, the last
    best = json.loads((tmp_path / "retrieval/run/checkpoints/best.json").read_text())
    assert best == {"tag": "step_00000020", "step": 20, "metric": "rsum", "value": metrics["rsum"]}
