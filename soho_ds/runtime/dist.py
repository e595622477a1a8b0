"""Process-group set-up: the same code for one CPU process, local ranks, and GPU nodes."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

from soho_ds.config import ReportedError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_HOST_GROUP: list = []


def host_group():
    """The group for host-side control values (stop flags, write failures): the default group on gloo,
    else one gloo group made once (every rank calls this at the same point), so that agreeing on a
    flag never touches the GPU."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Joins (or, when started without a launcher, creates) the process group.

    NCCL with CUDA, gloo on the CPU. A plain `python launch/...py` becomes a world of one.
    `timeout_s` bounds every collective, ZeRO's included: DeepSpeed creates its gradient-
    reduction groups with torch's default timeout (30 min), not the one given here, so the
    default itself is set too (before any group exists).
    """
    timeout = timedelta(seconds=timeout_s)
    dist.distributed_c10d.default_pg_timeout = timeout
    if hasattr(dist.distributed_c10d, "default_pg_nccl_timeout"):
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
    if "RANK" not in os.environ:  # not started by deepspeed/torchrun: a single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if not cuda:
            _skip_shm_allreduce()
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout, verbose=False)
        except RuntimeError as e:  # torch's DistNetworkError is a RuntimeError
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
                raise PortInUse(f"port {port} on {addr} is already in use, most likely by another job: give this "
                                f"one its own port (deepspeed --master_port P ...)") from None
            raise
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _skip_shm_allreduce() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op on first use (~35 s; it needs a C++
    compiler and x86) and gives each rank a 66 MB workspace in /dev/shm that it never unlinks
    (deepspeedai/DeepSpeed#4115): run after run, RAM fills. Only its inference all-reduce uses them;
    training reduces through gloo. Marked incompatible, the op is neither built nor loaded and that
    all-reduce falls back to torch.distributed (DeepSpeed keeps one table of compatible ops, so the
    mark holds)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class PortInUse(ReportedError, RuntimeError):
    """The rendezvous port is taken (another job on this machine)."""


class PeerFailure(ReportedError, RuntimeError):
    """Another rank died or stopped responding; raised instead of waiting for it forever."""


@contextlib.contextmanager
def fail_fast_on_peer_loss(rank: int, timeout_s: float):
    """Turns the backend's errors when a peer dies (connection closed/reset) or hangs (collective
    timeout) into one clear `PeerFailure`, so the launcher sees this rank exit at once."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
        text = str(e).lower()
        if not any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset",
                                       "broken pipe", "peer")):
            raise
        msg = (f"rank {rank}: a collective failed ({str(e).splitlines()[0][:200]}); another rank has died or "
               f"has not answered within train.collective_timeout_s = {timeout_s:g} s. Stopping this rank; "
               "resume with --resume from the last complete checkpoint.")
        logging.getLogger("soho_ds").error(msg)
        raise PeerFailure(msg) from e
