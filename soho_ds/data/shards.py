"""Finding WebDataset tar shards and decoding the per-sample JSON that travels with them."""
from __future__ import annotations

import glob
import json
from pathlib import Path


def list_shards(spec: str) -> list[str]:
    """Sorted shard paths from a folder (its *.tar files), a glob, or a comma-separated list."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if Path(part).is_dir():
            paths += sorted(str(p) for p in Path(part).glob("*.tar"))
        elif any(c in part for c in "*?["):
            paths += sorted(glob.glob(part))
        elif Path(part).is_file():
            paths.append(part)
        else:
            raise FileNotFoundError(f"shard path does not exist: {part}")
    if not paths:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    return paths


def decode_meta(padded: bytes, where: str = "sample") -> dict:
    """JSON of one sample from its zero-padded bytes (DALI pads a batch of them to one length)."""
    raw = padded.rstrip(b"\0")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: JSON member is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), list) or not meta["captions"]:
        raise ValueError(f"{where}: JSON member has no non-empty 'captions' list")
    return meta


def _jpeg_ok(data: bytes) -> bool:
    """Structural JPEG check: start-of-image marker first, end-of-image marker last."""
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def index_shard(tar_path: str | Path) -> dict:
    """Writes the DALI index (``x.idx`` beside ``x.tar``) listing only well-formed samples.

    The index is made by DALI's own `wds2idx.IndexCreator`; samples whose JPEG is missing or
    truncated, or whose JSON does not parse or has no captions, are then left out of it, so
    the reader never sees them. Returns ``{"kept": n, "skipped": [{"key", "reason"}]}``.
    """
    from wds2idx import IndexCreator

    tar_path = Path(tar_path)
    idx_path = tar_path.with_suffix(".idx")
    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()
    header, *lines = idx_path.read_text().splitlines()
    kept, skipped = [], []
    with open(tar_path, "rb") as f:
        for line in lines:
            fields = line.split()
            members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                       for i in range(0, len(fields), 4)}
            key = next(iter(members.values()))[2].rsplit(".", 1)[0]

            def read(ext):
                offset, size, _ = members[ext]
                f.seek(offset)
                return f.read(size)

            reason = None
            if "jpg" not in members:
                reason = "no .jpg member"
            elif not _jpeg_ok(read("jpg")):
                reason = "corrupt or truncated JPEG"
            elif "json" not in members:
                reason = "no .json member"
            else:
                try:
                    decode_meta(read("json"), f"{tar_path}:{key}")
                except ValueError as e:
                    reason = str(e).split(": ", 1)[-1]
            if reason:
                skipped.append({"key": key, "reason": reason})
            else:
                kept.append(line)
    if not kept:
        raise ValueError(f"{tar_path}: no well-formed sample in this shard")
    idx_path.write_text(f"{header.split()[0]} {len(kept)}\n" + "\n".join(kept) + "\n")
    return {"kept": len(kept), "skipped": skipped}


def index_shards(spec: str) -> dict:
    """Indexes every shard of `spec`; returns totals and the skipped samples per shard."""
    report = {"kept": 0, "skipped": 0, "shards": {}}
    for path in list_shards(spec):
        r = index_shard(path)
        report["kept"] += r["kept"]
        report["skipped"] += len(r["skipped"])
        if r["skipped"]:
            report["shards"][path] = r["skipped"]
    return report
