"""Converters from the real on-disk formats to pretraining shards: the real files of ../shared/realdata
and generated tiny files with broken entries; what is written, left out (and why), resumed."""
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from conftest import REALDATA, ROOT
from soho_ds.data import sources
from soho_ds.data.convert import ConversionError, write_shards
from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.data.shards import read_record

needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
SPEC = ImageSpec(mode="aspect", shorter_side=64, longer_side=128)


def convert(tmp_path, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert.py"), *args, "--workers", "2"],
                          capture_output=True, text=True, timeout=600)
    return proc


def samples(folder):
    """key -> captions of every sample the loader reads from `folder`."""
    loader = ShardLoader(str(folder), batch_size=4, spec=SPEC, train=False, num_threads=1)
    return {m["key"]: m["captions"] for b in loader.epochs() for m in b.metas}


def karpathy_json(path, records):
    path.write_text(json.dumps({"images": records, "dataset": "coco"}))
    return path


@needs_realdata
def test_coco_captions_with_the_karpathy_test_images_left_out(tmp_path):
    split = karpathy_json(tmp_path / "dataset_coco.json", [
        {"filepath": "val2014", "filename": "COCO_val2014_000000032907.jpg", "split": "test", "cocoid": 32907,
         "sentences": [{"raw": "x"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000262148.jpg", "split": "train", "cocoid": 262148,
         "sentences": [{"raw": "x"}]}])
    out = tmp_path / "coco"
    proc = convert(tmp_path, "coco", "--captions", str(REALDATA / "coco/captions_val2014_excerpt.json"), "--images",
                   str(REALDATA / "coco/images"), "--exclude-karpathy", str(split), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    # 25 images in the excerpt: 262148 written; 32907 excluded (Karpathy test); the other 23 have no photo here
    assert (c["records"], c["samples_written"], c["samples_indexed"]) == (25, 1, 1)
    assert c["left_out"] == {"excluded split": 1, "image file missing": 23}, c
    import hashlib  # each shard's recorded digest is that of the tar on disk

    assert all(s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest()
               for s in manifest["shards"] if not s.get("empty"))
    got = samples(out)
    captions = json.loads((REALDATA / "coco/captions_val2014_excerpt.json").read_text())["annotations"]
    assert got == {"coco_262148": [a["caption"].strip() for a in captions if a["image_id"] == 262148]}
    assert "converting" in proc.stderr and "record" in proc.stderr  # the progress bar


@needs_realdata
@pytest.mark.parametrize("version", ["v1.2", "v1.0"])
def test_visual_genome_phrases_deduplicated_capped_and_coco_eval_images_left_out(tmp_path, version):
    regions = REALDATA / f"visual_genome/region_descriptions_{version}_excerpt.json"
    image_data = json.loads((REALDATA / "visual_genome/image_data_first5.json").read_text())
    image_data[3]["coco_id"] = 555  # image 4 is, here, also COCO image 555 of the Karpathy val split
    (tmp_path / "image_data.json").write_text(json.dumps(image_data))
    split = karpathy_json(tmp_path / "dataset_coco.json", [{"filename": "COCO_val2014_000000000555.jpg",
                                                           "split": "val", "cocoid": 555, "sentences": []}])
    records = list(sources.visual_genome(regions, tmp_path / "image_data.json", REALDATA / "visual_genome/images",
                                         sources.karpathy_eval_images([split]), max_captions=4))
    assert [r.key for r in records] == ["vg_1", "vg_4", "vg_5"]
    by_key = {r.key: r for r in records}
    assert by_key["vg_4"].drop == sources.EXCLUDED and by_key["vg_1"].drop is None
    phrases = [p["phrase"] for p in json.loads(regions.read_text())[0]["regions"]]
    expected = []
    for p in phrases:
        p = " ".join(p.split())
        if p and p.lower() not in {e.lower() for e in expected}:
            expected.append(p)
    assert by_key["vg_1"].captions == expected[:4] and all(c == c.strip() and "\n" not in c
                                                           for c in by_key["vg_1"].captions)
    every = {r.key: r for r in sources.visual_genome(regions, tmp_path / "image_data.json",
                                                     REALDATA / "visual_genome/images")}
    assert len(expected) > 4 and every["vg_1"].captions == expected  # SOHO's data keeps them all
    assert every["vg_1"].meta["phrases_kept"] == len(expected)
    manifest = write_shards(records, tmp_path / "vg", {"source": "vg"}, samples_per_shard=2, workers=1,
                            progress=False)
    assert manifest["counts"]["left_out"] == {"excluded split": 1}
    assert set(samples(tmp_path / "vg")) == {"vg_1", "vg_5"}


def make_photos(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (80 + 16 * i, 64), (40 * i, 100, 200)).save(folder / f"p{i}.jpg")
    return [f"p{i}.jpg" for i in range(n)]


def test_caption_tsv_counts_every_broken_line_and_file(tmp_path):
    make_photos(tmp_path / "img")
    (tmp_path / "img/garbage.jpg").write_bytes(b"this is not an image")
    (tmp_path / "list.tsv").write_text("a blue photo\tp0.jpg\n"
                                       "a second photo\tp1.jpg\n"
                                       "only one column\n"
                                       "\tp2.jpg\n"                     # empty caption
                                       "a missing photo\tnowhere.jpg\n"
                                       "not an image\tgarbage.jpg\n"
                                       "a third photo\tp2.jpg\n")
    manifest = write_shards(sources.caption_tsv(tmp_path / "list.tsv", tmp_path / "img", name="cc"), tmp_path / "out",
                            {"source": "tsv"}, samples_per_shard=3, workers=2, progress=False)
    c = manifest["counts"]
    assert c["records"] == 7 and c["samples_written"] == 3 and c["samples_indexed"] == 3
    assert c["left_out"] == {"malformed line": 1, "no caption": 1, "image file missing": 1, "unreadable image": 1}, c
    assert "list.tsv:3: 1 columns" in manifest["left_out_examples"]["malformed line"][0]["reason"]
    assert samples(tmp_path / "out") == {"cc_000000001": ["a blue photo"], "cc_000000002": ["a second photo"],
                                         "cc_000000007": ["a third photo"]}


def test_an_interrupted_conversion_keeps_finished_shards_and_rewrites_the_partial_one(tmp_path):
    make_photos(tmp_path / "img", 6)
    (tmp_path / "list.tsv").write_text("".join(f"photo {i}\tp{i}.jpg\n" for i in range(6)))

    def run(**kw):
        return write_shards(sources.caption_tsv(tmp_path / "list.tsv", tmp_path / "img"), tmp_path / "out",
                            {"source": "tsv", "tsv": "list.tsv"}, samples_per_shard=2, workers=1, progress=False, **kw)

    run()
    out = tmp_path / "out"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # as if killed while writing the last shard: its entry never reached the manifest, a .tmp is left
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] != "000002.tar"]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "000002.tar").rename(out / "000002.tar.tmp")
    again = run()
    assert again["complete"] and again["counts"]["samples_indexed"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}["000000.tar"] == stamps["000000.tar"]
    assert (out / "000002.tar").exists() and not list(out.glob("*.tmp"))
    assert read_record(out / "000002.tar")["kept"] == 2
    with pytest.raises(ConversionError, match="other settings"):  # never overwritten by another conversion
        write_shards([], out, {"source": "coco"}, samples_per_shard=2, progress=False)


