"""Attach offline detector outputs (bottom-up-attention style) to existing WebDataset shards.

Three common on-disk formats are read:
- **VinVL** (microsoft/scene_graph_benchmark): ``predictions.tsv``, one image per line, its id and
  a JSON whose ``objects`` carry ``rect`` (x1, y1, x2, y2 in original pixels), ``class``, ``conf``,
  ``attributes`` and ``attr_scores`` (``image_w``/``image_h`` where the dump has them, else the
  sample's size); classes are names, turned into ids by the label map
  ``VG-SGG-dicts-vgoi6-clipped.json`` (``label_to_idx``, ``attribute_to_idx``, 1-based: stored
  0-based, 1,594 objects and 524 attributes); region features optionally from a parallel
  ``features.tsv`` (id, box count, base64 float32 of 2,048 + 6 values per box).
- **TSV** as written by the bottom-up-attention feature extractors, base64 fields, one image per
  line. Ten columns (LXMERT's release: ``img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features``) or six (the original BUTD release:
  ``image_id, image_w, image_h, num_boxes, boxes, features``, which has no class ids).
- **npz per image** (``<image_id>.npz``) as written by bottom-up-attention.pytorch: ``x``
  (features), ``bbox``, ``image_w``, ``image_h`` and ``info`` (a dict with ``objects_id``,
  ``attrs_id``, ``attrs_conf``); flat ``boxes``/``features``/``objects_id``/``attrs_id`` keys work too.

Each sample's JSON gains a ``detections`` entry (see `soho_ds.data.regions`) and the sample gains
``.boxes.npy`` and, unless disabled, ``.feats.npy`` members. A sample is matched by the JSON's
``image_id`` if it has one, else by its key; ids are compared normalised (`normalise_image_id`:
``COCO_val2014_000000262148``, ``000000262148.jpg`` and ``262148`` are one image). Samples with no
detections keep an empty entry and are counted, never dropped; a file that matches no sample at all
is refused. Unknown classes (six-column TSV) are written as -1. The output folder gets
``detections.json``: per shard, how many samples got boxes, and whether the file carried object and
attribute ids (pretraining refuses object / attribute losses on shards whose file had none).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
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


REPORT = "detections.json"  # beside the output shards
IMAGE_ID = re.compile(r"(?:[A-Za-z0-9]+_[A-Za-z]+\d*_)?0*(\d+)(?:\.[A-Za-z]+)?")


class DetectionsError(ValueError):
    """A detector file that cannot be used as it is, with the file and what is wrong named."""


def normalise_image_id(image_id) -> str:
    """One spelling per image: COCO's file stems (COCO_val2014_000000262148), zero-padded or with an
    extension (000000262148.jpg) and the plain integer all become "262148"; other ids stay as they are."""
    text = str(image_id).strip()
    match = IMAGE_ID.fullmatch(text)
    return str(int(match.group(1))) if match else text


@dataclass
class Detections:
    image_w: int | None  # None: the sample's own size (the detector ran on the stored image)
    image_h: int | None
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
        self.offsets = _line_offsets(self.path)
        self.has_objects = self.has_attributes = None  # known once a line is read: set by get()

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, image_id: str) -> Detections | None:
        image_id = normalise_image_id(image_id)
        line = _read_line(self.path, self.offsets, image_id)
        if line is None:
            return None
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
        self.has_objects = self.has_attributes = "objects_id" in item
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
        self.files = {normalise_image_id(p.stem): p for p in sorted(self.folder.glob("*.npz"))}
        self.path = self.folder
        self.has_objects = self.has_attributes = None

    def __len__(self) -> int:
        return len(self.files)

    def get(self, image_id: str) -> Detections | None:
        path = self.files.get(normalise_image_id(image_id))
        if path is None:
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
        self.has_objects = objects is not None
        self.has_attributes = first("attrs_id", "attr") is not None
        features = first("x", "features")
        return Detections(int(first("image_w")), int(first("image_h")), boxes,
                          np.full(n, -1) if objects is None else objects.astype(np.int64).reshape(n),
                          _attributes(first("attrs_id", "attr"), first("attrs_conf"), n, self.attr_threshold),
                          None if features is None else features.astype(np.float32).reshape(n, -1 if n else 0))


class VinVLDetections:
    """VinVL's predictions.tsv (+ its label map, + optionally its features.tsv), by image id."""

    def __init__(self, path: str | Path, label_map: str | Path, attr_threshold: float = 0.0,
                 features: str | Path | None = None):
        self.path, self.attr_threshold = Path(path), attr_threshold
        try:
            labels = json.loads(Path(label_map).read_text())
            self.objects = {name: int(i) - 1 for name, i in labels["label_to_idx"].items()}
            self.attributes = {name: int(i) - 1 for name, i in labels["attribute_to_idx"].items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DetectionsError(f"{label_map}: not a VinVL label map with 'label_to_idx' and 'attribute_to_idx' "
                                  f"({type(e).__name__}: {e})") from None
        self.offsets = _line_offsets(self.path)
        self.features = None if features is None else TsvFeatures(features)
        self.has_objects = self.has_attributes = True

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, image_id: str) -> Detections | None:
        key = normalise_image_id(image_id)
        line = _read_line(self.path, self.offsets, key)
        if line is None:
            return None
        raw_id, _, payload = line.rstrip("\n").partition("\t")
        where = f"{self.path}: image {raw_id}"
        try:
            record = json.loads(payload)
            objects = record["objects"]
            boxes = np.array([o["rect"] for o in objects], dtype=np.float32).reshape(-1, 4)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DetectionsError(f"{where}: expected JSON with 'objects', each with 'rect' ({type(e).__name__}: "
                                  f"{e})") from None
        ids, attrs = [], []
        for o in objects:
            name = o.get("class")
            if name not in self.objects:
                raise DetectionsError(f"{where}: class {name!r} is not in the label map's label_to_idx")
            ids.append(self.objects[name])
            scores = o.get("attr_scores") or [1.0] * len(o.get("attributes", []))
            unknown = [a for a in o.get("attributes", []) if a not in self.attributes]
            if unknown:
                raise DetectionsError(f"{where}: attribute {unknown[0]!r} is not in the label map's attribute_to_idx")
            attrs.append([self.attributes[a] for a, s in zip(o.get("attributes", []), scores)
                          if s >= self.attr_threshold])
        features = self.features.get(key, len(boxes)) if self.features is not None else None
        return Detections(record.get("image_w"), record.get("image_h"), boxes, np.array(ids, dtype=np.int64), attrs,
                          features)


