import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from soho_ds.data.pipeline import MEAN, STD, ImageSpec, ShardLoader
from soho_ds.data.shards import list_shards
from soho_ds.synthetic.world import COLOURS

SQUARE = ImageSpec(mode="square", image_size=64, hflip_prob=0.0)
ASPECT = ImageSpec(mode="aspect", shorter_side=64, longer_side=80, hflip_prob=0.0, stride=32)


def read_shards(folder):
    """key -> (jpeg bytes, meta) straight from the tar files, for reference."""
    out = {}
    for path in list_shards(str(folder)):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                try:
                    out[key] = (members.get(key + ".jpg"), json.loads(data))
                except json.JSONDecodeError:
                    out[key] = (members.get(key + ".jpg"), None)
    return out


def normalised(pixels: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(pixels.astype(np.float32)) - torch.tensor(MEAN)) / torch.tensor(STD)).permute(2, 0, 1)


def test_square_eval_pipeline_yields_normalised_images_equal_to_the_jpeg(synthetic_data):
    loader = ShardLoader(str(synthetic_data / "val"), batch_size=8, spec=SQUARE, train=False, num_threads=1)
    reference = read_shards(synthetic_data / "val")
    checked = 0
    for batch in loader.epochs():
        assert batch.images.shape[1:] == (3, 64, 64) and batch.images.dtype == torch.float32
        assert (batch.image_sizes == 64).all()
        for img, meta, source in zip(batch.images, batch.metas, batch.sources):
            jpeg, ref_meta = reference[meta["key"]]
            assert meta == ref_meta and source.endswith(f":{meta['key']}.jpg") and ".tar:" in source
            if meta["width"] != meta["height"]:
                continue  # square mode distorts the others
            expected = normalised(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
            assert (img - expected).abs().mean() < 0.02  # same pixels up to JPEG decoder rounding
            checked += 1
    assert checked >= 20


def test_aspect_mode_keeps_the_aspect_ratio_pads_to_the_stride_and_reports_valid_sizes(synthetic_data):
    """Shorter side 64, longer at most 80: a 64x85 portrait becomes 60x80 (the longer side caps it),
    a square 64x64; the batch is padded with zeros (the mean colour) to a multiple of 32."""
    reference = read_shards(synthetic_data / "val")
    loader = ShardLoader(str(synthetic_data / "val"), batch_size=8, spec=ASPECT, train=False, num_threads=1)
    shapes = set()
    for batch in loader.epochs():
        H, W = batch.images.shape[-2:]
        assert H % 32 == 0 and W % 32 == 0
        for img, (h, w), meta in zip(batch.images, batch.image_sizes.tolist(), batch.metas):
            ow, oh = meta["width"], meta["height"]
            scale = min(64 / min(ow, oh), 80 / max(ow, oh))
            assert abs(h - oh * scale) <= 1 and abs(w - ow * scale) <= 1, (h, w, ow, oh)
            assert h <= H and w <= W and min(h, w) <= 64 and max(h, w) <= 80
            assert img[:, h:, :].abs().sum() == 0 and img[:, :, w:].abs().sum() == 0  # padding
            jpeg = reference[meta["key"]][0]
            expected = normalised(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((w, h),
                                                                                                Image.BILINEAR)))
            assert (img[:, :h, :w] - expected).abs().mean() < 0.1  # the same picture, not squashed
            shapes.add((h, w))
    assert {(64, 64), (60, 80), (80, 60)} <= shapes


def test_multi_scale_training_draws_the_shorter_side_per_image(synthetic_data):
    spec = ImageSpec(mode="aspect", shorter_side=64, longer_side=200, train_shorter_sides=(32, 48, 64), stride=32)
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=16, spec=spec, train=True, num_threads=1, seed=2)
    shorter = []
    for _, batch in zip(range(4), loader.forever()):
        shorter += batch.image_sizes.min(1).values.tolist()
    assert set(shorter) == {32, 48, 64}


def padded_fraction(batches) -> float:
    valid = total = 0
    for b in batches:
        valid += int(b.image_sizes.prod(1).sum())
        total += b.images.shape[0] * b.images.shape[-2] * b.images.shape[-1]
    return 1 - valid / total