def test_re_encoding_caps_the_longer_side(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (640, 480), (10, 200, 30)).save(tmp_path / "img/big.jpg", quality=95)
    (tmp_path / "list.tsv").write_text("a big green photo\tbig.jpg\n")
    write_shards(sources.caption_tsv(tmp_path / "list.tsv", tmp_path / "img"), tmp_path / "out", {"source": "tsv"},
                 workers=1, max_side=320, progress=False)
    with tarfile.open(tmp_path / "out/000000.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
        size = Image.open(io.BytesIO(tar.extractfile(jpg).read())).size
    assert size == (320, 240) and (meta["width"], meta["height"]) == (320, 240)


@needs_realdata
@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_img2dataset_output_with_its_failed_download_counted(tmp_path, layout):
    folder = tmp_path / "i2d"
    folder.mkdir()
    shutil.copy(REALDATA / "img2dataset/00000.parquet", folder)
    shutil.copy(REALDATA / "img2dataset/00000_stats.json", folder)
    if layout == "webdataset":
        shutil.copy(REALDATA / "img2dataset/00000.tar", folder)
    else:  # img2dataset's files layout: the same members in a folder
        with tarfile.open(REALDATA / "img2dataset/00000.tar") as tar:
            tar.extractall(folder / "00000", filter="data")
    manifest = write_shards(sources.img2dataset(folder), tmp_path / "out", {"source": "img2dataset"}, workers=2,
                            progress=False)
    c = manifest["counts"]
    assert c["samples_written"] == 6 and c["samples_indexed"] == 6
    assert c["left_out"] == {"failed download": 1}
    assert "HTTP Error 404" in manifest["left_out_examples"]["failed download"][0]["reason"]
    got = samples(tmp_path / "out")
    with tarfile.open(REALDATA / "img2dataset/00000.tar") as tar:
        txt = {m.name[:-4]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert got == {f"i2d_{k}": [" ".join(v.split())] for k, v in txt.items()}


@needs_realdata
def test_karpathy_split_json_and_two_shard_sets_mixed_in_one_run(tmp_path):
    # the real Flickr8k excerpt: its photos are not here, so every train record is missing its image
    real = list(sources.karpathy(REALDATA / "karpathy_split/dataset_flickr8k_excerpt.json", tmp_path, ("train",)))
    assert [r.drop for r in real].count("split val not converted") == 2 and len(real) == 5
    assert real[0].captions[0] == "A black dog is running after a white dog in the snow ."
    records = [{"filename": f"{n}.jpg", "split": "train", "imgid": i,
                "sentences": [{"raw": f"flickr photo {n} "}, {"raw": "  "}]}
               for i, n in enumerate(("4945942737", "6338542128"))]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": records, "dataset": "flickr30k"}))
    proc = convert(tmp_path, "karpathy", "--split-json", str(tmp_path / "dataset_flickr30k.json"), "--images",
                   str(REALDATA / "flickr30k/images"), "--splits", "train", "--out", str(tmp_path / "f30k"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert samples(tmp_path / "f30k") == {"flickr30k_0": ["flickr photo 4945942737"],
                                          "flickr30k_1": ["flickr photo 6338542128"]}
    (tmp_path / "list.tsv").write_text("a blue photo\tp0.jpg\n")
    make_photos(tmp_path / "img", 1)
    write_shards(sources.caption_tsv(tmp_path / "list.tsv", tmp_path / "img"), tmp_path / "tsv", {"source": "tsv"},
                 workers=1, progress=False)
    loader = ShardLoader([str(tmp_path / "f30k"), str(tmp_path / "tsv")], batch_size=4, spec=SPEC, train=False,
                         num_threads=1)
    assert {m["key"] for b in loader.epochs() for m in b.metas} == {"flickr30k_0", "flickr30k_1", "tsv_000000001"}


def test_json_list_reader_streams_without_reading_the_whole_file(tmp_path):
    data = [{"id": i, "regions": [{"phrase": "p" * (i % 7)}]} for i in range(2000)]
    (tmp_path / "big.json").write_text(json.dumps(data))
    assert list(sources.iter_json_list(tmp_path / "big.json", chunk=100)) == data
    (tmp_path / "cut.json").write_text(json.dumps(data)[:-40])
    # a streaming reader hands out the records it has read before it meets the broken tail (a whole-file
    # json.load would give none), and reads no more than it needs for the first ones
    reader = sources.iter_json_list(tmp_path / "cut.json", chunk=100)
    assert [next(reader) for _ in range(3)] == data[:3]
    opened = []
    real_open = open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: opened.append(n) or real_read(n)
        return f

    import builtins
    builtins.open, was = counting_open, builtins.open
    try:
        first = next(sources.iter_json_list(tmp_path / "big.json", chunk=100))
    finally:
        builtins.open = was
    assert first == data[0] and opened and all(0 < n <= 100 for n in opened) and sum(opened) < 1000, opened
    with pytest.raises(ValueError, match="truncated JSON|not closed"):
        list(reader)

