"""Checkpoints through the engine's own save/load (ZeRO shards, optimizer, scheduler, buffers).

Every rank calls `save` and `resume` (DeepSpeed hangs if only rank 0 does). A tag is written
under a temporary name (`step_N.partial`): every rank writes its engine shards and its own
`rank_<rank>.pt` (RNG streams and data-loader position), the ranks agree that all writes
succeeded, rank 0 adds the run config, any task files and `meta.json`, renames the folder to
`step_N` and only then points `latest` at it (atomically, by rename). A checkpoint is therefore
complete or absent: a run killed, or a disk that fills, at any moment leaves the last complete
tag as `latest`. Nothing non-finite is ever written, and nothing non-finite is loaded.

A checkpoint written at one world size resumes at another through DeepSpeed's universal
checkpoint: `prepare_resume` converts the tag once (`ds_to_universal`) and switches the
engine config to `load_universal` before the engine is built.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from soho_ds.config import ReportedError
from soho_ds.models.weights import non_finite
from soho_ds.runtime.dist import host_group
from soho_ds.saved import RUN_CONFIG, latest_tag

log = logging.getLogger(__name__)



class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint that is missing, incomplete or unsafe to load or write."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


PARTIAL = ".partial"  # a tag being written; never loaded


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def module_non_finite(module: torch.nn.Module) -> list[str]:
    """Parameters and buffers of `module` holding NaN or infinity (collective-free; host sync)."""
    return non_finite({**dict(module.named_parameters()), **dict(module.named_buffers())})


def save(engine, ckpt_dir: str | Path, step: int, rank_state: dict, run_config: dict,
         files: dict[str, str] | None = None, meta: dict | None = None) -> Path:
    """Writes the tag `tag_for(step)`; `rank_state` is this rank's own (RNG streams, data position),
    `files` (name -> text) are written beside the run config by rank 0 (e.g. the VQA answers), `meta`
    (the same on every rank, e.g. the run's image counts) into meta.json, which outlives a world-size change.
    Refuses, on every rank alike, to write weights or buffers that are not finite."""
    bad = module_non_finite(engine.module)
    flag = torch.tensor([float(bool(bad))], device=engine.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    if flag.item():
        where = ", ".join(bad[:5]) or "on another rank"
        raise CheckpointError(f"not saving step {step}: non-finite weights or buffers ({where}); the last good "
                              f"checkpoint is {latest_tag(ckpt_dir) or 'none'} in {ckpt_dir}")
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    partial = ckpt_dir / (tag + PARTIAL)
    rank, world = engine.global_rank, engine.world_size
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a run stopped while writing it: never committed
    _barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, _rank_file(partial, rank))
        if rank == 0:
            (partial / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
            for name, text in (files or {}).items():
                (partial / name).write_text(text)
            (partial / "meta.json").write_text(json.dumps({**(meta or {}), "step": step, "world_size": world}))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos")
        error = e
    failed = torch.tensor([float(error is not None)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, group=host_group())
    if failed.item():
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise _write_error(partial, error, int(failed.item()), ckpt_dir)
    if rank == 0:
        if (ckpt_dir / tag).exists():  # of a later branch abandoned when `latest` was pointed back at an earlier tag
            shutil.rmtree(ckpt_dir / tag)
        os.replace(partial, ckpt_dir / tag)
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")  # the commit point
    _barrier()
    log.info("saved checkpoint %s", ckpt_dir / tag)
    return ckpt_dir / tag


def _write_error(partial: Path, error: BaseException | None, ranks_failed: int, ckpt_dir: Path) -> CheckpointError:
    """Names the checkpoint that could not be written, why, and the space left where it was going."""
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    why = (f"{getattr(error, 'filename', None) or partial}: {str(error).splitlines()[0] if str(error) else error!r}"
           if error is not None else "the write failed on another rank")
    return CheckpointError(f"could not write checkpoint {partial.with_suffix('')} ({ranks_failed} rank(s) failed; "
                           f"{why}); {free} on {ckpt_dir}. The incomplete tag was removed; the last complete "
                           f"checkpoint is {latest_tag(ckpt_dir) or 'none'}. Free space or move train.output_dir, "
                           "then --resume")


BEST = "best"


def mark_best(ckpt_dir: str | Path, step: int, metric: str, value: float) -> None:
    """Names `tag_for(step)` the best checkpoint so far (checkpoints/best), its score in best.json."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / "best.json.tmp"
    tmp.write_text(json.dumps({"tag": tag_for(step), "step": step, "metric": metric, "value": value}))
    os.replace(tmp, ckpt_dir / "best.json")
    tmp = ckpt_dir / "best.tmp"
    tmp.write_text(tag_for(step))
    os.replace(tmp, ckpt_dir / BEST)


def best_record(ckpt_dir: str | Path) -> dict | None:
    path = Path(ckpt_dir) / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def saved_meta(ckpt_dir: str | Path, tag: str) -> dict:
    """A checkpoint's meta.json: step, world size and what the run passed to `save` as `meta`."""
    meta = Path(ckpt_dir) / tag / "meta.json"
    if not meta.exists():
        raise CheckpointError(f"{meta}: missing, so {tag} is not a complete soho-ds checkpoint")
    return json.loads(meta.read_text())


def saved_world_size(ckpt_dir: str | Path, tag: str) -> int:
    return saved_meta(ckpt_dir, tag)["world_size"]


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
            raise CheckpointError(f"{src}: conversion to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    _barrier()
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def resume(engine, ckpt_dir: str | Path) -> tuple[dict, dict | None]:
    """Loads the latest complete checkpoint into `engine`. Returns (client state, this rank's own
    state or None when the world size changed). Refuses a checkpoint with non-finite values."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        incomplete = sorted(p.name for p in ckpt_dir.glob(f"step_*{PARTIAL}"))
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to resume from"
                              + (f" ({', '.join(incomplete)} never finished writing)" if incomplete else ""))
    universal = engine.load_universal_checkpoint()
    load_tag = f"{tag}_universal" if universal else tag
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}/{load_tag}: checkpoint named by 'latest' could not be loaded")
    bad = module_non_finite(engine.module)
    if bad:
        raise CheckpointError(f"{ckpt_dir}/{load_tag}: {len(bad)} tensors hold NaN or infinite values "
                              f"({', '.join(bad[:5])}); resume from an earlier tag (edit {ckpt_dir}/latest)")
    rank_file = _rank_file(ckpt_dir / tag, engine.global_rank)
    own = None if universal else torch.load(rank_file, weights_only=True)  # tensors, strings, numbers only
    if universal:
        client_state = {"step": engine.global_steps}
        log.info("resumed from %s at step %d on a new world size of %d: weights, optimizer moments and step "
                 "kept; the data order restarts", ckpt_dir / load_tag, engine.global_steps, engine.world_size)
    else:
        log.info("resumed from %s at step %d", ckpt_dir / tag, client_state["step"])
    return client_state, own


def state_digest(engine) -> dict[str, float]:
    """Sums of the fp32 master weights (DeepSpeed's public `safe_get_full_fp32_param`) and of each
    optimizer state (Adam moments, SGD momentum) held by this run's own client optimizer over its
    ZeRO partitions, all ranks together (collective: every rank calls it). Logged at each save and
    resume: equal digests (up to summation order; partition padding is zero) show that a resume,
    also at another world size, restored the weights and the optimizer state."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = sum(safe_get_full_fp32_param(p).double().sum().item()
                  for p in engine.module.parameters() if p.requires_grad)
    keys = ("exp_avg", "exp_avg_sq", "momentum_buffer")
    local = torch.zeros(len(keys), dtype=torch.float64)
    for state in engine.basic_optimizer.state.values():
        for i, key in enumerate(keys):
            if torch.is_tensor(state.get(key)):
                local[i] += state[key].double().sum().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = local.to(engine.device)
        dist.all_reduce(local)
    return {"weights": weights, **dict(zip(keys, local.tolist()))}


def format_digest(digest: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.12e}" for k, v in digest.items())


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state[k])
