import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from soho_ds.data.pipeline import MEAN, STD, ShardLoader
from soho_ds.data.shards import index_shards, list_shards
from soho_ds.data.synthetic import COLOURS


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


def test_eval_pipeline_yields_normalised_images_equal_to_the_jpeg(synthetic_data):
    loader = ShardLoader(str(synthetic_data / "val"), batch_size=8, image_size=64, train=False, num_threads=1)
    reference = read_shards(synthetic_data / "val")
    batch = next(loader.epochs())
    assert batch.images.shape == (8, 3, 64, 64) and batch.images.dtype == torch.float32
    for img, meta in zip(batch.images, batch.metas):
        jpeg, ref_meta = reference[meta["key"]]
        assert meta == ref_meta
        pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32))
        expected = ((pixels - torch.tensor(MEAN)) / torch.tensor(STD)).permute(2, 0, 1)
        # Same pixels up to JPEG decoder rounding (a few grey levels).
        assert (img - expected).abs().mean() < 0.02


def test_train_pipeline_augments_to_the_configured_size(synthetic_data):
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=16, image_size=32, train=True,
                         crop_scale=(0.5, 1.0), hflip_prob=0.5, num_threads=1, seed=1)
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
        loader = ShardLoader(str(synthetic_data / "val"), batch_size=7, image_size=32, rank=rank,
                             world_size=world, train=False, num_threads=1)
        keys = [m["key"] for b in loader.epochs() for m in b.metas]
        assert len(keys) == len(set(keys))
        seen.append(set(keys))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == {f"va{i:07d}" for i in range(40)}


def test_malformed_samples_are_skipped_counted_and_named(synthetic_data):
    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    bad = {b["key"] for b in manifest["splits"]["train"]["malformed"]}
    assert len(bad) == 3
    report = index_shards(str(synthetic_data / "train"))
    assert report["kept"] == 120 and report["skipped"] == 3
    assert {s["key"] for skipped in report["shards"].values() for s in skipped} == bad
    reasons = {s["reason"] for skipped in report["shards"].values() for s in skipped}
    assert any("JPEG" in r for r in reasons) and any("JSON" in r for r in reasons) and any("no .jpg" in r for r in reasons)
    loader = ShardLoader(str(synthetic_data / "train"), batch_size=8, image_size=32, train=False, num_threads=1)
    keys = [m["key"] for b in loader.epochs() for m in b.metas]
    assert len(keys) == 120 and not set(keys) & bad


def test_synthetic_captions_describe_their_images(synthetic_data):
    """Every object named in the metadata is drawn in its colour inside its box, and the
    captions mention it: the data carries meaning a model can learn."""
    for key, (jpeg, meta) in list(read_shards(synthetic_data / "val").items())[:20]:
        img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            centre = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() < 40, (key, obj)
            assert any(f"{obj['colour']} {obj['shape']}" in c for c in meta["captions"]), (key, obj)
