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

from soho_ds.config import ReportedError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes (its --encode_format)


class SourceError(ReportedError, ValueError):
    """An input file a reader cannot use at all, named with the line or key and the way out."""


def read_json(path: str | Path):
    """A whole JSON file; an unreadable one is refused naming the file and where it breaks."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def download_hint(what: str, example_url: str, command: str) -> SourceError:
    return SourceError(f"{what} names images by URL ({example_url}): download them first, e.g. with img2dataset:\n"
                       f"  {command}\nthen convert its output: soho-convert img2dataset --folder <its "
                       "--output_folder> --out <shards>")


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
        data = read_json(path)
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
    """COCO's captions_{train,val}{2014,2017}.json (under any file name): one record per image with all
    its captions. An image is looked up as IMAGES/<split folder>/<file_name>, the split folder read
    from the image's coco_url (train2017, val2014, ...), its file name (COCO_train2014_...) or the
    annotation file's name (captions_train2014.json), else as IMAGES/<file_name>."""
    exclude = exclude or {"ids": set(), "names": set()}
    for ann_path in annotation_files:
        data = read_json(ann_path)
        for key in ("images", "annotations"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise SourceError(f"{ann_path}: no '{key}' list: not a COCO captions file")
        from_name = Path(ann_path).stem.split("_", 1)[-1]  # captions_train2014 -> train2014
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(clean(ann["caption"]))
        for img in data["images"]:
            caps = [c for c in captions.get(img["id"], []) if c]
            folders = [img.get("coco_url", "").rstrip("/").split("/")[-2:-1],
                       re.findall(r"^COCO_([a-z]+\d{4})_", img["file_name"]), [from_name]]
            candidates = [Path(images) / f[0] / img["file_name"] for f in folders if f and f[0]]
            path = next((c for c in candidates if c.exists()), Path(images) / img["file_name"])
            drop = EXCLUDED if img["id"] in exclude["ids"] or img["file_name"] in exclude["names"] else (
                None if caps else NO_CAPTION)
            yield Record(f"coco_{img['id']}", str(path), caps, {"source": "coco", "image_id": img["id"],
                                                                "file_name": img["file_name"]}, drop)


def visual_genome(region_file: str | Path, image_data_file: str | Path, images: str | Path,
                  exclude: dict | None = None, max_captions: int | None = None) -> Iterator[Record]:
    """Visual Genome's region_descriptions.json (v1.2, or v1.0's region layout) with image_data.json:
    an image's region phrases, stripped and deduplicated (case-insensitive, first kept), all of them as
    SOHO's data has them (about 50 an image) or at most `max_captions`; images in COCO's Karpathy
    val/test (image_data's coco_id) are left out."""
    exclude = exclude or {"ids": set(), "names": set()}
    info = {rec["image_id"]: rec for rec in read_json(image_data_file)}
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
        caps = caps[:max_captions]
        yield Record(f"vg_{image_id}", str(path), caps,
                     {"source": "visual_genome", "image_id": image_id, "coco_id": coco_id,
                      "regions": len(entry["regions"]), "phrases_kept": len(caps)}, drop)


def caption_tsv(tsv: str | Path, images: str | Path, caption_col: int = 0, path_col: int = 1,
                skip_header: bool = False, name: str = "tsv") -> Iterator[Record]:
    """A TSV of caption and local image path per line (Conceptual Captions' caption<TAB>url layout
    once the images are downloaded, SBU's captions, any custom set); paths relative to `images`."""
    csv.field_size_limit(sys.maxsize)
    try:
        f = open(tsv, "rb")
    except FileNotFoundError:
        raise SourceError(f"{tsv}: file not found") from None
    with f:
        for n, raw in enumerate(f, 1):
            if n == 1 and skip_header:
                continue
            where = {"source": name, "file": str(tsv), "line": n}
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Record(f"{name}_{n:09d}", None, [], where, f"not UTF-8 ({tsv}:{n}: byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
            if len(row) <= max(caption_col, path_col):
                yield Record(f"{name}_{n:09d}", None, [], where,
                             f"malformed line ({tsv}:{n}: {len(row)} columns; a caption in column {caption_col} and "
                             f"a path in column {path_col} expected)")
                continue
            path = row[path_col].strip()
            if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
                named = f"{Path(tsv).stem}_with_header.tsv"  # img2dataset reads columns by name
                raise download_hint(f"{tsv}:{n}: column {path_col}", path[:100],
                                    f"(printf 'caption\\turl\\n'; cat {tsv}) > {named}   # Conceptual Captions has no "
                                    f"header line\n  img2dataset --url_list {named} --input_format tsv --url_col url "
                                    "--caption_col caption --output_format webdataset --output_folder <folder>")
            caption = clean(row[caption_col])
            yield Record(f"{name}_{n:09d}", str(Path(images) / path), [caption] if caption else [],
                         {**where, "path": path}, None if caption else NO_CAPTION)


def sbu_captions(json_path: str | Path, images: str | Path | None) -> Iterator[Record]:
    """The official SBU Captions file (sbu-captions-all.json: parallel lists image_urls, user_ids,
    captions) with the photos downloaded into `images`, each under its URL's file name
    (<photo id>_<secret>.jpg) or <photo id>.jpg. Without `images` it answers with the download step."""
    data = read_json(json_path)
    lists = {k: data.get(k) if isinstance(data, dict) else None for k in ("image_urls", "captions")}
    for key, value in lists.items():
        if not isinstance(value, list):
            raise SourceError(f"{json_path}: no '{key}' list: not the SBU Captions file (sbu-captions-all.json)")
    urls, captions = lists["image_urls"], lists["captions"]
    if len(urls) != len(captions):
        raise SourceError(f"{json_path}: {len(urls)} image_urls but {len(captions)} captions: the file is damaged")
    if images is None:
        raise download_hint(f"{json_path}", urls[0] if urls else "image_urls",
                            f"img2dataset --url_list {json_path} --input_format json --url_col image_urls "
                            "--caption_col captions --output_format webdataset --output_folder <folder>   (or "
                            "download them into a folder and pass it as --images)")
    for n, (url, caption) in enumerate(zip(urls, captions)):
        file_name = str(url).rstrip("/").split("/")[-1]
        photo_id = file_name.split("_")[0].split(".")[0]
        path = Path(images) / file_name
        if not path.exists() and (Path(images) / f"{photo_id}.jpg").exists():
            path = Path(images) / f"{photo_id}.jpg"
        caption = clean(caption) if isinstance(caption, str) else ""
        yield Record(f"sbu_{photo_id}", str(path), [caption] if caption else [],
                     {"source": "sbu", "file": str(json_path), "index": n, "url": url}, None if caption else NO_CAPTION)


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
                    members.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
                    if {"txt", "json"} <= set(members[key]) and set(IMAGE_SUFFIXES) & set(members[key]):
                        yield _img2dataset_record(key, members.pop(key))
                for key, parts in members.items():
                    yield _img2dataset_record(key, parts)
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            for image in sorted(p for p in sub.iterdir() if p.suffix[1:].lower() in IMAGE_SUFFIXES):
                parts = {image.suffix[1:].lower(): str(image)}
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
    image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
    drop = (f"no image member (none of {', '.join(IMAGE_SUFFIXES)})" if image is None
            else (None if caption else NO_CAPTION))
    return Record(f"i2d_{key}", image, [caption] if caption else [], {"source": "img2dataset", **keep}, drop)


def karpathy(split_json: str | Path, images: str | Path, splits: tuple[str, ...] = ("train", "restval")
             ) -> Iterator[Record]:
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: the images of `splits` with their
    sentences (COCO records carry a filepath: train2014 / val2014)."""
    data = read_json(split_json)
    name = data.get("dataset", "karpathy")
    for rec in data["images"]:
        path = Path(images) / rec.get("filepath", "") / rec["filename"]
        caps = [clean(s["raw"]) for s in rec.get("sentences", []) if clean(s.get("raw", ""))]
        image_id = rec.get("cocoid", rec.get("imgid"))
        drop = (None if rec["split"] in splits else f"split {rec['split']} not converted") if caps else NO_CAPTION
        yield Record(f"{name}_{image_id}", str(path), caps, {"source": name, "image_id": image_id,
                                                             "split": rec["split"], "file_name": rec["filename"]}, drop)
