"""Readers of the datasets users have on disk, each yielding `Record`s for `convert.write_shards`.

COCO captions, Visual Genome region descriptions, caption + path TSVs (Conceptual Captions, SBU
after the user's own download), img2dataset output (webdataset tars, or files + parquet) and the
Karpathy split JSON (COCO, Flickr30k). Records are small (a path or one image's bytes, captions):
annotation files are read once, Visual Genome's large region file is streamed, images are read
only when their shard is written. A record that must be left out says why (`drop`), so that
the manifest counts it.
"""
from __future__ import annotations

import csv
import json
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


@dataclass
class Record:
    key: str  # unique in the output; the shard member names
    image: str | bytes | None  # a path to read, or the image's encoded bytes
    captions: list[str]
    meta: dict = field(default_factory=dict)  # extra JSON fields (source, image_id, ...)
    drop: str | None = None  # why this record is left out, when the reader already knows


EXCLUDED = "excluded split (Karpathy val/test)"
NO_CAPTION = "no caption"


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def karpathy_eval_images(paths: Iterable[str | Path], splits: tuple[str, ...] = ("val", "test")) -> dict[str, set]:
    """COCO image ids and file names of the Karpathy `splits` in the given split JSONs: the images
    pretraining must not see (SOHO evaluates retrieval on them)."""
    ids, names = set(), set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        for rec in data.get("images", []):
            if rec.get("split") in splits:
                if rec.get("cocoid") is not None:
                    ids.add(int(rec["cocoid"]))
                names.add(rec["filename"])
    return {"ids": ids, "names": names}


