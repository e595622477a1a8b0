"""Convert a dataset on disk into pretraining shards (WebDataset tars of key.jpg + key.json, checked and
indexed, with a manifest): one command per source.

    soho-convert coco --captions captions_train2014.json captions_val2014.json --images /data/coco \\
        --exclude-karpathy dataset_coco.json --out shards/coco
    soho-convert vg --regions region_descriptions.json --image-data image_data.json \\
        --images /data/vg --exclude-karpathy dataset_coco.json --out shards/vg
    soho-convert tsv --tsv cc3m_downloaded.tsv --images /data/cc3m --out shards/cc3m     # caption<TAB>path
    soho-convert img2dataset --folder /data/cc12m_img2dataset --out shards/cc12m
    soho-convert sbu --json sbu-captions-all.json --images /data/sbu --out shards/sbu
    soho-convert karpathy --split-json dataset_flickr30k.json --images /data/flickr30k --splits train \\
        --out shards/flickr30k

Common options: --workers (parallel processes), --samples-per-shard, --max-side (re-encode larger
images to this longer side, e.g. 1000, to cut I/O). Run again with the same arguments, a
conversion writes only what is new or changed (an interrupted run, lines appended to the input).
Several outputs mix in one config: data.train_shards: [shards/coco, shards/vg]. Inputs that name
images by URL (Conceptual Captions' TSV, SBU's JSON) are answered with the img2dataset command that
downloads them. Exit status 1 if no sample was written.
"""
import argparse
import logging
import os
import sys

from soho_ds.config import one_line_errors
from soho_ds.data import sources
from soho_ds.data.convert import ConversionError, write_shards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (its shards, indexes and manifest.json)")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    common.add_argument("--samples-per-shard", type=int, default=1000)
    common.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    common.add_argument("--exclude-karpathy", nargs="*", default=[],
                        help="Karpathy split JSONs whose val/test images are left out (COCO ids and file names)")
    s = sub.add_parser("coco", parents=[common], help="COCO captions JSONs (2014 or 2017) + image folders")
    s.add_argument("--captions", nargs="+", required=True)
    s.add_argument("--images", required=True, help="holds train2014/ and val2014/ (or the files themselves)")
    s = sub.add_parser("vg", parents=[common], help="Visual Genome region descriptions")
    s.add_argument("--regions", required=True, help="region_descriptions.json")
    s.add_argument("--image-data", required=True, help="image_data.json (coco_id, image folder)")
    s.add_argument("--images", required=True, help="holds VG_100K/ and VG_100K_2/")
    s.add_argument("--max-captions", type=int, default=None,
                   help="region phrases kept per image, after dedup (default: all, as SOHO's data)")
    s = sub.add_parser("tsv", parents=[common], help="caption + local path per line (CC3M, custom)")
    s.add_argument("--tsv", required=True)
    s.add_argument("--images", default=".", help="folder the paths are relative to")
    s.add_argument("--caption-col", type=int, default=0)
    s.add_argument("--path-col", type=int, default=1)
    s.add_argument("--header", action="store_true", help="the first line names the columns")
    s.add_argument("--name", default="tsv", help="key prefix and source name in the manifest")
    s = sub.add_parser("img2dataset", parents=[common], help="img2dataset output: webdataset tars or files + parquet")
    s.add_argument("--folder", required=True)
    s = sub.add_parser("sbu", parents=[common], help="SBU Captions' sbu-captions-all.json + the downloaded photos")
    s.add_argument("--json", required=True, help="sbu-captions-all.json (image_urls, user_ids, captions)")
    s.add_argument("--images", help="folder of the downloaded photos (<photo id>_<secret>.jpg or <photo id>.jpg)")
    s = sub.add_parser("karpathy", parents=[common], help="Karpathy split JSON (COCO, Flickr30k)")
    s.add_argument("--split-json", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--splits", nargs="+", default=["train", "restval"])
    return p.parse_args(argv)


def convert(a: argparse.Namespace) -> dict:
    """The records of `a.source` written as shards under `a.out`; returns the manifest."""
    for option in ("captions", "exclude_karpathy"):
        paths = [os.path.realpath(p) for p in getattr(a, option, None) or []]
        if len(set(paths)) < len(paths):
            twice = sorted({p for p in paths if paths.count(p) > 1})
            raise ConversionError(f"--{option.replace('_', '-')}: {', '.join(twice)} given twice; give each file "
                                  "once")
    exclude = sources.karpathy_eval_images(a.exclude_karpathy) if a.exclude_karpathy else None
    total = None
    if a.source == "coco":
        records = sources.coco_captions(a.captions, a.images, exclude)
        total = sum(len(sources.read_json(c).get("images", [])) for c in a.captions)
    elif a.source == "vg":
        records = sources.visual_genome(a.regions, a.image_data, a.images, exclude, a.max_captions)
        total = len(sources.read_json(a.image_data))
    elif a.source == "tsv":
        records = sources.caption_tsv(a.tsv, a.images, a.caption_col, a.path_col, a.header, a.name)
    elif a.source == "img2dataset":
        records = sources.img2dataset(a.folder)
    elif a.source == "sbu":
        records = sources.sbu_captions(a.json, a.images)
    else:
        records = sources.karpathy(a.split_json, a.images, tuple(a.splits))
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "workers")}
    return write_shards(records, a.out, settings, a.samples_per_shard, a.workers, a.max_side, total)


def main() -> None:
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        manifest = convert(a)
    c = manifest["counts"]
    logging.info("%s: %d records -> %d samples written in %d shards, %d indexed", a.out, c["records"],
                 c["samples_written"], len([s for s in manifest["shards"] if not s.get("empty")]), c["samples_indexed"])
    for reason, n in sorted(c["left_out"].items()):
        logging.info("  left out: %d %s (examples in %s/manifest.json)", n, reason, a.out)
    sys.exit(0 if c["samples_indexed"] else 1)


if __name__ == "__main__":
    main()
