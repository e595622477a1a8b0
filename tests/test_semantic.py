"""Semantic visual losses: boxes through DALI augmentation, the three losses, empty images, the tool."""
import base64
import csv
import io
import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from soho_ds.config import ConfigError, PretrainConfig, SemanticConfig
from soho_ds.data.pipeline import MEAN, STD, ImageSpec, ShardLoader
from soho_ds.data.regions import RegionSpec, RegionTargets
from soho_ds.models.semantic import SemanticVisualHeads, attribute_loss, object_loss, region_feature_loss
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.synthetic.world import ATTRIBUTE_CLASSES, COLOURS, OBJECT_CLASSES, REGION_FEATURE_DIM

from conftest import REALDATA, ROOT, tiny_model_config

SPEC = RegionSpec(num_attributes=len(ATTRIBUTE_CLASSES), features=True)
SEMANTIC = SemanticConfig(object_weight=1.0, attribute_weight=1.0, feature_weight=1.0, num_objects=len(OBJECT_CLASSES),
                          num_attributes=len(ATTRIBUTE_CLASSES), feature_dim=REGION_FEATURE_DIM)


def colour_under_boxes(images, image_sizes, regions, mirror=False):
    """For each box: the palette colour nearest the median pixel of its central 30% (None: background)."""
    pixels = images.permute(0, 2, 3, 1) * torch.tensor(STD) + torch.tensor(MEAN)  # (B, H, W, 3), 0-255
    names, palette = list(COLOURS), torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    found = []
    for image_index, x0, y0, x1, y1 in regions.boxes.tolist():
        if mirror:
            width = int(image_sizes[int(image_index), 1])
            x0, x1 = width - x1, width - x0
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        ys = slice(int(cy - 0.15 * h), max(int(cy - 0.15 * h) + 1, int(math.ceil(cy + 0.15 * h))))
        xs = slice(int(cx - 0.15 * w), max(int(cx - 0.15 * w) + 1, int(math.ceil(cx + 0.15 * w))))
        median = pixels[int(image_index), ys, xs].reshape(-1, 3).median(0).values
        dist = (palette - median).norm(dim=1)
        found.append(names[int(dist.argmin())] if dist.min() < 60 else None)
    return found


def true_colours(regions):
    colours = []
    for attrs in regions.attributes:
        colour_ids = [i for i in attrs.nonzero().flatten().tolist() if ATTRIBUTE_CLASSES[i] in COLOURS]
        colours.append(ATTRIBUTE_CLASSES[colour_ids[0]])
    return colours


@pytest.mark.parametrize("spec", [ImageSpec(mode="square", image_size=96, crop_scale=(0.3, 1.0), hflip_prob=0.5),
                                  ImageSpec(mode="aspect", shorter_side=80, longer_side=120, hflip_prob=0.5,
                                            train_shorter_sides=(64, 80, 96))],
                         ids=["square-crop", "aspect-multiscale"])
def test_boxes_follow_the_crop_resize_and_flip(synthetic_data, spec):
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=16, spec=spec, train=True, num_threads=1, seed=7,
                         regions=SPEC)
    hits = mirrored_hits = total = 0
    for step, batch in zip(range(4), loader.forever()):
        r = batch.regions
        assert r.boxes.shape[1] == 5 and r.objects.shape == (len(r.boxes),)
        assert r.attributes.shape == (len(r.boxes), len(ATTRIBUTE_CLASSES))
        assert r.features.shape == (len(r.boxes), REGION_FEATURE_DIM)
        limits = batch.image_sizes[r.boxes[:, 0].long()]  # (R, 2) h, w of each box's image
        assert (r.boxes[:, 1:] >= 0).all() and (r.boxes[:, 3] <= limits[:, 1]).all() and (
            r.boxes[:, 4] <= limits[:, 0]).all()
        truth = true_colours(r)
        hits += sum(a == b for a, b in zip(colour_under_boxes(batch.images, batch.image_sizes, r), truth))
        mirrored_hits += sum(a == b for a, b in zip(colour_under_boxes(batch.images, batch.image_sizes, r, mirror=True),
                                                    truth))
        total += len(truth)
    assert total > 80
    assert hits / total > 0.9, (hits, total)
    # Control: had the boxes not been flipped with the image, far fewer would sit on their object.
    assert mirrored_hits / total < 0.6, (mirrored_hits, total)


