"""WebDataset tar shards: finding them, checking them once before training, trusting them after.

`index_shards` is the checker: for every tar it writes DALI's index (``x.idx``, made by DALI's
own `wds2idx`) listing only samples that are complete and decode with the decoder training
uses, plus a record beside it (``x.idx.json``) of what it was built from (tar size and mtime),
how many samples it kept, every sample it left out and why, the samples a truncated tar lost,
and each kept image's size (for batching by orientation). It never stops at one bad shard.

`trusted_index_paths` is the loader's side: it refuses, before any pipeline exists, a mix of
indexed and unindexed tars, an index older than its tar, or an index that no longer matches
its record, naming the shards and the command that fixes them.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

from soho_ds.config import ReportedError
from soho_ds.data import storage

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # one image member per sample; decoded by content
INDEX_VERSION = 2


class ShardError(ReportedError, ValueError):
    """Shards that cannot be trusted as they are: names them and says how to fix it."""


def list_shards(spec: str | Iterable[str]) -> list[str]:
    """Sorted shard paths from folders (their *.tar files), globs, .tar files or comma-separated lists
    of them; several specs are concatenated in the order given."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for part in (p.strip() for s in parts for p in s.split(",") if p.strip()):
        if storage.is_s3(part):
            if part.endswith(".tar") and not any(c in part for c in "*?["):
                storage.stat(part)  # names a missing object or refused credentials now
                paths.append(part)
            else:
                paths += storage.list_tars(part)
        elif Path(part).is_dir():
            if not os.access(part, os.R_OK | os.X_OK):
                raise ShardError(f"{part}: the folder cannot be listed (permission denied): give this user read "
                                 "access to it")
            paths += sorted(str(p) for p in Path(part).glob("*.tar"))
        elif any(c in part for c in "*?["):
            paths += sorted(glob.glob(part))
        elif Path(part).exists() or Path(part).is_symlink():
            paths.append(part)
        else:
            raise FileNotFoundError(f"shard path does not exist: {part}")
    if not paths:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    unusable = [problem for p in paths if (problem := _unusable(p))]
    if unusable:
        raise ShardError(f"{len(unusable)} of {len(paths)} shards cannot be read at all (indexing again cannot "
                         "help):\n  " + "\n  ".join(unusable[:10]) + "\nFix: restore these files, or move them out "
                         "of the shard folder")
    return paths


def _unusable(path: str) -> str | None:
    """Why `path` cannot be read as a file at all, or None."""
    if storage.is_s3(path):
        return None  # an object that cannot be read is named by the request that fails
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"
    if not p.is_file():
        return f"{path}: not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path}: not readable by this user (permission denied)"
    return None


def decode_meta(padded: bytes, where: str = "sample") -> dict:
    """JSON of one sample from its zero-padded bytes (DALI pads a batch of them to one length)."""
    raw = padded.rstrip(b"\0")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: JSON member is not valid JSON ({e})") from None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: JSON member has no non-empty 'captions' list of non-empty strings")
    return meta


def index_path(tar: str | Path) -> str:
    return str(tar)[: -len(".tar")] + ".idx"


def record_path(tar: str | Path) -> str:
    return str(tar)[: -len(".tar")] + ".idx.json"


def tar_stamp(tar: str | Path) -> dict:
    """Size and version: the modified time of a file, the ETag (a content hash) of an object."""
    size, version = storage.stat(str(tar))
    return {"tar_size": size, "tar_etag" if storage.is_s3(tar) else "tar_mtime_ns": version}


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 12


