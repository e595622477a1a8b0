"""Finetune entry shared by the four drivers: inputs checked (the checkpoint's model config
included), task data read and its images checked (it sizes the head), then model, engine and
the one trainer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from soho_ds import saved
from soho_ds.config import ConfigError, RunConfig
from soho_ds.models.weights import WeightsError
from soho_ds.runtime.dist import fail_fast_on_peer_loss
from soho_ds.runtime.engine import build_engine
from soho_ds.runtime.run import RunOptions, prepare, schedule_in_steps, seed_rank
from soho_ds.runtime.trainer import StepHooks, Trainer
from soho_ds.tasks import TASKS
from soho_ds.tasks.base import AnnotationError

log = logging.getLogger(__name__)


def finetune(task_name: str, config: str | Path, deepspeed_config: str | Path | dict, *,
             init: str | Path | None = None, eval_only: bool = False, overrides: Sequence[str] = (),
             resume: str | None = None, restart: bool = False, precision: str = "auto",
             hooks: StepHooks | None = None) -> dict[str, float]:
    """Finetunes (or with `eval_only` evaluates) task `task_name` (a key of TASKS) as
    `deepspeed launch/finetune_<task>.py` does; `init`: the model to start from (a checkpoint folder, one
    tag, a consolidated .pt or an export: its model config is used). The other arguments as for
    pretrain.run.pretrain. Every rank calls it; returns the evaluation's metrics."""
    if task_name not in TASKS:
        raise ConfigError(f"task {task_name!r} is not one of {sorted(TASKS)}")
    task_cls = TASKS[task_name]
    options = RunOptions(config, deepspeed_config, tuple(overrides), resume, restart, precision)
    start = saved.read(init) if init else None
    init_config = (start.config_tree, str(start.config_file)) if start and start.config_tree is not None else None
    if start and init_config is None:
        log.warning("%s has no %s beside it: the model is built from %s's model section", init,
                    saved.RUN_CONFIG, config)

    def check(cfg: RunConfig) -> None:
        if cfg.task.name != task_name:
            raise ConfigError(f"{cfg.source}: task.name is {cfg.task.name!r}, this driver finetunes {task_name!r} "
                              f"(tasks: {', '.join(TASKS)})")
        if not eval_only and not cfg.task.train_file:
            raise ConfigError(f"{cfg.source}: task.train_file is required to finetune (or pass --eval_only)")

    run = prepare(options, init_config, check, evaluate_only=eval_only)
    cfg, dist_info = run.cfg, run.dist
    task = task_cls(cfg, dist_info, run.ds["train_micro_batch_size_per_gpu"], init and str(init))
    if not eval_only and not task.train_examples:
        raise AnnotationError(f"{cfg.task.train_file}: no training examples (for vqa: task.train_answers too)")
    task.check_sizes(training=not eval_only)
    cfg = schedule_in_steps(cfg, len(task.train_examples), run.ds)
    module = task.make_model()
    if start:
        try:
            module.load_pretrained(start, same_task=start.task == task_name)
        except WeightsError as e:
            if init_config is not None:
                raise
            raise WeightsError(f"{e} (the model was built from {config}'s model section: {init} has no "
                               f"{saved.RUN_CONFIG} beside it)") from None
    else:
        log.info("no --init: finetuning from the random initialisation")
    engine = build_engine(module, cfg.train, run.ds, cfg.model.backbone_norm)
    seed_rank(cfg, dist_info)
    trainer = Trainer(engine, task, cfg, run.logger, dist_info, hooks)
    with fail_fast_on_peer_loss(dist_info.rank, cfg.train.collective_timeout_s):
        if eval_only:
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
