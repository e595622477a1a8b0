"""What only a GPU runs, proven on the CPU as far as it can be: no host sync inside a training step
(counted), DeepSpeed's fp16 and bf16 casts applied to every model, every DALI graph defined with the
GPU decoder, BatchNorm in each mode across two ranks."""
import json
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from launching import TINY

aten = torch.ops.aten

# Operators that make the host wait for the device: a scalar read, or an output whose size depends on
# values (nonzero, masked_select, boolean indexing, ...).
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
            aten.repeat_interleave, aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.allclose,
            aten.masked_scatter}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class SyncCounter(TorchDispatchMode):
    """Counts device->host synchronising operations, each attributed to the innermost frame of
    soho_ds or DeepSpeed that issued it."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if self.active and (packet in SYNC_OPS or (packet in BOOL_INDEXED and _has_bool_index(args))):
            frame = next((f for f in reversed(traceback.extract_stack())
                          if "/soho_ds/" in f.filename or "/deepspeed/" in f.filename), None)
            where = "other" if frame is None else (
                f"{'soho_ds' if '/soho_ds/' in frame.filename else 'deepspeed'}:"
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}")
            self.calls[(where, packet.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def step(self):
        mode = self

        class _Step:
            def __enter__(self):
                mode.active = True

            def __exit__(self, *exc):
                mode.active = False
                mode.steps += 1

        return _Step()


def _pretrain(tmp_path, shards, steps, sets, step_context):
    import argparse

    from soho_ds.pretrain.run import pretrain
    from soho_ds.runtime.run import add_run_arguments

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 10.0, "zero_optimization": {"stage": 2}}))
    argv = ["--deepspeed_config", str(ds), "--config", str(ROOT / "configs/pretrain_synthetic.yaml"),
            "--precision", "fp32"]
    for s in TINY + [f"data.train_shards={shards}/train", "data.val_shards=null", f"train.output_dir={tmp_path}/run",
                     f"train.max_steps={steps}", *sets]:
        argv += ["--set", s]
    return pretrain(add_run_arguments(argparse.ArgumentParser()).parse_args(argv), step_context)


def _deepspeed_norm_checks(steps: int, groups: int) -> dict:
    """DeepSpeed 0.19's ZeRO-2 step reads each param group's gradient norm and the total on the host
    (is_invalid_grad_norm) to decide on overflow and clipping: its own syncs, one more than the groups."""
    return {("deepspeed:utils.py:is_invalid_grad_norm", "_local_scalar_dense"): steps * (groups + 1)}


def test_a_training_step_issues_no_host_sync(tmp_path, synthetic_data, world_of_one):
    """Every objective on (MLM, MVM on every pair, ITM, ITC) and the VD with data initialisation and
    re-seeding: the steps of the real loop (forward, backward, optimizer step, VD update) issue no
    synchronising operation from soho-ds's code; what DeepSpeed's own step issues is counted exactly,
    so a change on either side shows."""
    counter = SyncCounter()
    counter.steps = 0
    with counter:
        _pretrain(tmp_path, synthetic_data, 4, ["pretrain.mvm_prob=1.0", "pretrain.itc_weight=0.5",
                                                "model.vd_restart_below=0.5", "train.log_every=2"], counter.step)
    assert counter.steps == 4
    ours = {k: n for k, n in counter.calls.items() if not k[0].startswith("deepspeed:")}
    assert ours == {}, ours
    theirs = {k: n for k, n in counter.calls.items() if k[0].startswith("deepspeed:")}
    # six param groups: CNN, transformer, heads, each with and without weight decay
    assert theirs == _deepspeed_norm_checks(4, 6)


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_a_finetune_step_issues_no_host_sync(tmp_path, downstream, world_of_one, task):
    """The finetune loop through its driver (VQA's BCE head; retrieval's sampled hard negatives and ITC)."""
    from launching import finetune_in_process

    counter = SyncCounter()
    counter.steps = 0
    config = {"vqa": "finetune_vqa_synthetic.yaml", "retrieval": "finetune_retrieval_synthetic.yaml"}[task]
    with counter:
        finetune_in_process(task, config, downstream, tmp_path, 2, TINY, micro_batch=4, step_context=counter.step)
    assert counter.steps == 2
    ours = {k: n for k, n in counter.calls.items() if not k[0].startswith("deepspeed:")}
    assert ours == {}, ours