def content_fingerprint(tar: str | Path) -> str:
    """sha256 of a tar's size and content: of the whole file up to 64 KiB, else of 16 blocks of 4 KiB
    spread evenly over it, the first and the last included. Survives a copy (mtimes change) and
    catches a rewrite behind the index (tar headers and image bytes move) while reading 64 KiB a
    shard at each start (ranged reads for an object)."""
    size, _ = storage.stat(str(tar))
    digest = hashlib.sha256(str(size).encode())
    if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
        digest.update(storage.read_bytes(str(tar)))
    else:
        last = size - FINGERPRINT_BLOCK
        for i in range(FINGERPRINT_BLOCKS):
            digest.update(storage.read_bytes(str(tar), last * i // (FINGERPRINT_BLOCKS - 1), FINGERPRINT_BLOCK))
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(tar: str | Path) -> dict:
    """What an index record says of the tar it was built from."""
    return {**tar_stamp(tar), "fingerprint": content_fingerprint(tar), "tar_sha256": file_sha256(tar)}


def _matches(record: dict, tar: str) -> bool:
    """Whether `tar` is the file `record` was built from. Same size always; with the recorded mtime, the
    same sampled fingerprint; with another mtime (a copy, or a rewrite), the same sha256 of the whole
    file, after which the record takes the new mtime (the next start is quick again). Records from
    before content hashes: the same mtime. An object: the same size and ETag (S3's content hash); indexed
    as a file and uploaded with its index, the same sampled fingerprint, after which the record takes the
    ETag."""
    if storage.is_s3(tar):
        stamp = tar_stamp(tar)
        if "tar_etag" in record or record.get("tar_size") != stamp["tar_size"]:
            return {k: record.get(k) for k in stamp} == stamp
        if record.get("fingerprint") != content_fingerprint(tar):
            return False
        log.info("%s: indexed before upload, content identical (sampled fingerprint): index kept", tar)
        storage.write_text(record_path(tar), json.dumps({**record, **stamp}))
        return True
    st = os.stat(tar)
    if record.get("tar_size") != st.st_size:
        return False
    if record.get("tar_mtime_ns") == st.st_mtime_ns:
        return record.get("fingerprint", content_fingerprint(tar)) == content_fingerprint(tar)
    if "tar_sha256" not in record or file_sha256(tar) != record["tar_sha256"]:
        return False
    log.info("%s: modified time changed, content identical (sha256): index kept", tar)
    try:
        _write_atomically(record_path(tar), json.dumps({**record, "tar_mtime_ns": st.st_mtime_ns}))
    except OSError:  # a read-only copy: the whole file is hashed again at the next start
        pass
    return True


def read_record(tar: str | Path) -> dict | None:
    path = record_path(tar)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {"error": f"{path} is not valid JSON"}


def _write_atomically(path: str, text: str) -> None:
    storage.write_text(path, text)


# --- the checker ---------------------------------------------------------------------------------

def define_checker_pipeline(batch_size: int, on_gpu: bool, device_id: int | None):
    """The checker's DALI pipeline, defined and not built: encoded bytes in, each image's decoded shape out.
    On a GPU the shapes come back from the mixed decoder to the host, which only DALI's dynamic executor
    allows."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB).shape()

    return decode(batch_size=batch_size, num_threads=1, device_id=device_id, exec_async=False,
                  exec_pipelined=False, exec_dynamic=on_gpu, prefetch_queue_depth=1)


class ImageChecker:
    """Decodes encoded images with DALI's decoder (mixed on a GPU, cpu otherwise), as training does;
    returns each image's (height, width), or the reason it does not decode."""

    def __init__(self, batch_size: int = 16, device: str | None = None):
        import torch

        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        self.batch_size = batch_size
        self._make = lambda size: define_checker_pipeline(size, on_gpu, 0 if on_gpu else None)
        self.pipe = self._make(batch_size)
        self.pipe.build()
        self.single = None

    def _run(self, pipe, encoded: list) -> list[tuple[int, int]]:
        import numpy as np

        pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        (shapes,) = pipe.run()
        shapes = shapes.as_cpu() if hasattr(shapes, "as_cpu") else shapes
        return [(int(s[0]), int(s[1])) for s in (np.array(shapes[i]) for i in range(len(encoded)))]

    def __call__(self, encoded: list[bytes]) -> list[tuple[int, int] | str]:
        """One result per image: (height, width), or the decoder's complaint."""
        out: list = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            if any(len(e) == 0 for e in chunk):
                out += [self._one(e) for e in chunk]
                continue
            try:
                out += self._run(self.pipe, chunk)
            except RuntimeError:  # a failed batch invalidates the pipeline: rebuild, then one by one
                self.pipe = self._make(self.batch_size)
                self.pipe.build()
                out += [self._one(e) for e in chunk]
        return out

    def _one(self, data: bytes) -> tuple[int, int] | str:
        if not data:
            return "empty image member"
        if self.single is None:
            self.single = self._make(1)
            self.single.build()
        try:
            return self._run(self.single, [data])[0]
        except RuntimeError as e:
            self.single = None
            lines = [x for x in str(e).splitlines() if x.strip() and "pipeline" not in x.lower()]
            return "does not decode (" + (lines[-1].strip() if lines else "decoder error") + ")"


def _tar_members(tar: Path) -> tuple[list[list[tuple]], bool]:
    """Samples of `tar` as DALI's wds2idx groups them: lists of (ext, data offset, size, name).
    Also whether the archive ends properly (two zero blocks after the last member)."""
    from wds2idx import IndexCreator

    with tempfile.TemporaryDirectory() as tmp:
        idx = Path(tmp) / "x.idx"
        with IndexCreator(str(tar), str(idx), verbose=False) as creator:
            creator.create_index()
        _, *lines = idx.read_text().splitlines()
    samples = []
    for line in lines:
        f = line.split()
        samples.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    last_end = max((off + sz for s in samples for _, off, sz, _ in s), default=0)
    data_end = -(-last_end // 512) * 512  # data is padded to a whole block
    with open(tar, "rb") as f:
        f.seek(data_end)
        tail = f.read(1024)
    return samples, len(tail) == 1024 and tail == bytes(1024)


def index_shard(tar: str | Path, checker: ImageChecker | None = None) -> dict:
    """Checks one shard and writes its index and record beside it (an object's beside the object);
    returns the record. A shard that cannot be read at all gets a record with an "error" and no index."""
    tar = str(tar)
    if not storage.is_s3(tar):
        return _index_file(tar, tar, _stamp(tar), checker)
    stamp = tar_stamp(tar)
    with storage.local_file(tar) as local:
        return _index_file(local, tar, {**stamp, "fingerprint": content_fingerprint(local),
                                        "tar_sha256": file_sha256(local)}, checker)


def _index_file(local: str, tar: str, stamp: dict, checker: ImageChecker | None) -> dict:
    """index_shard's work on a local file `local` holding the shard `tar`."""
    idx, rec = index_path(tar), record_path(tar)
    try:
        samples, ends_properly = _tar_members(Path(local))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        storage.remove(idx)
        why = "the file is empty (0 bytes)" if stamp["tar_size"] == 0 else f"not a readable tar with samples ({e})"
        record = {"version": INDEX_VERSION, **stamp, "error": why,
                  "kept": 0, "skipped": [], "lost": []}
        _write_atomically(rec, json.dumps(record, indent=1))
        return record
    checker = checker or ImageChecker()
    size = stamp["tar_size"]
    kept, sizes, keys, caption_counts, skipped, lost = [], [], [], [], [], []
    candidates = []  # (key, members, image bytes, captions)
    seen: set[str] = set()
    with open(local, "rb") as f:
        def read(member):
            _, off, sz, _ = member
            f.seek(off)
            return f.read(sz)

        for members in samples:
            name = members[0][3]
            key = name[: name.find(".", name.rfind("/") + 1)]
            by_ext = {m[0]: m for m in members}
            if any(off + sz > size for _, off, sz, _ in members):
                lost.append({"key": key, "reason": "cut off by the end of the file (truncated tar)"})
                continue
            image_ext = next((e for e in IMAGE_EXTS if e in by_ext), None)
            reason = None
            if key in seen:
                reason = "duplicate key (an earlier sample of this tar has it)"
            elif image_ext is None:
                reason = f"no image member ({'/'.join(IMAGE_EXTS)})"
            elif "json" not in by_ext:
                reason = "no .json member"
            else:
                try:
                    captions = len(decode_meta(read(by_ext["json"]), f"{tar}:{key}")["captions"])
                except ValueError as e:
                    reason = str(e).split(": ", 1)[-1]
            seen.add(key)
            if reason:
                skipped.append({"key": key, "reason": reason})
            else:
                candidates.append((key, members, read(by_ext[image_ext]), captions))
    for (key, members, _, captions), result in zip(candidates, checker([c[2] for c in candidates])):
        if isinstance(result, str):
            skipped.append({"key": key, "reason": result})
        else:
            kept.append(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in members))
            sizes.append(list(result))
            keys.append(key)
            caption_counts.append(captions)
    if not ends_properly:
        lost.append({"key": None, "reason": "no end-of-archive marker: the tar was cut short; samples written "
                                            "after the last complete one are lost"})
    record = {"version": INDEX_VERSION, **stamp, "kept": len(kept), "skipped": skipped, "lost": lost,
              "truncated": not ends_properly, "sizes": sizes, "keys": keys, "captions": caption_counts}
    if not kept:
        storage.remove(idx)
        record["error"] = "no sample passed the checks"
    else:
        _write_atomically(idx, f"v1.2 {len(kept)}\n" + "\n".join(kept) + "\n")
    _write_atomically(rec, json.dumps(record))  # last: an index is trusted only with its record
    return record


def _index_reporting_errors(tar: str, checker: ImageChecker) -> tuple[str, dict]:
    try:
        return tar, index_shard(tar, checker)
    except Exception as e:  # one shard's unexpected failure must not stop the others: reported
        return tar, {"error": f"{type(e).__name__}: {e}", "kept": 0, "skipped": [], "lost": []}


_worker_checker: ImageChecker | None = None


def _index_in_worker(tar: str) -> tuple[str, dict]:
    global _worker_checker
    if _worker_checker is None:
        _worker_checker = ImageChecker()
    return _index_reporting_errors(tar, _worker_checker)


def index_shards(spec: str | Iterable[str], workers: int = 1, progress: bool = False) -> dict:
    """Checks and indexes every shard of `spec` (in `workers` processes); returns totals and, per
    shard, what was left out. Samples: kept, skipped (with reasons), lost (truncated tars)."""
    paths = list_shards(spec)
    report = {"kept": 0, "skipped": 0, "lost": 0, "bad_shards": {}, "shards": {}}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="shard", desc="checking shards")

    def add(tar: str, record: dict) -> None:
        report["kept"] += record.get("kept", 0)
        report["skipped"] += len(record.get("skipped", []))
        report["lost"] += len([x for x in record.get("lost", []) if x["key"]])
        if record.get("error"):
            report["bad_shards"][tar] = record["error"]
        if record.get("skipped") or record.get("lost"):
            report["shards"][tar] = {"skipped": record["skipped"], "lost": record["lost"]}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kept=report["kept"], left_out=report["skipped"] + report["lost"])

    if workers <= 1:
        checker = ImageChecker()
        for tar in paths:
            add(*_index_reporting_errors(tar, checker))
    else:  # spawn: DALI is not safe to use in a forked child
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_index_in_worker, t) for t in paths]):
                add(*future.result())
    if bar is not None:
        bar.close()
    report["duplicates"] = _leave_out_repeated_keys(paths)
    report["skipped"] += len(report["duplicates"])
    report["kept"] -= len(report["duplicates"])
    for tar, key, first in report["duplicates"]:
        report["shards"].setdefault(tar, {"skipped": [], "lost": []})["skipped"].append(
            {"key": key, "reason": f"duplicate key (also in {first})"})
    return report


