"""torchvision ResNet trunk that turns whole images into a grid of features (no classifier)."""
from __future__ import annotations

import logging

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}


def load_checked(module: nn.Module, state: dict, source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Loads `state` into `module` after checking every key and shape; names what it skipped."""
    own = module.state_dict()
    ignored = sorted(k for k in state if k.startswith(ignore_prefixes))
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict(state)
    if ignored:
        log.info("%s: loaded; ignored %d keys not used here (%s...)", source, len(ignored), ignored[0])


class ResNetBackbone(nn.Module):
    """ResNet stem + four stages; returns (B, C, H/32, W/32), or H/64 with `pool_last`.

    SOHO freezes the stem and first stage (their BatchNorm statistics too) and, in its public
    code, max-pools the last stage 2x2 to halve the number of visual tokens.
    """

    def __init__(self, name: str = "resnet101", weights_path: str | None = None, freeze_stem: bool = True,
                 pool_last: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        net = RESNETS[name](weights=None)
        self.out_channels = net.fc.in_features
        net.fc = nn.Identity()  # the trunk only: any classifier in the file (ImageNet's 1000 classes) is skipped
        if weights_path:
            load_checked(net, torch.load(weights_path, map_location="cpu", weights_only=True), weights_path,
                         ignore_prefixes=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.freeze_stem = freeze_stem
        self.pool_last = pool_last
        self.grad_checkpointing = grad_checkpointing
        if freeze_stem:
            for p in [*self.stem.parameters(), *self.layer1.parameters()]:
                p.requires_grad_(False)

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
