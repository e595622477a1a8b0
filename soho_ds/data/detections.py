"""Attach offline detector outputs (bottom-up-attention style) to existing WebDataset shards.

Two common on-disk formats are read:
- **TSV** as written by the bottom-up-attention feature extractors, base64 fields, one image per
  line. Ten columns (LXMERT's release: ``img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features``) or six (the original BUTD release:
  ``image_id, image_w, image_h, num_boxes, boxes, features``, which has no class ids).
- **npz per image** (``<image_id>.npz``) as written by bottom-up-attention.pytorch: ``x``
  (features), ``bbox``, ``image_w``, ``image_h`` and ``info`` (a dict with ``objects_id``,
  ``attrs_id``, ``attrs_conf``); flat ``boxes``/``features``/``objects_id``/``attrs_id`` keys work too.

Each sample's JSON gains a ``detections`` entry (see `soho_ds.data.regions`) and the sample gains
``.boxes.npy`` and, unless disabled, ``.feats.npy`` members. A sample is matched by the JSON's
``image_id`` if it has one, else by its key. Samples with no detections keep an empty entry and
are counted, never dropped. Unknown classes (six-column TSV) are written as -1.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soho_ds.data import storage
from soho_ds.data.regions import BOXES_EXT, FEATURES_EXT, detections_entry, normalised_boxes, npy_bytes
from soho_ds.data.shards import index_shards, list_shards, refuse_filled_prefix, upload_shards

LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                 "boxes", "features")
BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class Detections:
    image_w: int
    image_h: int
    boxes: np.ndarray  # (n, 4) xyxy, original pixels
    object_ids: np.ndarray  # (n,) int, -1 where unknown
    attribute_ids: list[list[int]]
    features: np.ndarray | None  # (n, D)


def _attributes(ids: np.ndarray | None, conf: np.ndarray | None, n: int, threshold: float) -> list[list[int]]:
    """One list per box: the attribute ids whose confidence reaches `threshold` (all if no confidences)."""
    if ids is None or n == 0:
        return [[] for _ in range(n)]
    ids = ids.reshape(n, -1)
    conf = None if conf is None else conf.reshape(n, -1)
    return [[int(a) for k, a in enumerate(row) if conf is None or conf[i, k] >= threshold]
            for i, row in enumerate(ids)]


class TsvDetections:
    """Random access into a BUTD/LXMERT TSV by image id: one pass records each line's offset."""

    def __init__(self, path: str | Path, attr_threshold: float = 0.0):
        self.path, self.attr_threshold = Path(path), attr_threshold
        csv.field_size_limit(sys.maxsize)
        self.offsets: dict[str, int] = {}
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self.offsets[line.split(b"\t", 1)[0].decode()] = offset
                offset += len(line)

    def get(self, image_id: str) -> Detections | None:
        if image_id not in self.offsets:
            return None
        with open(self.path, "rb") as f:
            f.seek(self.offsets[image_id])
            line = f.readline().decode()
        row = next(csv.reader([line], delimiter="\t"))
        where = f"{self.path}: image {image_id}"
        if len(row) == len(LXMERT_FIELDS):
            item = dict(zip(LXMERT_FIELDS, row))
            w, h = int(item["img_w"]), int(item["img_h"])
        elif len(row) == len(BUTD_FIELDS):
            item = dict(zip(BUTD_FIELDS, row))
            w, h = int(item["image_w"]), int(item["image_h"])
        else:
            raise ValueError(f"{where}: {len(row)} tab-separated fields; expected {len(LXMERT_FIELDS)} "
                             f"({', '.join(LXMERT_FIELDS)}) or {len(BUTD_FIELDS)} ({', '.join(BUTD_FIELDS)})")

        def array(name, dtype):
            try:
                return np.frombuffer(base64.b64decode(item[name]), dtype=dtype)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: field {name} is not base64 {np.dtype(dtype).name} ({e})") from None

        n = int(item["num_boxes"])
        boxes = array("boxes", np.float32)
        if boxes.size != 4 * n:
            raise ValueError(f"{where}: num_boxes {n} but {boxes.size} box values")
        objects = array("objects_id", np.int64) if "objects_id" in item else np.full(n, -1)
        attrs = _attributes(array("attrs_id", np.int64) if "attrs_id" in item else None,
                            array("attrs_conf", np.float32) if "attrs_conf" in item else None, n,
                            self.attr_threshold)
        features = array("features", np.float32)
        return Detections(w, h, boxes.reshape(n, 4), objects, attrs, features.reshape(n, -1 if n else 0))


