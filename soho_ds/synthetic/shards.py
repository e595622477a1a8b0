"""Synthetic pretraining shards: WebDataset tars of the shapes world, checked and indexed.

Each sample is ``key.jpg`` + ``key.json`` (captions, scene graph, detections) + the detector
members the semantic losses read (``key.boxes.npy``, ``key.feats.npy``). Each split folder gets
a ``manifest.json`` like the converters write; ``out/manifest.json`` describes the vocabulary.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np

from soho_ds.data.regions import BOXES_EXT, FEATURES_EXT, detections_entry, normalised_boxes, npy_bytes
from soho_ds.data.shards import index_shards
from soho_ds.synthetic.world import (ATTRIBUTE_CLASSES, BACKGROUNDS, COLOURS, OBJECT_CLASSES, REGION_FEATURE_DIM,
                                     SHAPES, SIZES, captions_for, image_shape, jpeg_bytes, render, sample_scene)

# Broken samples for tests of the checker: cut JPEG, JSON cut in half, no image member, a JPEG
# whose markers are intact but whose middle is noise, and a caption list of empty strings.
MALFORMED_KINDS = ("truncated_jpeg", "bad_json", "missing_jpeg", "garbled_jpeg", "empty_captions")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic archives
    tar.addfile(info, io.BytesIO(data))


def _sample(rng: random.Random, key: str, side: int, non_square: float) -> dict[str, bytes]:
    """The members of one good sample."""
    scene = sample_scene(rng, *image_shape(rng, side, non_square))
    objects = scene.objects
    meta = {"key": key, "captions": captions_for(scene), "background": scene.background,
            "width": scene.width, "height": scene.height,
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box)} for o in objects]}
    meta["detections"] = detections_entry([o.box for o in objects], [o.object_id for o in objects],
                                          [o.attribute_ids for o in objects], scene.width, scene.height)
    return {"jpg": jpeg_bytes(render(scene, rng)), "json": json.dumps(meta).encode(),
            BOXES_EXT: npy_bytes(normalised_boxes(meta["detections"])),
            FEATURES_EXT: npy_bytes(np.stack([o.region_feature() for o in objects]).astype(np.float16))}


def _break(members: dict[str, bytes], kind: str, rng: random.Random) -> dict[str, bytes]:
    jpeg, meta = members["jpg"], members["json"]
    if kind == "truncated_jpeg":
        return {**members, "jpg": jpeg[: len(jpeg) // 3]}
    if kind == "bad_json":
        return {**members, "json": meta[: len(meta) // 2]}
    if kind == "missing_jpeg":
        return {k: v for k, v in members.items() if k != "jpg"}
    if kind == "garbled_jpeg":
        noise = bytes(rng.randrange(256) for _ in range(len(jpeg) - 400))
        return {**members, "jpg": jpeg[:200] + noise + jpeg[-200:]}
    return {**members, "json": json.dumps({**json.loads(meta), "captions": ["", " "]}).encode()}


def write_split(out_dir: Path, num_images: int, samples_per_shard: int, image_size: int, seed: int,
                key_prefix: str, malformed: int = 0, non_square: float = 0.0) -> dict:
    """Writes one split's shards, its manifest.json and DALI indexes; returns the manifest.

    `malformed` extra samples of the kinds in MALFORMED_KINDS (cycled) are mixed into the shards;
    their keys are listed in the manifest so tests can check that the checker catches them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total = num_images + malformed
    bad_at = set(rng.sample(range(total), malformed)) if malformed else set()
    shards, bad_keys = [], []
    for start in range(0, total, samples_per_shard):
        name = f"{len(shards):06d}.tar"
        with tarfile.open(out_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(total, start + samples_per_shard)):
                key = f"{key_prefix}{i:07d}"
                members = _sample(rng, key, image_size, non_square)
                if i in bad_at:
                    kind = MALFORMED_KINDS[len(bad_keys) % len(MALFORMED_KINDS)]
                    bad_keys.append({"key": key, "kind": kind, "shard": name})
                    members = _break(members, kind, rng)
                for ext, data in members.items():
                    add_member(tar, f"{key}.{ext}", data)
        shards.append({"name": name, "num_samples": min(total, start + samples_per_shard) - start})
    manifest = {"num_samples": total, "num_good": num_images, "shards": shards, "malformed": bad_keys}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    index_shards(str(out_dir))
    return manifest


def make_dataset(out: str | Path, num_train: int = 2000, num_val: int = 200, samples_per_shard: int = 250,
                 image_size: int = 128, seed: int = 0, malformed: int = 0, non_square: float = 0.0) -> dict:
    """Writes ``out/train`` and ``out/val`` shard folders and ``out/manifest.json``; `image_size` is
    each image's shorter side, `non_square` the share of 4:3 / 3:4 images."""
    out = Path(out)
    manifest = {
        "seed": seed, "image_size": image_size, "non_square": non_square,
        "vocabulary": {"colours": sorted(COLOURS), "shapes": list(SHAPES), "sizes": sorted(SIZES),
                       "backgrounds": sorted(BACKGROUNDS)},
        "detections": {"object_classes": OBJECT_CLASSES, "attribute_classes": ATTRIBUTE_CLASSES,
                       "region_feature_dim": REGION_FEATURE_DIM},
        "splits": {
            "train": write_split(out / "train", num_train, samples_per_shard, image_size, seed, "tr", malformed,
                                 non_square),
            "val": write_split(out / "val", num_val, samples_per_shard, image_size, seed + 1, "va", 0, non_square),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
