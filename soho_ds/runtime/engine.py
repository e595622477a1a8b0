"""The one `deepspeed.initialize` call, and everything it is given: the checked DeepSpeed JSON
(batch arithmetic, precision), the optimizer with its param groups and the LR schedule.

The DeepSpeed JSON owns ZeRO, precision, batch arithmetic and clipping; it is validated by
DeepSpeed's own config model before any model exists. The optimizer and schedule come from the
YAML and are handed to the engine as a client optimizer (torch's fused AdamW, or SOHO's SGD for
the CNN + AdamW for the rest) and a transformers schedule, so per-group learning rates survive.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import deepspeed
import torch
from torch import nn

from soho_ds.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


def load_ds_config(path: str | Path | dict) -> dict:
    """Reads a DeepSpeed JSON config, refusing it with its file name if it is broken (a dict: its contents,
    as given from Python, copied)."""
    if isinstance(path, dict):
        return json.loads(json.dumps(path))
    path = Path(path)
    def unique(pairs):
        keys = [k for k, _ in pairs]
        if twice := sorted({k for k in keys if keys.count(k) > 1}):
            raise ConfigError(f"{path}: {', '.join(map(repr, twice))} given twice in one object; keep one")
        return dict(pairs)

    try:
        ds = json.loads(path.read_text(), object_pairs_hook=unique)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError(f"{path}: train_micro_batch_size_per_gpu is required")
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        value = ds.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return ds


def resolve_batch(ds: dict, world_size: int, source: str) -> dict:
    """Makes the global batch what the config says at any world size.

    With `train_batch_size` in the JSON (the recommended form), accumulation is derived:
    train_batch_size = micro-batch x accumulation x world size, refused if it does not divide.
    Without it, the global batch is micro-batch x accumulation x world size and grows with the
    world. Returns the DeepSpeed config with all three values explicit.
    """
    micro = ds["train_micro_batch_size_per_gpu"]
    if "train_batch_size" in ds:
        glob = ds["train_batch_size"]
        accum, rest = divmod(glob, micro * world_size)
        if rest or accum == 0:
            raise ConfigError(f"{source}: train_batch_size {glob} is not a multiple of micro-batch {micro} x world "
                              f"size {world_size}: choose a global batch divisible by {micro * world_size}")
        if ds.get("gradient_accumulation_steps", accum) != accum:
            raise ConfigError(f"{source}: gradient_accumulation_steps {ds['gradient_accumulation_steps']} contradicts "
                              f"train_batch_size {glob} = micro-batch {micro} x world size {world_size} x {accum}; "
                              "leave accumulation out to have it derived")
    else:
        accum = ds.get("gradient_accumulation_steps", 1)
        glob = micro * accum * world_size
    return {**ds, "train_batch_size": glob, "gradient_accumulation_steps": accum}


def with_gradient_clipping(ds: dict, clipping: float | None) -> dict:
    """The DeepSpeed config with the run config's `train.gradient_clipping` in place of its own (None:
    unchanged): a recipe's cap travels with its YAML, whichever JSON the command line names."""
    return ds if clipping is None else {**ds, "gradient_clipping": float(clipping)}


def validate_ds_config(ds: dict, source: str) -> None:
    """Runs DeepSpeed's own config model over `ds` (batch fields already resolved), so that a bad
    value (ZeRO stage 7, a string where a number belongs) is refused now, with the file named."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks the batch product against the world it sees; before the process group
    # exists that is 1, so it is given the one-rank equivalent (resolve_batch checked the real one).
    alone = {**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]}
    try:
        config = DeepSpeedConfig(alone)
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError, TypeError: all mean "refused"
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"{source}: DeepSpeed refuses this config: {' '.join(lines[:6])}") from None
    if config.zero_optimization_stage not in (1, 2):
        raise ConfigError(f"{source}: zero_optimization.stage must be 1 or 2 (soho-ds shards optimizer state and "
                          f"gradients with ZeRO-2), got {config.zero_optimization_stage}")


def cpu_has_fast_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX), from the kernel's CPU flags. Without them bf16
    convolutions are emulated: ~20x slower than fp32 on an AVX2 machine (measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(ds_config: dict, device_type: str, precision: str = "auto") -> dict:
    """Returns a copy of the DeepSpeed config with exactly one precision mode set.

    "auto" keeps the file's choice on a GPU. On the CPU, fp16 is never fast: it becomes bf16
    where the CPU has bf16 instructions and fp32 where it has not; a bf16 file on such a CPU
    becomes fp32 too. DeepSpeed casts parameters only: buffers (BatchNorm statistics, the VD) stay
    fp32, and the model's BatchNorm computes its statistics in fp32 (models.norm).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ds = copy.deepcopy(ds_config)
    if precision == "auto":
        if ds.get("fp16", {}).get("enabled"):
            precision = "fp16"
        elif ds.get("bf16", {}).get("enabled"):
            precision = "bf16"
        else:
            precision = "fp32"
        if device_type == "cpu" and precision != "fp32":
            chosen = "bf16" if cpu_has_fast_bf16() else "fp32"
            if chosen != precision:
                log.warning("%s on this CPU is slow: training in %s instead (--precision %s to insist)",
                            precision, chosen, precision)
            precision = chosen
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    if precision != "bf16" and (ds.get("data_types") or {}).get("grad_accum_dtype"):
        ds["data_types"] = {k: v for k, v in ds["data_types"].items() if k != "grad_accum_dtype"}  # bf16's only
    return ds


