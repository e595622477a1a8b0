"""How much of a batch is padding with SOHO's input, and what padding does to a model's scores.

    python benchmarks/padding_report.py                                   # padded fraction (real COCO shapes)
    python benchmarks/padding_report.py --model runs/demo_retrieval/checkpoints --images data/synthetic_downstream/images

Padded fraction: the real COCO photos of ../shared/realdata give the shapes (landscape 640x480,
640x512, 640x428), their transposes the portraits, mixed as COCO is (--portrait share, default
0.25); the training loader (shorter side 600, longer at most 1000, padded to the stride) reads them
in batches of 16, with batches mixed and grouped by orientation.

Border effect (with --model): each image scored (ITM, eval mode) alone and padded into a batch with a
larger image of the other orientation; the difference is what the CNN's receptive field sees of the
padding (the validity mask keeps it out of everything after the CNN).
Writes benchmarks/padding.{json,md}.
"""
import argparse
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image

from harness import write_report
from soho_ds.data.convert import write_shards
from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.data.sources import Record

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def coco_mix(folder: Path, n: int, portrait: float, seed: int = 0) -> list[Record]:
    photos = sorted((REALDATA / "coco" / "images").glob("*"))
    if not photos:
        raise SystemExit(f"no COCO photos under {REALDATA}/coco/images")
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        im = Image.open(rng.choice(photos)).convert("RGB")
        if rng.random() < portrait:
            im = im.transpose(Image.Transpose.ROTATE_90)
        path = folder / f"{i:05d}.jpg"
        im.save(path, quality=85)
        records.append(Record(f"coco_mix_{i:05d}", str(path), [f"photo {i}"]))
    return records


def padded_fraction(shards: str, spec: ImageSpec, grouped: bool, batches: int) -> float:
    loader = ShardLoader(shards, 16, spec, train=True, num_threads=2, seed=1, shuffle_buffer=256,
                         group_by_orientation=grouped)
    valid = total = 0
    for _, b in zip(range(batches), loader.forever()):
        valid += int(b.image_sizes.prod(1).sum())
        total += b.images.shape[0] * b.images.shape[-2] * b.images.shape[-1]
    return 1 - valid / total


@torch.no_grad()
def border_effect(model_path: str, images: str, n: int) -> dict:
    """|P(matched) alone - P(matched) padded beside a larger image of the other orientation| over n images."""
    import soho_ds

    model = soho_ds.load_model(model_path, device="cpu")
    paths = sorted(str(p) for p in Path(images).glob("*.jpg"))[:n]
    sizes = {p: Image.open(p).size for p in paths}
    landscape = max((p for p in paths if sizes[p][0] > sizes[p][1]), key=lambda p: sizes[p][0], default=paths[0])
    portrait = max((p for p in paths if sizes[p][1] > sizes[p][0]), key=lambda p: sizes[p][1], default=paths[0])
    caption = "a large red circle in the centre"
    diffs = []
    for p in paths:
        alone = model.itm([p], [caption])[0]
        partner = portrait if sizes[p][0] >= sizes[p][1] else landscape
        visual = model.encode_images([p, partner])  # padded to the larger of the two in each direction
        text = model.tokenize([caption])
        together = model.module.itm_head.score(model.soho, visual, **text, image_index=torch.tensor([0])).sigmoid()[0]
        diffs.append(float((alone - together).abs()))
    return {"images": len(diffs), "mean": sum(diffs) / len(diffs), "max": max(diffs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-in-mix", type=int, default=320)
    p.add_argument("--portrait", type=float, default=0.25, help="share of portrait photos in the mix")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--model", help="a trained model, for the border effect")
    p.add_argument("--images", help="images to score for the border effect")
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records = coco_mix(Path(tmp) / "photos", a.images_in_mix, a.portrait)
        write_shards(records, Path(tmp) / "shards", {"source": "coco-mix"}, samples_per_shard=80, workers=2,
                     progress=False)
        for stride in (32, 64):
            spec = ImageSpec(mode="aspect", shorter_side=600, longer_side=1000, hflip_prob=0.0, stride=stride)
            for grouped in (False, True):
                rows.append({"batches": "grouped by orientation" if grouped else "mixed orientations",
                             "stride": stride, "padded %": 100 * padded_fraction(str(Path(tmp) / "shards"), spec,
                                                                                 grouped, a.batches)})
    notes = [f"{a.images_in_mix} images: the real COCO photos of realdata (640x480, 640x512, 640x428) and, "
             f"{100 * a.portrait:.0f}% of them, their transposes; shorter side 600, longer at most 1000, batches of "
             f"16, {a.batches} training batches each"]
    if a.model:
        e = border_effect(a.model, a.images, 40)
        rows.append({"batches": "border effect |dP(ITM)|, alone vs padded beside a larger image",
                     "stride": "-", "padded %": f"mean {e['mean']:.4f}, max {e['max']:.4f} ({e['images']} images)"})
        notes.append(f"border effect: {a.model} on {a.images}, eval mode")
    print(write_report("padding", "Padding in SOHO's aspect-preserving batches", ["batches", "stride", "padded %"],
                       rows, notes, a.out))


if __name__ == "__main__":
    main()