class TsvFeatures:
    """VinVL's features.tsv: id, box count, base64 float32 of each box's feature (2,048 values, and the
    6 box values many dumps append, which are dropped)."""

    def __init__(self, path: str | Path, dim: int = 2048):
        self.path, self.dim = Path(path), dim
        self.offsets = _line_offsets(self.path)

    def get(self, key: str, n: int) -> np.ndarray:
        line = _read_line(self.path, self.offsets, key)
        if line is None:
            raise DetectionsError(f"{self.path}: no features for image {key}, which the predictions list")
        fields = line.rstrip("\n").split("\t")
        values = np.frombuffer(base64.b64decode(fields[-1]), dtype=np.float32)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if values.size % n or values.size // n < self.dim:
            raise DetectionsError(f"{self.path}: image {key}: {values.size} values for {n} boxes; expected "
                                  f"{self.dim} (or {self.dim} + 6) per box")
        return values.reshape(n, -1)[:, :self.dim]


def _read_line(path: Path, offsets: dict[str, int], key: str) -> str | None:
    """The line of normalised id `key` (None if the file has none)."""
    if key not in offsets:
        return None
    with open(path, "rb") as f:
        f.seek(offsets[key])
        return f.readline().decode()


def _line_offsets(path: Path) -> dict[str, int]:
    """Each line's byte offset by its first tab-separated field, normalised (`normalise_image_id`)."""
    offsets, offset = {}, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets[normalise_image_id(line.split(b"\t", 1)[0].decode())] = offset
            offset += len(line)
    return offsets


