"""Synthetic counterparts of the four downstream benchmarks, each in its benchmark's own file format:
Karpathy-split JSON (retrieval), official VQA v2 questions/annotations JSON (+ a test-dev questions
file), NLVR2 JSON-lines with `split-set-pair-img{0,1}.png` images (JPEG data, as in the real
release), and SNLI-VE JSON-lines (train with "Flickr30K_ID", dev with the old "Flikr30kID")."""
from __future__ import annotations

import json
import random
from pathlib import Path

from soho_ds.synthetic.world import (COLOURS, NUMBER_WORDS, SHAPES, Scene, ShapeObject, captions_for, image_shape,
                                     render, sample_scene)

Scenes = dict[int, tuple[Scene, str]]  # image id -> (scene, "train" | "test")


def write_images(folder: Path, count: int, num_train: int, side: int, non_square: float,
                 rng: random.Random) -> Scenes:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for i in range(count):
        scene = sample_scene(rng, *image_shape(rng, side, non_square))
        render(scene, rng).save(folder / f"{1000 + i}.jpg", quality=90)
        scenes[1000 + i] = (scene, "train" if i < num_train else "test")
    return scenes


def write_retrieval(folder: Path, scenes: Scenes) -> None:
    records, sentid = [], 0
    for imgid, (image_id, (scene, split)) in enumerate(scenes.items()):
        caps = captions_for(scene)
        sents = [{"tokens": c.replace(",", "").replace(":", "").split(), "raw": c, "imgid": imgid,
                  "sentid": sentid + k} for k, c in enumerate(caps)]
        records.append({"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents,
                        "split": split, "filename": f"{image_id}.jpg"})
        sentid += len(caps)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_synthetic.json").write_text(json.dumps({"images": records, "dataset": "synthetic"}))


def _questions(rng: random.Random, objects: list[ShapeObject]) -> list[tuple[str, str]]:
    """(question, answer) pairs about colour, shape, size, count and presence, all true of the scene."""
    qa = [("how many shapes are there?", str(len(objects)))]
    o = rng.choice(objects)
    if [x.shape for x in objects].count(o.shape) == 1:
        qa.append((f"what colour is the {o.shape}?", o.colour))
    if [x.colour for x in objects].count(o.colour) == 1:
        qa.append((f"what shape is the {o.colour} object?", o.shape))
        qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
    colour, shape = (o.colour, o.shape) if rng.random() < 0.5 else (rng.choice(sorted(COLOURS)), rng.choice(SHAPES))
    qa.append((f"is there a {colour} {shape}?", "yes" if (colour, shape) in {(x.colour, x.shape) for x in objects}
               else "no"))
    return qa


def _annotators(rng: random.Random, answer: str) -> list[str]:
    """Ten human-like answers: mostly the truth, sometimes spelled differently ("two" for "2")."""
    return [NUMBER_WORDS.get(int(answer), answer) if answer.isdigit() and rng.random() < 0.2 else answer
            for _ in range(10)]


def write_vqa(folder: Path, scenes: Scenes, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = {"info": {"description": "synthetic shapes, VQA v2 layout"}, "task_type": "Open-Ended",
              "data_type": "synthetic"}
    for split, subtype in (("train", "train"), ("test", "val")):
        questions, annotations = [], []
        for image_id, (scene, image_split) in scenes.items():
            if image_split != split:
                continue
            for k, (q, a) in enumerate(_questions(rng, scene.objects)):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                kind = "yes/no" if a in ("yes", "no") else "number" if a.isdigit() else "other"
                annotations.append({"question_type": q.split()[0], "multiple_choice_answer": a, "image_id": image_id,
                                    "answer_type": kind, "question_id": qid,
                                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, x in enumerate(_annotators(rng, a))]})
        body = {**header, "data_subtype": subtype}
        (folder / f"questions_{subtype}.json").write_text(json.dumps({**body, "questions": questions}))
        (folder / f"annotations_{subtype}.json").write_text(json.dumps({**body, "annotations": annotations}))
        if subtype == "val":
            (folder / "questions_test-dev.json").write_text(json.dumps(
                {**header, "data_subtype": "test-dev", "questions": questions}))