def test_each_box_keeps_its_own_classes_and_feature(synthetic_data):
    """The surviving boxes' targets are picked by the indices DALI reports: checked against the JSON."""
    from soho_ds.synthetic.world import ShapeObject

    loader = ShardLoader(str(synthetic_data / "val"), batch_size=8, spec=ImageSpec(mode="square", image_size=64),
                         train=False, num_threads=1, regions=SPEC)
    batch = next(loader.epochs())
    r = batch.regions
    expected_rows = []
    for i, meta in enumerate(batch.metas):
        for obj in meta["objects"]:
            o = ShapeObject(obj["shape"], obj["colour"], obj["size"], tuple(obj["box"]))
            scale = [64 / meta["width"], 64 / meta["height"]] * 2
            expected_rows.append((i, [v * f for v, f in zip(obj["box"], scale)], o.object_id, o.attribute_ids,
                                  o.region_feature()))
    assert len(expected_rows) == len(r.boxes)
    for (i, box, obj, attrs, feat), row, got_obj, got_attrs, got_feat in zip(
            expected_rows, r.boxes, r.objects, r.attributes, r.features):
        assert row[0] == i
        torch.testing.assert_close(row[1:], torch.tensor(box), atol=0.01, rtol=0)
        assert got_obj == obj and got_attrs.nonzero().flatten().tolist() == sorted(attrs)
        np.testing.assert_allclose(got_feat.numpy(), feat, atol=2e-3)  # stored as float16


def test_losses_against_hand_computed_values():
    loss, acc = object_loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)
    assert acc.item() == 0.5
    # class -1 (unknown) counts for neither loss nor accuracy
    loss, acc = object_loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, -1]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2))) and acc.item() == 1.0

    # the true attributes share the target mass: -(log p0 + log p2) / 2; a box without attributes is left out
    logits = torch.tensor([[0.0, 2.0, -1.0], [5.0, 0.0, 0.0]])
    loss, acc = attribute_loss(logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    log_z = math.log(1 + math.exp(2) + math.exp(-1))
    assert loss.item() == pytest.approx(((log_z - 0.0) + (log_z + 1.0)) / 2)
    assert acc.item() == 0.0  # the top attribute (index 1) is not a true one
    # at initialisation (equal logits) it is ln(classes), the object loss's scale: 6.0 for VG's 400, not 277
    flat = torch.zeros(4, 400)
    targets = torch.zeros(4, 400)
    targets[:, :3] = 1
    assert attribute_loss(flat, targets)[0].item() == pytest.approx(math.log(400))
    assert object_loss(torch.zeros(4, 1600), torch.zeros(4, dtype=torch.long))[0].item() == pytest.approx(
        math.log(1600))

    pred, target = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 0.0]])
    assert region_feature_loss(pred, target, "smooth_l1").item() == pytest.approx((0.5 * 0.25 + 1.5) / 2)
    cos = region_feature_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]), "cosine")
    assert cos.item() == pytest.approx(0.5)


def test_roi_pooling_reads_the_grid_under_the_box():
    heads = SemanticVisualHeads(1, SemanticConfig(object_weight=1.0, num_objects=2, roi_size=2))
    grid = torch.zeros(2, 1, 8, 8)
    grid[1, 0, 2:6, 2:6] = 5.0  # image 1, cells 2..5; image size 256 -> 32 px per cell
    boxes = torch.tensor([[1, 96.0, 96.0, 160.0, 160.0],  # cells 3..5 of image 1: inside the patch
                          [0, 96.0, 96.0, 160.0, 160.0],  # same place, image 0: zeros
                          [1, 200.0, 0.0, 256.0, 40.0]])  # image 1, outside the patch
    pooled = heads.pool(grid, boxes, stride=32)
    torch.testing.assert_close(pooled, torch.tensor([[5.0], [0.0], [0.0]]))


