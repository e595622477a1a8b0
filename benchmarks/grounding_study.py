"""One grounding experiment: the demo's synthetic world, its stand-in CNN and its pretraining with any
config overrides, in this process (one rank); prints held-out ITM at each evaluation.

    python benchmarks/grounding_study.py --tag base                                  # configs/pretrain_synthetic.yaml
    python benchmarks/grounding_study.py --tag three_layers --set model.num_layers=3 --set model.pooling=cls

The figures of docs/grounding.md come from this tool. Data and stand-in CNN are made once per --root.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from harness import ROOT



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/grounding_study", help="data, stand-in CNN and runs go here")
    p.add_argument("--tag", required=True, help="this run's folder under --root")
    p.add_argument("--num-train", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=128, help="shorter side of the generated images")
    p.add_argument("--cnn-steps", type=int, default=150)
    p.add_argument("--cnn-size", type=int, default=96)
    p.add_argument("--deepspeed_config", default=str(ROOT / "ds_configs/zero2_cpu_demo.json"))
    p.add_argument("--precision", default="auto")
    p.add_argument("--set", action="append", default=[], help="config override, as the drivers' --set")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from soho_ds.pretrain.run import pretrain
    from soho_ds.synthetic.backbone import train_concept_classifier
    from soho_ds.synthetic.shards import make_dataset

    root = Path(a.root)
    if not (root / "shards/manifest.json").exists():
        make_dataset(root / "shards", num_train=a.num_train, num_val=200, samples_per_shard=200,
                     image_size=a.image_size, seed=0, non_square=0.3)
    cnn = root / f"cnn_{a.cnn_steps}_{a.cnn_size}.pth"
    if not cnn.exists():
        state, report = train_concept_classifier(f"{root}/shards/train", f"{root}/shards/val", steps=a.cnn_steps,
                                                 image_size=a.cnn_size)
        torch.save(state, cnn)
    out = root / a.tag
    t0 = time.time()
    pretrain(ROOT / "configs/pretrain_synthetic.yaml", a.deepspeed_config, precision=a.precision, restart=True,
             overrides=[f"data.train_shards={root}/shards/train", f"data.val_shards={root}/shards/val",
                        f"model.backbone_weights={cnn}", f"train.output_dir={out}", "train.image_log_every=0",
                        "train.eval_every=40", *a.set])
    print(f"{a.tag}: pretraining {time.time() - t0:.0f} s; overrides {a.set}")
    for line in (out / "eval.jsonl").read_text().splitlines():
        e = json.loads(line)
        print(f"  step {e['step']:4d}  {e['wall_s']:6.0f} s  held-out ITM {e['acc/itm']:.3f}  MLM {e['acc/mlm']:.3f}")


if __name__ == "__main__":
    main()