def test_batches_grouped_by_orientation_hold_one_orientation_and_less_padding(synthetic_data):
    spec = ImageSpec(mode="aspect", shorter_side=64, longer_side=96, stride=32)
    mixed = ShardLoader(str(synthetic_data / "train"), batch_size=8, spec=spec, train=True, num_threads=1, seed=1)
    grouped = ShardLoader(str(synthetic_data / "train"), batch_size=8, spec=spec, train=True, num_threads=1, seed=1,
                          group_by_orientation=True)
    assert len(grouped.streams) == 2 and sum(grouped.stream_samples) == 120
    batches = [b for _, b in zip(range(12), grouped.forever())]
    for b in batches:
        h, w = b.image_sizes[:, 0], b.image_sizes[:, 1]
        assert bool((w >= h).all()) or bool((h > w).all())
    assert {bool((b.image_sizes[:, 1] >= b.image_sizes[:, 0]).all()) for b in batches} == {True, False}
    assert padded_fraction(batches) < padded_fraction(b for _, b in zip(range(12), mixed.forever())) - 0.05


def test_train_pipeline_augments_to_the_configured_size(synthetic_data):
    spec = ImageSpec(mode="square", image_size=32, crop_scale=(0.5, 1.0), hflip_prob=0.5)
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=16, spec=spec, train=True, num_threads=1, seed=1)
    batches = loader.forever()
    first, second = next(batches), next(batches)
    assert first.images.shape == (16, 3, 32, 32)
    # normalised: roughly zero-centred, unit-ish spread (not 0..255)
    assert first.images.abs().max() < 3.0 and first.images.std() > 0.3
    assert not torch.equal(first.images, second.images)
    # train pass returns full batches only, and keeps going past the end of an epoch
    for _ in range(len(loader) + 2):
        assert next(batches).images.shape[0] == 16


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_are_disjoint_and_cover_the_data(synthetic_data, world):
    seen = []
    for rank in range(world):
        loader = ShardLoader(str(synthetic_data / "val"), batch_size=7, spec=ASPECT, rank=rank, world_size=world,
                             train=False, num_threads=1)
        keys = [m["key"] for b in loader.epochs() for m in b.metas]
        assert len(keys) == len(set(keys))
        seen.append(set(keys))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == {f"va{i:07d}" for i in range(40)}


def test_malformed_samples_are_left_out_counted_and_named(synthetic_data):
    """The generator's five kinds of broken sample: each caught by the checker with its reason, the
    loader never sees them, and every good sample is read."""
    from soho_ds.data.shards import read_record

    manifest = json.loads((synthetic_data / "train" / "manifest.json").read_text())
    bad = {b["key"]: b["kind"] for b in manifest["malformed"]}
    assert sorted(bad.values()) == sorted(["truncated_jpeg", "bad_json", "missing_jpeg", "garbled_jpeg",
                                           "empty_captions"])
    reasons = {}
    for path in list_shards(str(synthetic_data / "train")):
        for s in read_record(path)["skipped"]:
            reasons[s["key"]] = s["reason"]
    assert set(reasons) == set(bad)
    by_kind = {bad[k]: r for k, r in reasons.items()}
    assert "does not decode" in by_kind["truncated_jpeg"] and "does not decode" in by_kind["garbled_jpeg"]
    assert "not valid JSON" in by_kind["bad_json"] and "no image member" in by_kind["missing_jpeg"]
    assert "non-empty" in by_kind["empty_captions"]
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=8, spec=ASPECT, train=False, num_threads=1)
    keys = [m["key"] for b in loader.epochs() for m in b.metas]
    assert len(keys) == 120 and not set(keys) & set(bad)


def test_synthetic_captions_describe_their_images(synthetic_data):
    """Every object named in the metadata is drawn in its colour inside its box, and the
    captions mention it: the data carries meaning a model can learn."""
    for key, (jpeg, meta) in list(read_shards(synthetic_data / "val").items())[:20]:
        img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
        assert img.shape[:2] == (meta["height"], meta["width"])
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            centre = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() < 40, (key, obj)
            assert any(f"{obj['colour']} {obj['shape']}" in c for c in meta["captions"]), (key, obj)
