"""One logging path: console lines and TensorBoard scalars, written by global rank 0 only."""
from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("soho_ds")


def setup_console(rank: int, world_size: int, local_rank: int) -> None:
    """Every rank announces itself once; then rank 0 logs at INFO, the others warnings and errors."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    log.info("joined as global rank %d of %d (local rank %d) on %s", rank, world_size, local_rank,
             socket.gethostname())
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)


# The run's history in its output folder, one JSON line per event, for scripts: each start (world,
# batch, precision, the checkpoint it resumed from and its state digest), each checkpoint (its digest,
# whether the ranks' replicas agreed) and a preemption.
HISTORY = "run.jsonl"


class RunLogger:
    def __init__(self, log_dir: str, rank: int):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir) if rank == 0 else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def record(self, path: str, entry: dict) -> None:
        """Appends one JSON line (evaluation results, for scripts; TensorBoard has the same scalars)."""
        if self.writer is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def text(self, tag: str, body: str, step: int | None = None) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, body, step)

    def image(self, tag: str, pixels, step: int) -> None:
        """pixels: (H, W, 3) uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def info(self, msg: str, *args) -> None:
        log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        log.warning(msg, *args)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
