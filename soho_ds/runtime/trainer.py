"""The one training loop, shared by pretraining and every finetune task.

A task supplies batches, an evaluation and its RNG streams; the loop below owns the step:
next batch, forward, backward, step, then logging, evaluation and checkpoints at intervals.
Steps count optimizer steps (one global batch each, whatever the accumulation).

A step whose gradients are not finite is skipped by DeepSpeed and counted here (the model
has already kept its VD and BatchNorm statistics out of it); too many in a row stop the run.
SIGTERM (a cluster's preemption) makes every rank write a checkpoint at the next step boundary
and exit cleanly.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Iterator, Protocol

import torch
import torch.distributed as dist

from soho_ds.config import ReportedError, RunConfig
from soho_ds.runtime import checkpoint
from soho_ds.runtime.dist import DistInfo
from soho_ds.runtime.engine import compute_dtype
from soho_ds.runtime.log import RunLogger, format_eta

log = logging.getLogger(__name__)


class Task(Protocol):
    images_per_batch: int  # images in one micro-batch on one rank

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def evaluate(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...

    def rng_generators(self) -> dict[str, torch.Generator]: ...

    def data_state(self) -> dict: ...  # this rank's position in its data stream

    def load_data_state(self, state: dict | None, step: int) -> None: ...

    def checkpoint_files(self) -> dict[str, str]: ...  # written beside each checkpoint (e.g. answer vocabulary)


FAULT_ENV = "SOHO_DS_FAULT"


def _fault(rank: int, step: int) -> list[str] | None:
    """The parts of SOHO_DS_FAULT="R:N[-M]:KIND[:launcher]" when it targets this rank at this step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    first, _, last = parts[1].partition("-")
    return parts if int(parts[0]) == rank and int(first) <= step <= int(last or first) else None


def inject_fault(rank: int, step: int) -> None:
    """Fault injection for resilience tests, at a deterministic point: SOHO_DS_FAULT="R:N:SIGNAL[:launcher]"
    makes global rank R send SIGNAL (KILL, STOP, TERM, ...) to itself, or to its launcher, right after
    step N."""
    parts = _fault(rank, step)
    if parts and parts[2].upper() != "NAN":
        target = os.getppid() if parts[3:] == ["launcher"] else os.getpid()
        os.kill(target, getattr(signal, f"SIG{parts[2].upper().removeprefix('SIG')}"))


def poison_batch(batch: dict[str, torch.Tensor], rank: int, step: int) -> dict[str, torch.Tensor]:
    """SOHO_DS_FAULT="R:N[-M]:NAN": rank R's images of steps N..M get one NaN pixel, as a corrupt
    input would (the tests of non-finite steps)."""
    if _fault(rank, step) and _fault(rank, step)[2].upper() == "NAN":
        images = batch["images"].clone()
        images.view(-1)[0] = float("nan")
        batch = {**batch, "images": images}
    return batch


class TrainingStopped(ReportedError, RuntimeError):
    """The run cannot go on (too many skipped steps); names the last good checkpoint."""


FP32_INPUTS = ("region_boxes",)  # coordinates: bf16 would move a box by up to a pixel at 256 px


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Moves a batch; floating tensors take the engine's compute dtype (the engine does not cast inputs)."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() and k not in FP32_INPUTS else v.dtype,
                    non_blocking=True)
            for k, v in batch.items()}


def resident_memory_gib() -> float:
    """This process's resident memory (Linux /proc; 0 where there is none)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Averages scalar tensors over all ranks with one collective; keys are sorted so ranks agree."""
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


