"""Finetune entry shared by the four drivers: task data first (it sizes the head), then model,
engine and the one trainer."""
from __future__ import annotations

import argparse
import logging

from soho_ds.pretrain.run import add_run_arguments, seed_rank, setup_run
from soho_ds.runtime.dist import fail_fast_on_peer_loss
from soho_ds.runtime.engine import build_engine
from soho_ds.runtime.trainer import Trainer
from soho_ds.tasks.nlvr2 import NLVR2Task
from soho_ds.tasks.retrieval import RetrievalTask
from soho_ds.tasks.snli_ve import SNLIVETask
from soho_ds.tasks.vqa import VQATask

log = logging.getLogger(__name__)

TASKS = {"retrieval": RetrievalTask, "vqa": VQATask, "nlvr2": NLVR2Task, "snli_ve": SNLIVETask}


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--init", help="pretraining checkpoint: DeepSpeed checkpoint folder, one tag, or .pt")
    parser.add_argument("--eval_only", action="store_true", help="evaluate --init (or the resumed run) and stop")
    return add_run_arguments(parser)


def finetune(args: argparse.Namespace, task_name: str) -> dict[str, float]:
    cfg, ds, dist_info, logger = setup_run(args)
    if cfg.task.name != task_name:
        raise SystemExit(f"{args.config}: task.name is {cfg.task.name!r}, this driver finetunes {task_name!r}")
    task = TASKS[task_name](cfg, dist_info, ds["train_micro_batch_size_per_gpu"])
    module = task.make_model()
    if args.init:
        module.load_pretrained(args.init)
    else:
        log.info("no --init: finetuning from the random initialisation")
    engine = build_engine(module, cfg.train, ds)
    seed_rank(cfg, dist_info)
    trainer = Trainer(engine, task, cfg, logger, dist_info)
    with fail_fast_on_peer_loss(dist_info.rank, cfg.train.collective_timeout_s):
        metrics = trainer.evaluate(engine.global_steps) if args.eval_only else trainer.fit(resume=args.resume)
    chance, blind = task.chance(), task.blind_baselines()

    def reference_levels(k: str) -> str:
        return f"chance {chance[k]:.2f}" + (f", text-only prior {blind[k]:.2f}" if k in blind else "")

    log.info("%s: %s", task_name, "  ".join(f"{k} {metrics[k]:.2f} ({reference_levels(k)})"
                                            for k in sorted(metrics) if k in chance))
    return metrics
