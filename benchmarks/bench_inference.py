"""Inference: end-to-end SOHO image-text scoring vs two region-feature pipelines with the same transformer.

    python benchmarks/bench_inference.py                  # CPU: throughput batch 2 (bigger takes minutes here)
    python benchmarks/bench_inference.py --throughput-batch 64                      # on a GPU

All three score (image, caption) pairs with the same 12-layer BERT-base fusion and ITM head on the
same 600x1000 images (random weights: timing only):
- **SOHO**: ResNet grid features -> Visual Dictionary -> fusion (`--backbone`, default resnet101).
- **Region features, BUTD** (what the paper measured against): bottom-up attention's detector, built
  from torchvision parts: a ResNet-101 trunk to layer3 (stride 16), an RPN keeping 300 proposals,
  RoIAlign 14x14 and res5 (layer4) + average pooling as the box head on every proposal, 1,601
  classes with per-class NMS; 10-100 boxes kept (the most confident, at least 10) with their 2,048-d
  pooled features.
- **Region features, FPN**: a lighter modern detector, torchvision's Faster R-CNN R101-FPN, 36 boxes
  (filled up with proposals) pooled by its 2-layer head into 1,024-d features.
Both region sides project their features with the box geometry to the transformer width. Reports
batch-1 latency and batch-N throughput. Writes benchmarks/bench_inference.{json,md}.
"""
import argparse

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign, batched_nms

from harness import time_per_call, write_report
from soho_ds.config import ModelConfig
from soho_ds.data.text import load_tokenizer
from soho_ds.models.fusion import CrossModalEncoder
from soho_ds.models.heads import ITMHead
from soho_ds.models.soho import SohoModel

FPN_REGIONS = 36
BUTD_PROPOSALS, BUTD_MIN, BUTD_MAX, BUTD_CONF = 300, 10, 100, 0.2


class SohoScorer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.soho = SohoModel(cfg)
        self.itm = ITMHead(self.soho.hidden_size)

    def forward(self, images, input_ids, attention_mask):
        _, pooled = self.soho.fuse(input_ids, attention_mask, self.soho.encode_image(images))
        return self.itm(pooled)


def _finite_random(module: nn.Module) -> None:
    """Random weights with identity BatchNorm make dozens of residual blocks overflow and the RPN then
    keeps no proposal; zeroing each block's last BN scale (as zero_init_residual does) keeps the
    activations finite. Timing is unaffected."""
    for block in module.modules():
        if isinstance(block, Bottleneck):
            block.bn3.weight.data.zero_()


class RegionScorer(nn.Module):
    """Region features + box geometry -> the same fusion transformer and ITM head."""

    def __init__(self, cfg: ModelConfig, feature_dim: int):
        super().__init__()
        self.fusion = CrossModalEncoder(cfg)
        hidden = self.fusion.config.hidden_size
        self.feature_proj = nn.Sequential(nn.Linear(feature_dim, hidden), nn.LayerNorm(hidden))
        self.box_proj = nn.Sequential(nn.Linear(4, hidden), nn.LayerNorm(hidden))
        self.itm = ITMHead(hidden)

    def forward(self, images, input_ids, attention_mask):
        features, geometry, valid = self.regions(images)
        visual = self.feature_proj(features) + self.box_proj(geometry) + self.fusion.visual_type_embedding
        _, pooled = self.fusion(input_ids, attention_mask, visual, valid)
        return self.itm(pooled)


class FPNRegions(RegionScorer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, 1024)
        backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=0)
        _finite_random(backbone.body)
        self.detector = FasterRCNN(backbone, num_classes=1601, min_size=600, max_size=1000)  # VG classes

    def regions(self, images):
        det = self.detector
        batch, _ = det.transform(list(images))
        features = det.backbone(batch.tensors)
        proposals, _ = det.rpn(batch, features)
        detections, _ = det.roi_heads(features, proposals, batch.image_sizes)
        h, w = batch.tensors.shape[-2:]
        whole = torch.tensor([[0.0, 0.0, w, h]], device=batch.tensors.device).expand(FPN_REGIONS, 4)
        boxes = [torch.cat([d["boxes"], p, whole])[:FPN_REGIONS] for d, p in zip(detections, proposals)]
        pooled = det.roi_heads.box_head(det.roi_heads.box_roi_pool(features, boxes, batch.image_sizes))
        geometry = torch.stack(boxes) / torch.tensor([w, h, w, h], device=pooled.device)
        return pooled.view(len(boxes), FPN_REGIONS, -1), geometry, None


