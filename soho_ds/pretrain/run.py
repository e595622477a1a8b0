"""Pretraining entry: validate configs, join the process group, build model and engine, train."""
from __future__ import annotations

import argparse
import logging

import deepspeed
import torch
import yaml

from soho_ds.models.soho import count_parameters
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.pretrain.task import PretrainTask
from soho_ds.runtime import checkpoint
from soho_ds.runtime.config import load_config, load_ds_config, resolve_batch
from soho_ds.runtime.dist import fail_fast_on_peer_loss, init_distributed
from soho_ds.runtime.engine import PRECISIONS, build_engine, resolve_precision
from soho_ds.runtime.log import RunLogger, setup_console
from soho_ds.runtime.trainer import Trainer

log = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every driver shares; DeepSpeed adds --deepspeed_config itself."""
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: the JSON's choice on GPU, bf16 instead of fp16 on CPU")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return deepspeed.add_config_arguments(parser)


def setup_run(args: argparse.Namespace):
    """Everything before the model: configs checked (before any process group), ranks joined."""
    cfg = load_config(args.config, args.set)
    if not args.deepspeed_config:
        raise SystemExit("--deepspeed_config is required (e.g. ds_configs/zero2.json)")
    ds = load_ds_config(args.deepspeed_config)
    dist_info = init_distributed(cfg.train.collective_timeout_s)
    setup_console(dist_info.rank, dist_info.world_size, dist_info.local_rank)
    ds = resolve_batch(ds, dist_info.world_size, args.deepspeed_config)
    ds = resolve_precision(ds, dist_info.device.type, args.precision)
    if args.resume:
        ds = checkpoint.prepare_resume(f"{cfg.train.output_dir}/checkpoints", ds, dist_info.world_size,
                                       dist_info.rank)
    logger = RunLogger(f"{cfg.train.output_dir}/tensorboard", dist_info.rank)
    logger.text("config/run", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```")
    logger.text("config/deepspeed", "```\n" + yaml.safe_dump(ds, sort_keys=False) + "\n```")
    # Same seed on every rank while building the model: buffers such as the VD table are
    # not broadcast by the engine, so they must start identical.
    torch.manual_seed(cfg.train.seed)
    return cfg, ds, dist_info, logger


def seed_rank(cfg, dist_info) -> None:
    """After the model exists: per-rank streams for augmentation-like randomness (MVM choice, dropout)."""
    torch.manual_seed(cfg.train.seed + 1 + dist_info.rank)


def pretrain(args: argparse.Namespace) -> dict[str, float]:
    cfg, ds, dist_info, logger = setup_run(args)
    module = SohoPretrainer(cfg.model, cfg.pretrain, cfg.semantic)
    if dist_info.device.type == "cuda" and dist_info.world_size > 1:
        # Before deepspeed.initialize, which casts the module to the compute dtype.
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    log.info("model: %s parameters, %s backbone, %d-layer transformer, K=%d", count_parameters(module),
             cfg.model.backbone, cfg.model.num_layers, cfg.model.vd_size)
    engine = build_engine(module, cfg.train, ds)
    seed_rank(cfg, dist_info)
    task = PretrainTask(cfg, dist_info, engine.train_micro_batch_size_per_gpu())
    with fail_fast_on_peer_loss(dist_info.rank, cfg.train.collective_timeout_s):
        metrics = Trainer(engine, task, cfg, logger, dist_info).fit(resume=args.resume)
    if "acc/itm" in metrics:
        log.info("held-out ITM accuracy %.3f (chance 0.500 with %.0f%% negatives), MLM accuracy %.3f",
                 metrics["acc/itm"], 100 * cfg.pretrain.itm_neg_prob, metrics["acc/mlm"])
    return metrics
