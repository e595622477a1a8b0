"""Pretraining entry: every input checked, ranks joined, model and engine built, the one trainer run."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from soho_ds.models.soho import count_parameters
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.pretrain.task import PretrainTask, check_shards
from soho_ds.runtime.dist import fail_fast_on_peer_loss
from soho_ds.runtime.engine import build_engine
from soho_ds.runtime.run import RunOptions, prepare, schedule_in_steps, seed_rank
from soho_ds.runtime.trainer import StepHooks, Trainer

log = logging.getLogger(__name__)


def warn_about_random_start(cfg) -> None:
    """SOHO starts from ImageNet ResNet weights and bert-base-uncased: a run without them says so."""
    m = cfg.model
    if m.backbone_weights is None:
        log.warning("%s: model.backbone_weights is null: the %s starts from random weights (SOHO starts from "
                    "torchvision's ImageNet weights: set it to their local .pth)", cfg.source, m.backbone)
    if m.bert_dir is None:
        log.warning("%s: model.bert_dir is null: the transformer starts from random weights (SOHO starts from "
                    "bert-base-uncased: set it to a local folder with its config.json and weights)", cfg.source)


def pretrain(config: str | Path, deepspeed_config: str | Path | dict, *, overrides: Sequence[str] = (),
             resume: str | None = None, restart: bool = False, precision: str = "auto",
             hooks: StepHooks | None = None) -> dict[str, float]:
    """Pretrains as `deepspeed launch/pretrain.py` does (that launcher parses its command line into these
    arguments; see RunOptions for each). Every rank calls it; returns the last held-out evaluation.
    `hooks`: attached to every step (runtime.trainer.StepHooks: counters, runtime.faults)."""
    options = RunOptions(config, deepspeed_config, tuple(overrides), resume, restart, precision)
    run = prepare(options, check=check_shards)
    unit = run.cfg.train.epoch_unit
    counts = [source.caption_groups if unit == "caption_groups" else source.samples for source in run.checked["train"]]
    cfg, dist_info = schedule_in_steps(run.cfg, None if None in counts else sum(counts), run.ds, unit), run.dist
    module = SohoPretrainer(cfg.model, cfg.pretrain, cfg.semantic)
    log.info("model: %s parameters, %s backbone, %d-layer transformer, K=%d", count_parameters(module),
             cfg.model.backbone, cfg.model.num_layers, cfg.model.vd_size)
    warn_about_random_start(cfg)
    engine = build_engine(module, cfg.train, run.ds, cfg.model.backbone_norm)
    seed_rank(cfg, dist_info)
    task = PretrainTask(cfg, dist_info, engine.train_micro_batch_size_per_gpu(), module.model.stride, run.checked)
    with fail_fast_on_peer_loss(dist_info.rank, cfg.train.collective_timeout_s):
        metrics = Trainer(engine, task, cfg, run.logger, dist_info, hooks).fit(resume=run.resume)
    if "acc/itm" in metrics:
        log.info("held-out ITM accuracy %.3f (chance 0.500 with %.0f%% negatives), MLM accuracy %.3f",
                 metrics["acc/itm"], 100 * cfg.pretrain.itm_neg_prob, metrics["acc/mlm"])
    return metrics
