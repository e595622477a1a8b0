"""A stand-in for ImageNet weights where none can be downloaded: the ResNet learns to name the
colours and shapes in the synthetic images before SOHO pretraining starts.

SOHO starts from an ImageNet CNN and a pretrained BERT; from two random sides, matching words to
pixels (ITM) stays at chance for hundreds of CPU steps. This classifier gives the CNN what
ImageNet gives a real run -- features that already separate the visual concepts -- from the
synthetic training shards only (never the validation split), through the same DALI loader. The
result is a plain torchvision state dict, loaded like an ImageNet file via `model.backbone_weights`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.synthetic.world import COLOURS, SHAPES

log = logging.getLogger(__name__)

CONCEPTS = sorted(COLOURS) + list(SHAPES)  # the classifier's labels: every colour, every shape


def concept_targets(metas: list[dict]) -> torch.Tensor:
    """Multi-hot (B, len(CONCEPTS)): which colours and shapes each image contains."""
    targets = torch.zeros(len(metas), len(CONCEPTS))
    for i, meta in enumerate(metas):
        for obj in meta["objects"]:
            targets[i, CONCEPTS.index(obj["colour"])] = 1.0
            targets[i, CONCEPTS.index(obj["shape"])] = 1.0
    return targets


@dataclass
class ClassifierReport:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    val_exact: float  # share of val images whose predicted concept set is exactly right


def _exact_set_accuracy(net: nn.Module, loader: ShardLoader) -> float:
    net.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader.epochs():
            predicted = net(batch.images) > 0
            right += int((predicted == concept_targets(batch.metas).bool()).all(1).sum())
            total += len(batch.metas)
    net.train()
    return right / max(total, 1)


def train_concept_classifier(train_shards: str, val_shards: str | None, arch: str = "resnet18", steps: int = 150,
                             batch_size: int = 32, image_size: int = 96, lr: float = 2e-3, seed: int = 0,
                             num_threads: int = 2) -> tuple[dict, ClassifierReport]:
    """Trains torchvision `arch` (random init) on multi-label concept targets; returns its state dict
    (classifier `fc` included; the SOHO backbone ignores it) and a report."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Linear(net.fc.in_features, len(CONCEPTS))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, fused=True)
    # No flip: the downstream captions say "left" and "right".
    spec = ImageSpec(mode="square", image_size=image_size, crop_scale=(0.8, 1.0), hflip_prob=0.0)
    train = ShardLoader(train_shards, batch_size, spec, train=True, num_threads=num_threads, seed=seed,
                        shuffle_buffer=256, device="cpu")
    start, losses = time.time(), []
    for step, batch in enumerate(train.forever()):
        if step == steps:
            break
        loss = F.binary_cross_entropy_with_logits(net(batch.images), concept_targets(batch.metas))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.info("step %d/%d  loss %.4f  %.0f s", step + 1, steps, loss.item(), time.time() - start)
    val_exact = float("nan")
    if val_shards:
        val = ShardLoader(val_shards, batch_size, spec, train=False, num_threads=num_threads, device="cpu")
        val_exact = _exact_set_accuracy(net, val)
    report = ClassifierReport(steps, time.time() - start, losses[0], sum(losses[-10:]) / len(losses[-10:]),
                              val_exact)
    return net.state_dict(), report
