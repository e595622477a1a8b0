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

Training-mode normalisation (with --model): BatchNorm in training normalises with the batch's own
statistics, padded cells included. Each batch of --images is encoded with every BatchNorm in training
mode twice: statistics over all cells (what training computes) and over the valid cells only (a
padding-free reference, `masked_batch_norm`); the valid tokens' relative change and the share of their
VD indices that differ are what padding does through normalisation. Batches grouped by orientation
and mixed; the backbone's BatchNorms training (`model.backbone_norm: batch`) or fixed (`frozen`: only
the neck's sees the batch); and the review's check, 128 px of extra padding in training and eval mode.
Writes benchmarks/padding.{json,md}.
"""
import argparse
import contextlib
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

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


def masked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, image_sizes: torch.Tensor,
                      padded: tuple[int, int]) -> torch.Tensor:
    """Training-mode BatchNorm whose statistics cover only the cells inside each image: x (B, C, h, w) of
    a batch padded to `padded` (H, W) pixels, image_sizes (B, 2) valid pixels. A cell is valid when it
    covers any pixel of its image (ceil), as the model's validity mask counts them."""
    h, w = x.shape[-2:]
    stride_h, stride_w = padded[0] // h, padded[1] // w
    rows = torch.div(image_sizes[:, 0] + stride_h - 1, stride_h, rounding_mode="floor")
    cols = torch.div(image_sizes[:, 1] + stride_w - 1, stride_w, rounding_mode="floor")
    mask = ((torch.arange(h)[None, :, None] < rows[:, None, None]) &
            (torch.arange(w)[None, None, :] < cols[:, None, None]))[:, None].to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum((0, 2, 3)) / n
    var = (((x - mean[None, :, None, None]) ** 2) * mask).sum((0, 2, 3)) / n
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return (x - mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[None, :, None, None]


@contextlib.contextmanager
def training_norms(soho, backbone_norm: str, statistics: str, image_sizes: torch.Tensor, padded: tuple[int, int]):
    """The model in eval mode but for its BatchNorms, which normalise with batch statistics as in training
    (`statistics` "all" cells or "valid" cells only); with `backbone_norm` "frozen" the backbone's keep
    their stored statistics. Running statistics are left as they were (momentum 0, the batch count restored)."""
    norms = [m for name, m in soho.named_modules() if isinstance(m, nn.BatchNorm2d)
             and not (backbone_norm == "frozen" and name.startswith("backbone."))]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.train(True)
            m.momentum = 0.0
            if statistics == "valid":
                m.forward = lambda x, m=m: masked_batch_norm(m, x, image_sizes, padded)
        yield
    finally:
        for m, momentum, tracked in saved:
            m.train(False)
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
            m.__dict__.pop("forward", None)


def _valid_grid(visual, cells: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, h, w, H), VD indices (B, h, w), valid (B, h, w), cropped to `cells` rows/columns."""
    h, w = visual.grid
    B = visual.tokens.shape[0]
    tokens = visual.tokens.reshape(B, h, w, -1)[:, :cells[0], :cells[1]]
    index = visual.vd_index.reshape(B, h, w)[:, :cells[0], :cells[1]]
    valid = visual.valid.reshape(B, h, w)[:, :cells[0], :cells[1]]
    return tokens, index, valid


def token_shift(a, b, cells: tuple[int, int]) -> tuple[float, float]:
    """Mean relative change of the valid tokens (|a - b| / |b|) and the share of their VD indices that
    differ, over the first `cells` rows/columns of both grids."""
    ta, ia, valid = _valid_grid(a, cells)
    tb, ib, _ = _valid_grid(b, cells)
    change = ((ta - tb).norm(dim=-1) / tb.norm(dim=-1).clamp_min(1e-12))[valid]
    return float(change.mean()), float((ia != ib)[valid].float().mean())


def orientation_batches(images: str, n: int, batch: int) -> dict[str, list[list[str]]]:
    """The first n images in batches of `batch`: "grouped" (one orientation a batch, as training groups
    them) and "mixed" (the folder's order)."""
    paths = sorted(str(p) for p in Path(images).glob("*.jpg"))[:n]
    sizes = {p: Image.open(p).size for p in paths}
    landscape = [p for p in paths if sizes[p][0] >= sizes[p][1]]
    portrait = [p for p in paths if sizes[p][0] < sizes[p][1]]
    chunks = lambda ps: [ps[i:i + batch] for i in range(0, len(ps) - batch + 1, batch)]  # noqa: E731
    return {"grouped": chunks(landscape) + chunks(portrait), "mixed": chunks(paths)}


@torch.no_grad()
def normalisation_effect(model_path: str, images: str, n: int = 48, batch: int = 8) -> list[dict]:
    """What padding does to valid tokens through training-mode BatchNorm (see the module docstring)."""
    import soho_ds

    model = soho_ds.load_model(model_path, device="cpu")
    soho = model.soho
    rows = []
    for grouping, batches in orientation_batches(images, n, batch).items():
        prepared = [model.preprocess(b) for b in batches]
        padding = 1 - sum(int(p["image_sizes"].prod(1).sum()) for p in prepared) / sum(
            p["images"].shape[0] * p["images"].shape[-2] * p["images"].shape[-1] for p in prepared)
        for backbone_norm in ("batch", "frozen"):
            shifts = []
            for p in prepared:
                images_, sizes = p["images"], p["image_sizes"]
                padded = tuple(images_.shape[-2:])
                encoded = {}
                for statistics in ("all", "valid"):
                    with training_norms(soho, backbone_norm, statistics, sizes, padded):
                        encoded[statistics] = soho.encode_image(images_, sizes)
                shifts.append(token_shift(encoded["all"], encoded["valid"], encoded["all"].grid))
            rows.append({"batches": f"{grouping} by orientation" if grouping == "grouped" else "mixed orientations",
                         "backbone_norm": backbone_norm, "padded %": round(100 * padding, 1),
                         "valid tokens moved %": round(100 * sum(s[0] for s in shifts) / len(shifts), 2),
                         "VD indices changed %": round(100 * sum(s[1] for s in shifts) / len(shifts), 2)})
    # the review's check: 128 px more padding on the grouped batches, batch statistics, training vs eval mode
    for mode in ("training", "eval"):
        shifts = []
        for b in orientation_batches(images, n, batch)["grouped"]:
            p = model.preprocess(b)
            images_, sizes = p["images"], p["image_sizes"]
            wider = F.pad(images_, (0, 128, 0, 128))
            def norms(x):
                if mode == "eval":
                    return contextlib.nullcontext()
                return training_norms(soho, "batch", "all", sizes, tuple(x.shape[-2:]))

            with norms(images_):
                base = soho.encode_image(images_, sizes)
            with norms(wider):
                more = soho.encode_image(wider, sizes)
            shifts.append(token_shift(more, base, base.grid))
        rows.append({"batches": f"grouped, +128 px padding ({mode} mode)", "backbone_norm": "batch",
                     "padded %": "-", "valid tokens moved %": round(100 * sum(s[0] for s in shifts) / len(shifts), 2),
                     "VD indices changed %": round(100 * sum(s[1] for s in shifts) / len(shifts), 2)})
    return rows


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
    if a.model:
        columns = ["batches", "backbone_norm", "padded %", "valid tokens moved %", "VD indices changed %"]
        print(write_report("padding_training", "Padding through training-mode BatchNorm", columns,
                           normalisation_effect(a.model, a.images),
                           [f"{a.model} on the first 48 images of {a.images}, batches of 8; every BatchNorm "
                            "normalising with batch statistics over all cells against over the valid cells only "
                            "(the rest of the model in eval mode)"], a.out))


if __name__ == "__main__":
    main()
