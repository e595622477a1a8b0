"""Where a run's time goes: model FLOPs of a batch, the device's peak, memory.

FLOPs are counted for the useful work only: the CNN over each image's valid (unpadded) pixels
and the fusion layers over each caption's real tokens (its words and its image's valid cells),
forward + backward (3x forward). Everything here reads host-side values (the batch before it
goes to the device, the allocator's counters), so it adds no device sync.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import torch
from torch import nn

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "V100": 125.0}  # dense fp16/bf16


def device_peak_flops(device: torch.device | str, precision: str, override_tflops: float | None = None) -> float:
    """The device's peak FLOP/s for MFU; 0 (MFU not reported) where it cannot be known."""
    if override_tflops:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0) * 1e12
    # CPU: threads x clock x FMA FLOP per cycle of its widest vector unit (two FMA pipes: AVX2 32 fp32,
    # AVX-512 64 fp32, AVX-512 BF16 dot products 128 in bf16)
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0.0
    flags = set(re.search(r"flags\s*:(.*)", info).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32
    if precision == "bf16" and "avx512_bf16" in flags:
        per_cycle = 128
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)]
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if not mhz and freq.exists():
        mhz = [int(freq.read_text()) / 1000]
    return torch.get_num_threads() * max(mhz) * 1e6 * per_cycle if mhz else 0.0


class FlopModel:
    """Training FLOPs of a batch from its host-side shapes: images (B, 3, H, W) with `image_sizes`
    (B, 2) valid pixels, captions `attention_mask` (T, L) with `image_index` (T,) their image."""

    def __init__(self, soho: nn.Module, device: torch.device):
        self.stride = soho.stride
        self.cnn_per_pixel = self._cnn_flops_per_pixel(soho.backbone, device)
        # the weights every token passes through in the fusion layers (embeddings are lookups, not FLOPs)
        self.fusion_params = sum(p.numel() for p in soho.fusion.bert.encoder.parameters())
        self.num_layers, self.hidden = soho.cfg.num_layers, soho.cfg.hidden_size

    @staticmethod
    @torch.no_grad()
    def _cnn_flops_per_pixel(backbone: nn.Module, device: torch.device) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = backbone.training
        backbone.eval()  # no BatchNorm statistics change for this count
        side = 128
        dtype = next(backbone.parameters()).dtype
        try:
            with FlopCounterMode(display=False) as counter:
                backbone(torch.zeros(1, 3, side, side, device=device, dtype=dtype))
        finally:
            backbone.train(was_training)
        return counter.get_total_flops() / side ** 2

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """-> (training FLOPs of the useful work, fraction of the image pixels that are padding)."""
        images = batch["images"]
        B, _, H, W = images.shape
        sizes = batch.get("image_sizes")
        sizes = torch.tensor([[H, W]] * B) if sizes is None else sizes.cpu().long()
        valid_pixels = (sizes[:, 0] * sizes[:, 1]).double()
        cells = ((sizes + self.stride - 1) // self.stride)
        cells = (cells[:, 0] * cells[:, 1]).double()
        flops = 3 * self.cnn_per_pixel * float(valid_pixels.sum())
        mask = batch.get("attention_mask")
        if mask is not None:
            index = batch.get("image_index")
            index = torch.arange(len(mask)) if index is None else index.cpu()
            seq = mask.cpu().sum(1).double() + cells[index]
            flops += float((6 * self.fusion_params * seq + 12 * self.num_layers * self.hidden * seq ** 2).sum())
        return flops, 1.0 - float(valid_pixels.sum()) / (B * H * W)


def device_memory_gib(device: torch.device) -> float:
    """Peak memory the allocator handed out since the last call (GPU), else this process's resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resident_memory_gib()


def resident_memory_gib() -> float:
    """This process's resident memory (Linux /proc; 0 where there is none)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def host_name() -> str:
    return socket.gethostname()