def _leave_out_repeated_keys(paths: list[str]) -> list[tuple[str, str, str]]:
    """Leaves out of its index every sample whose key an earlier shard of `paths` already holds;
    returns (shard, key, the shard that has it first) of each."""
    first: dict[str, str] = {}
    repeated = []
    for tar in paths:
        record = read_record(tar)
        if not record or record.get("error") or "keys" not in record:
            continue
        drop = [i for i, key in enumerate(record["keys"]) if first.setdefault(key, tar) != tar]
        if not drop:
            continue
        lines = storage.read_text(index_path(tar)).splitlines()[1:]
        keep = [i for i in range(len(record["keys"])) if i not in set(drop)]
        for i in drop:
            key = record["keys"][i]
            repeated.append((tar, key, first[key]))
            record["skipped"].append({"key": key, "reason": f"duplicate key (also in {first[key]})"})
        record.update(kept=len(keep), sizes=[record["sizes"][i] for i in keep], keys=[record["keys"][i] for i in keep],
                      **({"captions": [record["captions"][i] for i in keep]} if "captions" in record else {}))
        if keep:
            _write_atomically(index_path(tar), f"v1.2 {len(keep)}\n" + "\n".join(lines[i] for i in keep) + "\n")
        else:
            storage.remove(index_path(tar))
            record["error"] = "no sample passed the checks"
        _write_atomically(record_path(tar), json.dumps(record))
    return repeated


