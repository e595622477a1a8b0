"""Checked weight loading: every key and shape compared, whatever is skipped named, nothing
non-finite accepted."""
from __future__ import annotations

import logging
import pickle

import torch
from torch import nn

from soho_ds.config import ReportedError

log = logging.getLogger(__name__)


class WeightsError(ReportedError, ValueError):
    """Weights that cannot be read or do not fit, named with the file and what it holds instead."""


def read_state_dict(path: str, setting: str) -> dict:
    """A state dict saved with torch.save (tensors only: nothing pickled runs); refused naming the setting."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{setting}: {path} does not exist") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # not torch's, or objects
        raise WeightsError(f"{setting}: {path} is not a plain torch state dict ({str(e).splitlines()[0][:160]})"
                           ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{setting}: {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def what_it_holds(keys: list[str]) -> str:
    """A guess at what a state dict with these keys is, for an error message."""
    if any(k.startswith("model.backbone.") for k in keys):
        return "a soho-ds model (keys model.backbone.*, model.fusion.*): start from it with --init"
    if any(k.startswith(("layer1.", "conv1.")) for k in keys):
        return "a torchvision ResNet (keys conv1.*, layer1.*): give it as model.backbone_weights"
    return f"keys such as {keys[:3]}"


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
    if own and not set(own) & set(state):
        raise WeightsError(f"{source}: none of its {len(state)} weights belongs to this model; it looks like "
                           f"{what_it_holds(sorted(state))}")
    if missing or unexpected or shapes:
        raise WeightsError(f"{source}: weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    bad = non_finite(state)
    if bad:
        raise WeightsError(f"{source}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:5])}); "
                         "this checkpoint was saved from a diverged run: use an earlier one")
    module.load_state_dict(state)
    if ignored:
        log.info("%s: loaded; ignored %d keys not used here (%s...)", source, len(ignored), ignored[0])
