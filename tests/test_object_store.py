"""Shards in an S3-compatible object store, against a real S3 server on localhost (moto's server mode,
with authentication enforced): conversion straight to the store, indexing there, training reading the
objects through DALI with no local copy, mixed with a local source; a missing object, refused
credentials and a dropped connection each refused with the object named."""
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, free_port
from launching import ENV
from soho_ds.config import ShardSource
from soho_ds.data import storage
from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.data.shards import ShardError, index_shards, list_shards, trusted_index_paths
from soho_ds.synthetic.shards import write_split

SPEC = ImageSpec(mode="aspect", shorter_side=32, longer_side=48, stride=32, hflip_prob=0.0)
BUCKET = "soho-shards"
ALLOW_S3 = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'


def start_server(port):
    """moto's S3 server; its first 3 requests (the user, its policy and its key) need no signature, every
    later one is checked against the keys it issued."""
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "moto_server"), "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"),
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def issue_keys(endpoint):
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=ALLOW_S3)
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    key_id, secret = issue_keys(endpoint)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.client().create_bucket(Bucket=BUCKET)
    yield env
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def caption_files(folder, n=12):
    """A caption<TAB>path TSV over n small JPEGs (a third of them portrait)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        size = (48, 64) if i % 3 == 0 else (64, 48)
        buf = io.BytesIO()
        Image.new("RGB", size, (20 * i % 255, 100, 200 - 10 * i)).save(buf, format="JPEG")
        (folder / f"img{i}.jpg").write_bytes(buf.getvalue())
        lines.append(f"a colour patch number {i}\timg{i}.jpg")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def converted(server, tmp_path_factory):
    """tools/convert.py tsv --out s3://...: 12 samples in 3 shards, indexed, in the store only."""
    src = caption_files(tmp_path_factory.mktemp("tsv"))
    url = f"s3://{BUCKET}/cc"
    out = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), "tsv", "--tsv", str(src / "captions.tsv"),
                          "--images", str(src), "--out", url, "--samples-per-shard", "4", "--workers", "1"],
                         capture_output=True, text=True, env={**ENV, **server}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return url


def keys_under(prefix):
    listing = storage.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in listing.get("Contents", []))


def test_a_conversion_to_the_store_leaves_indexed_shards_and_a_manifest_there(converted):
    assert keys_under("cc/") == ["000000.idx", "000000.idx.json", "000000.tar", "000001.idx", "000001.idx.json",
                                 "000001.tar", "000002.idx", "000002.idx.json", "000002.tar", "manifest.json"]
    paths = list_shards(converted)
    assert paths == [f"{converted}/00000{i}.tar" for i in range(3)]
    assert trusted_index_paths(paths) == [f"{converted}/00000{i}.idx" for i in range(3)]
    # a second conversion into the same prefix is refused: nothing is overwritten
    from soho_ds.data.convert import ConversionError, write_shards

    with pytest.raises(ConversionError, match=rf"{converted} already holds 3 shards"):
        write_shards([], converted, {})


def test_training_reads_the_objects_through_dali_mixed_with_a_local_source(converted, tmp_path):
    write_split(tmp_path / "local", 8, 4, 32, 1, "local_", 0)
    sources = [ShardSource("cc", (converted,), 1.0), ShardSource("local", (str(tmp_path / "local"),), 1.0)]
    before = set(Path("/tmp").glob("soho_ds_s3_*"))
    loader = ShardLoader(sources, 2, SPEC, seed=1, shuffle_buffer=2, num_threads=1, group_by_orientation=True)
    # DALI is handed the objects' URLs: nothing is downloaded ahead
    assert [p for p in loader.paths if p.startswith("s3://")] == [f"{converted}/00000{i}.tar" for i in range(3)]
    stream = loader.forever()
    batches = [next(stream) for _ in range(30)]
    cc = {m["captions"][0] for b in batches if b.source == "cc" for m in b.metas}
    assert len(cc) == 12 and all(c.startswith("a colour patch number") for c in cc)  # every object's sample
    assert {b.source for b in batches} == {"cc", "local"}
    assert set(Path("/tmp").glob("soho_ds_s3_*")) == before


