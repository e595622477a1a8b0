"""Converters under injected faults: each bad input ends refused with its file and line and the way
out, or left out and counted in the manifest with the rest converted; nothing half-written stays."""
import fcntl
import importlib.util
import io
import json
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from conftest import REALDATA, ROOT
from soho_ds.data import sources
from soho_ds.data.convert import ConversionError, write_shards
from soho_ds.data.pipeline import ImageSpec, ShardLoader

needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
SPEC = ImageSpec(mode="aspect", shorter_side=32, longer_side=64)


def tool():
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools/convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples(folder):
    """key -> captions of every sample the training loader reads from `folder`."""
    loader = ShardLoader(str(folder), batch_size=4, spec=SPEC, train=False, num_threads=1)
    return {m["key"]: m["captions"] for b in loader.epochs() for m in b.metas}


def photo(path, size=(48, 40), colour=(200, 60, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def tsv(tmp_path, lines, n_photos=3):
    for i in range(n_photos):
        photo(tmp_path / "img" / f"p{i}.jpg", (48 + 8 * i, 40))
    path = tmp_path / "list.tsv"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def convert_tsv(tmp_path, path, **kw):
    return write_shards(sources.caption_tsv(path, tmp_path / "img", name="cc"), tmp_path / "out",
                        {"source": "tsv", "tsv": str(path)}, workers=1, progress=False, **kw)


def png_declaring(width, height) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb: PIL refuses to open it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_left_out_and_counted_and_leaves_no_temporary_file(tmp_path):
    path = tsv(tmp_path, [b"a photo\tp0.jpg", b"a huge declared png\tbomb.png", b"another photo\tp1.jpg"])
    (tmp_path / "img/bomb.png").write_bytes(png_declaring(30000, 30000))
    manifest = convert_tsv(tmp_path, path)
    c = manifest["counts"]
    assert (c["records"], c["samples_indexed"]) == (3, 2) and c["left_out"] == {"image too large": 1}, c
    example = manifest["left_out_examples"]["image too large"][0]
    assert example["key"] == "cc_000000002" and example["line"] == 2 and "900000000 pixels" in example["reason"]
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert set(samples(tmp_path / "out")) == {"cc_000000001", "cc_000000003"}


def test_a_caption_line_that_is_not_utf8_is_left_out_naming_file_and_line(tmp_path):
    path = tsv(tmp_path, [b"a photo\tp0.jpg", b"caf\xe9 au lait\tp1.jpg", b"a third photo\tp2.jpg"])
    manifest = convert_tsv(tmp_path, path)
    assert manifest["counts"]["left_out"] == {"not UTF-8": 1}
    assert manifest["left_out_examples"]["not UTF-8"][0]["reason"] == f"not UTF-8 ({path}:2: byte 3 of the line)"
    assert samples(tmp_path / "out") == {"cc_000000001": ["a photo"], "cc_000000003": ["a third photo"]}


def test_a_json_annotation_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "captions_train2014.json"
    bad.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(sources.SourceError, match=rf"{bad}: byte 47 is not UTF-8 .*re-save the file as UTF-8"):
        list(sources.coco_captions([bad], tmp_path))


def test_re_encoding_applies_the_exif_orientation(tmp_path):
    """A landscape sensor image (left half red, right half blue) tagged "rotate 90 degrees clockwise"
    (orientation 6) stands upright as a portrait: red on top."""
    raw = Image.new("RGB", (80, 40), (0, 0, 255))
    raw.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    raw.save(tmp_path / "img/sideways.jpg", exif=exif.tobytes(), quality=95)
    path = tmp_path / "list.tsv"
    path.write_text("a red and blue photo\tsideways.jpg\n")
    convert_tsv(tmp_path, path, max_side=60)
    with tarfile.open(tmp_path / "out/000000.tar") as tar:
        stored = Image.open(io.BytesIO(tar.extractfile("cc_000000001.jpg").read())).convert("RGB")
        meta = json.loads(tar.extractfile("cc_000000001.json").read())
    assert stored.size == (30, 60) and (meta["width"], meta["height"]) == (30, 60)
    top, bottom = stored.getpixel((15, 10)), stored.getpixel((15, 50))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_a_rerun_converts_appended_lines_and_rewrites_nothing_else(tmp_path):
    lines = [b"photo zero\tp0.jpg", b"photo one\tp1.jpg", b"photo two\tp2.jpg"]
    path = tsv(tmp_path, lines)
    convert_tsv(tmp_path, path, samples_per_shard=2)
    out = tmp_path / "out"
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    path.write_bytes(path.read_bytes() + b"photo zero again\tp0.jpg\n")
    manifest = convert_tsv(tmp_path, path, samples_per_shard=2)
    assert manifest["counts"]["records"] == 4 and manifest["counts"]["samples_indexed"] == 4
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert again["000000.tar"] == first["000000.tar"] and again["000001.tar"] != first["000001.tar"]
    assert samples(out) == {"cc_000000001": ["photo zero"], "cc_000000002": ["photo one"],
                            "cc_000000003": ["photo two"], "cc_000000004": ["photo zero again"]}
    unchanged = convert_tsv(tmp_path, path, samples_per_shard=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == again and unchanged["counts"]["records"] == 4


def coco_file(path, image_ids, folder="train2017"):
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg",
                    "coco_url": f"http://images.cocodataset.org/{folder}/{i:012d}.jpg"} for i in image_ids],
        "annotations": [{"id": 10 * i, "image_id": i, "caption": f"photo number {i}"} for i in image_ids]}))
    return path