class _StopFlag:
    """Set by SIGTERM; `agreed()` is true on every rank once any rank has it (one tiny all-reduce)."""

    def __init__(self, device: torch.device):
        self.set, self.device = False, device
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.set = True

    def agreed(self) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.set
        flag = torch.tensor([float(self.set)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def release(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


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
        checkpoint.save(self.engine, self.ckpt_dir, step, self._rank_state(), self.cfg.to_dict(),
                        self.task.checkpoint_files())
        self.logger.info("state digest @ step %d: %s", step, checkpoint.format_digest(checkpoint.state_digest(self.engine)))

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = self.task.evaluate(self.engine.module, self.dist.device, self.dtype)
        self.logger.scalars(step, {f"val/{k}": v for k, v in metrics.items()})
        self.logger.info("eval @ step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        self.logger.record(self.eval_log, {"step": step, "wall_s": round(time.time() - self._t_fit, 1), **metrics})
        return metrics

    def restore(self) -> None:
        """Loads the latest checkpoint of output_dir: weights, optimizer, schedule, RNG and data position."""
        engine = self.engine
        _, own = checkpoint.resume(engine, self.ckpt_dir)
        if own is not None:
            checkpoint.set_rng_state(own["rng"], self.task.rng_generators())
        self.task.load_data_state(own and own["data"], engine.global_steps)
        self.logger.info("state digest @ step %d: %s", engine.global_steps,
                         checkpoint.format_digest(checkpoint.state_digest(engine)))

    def _log_step(self, step: int, running: dict, micro_steps: int, images: int, elapsed: float, t_start: float,
                  start: int, skipped: int) -> dict[str, float]:
        engine, t = self.engine, self.cfg.train
        memory = torch.tensor(resident_memory_gib(), device=self.dist.device)
        values = mean_over_ranks({**{k: v / micro_steps for k, v in running.items()}, "perf/rss_gib": memory})
        img_per_s = images * self.dist.world_size / elapsed
        grad_norm = engine.get_global_grad_norm()
        values.update({"train/lr": engine.get_lr()[0], "perf/img_per_s": img_per_s,
                       "train/loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0)),
                       "train/skipped_steps": float(skipped)})
        if grad_norm is not None and float(grad_norm) >= 0:
            values["train/grad_norm"] = float(grad_norm)
        self.logger.scalars(step, values)
        self.logger.record(self.train_log, {"step": step, **values})
        eta = (time.time() - t_start) / max(1, step - start) * (t.max_steps - step)
        terms = "  ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()) if k.startswith(("loss/", "acc/", "vd/usage")))
        self.logger.info("step %d/%d  loss %.4f  %s  lr %.2e  %.1f img/s  eta %s", step, t.max_steps,
                         values["loss"], terms, values["train/lr"], img_per_s, format_eta(eta))
        return values

    def fit(self, resume: bool = False) -> dict[str, float]:
        engine, t = self.engine, self.cfg.train
        if resume:
            self.restore()
        start = step = engine.global_steps
        self._t_fit = time.time()
        batches = self.task.train_batches()
        running: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}  # this optimizer step's micro-steps, until it is known not skipped
        micro_steps = pending_micro = images = 0
        t_start = t_last = time.time()
        skipped_before, in_a_row = engine.skipped_steps, 0
        self.logger.info("training from step %d to %d; world size %d, micro-batch %d x accumulation %d = global "
                         "batch %d; precision %s; learning-rate schedule in steps of the global batch; TensorBoard: %s",
                         step, t.max_steps, self.dist.world_size, engine.train_micro_batch_size_per_gpu(),
                         engine.gradient_accumulation_steps(), engine.train_batch_size(),
                         {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32"), self.logger.log_dir)
        self.logger.scalars(step, {"train/global_batch": engine.train_batch_size(),
                                   "train/grad_accumulation": engine.gradient_accumulation_steps()})
        first = values = None
        stop = _StopFlag(self.dist.device)
        try:
            while step < t.max_steps:
                batch = poison_batch(to_device(next(batches), self.dist.device, self.dtype), self.dist.rank, step + 1)
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                for k, v in out.items():  # summed on-device: no host sync per step
                    pending[k] = pending.get(k, 0) + v.detach().float()
                pending_micro += 1
                images += self.task.images_per_batch
                if engine.global_steps == step:  # inside a gradient-accumulation cycle
                    continue
                step = engine.global_steps
                if engine.skipped_steps > skipped_before:  # DeepSpeed found non-finite gradients and skipped
                    pending, pending_micro = {}, 0  # a skipped step's numbers would poison the averages
                    skipped_before, in_a_row = engine.skipped_steps, in_a_row + 1
                    self.logger.warning("step %d skipped: non-finite loss or gradients (%d in a row, %d in all); "
                                        "VD and BatchNorm statistics left as they were", step, in_a_row,
                                        engine.skipped_steps)
                    self.logger.scalars(step, {"train/skipped_steps": float(engine.skipped_steps)})
                    if in_a_row >= t.max_skipped_steps:
                        raise TrainingStopped(
                            f"{in_a_row} steps in a row had non-finite loss or gradients (train.max_skipped_steps = "
                            f"{t.max_skipped_steps}); stopping at step {step}. The last good checkpoint is "
                            f"{checkpoint.latest_tag(self.ckpt_dir) or 'none'} in {self.ckpt_dir}: check the data "
                            "(tools/index_shards.py) or lower train.lr, then --resume")
                else:
                    in_a_row = 0
                for k, v in pending.items():
                    running[k] = running.get(k, 0) + v
                micro_steps += pending_micro
                pending, pending_micro = {}, 0
                if micro_steps and (step % t.log_every == 0 or step == start + 1 or step == t.max_steps):
                    now = time.time()
                    values = self._log_step(step, running, micro_steps, images, now - t_last, t_start, start,
                                            engine.skipped_steps)
                    first = first or values
                    running, micro_steps, images, t_last = {}, 0, 0, now
                if t.image_log_every and step % t.image_log_every == 0 and hasattr(self.task, "log_pictures"):
                    self.task.log_pictures(engine.module, batch, step, self.logger)
                inject_fault(self.dist.rank, step)
                if stop.agreed():
                    self.save(step)
                    self.logger.info("SIGTERM: checkpoint %s written at step %d on every rank; continue with --resume",
                                     checkpoint.tag_for(step), step)
                    self.logger.close()
                    return {}
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                    self.evaluate(step)
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    self.save(step)
        finally:
            stop.release()
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
