"""Attach offline detector outputs (boxes, object and attribute ids, region features) to shards.

    soho-attach-detections --shards data/coco_vg/train --out data/coco_vg_det/train \
        --detections trainval_resnet101_faster_rcnn_genome_36.tsv      # BUTD / LXMERT TSV
    soho-attach-detections --shards ... --out ... --detections features_npz/  # <image_id>.npz
    soho-attach-detections --shards ... --out ... --detections vinvl/predictions.tsv \
        --label-map VG-SGG-dicts-vgoi6-clipped.json --features vinvl/features.tsv   # VinVL

Samples are matched by their JSON "image_id" (else their key), normalised (COCO_val2014_000000262148 is
262148). A file that matches no sample is refused. Per-shard counts: OUT/detections.json. Formats:
soho_ds/data/detections.py.
"""
import argparse
import json
import logging

from soho_ds.config import one_line_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input shards: folder, glob or comma-separated .tar files")
    p.add_argument("--out", required=True, help="output folder for the new shards (+ DALI index files)")
    p.add_argument("--detections", required=True, help="a BUTD/LXMERT .tsv file or a folder of <image_id>.npz")
    p.add_argument("--attr-threshold", type=float, default=0.0,
                   help="keep attributes whose confidence reaches this (when the file has confidences)")
    p.add_argument("--no-features", action="store_true", help="do not store region features (.feats.npy)")
    p.add_argument("--label-map", help="VinVL: VG-SGG-dicts-vgoi6-clipped.json (class and attribute names to ids)")
    p.add_argument("--features", help="VinVL: the features.tsv beside predictions.tsv (region features)")
    a = p.parse_args()
    # imported after parsing: --help answers without loading torch
    from soho_ds.data.detections import attach_detections, open_detections
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        source = open_detections(a.detections, a.attr_threshold, a.label_map, a.features)
        report = attach_detections(a.shards, a.out, source, features=not a.no_features)
    missing = report.pop("without_detections")
    for shard, counts in report.pop("shards").items():
        logging.info("%s: %d of %d samples got boxes (%d boxes)", shard, counts["with_detections"], counts["samples"],
                     counts["boxes"])
    logging.info("%s", json.dumps({**report, "without_detections": len(missing)}))
    for name in missing[:20]:
        logging.info("no detections for %s (kept, with no boxes)", name)


if __name__ == "__main__":
    main()
