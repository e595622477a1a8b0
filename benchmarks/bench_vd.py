"""Visual Dictionary cost: nearest-entry lookup + EMA update vs the whole SOHO training step.

    python benchmarks/bench_vd.py                       # ResNet-50, 12-layer BERT-base, 224 px, batch 4
    python benchmarks/bench_vd.py --image-size 384 --batch 16 --backbone resnet101   # on a GPU

For each K in --sizes the full model (plain PyTorch loop: forward, backward, AdamW step; AMP
on a GPU) and the VD alone (train mode, features of the grid's shape) are timed in the same
process. Target: VD <= 5% of the step at K = 2048. Writes benchmarks/bench_vd.{json,md}.
"""
import argparse

import torch

from harness import pretraining_batch, time_per_call, write_report
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.config import ModelConfig, PretrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048,4096")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default="benchmarks", help="folder for the JSON + Markdown report")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch = pretraining_batch(a.batch, a.image_size, device)
    rows = []
    for k in (int(s) for s in a.sizes.split(",")):
        cfg = ModelConfig(backbone=a.backbone, num_layers=a.layers, vd_size=k, pool_last=False)
        model = SohoPretrainer(cfg, PretrainConfig()).to(device).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

        def train_step():
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                loss = model.commit(model(batch))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with torch.no_grad():
            grid = model.model.backbone(batch["images"][:1]).shape[-2:]
        features = torch.randn(a.batch, grid[0] * grid[1], cfg.hidden_size, device=device)
        vd = model.model.visual_dictionary

        def vd_step():
            with torch.no_grad():
                vd(features)
                vd.commit()

        step_s = time_per_call(train_step, a.iters, warmup=1)
        vd_s = time_per_call(vd_step, max(10, a.iters), warmup=2)
        rows.append({"K": k, "features per step": features.shape[0] * features.shape[1],
                     "train step ms": 1000 * step_s, "VD lookup+update ms": 1000 * vd_s,
                     "VD share of step %": 100 * vd_s / step_s})
        print(rows[-1], flush=True)
    md = write_report(
        "bench_vd", "Visual Dictionary cost per training step", list(rows[0]), rows,
        [f"model: {a.backbone} + {a.layers}-layer BERT-base, {a.image_size} px, batch {a.batch}, "
         f"{'fp16 AMP' if device.type == 'cuda' else 'fp32'}; the step includes the VD",
         "VD timed alone in train mode on grid-shaped features: L2 nearest entry, counts and sums "
         "(one all_reduce when distributed), EMA update, dead-entry check",
         "target: VD <= 5% of the step at K = 2048"], a.out)
    print(md)


if __name__ == "__main__":
    main()
