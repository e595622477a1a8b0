"""Visual Dictionary (SOHO, Sec. 3.2): nearest-entry quantisation of grid features.

Each feature is mapped to the nearest of K entries (L2). The entries are not trained by the
optimizer: they are a moving average (momentum gamma) of the features assigned to them, as
in VQ-VAE's EMA codebook. The straight-through trick passes the decoder's gradient to the
CNN unchanged. The per-step counts and sums are all-reduced over ranks before the update,
so every rank applies the identical update and keeps an identical dictionary.

Only valid grid cells count: cells that lie in an image's padding carry weight 0 in the
counts, the sums and the candidates for re-seeding. The update is two-phase: `forward`
computes this rank's statistics, `commit(ok)` all-reduces them (one collective: sums, counts
and every rank's "bad step" flag together) and applies them only where `ok` (a device flag:
finite inputs and loss) holds on every rank, so one bad batch never reaches the dictionary.
Nothing in a training step reads a device value on the host.

Two variants (`model.vd_variant`):

- "official" is the released module's rule: the running counts and sums start at zero (an entry
  no feature chose at the first update becomes exactly 0), every entry is recomputed at every
  update, and the forward returns each feature's entry *after* this step's update, so the
  update happens inside the forward (inputs that are not finite on some rank still leave the
  dictionary unchanged; the loss cannot gate it). `commit` only closes the step.
- "soho_ds" departs from it against codebook collapse (all features choosing one entry, seen
  here within 10 steps from a random init): the entries are initialised from real features of
  the first training batch, gathered from all ranks (once); `maintain()`, which the trainer calls
  at its logging interval, re-seeds entries whose usage fell below `restart_below` of the
  average from features each rank keeps from its latest batch, all-gathered so that every rank
  picks the same ones; an entry no feature chose keeps its vector; the forward returns the
  entry before the update, which waits for `commit` and the loss's verdict.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _draw(x: torch.Tensor, weight: torch.Tensor | None, n: int) -> torch.Tensor:
    """n rows of x (M, C) drawn with replacement from the valid ones (this rank's own RNG); no host sync."""
    if weight is None:
        pick = torch.randint(x.shape[0], (n,), device=x.device)
    else:  # an all-invalid batch draws uniformly (those rows are then never used: see callers)
        pick = torch.multinomial(weight + (weight.sum() == 0).float(), n, replacement=True)
    return x[pick]


def _all_gather(local: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, rank 0's first; identical on every rank."""
    if not _distributed():
        return local
    world = dist.get_world_size()
    gathered = torch.empty(world * local.shape[0], *local.shape[1:], device=local.device, dtype=local.dtype)
    dist.all_gather_single(gathered, local.contiguous())
    return gathered


def _gather_candidates(x: torch.Tensor, weight: torch.Tensor | None, n: int) -> torch.Tensor:
    """n feature rows drawn from the valid features of all ranks; identical on every rank. x (M, C)."""
    world = dist.get_world_size() if _distributed() else 1
    return _all_gather(_draw(x, weight, math.ceil(n / world)))[:n]


VARIANTS = ("official", "soho_ds")


class VisualDictionary(nn.Module):
    # DeepSpeed keeps buffers named here in fp32 under bf16/fp16 training
    # ("keep_in_fp32_modules": "auto"); an EMA in bf16 would lose the small updates.
    _keep_in_fp32_modules_strict = ["embed", "ema_count", "ema_sum"]

    def __init__(self, num_entries: int = 2048, dim: int = 768, momentum: float = 0.99, eps: float = 1e-5,
                 init_from_data: bool = True, restart_below: float = 0.01, reservoir: int = 64,
                 variant: str = "soho_ds"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"VisualDictionary variant must be one of {VARIANTS}, got {variant!r}")
        self.official = variant == "official"
        if self.official:  # the released module has neither
            init_from_data, restart_below = False, 0.0
        self.num_entries, self.dim, self.momentum, self.eps = num_entries, dim, momentum, eps
        self.restart_below, self.reservoir_size = restart_below, reservoir
        embed = torch.randn(num_entries, dim)
        self.register_buffer("embed", embed)  # (K, C) entries e_k
        # official: the running statistics start at zero. soho_ds: as "one feature equal to the entry",
        # so e = m / n equals the initial entry until features arrive.
        self.register_buffer("ema_count", torch.zeros(num_entries) if self.official else torch.ones(num_entries))
        self.register_buffer("ema_sum", torch.zeros_like(embed) if self.official else embed.clone())  # m_k
        self.register_buffer("initialised", torch.tensor(not init_from_data))
        self.register_buffer("usage", torch.zeros(()), persistent=False)  # fraction used in the last update
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # entries re-seeded so far
        # Host-side state, so that no step reads a buffer: whether the data initialisation is still to
        # do (confirmed against the buffer by maintain()), this step's statistics until commit(), and
        # this rank's latest valid features (candidates for re-seeding).
        self._initialise = init_from_data
        self._pending: tuple[torch.Tensor, torch.Tensor] | str | None = None  # "applied": official
        self._recent: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_host_state())

    def _sync_host_state(self) -> None:
        self._initialise = not bool(self.initialised)  # a host read: at load or at maintain(), never in a step

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry for each row of x (M, C), by squared L2 distance."""
        e = self.embed
        dist2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)  # (M, K)
        return dist2.argmin(1)

    @torch.no_grad()
    def _initialise_from(self, x: torch.Tensor, weight: torch.Tensor | None, inputs_ok: torch.Tensor) -> None:
        """Every entry becomes a valid feature drawn from all ranks' batches, weighted as its share of the
        valid cells; only if every rank's batch is finite (the flag travels with the candidates)."""
        K, C = self.embed.shape
        world = dist.get_world_size() if _distributed() else 1
        per_rank = math.ceil(K / world)
        n_valid = torch.tensor(float(x.shape[0]), device=x.device) if weight is None else weight.sum()
        local = torch.cat([_draw(x, weight, per_rank),
                           torch.stack([n_valid, inputs_ok.float()]).expand(per_rank, 2)], dim=1)
        gathered = _all_gather(local)  # (world * per_rank, C + 2), identical on every rank
        candidates = gathered[:K, :C]
        flags = gathered.view(world, per_rank, C + 2)[:, 0, C:]  # (world, 2): valid cells, finite
        ok = flags[:, 1].min() > 0
        count = (flags[:, 0].sum() / K).clamp(min=1.0)
        self.embed.copy_(torch.where(ok, candidates, self.embed))
        self.ema_count.copy_(torch.where(ok, count.expand(K), self.ema_count))
        self.ema_sum.copy_(torch.where(ok, candidates * count, self.ema_sum))
        self.initialised.copy_(self.initialised | ok)

    @torch.no_grad()
    def statistics(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """This rank's per-entry feature sums and counts (K, C+1): x (M, C), index (M,), weight (M,) or None."""
        K, C = self.embed.shape
        stats = torch.zeros(K, C + 1, device=x.device, dtype=torch.float32)
        w = torch.ones_like(index, dtype=torch.float32) if weight is None else weight
        stats[:, :C].index_add_(0, index, x * w[:, None])  # s_k: sum of the valid features assigned to k
        stats[:, C].index_add_(0, index, w)  # c_k
        return stats

    @torch.no_grad()
    def update(self, stats: torch.Tensor, ok: torch.Tensor) -> None:
        """EMA update from this rank's `stats`, summed over all ranks together with the flag `ok` in one
        collective, applied only where `ok` holds on every rank (so they stay identical)."""
        K, C = self.embed.shape
        packed = torch.cat([stats.flatten(), (~ok).float().reshape(1)])
        if _distributed():
            dist.all_reduce(packed)  # sums, counts and the number of ranks with a bad step
        stats = packed[:-1].view(K, C + 1)
        ok = (packed[-1] == 0) & torch.isfinite(stats).all()
        sums, counts = stats[:, :C], stats[:, C]
        g = self.momentum
        count = torch.where(ok, self.ema_count * g + counts * (1 - g), self.ema_count)
        total = count.sum()
        smoothed = (count + self.eps) / (total + K * self.eps) * total  # Laplace smoothing
        # soho_ds: entries no feature chose this step keep their vector (with the plain formula, the
        # official one, a long-unused entry decays towards the origin and then captures stray features)
        used = ok & ((counts > 0) | self.official)
        self.ema_sum.copy_(torch.where(ok, self.ema_sum * g + sums * (1 - g), self.ema_sum))
        self.ema_count.copy_(count)
        self.embed.copy_(torch.where(used[:, None], self.ema_sum / smoothed[:, None], self.embed))
        self.usage.copy_(torch.where(ok, (counts > 0).float().mean(), self.usage))

    @torch.no_grad()
    def commit(self, ok: torch.Tensor | None = None) -> None:
        """Applies the statistics of the last training forward where `ok` (a bool tensor) holds; once
        after each training forward (SohoModel.commit calls it)."""
        if self._pending is None:
            raise RuntimeError("VisualDictionary.commit: no training forward to commit (commit once after each)")
        pending, self._pending = self._pending, None
        if pending == "applied":  # official: the forward applied its update already
            return
        stats, inputs_ok = pending
        self.update(stats, inputs_ok if ok is None else inputs_ok & ok)

    @torch.no_grad()
    def maintain(self) -> int:
        """Host-side upkeep at the trainer's logging interval, on every rank at the same step: confirms the
        data initialisation and re-seeds dead entries. Reads device values (a sync), so never per step.
        Returns the number of entries re-seeded."""
        self._sync_host_state()
        if self.restart_below <= 0 or self._recent is None or self._initialise:
            return 0
        K = self.num_entries
        total = self.ema_count.sum()
        dead = self.ema_count < self.restart_below * total / K  # identical on every rank
        n = int(dead.sum())
        if n == 0:
            return 0
        candidates = _all_gather(self._recent)  # identical on every rank
        entries = dead.nonzero().flatten()[:candidates.shape[0]]
        count = total / K
        self.embed[entries] = candidates[:len(entries)]
        self.ema_count[entries] = count
        self.ema_sum[entries] = candidates[:len(entries)] * count
        self.restarts += len(entries)
        return len(entries)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., C), valid (...) bool or None (all valid) -> (straight-through quantised x, entry index (...)).

        In training, this step's statistics wait for `commit`, and the next training forward refuses to
        run until it was called.
        """
        flat = x.detach().reshape(-1, self.dim).float()
        weight = None if valid is None else valid.reshape(-1).float()
        safe = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)  # padding may hold anything
        if self.training:
            if self._pending is not None:
                raise RuntimeError("VisualDictionary: the previous training forward's statistics were never "
                                   "committed; call commit() after each training forward")
            inputs_ok = torch.isfinite(flat if weight is None else torch.where(weight[:, None] > 0, flat, 0.0)).all()
            if self._initialise:  # at the first training batch; maintain() re-arms it if that one was bad
                self._initialise_from(safe, weight, inputs_ok)
                self._initialise = False
            if self.restart_below > 0:
                self._recent = _draw(safe, weight, self.reservoir_size)
        index = self.assign(safe)
        if self.training and self.official:  # the entry after this step's update is returned
            self.update(self.statistics(safe, index, weight), inputs_ok)
            self._pending = "applied"
        elif self.training:
            self._pending = (self.statistics(safe, index, weight), inputs_ok)
        quantised = self.embed[index].view_as(x).to(x.dtype)
        # Straight-through: forward value is the entry, gradient flows to x unchanged.
        return x + (quantised - x).detach(), index.view(x.shape[:-1])
