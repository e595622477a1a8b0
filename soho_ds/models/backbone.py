"""torchvision ResNet trunk that turns whole images into a grid of features (no classifier)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from soho_ds.config import BACKBONE_NORMS, BACKBONES
from soho_ds.models.norm import BatchNorm2d, FrozenBatchNorm2d
from soho_ds.models.weights import load_checked, read_state_dict


class ResNetBackbone(nn.Module):
    """ResNet stem + four stages; returns (B, C, H/32, W/32), or H/64 with `pool_last`.

    SOHO freezes the stem and first stage (their BatchNorm statistics too) and, in its public
    code, max-pools the last stage 2x2 to halve the number of visual tokens. `norm` "frozen" fixes
    every BatchNorm of the trunk; "batch" and "sync" train them (sync: see models.norm).
    """

    def __init__(self, *, name: str = "resnet101", weights_path: str | None = None, freeze_stem: bool = True,
                 pool_last: bool = True, grad_checkpointing: bool = False, norm: str = "batch"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone {name!r} is not one of {BACKBONES}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone norm {norm!r} is not one of {BACKBONE_NORMS}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        self.out_channels = net.fc.in_features
        net.fc = nn.Identity()  # the trunk only: any classifier in the file (ImageNet's 1000 classes) is skipped
        if weights_path:
            load_checked(net, read_state_dict(weights_path, "model.backbone_weights"),
                         f"model.backbone_weights ({weights_path})", ignore_prefixes=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.freeze_stem = freeze_stem
        self.pool_last = pool_last
        self.stride = 64 if pool_last else 32
        self.grad_checkpointing = grad_checkpointing
        if freeze_stem:
            for p in [*self.stem.parameters(), *self.layer1.parameters()]:
                p.requires_grad_(False)

    def trainable_stages(self) -> list[nn.Module]:
        return [self.layer2, self.layer3, self.layer4] if self.freeze_stem else [
            self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_stem:  # frozen stages keep their ImageNet BatchNorm statistics
            self.stem.eval()
            self.layer1.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(images))
        for stage in (self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training:
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        if self.pool_last:
            x = nn.functional.max_pool2d(x, kernel_size=2, stride=2)
        return x