def open_detections(path: str | Path, attr_threshold: float = 0.0, label_map: str | Path | None = None,
                    features: str | Path | None = None):
    """The reader for `path`: a folder of npz files, a BUTD/LXMERT TSV, or VinVL's predictions.tsv
    (recognised by its JSON column; it needs the `label_map`, and reads `features` if given)."""
    path = Path(path)
    if path.is_dir():
        return NpzDetections(path, attr_threshold)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such detections TSV file or npz folder")
    with open(path, "rb") as f:
        first = f.readline().split(b"\t", 1)
    if len(first) == 2 and first[1].lstrip().startswith(b"{"):
        if label_map is None:
            raise DetectionsError(f"{path}: VinVL predictions name their classes; give the label map "
                                  f"(VG-SGG-dicts-vgoi6-clipped.json) to turn them into ids")
        return VinVLDetections(path, label_map, attr_threshold, features)
    return TsvDetections(path, attr_threshold)


def attach_detections(shards: str, out_dir: str | Path, source, features: bool = True) -> dict:
    """Copies every shard of `shards` into `out_dir` with detections attached; indexes the result.
    Either side may be an object store prefix (s3://...): input objects are read through a temporary
    file each, and output is written locally, checked, then uploaded.

    Returns counts: samples, with detections, without (kept, with an empty entry) and boxes, and per
    shard; they are also written to `out_dir`/detections.json. A file whose records match no sample is
    refused (DetectionsError naming both sides' ids), and its output removed.
    """
    if storage.is_s3(out_dir):
        refuse_filled_prefix(str(out_dir))
        with tempfile.TemporaryDirectory(prefix="soho_ds_detections_") as stage:
            report = attach_detections(shards, stage, source, features)
            upload_shards(stage, str(out_dir))
        return report
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"samples": 0, "with_detections": 0, "without_detections": [], "boxes": 0, "shards": {},
              "detections": str(getattr(source, "path", source))}
    written, seen_ids = [], []
    for path in list_shards(shards):
        before = (report["samples"], report["with_detections"], report["boxes"])
        written.append(out_dir / storage.name(path))
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
                    payload = _attach_one(path, key, payload, source, features, tout, report, seen_ids)
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime = len(payload), m.mtime
                tout.addfile(info, io.BytesIO(payload))
        report["shards"][storage.name(path)] = {"samples": report["samples"] - before[0],
                                                "with_detections": report["with_detections"] - before[1],
                                                "boxes": report["boxes"] - before[2]}
    if report["samples"] and not report["with_detections"]:
        for tar in written:
            tar.unlink(missing_ok=True)
        theirs = ", ".join(list(getattr(source, "offsets", getattr(source, "files", {})))[:3])
        raise DetectionsError(f"{report['detections']}: none of its {len(source)} records matches any of the "
                              f"{report['samples']} samples of {shards} (their image ids: {', '.join(seen_ids[:3])}; "
                              f"the file's: {theirs}): is it the detections of these images?")
    report["object_ids"] = bool(source.has_objects)
    report["attribute_ids"] = bool(source.has_attributes)
    index_shards(str(out_dir))
    (out_dir / REPORT).write_text(json.dumps({k: v for k, v in report.items() if k != "without_detections"},
                                             indent=1))
    return report


def _attach_one(shard: str, key: str, raw_json: bytes, source, features: bool, tout, report: dict,
                seen_ids: list) -> bytes:
    try:
        meta = json.loads(raw_json)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw_json  # malformed sample: left as it is, the indexer reports and skips it
    report["samples"] += 1
    image_id = normalise_image_id(meta.get("image_id", key))
    if len(seen_ids) < 3:
        seen_ids.append(image_id)
    det = source.get(image_id)
    if det is None:
        report["without_detections"].append(f"{shard}:{key}")
        w, h = meta.get("width", 1), meta.get("height", 1)
        entry, feats = detections_entry(np.zeros((0, 4)), [], [], w, h), None
    else:
        report["with_detections"] += 1
        report["boxes"] += len(det.boxes)
        entry = detections_entry(det.boxes, det.object_ids, det.attribute_ids, det.image_w or meta.get("width", 1),
                                 det.image_h or meta.get("height", 1))
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
