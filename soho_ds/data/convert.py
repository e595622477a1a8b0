"""Records -> pretraining shards: WebDataset tars of key.jpg + key.json, checked and indexed, with
a manifest that accounts for every record.

Records are cut into shards in their order (shard i holds records [i*S, (i+1)*S)), so a rerun
makes the same shards: an interrupted conversion keeps every finished shard (listed in the
manifest, with its checksum) and rewrites the partial one. Shards are written in parallel
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
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

from soho_ds.config import ReportedError
from soho_ds.data.sources import Record

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXAMPLES_PER_REASON = 20  # the manifest names this many left-out records per reason (all are counted)


class ConversionError(ReportedError, ValueError):
    """An output folder that holds another conversion, or unusable arguments."""


def _image_bytes(image: str | bytes, max_side: int | None) -> tuple[bytes, int, int]:
    """The image to store (re-encoded to JPEG when its longer side exceeds `max_side`) and its size."""
    from PIL import Image

    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            small = im.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=90)
            return buf.getvalue(), small.width, small.height
        im.verify()  # a header PIL cannot follow is refused here; decoding is the checker's job
    return data, w, h


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, records: list[Record], max_side: int | None) -> dict:
    """Writes one shard (via a temporary name), indexes it with the checker; returns its manifest entry."""
    from soho_ds.data.shards import index_shard

    final, tmp = Path(path), Path(path + ".tmp")
    dropped: list[dict] = []
    written = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for rec in records:
            reason = rec.drop
            if reason is None and rec.image is None:
                reason = "no image"
            if reason is None:
                try:
                    data, w, h = _image_bytes(rec.image, max_side)
                except FileNotFoundError:
                    reason = "image file missing"
                except OSError as e:  # PIL's UnidentifiedImageError, truncated files, permissions
                    reason = f"unreadable image ({type(e).__name__}: {str(e)[:120]})"
            if reason is not None:
                dropped.append({"key": rec.key, "reason": reason, **({"image": rec.image} if isinstance(
                    rec.image, str) else {})})
                continue
            meta = {**rec.meta, "key": rec.key, "captions": rec.captions, "width": w, "height": h}
            _add(tar, f"{rec.key}.jpg", data)
            _add(tar, f"{rec.key}.json", json.dumps(meta).encode())
            written += 1
    if written == 0:
        tmp.unlink()
        return {"name": final.name, "num_samples": 0, "records": len(records), "dropped": dropped, "empty": True}
    os.replace(tmp, final)
    checked = index_shard(final)
    digest = hashlib.sha256()
    with open(final, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": final.name, "num_samples": written, "records": len(records), "dropped": dropped,
            "checked": {"kept": checked["kept"], "skipped": checked["skipped"]}, "sha256": digest.hexdigest(),
            "bytes": final.stat().st_size}


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


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
    """Writes `records` as shards under `out` (resuming a conversion made with the same `settings`);
    returns the manifest. `total` (records) sizes the progress bar."""
    from tqdm import tqdm

    out = Path(out)
    settings = {**settings, "samples_per_shard": samples_per_shard, "max_side": max_side}
    manifest = _load_manifest(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    done = {s["name"]: s for s in manifest["shards"]
            if s.get("empty") or ((out / s["name"]).exists() and (out / s["name"]).stat().st_size == s["bytes"])}
    manifest["shards"] = list(done.values())
    for leftover in out.glob("*.tar.tmp"):  # a shard an interrupted run was writing
        leftover.unlink()
    bar = tqdm(total=total, unit="record", desc=f"converting to {out}", disable=not progress, mininterval=2)
    t0 = time.time()
    with ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        pending = {}
        for i, chunk in enumerate(_chunks(records, samples_per_shard)):
            name = f"{i:06d}.tar"
            if name in done:
                bar.update(len(chunk))
                continue
            for stale in (out / name, out / f"{i:06d}.idx", out / f"{i:06d}.idx.json"):
                stale.unlink(missing_ok=True)  # written but not recorded: rewritten
            pending[pool.submit(write_shard, str(out / name), chunk, max_side)] = len(chunk)
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
