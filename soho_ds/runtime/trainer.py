"""The one training loop, shared by pretraining and every finetune task.

A task supplies batches, an evaluation and its RNG streams; the loop below owns the step:
next batch, forward, the module's `commit(out)` (its Visual Dictionary and BatchNorm statistics
kept or restored: see SohoModel.commit), backward, step, then logging, evaluation and checkpoints
at intervals.
Steps count optimizer steps (one global batch each, whatever the accumulation).

A step whose gradients are not finite is skipped by DeepSpeed and counted here; too many in a
row stop the run. SIGTERM (a cluster's preemption) makes every rank write a checkpoint at the
next step boundary and exit cleanly.

Nothing inside a step reads a device value on the host: losses are summed on the device, the
stop flag travels through an asynchronous all-reduce of a host tensor read one step later, and
whatever needs host values (the logged figures, Visual Dictionary upkeep) runs at the logging
interval. Each interval logs where the time went: images/s, MFU over the useful work (valid
pixels, real tokens), padding, the share of time spent waiting for data, each rank's step time
(the slowest named with its host), memory and the fp16 loss scale.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import statistics
import time
from typing import ContextManager, Iterator, Protocol

import torch
import torch.distributed as dist

from soho_ds.config import ReportedError, RunConfig
from soho_ds.runtime import checkpoint
from soho_ds.runtime.dist import DistInfo, host_group
from soho_ds.runtime.engine import cap_loss_scale, compute_dtype, part_rates
from soho_ds.runtime.log import HISTORY, RunLogger, format_eta
from soho_ds.runtime.perf import FlopModel, device_memory_gib, device_peak_flops, host_name, resident_memory_gib

log = logging.getLogger(__name__)


class Task(Protocol):
    images_per_batch: int  # images in one micro-batch on one rank

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def evaluate(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...

    def rng_generators(self) -> dict[str, torch.Generator]: ...

    def data_state(self) -> dict: ...  # this rank's position in its data stream

    def load_data_state(self, state: dict | None, step: int, images_seen: dict[str, int] | None = None) -> None: ...

    def images_drawn(self) -> dict[str, int]: ...  # per training source, this rank's count (+ carried totals)

    def checkpoint_files(self) -> dict[str, str]: ...  # written beside each checkpoint (e.g. answer vocabulary)


class StepHooks:
    """What a caller attaches to the loop's steps (tests count operations or inject faults through it;
    runtime/faults.py); the defaults do nothing."""

    def before_forward(self, batch: dict[str, torch.Tensor], rank: int, step: int) -> dict[str, torch.Tensor]:
        """The device batch of optimizer step `step` (counted from 1) as the forward gets it."""
        return batch

    def micro_step(self) -> ContextManager:
        """Wraps each micro-step: forward, commit, backward and optimizer step."""
        return contextlib.nullcontext()

    def after_step(self, rank: int, step: int) -> None:
        """After optimizer step `step`, its logging and pictures done, before the checkpoint and SIGTERM checks."""


class TrainingStopped(ReportedError, RuntimeError):
    """The run cannot go on (too many skipped steps); names the last good checkpoint."""


FP32_INPUTS = ("region_boxes",)  # coordinates: bf16 would move a box by up to a pixel at 256 px


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Moves a batch; floating tensors take the engine's compute dtype (the engine does not cast inputs)."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() and k not in FP32_INPUTS else v.dtype,
                    non_blocking=True)
            for k, v in batch.items()}


def sample_means_over_ranks(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], keys: list[str],
                            device: torch.device) -> dict[str, float]:
    """Means over every rank's samples: `sums[k]` is this rank's sum over the `counts[k]` samples it scored
    for metric k. Every rank passes the same `keys` (a rank that scored nothing passes empty dicts), so
    one collective serves any split; a metric no rank scored is left out."""
    stacked = torch.stack([torch.as_tensor(d.get(k, 0.0), device=device).float().reshape(())
                           for d in (sums, counts) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    values = stacked.tolist()
    total, n = values[:len(keys)], values[len(keys):]
    return {k: s / c for k, s, c in zip(keys, total, n) if c > 0}


class _StopFlag:
    """Set by SIGTERM. `agreed()`, called once per step on every rank, posts this rank's flag in an
    asynchronous all-reduce of a host tensor and returns the result of the one posted a step before:
    the step never waits on it, no device is involved, and every rank reads the same value."""

    def __init__(self):
        self.set = False
        self.group = host_group() if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._flag, self._work = torch.zeros(1), None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.set = True

    def agreed(self) -> bool:
        if self.group is None:
            return self.set
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.numpy()[0] > 0)  # a host tensor: reading it syncs nothing
        self._flag = torch.tensor([float(self.set)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return stop

    def release(self) -> None:
        if self._work is not None:
            self._work.wait()  # every rank posted it: the collective completes
            self._work = None
        signal.signal(signal.SIGTERM, self._previous)


def gather_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, list[float]]:
    """Every rank's value of each key (keys sorted so ranks agree), in one collective."""
    keys = sorted(values)
    if not keys:  # every rank passes the same keys, so every rank returns here alike
        return {}
    # float64: image counts stay exact far beyond float32's 16.7 million
    local = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, local)
        local = torch.stack(everyone)
    else:
        local = local[None]
    table = local.t().tolist()
    return dict(zip(keys, table))


