"""Timing and reporting shared by the benchmarks: the same clock, warm-up rule and output format."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


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