class NpzDetections:
    """A folder of ``<image_id>.npz`` files (bottom-up-attention.pytorch's extractor output)."""

    def __init__(self, folder: str | Path, attr_threshold: float = 0.0):
        self.folder, self.attr_threshold = Path(folder), attr_threshold

    def get(self, image_id: str) -> Detections | None:
        path = self.folder / f"{image_id}.npz"
        if not path.exists():
            return None
        # `info` is a pickled dict in that extractor's files; these are the user's own outputs.
        with np.load(path, allow_pickle=True) as z:
            data = {k: z[k] for k in z.files}
        info = data.pop("info").item() if "info" in data else {}
        data.update(info)

        def first(*names):
            for n in names:
                if n in data:
                    return np.asarray(data[n])
            return None

        boxes = first("bbox", "boxes")
        if boxes is None or first("image_w") is None or first("image_h") is None:
            raise ValueError(f"{path}: needs 'bbox' (or 'boxes'), 'image_w' and 'image_h'")
        boxes = boxes.astype(np.float32).reshape(-1, 4)
        n = len(boxes)
        objects = first("objects_id", "cls")
        features = first("x", "features")
        return Detections(int(first("image_w")), int(first("image_h")), boxes,
                          np.full(n, -1) if objects is None else objects.astype(np.int64).reshape(n),
                          _attributes(first("attrs_id", "attr"), first("attrs_conf"), n, self.attr_threshold),
                          None if features is None else features.astype(np.float32).reshape(n, -1 if n else 0))


def open_detections(path: str | Path, attr_threshold: float = 0.0):
    path = Path(path)
    if path.is_dir():
        return NpzDetections(path, attr_threshold)
    if path.is_file():
        return TsvDetections(path, attr_threshold)
    raise FileNotFoundError(f"{path}: no such detections TSV file or npz folder")


def attach_detections(shards: str, out_dir: str | Path, source, features: bool = True) -> dict:
    """Copies every shard of `shards` into `out_dir` with detections attached; indexes the result.
    Either side may be an object store prefix (s3://...): input objects are read through a temporary
    file each, and output is written locally, checked, then uploaded.

    Returns counts: samples, with detections, without (kept, with an empty entry) and boxes.
    """
    if storage.is_s3(out_dir):
        refuse_filled_prefix(str(out_dir))
        with tempfile.TemporaryDirectory(prefix="soho_ds_detections_") as stage:
            report = attach_detections(shards, stage, source, features)
            upload_shards(stage, str(out_dir))
        return report
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"samples": 0, "with_detections": 0, "without_detections": [], "boxes": 0}
    for path in list_shards(shards):
        with storage.local_file(path) as local, tarfile.open(local) as tin, tarfile.open(
                out_dir / storage.name(path), "w", format=tarfile.USTAR_FORMAT) as tout:
            members = [m for m in tin.getmembers() if m.isfile()]
            data = {m.name: tin.extractfile(m).read() for m in members}
            for m in members:
                if m.name.endswith((f".{BOXES_EXT}", f".{FEATURES_EXT}")):
                    continue  # replaced below
                payload = data[m.name]
                if m.name.endswith(".json"):
                    key = m.name[: -len(".json")]
                    payload = _attach_one(path, key, payload, source, features, tout, report)
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime = len(payload), m.mtime
                tout.addfile(info, io.BytesIO(payload))
    index_shards(str(out_dir))
    return report


def _attach_one(shard: str, key: str, raw_json: bytes, source, features: bool, tout, report: dict) -> bytes:
    try:
        meta = json.loads(raw_json)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw_json  # malformed sample: left as it is, the indexer reports and skips it
    report["samples"] += 1
    image_id = str(meta.get("image_id", key))
    det = source.get(image_id)
    if det is None:
        report["without_detections"].append(f"{shard}:{key}")
        w, h = meta.get("width", 1), meta.get("height", 1)
        entry, feats = detections_entry(np.zeros((0, 4)), [], [], w, h), None
    else:
        report["with_detections"] += 1
        report["boxes"] += len(det.boxes)
        entry = detections_entry(det.boxes, det.object_ids, det.attribute_ids, det.image_w, det.image_h)
        feats = det.features
    meta["detections"] = entry

    def add(name: str, payload: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tout.addfile(info, io.BytesIO(payload))

    add(f"{key}.{BOXES_EXT}", npy_bytes(normalised_boxes(entry)))
    if features:
        dim = 0 if feats is None else feats.shape[1]
        add(f"{key}.{FEATURES_EXT}", npy_bytes((feats if feats is not None else np.zeros((0, dim))).astype(np.float16)))
    return json.dumps(meta).encode()
