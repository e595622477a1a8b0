"""Search over one's own images (soho-retrieve): time per query over N images with the ITM head
alone and with an ITC first stage, and the recall the first stage loses on the synthetic retrieval set.

    make demo && python benchmarks/bench_retrieval.py            # the demo's retrieval model, 1,000 images

Timing: N synthetic scenes are rendered into a folder, their visual tokens cached (once, timed
apart), then each query is ranked over all N by the ITM head, or by ITC first and the ITM head on
the best K only. Recall: the test split of the retrieval set (its Karpathy JSON), every caption
ranked over the test images: text-to-image R@1/5/10 with the ITM head on all of them vs on the
ITC's best K. Writes benchmarks/bench_retrieval.{json,md}.
"""
import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import soho_ds
from harness import write_report
from soho_ds.search import ImageIndex
from soho_ds.synthetic.downstream import write_images
from soho_ds.tasks.retrieval import read_karpathy, recall_at_k


def query_ms(index: ImageIndex, queries: list[str], first_stage: int | None) -> float:
    index.search(queries[0], 10, first_stage)  # warm-up
    t0 = time.perf_counter()
    for q in queries:
        index.search(q, 10, first_stage)
    return 1000 * (time.perf_counter() - t0) / len(queries)


def first_stage_recall(model, retrieval_json: Path, images: Path, ks: list[int]) -> tuple[list[dict], int, int]:
    """t2i R@K on the test split, ITM over every image vs over the ITC's best K per caption."""
    test = read_karpathy(retrieval_json, ("test",))
    with tempfile.TemporaryDirectory() as tmp:
        for im in test:
            (Path(tmp) / im.image).symlink_to((images / im.image).resolve())
        index = ImageIndex(model, tmp, Path(tmp) / ".cache.pt")
        index.build(progress=False)
        position = {Path(p).name: i for i, p in enumerate(index.paths)}
        captions = [(c, position[im.image]) for im in test for c in im.captions]
        itm = torch.stack([index.itm_scores(c, index.paths) for c, _ in captions], 1)  # (I, T)
        itc = torch.stack([index.itc_scores(c) for c, _ in captions], 1)
    text_image = torch.tensor([i for _, i in captions])
    rows = []
    for k in [None, *ks]:
        scores = itm.clone()
        if k is not None:  # images outside the first stage's K rank below every scored one
            outside = torch.ones_like(scores, dtype=torch.bool)
            outside.scatter_(0, itc.argsort(dim=0, descending=True, stable=True)[:k], False)
            scores[outside] = -1.0
        r = recall_at_k(scores, text_image)
        rows.append({"ranking": "ITM over all" if k is None else f"ITC first stage, ITM on the best {k}",
                     "t2i R@1": r["t2i_r1"], "t2i R@5": r["t2i_r5"], "t2i R@10": r["t2i_r10"]})
    for r in rows[1:]:
        r["R@1 lost"] = rows[0]["t2i R@1"] - r["t2i R@1"]
    return rows, len(test), len(captions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo_retrieval/checkpoints")
    p.add_argument("--downstream", default="data/synthetic_downstream", help="its retrieval/ JSON and images/")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--first-stage", default="50,100", help="K values timed over --num-images")
    p.add_argument("--recall-first-stage", default="5,10,20", help="K values whose recall is measured")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    model = soho_ds.load_model(a.model)
    downstream = Path(a.downstream)
    captions = [c for im in read_karpathy(downstream / "retrieval/dataset_synthetic.json", ("test",))
                for c in im.captions]
    queries = random.Random(0).sample(captions, min(a.queries, len(captions)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), a.num_images, 0, 128, 0.3, random.Random(7))
        index = ImageIndex(model, tmp, Path(tmp) / ".cache.pt")
        t0 = time.perf_counter()
        index.build(progress=False)
        encode_ms = 1000 * (time.perf_counter() - t0) / a.num_images
        for k in [None, *(int(x) for x in a.first_stage.split(",") if x)]:
            rows.append({"ranking": "ITM over all" if k is None else f"ITC first stage, ITM on the best {k}",
                         "images": a.num_images, "ms per query": query_ms(index, queries, k)})
    for r in rows:
        r["speed-up"] = rows[0]["ms per query"] / r["ms per query"]
    recall, n_images, n_captions = first_stage_recall(
        model, downstream / "retrieval/dataset_synthetic.json", downstream / "images",
        [int(x) for x in a.recall_first_stage.split(",") if x])
    notes = [f"model {a.model}; {a.num_images} rendered synthetic scenes; {len(queries)} test captions as queries, "
             f"top 10 returned; visual tokens encoded once beforehand ({encode_ms:.1f} ms per image, cached on disk)"]
    md = write_report("bench_retrieval", "Search over one's own images: time per query", list(rows[0]), rows,
                      notes, a.out)
    md2 = write_report("bench_retrieval_recall", "Search: recall lost by the ITC first stage",
                       ["ranking", "t2i R@1", "t2i R@5", "t2i R@10", "R@1 lost"], recall,
                       [f"test split of {downstream}/retrieval: {n_images} images, {n_captions} captions, "
                        "each caption ranked over all test images"], a.out)
    print(md + "\n" + md2)


if __name__ == "__main__":
    main()
