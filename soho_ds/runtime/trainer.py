"""The one training loop, shared by pretraining and every finetune task.

A task supplies batches, an evaluation and its RNG streams; the loop below owns the step:
next batch, forward, backward, step, then logging, evaluation and checkpoints at intervals.
Steps count optimizer steps (one global batch each, whatever the accumulation).
"""
from __future__ import annotations

import time
from typing import Iterator, Protocol

import torch
import torch.distributed as dist

from soho_ds.runtime import checkpoint
from soho_ds.runtime.config import RunConfig
from soho_ds.runtime.dist import DistInfo
from soho_ds.runtime.engine import compute_dtype
from soho_ds.runtime.log import RunLogger, format_eta


class Task(Protocol):
    images_per_batch: int  # images in one micro-batch on one rank

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def evaluate(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...

    def rng_generators(self) -> dict[str, torch.Generator]: ...

    def data_state(self) -> dict: ...  # this rank's position in its data stream

    def load_data_state(self, state: dict | None, step: int) -> None: ...


FP32_INPUTS = ("region_boxes",)  # coordinates: bf16 would move a box by up to a pixel at 256 px


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Moves a batch; floating tensors take the engine's compute dtype (the engine does not cast inputs)."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() and k not in FP32_INPUTS else v.dtype,
                    non_blocking=True)
            for k, v in batch.items()}


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Averages scalar tensors over all ranks with one collective; keys are sorted so ranks agree."""
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


class Trainer:
    def __init__(self, engine, task: Task, cfg: RunConfig, logger: RunLogger, dist_info: DistInfo):
        self.engine, self.task, self.cfg, self.logger, self.dist = engine, task, cfg, logger, dist_info
        self.dtype = compute_dtype(engine)
        self.ckpt_dir = f"{cfg.train.output_dir}/checkpoints"
        self.eval_log = f"{cfg.train.output_dir}/eval.jsonl"
        self.train_log = f"{cfg.train.output_dir}/train.jsonl"
        self._t_fit = time.time()

    def _rank_state(self) -> dict:
        return {"rng": checkpoint.rng_state(self.task.rng_generators()), "data": self.task.data_state()}

    def check_replicas(self) -> None:
        """Every rank must hold the same weights and VD table; checked at each checkpoint (one all_gather)."""
        if self.dist.world_size == 1:
            return
        module = self.engine.module
        sums = [sum(p.detach().double().sum() for p in module.parameters())]
        sums += [b.detach().double().sum() for n, b in module.named_buffers() if ".vd." in f".{n}"]
        local = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in sums]).to(self.dist.device)
        everyone = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        dist.all_gather(everyone, local)
        if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
            raise RuntimeError(f"ranks disagree on weights or VD table: {[e.tolist() for e in everyone]}")
        self.logger.info("replicas agree: weights and VD table identical on all %d ranks", self.dist.world_size)

    def save(self, step: int) -> None:
        self.check_replicas()
        checkpoint.save(self.engine, self.ckpt_dir, step, self._rank_state(), self.cfg.to_dict())
        self.logger.info("state digest @ step %d: %s", step, checkpoint.format_digest(checkpoint.state_digest(self.engine)))

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = self.task.evaluate(self.engine.module, self.dist.device, self.dtype)
        self.logger.scalars(step, {f"val/{k}": v for k, v in metrics.items()})
        self.logger.info("eval @ step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        self.logger.record(self.eval_log, {"step": step, "wall_s": round(time.time() - self._t_fit, 1), **metrics})
        return metrics

    def fit(self, resume: bool = False) -> dict[str, float]:
        engine, t = self.engine, self.cfg.train
        if resume:
            resumed = checkpoint.resume(engine, self.ckpt_dir)
            if resumed is not None:
                _, own = resumed
                if own is not None:
                    checkpoint.set_rng_state(own["rng"], self.task.rng_generators())
                self.task.load_data_state(own and own["data"], engine.global_steps)
                self.logger.info("state digest @ step %d: %s", engine.global_steps, checkpoint.format_digest(checkpoint.state_digest(engine)))
        start = step = engine.global_steps
        self._t_fit = time.time()
        batches = self.task.train_batches()
        running: dict[str, torch.Tensor] = {}
        micro_steps = 0
        t_start = t_last = time.time()
        images = 0
        self.logger.info("training from step %d to %d; world size %d, micro-batch %d x accumulation %d = global "
                         "batch %d; precision %s; learning-rate schedule in steps of the global batch; TensorBoard: %s",
                         step, t.max_steps, self.dist.world_size, engine.train_micro_batch_size_per_gpu(),
                         engine.gradient_accumulation_steps(), engine.train_batch_size(),
                         {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32"), self.logger.log_dir)
        self.logger.scalars(step, {"train/global_batch": engine.train_batch_size(),
                                   "train/grad_accumulation": engine.gradient_accumulation_steps()})
        first = None
        while step < t.max_steps:
            out = engine(to_device(next(batches), self.dist.device, self.dtype))
            engine.backward(out["loss"])
            engine.step()
            for k, v in out.items():  # summed on-device: no host sync per step
                running[k] = running.get(k, 0) + v.detach().float()
            micro_steps += 1
            images += self.task.images_per_batch
            if engine.global_steps == step:  # inside a gradient-accumulation cycle
                continue
            step = engine.global_steps
            if step % t.log_every == 0 or step == start + 1 or step == t.max_steps:
                now = time.time()
                values = mean_over_ranks({k: v / micro_steps for k, v in running.items()})
                img_per_s = images * self.dist.world_size / (now - t_last)
                values.update({"train/lr": engine.get_lr()[0], "perf/img_per_s": img_per_s,
                               "train/loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0))})
                self.logger.scalars(step, values)
                self.logger.record(self.train_log, {"step": step, **values})
                first = first or values
                eta = (now - t_start) / (step - start) * (t.max_steps - step)
                terms = "  ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())
                                  if k.startswith(("loss/", "acc/", "vd/usage")))
                self.logger.info("step %d/%d  loss %.4f  %s  lr %.2e  %.1f img/s  eta %s", step, t.max_steps,
                                 values["loss"], terms, values["train/lr"], img_per_s, format_eta(eta))
                running, micro_steps, images, t_last = {}, 0, 0, now
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                self.evaluate(step)
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                self.save(step)
        metrics = self.evaluate(step)
        if checkpoint.latest_tag(self.ckpt_dir) != checkpoint.tag_for(step):
            self.save(step)
        if first is not None:
            self.logger.info("done: loss %.4f at step %d -> %.4f at step %d", first["loss"], start + 1,
                             values["loss"], step)
        self.logger.info("TensorBoard logs: %s   checkpoint: %s/%s", self.logger.log_dir, self.ckpt_dir,
                         checkpoint.tag_for(step))
        self.logger.close()
        return metrics
