"""BatchNorm as SOHO uses it, under mixed precision and on every device.

- `BatchNorm2d`: per-rank batch statistics (SOHO's backbone). Its running statistics and its
  arithmetic stay fp32 whatever the compute dtype: DeepSpeed casts parameters to fp16/bf16 and
  leaves buffers alone, and the affine parameters are upcast for the call, which selects the
  mixed-precision kernels (cuDNN's fp32-statistics BatchNorm; torch's CPU kernel likewise).
- `FrozenBatchNorm2d`: statistics and affine fixed (detection backbones' habit), the same state
  dict keys as `BatchNorm2d`, so checkpoints move between the modes.
- `SyncBatchNorm2d`: statistics over all ranks (SOHO's neck). On CUDA, torch's SyncBatchNorm;
  elsewhere (gloo) the sums are all-reduced with torch's differentiable functional all-reduce, since
  torch's SyncBatchNorm runs on GPUs only.

`model.backbone_norm` picks the backbone's kind (`batch` | `sync` | `frozen`); `synchronise_norms`
converts a built model for its world size (neck always, backbone when `sync`), before DeepSpeed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class BatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or self.running_mean is None
        stats_dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        return F.batch_norm(x, self.running_mean, self.running_var,
                            None if self.weight is None else self.weight.to(stats_dtype),
                            None if self.bias is None else self.bias.to(stats_dtype),
                            use_batch, self.momentum, self.eps)


class FrozenBatchNorm2d(BatchNorm2d):
    """Always normalises with its stored statistics; its affine parameters are not trained."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)


def _gloo_sync_batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, group) -> torch.Tensor:
    """Training-mode BatchNorm over the union of all ranks' batches, differentiable end to end."""
    from torch.distributed import _functional_collectives as funcol

    C = x.shape[1]
    xf = x.float()
    count = torch.full((1,), xf.numel() / C, device=x.device)
    local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
    # one differentiable collective: sums, sums of squares, counts (its backward all-reduces the gradients)
    total = funcol.wait_tensor(funcol.all_reduce(local, "sum", group or dist.group.WORLD))
    n = total[2 * C]
    mean = total[:C] / n
    var = (total[C:2 * C] / n - mean * mean).clamp(min=0)
    with torch.no_grad():
        m = bn.momentum
        bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
        unbiased = var.detach() * n / (n - 1).clamp(min=1)
        bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + bn.eps)[None, :, None, None]
    if bn.weight is not None:
        y = y * bn.weight.float()[None, :, None, None] + bn.bias.float()[None, :, None, None]
    return y.to(x.dtype)


class SyncBatchNorm2d(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        if not (self.training and distributed):
            return BatchNorm2d.forward(self, x)
        self.num_batches_tracked.add_(1)
        if x.device.type == "cuda":
            from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

            stats_dtype = self.running_mean.dtype
            return sync_batch_norm.apply(x, self.weight.to(stats_dtype), self.bias.to(stats_dtype), self.running_mean,
                                         self.running_var, self.eps, self.momentum,
                                         self.process_group or dist.group.WORLD,
                                         dist.get_world_size(self.process_group))
        return _gloo_sync_batch_norm(x, self, self.process_group)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


def _converted(bn: nn.BatchNorm2d, cls: type) -> nn.BatchNorm2d:
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    for p_new, p_old in zip(new.parameters(), bn.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(bn.training)
    return new.to(bn.weight.device if bn.weight is not None else None)


def convert_norms(module: nn.Module, cls: type, skip=(FrozenBatchNorm2d,)) -> nn.Module:
    """Replaces every BatchNorm2d below `module` (not those of a `skip` type) by `cls`, state kept."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, (cls, *skip)):
            setattr(module, name, _converted(child, cls))
        else:
            convert_norms(child, cls, skip)
    return module


def synchronise_norms(module: nn.Module, backbone_norm: str, world_size: int) -> nn.Module:
    """For a run of `world_size` ranks: the neck's BatchNorm (any module named `neck_norm_owner`,
    i.e. each SohoModel's `visual`) and, with backbone_norm "sync", the backbone's trainable ones
    become `SyncBatchNorm2d`. One rank needs no synchronisation. Call before deepspeed.initialize."""
    if world_size <= 1:
        return module
    from soho_ds.models.soho import SohoModel

    for soho in [m for m in module.modules() if isinstance(m, SohoModel)]:
        convert_norms(soho.visual, SyncBatchNorm2d)
        if backbone_norm == "sync":
            # frozen stages (freeze_stem) stay in eval and keep their ImageNet statistics
            for stage in soho.backbone.trainable_stages():
                convert_norms(stage, SyncBatchNorm2d)
    return module
