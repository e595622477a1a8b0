"""Checked weight loading: every key and shape compared, whatever is skipped named, nothing
non-finite accepted."""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an infinity."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def load_checked(module: nn.Module, state: dict, source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Loads `state` into `module` after checking every key, shape and value; names what it skipped."""
    own = module.state_dict()
    ignored = sorted(k for k in state if k.startswith(ignore_prefixes)) if ignore_prefixes else []
    state = {k: v for k, v in state.items() if k not in ignored}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    bad = non_finite(state)
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:5])}); "
                         "this checkpoint was saved from a diverged run: use an earlier one")
    module.load_state_dict(state)
    if ignored:
        log.info("%s: loaded; ignored %d keys not used here (%s...)", source, len(ignored), ignored[0])
