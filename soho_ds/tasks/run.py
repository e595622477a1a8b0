"""Finetune entry shared by the four drivers: inputs checked (the checkpoint's model config
included), task data read and its images checked (it sizes the head), then model, engine and
the one trainer."""
from __future__ import annotations

import argparse
import contextlib
import logging

from soho_ds import saved
from soho_ds.config import ConfigError, RunConfig
from soho_ds.models.weights import WeightsError
from soho_ds.runtime.dist import fail_fast_on_peer_loss
from soho_ds.runtime.engine import build_engine
from soho_ds.runtime.run import add_run_arguments, prepare, seed_rank
from soho_ds.runtime.trainer import Trainer
from soho_ds.tasks import TASKS
from soho_ds.tasks.base import AnnotationError

log = logging.getLogger(__name__)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--init", help="checkpoint to start from: a DeepSpeed checkpoint folder, one tag, a "
                                       "consolidated .pt or an export folder; its model config is used")
    parser.add_argument("--eval_only", action="store_true", help="evaluate --init (or the resumed run) and stop")
    return add_run_arguments(parser)


def finetune(args: argparse.Namespace, task_name: str, step_context=contextlib.nullcontext) -> dict[str, float]:
    """`step_context`: see Trainer (the tests count what a step does through it)."""
    task_cls = TASKS[task_name]
    init = saved.read(args.init) if args.init else None
    init_config = (init.config_tree, str(init.config_file)) if init and init.config_tree is not None else None
    if init and init_config is None:
        log.warning("%s has no %s beside it: the model is built from %s's model section", args.init,
                    saved.RUN_CONFIG, args.config)

    def check(cfg: RunConfig) -> None:
        if cfg.task.name != task_name:
            raise ConfigError(f"{cfg.source}: task.name is {cfg.task.name!r}, this driver finetunes {task_name!r} "
                              f"(tasks: {', '.join(TASKS)})")
        if not args.eval_only and not cfg.task.train_file:
            raise ConfigError(f"{cfg.source}: task.train_file is required to finetune (or pass --eval_only)")

    run = prepare(args, init_config, check, evaluate_only=args.eval_only)
    cfg, dist_info = run.cfg, run.dist
    task = task_cls(cfg, dist_info, run.ds["train_micro_batch_size_per_gpu"], args.init)
    if not args.eval_only and not task.train_examples:
        raise AnnotationError(f"{cfg.task.train_file}: no training examples (for vqa: task.train_answers too)")
    task.check_sizes(training=not args.eval_only)
    module = task.make_model()
    if init:
        try:
            module.load_pretrained(init, same_task=init.task == task_name)
        except WeightsError as e:
            if init_config is not None:
                raise
            raise WeightsError(f"{e} (the model was built from {args.config}'s model section: {args.init} has no "
                               f"{saved.RUN_CONFIG} beside it)") from None
    else:
        log.info("no --init: finetuning from the random initialisation")
    engine = build_engine(module, cfg.train, run.ds, cfg.model.backbone_norm)
    seed_rank(cfg, dist_info)
    trainer = Trainer(engine, task, cfg, run.logger, dist_info, step_context)
    with fail_fast_on_peer_loss(dist_info.rank, cfg.train.collective_timeout_s):
        if args.eval_only:
            if run.resume:
                trainer.restore()
            metrics = trainer.evaluate(engine.global_steps)
        else:
            metrics = trainer.fit(resume=run.resume)
    chance, blind = task.chance(), task.blind_baselines()

    def reference_levels(k: str) -> str:
        return f"chance {chance[k]:.2f}" + (f", text-only prior {blind[k]:.2f}" if k in blind else "")

    log.info("%s: %s", task_name, "  ".join(f"{k} {metrics[k]:.2f} ({reference_levels(k)})"
                                            for k in sorted(metrics) if k in chance))
    return metrics