def test_index_shards_checks_and_indexes_shards_in_the_store(converted, server):
    url = f"s3://{BUCKET}/reindex"
    for name in ("000000.tar", "000001.tar"):
        storage.client().copy_object(Bucket=BUCKET, Key=f"reindex/{name}", CopySource=f"{BUCKET}/cc/{name}")
    paths = list_shards(url)
    assert trusted_index_paths(paths) is None  # no index yet: nothing was checked
    out = subprocess.run([sys.executable, str(ROOT / "tools/index_shards.py"), url], capture_output=True, text=True,
                         env={**ENV, **server}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert trusted_index_paths(paths) == [f"{url}/000000.idx", f"{url}/000001.idx"]
    # an object replaced behind its index: its ETag differs, the index is no longer trusted
    storage.client().copy_object(Bucket=BUCKET, Key="reindex/000001.tar", CopySource=f"{BUCKET}/cc/000002.tar")
    with pytest.raises(ShardError, match=rf"{url}/000001.tar: the tar changed after it was indexed"):
        trusted_index_paths(paths)
    assert index_shards(url)["kept"] == 8
    assert len(trusted_index_paths(paths)) == 2


def test_detections_attach_from_the_store_to_the_store(converted, tmp_path):
    """tools/attach_detections.py with both sides in the store: every sample copied, the found ones with
    their boxes, the new prefix indexed and trusted; a filled prefix refused."""
    import numpy as np

    from soho_ds.data.detections import attach_detections, open_detections

    (tmp_path / "npz").mkdir()
    keys = []
    for tar in list_shards(converted):
        with storage.local_file(tar) as local, tarfile.open(local) as t:
            keys += [m.name[:-len(".json")] for m in t.getmembers() if m.name.endswith(".json")]
    for key in keys[:5]:  # detections for 5 of the 12 images, two boxes each
        np.savez(tmp_path / "npz" / f"{key}.npz", bbox=np.array([[0, 0, 10, 10], [5, 5, 30, 20]], np.float32),
                 image_w=64, image_h=48, objects_id=np.array([3, 7]))
    out = f"s3://{BUCKET}/cc_det"
    report = attach_detections(converted, out, open_detections(tmp_path / "npz"), features=False)
    assert (report["samples"], report["with_detections"], report["boxes"]) == (12, 5, 10)
    paths = list_shards(out)
    assert len(paths) == 3 and len(trusted_index_paths(paths)) == 3
    with storage.local_file(paths[0]) as local, tarfile.open(local) as t:
        assert any(m.name.endswith(".boxes.npy") for m in t.getmembers())
    with pytest.raises(ShardError, match=rf"{out} already holds 3 shards"):
        attach_detections(converted, out, open_detections(tmp_path / "npz"), features=False)


def test_a_missing_object_is_named(converted):
    with pytest.raises(storage.MissingObject, match=rf"{converted}/000007.tar: no such object on http://127"):
        list_shards(f"{converted}/000007.tar")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards found for 's3://soho-shards/nothing'"):
        list_shards(f"s3://{BUCKET}/nothing")
    with pytest.raises(storage.MissingObject, match=r"s3://no-such-bucket/x: the bucket does not exist"):
        list_shards("s3://no-such-bucket/x")


def test_wrong_credentials_are_refused_naming_the_object(converted, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match=rf"{converted}/000000.tar: http://127.0.0.1:\d+ refused the "
                                                   r"credentials \(403\): check AWS_ACCESS_KEY_ID"):  # a HEAD: no body
        list_shards(f"{converted}/000000.tar")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")
    with pytest.raises(storage.StorageError, match=r"refused the credentials \(InvalidAccessKeyId\)"):
        list_shards(converted)


MID_RUN_DROP = """
import os, signal, sys
from soho_ds.data import storage
from soho_ds.data.pipeline import ImageSpec, ShardLoader
stream = ShardLoader("s3://going/one", 2, ImageSpec(mode="aspect", shorter_side=32, longer_side=48, stride=32),
                     shuffle_buffer=1, num_threads=1).forever()
print(f"first batch: {len(next(stream).metas)} images")
os.killpg(int(sys.argv[1]), signal.SIGKILL)
try:
    for _ in range(64):  # DALI has a few batches read ahead; then its next read fails
        next(stream)
except storage.StorageError as e:
    print(f"StorageError: {e}")
"""


def test_a_dropped_connection_is_named_with_the_object(server, tmp_path, monkeypatch):
    """A second server goes away, before a start and in the middle of training: the next request, or
    DALI's failure, is reported naming the object and the endpoint."""
    port = free_port()
    proc = start_server(port)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        key_id, secret = issue_keys(endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.client().create_bucket(Bucket="going")
        write_split(tmp_path / "one", 64, 8, 32, 2, "one_", 0)
        for p in sorted((tmp_path / "one").iterdir()):
            storage.upload(p, f"s3://going/one/{p.name}")
        paths = list_shards("s3://going/one")
        assert len(trusted_index_paths(paths)) == 8
        # DALI keeps one S3 client per process, made with the first endpoint it saw: a fresh process reads
        # from this server, takes a batch, kills the server, and reads on
        child = subprocess.run([sys.executable, "-c", MID_RUN_DROP, str(proc.pid)], capture_output=True, text=True,
                               env={**ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id,
                                    "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}, timeout=300)
        proc.wait()
        assert child.returncode == 0, child.stderr[-3000:]
        assert child.stdout.startswith("first batch: 2 images\nStorageError: reading the shards stopped: "
                                       f"s3://going/one/000000.tar: no connection to {endpoint} "), child.stdout
        assert "restart with --resume" in child.stdout
        with pytest.raises(storage.StorageError, match=rf"s3://going/one/000000.idx.json: no connection to {endpoint}"):
            trusted_index_paths(paths)
    finally:
        if proc.poll() is None:  # the test failed before the child killed it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
