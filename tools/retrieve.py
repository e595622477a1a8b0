"""Search your own images with a trained model: the top images for a text query, with scores.

    soho-retrieve --model runs/demo_retrieval/checkpoints --images ~/photos "a dog on a beach"
    soho-retrieve --model exported/soho --images ~/photos --first-stage 100 "query one" "query two"

Visual tokens are computed once per image and cached (default: IMAGES/.soho_ds_cache/), so later
queries only run the fusion transformer. --first-stage K ranks every image by the ITC vectors first
and lets the ITM head rerank the K best (needs a model trained with pretrain.itc_weight > 0).
"""
import argparse
import gc
import logging
import time
from pathlib import Path

from soho_ds.config import one_line_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, consolidated .pt or export folder")
    p.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    p.add_argument("--cache", help="where the visual tokens are kept (default: IMAGES/.soho_ds_cache/)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--first-stage", type=int, help="rerank only the K best images by ITC")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("queries", nargs="+")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with one_line_errors():
        search(a)
    gc.freeze()  # the exit then skips a collection over torch's millions of objects (~1.3 s on 2 cores)


def search(a: argparse.Namespace) -> None:
    # imported here, not at the top: --help answers without loading torch
    import soho_ds
    from soho_ds.search import ImageIndex

    model = soho_ds.load_model(a.model, a.device)
    model_id = f"{Path(a.model).resolve()}:{Path(a.model).stat().st_mtime_ns}"
    index = ImageIndex(model, a.images, a.cache, model_id)
    if a.first_stage and index.itc is None:
        index.itc_scores("")  # refuses, naming the option, before any image is encoded
    encoded = index.build()
    print(f"{len(index.paths)} images ({encoded} encoded now, the rest from the cache {index.cache})")
    if index.skipped:
        print(f"{len(index.skipped)} images left out (cannot be read or decoded):")
        for path, why in index.skipped.items():
            print(f"  {path}: {why}")
    for query in a.queries:
        t0 = time.perf_counter()
        hits = index.search(query, a.top, a.first_stage)
        print(f"\n{query!r} ({1000 * (time.perf_counter() - t0):.0f} ms)")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit.score:.3f}  {hit.path}")


if __name__ == "__main__":
    main()
