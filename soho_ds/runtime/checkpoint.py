"""Checkpoints through the engine's own save/load (ZeRO shards, optimizer, scheduler, buffers).

Every rank calls both functions (DeepSpeed hangs if only rank 0 does). The engine writes its
`latest` file only after the whole tag is saved, so an interrupted save is never resumed
from. Extra state (step, RNG streams) travels in `client_state`; the resolved run config is
saved beside each tag.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, run_config: dict) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **client_state})
    if engine.global_rank == 0:
        (ckpt_dir / tag / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    log.info("saved checkpoint %s", ckpt_dir / tag)
    return ckpt_dir / tag


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / "latest"
    return path.read_text().strip() if path.exists() else None


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Loads the latest complete checkpoint into `engine`; returns its client state, or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: checkpoint named by 'latest' could not be loaded")
    log.info("resumed from %s at step %d", Path(ckpt_dir) / tag, client_state["step"])
    return client_state


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state[k])