def upload_shards(folder: str | Path, url: str) -> int:
    """Uploads a local folder of checked shards to an object store prefix: each tar, then its index, then
    its record restamped with the object's size and ETag (an index is trusted only with its record),
    manifest.json last. Returns the number of tars."""
    tars = sorted(Path(folder).glob("*.tar"))
    for tar in tars:
        remote = storage.join(url, tar.name)
        storage.upload(tar, remote)
        if Path(index_path(tar)).exists():
            storage.upload(index_path(tar), index_path(remote))
        if Path(record_path(tar)).exists():
            record = {k: v for k, v in json.loads(Path(record_path(tar)).read_text()).items() if k != "tar_mtime_ns"}
            storage.write_text(record_path(remote), json.dumps({**record, **tar_stamp(remote)}))
    if (Path(folder) / "manifest.json").exists():
        storage.upload(Path(folder) / "manifest.json", storage.join(url, "manifest.json"))
    return len(tars)


def refuse_filled_prefix(url: str) -> None:
    """Nothing is overwritten in a store either: a prefix that holds shards or a manifest is refused."""
    there = storage.list_tars(url)
    if there or storage.exists(storage.join(url, "manifest.json")):
        raise ShardError(f"{url} already holds {len(there)} shards or a manifest.json: choose another prefix "
                         "(nothing is overwritten)")