def test_images_without_boxes_add_nothing_but_keep_every_head_in_the_graph():
    metas = [{"key": "a", "detections": {"image_w": 64, "image_h": 64, "boxes": [], "object_ids": [],
                                         "attribute_ids": []}},
             {"key": "b", "detections": {"image_w": 64, "image_h": 64, "boxes": [[0, 0, 32, 32]], "object_ids": [1],
                                         "attribute_ids": [[0, 2]]}}]
    boxes = np.array([[[-1, -1, -1, -1]], [[0, 0, 0.5, 0.5]]], dtype=np.float32)
    kept = np.array([[-1], [0]])
    r = RegionTargets.build(metas, boxes, kept, None, np.array([[64, 64], [64, 64]]), num_attributes=3,
                            max_boxes=36)
    assert r.boxes.tolist() == [[1.0, 0.0, 0.0, 32.0, 32.0]] and r.objects.tolist() == [1]
    assert r.attributes.tolist() == [[1.0, 0.0, 1.0]] and r.features is None

    cfg = SemanticConfig(object_weight=1.0, attribute_weight=1.0, feature_weight=1.0, num_objects=2,
                         num_attributes=3, feature_dim=4)
    heads = SemanticVisualHeads(8, cfg)
    grid = torch.randn(2, 8, 2, 2, requires_grad=True)
    batch = {"region_boxes": r.boxes, "region_objects": r.objects, "region_attributes": r.attributes,
             "region_features": torch.ones(1, 4)}
    total, out = heads(grid, batch, stride=32)
    total.backward()
    assert grid.grad[0].abs().sum() == 0 and grid.grad[1].abs().sum() > 0  # image a has no box: no signal

    grid.grad = None
    heads.zero_grad()
    empty = {"region_boxes": torch.zeros(0, 5), "region_objects": torch.zeros(0, dtype=torch.long),
             "region_attributes": torch.zeros(0, 3), "region_features": torch.zeros(0, 4)}
    total, out = heads(grid, empty, stride=32)
    assert total.item() == 0.0 and out["semantic/boxes_per_image"].item() == 0.0
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in heads.parameters())


def test_pretrainer_adds_the_weighted_semantic_terms(synthetic_data, tokenizer):
    from soho_ds.data.text import PretrainTextBuilder

    loader = ShardLoader(str(synthetic_data / "val"), batch_size=4, spec=ImageSpec(shorter_side=64, longer_side=96),
                         train=False, num_threads=1, regions=SPEC)
    raw = next(loader.epochs())
    batch = PretrainTextBuilder(tokenizer, 24, 2, 0.15, 0.5, seed=0)([m["captions"] for m in raw.metas])
    batch["images"], batch["image_sizes"] = raw.images, raw.image_sizes
    batch.update(raw.regions.as_batch())
    torch.manual_seed(0)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(), SEMANTIC).train()
    out = model(batch)
    assert {"loss/object", "loss/attribute", "loss/region_feature", "acc/object", "acc/attribute"} <= set(out)
    soho = sum(w * out[k] for w, k in ((1.0, "loss/itm"), (1.0, "loss/mlm"), (1.0, "loss/mvm")))
    semantic = out["loss/object"] + out["loss/attribute"] + out["loss/region_feature"]
    torch.testing.assert_close(out["loss"], soho + semantic)
    out["loss"].backward()
    assert model.model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    # Off by default: the SOHO model has no semantic heads at all.
    assert SohoPretrainer(tiny_model_config(), PretrainConfig()).semantic_heads is None


def test_loader_refuses_shards_without_detections(tmp_path, synthetic_data):
    from soho_ds.data.shards import index_shards

    src = sorted((synthetic_data / "val").glob("*.tar"))[0]
    dst = tmp_path / "000000.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if not m.name.endswith(".npy"):
                tout.addfile(m, tin.extractfile(m))
    index_shards(str(tmp_path))
    with pytest.raises(ValueError, match=r"000000\.tar: sample va\d+ has no boxes\.npy, feats\.npy member"):
        ShardLoader(str(tmp_path), batch_size=4, spec=ImageSpec(), train=True, num_threads=1, regions=SPEC)


