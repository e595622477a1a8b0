"""Downstream metrics against hand-computed cases, and every reader on real files + malformed lines."""
import json

import pytest
import torch

from conftest import REALDATA
from soho_ds.tasks.base import AnnotationError
from soho_ds.tasks.nlvr2 import read_nlvr2
from soho_ds.tasks.retrieval import (chance_recall, read_coco_captions, read_flickr30k_entities, read_karpathy,
                                     recall_at_k, sample_hard)
from soho_ds.tasks.snli_ve import read_snli_ve
from soho_ds.tasks.vqa import build_answer_vocab, normalize_answer, read_vqa, soft_targets, vqa_accuracy

needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")


# --- metrics ---
def test_recall_at_k_by_hand():
    # 3 images, 4 captions: caption -> image [0, 0, 1, 2]
    text_image = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0],  # image 0: best caption 0 (its own) -> i2t rank 0
                           [0.5, 0.6, 0.4, 0.3],  # image 1: its caption 2 ranked 3rd -> rank 2
                           [0.2, 0.3, 0.1, 0.05]])  # image 2: its caption 3 ranked last -> rank 3
    r = recall_at_k(scores, text_image, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r3"] == pytest.approx(200 / 3)
    # t2i: caption 0 -> images by score [0,1,2]: rank 0; caption 1 -> [1,2,0]: rank 2;
    # caption 2 -> [0,1,2]: its image 1 at rank 1; caption 3 -> [1,2,0]: image 2 at rank 1
    assert r["t2i_r1"] == pytest.approx(25.0)
    assert r["t2i_r2"] == pytest.approx(75.0)
    assert r["t2i_r3"] == pytest.approx(100.0)
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))