def param_groups(module: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: no weight decay on biases and norms (unless train.decay_norms_and_biases); the
    CNN at lr x cnn_lr_mult (and, with `cnn_optimizer: sgd`, SGD's momentum and weight decay); the task
    or pretraining heads (everything outside the CNN, the visual embedding and the transformer) at
    lr x head_lr_mult."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        dotted = f".{name}"
        part = ("cnn" if ".backbone." in dotted else
                "transformer" if ".fusion." in dotted or ".visual." in dotted else "head")
        no_decay = not cfg.decay_norms_and_biases and (p.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault((part, no_decay), []).append(p)
    mult = {"cnn": cfg.cnn_lr_mult, "transformer": 1.0, "head": cfg.head_lr_mult}
    out = []
    for (part, no_decay), ps in sorted(groups.items()):
        sgd = part == "cnn" and cfg.cnn_optimizer == "sgd"
        decay = cfg.cnn_weight_decay if sgd else cfg.weight_decay
        out.append({"params": ps, "lr": cfg.lr * mult[part], "weight_decay": 0.0 if no_decay else decay,
                    "name": f"{part}{'_no_decay' if no_decay else ''}", "optimizer": "sgd" if sgd else "adamw"})
    return out


def part_rates(engine) -> dict[str, float]:
    """The current learning rate of each part `param_groups` names (cnn, transformer, head)."""
    rates = {}
    for group in engine.basic_optimizer.param_groups:
        rates.setdefault(group.get("name", "all").removesuffix("_no_decay"), group["lr"])
    return rates


class SGDAdamW(torch.optim.Optimizer):
    """SOHO's optimizer recipe as one client optimizer for ZeRO: each param group is stepped by torch's
    own SGD (group "optimizer": "sgd", the CNN) or fused AdamW ("adamw", everything else).

    The inner optimizers share this one's group dicts (ZeRO swaps each group's params for its flat
    partition in place) and its state, so checkpoints hold both kinds of state in one dict.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float):
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "optimizer": "adamw"})
        self._momentum, self._betas, self._eps = momentum, betas, eps
        self._link()

    def _link(self) -> None:
        sgd = [g for g in self.param_groups if g["optimizer"] == "sgd"]
        adamw = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        self._inner = {}
        if sgd:
            self._inner["sgd"] = torch.optim.SGD(sgd, lr=sgd[0]["lr"], momentum=self._momentum)
        if adamw:
            self._inner["adamw"] = torch.optim.AdamW(adamw, lr=adamw[0]["lr"], betas=self._betas, eps=self._eps,
                                                     fused=True)
        for opt in self._inner.values():
            opt.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group dicts and the state

    @torch.no_grad()
    def step(self, closure=None):
        """Steps the groups in `param_groups` now: ZeRO steps one group at a time by narrowing it."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            opt = self._inner[group["optimizer"]]
            own, opt.param_groups = opt.param_groups, [group]
            try:
                opt.step()
            finally:
                opt.param_groups = own
        return loss


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(module, cfg)
    if cfg.cnn_optimizer == "sgd":
        return SGDAdamW(groups, cfg.lr, cfg.betas, cfg.eps, cfg.cnn_momentum)
    # torch's fused AdamW (CUDA and CPU kernels): one pass over each flat ZeRO partition instead of
    # the ~8 elementwise passes of the default implementation, each of which re-reads the whole
    # partition from memory (R50 + BERT-base on 2 CPU cores: optimizer step 3-4 s -> 0.8 s).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=True)


SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # transformers' names


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """The learning-rate schedule, stepped once per optimizer step (`cfg` in steps: TrainConfig.in_steps).
    Every group's rate follows the same factor of its own peak. multistep is SOHO's (mmcv's linear warm-up
    from warmup_factor, then x lr_gamma at each milestone), as torch's LinearLR chained with MultiStepLR."""
    from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR
    from transformers import get_scheduler

    if cfg.lr_decay != "multistep":
        return get_scheduler(SCHEDULES[cfg.lr_decay], optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps)
    decay = MultiStepLR(optimizer, milestones=[int(m) for m in cfg.lr_milestones], gamma=cfg.lr_gamma)
    if cfg.warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=cfg.warmup_factor, end_factor=1.0, total_iters=cfg.warmup_steps)
    return ChainedScheduler([warmup, decay], optimizer)


def build_engine(module: nn.Module, cfg: TrainConfig, ds_config: dict, backbone_norm: str = "batch"):
    """Wraps `module` in a DeepSpeed engine (ZeRO as configured); returns the engine. Before that, the
    BatchNorms are synchronised for the world size (every driver alike: models.norm)."""
    import torch.distributed as dist

    from soho_ds.models.norm import synchronise_norms

    world = dist.get_world_size() if dist.is_initialized() else 1
    module = synchronise_norms(module, backbone_norm, world)
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    if isinstance(optimizer, SGDAdamW):  # DeepSpeed accepts a client optimizer it has not tested when told
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def cap_loss_scale(engine, cap: float) -> None:
    """Holds DeepSpeed's dynamic fp16 loss scale at or below `cap` (0: no cap); DeepSpeed has no such
    setting (SOHO caps at 128). A host-side value: no sync."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if cap and scaler is not None and getattr(scaler, "dynamic", False) and scaler.cur_scale > cap:
        scaler.cur_scale = float(cap)


def compute_dtype(engine) -> torch.dtype:
    if engine.fp16_enabled():
        return torch.float16
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float32
