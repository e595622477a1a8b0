"""Check WebDataset shards and write their DALI indexes: run once before training, and again
after any shard changes.

    soho-index-shards /path/to/shards [more folders or globs] [--workers 2] [--report out.json]

Every image is decoded with the DALI decoder training uses (any format DALI decodes, whatever the
member's extension); every JSON must hold non-empty captions. Samples that fail are left out of
the index, counted and named with the reason; a truncated tar is detected and the samples it lost
reported; a shard that is not a readable tar is reported and the others indexed. Each ``x.tar``
gets ``x.idx`` (DALI's index) and ``x.idx.json`` (what was checked, built from which tar).
Exit status 1 if any shard could not be indexed.
"""
import argparse
import json
import logging
import os
import time

from soho_ds.config import one_line_errors
from soho_ds.data.shards import index_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="folders of .tar shards, globs, or .tar files")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--report", help="write everything left out (per shard, with reasons) to this JSON file")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    with one_line_errors():
        report = index_shards(a.shards, workers=a.workers, progress=True)
    seconds = time.time() - t0
    checked = report["kept"] + report["skipped"]
    logging.info("indexed %d samples; left out %d malformed and %d lost to truncation; %d shards could not be "
                 "indexed (%.0f s, %.0f images/s)", report["kept"], report["skipped"], report["lost"],
                 len(report["bad_shards"]), seconds, checked / max(seconds, 1e-9))
    for shard, reason in report["bad_shards"].items():
        logging.error("not indexed: %s (%s)", shard, reason)
    for shard, left_out in report["shards"].items():
        for b in left_out["skipped"]:
            logging.warning("left out %s:%s (%s)", shard, b["key"], b["reason"])
        for b in left_out["lost"]:
            logging.warning("lost in %s: %s (%s)", shard, b["key"] or "samples after the last complete one",
                            b["reason"])
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
    raise SystemExit(1 if report["bad_shards"] else 0)


if __name__ == "__main__":
    main()