def test_recall_breaks_ties_by_index_deterministically():
    """Tied scores rank the lower-indexed candidate first, whatever order a sort would give them."""
    text_image = torch.tensor([0, 1, 2])
    scores = torch.tensor([[0.5, 0.5, 0.5],  # image 0: all tied -> captions 0, 1, 2: its caption first
                           [0.5, 0.5, 0.5],  # image 1: its caption 1 is second
                           [0.1, 0.9, 0.9]])  # image 2: captions 1 and 2 tied at the top -> 1, then its 2
    r = recall_at_k(scores, text_image, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(100.0)
    # t2i: caption 0 -> images by score [0.5, 0.5, 0.1]: 0 first (rank 0); caption 1 -> [0.5, 0.5, 0.9]:
    # image 2, then 0, then 1 (rank 2); caption 2 -> [0.5, 0.5, 0.9]: image 2 first (rank 0)
    assert r["t2i_r1"] == pytest.approx(200 / 3) and r["t2i_r2"] == pytest.approx(200 / 3)
    for _ in range(5):  # the same every time
        assert recall_at_k(scores.clone(), text_image, ks=(1, 2)) == r


def test_retrieval_chance_is_capped_at_100_for_small_splits():
    chance = chance_recall(num_images=4, num_texts=20)
    assert chance["t2i_r1"] == 25.0 and chance["t2i_r5"] == 100.0 and chance["t2i_r10"] == 100.0
    assert all(0 < v <= 100 for v in chance.values())
    assert chance_recall(20, 100)["i2t_r1"] == pytest.approx(5.0)


def test_fold_recall_uses_only_each_folds_images_and_captions():
    from soho_ds.tasks.retrieval import fold_recall

    text_image = torch.arange(4).repeat_interleave(2)  # 4 images x 2 captions
    scores = torch.zeros(4, 8)
    scores[0, 6] = 5.0  # image 0 prefers a caption of image 3: wrong overall, absent from fold 0
    for i in range(4):
        scores[i, 2 * i] += 1.0
    assert recall_at_k(scores, text_image, ks=(1,))["i2t_r1"] == pytest.approx(75.0)
    assert fold_recall(scores, text_image, 0, 2)["i2t_r1"] == pytest.approx(100.0)
    assert fold_recall(scores, text_image, 1, 2)["i2t_r1"] == pytest.approx(100.0)


def test_hard_negatives_follow_the_softmax_of_their_scores_and_never_the_positive():
    inf = float("-inf")
    scores = torch.tensor([[inf, 0.0, 2.0, inf],  # softmax over {0, 2}: 0.119, 0.881
                           [inf, inf, inf, inf]])  # no candidate: uniform
    torch.manual_seed(0)
    draws = torch.stack([sample_hard(scores) for _ in range(20000)])
    first = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    second = torch.bincount(draws[:, 1], minlength=4).float() / len(draws)
    assert first[0] == 0 and first[3] == 0  # masked pairs (same image) are never drawn
    assert first[2].item() == pytest.approx(torch.tensor([0.0, 2.0]).softmax(0)[1].item(), abs=0.01)
    assert second.tolist() == pytest.approx([0.25] * 4, abs=0.015)


def test_vqa_accuracy_follows_the_official_rules():
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", ten) == pytest.approx(0.9)  # k=3 -> 0.9 (worked check in the notes)
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("4", ten) == pytest.approx(0.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # answers differ -> normalisation on: "two" -> "2", articles dropped, punctuation
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == pytest.approx(1.0)
    assert vqa_accuracy("the dog.", ["dog"] * 5 + ["cat"] * 5) == pytest.approx(1.0)
    # all ten identical -> no normalisation: the prediction must match exactly
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"), ("yes,no", "yes no"), ("hello, world", "hello world"), ("ok.", "ok"), ("3.5", "3.5"),
    ("None", "0"), ("a dog", "dog"), ("dont", "don't"), ("What's up?", "what's up"), ("  Two  Cats\n", "2 cats"),
])
def test_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_vocab_and_soft_targets():
    from soho_ds.tasks.vqa import VQAQuestion

    qs = [VQAQuestion(1, 1, "q", ("yes",) * 8 + ("no",) * 2), VQAQuestion(2, 1, "q", ("2",) * 5 + ("two",) * 5),
          VQAQuestion(3, 1, "q", ("no",) * 10)]
    vocab = build_answer_vocab(qs, 2)
    assert vocab == ["no", "2"]  # 12 "no", 10 "2" (after normalisation), 8 "yes" cut by the size
    t = soft_targets(qs[0].answers, {a: i for i, a in enumerate(vocab)})
    assert t.tolist() == pytest.approx([2 / 3, 0.0])
    from soho_ds.tasks.base import AnnotationError

    with pytest.raises(AnnotationError, match=r"1 of 4 questions have no answers \(question 9 first\).*give "
                                              r"task.train_answers"):
        build_answer_vocab(qs + [VQAQuestion(9, 1, "q", None)], 2)


def test_question_only_prior_by_hand():
    """The blind baseline answers by question text alone; unseen questions get the overall top answer."""
    from soho_ds.tasks.vqa import VQAQuestion, question_prior_accuracy

    train = [VQAQuestion(1, 1, "what colour?", ("red",) * 10), VQAQuestion(2, 2, "What colour? ", ("red",) * 10),
             VQAQuestion(3, 3, "what colour?", ("blue",) * 10), VQAQuestion(4, 4, "how many?", ("2",) * 10)]
    evaluated = [VQAQuestion(5, 5, "what colour?", ("red",) * 10),  # prior "red": 1
                 VQAQuestion(6, 6, "how many?", ("2",) * 3 + ("3",) * 7),  # "2": (3 x 2/3 + 7 x 1) / 10 = 0.9
                 VQAQuestion(7, 7, "is it large?", ("yes",) * 10)]  # unseen: overall "red", 0
    assert question_prior_accuracy(train, evaluated) == pytest.approx(100 * (1 + 0.9 + 0) / 3)


