"""Where shards live: a local (or shared) file system, or an S3-compatible object store (`s3://bucket/prefix`).

Each function takes a path or an `s3://` URL and does the same thing on either. S3 goes through
boto3, which takes its credentials, region and endpoint from the standard AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for a store other than AWS);
DALI's readers take the same variables and read the tars and indexes straight from the store.
Every failure names the object and says what went wrong (missing, refused credentials, no
connection) as a `StorageError`; a missing object is also a FileNotFoundError.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator

from soho_ds.config import ReportedError

S3 = "s3://"


class StorageError(ReportedError, OSError):
    """An object store request failed; the message names the object and the reason."""


class MissingObject(StorageError, FileNotFoundError):
    pass


def is_s3(path: str | Path) -> bool:
    return str(path).startswith(S3)


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len(S3):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: an S3 URL is s3://bucket/key")
    return bucket, key


@functools.lru_cache(maxsize=None)
def _client(environment: tuple, pid: int):
    """One client per process and environment (a forked or spawned worker makes its own)."""
    import boto3
    from botocore.config import Config

    # a few quick retries: a store that does not answer is reported in seconds, not minutes
    return boto3.session.Session().client("s3", config=Config(connect_timeout=5, read_timeout=60,
                                            retries={"max_attempts": 3, "mode": "standard"}))


def client():
    return _client(tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_SESSION_TOKEN", "AWS_REGION")), os.getpid())


def _failed(url: str, error: Exception) -> StorageError:
    from botocore.exceptions import ClientError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS S3")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return MissingObject(f"{url}: no such object on {endpoint}")
        if code == "NoSuchBucket":
            return MissingObject(f"{url}: the bucket does not exist on {endpoint}")
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"):
            return StorageError(f"{url}: {endpoint} refused the credentials ({code}): check AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), and that they may read this bucket")
        return StorageError(f"{url}: {endpoint} answered {code}: {error}")
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return StorageError(f"{url}: no connection to {endpoint} ({type(error).__name__}: {error}); check "
                        "AWS_ENDPOINT_URL and the network, then run again")


@contextlib.contextmanager
def _reported(url: str):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise _failed(url, e) from None


def stat(path: str) -> tuple[int, int | str]:
    """(size in bytes, version): the modified time in ns for a file, the ETag for an object."""
    if not is_s3(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    bucket, key = _split(path)
    with _reported(path):
        head = client().head_object(Bucket=bucket, Key=key)
    return head["ContentLength"], head["ETag"].strip('"')


def exists(path: str) -> bool:
    if not is_s3(path):
        return Path(path).exists()
    try:
        stat(path)
    except MissingObject:
        return False
    return True


def read_bytes(path: str, start: int = 0, length: int | None = None) -> bytes:
    if not is_s3(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)
    bucket, key = _split(path)
    extra = {} if start == 0 and length is None else {
        "Range": f"bytes={start}-" + ("" if length is None else str(start + length - 1))}
    with _reported(path):
        return client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_text(path: str, text: str) -> None:
    """Replaces `path` whole: a local file through a temporary one and a rename (readers never see
    half of it), an object by one PUT (S3 makes it visible whole)."""
    if not is_s3(path):
        p = Path(path)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # ranks may write the same file at once
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    bucket, key = _split(path)
    with _reported(path):
        client().put_object(Bucket=bucket, Key=key, Body=text.encode())


def remove(path: str) -> None:
    """Deletes `path` if it is there."""
    if not is_s3(path):
        Path(path).unlink(missing_ok=True)
        return
    bucket, key = _split(path)
    with _reported(path):
        client().delete_object(Bucket=bucket, Key=key)


def upload(local: str | Path, url: str) -> None:
    bucket, key = _split(url)
    with _reported(url):
        client().upload_file(str(local), bucket, key)


def parent(path: str) -> str:
    if not is_s3(path):
        return str(Path(path).parent)
    return path.rstrip("/").rsplit("/", 1)[0]


def name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_s3(path) else Path(path).name


def join(folder: str, child: str) -> str:
    return f"{folder.rstrip('/')}/{child}" if is_s3(folder) else str(Path(folder) / child)


def list_tars(url: str) -> list[str]:
    """The .tar objects of an S3 "folder" (a prefix, its direct children only) or of a glob over one
    level (`s3://bucket/cc3m/part-*.tar`), sorted."""
    pattern = None
    if any(c in url for c in "*?["):
        url, pattern = url.rsplit("/", 1)
    bucket, prefix = _split(url.rstrip("/") + "/")
    prefix = "" if prefix == "/" else prefix
    found = []
    with _reported(url):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for obj in page.get("Contents", []):
                leaf = obj["Key"][len(prefix):]
                if leaf.endswith(".tar") and (pattern is None or fnmatch.fnmatchcase(leaf, pattern)):
                    found.append(f"{S3}{bucket}/{obj['Key']}")
    return sorted(found)


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path holding `path`'s bytes: the file itself, or an object downloaded to a temporary
    file for as long as the block runs (the checker reads every byte of a shard anyway)."""
    if not is_s3(path):
        yield path
        return
    bucket, key = _split(path)
    with tempfile.TemporaryDirectory(prefix="soho_ds_s3_") as tmp:
        local = os.path.join(tmp, name(path))
        with _reported(path):
            client().download_file(bucket, key, local)
        yield local
