"""Synthetic image-caption shards whose captions truly describe their images.

Each image holds one to three coloured shapes of two sizes on a plain or
gradient background; every caption is generated from that scene graph, so a
model that learns colour, shape, size and position words can be measured
(ITM accuracy, retrieval) far above chance. Output follows the WebDataset
layout that the DALI reader expects: ``000000.tar`` holding ``key.jpg`` and
``key.json`` per sample, plus ``manifest.json``.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from soho_ds.data.regions import BOXES_EXT, FEATURES_EXT, detections_entry, normalised_boxes, npy_bytes
from soho_ds.data.shards import index_shards

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.20, "large": 0.38}  # side of the shape's box as a fraction of the image
BACKGROUNDS = {
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "beige": (225, 205, 170),
}


# Detector vocabulary of the synthetic set: the shape is the object class; colour and size are
# its attributes. The "region feature" is a fixed random projection of those three one-hots,
# standing in for a detector's 2048-d pooled feature.
OBJECT_CLASSES = list(SHAPES)
ATTRIBUTE_CLASSES = sorted(COLOURS) + sorted(SIZES)
REGION_FEATURE_DIM = 64
_PROJECTION = np.random.default_rng(20230).standard_normal(
    (len(OBJECT_CLASSES) + len(ATTRIBUTE_CLASSES), REGION_FEATURE_DIM)).astype(np.float32) / 3.0


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def object_id(self) -> int:
        return OBJECT_CLASSES.index(self.shape)

    @property
    def attribute_ids(self) -> list[int]:
        return [ATTRIBUTE_CLASSES.index(self.colour), ATTRIBUTE_CLASSES.index(self.size)]

    def region_feature(self) -> np.ndarray:
        code = np.zeros(len(OBJECT_CLASSES) + len(ATTRIBUTE_CLASSES), dtype=np.float32)
        code[self.object_id] = 1.0
        code[[len(OBJECT_CLASSES) + a for a in self.attribute_ids]] = 1.0
        return code @ _PROJECTION

    def phrase(self, with_size: bool = True) -> str:
        words = " ".join(([self.size] if with_size else []) + [self.colour, self.shape])
        return ("an " if words[0] in "aeiou" else "a ") + words


def _place(rng: random.Random, side: int, image_size: int, taken: list[tuple]) -> tuple | None:
    """Random box of the given side that overlaps no box in `taken` (with a margin)."""
    margin = max(2, image_size // 32)
    for _ in range(100):
        x0 = rng.randint(margin, image_size - side - margin)
        y0 = rng.randint(margin, image_size - side - margin)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + margin <= t[0] or t[2] + margin <= box[0] or
               box[3] + margin <= t[1] or t[3] + margin <= box[1] for t in taken):
            return box
    return None


def sample_scene(rng: random.Random, image_size: int) -> tuple[str, list[ShapeObject]]:
    """A background name and 1-3 non-overlapping shapes with distinct (colour, shape)."""
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.choice((1, 2, 2, 3))
    objects: list[ShapeObject] = []
    used = set()
    for _ in range(count):
        size = rng.choice(sorted(SIZES))
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) in used:
            continue
        box = _place(rng, int(SIZES[size] * image_size), image_size, [o.box for o in objects])
        if box is None:
            continue
        used.add((colour, shape))
        objects.append(ShapeObject(shape, colour, size, box))
    return background, objects


def render(background: str, objects: list[ShapeObject], image_size: int, rng: random.Random) -> Image.Image:
    base = BACKGROUNDS[background]
    img = Image.new("RGB", (image_size, image_size), base)
    draw = ImageDraw.Draw(img)
    # A faint vertical gradient plus speckle so the background is not a constant.
    shade = rng.uniform(-25, 25)
    for y in range(image_size):
        t = shade * (y / image_size - 0.5)
        draw.line([(0, y), (image_size, y)], fill=tuple(int(min(255, max(0, c + t))) for c in base))
    for _ in range(image_size):
        x, y = rng.randrange(image_size), rng.randrange(image_size)
        v = rng.randint(-30, 30)
        draw.point((x, y), fill=tuple(int(min(255, max(0, c + v))) for c in base))
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    return img


def _region(obj: ShapeObject, image_size: int) -> str:
    cx, cy = obj.centre
    third = image_size / 3
    row = ("top", "middle", "bottom")[min(2, int(cy // third))]
    col = ("left", "centre", "right")[min(2, int(cx // third))]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"in the {row} {col}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b`, by the larger of the two centre offsets."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def captions_for(background: str, objects: list[ShapeObject], image_size: int) -> list[str]:
    """Five true captions of different kinds (attributes, relations, count, background)."""
    first = objects[0]
    caps = [f"{first.phrase()} {_region(first, image_size)}"]
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        caps.append(f"{a.phrase()} {_relation(a, b)} {b.phrase()}")
        caps.append(" and ".join(o.phrase(with_size=False) for o in objects) + f" on a {background} background")
    else:
        caps.append(f"{first.phrase(with_size=False)} on a {background} background")
        caps.append(f"a single {first.colour} {first.shape}")
    caps.append(f"{NUMBER_WORDS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: "
                + ", ".join(o.phrase() for o in objects))
    last = objects[-1]
    caps.append(f"there is {last.phrase()} {_region(last, image_size)}")
    return caps


def _jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic archives
    tar.addfile(info, io.BytesIO(data))


MALFORMED_KINDS = ("truncated_jpeg", "bad_json", "missing_jpeg")


def write_split(out_dir: Path, num_images: int, samples_per_shard: int, image_size: int,
                seed: int, key_prefix: str, malformed: int = 0) -> dict:
    """Writes one split's shards and returns its manifest entry.

    `malformed` extra samples of the kinds in MALFORMED_KINDS (cycled) are mixed into the
    shards; their keys are listed in the manifest so tests can check they are caught.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bad_at = set(rng.sample(range(num_images + malformed), malformed)) if malformed else set()
    shards, bad_keys = [], []
    total = num_images + malformed
    tar = None
    n_good = n_in_shard = 0
    for i in range(total):
        if tar is None or n_in_shard == samples_per_shard:
            if tar is not None:
                tar.close()
                shards[-1]["num_samples"] = n_in_shard
            name = f"{len(shards):06d}.tar"
            tar = tarfile.open(out_dir / name, "w", format=tarfile.USTAR_FORMAT)
            shards.append({"name": name, "num_samples": 0})
            n_in_shard = 0
        key = f"{key_prefix}{i:07d}"
        background, objects = sample_scene(rng, image_size)
        img = render(background, objects, image_size, rng)
        meta = {
            "key": key,
            "captions": captions_for(background, objects, image_size),
            "background": background,
            "width": image_size,
            "height": image_size,
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box)}
                        for o in objects],
        }
        meta["detections"] = detections_entry([o.box for o in objects], [o.object_id for o in objects],
                                              [o.attribute_ids for o in objects], image_size, image_size)
        boxes_npy = npy_bytes(normalised_boxes(meta["detections"]))
        feats_npy = npy_bytes(np.stack([o.region_feature() for o in objects]).astype(np.float16))
        jpeg, js = _jpeg_bytes(img), json.dumps(meta).encode()
        if i in bad_at:
            kind = MALFORMED_KINDS[len(bad_keys) % len(MALFORMED_KINDS)]
            bad_keys.append({"key": key, "kind": kind, "shard": shards[-1]["name"]})
            if kind == "truncated_jpeg":
                jpeg = jpeg[: len(jpeg) // 3]
            elif kind == "bad_json":
                js = js[: len(js) // 2]
            else:
                jpeg = b""
        else:
            n_good += 1
        if jpeg:
            _add(tar, f"{key}.jpg", jpeg)
        _add(tar, f"{key}.json", js)
        _add(tar, f"{key}.{BOXES_EXT}", boxes_npy)
        _add(tar, f"{key}.{FEATURES_EXT}", feats_npy)
        n_in_shard += 1
    tar.close()
    shards[-1]["num_samples"] = n_in_shard
    index_shards(str(out_dir))
    return {"num_samples": total, "num_good": n_good, "shards": shards, "malformed": bad_keys}


def make_dataset(out: str | Path, num_train: int = 2000, num_val: int = 200, samples_per_shard: int = 250,
                 image_size: int = 128, seed: int = 0, malformed: int = 0) -> dict:
    """Writes ``out/train`` and ``out/val`` shard folders and ``out/manifest.json``."""
    out = Path(out)
    manifest = {
        "seed": seed,
        "image_size": image_size,
        "vocabulary": {"colours": sorted(COLOURS), "shapes": list(SHAPES), "sizes": sorted(SIZES),
                       "backgrounds": sorted(BACKGROUNDS)},
        "detections": {"object_classes": OBJECT_CLASSES, "attribute_classes": ATTRIBUTE_CLASSES,
                       "region_feature_dim": REGION_FEATURE_DIM},
        "splits": {
            "train": write_split(out / "train", num_train, samples_per_shard, image_size, seed, "tr", malformed),
            "val": write_split(out / "val", num_val, samples_per_shard, image_size, seed + 1, "va"),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# --- downstream counterparts, in each benchmark's own file format ---

def _vqa_for(rng: random.Random, objects: list[ShapeObject]) -> list[tuple[str, str]]:
    """(question, answer) pairs about colour, shape, size, count and presence, all true of the scene."""
    qa = [("how many shapes are there?", str(len(objects)))]
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    o = rng.choice(objects)
    if shapes.count(o.shape) == 1:
        qa.append((f"what colour is the {o.shape}?", o.colour))
    if colours.count(o.colour) == 1:
        qa.append((f"what shape is the {o.colour} object?", o.shape))
        qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
    present = {(x.colour, x.shape) for x in objects}
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    if rng.random() < 0.5:
        colour, shape = o.colour, o.shape
    qa.append((f"is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no"))
    return qa


def _annotators(rng: random.Random, answer: str) -> list[str]:
    """Ten human-like answers: mostly the truth, sometimes spelled differently ("two" for "2")."""
    words = {v: k for k, v in {"one": "1", "two": "2", "three": "3"}.items()}
    return [words.get(answer, answer) if rng.random() < 0.2 else answer for _ in range(10)]


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


NEUTRAL = ("the {p} was drawn by a child", "the {p} is made of paper", "someone painted the {p} yesterday",
           "the {p} is the artist's favourite")


def _snli_hypothesis(rng: random.Random, background: str, objects: list[ShapeObject],
                     image_size: int) -> tuple[str, str]:
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


def make_downstream(out: str | Path, num_train: int = 400, num_eval: int = 100, image_size: int = 128,
                    seed: int = 100) -> dict:
    """Synthetic retrieval, VQA 2.0, NLVR2 and SNLI-VE sets under `out/`, in the real formats:
    Karpathy JSON, official VQA questions/annotations JSON (+ a test-dev questions file),
    NLVR2 JSON-lines with `split-set-pair-img{0,1}.png` images (JPEG data, as in the real
    release), SNLI-VE JSON-lines (train with "Flickr30K_ID", dev with the old "Flikr30kID")."""
    out = Path(out)
    rng = random.Random(seed)
    for sub in ("images", "retrieval", "vqa", "nlvr2", "snli_ve"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    scenes = {}
    split_of = {}
    for i in range(num_train + num_eval):
        image_id = 1000 + i
        background, objects = sample_scene(rng, image_size)
        render(background, objects, image_size, rng).save(out / "images" / f"{image_id}.jpg", quality=90)
        scenes[image_id] = (background, objects)
        split_of[image_id] = "train" if i < num_train else "test"

    karpathy, sentid = [], 0
    for imgid, (image_id, (background, objects)) in enumerate(scenes.items()):
        caps = captions_for(background, objects, image_size)
        sents = [{"tokens": c.replace(",", "").replace(":", "").split(), "raw": c, "imgid": imgid,
                  "sentid": sentid + k} for k, c in enumerate(caps)]
        karpathy.append({"sentids": [s["sentid"] for s in sents], "imgid": imgid, "sentences": sents,
                         "split": split_of[image_id], "filename": f"{image_id}.jpg"})
        sentid += len(caps)
    (out / "retrieval" / "dataset_synthetic.json").write_text(json.dumps({"images": karpathy,
                                                                          "dataset": "synthetic"}))

    header = {"info": {"description": "synthetic shapes, VQA v2 layout"}, "task_type": "Open-Ended",
              "data_type": "synthetic"}
    for split, ids in (("train", [i for i in scenes if split_of[i] == "train"]),
                       ("val", [i for i in scenes if split_of[i] == "test"])):
        questions, annotations = [], []
        for image_id in ids:
            for k, (q, a) in enumerate(_vqa_for(rng, scenes[image_id][1])):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": a,
                                    "answer_type": "yes/no" if a in ("yes", "no") else "number"
                                    if a.isdigit() else "other",
                                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, x in enumerate(_annotators(rng, a))]})
        (out / "vqa" / f"questions_{split}.json").write_text(json.dumps(
            {**header, "data_subtype": split, "questions": questions}))
        (out / "vqa" / f"annotations_{split}.json").write_text(json.dumps(
            {**header, "data_subtype": split, "annotations": annotations}))
        if split == "val":
            (out / "vqa" / "questions_test-dev.json").write_text(json.dumps(
                {**header, "data_subtype": "test-dev", "questions": questions}))

    for split, n_pairs in (("train", num_train), ("dev", num_eval)):
        lines = []
        for pair in range(n_pairs):
            (_, left), (_, right) = sample_scene(rng, image_size), sample_scene(rng, image_size)
            stem = f"{split}-{pair // 4}-{pair % 4}"
            for side, objs in (("img0", left), ("img1", right)):
                render("white", objs, image_size, rng).save(out / "images" / f"{stem}-{side}.png", format="JPEG")
            sentence, truth = _nlvr2_statement(rng, left, right)
            lines.append(json.dumps({"validation": {}, "sentence": sentence, "left_url": "", "writer": "0",
                                     "label": "True" if truth else "False", "right_url": "", "synset": "",
                                     "query": "", "identifier": f"{stem}-0"}))
        (out / "nlvr2" / f"{split}.json").write_text("\n".join(lines) + "\n")

    for split, key in (("train", "Flickr30K_ID"), ("dev", "Flikr30kID")):
        lines = []
        for image_id in [i for i in scenes if split_of[i] == ("train" if split == "train" else "test")]:
            background, objects = scenes[image_id]
            for k in range(3):
                hyp, label = _snli_hypothesis(rng, background, objects, image_size)
                value = str(image_id) if key == "Flickr30K_ID" else f"{image_id}.jpg"
                lines.append(json.dumps({key: value, "annotator_labels": [label], "captionID": f"{image_id}.jpg#0",
                                         "gold_label": label, "pairID": f"{image_id}.jpg#0r{k}{label[0]}",
                                         "sentence1": captions_for(background, objects, image_size)[0],
                                         "sentence2": hyp}, sort_keys=True))
        (out / "snli_ve" / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"images": len(scenes), "root": str(out)}