def test_synthetic_snli_ve_entailment_and_contradiction_share_their_templates(downstream):
    """With the content words (colours, shapes, sizes, numbers) blanked, a hypothesis's template must
    not tell entailment from contradiction: the best template -> label rule stays near 50%."""
    import re
    from collections import Counter, defaultdict

    from soho_ds.synthetic.world import COLOURS, NUMBER_WORDS, SHAPES, SIZES

    words = "|".join([*COLOURS, *SHAPES, *SIZES, *NUMBER_WORDS.values()])
    examples = [e for split in ("train", "dev") for e in read_snli_ve(downstream / f"snli_ve/snli_ve_{split}.jsonl")
                if e.label != 1]  # 0 entailment, 2 contradiction; neutral is unverifiable by design
    by_template = defaultdict(Counter)
    for e in examples:
        by_template[re.sub(rf"\b({words})\b", "X", e.hypothesis)][e.label] += 1
    best_rule = sum(max(c.values()) for c in by_template.values()) / len(examples)
    assert len(examples) > 100 and best_rule < 0.6, (best_rule, dict(by_template))


# --- readers on real files ---
@needs_realdata
def test_karpathy_reader_on_real_records():
    train = read_karpathy(REALDATA / "karpathy_split/dataset_flickr8k_excerpt.json", ("train",))
    val = read_karpathy(REALDATA / "karpathy_split/dataset_flickr8k_excerpt.json", ("val",))
    assert len(train) == 3 and len(val) == 2
    assert train[0].image == "2513260012_03d33305cf.jpg"
    assert train[0].captions[0] == "A black dog is running after a white dog in the snow ."
    assert all(len(im.captions) == 5 for im in train + val)


@needs_realdata
def test_coco_captions_reader_on_the_real_excerpt_and_photo():
    from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec

    images = read_coco_captions(REALDATA / "coco/captions_val2014_excerpt.json")
    assert len(images) == 25 and all(len(im.captions) >= 5 for im in images)
    cat = next(im for im in images if im.image_id == "262148")
    assert cat.image == "COCO_val2014_000000262148.jpg"
    pixels, sizes = ImageFileDecoder(ImageSpec(mode="aspect", shorter_side=600, longer_side=1000, stride=64), 2,
                                     num_threads=1)([str(REALDATA / "coco/images" / cat.image)])
    # 640x512 -> shorter side 600: 750x600, padded to 768x640 (stride 64)
    assert sizes.tolist() == [[600, 750]] and pixels.shape == (1, 3, 640, 768) and pixels.std() > 0.2


@needs_realdata
def test_flickr30k_entities_sentences_reader():
    images = read_flickr30k_entities(REALDATA / "flickr30k/Sentences")
    assert {im.image for im in images} == {"4945942737.jpg", "6338542128.jpg"}
    first = next(im for im in images if im.image_id == "4945942737")
    assert first.captions[0] == "A girl with brown hair sits on the edge of a cement area overlooking water ."
    assert (REALDATA / "flickr30k/images" / first.image).exists()


@needs_realdata
def test_vqa_reader_on_the_real_fixture():
    qs = read_vqa(REALDATA / "vqa_v2/allennlp_fixture/questions.json",
                  REALDATA / "vqa_v2/allennlp_fixture/annotations.json")
    assert qs and all(len(q.answers) == 10 for q in qs)
    q = next(q for q in qs if q.question_id == 458752000)
    assert q.image_id == 458752 and q.question == "What is this photo taken looking through?"
    assert vqa_accuracy("net", list(q.answers)) > 0.6
    assert q.subtype == "train2014"


@needs_realdata
def test_each_vqa_split_finds_its_own_images_through_the_subtype(tmp_path, world_of_one):
    """One pattern serves train and val: {subtype} comes from each questions file's data_subtype, so
    train questions find COCO_train2014_* and val questions COCO_val2014_* (real file names)."""
    from conftest import tiny_model_config
    from soho_ds.config import RunConfig, TaskConfig
    from soho_ds.tasks.vqa import VQATask

    val = json.loads((REALDATA / "vqa_v2/allennlp_fixture/questions.json").read_text())
    val["data_subtype"] = "val2014"
    val["questions"] = [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
                        {"image_id": 393225, "question": "What is the man doing?", "question_id": 393225000}]
    (tmp_path / "val_questions.json").write_text(json.dumps(val))
    task_cfg = TaskConfig(name="vqa", train_file=str(REALDATA / "vqa_v2/allennlp_fixture/questions.json"),
                          train_answers=str(REALDATA / "vqa_v2/allennlp_fixture/annotations.json"),
                          eval_file=str(tmp_path / "val_questions.json"), image_root=str(REALDATA / "coco/images"),
                          image_pattern="COCO_{subtype}_{image_id:012d}.jpg", num_answers=10)
    cfg = RunConfig(model=tiny_model_config(), task=task_cfg)
    task = VQATask(cfg, world_of_one, micro_batch=2)
    assert {task.image_name(q) for q in task.train_examples} == {"COCO_train2014_000000458752.jpg"}
    assert [task.image_name(q) for q in task.eval_questions] == ["COCO_val2014_000000262148.jpg",
                                                                 "COCO_val2014_000000393225.jpg"]
    batch = task.collate(task.eval_questions, False, task.images(task.image_names(task.eval_questions), train=False))
    # SOHO's input (the default): shorter side 600 -> 750x600 and 897x600, padded to stride 32
    assert batch["image_sizes"].tolist() == [[600, 750], [600, 897]] and batch["images"].shape == (2, 3, 608, 928)


