"""Data loading: the DALI pipeline vs PIL + torch DataLoader doing the same work on the same cores.

    python benchmarks/bench_data.py                        # 2 threads / 2 workers, 224 px, batch 32

Both sides read the same WebDataset shards (synthetic photos-sized JPEGs written here unless
--shards is given), decode, random-resized-crop (area 0.5-1, aspect 3/4-4/3), flip, resize to
--image-size, normalise to float CHW, and deliver batches. DALI runs on the CPU here and uses
the mixed (nvJPEG) decoder when CUDA is present. Target: DALI >= the DataLoader.
Writes benchmarks/bench_data.{json,md}.
"""
import argparse
import io
import json
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from harness import write_report
from soho_ds.data.pipeline import MEAN, STD, ImageSpec, ShardLoader
from soho_ds.data.shards import list_shards
from soho_ds.synthetic.shards import make_dataset


class TarImages(Dataset):
    """The samples listed in the shards' DALI index files (malformed ones are already left out),
    read by offset: the same bytes the DALI reader reads."""

    def __init__(self, shards: str, image_size: int):
        self.items = []
        for path in list_shards(shards):
            with open(path[: -len(".tar")] + ".idx") as idx:
                next(idx)
                for line in idx:
                    f = line.split()
                    members = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
                    self.items.append((path, *members["jpg"], *members["json"]))
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, off, size, joff, jsize = self.items[i]
        with open(path, "rb") as f:
            f.seek(off)
            jpeg = f.read(size)
            f.seek(joff)
            meta = json.loads(f.read(jsize))
        return self.transform(Image.open(io.BytesIO(jpeg)).convert("RGB")), meta["key"]


def images_per_second(batches, batch_size: int, n_batches: int, warmup: int = 3) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing shards (default: 600 synthetic 480 px images written to a temp dir)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--aspect", metavar="SHORTER/LONGER",
                   help="also time SOHO's aspect pipeline (e.g. 600/1000, grouped by orientation) with each DALI "
                        "decoder: mixed (nvJPEG, where CUDA is present) and CPU")
    p.add_argument("--out", default="benchmarks", help="folder for the JSON + Markdown report")
    a = p.parse_args()
    tmp = None
    shards = a.shards
    if shards is None:
        tmp = tempfile.TemporaryDirectory()
        make_dataset(tmp.name, num_train=600, num_val=8, samples_per_shard=150, image_size=480, seed=0)
        shards = f"{tmp.name}/train"
    spec = ImageSpec(mode="square", image_size=a.image_size, crop_scale=(0.5, 1.0), hflip_prob=0.5)
    dali = ShardLoader(shards, a.batch, spec, train=True, num_threads=a.threads, shuffle_buffer=64)
    dali_ips = images_per_second((b.images for b in dali.forever()), a.batch, a.batches)

    def endless(loader):
        while True:
            yield from loader

    loader = DataLoader(TarImages(shards, a.image_size), batch_size=a.batch, shuffle=True, num_workers=a.threads,
                        drop_last=True, persistent_workers=True, prefetch_factor=2)
    pil_ips = images_per_second(endless(loader), a.batch, a.batches)
    rows = [{"loader": "DALI (" + ("mixed" if torch.cuda.is_available() else "cpu") + f", {a.threads} threads)",
             "images/s": dali_ips, "ratio": dali_ips / pil_ips},
            {"loader": f"PIL + torch DataLoader ({a.threads} workers)", "images/s": pil_ips, "ratio": 1.0}]
    if a.aspect:
        shorter, longer = map(int, a.aspect.split("/"))
        spec = ImageSpec(mode="aspect", shorter_side=shorter, longer_side=longer, hflip_prob=0.0, stride=64)
        for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            loader = ShardLoader(shards, a.batch, spec, train=True, num_threads=a.threads, shuffle_buffer=64,
                                 device=device, group_by_orientation=True)
            ips = images_per_second((b.images for b in loader.forever()), a.batch, a.batches)
            rows.append({"loader": f"DALI aspect {shorter}/{longer}, {'mixed' if device == 'cuda' else 'CPU'} decode "
                                   f"({a.threads} threads)", "images/s": ips, "ratio": ips / pil_ips})
    md = write_report("bench_data", "Data pipeline throughput", ["loader", "images/s", "ratio"], rows,
                      [f"decode + random-resized-crop {a.image_size} + flip + normalise, batch {a.batch}, "
                       f"{a.batches} batches after 3 warm-up batches, same shards",
                       "target: DALI >= the DataLoader on the same cores"] + (
                          [f"aspect rows: SOHO's input ({a.aspect}), padded batches grouped by orientation; ratio "
                           "against the DataLoader's square crops"] if a.aspect else []), a.out)
    print(md)


if __name__ == "__main__":
    main()
