"""What every driver (pretraining, each finetune) shares before its model exists: its options,
every input checked before any process group, the output folder's policy, the process group,
console and TensorBoard, and the seeds.

Order matters: the YAML, the DeepSpeed JSON (through DeepSpeed's own config model), the batch
arithmetic for the launched world size and the output folder are all checked first, on every
rank, so a broken input costs seconds, not a model build.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from soho_ds import saved
from soho_ds.config import ConfigError, RunConfig, load_config
from soho_ds.runtime import checkpoint
from soho_ds.runtime.dist import DistInfo, init_distributed
from soho_ds.runtime.engine import (PRECISIONS, load_ds_config, resolve_batch, resolve_precision, validate_ds_config,
                                    with_gradient_clipping)
from soho_ds.runtime.log import HISTORY, RunLogger, setup_console
from soho_ds.seeds import derive

log = logging.getLogger(__name__)

# Settings a resumed run takes from the restored optimizer and scheduler state, not from the YAML.
RESTORED_BY_RESUME = ("lr", "cnn_lr_mult", "head_lr_mult", "weight_decay", "betas", "eps", "cnn_optimizer",
                      "cnn_momentum", "cnn_weight_decay")


RESUME = (None, "yes", "auto")  # no resume; resume (a checkpoint must exist); resume if there is one


@dataclass(frozen=True)
class RunOptions:
    """How a driver runs: what a launcher's command line says, typed (launch/cli.py parses it)."""
    config: str | Path  # the run config YAML
    deepspeed_config: str | Path | dict  # the DeepSpeed JSON, or its contents
    overrides: tuple[str, ...] = ()  # "key=value" on top of the YAML, e.g. "train.max_steps=100"
    resume: str | None = None  # one of RESUME
    restart: bool = False  # start over in an output_dir that holds a run (its files move to previous/)
    precision: str = "auto"  # one of runtime.engine.PRECISIONS

    def __post_init__(self):
        if self.resume not in RESUME:
            raise ConfigError(f"resume must be one of {RESUME}, got {self.resume!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclass
class Run:
    cfg: RunConfig
    ds: dict  # the DeepSpeed config the engine gets
    dist: DistInfo
    logger: RunLogger
    resume: bool  # load the latest checkpoint of output_dir
    checked: object = None  # what the driver's `check(cfg)` returned (pretraining: its shards, checked once)


PREVIOUS_RUN = ("checkpoints", "tensorboard", "train.jsonl", "eval.jsonl", HISTORY)


def check_output_dir(cfg: RunConfig, resume: str | None, restart: bool) -> bool:
    """Applies the output folder's policy; returns whether to resume. Nothing is overwritten unasked:
    a folder holding checkpoints needs --resume or --restart; --resume needs a checkpoint."""
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    latest = checkpoint.latest_tag(ckpt_dir)
    has_run = latest is not None or any(ckpt_dir.glob("step_*"))
    if resume and restart:
        raise ConfigError("--resume and --restart contradict each other")
    if resume == "yes" and latest is None:
        incomplete = sorted(p.name for p in ckpt_dir.glob(f"step_*{checkpoint.PARTIAL}"))
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir}"
                          + (f" ({', '.join(incomplete)} never finished writing)" if incomplete else "")
                          + " (is train.output_dir right? '--resume auto' starts a new run when there is none)")
    if not resume and has_run and not restart:
        raise ConfigError(f"{cfg.source}: train.output_dir {cfg.train.output_dir} already holds a run "
                          f"(latest checkpoint: {latest or 'none complete'}); continue it with --resume, or start "
                          f"over with --restart (its files move to {cfg.train.output_dir}/previous/)")
    return latest is not None and resume is not None


def move_previous_run(output_dir: str) -> Path | None:
    """Moves an earlier run's checkpoints and logs aside (never deleting them); returns where to."""
    out = Path(output_dir)
    present = [out / name for name in PREVIOUS_RUN if (out / name).exists()]
    if not present:
        return None
    dest = out / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(dest / path.name))
    return dest


def warn_about_restored_settings(cfg: RunConfig, ckpt_dir: Path) -> None:
    """A resumed run keeps the optimizer's and scheduler's saved learning rates: says so where the YAML
    now asks for something else. Schedule shape (warm-up, decay, max_steps) follows the YAML."""
    tree = saved.read(ckpt_dir).config_tree
    if tree is None:
        return
    before = (tree.get("train") or {})
    now = cfg.to_dict()["train"]
    for key in RESTORED_BY_RESUME:
        old, new = before.get(key), now[key]
        if old is not None and (list(old) if isinstance(old, (list, tuple)) else old) != (
                list(new) if isinstance(new, (list, tuple)) else new):
            log.warning("train.%s is %r in %s but the checkpoint was trained with %r: the restored optimizer and "
                        "schedule keep %r (start a new run with --init to change it)", key, new, cfg.source, old, old)
    for key in ("warmup_steps", "lr_decay", "max_steps"):
        if key == "max_steps" and now["epochs"] > 0:  # a budget in epochs is turned into steps after this
            continue
        if before.get(key) is not None and before[key] != now[key]:
            log.warning("train.%s changed from %r to %r: the learning-rate schedule follows the new value from the "
                        "next step", key, before[key], now[key])