def _nlvr2_statement(rng: random.Random, left: list[ShapeObject], right: list[ShapeObject]) -> tuple[str, bool]:
    kind = rng.randrange(3)
    if kind == 0:
        side, objs = rng.choice([("left", left), ("right", right)])
        o = rng.choice(left + right)
        return f"the {side} image contains {o.phrase(with_size=False)}", any(
            (x.colour, x.shape) == (o.colour, o.shape) for x in objs)
    if kind == 1:
        shape = rng.choice([o.shape for o in left + right])
        return f"both images contain a {shape}", any(o.shape == shape for o in left) and any(
            o.shape == shape for o in right)
    more, fewer = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    counts = {"left": len(left), "right": len(right)}
    return f"there are more shapes in the {more} image than in the {fewer} image", counts[more] > counts[fewer]


def write_nlvr2(out: Path, pairs: dict[str, int], side: int, non_square: float, rng: random.Random) -> None:
    (out / "nlvr2").mkdir(parents=True, exist_ok=True)
    for split, n_pairs in pairs.items():
        lines = []
        for pair in range(n_pairs):
            scenes = [sample_scene(rng, *image_shape(rng, side, non_square)) for _ in range(2)]
            stem = f"{split}-{pair // 4}-{pair % 4}"
            for name, scene in zip(("img0", "img1"), scenes):
                render(scene, rng, background="white").save(out / "images" / f"{stem}-{name}.png", format="JPEG")
            sentence, truth = _nlvr2_statement(rng, scenes[0].objects, scenes[1].objects)
            lines.append(json.dumps({"validation": {}, "sentence": sentence, "left_url": "", "writer": "0",
                                     "label": "True" if truth else "False", "right_url": "", "synset": "",
                                     "query": "", "identifier": f"{stem}-0"}))
        (out / "nlvr2" / f"{split}.json").write_text("\n".join(lines) + "\n")


NEUTRAL = ("the {p} was drawn by a child", "the {p} is made of paper", "someone painted the {p} yesterday",
           "the {p} is the artist's favourite")


def _snli_hypothesis(rng: random.Random, objects: list[ShapeObject]) -> tuple[str, str]:
    """An entailed, neutral or contradicted hypothesis about the scene. Entailments and
    contradictions share their templates ("there is <object>", "there are exactly <n> shapes"),
    true or false of this image, so only the image tells them apart; neutral statements cannot
    be checked in any image (as in SNLI-VE)."""
    kind = rng.choice(("entailment", "neutral", "contradiction"))
    o = rng.choice(objects)
    if kind == "neutral":
        return rng.choice(NEUTRAL).format(p=f"{o.colour} {o.shape}"), kind
    true = kind == "entailment"
    if rng.random() < 0.5:
        absent = [c for c in sorted(COLOURS) if all(x.colour != c for x in objects)]  # never empty: <= 3 objects
        colour = o.colour if true else rng.choice(absent)
        return f"there is {ShapeObject(o.shape, colour, o.size, o.box).phrase()}", kind
    n = len(objects) if true else rng.choice([k for k in NUMBER_WORDS if k != len(objects)])
    return f"there {'is' if n == 1 else 'are'} exactly {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}", kind


def write_snli_ve(folder: Path, scenes: Scenes, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, key, image_split in (("train", "Flickr30K_ID", "train"), ("dev", "Flikr30kID", "test")):
        lines = []
        for image_id, (scene, s) in scenes.items():
            if s != image_split:
                continue
            for k in range(3):
                hyp, label = _snli_hypothesis(rng, scene.objects)
                lines.append(json.dumps({key: str(image_id) if key == "Flickr30K_ID" else f"{image_id}.jpg",
                                         "annotator_labels": [label], "captionID": f"{image_id}.jpg#0",
                                         "gold_label": label, "pairID": f"{image_id}.jpg#0r{k}{label[0]}",
                                         "sentence1": captions_for(scene)[0], "sentence2": hyp}, sort_keys=True))
        (folder / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")


def make_downstream(out: str | Path, num_train: int = 400, num_eval: int = 100, image_size: int = 128,
                    seed: int = 100, non_square: float = 0.0) -> dict:
    """Synthetic retrieval, VQA 2.0, NLVR2 and SNLI-VE sets under `out/` (images under out/images)."""
    out = Path(out)
    rng = random.Random(seed)
    scenes = write_images(out / "images", num_train + num_eval, num_train, image_size, non_square, rng)
    write_retrieval(out / "retrieval", scenes)
    write_vqa(out / "vqa", scenes, rng)
    # NLVR2 pairs are drawn afresh (two images each), three per scene of the other sets: with as few
    # pairs as images, a small model memorises the training statements instead of reading the images
    write_nlvr2(out, {"train": num_train, "dev": num_eval}, image_size, non_square, rng)
    write_snli_ve(out / "snli_ve", scenes, rng)
    return {"images": len(scenes), "root": str(out)}
