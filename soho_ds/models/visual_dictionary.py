"""Visual Dictionary (SOHO, Sec. 3.2): nearest-entry quantisation of grid features.

Each feature is mapped to the nearest of K entries (L2). The entries are not trained by the
optimizer: they are a moving average (momentum gamma) of the features assigned to them, as
in VQ-VAE's EMA codebook. The straight-through trick passes the decoder's gradient to the
CNN unchanged. The per-step counts and sums are all-reduced over ranks before the update,
so every rank applies the identical update and keeps an identical dictionary.

Departures from the public code, against codebook collapse (all features choosing one
entry, seen here within 10 steps from a random init): the entries are initialised from
real features of the first batch, and entries whose usage falls below `restart_below` of
the average are re-seeded from current features. Both draw candidates on every rank and
all-gather them, so all ranks pick the same ones.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_candidates(x: torch.Tensor, n: int) -> torch.Tensor:
    """n feature rows drawn from the features of all ranks; identical on every rank. x (M, C)."""
    world = dist.get_world_size() if _distributed() else 1
    per_rank = math.ceil(n / world)
    pick = torch.randint(x.shape[0], (per_rank,), device=x.device)  # this rank's own RNG
    local = x[pick].contiguous()
    if world == 1:
        return local[:n]
    gathered = torch.empty(world * per_rank, x.shape[1], device=x.device, dtype=x.dtype)
    dist.all_gather_single(gathered, local)
    return gathered[:n]


class VisualDictionary(nn.Module):
    # DeepSpeed keeps buffers named here in fp32 under bf16/fp16 training
    # ("keep_in_fp32_modules": "auto"); an EMA in bf16 would lose the small updates.
    _keep_in_fp32_modules_strict = ["embed", "ema_count", "ema_sum"]

    def __init__(self, num_entries: int = 2048, dim: int = 768, momentum: float = 0.99, eps: float = 1e-5,
                 init_from_data: bool = True, restart_below: float = 0.01):
        super().__init__()
        self.num_entries, self.dim, self.momentum, self.eps = num_entries, dim, momentum, eps
        self.restart_below = restart_below
        embed = torch.randn(num_entries, dim)
        self.register_buffer("embed", embed)  # (K, C) entries e_k
        # EMA statistics start as "one feature equal to the entry", so e = m / n equals the
        # initial entry until features arrive (zeros would divide to 0 or explode).
        self.register_buffer("ema_count", torch.ones(num_entries))  # n_k
        self.register_buffer("ema_sum", embed.clone())  # m_k
        self.register_buffer("initialised", torch.tensor(not init_from_data))
        self.register_buffer("usage", torch.zeros(()), persistent=False)  # fraction used in the last update
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry for each row of x (M, C), by squared L2 distance."""
        e = self.embed
        dist2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)  # (M, K)
        return dist2.argmin(1)

    @torch.no_grad()
    def _reseed(self, entries: torch.Tensor, x: torch.Tensor, count: torch.Tensor) -> None:
        """Entries (bool mask) restart at real features, weighted as `count` features."""
        n = int(entries.sum())
        candidates = _gather_candidates(x, n)
        self.embed[entries] = candidates
        self.ema_count[entries] = count
        self.ema_sum[entries] = candidates * count

    @torch.no_grad()
    def update(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """EMA update from features x (M, C) assigned to `index` (M,), summed over all ranks."""
        K, C = self.embed.shape
        stats = torch.zeros(K, C + 1, device=x.device, dtype=torch.float32)
        stats[:, :C].index_add_(0, index, x)  # s_k: sum of the features assigned to k
        stats[:, C].index_add_(0, index, torch.ones_like(index, dtype=torch.float32))  # c_k
        if _distributed():
            dist.all_reduce(stats)  # one collective for sums and counts together
        sums, counts = stats[:, :C], stats[:, C]
        g = self.momentum
        self.ema_count.mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + K * self.eps) * total  # Laplace smoothing
        used = counts > 0
        # Entries no feature chose this step keep their vector: with the plain formula a long-unused
        # entry decays towards the origin and then captures stray features.
        self.embed.copy_(torch.where(used[:, None], self.ema_sum / smoothed[:, None], self.embed))
        self.usage.fill_(used.float().mean())
        if self.restart_below > 0:
            mean_count = total / K
            dead = self.ema_count < self.restart_below * mean_count  # identical on every rank
            if dead.any():
                self._reseed(dead, x, mean_count)
                self.restarts += int(dead.sum())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., C) -> (straight-through quantised x (..., C), entry index (...))."""
        flat = x.detach().reshape(-1, self.dim).float()
        if self.training and not self.initialised:
            world = dist.get_world_size() if _distributed() else 1
            self._reseed(torch.ones(self.num_entries, dtype=torch.bool, device=x.device), flat,
                         torch.tensor(max(1.0, flat.shape[0] * world / self.num_entries), device=x.device))
            self.initialised.fill_(True)
        index = self.assign(flat)
        quantised = self.embed[index].view_as(x).to(x.dtype)
        if self.training:
            self.update(flat, index)
        # Straight-through: forward value is the entry, gradient flows to x unchanged.
        return x + (quantised - x).detach(), index.view(x.shape[:-1])
