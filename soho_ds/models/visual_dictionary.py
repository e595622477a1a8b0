"""Visual Dictionary (SOHO, Sec. 3.2): nearest-entry quantisation of grid features.

Each feature is mapped to the nearest of K entries (L2). The entries are not trained by the
optimizer: they are a moving average (momentum gamma) of the features assigned to them, as
in VQ-VAE's EMA codebook. The straight-through trick passes the decoder's gradient to the
CNN unchanged. The per-step counts and sums are all-reduced over ranks before the update,
so every rank applies the identical update and keeps an identical dictionary.

Only valid grid cells count: cells that lie in an image's padding carry weight 0 in the
counts, the sums and the candidates for re-seeding. The update is two-phase: `forward`
computes this step's statistics, `commit(ok)` applies them only where `ok` (a device flag:
finite inputs and loss) holds, so one bad batch never reaches the dictionary and no host
sync is needed to decide.

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


def _gather_candidates(x: torch.Tensor, weight: torch.Tensor | None, n: int) -> torch.Tensor:
    """n feature rows drawn from the valid features of all ranks; identical on every rank. x (M, C)."""
    world = dist.get_world_size() if _distributed() else 1
    per_rank = math.ceil(n / world)
    if weight is None:
        pick = torch.randint(x.shape[0], (per_rank,), device=x.device)  # this rank's own RNG
    else:
        pick = torch.multinomial(weight, per_rank, replacement=True)
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
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # entries re-seeded so far
        self._pending: tuple | None = None  # this step's statistics, until commit()

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry for each row of x (M, C), by squared L2 distance."""
        e = self.embed
        dist2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)  # (M, K)
        return dist2.argmin(1)

    @torch.no_grad()
    def _reseed(self, entries: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                count: torch.Tensor) -> None:
        """Entries (bool mask) restart at real features, weighted as `count` features."""
        n = int(entries.sum())
        candidates = _gather_candidates(x, weight, n)
        self.embed[entries] = candidates
        self.ema_count[entries] = count
        self.ema_sum[entries] = candidates * count

    @torch.no_grad()
    def statistics(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Per-entry feature sums and counts (K, C+1) over all ranks: x (M, C), index (M,), weight (M,) or None."""
        K, C = self.embed.shape
        stats = torch.zeros(K, C + 1, device=x.device, dtype=torch.float32)
        w = torch.ones_like(index, dtype=torch.float32) if weight is None else weight
        stats[:, :C].index_add_(0, index, x * w[:, None])  # s_k: sum of the valid features assigned to k
        stats[:, C].index_add_(0, index, w)  # c_k
        if _distributed():
            dist.all_reduce(stats)  # one collective for sums and counts together
        return stats

    @torch.no_grad()
    def update(self, stats: torch.Tensor, ok: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        """EMA update from all-reduced `stats`, applied only where the device flag `ok` holds."""
        K, C = self.embed.shape
        ok = ok & torch.isfinite(stats).all()
        if _distributed():  # one rank's bad batch stops the update on all of them, so they stay identical
            flag = ok.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag > 0
        sums, counts = stats[:, :C], stats[:, C]
        g = self.momentum
        count = torch.where(ok, self.ema_count * g + counts * (1 - g), self.ema_count)
        total = count.sum()
        smoothed = (count + self.eps) / (total + K * self.eps) * total  # Laplace smoothing
        used = (counts > 0) & ok
        self.ema_sum.copy_(torch.where(ok, self.ema_sum * g + sums * (1 - g), self.ema_sum))
        self.ema_count.copy_(count)
        # Entries no feature chose this step keep their vector: with the plain formula a long-unused
        # entry decays towards the origin and then captures stray features.
        self.embed.copy_(torch.where(used[:, None], self.ema_sum / smoothed[:, None], self.embed))
        self.usage.copy_(torch.where(ok, (counts > 0).float().mean(), self.usage))
        if self.restart_below > 0:
            dead = (self.ema_count < self.restart_below * total / K) & ok  # identical on every rank
            if dead.any():
                self._reseed(dead, x, weight, total / K)
                self.restarts += int(dead.sum())

    @staticmethod
    def _all_ranks(flag: torch.Tensor) -> bool:
        """True where `flag` holds on every rank (a host decision all ranks take alike)."""
        if _distributed():
            flag = flag.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag > 0)

    @torch.no_grad()
    def commit(self, ok: torch.Tensor | None = None) -> None:
        """Applies the statistics of the last training forward where `ok` (a bool tensor) holds."""
        if self._pending is None:
            return
        stats, inputs_ok, x, weight = self._pending
        self._pending = None
        self.update(stats, inputs_ok if ok is None else inputs_ok & ok, x, weight)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., C), valid (...) bool or None (all valid) -> (straight-through quantised x, entry index (...)).

        In training, this step's statistics wait for `commit`; a forward that finds an
        uncommitted step commits it first, guarded by that step's own input check.
        """
        flat = x.detach().reshape(-1, self.dim).float()
        weight = None if valid is None else valid.reshape(-1).float()
        if self.training:
            self.commit()
            inputs_ok = torch.isfinite(flat if weight is None else torch.where(weight[:, None] > 0, flat, 0.0)).all()
            if not self.initialised and self._all_ranks(inputs_ok):  # once, at the first good batch
                n_valid = torch.tensor(float(flat.shape[0] if weight is None else weight.sum()), device=x.device)
                if _distributed():  # ranks see different numbers of valid cells; the entries' weight must agree
                    dist.all_reduce(n_valid)
                self._reseed(torch.ones(self.num_entries, dtype=torch.bool, device=x.device), flat, weight,
                             (n_valid / self.num_entries).clamp(min=1.0))
                self.initialised.fill_(True)
        safe = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)  # padding may hold anything
        index = self.assign(safe)
        quantised = self.embed[index].view_as(x).to(x.dtype)
        if self.training:
            self._pending = (self.statistics(safe, index, weight), inputs_ok, safe, weight)
        # Straight-through: forward value is the entry, gradient flows to x unchanged.
        return x + (quantised - x).detach(), index.view(x.shape[:-1])