def _b64(array, dtype):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def test_attach_detections_from_butd_tsv_and_npz(tmp_path, synthetic_data):
    """Both detector formats round-trip into shards that the region loader reads back."""
    from soho_ds.data.shards import list_shards

    shard = list_shards(str(synthetic_data / "val"))[0]
    with tarfile.open(shard) as tar:
        metas = {m.name[:-5]: json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                 if m.name.endswith(".json")}
    keys = sorted(k for k, meta in metas.items() if meta.get("captions"))
    rng = np.random.default_rng(0)
    truth = {}
    tsv = tmp_path / "dets.tsv"
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    with open(tsv, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        for i, key in enumerate(keys[:-1]):  # the last image has no detections
            n = i % 3  # 0, 1 or 2 boxes
            x0, y0 = rng.uniform(0, 30, (2, n))
            boxes = np.stack([x0, y0, x0 + 20, y0 + 25], 1).astype(np.float32)  # shorter side 64
            w, h = metas[key]["width"], metas[key]["height"]
            objects, attrs, conf = rng.integers(0, 4, n), rng.integers(0, 8, n), np.where(np.arange(n) % 2, 0.9, 0.05)
            feats = rng.standard_normal((n, 6)).astype(np.float32)
            truth[key] = (boxes, objects, [[int(a)] if c >= 0.5 else [] for a, c in zip(attrs, conf)], feats)
            # LXMERT column order: height before width
            writer.writerow([key, h, w, _b64(objects, np.int64), _b64(np.ones(n), np.float32), _b64(attrs, np.int64),
                             _b64(conf, np.float32), n, _b64(boxes, np.float32), _b64(feats, np.float32)])
            np.savez_compressed(npz_dir / f"{key}.npz", x=feats, bbox=boxes, num_bbox=n, image_h=h, image_w=w,
                                info={"objects_id": objects, "objects_conf": np.ones(n), "attrs_id": attrs,
                                      "attrs_conf": conf})
    for source, out in ((tsv, tmp_path / "from_tsv"), (npz_dir, tmp_path / "from_npz")):
        subprocess.run([sys.executable, str(ROOT / "tools/attach_detections.py"), "--shards", shard, "--out", str(out),
                        "--detections", str(source), "--attr-threshold", "0.5"], check=True, capture_output=True)
        # shorter side 64 and no cap on the longer: the images keep their size, boxes their pixels
        loader = ShardLoader(str(out), batch_size=len(keys), spec=ImageSpec(shorter_side=64, longer_side=1000),
                             train=False, num_threads=1, regions=RegionSpec(num_attributes=8, features=True,
                                                                            max_boxes=36))
        batch = next(loader.epochs())
        r = batch.regions
        assert len(batch.metas) == len(keys)  # nothing dropped, with or without detections
        rows = 0
        for i, meta in enumerate(batch.metas):
            if meta["key"] not in truth:
                assert meta["detections"]["boxes"] == [] and (r.boxes[:, 0] == i).sum() == 0
                continue
            boxes, objects, attrs, feats = truth[meta["key"]]
            mine = r.boxes[:, 0] == i
            rows += int(mine.sum())
            torch.testing.assert_close(r.boxes[mine, 1:], torch.from_numpy(boxes), atol=0.02, rtol=0)
            assert r.objects[mine].tolist() == objects.tolist()
            assert [a.nonzero().flatten().tolist() for a in r.attributes[mine]] == attrs
            np.testing.assert_allclose(r.features[mine].numpy(), feats, atol=5e-3, rtol=1e-3)
            assert meta["detections"]["object_ids"] == objects.tolist()
        assert rows == sum(len(t[0]) for t in truth.values()) > 0


def test_attach_detections_rejects_a_broken_tsv_line(tmp_path, synthetic_data):
    from soho_ds.data.detections import TsvDetections

    tsv = tmp_path / "bad.tsv"
    tsv.write_text("img1\t64\t64\t3\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: image img1: 4 tab-separated fields"):
        TsvDetections(tsv).get("img1")


needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
COCO_PHOTOS = {262148: "COCO_val2014_000000262148.jpg", 393225: "COCO_val2014_000000393225.jpg",
               458752: "COCO_train2014_000000458752.jpg"}


def coco_shards(tmp_path):
    """The real COCO photos of ../shared/realdata as a shard set, image_id the integer COCO id (as the coco
    converter writes it)."""
    from soho_ds.data.convert import write_shards
    from soho_ds.data.sources import Record

    records = [Record(f"coco_{i}", str(REALDATA / "coco/images" / name), [f"photo {i}"],
                      {"source": "coco", "image_id": i}) for i, name in COCO_PHOTOS.items()]
    write_shards(records, tmp_path / "coco", {"source": "coco"}, samples_per_shard=2, workers=1, progress=False)
    return tmp_path / "coco"


def attached(out):
    """key -> the sample's detections entry and features, from the attached shards."""
    from soho_ds.data.shards import list_shards

    found = {}
    for shard in list_shards(str(out)):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                feats = members.get(f"{key}.feats.npy")
                found[key] = (json.loads(data)["detections"],
                              None if feats is None else np.load(io.BytesIO(feats)))
    return found


@needs_realdata
def test_vinvl_predictions_attach_by_coco_file_stem_with_the_label_maps_ids_and_features(tmp_path):
    """VinVL's layout, written here from its documentation: predictions.tsv (id, JSON objects with rect,
    class, conf, attributes, attr_scores), features.tsv (id, box count, base64 of 2,048 + 6 floats a box)
    and the label map's 1-based label_to_idx / attribute_to_idx. Ids are COCO file stems; shards hold
    integer ids."""
    from soho_ds.data.detections import attach_detections, open_detections

    shards = coco_shards(tmp_path)
    label_map = tmp_path / "VG-SGG-dicts-vgoi6-clipped.json"
    label_map.write_text(json.dumps({"label_to_idx": {"man": 1, "surfboard": 2, "wave": 3},
                                     "attribute_to_idx": {"white": 1, "wet": 2, "blue": 3},
                                     "idx_to_label": {"1": "man"}}))
    objects = {262148: [{"rect": [10.5, 20.0, 200.0, 300.0], "class": "man", "conf": 0.91,
                         "attributes": ["wet", "white"], "attr_scores": [0.8, 0.2]},
                        {"rect": [0.0, 0.0, 50.0, 40.0], "class": "wave", "conf": 0.6, "attributes": [],
                         "attr_scores": []}],
               458752: [{"rect": [5.0, 5.0, 100.0, 90.0], "class": "surfboard", "conf": 0.7,
                         "attributes": ["blue"], "attr_scores": [0.9]}]}
    rng = np.random.default_rng(1)
    feats = {i: rng.standard_normal((len(o), 2054)).astype(np.float32) for i, o in objects.items()}
    with open(tmp_path / "predictions.tsv", "w") as p, open(tmp_path / "features.tsv", "w") as f:
        for i, objs in objects.items():
            stem = COCO_PHOTOS[i][:-4]
            p.write(f"{stem}\t{json.dumps({'objects': objs, 'image_h': 480, 'image_w': 640})}\n")
            f.write(f"{stem}\t{len(objs)}\t{_b64(feats[i], np.float32)}\n")
    source = open_detections(tmp_path / "predictions.tsv", 0.5, label_map, tmp_path / "features.tsv")
    report = attach_detections(str(shards), tmp_path / "out", source)
    assert (report["samples"], report["with_detections"], report["boxes"]) == (3, 2, 3)
    assert [k.rsplit(":", 1)[-1] for k in report["without_detections"]] == ["coco_393225"]  # kept, counted
    saved = json.loads((tmp_path / "out/detections.json").read_text())
    assert sum(s["with_detections"] for s in saved["shards"].values()) == 2 and len(saved["shards"]) == 2
    assert saved["object_ids"] and saved["attribute_ids"]
    got = attached(tmp_path / "out")
    entry, f = got["coco_262148"]
    assert entry["object_ids"] == [0, 2] and entry["attribute_ids"] == [[1], []]  # 1-based -> 0-based, 0.5 kept
    assert entry["boxes"][0] == [10.5, 20.0, 200.0, 300.0] and (entry["image_w"], entry["image_h"]) == (640, 480)
    np.testing.assert_allclose(f, feats[262148][:, :2048], atol=2e-3, rtol=1e-2)  # stored as fp16
    assert got["coco_458752"][0]["object_ids"] == [1] and got["coco_393225"][0]["boxes"] == []

    with pytest.raises(ValueError, match=r"VinVL predictions name their classes; give the label map"):
        open_detections(tmp_path / "predictions.tsv")
    bad = tmp_path / "bad_predictions.tsv"
    bad.write_text(f"COCO_val2014_000000262148\t{json.dumps({'objects': [{'rect': [0, 0, 1, 1], 'class': 'cat'}]})}\n")
    with pytest.raises(ValueError, match=r"bad_predictions.tsv: image COCO_val2014_000000262148: class 'cat' is "
                                         r"not in the label map"):
        attach_detections(str(shards), tmp_path / "out_bad", open_detections(bad, 0.0, label_map))


@needs_realdata
def test_butd_ids_are_normalised_a_file_matching_nothing_is_refused_and_missing_classes_stop_the_losses(
        tmp_path, tokenizer):
    """LXMERT/BUTD TSVs name COCO images by file stem: they attach to integer ids. A file for other images
    is refused naming both sides' ids, leaving no output. The six-column BUTD TSV has no class ids: a run
    with the object loss on is refused before it starts; the region-feature loss alone is fine."""
    from soho_ds.config import load_config
    from soho_ds.data.detections import DetectionsError, attach_detections, normalise_image_id, open_detections
    from soho_ds.pretrain.task import check_shards

    assert {normalise_image_id(x) for x in ("COCO_val2014_000000262148", "000000262148.jpg", "262148", 262148,
                                            "COCO_train2014_000000262148")} == {"262148"}
    assert normalise_image_id("vg_12") == "vg_12" and normalise_image_id("2345.jpg") == "2345"
    shards = coco_shards(tmp_path)
    six = tmp_path / "butd.tsv"
    with open(six, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        for i in (262148, 393225):
            boxes = np.array([[1, 2, 30, 40]], dtype=np.float32)
            writer.writerow([COCO_PHOTOS[i][:-4], 640, 480, 1, _b64(boxes, np.float32),
                             _b64(np.ones((1, 8)), np.float32)])
    report = attach_detections(str(shards), tmp_path / "out", open_detections(six))
    assert report["with_detections"] == 2 and not report["object_ids"]
    assert attached(tmp_path / "out")["coco_262148"][0]["object_ids"] == [-1]

    other = tmp_path / "other.tsv"
    other.write_text(six.read_text().replace("000000262148", "000000000001").replace("000000393225", "000000000002"))
    with pytest.raises(DetectionsError, match=r"other.tsv: none of its 2 records matches any of the 3 samples .*"
                                              r"their image ids: 262148, .*the file's: 1, 2"):
        attach_detections(str(shards), tmp_path / "out_other", open_detections(other))
    assert not list((tmp_path / "out_other").glob("*.tar"))

    base = [f"data.train_shards={tmp_path}/out", "data.val_shards=null", "model.backbone_weights=null",
            "semantic.feature_dim=8", "semantic.num_objects=10", "semantic.num_attributes=5"]
    config = ROOT / "configs/pretrain_synthetic.yaml"
    with pytest.raises(ConfigError, match=r"data.train_shards: the detections attached to .*/out \(.*butd.tsv\) carry "
                                          r"no object class ids, which semantic.object_weight 1 needs"):
        check_shards(load_config(config, base + ["semantic.object_weight=1"]))
    assert check_shards(load_config(config, base + ["semantic.feature_weight=1"]))["train"][0].samples == 3
