"""Write DALI index files for WebDataset shards, leaving out malformed samples.

    python tools/index_shards.py /path/to/shards [--report skipped.json]

Each ``x.tar`` gets ``x.idx`` beside it. Samples with a missing or truncated JPEG or a
broken JSON member are skipped, counted and listed, never fed to training.
"""
import argparse
import json
import logging

from soho_ds.data.shards import index_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="folder of .tar shards, a glob, or a comma-separated list")
    p.add_argument("--report", help="write the skipped samples to this JSON file")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = index_shards(a.shards)
    logging.info("indexed %d samples, skipped %d malformed", report["kept"], report["skipped"])
    for shard, bad in report["shards"].items():
        for b in bad:
            logging.warning("skipped %s:%s (%s)", shard, b["key"], b["reason"])
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