def _visual_dictionaries(module: torch.nn.Module) -> list:
    from soho_ds.models.visual_dictionary import VisualDictionary

    return [m for m in module.modules() if isinstance(m, VisualDictionary)]


class Trainer:
    def __init__(self, engine, task: Task, cfg: RunConfig, logger: RunLogger, dist_info: DistInfo,
                 hooks: StepHooks | None = None):
        self.engine, self.task, self.cfg, self.logger, self.dist = engine, task, cfg, logger, dist_info
        self.hooks = hooks or StepHooks()
        self.dtype = compute_dtype(engine)
        self.ckpt_dir = f"{cfg.train.output_dir}/checkpoints"
        self.eval_log = f"{cfg.train.output_dir}/eval.jsonl"
        self.train_log = f"{cfg.train.output_dir}/train.jsonl"
        self.history = f"{cfg.train.output_dir}/{HISTORY}"
        self._resumed: dict = {"resumed_from": None}
        self._t_fit = time.time()
        self._eval_s = 0.0
        # the task may propose the figure whose best checkpoint is kept; train.best_metric decides
        self.best_metric = cfg.train.best_metric or getattr(task, "best_metric", None)
        soho = getattr(engine.module, "model", None)
        self.flops = FlopModel(soho, dist_info.device) if soho is not None else None
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        self.peak_flops = device_peak_flops(dist_info.device, self.precision) * dist_info.world_size
        # each rank's (host, local rank): the slowest rank is named by host, the run's history holds the layout
        self.placement = [(host_name(), dist_info.local_rank)] * dist_info.world_size
        if dist_info.world_size > 1:
            dist.all_gather_object(self.placement, (host_name(), dist_info.local_rank))
        self.hosts = [host for host, _ in self.placement]

    def _rank_state(self) -> dict:
        return {"rng": checkpoint.rng_state(self.task.rng_generators()), "data": self.task.data_state()}
    def check_replicas(self) -> bool | None:
        """Every rank must hold the same weights and VD table; checked at each checkpoint (one all_gather)."""
        if self.dist.world_size == 1:
            return None
        module = self.engine.module
        sums = [sum(p.detach().double().sum() for p in module.parameters())]
        sums += [b.detach().double().sum() for n, b in module.named_buffers() if ".vd." in f".{n}"]
        local = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in sums]).to(self.dist.device)
        everyone = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        dist.all_gather(everyone, local)
        if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
            raise RuntimeError(f"ranks disagree on weights or VD table: {[e.tolist() for e in everyone]}")
        self.logger.info("replicas agree: weights and VD table identical on all %d ranks", self.dist.world_size)
        return True

    def images_seen(self) -> dict[str, int]:
        """The run's images drawn from each training source, all ranks together (collective)."""
        return {k: int(sum(v)) for k, v in gather_over_ranks(self.task.images_drawn(), self.dist.device).items()}

    def save(self, step: int) -> None:
        agree = self.check_replicas()
        checkpoint.save(self.engine, self.ckpt_dir, step, self._rank_state(), self.cfg.to_dict(),
                        self.task.checkpoint_files(), meta={"images_seen": self.images_seen()})
        digest = checkpoint.state_digest(self.engine)
        self.logger.info("state digest @ step %d: %s", step, checkpoint.format_digest(digest))
        self.logger.record(self.history, {"event": "checkpoint", "step": step, "tag": checkpoint.tag_for(step),
                                          "digest": digest, "replicas_agree": agree})

    def evaluate(self, step: int) -> dict[str, float]:
        t0 = time.time()
        metrics = self.task.evaluate(self.engine.module, self.dist.device, self.dtype)
        if not metrics:  # nothing held out (pretraining without data.val_shards)
            return metrics
        seconds = time.time() - t0
        self._eval_s += seconds
        share = self._eval_s / max(time.time() - self._t_fit, 1e-9)
        self.logger.scalars(step, {**{f"val/{k}": v for k, v in metrics.items()}, "perf/eval_s": seconds,
                                   "perf/eval_share": share})
        self.logger.info("eval @ step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        self.logger.info("evaluation took %.1f s; evaluations so far are %.1f%% of the run's time", seconds,
                         100 * share)
        self.logger.record(self.eval_log, {"step": step, "wall_s": round(time.time() - self._t_fit, 1),
                                           "eval_s": round(seconds, 2), **metrics})
        self._keep_if_best(step, metrics)
        return metrics

    def _keep_if_best(self, step: int, metrics: dict[str, float]) -> None:
        """A new best by train.best_metric: this step's checkpoint is written (if it is not yet) and named
        in checkpoints/best, with the score in checkpoints/best.json."""
        name = self.best_metric
        if name is None or name not in metrics:
            return
        best = checkpoint.best_record(self.ckpt_dir)
        if best is not None and metrics[name] <= best["value"]:
            return
        if checkpoint.latest_tag(self.ckpt_dir) != checkpoint.tag_for(step):
            self.save(step)
        if self.dist.is_main:
            checkpoint.mark_best(self.ckpt_dir, step, name, metrics[name])
        self.logger.info("best %s so far: %.4f at step %d (checkpoints/best -> %s)", name, metrics[name], step,
                         checkpoint.tag_for(step))

    def restore(self) -> None:
        """Loads the latest checkpoint of output_dir: weights, optimizer, schedule, RNG and data position."""
        engine = self.engine
        tag = checkpoint.latest_tag(self.ckpt_dir)
        _, own = checkpoint.resume(engine, self.ckpt_dir)
        if own is not None:
            checkpoint.set_rng_state(own["rng"], self.task.rng_generators())
        # the run's counts go on with rank 0, whatever the world size: the sum over ranks stays the total
        seen = checkpoint.saved_meta(self.ckpt_dir, tag).get("images_seen", {})
        self.task.load_data_state(own and own["data"], engine.global_steps, seen if self.dist.rank == 0 else {})
        digest = checkpoint.state_digest(engine)
        self.logger.info("state digest @ step %d: %s", engine.global_steps, checkpoint.format_digest(digest))
        self._resumed = {"resumed_from": f"{tag}_universal" if own is None else tag, "universal": own is None,
                         "digest": digest}

    def _log_step(self, step: int, running: dict, micro_steps: int, interval: dict, t_start: float,
                  start: int) -> dict[str, float]:
        """The interval's figures, gathered from every rank in one collective; logged by rank 0."""
        engine, t = self.engine, self.cfg.train
        elapsed = max(interval["wall_s"], 1e-9)
        steps = max(interval["steps"], 1)
        local = {**{k: v / micro_steps for k, v in running.items()},
                 "perf/memory_gib": device_memory_gib(self.dist.device), "perf/rss_gib": resident_memory_gib(),
                 "perf/step_s": elapsed / steps, "perf/data_wait_s": interval["data_s"] / steps,
                 "perf/flops": interval["flops"], "perf/padding": interval["padding"] / micro_steps,
                 **{f"data/images_{name}": n for name, n in self.task.images_drawn().items()}}
        table = gather_over_ranks(local, self.dist.device)
        values = {k: sum(v) if k.startswith("data/images_") else sum(v) / len(v) for k, v in table.items()}
        images = interval["images"] * self.dist.world_size
        step_times = table["perf/step_s"]
        slowest = max(range(len(step_times)), key=lambda r: (step_times[r], table["perf/data_wait_s"][r]))
        values.update({
            **{f"train/lr_{part}": rate for part, rate in part_rates(engine).items()},
            "perf/img_per_s": images / elapsed,
            "perf/data_wait_share": values["perf/data_wait_s"] / values["perf/step_s"],
            "perf/memory_gib_max": max(table["perf/memory_gib"]),
            "perf/step_s_max": step_times[slowest], "perf/step_s_median": statistics.median(step_times),
            "perf/slowest_rank": float(slowest),
            "train/loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0)),
            "train/skipped_steps": float(engine.skipped_steps)})
        flops = sum(table.pop("perf/flops"))
        values.pop("perf/flops")
        if self.peak_flops:
            values["perf/mfu"] = flops / elapsed / self.peak_flops
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and float(grad_norm) >= 0:
            values["train/grad_norm"] = float(grad_norm)
        for vd in _visual_dictionaries(engine.module):
            values["vd/restarted_now"] = values.get("vd/restarted_now", 0.0) + vd.maintain()
        self.logger.scalars(step, values)
        self.logger.record(self.train_log, {"step": step, **values})
        eta = (time.time() - t_start) / max(1, step - start) * (t.max_steps - step)
        terms = "  ".join(f"{k} {v:.3f}" for k, v in sorted(values.items())
                          if k.startswith(("loss/", "acc/", "vd/usage")))
        mfu = f"  MFU {100 * values['perf/mfu']:.1f}%" if "perf/mfu" in values else ""
        seen = sorted((k.removeprefix("data/images_"), v) for k, v in values.items() if k.startswith("data/images_"))
        mix = ("  images seen " + " ".join(f"{name} {int(n)}" for name, n in seen)) if len(seen) > 1 else ""
        # the transformer's rate is train.lr's schedule; the CNN's and the heads' are shown where they differ
        base = values.get("train/lr_transformer", next(v for k, v in values.items() if k.startswith("train/lr_")))
        rates = f"lr {base:.2e}" + "".join(f" ({part} {values[f'train/lr_{part}']:.2e})" for part in ("cnn", "head")
                                           if values.get(f"train/lr_{part}", base) != base)
        self.logger.info("step %d/%d  loss %.4f  %s  %s  %.1f img/s%s  data wait %.0f%%  padding %.0f%%  "
                         "step %.3f s (slowest rank %d on %s %.3f s)  mem %.2f GiB  loss scale %g%s  eta %s",
                         step, t.max_steps, values["loss"], terms, rates, values["perf/img_per_s"], mfu,
                         100 * values["perf/data_wait_share"], 100 * values["perf/padding"],
                         values["perf/step_s_median"], slowest, self.hosts[slowest], values["perf/step_s_max"],
                         values["perf/memory_gib_max"], values["train/loss_scale"], mix, format_eta(eta))
        return values

    def _report_skip(self, step: int, in_a_row: int) -> None:
        """A skipped step is rare: here reading the model's held-back count (a host read) is fine."""
        engine = self.engine
        soho = getattr(engine.module, "model", None)
        held = int(soho.held_back) if soho is not None and hasattr(soho, "held_back") else None
        if held is not None and held > self._held_back:
            kept = "its VD and BatchNorm statistics were held back (non-finite inputs or loss)"
        elif held is not None:
            kept = ("its forward pass was finite, so its VD and BatchNorm statistics were kept; only the "
                    "gradients overflowed")
        else:
            kept = "no statistics outside the optimizer"
        self._held_back = held or 0
        scale = getattr(engine.optimizer, "loss_scale", None)
        self.logger.warning("step %d skipped by DeepSpeed: non-finite gradients%s (%d in a row, %d in all); %s",
                            step, f" (loss scale now {scale:g})" if self.dtype == torch.float16 and scale else "",
                            in_a_row, engine.skipped_steps, kept)
        self.logger.scalars(step, {"train/skipped_steps": float(engine.skipped_steps)})

    def fit(self, resume: bool = False) -> dict[str, float]:
        engine, t = self.engine, self.cfg.train
        if resume:
            self.restore()
        start = step = engine.global_steps
        self._t_fit, self._eval_s = time.time(), 0.0
        soho = getattr(engine.module, "model", None)
        self._held_back = int(soho.held_back) if soho is not None and hasattr(soho, "held_back") else 0
        batches = self.task.train_batches()
        running: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}  # this optimizer step's micro-steps, until it is known not skipped
        micro_steps = pending_micro = 0
        interval = dict(images=0, data_s=0.0, flops=0.0, padding=0.0, steps=0)
        t_start = t_last = time.time()
        skipped_before, in_a_row = engine.skipped_steps, 0
        self.logger.info("training from step %d to %d; world size %d, micro-batch %d x accumulation %d = global "
                         "batch %d; precision %s; learning-rate schedule in steps of the global batch; TensorBoard: %s",
                         step, t.max_steps, self.dist.world_size, engine.train_micro_batch_size_per_gpu(),
                         engine.gradient_accumulation_steps(), engine.train_batch_size(), self.precision,
                         self.logger.log_dir)
        self.logger.record(self.history, {
            "event": "start", "step": step, "max_steps": t.max_steps, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": self.dist.world_size,
            "ranks": [{"host": host, "local_rank": local} for host, local in self.placement],
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "accumulation": engine.gradient_accumulation_steps(), "global_batch": engine.train_batch_size(),
            "precision": self.precision, **self._resumed})
        self.logger.scalars(step, {"train/global_batch": engine.train_batch_size(),
                                   "train/grad_accumulation": engine.gradient_accumulation_steps()})
        first = values = None
        stop = _StopFlag()
        try:
            while step < t.max_steps:
                t_data = time.perf_counter()
                host_batch = next(batches)
                interval["data_s"] += time.perf_counter() - t_data
                if self.flops is not None:
                    flops, padding = self.flops(host_batch)
                    interval["flops"] += flops
                    interval["padding"] += padding
                batch = self.hooks.before_forward(to_device(host_batch, self.dist.device, self.dtype),
                                                  self.dist.rank, step + 1)
                with self.hooks.micro_step():
                    # the one place a training forward ends: its statistics kept or restored, before backward
                    out = engine.module.commit(engine(batch))
                    engine.backward(out["loss"])
                    engine.step()
                    for k, v in out.items():  # summed on-device: no host sync per step
                        pending[k] = pending.get(k, 0) + v.detach().float()
                pending_micro += 1
                interval["images"] += self.task.images_per_batch
                if engine.global_steps == step:  # inside a gradient-accumulation cycle
                    continue
                step = engine.global_steps
                interval["steps"] += 1
                cap_loss_scale(engine, t.max_loss_scale)
                if engine.skipped_steps > skipped_before:  # DeepSpeed found non-finite gradients and skipped
                    pending, pending_micro = {}, 0  # a skipped step's numbers would poison the averages
                    skipped_before, in_a_row = engine.skipped_steps, in_a_row + 1
                    self._report_skip(step, in_a_row)
                    if in_a_row >= t.max_skipped_steps:
                        raise TrainingStopped(
                            f"{in_a_row} steps in a row had non-finite loss or gradients (train.max_skipped_steps = "
                            f"{t.max_skipped_steps}); stopping at step {step}. The last good checkpoint is "
                            f"{checkpoint.latest_tag(self.ckpt_dir) or 'none'} in {self.ckpt_dir}: check the data "
                            "(soho-index-shards) or lower train.lr, then --resume")
                else:
                    in_a_row = 0
                for k, v in pending.items():
                    running[k] = running.get(k, 0) + v
                micro_steps += pending_micro
                pending, pending_micro = {}, 0
                if micro_steps and (step % t.log_every == 0 or step == start + 1 or step == t.max_steps):
                    now = time.time()
                    values = self._log_step(step, running, micro_steps, {**interval, "wall_s": now - t_last},
                                            t_start, start)
                    first = first or values
                    running, micro_steps, t_last = {}, 0, now
                    interval = dict(images=0, data_s=0.0, flops=0.0, padding=0.0, steps=0)
                if t.image_log_every and step % t.image_log_every == 0 and hasattr(self.task, "log_pictures"):
                    self.task.log_pictures(engine.module, batch, step, self.logger)
                self.hooks.after_step(self.dist.rank, step)
                if stop.agreed():
                    self.save(step)
                    self.logger.info("SIGTERM: checkpoint %s written at step %d on every rank; continue with --resume",
                                     checkpoint.tag_for(step), step)
                    self.logger.record(self.history, {"event": "preempted", "step": step,
                                                      "tag": checkpoint.tag_for(step)})
                    self.logger.close()
                    return {}
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                    self.evaluate(step)
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    self.save(step)
            # SIGTERM stays caught until the last checkpoint is complete: it is written, then the run ends
            metrics = self.evaluate(step)
            if checkpoint.latest_tag(self.ckpt_dir) != checkpoint.tag_for(step):
                self.save(step)
            if stop.set:
                self.logger.info("SIGTERM arrived during the final evaluation or save: the run had finished and its "
                                 "last checkpoint %s is complete", checkpoint.tag_for(step))
        finally:
            stop.release()
        if first is not None:
            self.logger.info("done: loss %.4f at step %d -> %.4f at step %d", first["loss"], start + 1,
                             values["loss"], step)
        self.logger.info("TensorBoard logs: %s   checkpoint: %s/%s", self.logger.log_dir, self.ckpt_dir,
                         checkpoint.tag_for(step))
        self.logger.close()
        return metrics
