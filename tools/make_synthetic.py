"""Generate the synthetic shapes dataset (WebDataset tar shards + manifest, checked and indexed).

    python tools/make_synthetic.py --out data/synthetic --num-train 2000 --num-val 200 \
        --downstream data/synthetic_downstream
"""
import argparse
import logging

from soho_ds.synthetic.downstream import make_downstream
from soho_ds.synthetic.shards import make_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (train/, val/, manifest.json)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--image-size", type=int, default=128, help="each image's shorter side in pixels")
    p.add_argument("--non-square", type=float, default=0.3, help="share of 4:3 and 3:4 images (the rest square)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malformed", type=int, default=0,
                   help="add this many broken samples (cut or garbled JPEG, bad JSON, no JPEG, empty captions)")
    p.add_argument("--downstream", metavar="DIR",
                   help="also write synthetic retrieval / VQA / NLVR2 / SNLI-VE sets (real formats) here")
    p.add_argument("--num-downstream", type=int, default=400, help="downstream training images (eval: a quarter)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = make_dataset(a.out, a.num_train, a.num_val, a.samples_per_shard, a.image_size, a.seed, a.malformed,
                     a.non_square)
    for name, split in m["splits"].items():
        logging.info("%s: %d samples in %d shards -> %s/%s", name, split["num_samples"], len(split["shards"]),
                     a.out, name)
    if a.downstream:
        d = make_downstream(a.downstream, a.num_downstream, a.num_downstream // 4, a.image_size, a.seed + 100,
                            a.non_square)
        logging.info("downstream: %d images, retrieval/ vqa/ nlvr2/ snli_ve/ -> %s", d["images"], d["root"])


if __name__ == "__main__":
    main()