def prepare(options: RunOptions, checkpoint_config: tuple[dict, str] | None = None,
            check=None, evaluate_only: bool = False) -> Run:
    """Everything before the model: all inputs checked (before any process group), ranks joined.
    `check(cfg)` adds a driver's own checks (shards, task files) at the same point. An evaluation
    writes no checkpoint, so it may run in a folder that holds one."""
    cfg = load_config(options.config, list(options.overrides), checkpoint_config)
    if not options.deepspeed_config:
        raise ConfigError("--deepspeed_config is required (e.g. ds_configs/zero2.json)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_source = options.deepspeed_config if not isinstance(options.deepspeed_config, dict) else "deepspeed_config"
    ds = resolve_batch(load_ds_config(options.deepspeed_config), world, ds_source)
    json_clipping = ds.get("gradient_clipping")
    ds = with_gradient_clipping(ds, cfg.train.gradient_clipping)
    validate_ds_config(ds, ds_source)
    checked = check(cfg) if check is not None else None
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    resume = (check_output_dir(cfg, options.resume, options.restart) if not evaluate_only
              else bool(options.resume) and checkpoint.latest_tag(ckpt_dir) is not None)
    dist_info = init_distributed(cfg.train.collective_timeout_s)
    setup_console(dist_info.rank, dist_info.world_size, dist_info.local_rank)
    if options.restart and dist_info.is_main and (moved := move_previous_run(cfg.train.output_dir)):
        log.info("--restart: the earlier run's files are now in %s", moved)
    if torch.distributed.is_initialized() and dist_info.world_size > 1:
        torch.distributed.barrier()  # the earlier run is out of the way on every rank's view
    ds = resolve_precision(ds, dist_info.device.type, options.precision)
    if cfg.train.gradient_clipping is not None and cfg.train.gradient_clipping != json_clipping:
        log.info("gradient clipping at %g (train.gradient_clipping; %s says %s)", cfg.train.gradient_clipping,
                 ds_source, json_clipping)
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    if resume:
        warn_about_restored_settings(cfg, ckpt_dir)
        ds = checkpoint.prepare_resume(ckpt_dir, ds, dist_info.world_size, dist_info.rank)
    elif options.resume == "auto":
        log.info("--resume auto: no checkpoint in %s, starting a new run", ckpt_dir)
    logger = RunLogger(f"{cfg.train.output_dir}/tensorboard", dist_info.rank)
    logger.text("config/run", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```")
    logger.text("config/deepspeed", "```\n" + yaml.safe_dump(ds, sort_keys=False) + "\n```")
    # Same seed on every rank while building the model: buffers such as the VD table are
    # not broadcast by the engine, so they must start identical.
    torch.manual_seed(derive(cfg.train.seed, "init"))
    return Run(cfg, ds, dist_info, logger, resume, checked)


def schedule_in_steps(cfg: RunConfig, samples: int | None, ds: dict, unit: str = "samples") -> RunConfig:
    """The run config with train.epochs (budget, milestones) turned into optimizer steps of the global
    batch (where the budget is in steps, only a warm-up ratio is turned into steps). `samples`: what one
    epoch holds, counted in `unit`."""
    train = cfg.train.in_steps(samples, ds["train_batch_size"], cfg.source)  # a warm-up ratio applies either way
    if cfg.train.epochs <= 0:
        return dataclasses.replace(cfg, train=train)
    log.info("train.epochs %g of %d %s at a global batch of %d: %d steps%s", cfg.train.epochs, samples,
             unit.replace("_", " "), ds["train_batch_size"], train.max_steps,
             f", learning-rate milestones at steps {', '.join(str(int(m)) for m in train.lr_milestones)}"
             if train.lr_milestones else "")
    return dataclasses.replace(cfg, train=train)


def seed_rank(cfg: RunConfig, dist_info: DistInfo) -> None:
    """After the model exists: per-rank streams for augmentation-like randomness (MVM choice, dropout)."""
    torch.manual_seed(derive(cfg.train.seed, "torch", dist_info.rank))
