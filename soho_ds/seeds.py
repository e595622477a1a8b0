"""Every random stream of a run, derived from `train.seed` in one place.

`derive(seed, stream, *coords)` hashes the run's seed, the stream's name and its coordinates (rank,
epoch, step, mixing stream) with numpy's SeedSequence, so streams never coincide: a formula such as
seed * 1000 + rank gives rank 500's training stream the seed of rank 0's validation stream at
seed * 1000 + 500 + rank, and seed + rank gives run 1's rank 0 the seed of run 0's rank 1. The
result has 31 bits: DALI keeps only the low 32 bits of a seed, and torch takes it as it is. A leaf
module: it imports nothing of the project.
"""
from __future__ import annotations

import zlib

import numpy as np

STREAMS = {
    "init": "the model's initial weights and buffers, the same on every rank",
    "torch": "a rank's global torch stream after the model exists (dropout, MVM choice, ITM negatives)",
    "text": "a rank's pretraining captions: which captions, ITM negatives, MLM masks",
    "val_text": "the same for held-out evaluation, reset before each evaluation",
    "shards": "a shard loader: its readers' order of tar files (the same on every rank) and its mixing",
    "order": "a reader's shuffle of tar files, the same on every rank of a stream",
    "augment": "a rank's image augmentation in one DALI pipeline",
    "mix": "a rank's choice of stream (source and orientation group) for each micro-batch",
    "stream": "one stream of a shard loader (a source and orientation group)",
    "restart": "a loader restarted at a step without its saved position",
    "epoch_order": "a finetune epoch's permutation of the examples, the same on every rank",
    "task": "a finetune rank's own draws (e.g. answers sampled for a batch)",
}


def derive(seed: int, stream: str, *coords: int) -> int:
    """The seed of `stream` at `coords` in the run seeded by `seed` (a non-negative int < 2**31)."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; the streams are {sorted(STREAMS)}")
    if seed < 0 or any(c < 0 for c in coords):
        raise ValueError(f"seeds and coordinates are non-negative, got {seed} and {coords}")
    entropy = [seed, zlib.crc32(stream.encode()), *coords]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0]) & 0x7FFFFFFF
