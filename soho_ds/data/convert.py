"""Records -> pretraining shards: WebDataset tars of key.jpg + key.json, checked and indexed, with
a manifest that accounts for every record.

Records are cut into shards in their order (shard i holds records [i*S, (i+1)*S)), so a rerun
makes the same shards: it keeps every finished shard whose records are unchanged (listed in the
manifest with a digest of its records and its checksum) and writes the partial, new or changed
ones (lines appended to a TSV land in the last shard, which is rewritten). A key seen before is
left out and counted; a lock keeps a second conversion out of the folder. Shards are written in parallel
processes; each gets its DALI index from the shard checker (`shards.index_shard`), which decodes
every image. The manifest records the counts per source, every record left out and why
(excluded split, no caption, image missing or unreadable, and what the checker found), and each
shard's sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

from soho_ds.config import ReportedError
from soho_ds.data import storage
from soho_ds.data.sources import Record

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXAMPLES_PER_REASON = 20  # the manifest names this many left-out records per reason (all are counted)


class ConversionError(ReportedError, ValueError):
    """An output folder that holds another conversion, or unusable arguments."""


# Formats stored as they are, under the member extension the shard reader takes (DALI decodes by
# content); any other format PIL reads is re-encoded to JPEG.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _image_bytes(image: str | bytes, max_side: int | None) -> tuple[bytes, str, int, int]:
    """The image to store, its member extension and its size. Re-encoded to JPEG when its longer side
    exceeds `max_side` or its format is not stored as is; re-encoding applies the EXIF orientation
    first (the stored pixels then stand upright, as a decoder shows the original)."""
    from PIL import Image, ImageOps

    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        ext = STORED_FORMATS.get(im.format)
        if ext is None or (max_side and max(w, h) > max_side):
            upright = ImageOps.exif_transpose(im.convert("RGB"))
            w, h = upright.size
            scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
            if scale < 1:
                upright = upright.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
            buf = io.BytesIO()
            upright.save(buf, format="JPEG", quality=90)
            return buf.getvalue(), "jpg", upright.width, upright.height
        im.verify()  # a header PIL cannot follow is refused here; decoding is the checker's job
    return data, ext, w, h


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, records: list[Record], max_side: int | None, records_digest: str = "") -> dict:
    """Writes one shard (via a temporary name), indexes it with the checker; returns its manifest entry."""
    from soho_ds.data.shards import index_shard

    from PIL import Image

    final, tmp = Path(path), Path(path + ".tmp")
    dropped: list[dict] = []
    written = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in records:
                reason = rec.drop
                if reason is None and rec.image is None:
                    reason = "no image"
                if reason is None:
                    try:
                        data, ext, w, h = _image_bytes(rec.image, max_side)
                    except FileNotFoundError:
                        reason = "image file missing"
                    except Image.DecompressionBombError as e:  # a header declaring billions of pixels
                        reason = f"image too large ({str(e)[:160]})"
                    except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated, bad header
                        reason = f"unreadable image ({type(e).__name__}: {str(e)[:120]})"
                if reason is not None:
                    dropped.append({"key": rec.key, "reason": reason, **_origin(rec)})
                    continue
                meta = {**rec.meta, "key": rec.key, "captions": rec.captions, "width": w, "height": h}
                _add(tar, f"{rec.key}.{ext}", data)
                _add(tar, f"{rec.key}.json", json.dumps(meta).encode())
                written += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        raise
    if written == 0:
        tmp.unlink()
        return {"name": final.name, "num_samples": 0, "records": len(records), "dropped": dropped, "empty": True,
                "records_digest": records_digest}
    os.replace(tmp, final)
    checked = index_shard(final)
    return {"name": final.name, "num_samples": written, "records": len(records), "dropped": dropped,
            "checked": {"kept": checked["kept"], "skipped": checked["skipped"]}, "sha256": checked["tar_sha256"],
            "bytes": final.stat().st_size, "records_digest": records_digest}


def _origin(rec: Record) -> dict:
    """Where a record came from, for the manifest: its image path and its source file and line."""
    out = {"image": rec.image} if isinstance(rec.image, str) else {}
    return {**out, **{k: rec.meta[k] for k in ("file", "line") if k in rec.meta}}


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _unique_keys(records: Iterable[Record], per_shard: int) -> Iterator[Record]:
    """`records` with every repeat of a key left out (dropped, so the manifest counts it): two samples
    under one key would be one to the shard reader."""
    first: dict[str, int] = {}
    for n, rec in enumerate(records):
        if rec.key in first:
            m = first[rec.key]
            rec.drop = rec.drop or f"duplicate key (first as record {m + 1}, in shard {m // per_shard:06d}.tar)"
        else:
            first[rec.key] = n
        yield rec


def _chunk_digest(chunk: list[Record]) -> str:
    """What a shard was made from: a rerun rewrites a shard whose records changed (lines appended to
    the input, files added) and keeps the others."""
    digest = hashlib.sha256()
    for r in chunk:
        image = r.image if not isinstance(r.image, bytes) else hashlib.sha256(r.image).hexdigest()
        digest.update(json.dumps([r.key, r.captions, image, r.drop, r.meta], sort_keys=True, default=str).encode())
    return digest.hexdigest()


class _FolderLock:
    """An exclusive lock on a conversion's output folder: a second conversion into it is refused."""

    def __init__(self, out: Path):
        self.path = out / ".convert.lock"

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConversionError(f"{self.path.parent}: another conversion is writing into this folder (lock "
                                  f"{self.path} held by {holder}); wait for it to finish or choose another "
                                  "--out") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def _load_manifest(out: Path, settings: dict) -> dict:
    path = out / MANIFEST
    if not path.exists():
        if out.exists() and any(out.glob("*.tar")):
            raise ConversionError(f"{out} holds shards but no {MANIFEST}: not a conversion to resume; choose "
                                  "an empty folder")
        return {"settings": settings, "shards": [], "complete": False}
    manifest = json.loads(path.read_text())
    if manifest.get("settings") != settings:
        raise ConversionError(f"{out} holds a conversion made with other settings ({manifest.get('settings')}); "
                              "choose another folder (nothing is overwritten)")
    return manifest