@needs_realdata
def test_vqa_trains_on_several_files_together_and_test_dev_finds_the_test2015_images(tmp_path, world_of_one):
    """SOHO's test-dev setting: train + val questions (each with its annotations) trained on together,
    each file's images through its own subtype; the test-dev questions (data_subtype test-dev2015)
    read their images from test2015/, where COCO keeps them."""
    from conftest import tiny_model_config
    from soho_ds.config import RunConfig, TaskConfig
    from soho_ds.tasks.vqa import VQATask

    fixture = REALDATA / "vqa_v2/allennlp_fixture"
    val = json.loads((fixture / "questions.json").read_text())
    val["data_subtype"] = "val2014"
    val["questions"] = [{"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}]
    (tmp_path / "val_questions.json").write_text(json.dumps(val))
    (tmp_path / "val_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 262148000, "image_id": 262148, "answers": [{"answer": "down"}] * 10}]}))
    test_dev = {**val, "data_subtype": "test-dev2015",
                "questions": [{"image_id": 393225, "question": "What is the man doing?", "question_id": 1}]}
    (tmp_path / "test_dev.json").write_text(json.dumps(test_dev))
    for folder, name in (("train2014", "COCO_train2014_000000458752.jpg"), ("val2014", "COCO_val2014_000000262148.jpg"),
                         ("test2015", "COCO_test2015_000000393225.jpg")):
        (tmp_path / "images" / folder).mkdir(parents=True)
        real = next((REALDATA / "coco/images").glob(f"*{name[-16:]}"))
        (tmp_path / "images" / folder / name).symlink_to(real)
    task_cfg = TaskConfig(name="vqa", train_file=(str(fixture / "questions.json"), str(tmp_path / "val_questions.json")),
                          train_answers=(str(fixture / "annotations.json"), str(tmp_path / "val_annotations.json")),
                          eval_file=str(tmp_path / "test_dev.json"), image_root=str(tmp_path / "images"),
                          image_pattern="{subtype}/COCO_{subtype}_{image_id:012d}.jpg", num_answers=10)
    task = VQATask(RunConfig(model=tiny_model_config(), task=task_cfg), world_of_one, micro_batch=2)
    train = read_vqa(fixture / "questions.json", fixture / "annotations.json")
    assert len(task.train_examples) == len(train) + 1 and task.train_examples[-1].answers == ("down",) * 10
    assert {task.image_name(q) for q in task.train_examples} == {"train2014/COCO_train2014_000000458752.jpg",
                                                                "val2014/COCO_val2014_000000262148.jpg"}
    assert "down" in task.vocab  # the answer vocabulary counts both files
    assert [task.image_name(q) for q in task.eval_questions] == ["test2015/COCO_test2015_000000393225.jpg"]


@needs_realdata
def test_nlvr2_reader_on_real_dev_lines_and_images():
    from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec

    dev = read_nlvr2(REALDATA / "nlvr2/dev_first40.json")
    assert len(dev) == 40 and {e.label for e in dev} == {0, 1}
    first = dev[0]
    assert first.identifier == "dev-850-0-0" and first.images == ("dev-850-0-img0.png", "dev-850-0-img1.png")
    # the ".png" files are JPEG data: decoded by content
    paths = [str(REALDATA / "nlvr2/images" / name) for e in dev[:8] for name in e.images]
    images, sizes = ImageFileDecoder(ImageSpec(mode="aspect", shorter_side=64, longer_side=96), 4, num_threads=1)(paths)
    assert images.shape[0] == 16
    from PIL import Image

    for path, (h, w) in zip(paths, sizes.tolist()):  # shorter side to 64 unless the longer would pass 96
        width, height = Image.open(path).size
        scale = min(64 / min(width, height), 96 / max(width, height))
        assert abs(h - height * scale) <= 1 and abs(w - width * scale) <= 1, (path, (h, w), (height, width))
    assert len(read_nlvr2(REALDATA / "nlvr2/balanced_dev_first5.json")) == 5


@needs_realdata
def test_snli_ve_reader_accepts_both_key_spellings():
    old = read_snli_ve(REALDATA / "snli_ve/cpuknows_sample_data.jsonl")  # "Flikr30kID": "x.jpg"
    new = read_snli_ve(REALDATA / "snli_ve/allennlp_sample_pairs.jsonl")  # "Flickr30K_ID": "x"
    assert len(old) == 5 and len(new) == 16
    assert old[0].image == "555378351.jpg" and new[0].image == "2248275918.jpg"
    assert (REALDATA / "snli_ve/images" / new[0].image).exists()
    assert {e.label for e in new} == {0, 1, 2}


# --- malformed input: a clear error naming file and line, nothing dropped silently ---
def test_malformed_jsonl_lines_name_file_and_line(tmp_path):
    good = {"sentence": "s", "label": "True", "identifier": "dev-1-2-0"}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(AnnotationError, match=r"dev.json:2: not valid JSON"):
        read_nlvr2(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "maybe"}) + "\n")
    with pytest.raises(AnnotationError, match=r"dev.json:2: label must be"):
        read_nlvr2(p)
    p.write_text(json.dumps({"sentence": "s", "label": "True"}) + "\n")
    with pytest.raises(AnnotationError, match=r"dev.json:1: missing field\(s\) \['identifier'\]"):
        read_nlvr2(p)
    ve = tmp_path / "ve.jsonl"
    ve.write_text(json.dumps({"sentence2": "h", "gold_label": "entailment"}) + "\n")
    with pytest.raises(AnnotationError, match=r"ve.jsonl:1: no image key"):
        read_snli_ve(ve)
    ve.write_text(json.dumps({"Flickr30K_ID": "1", "sentence2": "h", "gold_label": "maybe"}) + "\n")
    with pytest.raises(AnnotationError, match=r"ve.jsonl:1: gold_label must be one of"):
        read_snli_ve(ve)
    ve.write_text(json.dumps({"Flickr30K_ID": "1", "sentence2": "h", "gold_label": "-"}) + "\n" +
                  json.dumps({"Flickr30K_ID": "2", "sentence2": "h", "gold_label": "neutral"}) + "\n")
    assert [e.image for e in read_snli_ve(ve)] == ["2.jpg"]  # no-gold line left out (and counted in the log)


def test_malformed_json_annotations_name_file_and_record(tmp_path):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": [{"image_id": 1, "question": "x?", "question_id": 5}]}))
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"annotations": [{"question_id": 5, "answers": ["yes"]}]}))
    with pytest.raises(AnnotationError, match=r"a.json: annotations\[0\] \(question 5\): 'answers' must be"):
        read_vqa(q, a)
    a.write_text(json.dumps({"annotations": []}))
    with pytest.raises(AnnotationError, match=r"a.json: no annotation for question 5"):
        read_vqa(q, a)
    k = tmp_path / "dataset_coco.json"
    k.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(AnnotationError, match=r"dataset_coco.json: images\[0\]: missing field\(s\) \['sentences'\]"):
        read_karpathy(k, ("test",))
    k.write_text('{"images": [\n  {"filename": "x.jpg",\n')
    with pytest.raises(AnnotationError, match=r"dataset_coco.json:3: not valid JSON"):
        read_karpathy(k, ("test",))
