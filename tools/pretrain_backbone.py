"""Train the ResNet to name the synthetic images' colours and shapes: the ImageNet stand-in.

    python tools/pretrain_backbone.py --data data/synthetic --out data/synthetic/resnet18_concepts.pth

Writes a torchvision state dict that `model.backbone_weights` loads exactly like an ImageNet
file (its 10-way classifier is ignored). Real runs use torchvision's ImageNet weights instead.
"""
import argparse
import json
import logging
from pathlib import Path

import torch

from soho_ds.synthetic.backbone import CONCEPTS, train_concept_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="synthetic set written by tools/make_synthetic.py")
    p.add_argument("--out", required=True, help="where to write the .pth state dict")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state, report = train_concept_classifier(f"{a.data}/train", f"{a.data}/val", a.arch, a.steps, a.batch_size,
                                             a.image_size, a.lr, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)  # a half-written file never carries the final name
    summary = {"arch": a.arch, "concepts": CONCEPTS, **vars(report)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    logging.info("%s: %d steps in %.0f s, loss %.3f -> %.3f, val exact-set accuracy %.3f (%d concepts)",
                 out, report.steps, report.seconds, report.first_loss, report.last_loss, report.val_exact,
                 len(CONCEPTS))


if __name__ == "__main__":
    main()