# --- the loader's side ---------------------------------------------------------------------------

def fix_command(paths: list[str]) -> str:
    folders = sorted({storage.parent(p) for p in paths})
    return "soho-index-shards " + " ".join(folders)


def trusted_index_paths(paths: list[str]) -> list[str] | None:
    """The index files of `paths` if every tar has a current one; None if none has (DALI then scans
    each tar itself, and nothing was checked). Anything in between is refused."""
    indexed = [p for p in paths if storage.exists(record_path(p)) or storage.exists(index_path(p))]
    if not indexed:
        return None
    problems, broken = [], []
    for p in paths:
        record = read_record(p)
        if record is None:
            problems.append(f"{p}: no index")
        elif record.get("error") and _matches(record, p):
            broken.append(f"{p}: {record['error']}")  # the tar itself is the problem: indexing again cannot help
        elif record.get("version") != INDEX_VERSION:
            problems.append(f"{p}: index written by another version of the checker")
        elif not _matches(record, p):
            problems.append(f"{p}: the tar changed after it was indexed (its size or content differs)")
        elif not storage.exists(index_path(p)):
            problems.append(f"{p}: its index file is missing")
        else:
            header, *lines = storage.read_text(index_path(p)).splitlines()
            header, n = header.split(), len(lines)
            if len(header) != 2 or int(header[1]) != n or n != record["kept"]:
                problems.append(f"{p}: the index lists {n} samples but its record says {record['kept']}")
    if broken:
        raise ShardError(f"{len(broken)} of {len(paths)} shards hold no usable sample:\n  " + "\n  ".join(broken[:10])
                         + "\nFix: convert them again, or move them out of the shard folder")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ShardError(f"{len(problems)} of {len(paths)} shards cannot be trusted:\n  {shown}\n"
                         f"Fix: {fix_command([p for p in paths])}")
    return [index_path(p) for p in paths]