def iter_json_list(path: str | Path, chunk: int = 1 << 20) -> Iterator[dict]:
    """The objects of a JSON file holding one list of objects, one at a time, without reading it all
    into memory (Visual Genome's region_descriptions.json is ~700 MB)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk)
        pos = len(buf) - len(buf.lstrip())
        if buf[pos:pos + 1] != "[":
            raise ValueError(f"{path}: expected a JSON list")
        pos += 1
        while True:
            while True:  # skip separators, reading on as needed
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf):
                    break
                buf, pos = f.read(chunk), 0
                if not buf:
                    raise ValueError(f"{path}: the list is not closed")
            if buf[pos] == "]":
                return
            while True:  # an object cut by the end of the buffer does not parse: read on
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    more = f.read(chunk)
                    if not more:
                        raise ValueError(f"{path}: truncated JSON near character {pos}") from None
                    buf, pos = buf[pos:] + more, 0
            yield value
            pos = end
            if pos > chunk:  # drop what was consumed, now and then (not per object: that copies the buffer)
                buf, pos = buf[pos:], 0


def coco_captions(annotation_files: list[str | Path], images: str | Path, exclude: dict | None = None
                  ) -> Iterator[Record]:
    """COCO's captions_{train,val}2014.json: one record per image with all its captions. Images are
    looked up as IMAGES/<train2014|val2014>/<file_name> (the annotation file's split), else IMAGES/<file_name>."""
    exclude = exclude or {"ids": set(), "names": set()}
    for ann_path in annotation_files:
        data = json.loads(Path(ann_path).read_text())
        subdir = Path(ann_path).stem.split("_", 1)[-1]  # captions_train2014 -> train2014
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(clean(ann["caption"]))
        for img in data["images"]:
            caps = [c for c in captions.get(img["id"], []) if c]
            path = Path(images) / subdir / img["file_name"]
            if not path.exists():
                path = Path(images) / img["file_name"]
            drop = EXCLUDED if img["id"] in exclude["ids"] or img["file_name"] in exclude["names"] else (
                None if caps else NO_CAPTION)
            yield Record(f"coco_{img['id']}", str(path), caps, {"source": "coco", "image_id": img["id"],
                                                                "file_name": img["file_name"]}, drop)


def visual_genome(region_file: str | Path, image_data_file: str | Path, images: str | Path,
                  exclude: dict | None = None, max_captions: int = 10) -> Iterator[Record]:
    """Visual Genome's region_descriptions.json (v1.2, or v1.0's region layout) with image_data.json:
    an image's region phrases, stripped and deduplicated (case-insensitive, first kept), at most
    `max_captions`; images in COCO's Karpathy val/test (image_data's coco_id) are left out."""
    exclude = exclude or {"ids": set(), "names": set()}
    info = {rec["image_id"]: rec for rec in json.loads(Path(image_data_file).read_text())}
    for entry in iter_json_list(region_file):
        image_id = entry["id"]
        rec = info.get(image_id, {})
        seen, caps = set(), []
        for region in entry["regions"]:
            phrase = clean(region.get("phrase", ""))
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                caps.append(phrase)
        url_parts = rec.get("url", f"/VG_100K/{image_id}.jpg").split("/")
        path = Path(images) / url_parts[-2] / url_parts[-1]
        if not path.exists():
            path = Path(images) / url_parts[-1]
        coco_id = rec.get("coco_id")
        drop = EXCLUDED if coco_id is not None and int(coco_id) in exclude["ids"] else (None if caps else NO_CAPTION)
        yield Record(f"vg_{image_id}", str(path), caps[:max_captions],
                     {"source": "visual_genome", "image_id": image_id, "coco_id": coco_id,
                      "regions": len(entry["regions"]), "phrases_kept": min(len(caps), max_captions)}, drop)


def caption_tsv(tsv: str | Path, images: str | Path, caption_col: int = 0, path_col: int = 1,
                skip_header: bool = False, name: str = "tsv") -> Iterator[Record]:
    """A TSV of caption and local image path per line (Conceptual Captions' caption<TAB>url layout
    once the images are downloaded, SBU's captions, any custom set); paths relative to `images`."""
    csv.field_size_limit(sys.maxsize)
    with open(tsv, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if n == 1 and skip_header:
                continue
            if len(row) <= max(caption_col, path_col):
                yield Record(f"{name}_{n:09d}", None, [], {"source": name, "line": n},
                             f"malformed line ({tsv}:{n}: {len(row)} columns; a caption in column {caption_col} and "
                             f"a path in column {path_col} expected)")
                continue
            caption = clean(row[caption_col])
            yield Record(f"{name}_{n:09d}", str(Path(images) / row[path_col].strip()), [caption] if caption else [],
                         {"source": name, "line": n, "path": row[path_col].strip()}, None if caption else NO_CAPTION)


def _img2dataset_failures(folder: Path) -> list[Record]:
    """img2dataset's failed downloads: from its parquet files (pyarrow) when present, else counted
    from the *_stats.json files."""
    out = []
    parquets = sorted(folder.glob("*.parquet"))
    if parquets:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading img2dataset's parquet needs pyarrow (pip install 'soho-ds[parquet]')") from None
        for p in parquets:
            for row in pq.read_table(p).to_pylist():
                if row.get("status") != "success":
                    out.append(Record(f"i2d_{row.get('key')}", None, [], {"source": "img2dataset", "url": row.get("url")},
                                      f"failed download ({row.get('error_message') or row.get('status')})"))
        return out
    for stats in sorted(folder.glob("*_stats.json")):
        s = json.loads(stats.read_text())
        for status, count in s.get("status_dict", {}).items():
            if status != "success":
                out += [Record(f"i2d_{stats.stem}_{status}_{i}", None, [], {"source": "img2dataset"},
                               f"failed download ({status})") for i in range(count)]
    return out


def img2dataset(folder: str | Path) -> Iterator[Record]:
    """img2dataset's output: webdataset tars (NNNNN.tar holding key.jpg, key.txt, key.json) or its
    files layout (NNNNN/ folders of the same members); captions from .txt (else the JSON's caption).
    The downloads it could not make are left out and counted with its error message."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if tars:
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rpartition("/")[2].partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
                    if {"jpg", "txt", "json"} <= set(members[key]):
                        yield _img2dataset_record(key, members.pop(key))
                for key, parts in members.items():
                    yield _img2dataset_record(key, parts)
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            for image in sorted(sub.glob("*.jpg")):
                parts = {"jpg": str(image)}
                for ext in ("txt", "json"):
                    if image.with_suffix(f".{ext}").exists():
                        parts[ext] = image.with_suffix(f".{ext}").read_bytes()
                yield _img2dataset_record(image.stem, parts)
    yield from _img2dataset_failures(folder)


def _img2dataset_record(key: str, parts: dict) -> Record:
    meta = json.loads(parts["json"]) if "json" in parts else {}
    caption = clean(parts["txt"].decode("utf-8", errors="replace")) if "txt" in parts else clean(
        meta.get("caption") or "")
    keep = {k: meta[k] for k in ("url", "original_width", "original_height", "sha256") if k in meta}
    image = parts.get("jpg")
    drop = "no image member" if image is None else (None if caption else NO_CAPTION)
    return Record(f"i2d_{key}", image, [caption] if caption else [], {"source": "img2dataset", **keep}, drop)


def karpathy(split_json: str | Path, images: str | Path, splits: tuple[str, ...] = ("train", "restval")
             ) -> Iterator[Record]:
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: the images of `splits` with their
    sentences (COCO records carry a filepath: train2014 / val2014)."""
    data = json.loads(Path(split_json).read_text())
    name = data.get("dataset", "karpathy")
    for rec in data["images"]:
        path = Path(images) / rec.get("filepath", "") / rec["filename"]
        caps = [clean(s["raw"]) for s in rec.get("sentences", []) if clean(s.get("raw", ""))]
        image_id = rec.get("cocoid", rec.get("imgid"))
        drop = (None if rec["split"] in splits else f"split {rec['split']} not converted") if caps else NO_CAPTION
        yield Record(f"{name}_{image_id}", str(path), caps, {"source": name, "image_id": image_id,
                                                             "split": rec["split"], "file_name": rec["filename"]}, drop)
