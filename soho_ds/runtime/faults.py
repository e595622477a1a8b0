"""Faults injected at a deterministic point of a run, for resilience tests and soak runs: a StepHooks
the caller passes to a driver (`pretrain(..., hooks=FaultInjection("1:3:KILL"))`, or a launcher's
`--inject_fault`). The training loop itself knows nothing of faults.

A spec is "R:N[-M]:KIND[:launcher]": global rank R, optimizer steps N to M (default N alone), and
KIND either NAN (one NaN pixel in that rank's images of those steps, as a corrupt input would give)
or a signal name (KILL, STOP, TERM, ...) sent right after step N to the rank itself or, with
":launcher", to its launcher process.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from soho_ds.config import ConfigError
from soho_ds.runtime.trainer import StepHooks


class FaultInjection(StepHooks):
    def __init__(self, spec: str):
        parts = spec.split(":")
        try:
            first, _, last = parts[1].partition("-")
            self.rank, self.first, self.last = int(parts[0]), int(first), int(last or first)
            self.kind = parts[2].upper().removeprefix("SIG")
        except (IndexError, ValueError):
            raise ConfigError(f"fault {spec!r}: expected RANK:STEP[-LAST]:KIND[:launcher]") from None
        if self.kind != "NAN" and not hasattr(signal, f"SIG{self.kind}"):
            raise ConfigError(f"fault {spec!r}: {parts[2]!r} is neither NAN nor a signal name")
        self.to_launcher = parts[3:] == ["launcher"]

    def _hits(self, rank: int, step: int) -> bool:
        return rank == self.rank and self.first <= step <= self.last

    def before_forward(self, batch: dict[str, torch.Tensor], rank: int, step: int) -> dict[str, torch.Tensor]:
        if self.kind == "NAN" and self._hits(rank, step):
            images = batch["images"].clone()
            images.view(-1)[0] = float("nan")
            batch = {**batch, "images": images}
        return batch

    def after_step(self, rank: int, step: int) -> None:
        if self.kind == "NAN" or not self._hits(rank, step):
            return
        signum = getattr(signal, f"SIG{self.kind}")
        handler = signal.getsignal(signum)
        if not callable(handler):  # KILL, STOP, or a signal nobody handles: it acts at once
            os.kill(os.getppid() if self.to_launcher else os.getpid(), signum)
            return
        # A handled signal (SIGTERM: the trainer's stop flag) is waited for here, so that it arrives at this
        # step on this rank wherever it is sent: the run reacts at a fixed step, not at one the timing picks.
        received = []
        signal.signal(signum, lambda *args: (received.append(True), handler(*args)))
        try:
            os.kill(os.getppid() if self.to_launcher else os.getpid(), signum)
            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between these sleeps
        finally:
            signal.signal(signum, handler)