def _save_manifest(out: Path, manifest: dict) -> None:
    shards = sorted(manifest["shards"], key=lambda s: s["name"])
    counts: dict[str, int] = {}
    dropped: dict[str, list] = {}
    for s in shards:
        for d in s["dropped"]:
            reason = d["reason"].split(" (")[0]
            counts[reason] = counts.get(reason, 0) + 1
            if len(dropped.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                dropped[reason].append(d)
        for d in s.get("checked", {}).get("skipped", []):
            reason = f"checker: {d['reason'].split(' (')[0]}"
            counts[reason] = counts.get(reason, 0) + 1
            if len(dropped.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                dropped[reason].append({**d, "shard": s["name"]})
    manifest = {**manifest, "shards": shards,
                "counts": {"records": sum(s["records"] for s in shards),
                           "samples_written": sum(s["num_samples"] for s in shards),
                           "samples_indexed": sum(s.get("checked", {}).get("kept", 0) for s in shards),
                           "left_out": counts},
                "left_out_examples": dropped}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)


def write_shards(records: Iterable[Record], out: str | Path, settings: dict, samples_per_shard: int = 1000,
                 workers: int = 2, max_side: int | None = None, total: int | None = None, progress: bool = True
                 ) -> dict:
    """Writes `records` as shards under `out`; returns the manifest. Run again with the same `settings`,
    it writes only the shards whose records are new or changed (an interrupted run, lines appended to
    the input). One conversion at a time per folder. `total` (records) sizes the progress bar.

    `out` may be an object store prefix (s3://bucket/prefix): the shards are written and checked in a
    local temporary folder, then uploaded, manifest.json last (a prefix with a manifest is complete).
    A prefix that already holds shards is refused (nothing is overwritten); such a conversion does
    not resume: an interrupted one starts again."""
    if storage.is_s3(out):
        return _write_shards_to_store(records, str(out), settings, samples_per_shard, workers, max_side, total,
                                      progress)
    out = Path(out)
    settings = {**settings, "samples_per_shard": samples_per_shard, "max_side": max_side}
    out.mkdir(parents=True, exist_ok=True)
    with _FolderLock(out):
        return _write_shards(records, out, settings, samples_per_shard, workers, max_side, total, progress)


def _write_shards_to_store(records, url: str, settings: dict, samples_per_shard: int, workers: int,
                           max_side: int | None, total: int | None, progress: bool) -> dict:
    from soho_ds.data.shards import ShardError, refuse_filled_prefix, upload_shards

    try:
        refuse_filled_prefix(url)
    except ShardError as e:
        raise ConversionError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="soho_ds_convert_") as stage:
        manifest = write_shards(records, stage, settings, samples_per_shard, workers, max_side, total, progress)
        log.info("%s: %d shards uploaded", url, upload_shards(stage, url))
    return manifest


def _write_shards(records, out: Path, settings: dict, samples_per_shard: int, workers: int, max_side: int | None,
                  total: int | None, progress: bool) -> dict:
    from tqdm import tqdm

    manifest = _load_manifest(out, settings)
    done = {s["name"]: s for s in manifest["shards"]
            if s.get("empty") or ((out / s["name"]).exists() and (out / s["name"]).stat().st_size == s["bytes"])}
    manifest["shards"] = list(done.values())
    for leftover in out.glob("*.tar.tmp"):  # a shard an interrupted run was writing
        leftover.unlink()
    bar = tqdm(total=total, unit="record", desc=f"converting to {out}", disable=not progress, mininterval=2)
    t0 = time.time()
    with ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        pending = {}
        for i, chunk in enumerate(_chunks(_unique_keys(records, samples_per_shard), samples_per_shard)):
            name, digest = f"{i:06d}.tar", _chunk_digest(chunk)
            if name in done and done[name].get("records_digest") == digest:
                bar.update(len(chunk))
                continue
            if name in done:  # its records changed since (e.g. lines appended): written again
                manifest["shards"].remove(done.pop(name))
            for stale in (out / name, out / f"{i:06d}.idx", out / f"{i:06d}.idx.json"):
                stale.unlink(missing_ok=True)  # written but not recorded: rewritten
            pending[pool.submit(write_shard, str(out / name), chunk, max_side, digest)] = len(chunk)
            while len(pending) >= 2 * max(1, workers):  # bounded: records wait in memory, not all of them
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    manifest["shards"].append(future.result())
                    bar.update(pending.pop(future))
                _save_manifest(out, manifest)
        for future in list(pending):
            manifest["shards"].append(future.result())
            bar.update(pending.pop(future))
        manifest["complete"] = True
        manifest["seconds"] = round(time.time() - t0, 1)
        _save_manifest(out, manifest)
    bar.close()
    return json.loads((out / MANIFEST).read_text())