def check_manifest(paths: list[str]) -> None:
    """Refuses shards that hold fewer samples than the converter's manifest.json records for them
    (kept + left out by the checker + lost), where there is a manifest."""
    by_folder: dict[str, dict] = {}
    short = []
    for p in paths:
        folder = storage.parent(p)
        if folder not in by_folder:
            try:
                entries = json.loads(storage.read_text(storage.join(folder, "manifest.json"))).get("shards", [])
                by_folder[folder] = {e["name"]: e["num_samples"] for e in entries}
            except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                by_folder[folder] = {}
        expected = by_folder[folder].get(storage.name(p))
        record = read_record(p)
        if expected is None or record is None or record.get("error"):
            continue
        found = record["kept"] + len(record["skipped"]) + len([x for x in record["lost"] if x["key"]])
        if found < expected:
            short.append(f"{p}: {found} samples, the manifest records {expected}")
    if short:
        raise ShardError("shards hold fewer samples than their manifest.json records:\n  " + "\n  ".join(short[:10])
                         + "\nThe tars were cut short or replaced: convert them again.")


def sample_sizes(paths: list[str]) -> list[list[tuple[int, int]]] | None:
    """Per shard, each kept sample's (height, width) in index order, from the records."""
    records = [read_record(p) for p in paths]
    if any(r is None or "sizes" not in r for r in records):
        return None
    return [[tuple(s) for s in r["sizes"]] for r in records]


def indexed_sample_count(paths: list[str]) -> int | None:
    """How many samples the indexes of `paths` list (None if any tar has no index record)."""
    records = [read_record(p) for p in paths]
    if any(r is None or "kept" not in r for r in records):
        return None
    return sum(r["kept"] for r in records)


def caption_group_count(paths: list[str], group: int) -> int | None:
    """How many groups of `group` captions the indexed samples of `paths` hold, each sample's rounded up
    (SOHO's epoch: an image with 50 phrases counts 13 times at 4 captions a step). None if any index
    predates caption counts."""
    records = [read_record(p) for p in paths]
    if any(r is None or "captions" not in r for r in records):
        return None
    return sum(-(-n // group) for r in records for n in r["captions"])


def summarise_losses(paths: list[str]) -> str | None:
    """One line about what the checker left out of these shards, for the start of a run."""
    skipped = lost = truncated = 0
    for p in paths:
        r = read_record(p) or {}
        skipped += len(r.get("skipped", []))
        lost += len([x for x in r.get("lost", []) if x.get("key")])
        truncated += bool(r.get("truncated"))
    if not (skipped or lost or truncated):
        return None
    return (f"the shard checker left out {skipped} malformed samples and {lost} cut off by {truncated} truncated "
            f"tars (listed in each x.idx.json)")


def shard_fingerprint(paths: list[str]) -> list:
    """What a run's data positions refer to: each tar's name, size and content fingerprint (mtime for
    records without one), and its index's count."""
    out = []
    for p in paths:
        record = read_record(p) or {}
        size, version = storage.stat(p)
        out.append([storage.name(p), size, record.get("fingerprint") or version, record.get("kept")])
    return out
