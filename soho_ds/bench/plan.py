"""Compute planning (soho-plan): a recipe's steps and global batch, the dataset's size from its
shard indexes and a measured throughput give epochs, wall-clock and GPU-hours on N GPUs."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from soho_ds.config import ReportedError, RunConfig
from soho_ds.data.shards import indexed_sample_count, list_shards

# Published pretraining budgets, as their papers and repositories state them (../shared/REFERENCE.md).
PUBLISHED = [
    ("SOHO (COCO+VG)", "8 GPUs, 40 epochs, 16 images x 4 captions per GPU, accumulation 2", None),
    ("ViLT-B/32 (4M images)", "64 V100, 100-200K steps, about 3 days", 64 * 72),
    ("ALBEF (4M images)", "8 A100, 2-3 days", 8 * 60),
    ("METER (4M images)", "8 A100, about 8 days", 8 * 192),
]
SOHO_EPOCHS = 40


class PlanError(ReportedError, ValueError):
    """An input the planner cannot use, named with the way out."""


@dataclass
class PlanRow:
    gpus: int
    global_batch: int
    steps: int
    epochs: float
    hours: float

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus


def dataset_images(shards) -> int:
    """Samples the training shards' indexes list (what one epoch is)."""
    n = indexed_sample_count(list_shards(shards))
    if n is None:
        raise PlanError(f"data.train_shards {shards}: not indexed, so their size is unknown; run "
                        "soho-index-shards on them first")
    return n


def source_sizes(cfg: RunConfig) -> list[tuple[str, int, float]]:
    """(name, images, share of the batches) of each weighted training source."""
    sources = cfg.data.train_sources
    total = sum(s.weight for s in sources)
    return [(s.name, dataset_images(s.shards), s.weight / total) for s in sources]


def measured_images_per_s(path: str | Path, measured_on: int) -> float:
    """Images/s per GPU from a measurement: a run's train.jsonl (the median of its interval figures
    `perf/img_per_s` after the first, over `measured_on` GPUs) or a benchmark report (benchmarks/*.json:
    the DeepSpeed row's `images/s`, else the first row that has one, on `measured_on` processes)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"--from {path}: file not found") from None
    if path.suffix == ".jsonl":
        rates = [row["perf/img_per_s"] for row in map(json.loads, text.splitlines()) if "perf/img_per_s" in row]
        if len(rates) < 2:
            raise PlanError(f"--from {path}: fewer than 2 logged intervals with perf/img_per_s")
        return statistics.median(rates[1:]) / measured_on  # the first interval holds the start-up
    rows = [r for r in json.loads(text).get("rows", []) if "images/s" in r]
    if not rows:
        raise PlanError(f"--from {path}: no row with images/s (a benchmarks/*.json report or a train.jsonl)")
    chosen = next((r for r in rows if "DeepSpeed" in str(next(iter(r.values())))), rows[0])
    return chosen["images/s"] / measured_on


def plan(cfg: RunConfig, ds: dict, images: int, per_gpu: float, gpus: list[int], efficiency: float = 1.0
         ) -> list[PlanRow]:
    """One row per GPU count: `train.max_steps` steps of the global batch (`train_batch_size` when the
    DeepSpeed JSON fixes it, else micro-batch x accumulation x GPUs), at `per_gpu` images/s per GPU
    times `efficiency` (the share of linear scaling the interconnect keeps)."""
    if per_gpu <= 0 or not 0 < efficiency <= 1:
        raise PlanError("the throughput must be positive and the scaling efficiency in (0, 1]")
    rows = []
    for n in gpus:
        batch = ds.get("train_batch_size") or (ds["train_micro_batch_size_per_gpu"]
                                               * ds.get("gradient_accumulation_steps", 1) * n)
        seen = cfg.train.max_steps * batch
        rows.append(PlanRow(n, batch, cfg.train.max_steps, seen / images, seen / (per_gpu * n * efficiency) / 3600))
    return rows


def format_plan(rows: list[PlanRow], images: int, per_gpu: float,
                sources: list[tuple[str, int, float]] | None = None) -> str:
    lines = [f"dataset: {images:,} images (one epoch); measured {per_gpu:.2f} images/s per GPU",
             "| GPUs | global batch | steps | epochs | wall-clock h | GPU-hours | steps for SOHO's 40 epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.gpus} | {r.global_batch} | {r.steps:,} | {r.epochs:.2f} | {r.hours:.1f} | "
                     f"{r.gpu_hours:.0f} | {SOHO_EPOCHS * images / r.global_batch:,.0f} |")
    if sources and len(sources) > 1:  # a weighted mix: each source's own epochs over the run
        lines += ["epochs of each source (weighted mix):",
                  "| GPUs | " + " | ".join(f"{name} ({n:,} images, {100 * share:.0f}% of batches)"
                                          for name, n, share in sources) + " |",
                  "|---|" + "---|" * len(sources)]
        lines += [f"| {r.gpus} | " + " | ".join(f"{r.steps * r.global_batch * share / n:.2f}"
                                               for _, n, share in sources) + " |" for r in rows]
    lines.append("published budgets:")
    lines += [f"  {name}: {what}" + (f" (about {gpu_h:,} GPU-hours)" if gpu_h else "")
              for name, what, gpu_h in PUBLISHED]
    return "\n".join(lines)
