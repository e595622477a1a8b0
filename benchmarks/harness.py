"""What every benchmark and study here shares: the clock and warm-up rule, peak memory, the report
format (benchmarks/NAME.json + NAME.md), a pretraining batch, and the tiny model's overrides.

The scripts beside this file import it as `harness` (a script's own folder is on its path).
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The smallest model that exercises every part (ResNet-18, 2 BERT layers, K = 32) at the CPU's sizes.
TINY_MODEL = ["model.backbone=resnet18", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=128", "model.vd_size=32", "model.bert_dir=null", "model.backbone_weights=null",
              "model.pool_last=false"]
TINY_DATA = ["data.shorter_side=64", "data.longer_side=96", "data.captions_per_image=2", "data.max_text_len=20"]


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_per_call(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of `fn` after `warmup` untimed calls (device work included)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def write_report(name: str, title: str, columns: list[str], rows: list[dict], notes: list[str],
                 out_dir: str | Path = "benchmarks") -> str:
    """Writes benchmarks/NAME.json and NAME.md; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_description(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / f"{name}.json").write_text(json.dumps({"title": title, **meta, "rows": rows, "notes": notes}, indent=1))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"### {title}", "", f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    md = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(md)
    return md


def reset_peak_memory() -> None:
    """From here on, `peak_memory_gib` reports this phase's peak (GPU: max allocated; CPU: peak RSS)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM


def peak_memory_gib(device: str | None = None) -> float:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return kib / 2**20


CAPTIONS = ["a small red circle above a large blue square", "two shapes on a white background"]


def pretraining_batch(images: int, image_size: int, device, seed: int = 0,
                      tokenizer_dir: str | None = None) -> dict[str, torch.Tensor]:
    """A pretraining batch of `images` random square images with two captions each (MLM at 15 %, half of
    the pairs ITM negatives), as PretrainTask builds one."""
    from soho_ds.data.text import PretrainTextBuilder, load_tokenizer

    text = PretrainTextBuilder(load_tokenizer(tokenizer_dir), 24, 2, 0.15, 0.5, seed=seed)([CAPTIONS] * images)
    batch = {k: v.to(device) for k, v in text.items()}
    batch["images"] = torch.randn(images, 3, image_size, image_size, device=device,
                                  generator=torch.Generator(device=device).manual_seed(seed))
    return batch