def test_a_record_key_seen_before_is_left_out_and_counted_and_a_file_given_twice_is_refused(tmp_path):
    """COCO 2017 under any file name: images found through coco_url's folder; an image in two
    annotation files is converted once."""
    for i in (1, 2, 3):
        photo(tmp_path / "coco/train2017" / f"{i:012d}.jpg", (40 + 8 * i, 40))
    a = coco_file(tmp_path / "first_half.json", [1, 2])
    b = coco_file(tmp_path / "overlapping.json", [2, 3])
    manifest = write_shards(sources.coco_captions([a, b], tmp_path / "coco"), tmp_path / "out", {"source": "coco"},
                            samples_per_shard=2, workers=1, progress=False)
    assert manifest["counts"]["left_out"] == {"duplicate key": 1}
    assert manifest["left_out_examples"]["duplicate key"][0] == {
        "key": "coco_2", "reason": "duplicate key (first as record 2, in shard 000000.tar)",
        "image": str(tmp_path / "coco/train2017/000000000002.jpg")}
    assert set(samples(tmp_path / "out")) == {"coco_1", "coco_2", "coco_3"}
    convert_tool = tool()
    args = convert_tool.parse_args(["coco", "--captions", str(a), str(a), "--images", str(tmp_path / "coco"),
                                    "--out", str(tmp_path / "twice")])
    with pytest.raises(ConversionError, match=rf"--captions: {a} given twice; give each file once"):
        convert_tool.convert(args)
    assert not (tmp_path / "twice").exists()


def test_img2dataset_output_in_webp_and_png_is_converted(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, fmt, ext in (("000000000", "WEBP", "webp"), ("000000001", "PNG", "png"),
                              ("000000002", "JPEG", "jpg")):
            buf = io.BytesIO()
            Image.new("RGB", (56, 40), (30, 160, 90)).save(buf, format=fmt)
            for name, data in ((f"{key}.{ext}", buf.getvalue()), (f"{key}.txt", f"a {fmt} photo".encode()),
                               (f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = write_shards(sources.img2dataset(folder), tmp_path / "out", {"source": "img2dataset"}, workers=1,
                            progress=False)
    assert manifest["counts"]["samples_indexed"] == 3 and manifest["counts"]["left_out"] == {}
    with tarfile.open(tmp_path / "out/000000.tar") as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"webp", "png", "jpg", "json"}  # stored as they are
    assert samples(tmp_path / "out") == {"i2d_000000000": ["a WEBP photo"], "i2d_000000001": ["a PNG photo"],
                                         "i2d_000000002": ["a JPEG photo"]}


def test_a_second_conversion_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    path = tsv(tmp_path, [b"a photo\tp0.jpg"])
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out/.convert.lock", "a+") as held:  # the first conversion, still running
        held.write("pid 4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConversionError, match=r"another conversion is writing into this folder \(lock .*held by "
                                                  r"pid 4242\); wait for it to finish or choose another --out"):
            convert_tsv(tmp_path, path)
    assert convert_tsv(tmp_path, path)["counts"]["samples_indexed"] == 1  # once it has finished


@needs_realdata
def test_the_official_sbu_json_converts_with_its_photos_and_asks_for_the_download_without_them(tmp_path):
    official = REALDATA / "sbu/sbu-captions-all_first5.json"
    urls = json.loads(official.read_text())["image_urls"]
    for url in urls[:3]:
        photo(tmp_path / "sbu" / url.rsplit("/", 1)[1])
    manifest = write_shards(sources.sbu_captions(official, tmp_path / "sbu"), tmp_path / "out", {"source": "sbu"},
                            workers=1, progress=False)
    assert manifest["counts"]["samples_indexed"] == 3 and manifest["counts"]["left_out"] == {"image file missing": 2}
    got = samples(tmp_path / "out")
    assert got["sbu_4385058960"] == ["A wooden chair in the living room"] and len(got) == 3
    with pytest.raises(sources.SourceError, match=r"(?s)names images by URL \(http://static.flickr.com/2723/"
                                                  r"4385058960_b0f291553e.jpg\): download them first.*img2dataset "
                                                  r"--url_list .*--input_format json --url_col image_urls "
                                                  r"--caption_col captions"):
        next(sources.sbu_captions(official, None))


@needs_realdata
def test_conceptual_captions_url_tsv_is_answered_with_the_download_step(tmp_path):
    official = REALDATA / "conceptual_captions/Train_GCC-training_first5.tsv"
    convert_tool = tool()
    args = convert_tool.parse_args(["tsv", "--tsv", str(official), "--out", str(tmp_path / "cc")])
    with pytest.raises(sources.SourceError, match=rf"(?s){official}:1: column 1 names images by URL \(http://lh6.ggpht"
                                                  r".*> Train_GCC-training_first5_with_header.tsv .*img2dataset "
                                                  r"--url_list Train_GCC-training_first5_with_header.tsv "
                                                  r"--input_format tsv --url_col url"):
        convert_tool.convert(args)
    assert not list((tmp_path / "cc").glob("*.tar"))
