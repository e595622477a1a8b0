"""Checkpoints through the engine's own save/load (ZeRO shards, optimizer, scheduler, buffers).

Every rank calls `save` and `resume` (DeepSpeed hangs if only rank 0 does). A tag is complete
when every rank has written its engine shards and its own `rank_<rank>.pt` (RNG streams
and data-loader position), all ranks have met at a barrier, and rank 0 has written `meta.json`;
only then does rank 0 point `latest` at it (atomically, by rename). A run killed at any
moment therefore resumes from the last complete tag, never from a half-written one.

A checkpoint written at one world size resumes at another through DeepSpeed's universal
checkpoint: `prepare_resume` converts the tag once (`ds_to_universal`) and switches the
engine config to `load_universal` before the engine is built.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(engine, ckpt_dir: str | Path, step: int, rank_state: dict, run_config: dict) -> Path:
    """Writes the tag `tag_for(step)`; `rank_state` is this rank's own (RNG streams, data position)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    rank, world = engine.global_rank, engine.world_size
    torch.save(rank_state, _rank_file(ckpt_dir / tag, rank))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        (ckpt_dir / tag / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        (ckpt_dir / tag / "meta.json").write_text(json.dumps({"step": step, "world_size": world}))
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")  # the commit point
    _barrier()
    log.info("saved checkpoint %s", ckpt_dir / tag)
    return ckpt_dir / tag


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / "latest"
    return path.read_text().strip() if path.exists() else None


def saved_world_size(ckpt_dir: str | Path, tag: str) -> int:
    meta = Path(ckpt_dir) / tag / "meta.json"
    if not meta.exists():
        raise RuntimeError(f"{meta}: missing, so {tag} is not a complete soho-ds checkpoint")
    return json.loads(meta.read_text())["world_size"]


def prepare_resume(ckpt_dir: str | Path, ds_config: dict, world_size: int, rank: int) -> dict:
    """Before the engine exists: if the latest checkpoint was written at another world size,
    converts it to DeepSpeed's universal format (rank 0, once) and returns a DeepSpeed config
    that loads it; otherwise returns `ds_config` unchanged."""
    tag = latest_tag(ckpt_dir)
    if tag is None or saved_world_size(ckpt_dir, tag) == world_size:
        return ds_config
    src, dst = Path(ckpt_dir) / tag, Path(ckpt_dir) / f"{tag}_universal"
    if rank == 0 and not (dst / "zero").exists():
        log.info("%s was written by %d ranks, resuming on %d: converting to a universal checkpoint in %s",
                 src, saved_world_size(ckpt_dir, tag), world_size, dst)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(dst), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{src}: conversion to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    _barrier()
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def resume(engine, ckpt_dir: str | Path) -> tuple[dict, dict | None] | None:
    """Loads the latest complete checkpoint into `engine`. Returns (client state, this rank's own
    state or None when the world size changed), or None when there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
        return None
    universal = engine.load_universal_checkpoint()
    load_tag = f"{tag}_universal" if universal else tag
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{load_tag}: checkpoint named by 'latest' could not be loaded")
    rank_file = _rank_file(ckpt_dir / tag, engine.global_rank)
    own = None if universal else torch.load(rank_file, weights_only=False)
    if universal:
        client_state = {"step": engine.global_steps}
        log.info("resumed from %s at step %d on a new world size of %d: weights, optimizer moments and step "
                 "kept; the data order restarts", ckpt_dir / load_tag, engine.global_steps, engine.world_size)
    else:
        log.info("resumed from %s at step %d", ckpt_dir / tag, client_state["step"])
    return client_state, own


def state_digest(engine) -> dict[str, float]:
    """Sums of the fp32 master weights and both Adam moments over every rank's ZeRO partition
    (collective: every rank calls it). Logged at each save and resume: equal digests (up to
    summation order) show that a resume, also at another world size, restored the weights and
    the optimizer moments. Partition padding is zero and adds nothing."""
    opt = engine.optimizer
    sums = torch.zeros(3, dtype=torch.float64)
    for flat in opt.single_partition_of_fp32_groups:
        state = opt.optimizer.state.get(flat, {})
        sums += torch.stack([flat.detach().double().sum().cpu()] + [
            state[k].double().sum().cpu() if k in state else torch.zeros((), dtype=torch.float64)
            for k in ("exp_avg", "exp_avg_sq")])
    if dist.is_initialized() and dist.get_world_size() > 1:
        sums = sums.to(engine.device)
        dist.all_reduce(sums)
    return dict(zip(("weights", "exp_avg", "exp_avg_sq"), sums.tolist()))


def format_digest(digest: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.12e}" for k, v in digest.items())


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state[k])