class Res5Head(nn.Module):
    """BUTD's box head: ResNet's res5 stage on each 14x14 RoI, then average pooling -> (R, 2048)."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4
        self.out_channels = 2048

    def forward(self, x):
        return self.layer4(x).mean(dim=(2, 3))


class BUTDRegions(RegionScorer):
    def __init__(self, cfg: ModelConfig, proposals: int = BUTD_PROPOSALS):
        super().__init__(cfg, 2048)
        resnet = torchvision.models.resnet101(weights=None)
        _finite_random(resnet)
        trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                              resnet.layer3)
        trunk.out_channels = 1024
        self.detector = FasterRCNN(
            trunk, min_size=600, max_size=1000,
            rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
            rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=proposals,
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
            box_head=Res5Head(resnet.layer4),
            box_predictor=torchvision.models.detection.faster_rcnn.FastRCNNPredictor(2048, 1601))

    def regions(self, images):
        """As bottom-up attention extracts features: res5 on every proposal (300), per-class NMS over the
        1,600 object classes, then the most confident 10-100 proposals and their pooled features."""
        det = self.detector
        batch, _ = det.transform(list(images))
        features = {"0": det.backbone(batch.tensors)}
        proposals, _ = det.rpn(batch, features)
        pooled = det.roi_heads.box_head(det.roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
        scores = det.roi_heads.box_predictor(pooled)[0].softmax(-1)[:, 1:]  # (sum R, 1600), background left out
        h, w = batch.tensors.shape[-2:]
        out_features, out_boxes, start = [], [], 0
        for boxes in proposals:
            n = len(boxes)
            s = scores[start:start + n]
            best, cls = s.max(1)
            keep = batched_nms(boxes, best, cls, 0.3)  # one NMS per class
            confident = keep[best[keep] >= BUTD_CONF]
            chosen = (confident if len(confident) >= BUTD_MIN else keep[:BUTD_MIN])[:BUTD_MAX]
            out_features.append(pooled[start:start + n][chosen])
            out_boxes.append(boxes[chosen] / torch.tensor([w, h, w, h], device=boxes.device))
            start += n
        m = max(len(b) for b in out_boxes)
        valid = torch.zeros(len(out_boxes), m, dtype=torch.long, device=pooled.device)
        feats = pooled.new_zeros(len(out_boxes), m, pooled.shape[1])
        geometry = pooled.new_zeros(len(out_boxes), m, 4)
        for i, (f, b) in enumerate(zip(out_features, out_boxes)):
            feats[i, :len(f)], geometry[i, :len(b)], valid[i, :len(b)] = f, b, 1
        return feats, geometry, valid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--throughput-batch", type=int, default=64 if torch.cuda.is_available() else 2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--proposals", type=int, default=BUTD_PROPOSALS, help="BUTD's proposals (fewer: a quick run)")
    p.add_argument("--tokenizer-dir", help="WordPiece vocab folder (default: bert-base-uncased's, packaged)")
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=a.backbone, num_layers=a.layers, pool_last=True, dropout=0.0)
    tokenizer = load_tokenizer(a.tokenizer_dir)
    rows = []
    for name, build in (("SOHO (pixels, end to end)", SohoScorer),
                        (f"region features, BUTD (R101-C4, {a.proposals} proposals, res5 head) + same BERT",
                         lambda cfg: BUTDRegions(cfg, a.proposals)),
                        ("region features, Faster R-CNN R101-FPN + same BERT", FPNRegions)):
        model = build(cfg).to(device).eval()
        if hasattr(model, "detector"):  # the detectors resize their input: to the size SOHO is given
            model.detector.transform.min_size = (min(a.height, a.width),)
            model.detector.transform.max_size = max(a.height, a.width)
        row = {"pipeline": name}
        for bs, key in ((1, "batch-1 latency ms"), (a.throughput_batch, f"batch-{a.throughput_batch} images/s")):
            images = torch.rand(bs, 3, a.height, a.width, device=device)
            text = tokenizer(["a man riding a horse on a beach"] * bs, padding="max_length", max_length=24,
                             truncation=True, return_tensors="pt").to(device)

            @torch.inference_mode()
            def score():
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    return model(images, text["input_ids"], text["attention_mask"])

            t = time_per_call(score, a.iters if bs == 1 else max(1, a.iters - 1), warmup=1)
            row[key] = 1000 * t if bs == 1 else bs / t
        rows.append(row)
        print(row, flush=True)
        model = None  # frees it before the next pipeline
    for r in rows:
        r["SOHO speed-up, batch 1"] = r["batch-1 latency ms"] / rows[0]["batch-1 latency ms"]
        key = f"batch-{a.throughput_batch} images/s"
        r[f"SOHO speed-up, batch {a.throughput_batch}"] = rows[0][key] / r[key]
    md = write_report(
        "bench_inference", "Inference: SOHO vs region-feature pipelines",
        ["pipeline", "batch-1 latency ms", f"batch-{a.throughput_batch} images/s", "SOHO speed-up, batch 1",
         f"SOHO speed-up, batch {a.throughput_batch}"], rows,
        [f"{a.height}x{a.width} images, one 24-token caption each, {a.layers}-layer BERT-base fusion + ITM head on all "
         f"three; SOHO backbone {a.backbone} (stride 64 grid); {'fp16 autocast' if device.type == 'cuda' else 'fp32'}",
         f"BUTD side: res5 on {a.proposals} proposals of 14x14, per-class NMS (0.3) over 1,600 classes, boxes with "
         f"confidence >= {BUTD_CONF}, at least {BUTD_MIN} and at most {BUTD_MAX}, 2,048-d features",
         "random weights (timing only); speed-up = the pipeline's time / SOHO's (the paper reports about 10x)"], a.out)
    print(md)


if __name__ == "__main__":
    main()
