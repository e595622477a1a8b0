"""The one `deepspeed.initialize` call: precision, optimizer param groups and LR schedule.

The DeepSpeed JSON owns ZeRO, precision, batch arithmetic and clipping. The optimizer and
schedule come from the YAML and are handed to the engine as a client optimizer (AdamW, which
ZeRO supports) and a LambdaLR, so per-group learning rates (the CNN's multiplier) survive.
"""
from __future__ import annotations

import copy
import logging
import math

import deepspeed
import torch
from torch import nn

from soho_ds.runtime.config import TrainConfig

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


def cpu_has_fast_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX). Without them bf16 convolutions are emulated:
    ~20x slower than fp32 on an AVX2 machine (measured), where fp16 is slower still."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(ds_config: dict, device_type: str, precision: str = "auto") -> dict:
    """Returns a copy of the DeepSpeed config with exactly one precision mode set.

    "auto" keeps the file's choice on a GPU. On the CPU, fp16 is never fast: it becomes bf16
    where the CPU has bf16 instructions and fp32 where it has not; a bf16 file on such a CPU
    becomes fp32 too. BatchNorm needs its buffers in the compute dtype
    (`data_types.buffer_dtype`); the VD keeps its own in fp32 (see VisualDictionary).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ds = copy.deepcopy(ds_config)
    if precision == "auto":
        if ds.get("fp16", {}).get("enabled"):
            precision = "fp16"
        elif ds.get("bf16", {}).get("enabled"):
            precision = "bf16"
        else:
            precision = "fp32"
        if device_type == "cpu" and precision != "fp32":
            chosen = "bf16" if cpu_has_fast_bf16() else "fp32"
            if chosen != precision:
                log.warning("%s on this CPU is slow: training in %s instead (--precision %s to insist)",
                            precision, chosen, precision)
            precision = chosen
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    data_types = ds.setdefault("data_types", {})
    if precision in ("fp16", "bf16"):
        data_types["buffer_dtype"] = precision
    else:
        data_types.pop("buffer_dtype", None)
    return ds


def param_groups(module: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases and norms; the CNN at lr x cnn_lr_mult; the task or
    pretraining heads (everything outside the CNN, the visual embedding and the transformer) at
    lr x head_lr_mult."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        dotted = f".{name}"
        part = ("cnn" if ".backbone." in dotted else
                "transformer" if ".fusion." in dotted or ".visual." in dotted else "head")
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((part, no_decay), []).append(p)
    mult = {"cnn": cfg.cnn_lr_mult, "transformer": 1.0, "head": cfg.head_lr_mult}
    return [{"params": ps, "lr": cfg.lr * mult[part], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "name": f"{part}{'_no_decay' if no_decay else ''}"}
            for (part, no_decay), ps in sorted(groups.items())]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then linear/cosine decay to 0 at `max_steps` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_engine(module: nn.Module, cfg: TrainConfig, ds_config: dict):
    """Wraps `module` in a DeepSpeed engine (ZeRO as configured); returns the engine."""
    # torch's fused AdamW (CUDA and CPU kernels): one pass over each flat ZeRO partition instead of
    # the ~8 elementwise passes of the default implementation, each of which re-reads the whole
    # partition from memory (R50 + BERT-base on 2 CPU cores: optimizer step 3-4 s -> 0.8 s).
    optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def compute_dtype(engine) -> torch.dtype:
    if engine.fp16_enabled():
        return torch.float16
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float32
