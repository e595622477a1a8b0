"""One logging path: console lines and TensorBoard scalars, written by global rank 0 only."""
from __future__ import annotations

import logging
import sys

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("soho_ds")


def setup_console(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, tagged with their rank."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


class RunLogger:
    def __init__(self, log_dir: str, rank: int):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir) if rank == 0 else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, body)

    def info(self, msg: str, *args) -> None:
        log.info(msg, *args)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
