"""Starting runs through the real entry points (`deepspeed launch/*.py`, or a driver in-process) from tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

TINY_MODEL = ["model.backbone=resnet18", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=128", "model.vd_size=32", "model.bert_dir=null", "model.backbone_weights=null",
              "model.pool_last=false"]
TINY = TINY_MODEL + ["data.shorter_side=64", "data.longer_side=96", "data.captions_per_image=2",
                     "data.max_text_len=20", "train.lr=2e-3", "train.warmup_steps=0", "train.lr_decay=constant",
                     "train.log_every=1", "train.eval_batches=2", "pretrain.mvm_prob=0.5", "train.image_log_every=0"]
DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 10.0,
             "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def history(run_dir, event: str) -> list[dict]:
    """The run's own record of its events (runtime/log.py HISTORY): each `event` entry, oldest first."""
    from soho_ds.runtime.log import HISTORY

    rows = [json.loads(line) for line in (Path(run_dir) / HISTORY).read_text().splitlines()]
    return [row for row in rows if row["event"] == event]


def train_log(run_dir) -> dict[int, dict]:
    """step -> logged values; a resumed run's lines replace the interrupted run's."""
    rows = {}
    for line in (run_dir / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def launch_command(tmp_path, synthetic_data, steps, extra=(), resume=False, launcher_args=("--num_gpus", "2"),
                   ds_config=None, flags=()):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ds_config or DS_CONFIG))
    overrides = TINY + [f"data.train_shards={synthetic_data}/train", f"data.val_shards={synthetic_data}/val",
                        f"train.output_dir={tmp_path}/run", f"train.max_steps={steps}", *extra]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), *launcher_args, "launch/pretrain.py",
           "--deepspeed_config", str(ds), "--config", "configs/pretrain_synthetic.yaml", "--precision", "fp32"]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    return cmd + list(flags)


def launch(tmp_path, synthetic_data, ranks, steps, extra=(), resume=False, ds_config=None, flags=(), env=None,
           expect_ok=True):
    """`deepspeed launch/pretrain.py` with the tiny model; returns the console (stdout + stderr)."""
    cmd = launch_command(tmp_path, synthetic_data, steps, extra, resume,
                         ("--num_gpus", str(ranks), "--master_port", str(free_port())), ds_config, flags)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, log[-4000:]
    else:
        assert proc.returncode != 0, log[-4000:]
    return log


def finetune_in_process(task, config, downstream, out_dir, steps, sets=(), init=None, micro_batch=16,
                        eval_only=False, hooks=None):
    """One finetune driver in this process (a world of one: the `world_of_one` fixture): the shipped
    synthetic `config` pointed at the test's `downstream` folder, `sets` applied on top. Returns the
    final metrics."""
    from soho_ds.tasks.run import finetune

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = out_dir / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 10.0, "zero_optimization": {"stage": 2}}))
    cfg = out_dir / config
    cfg.write_text((ROOT / "configs" / config).read_text().replace("data/synthetic_downstream", str(downstream)))
    sets = [f"train.max_steps={steps}", f"train.output_dir={out_dir}/run", *sets]
    return finetune(task, cfg, ds, init=init, eval_only=eval_only, overrides=sets, hooks=hooks)


IN_PROCESS_DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 10.0,
                 "zero_optimization": {"stage": 2}}


def pretrain_in_process(tmp_path, shards, steps, sets=(), resume=None, restart=False, fault=None, hooks=None):
    """`launch/pretrain.py`'s entry in this process (a world of one) with the tiny model; `shards`: what
    data.train_shards is set to (a path, or a YAML list of weighted sources); `fault`: a FaultInjection spec."""
    from soho_ds.pretrain.run import pretrain
    from soho_ds.runtime.faults import FaultInjection

    tmp_path.mkdir(parents=True, exist_ok=True)
    sets = TINY + [f"data.train_shards={shards}", "data.val_shards=null", f"train.output_dir={tmp_path}/run",
                   f"train.max_steps={steps}", "train.eval_every=0", *sets]
    return pretrain(ROOT / "configs/pretrain_synthetic.yaml", IN_PROCESS_DS, overrides=sets, resume=resume,
                    restart=restart, precision="fp32", hooks=FaultInjection(fault) if fault else hooks)
