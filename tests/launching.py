"""Starting runs through the real entry point, `deepspeed launch/pretrain.py`, from tests."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

TINY = ["model.backbone=resnet18", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
        "model.intermediate_size=128", "model.vd_size=32", "data.image_size=64", "data.captions_per_image=2",
        "data.max_text_len=20", "train.lr=2e-3", "train.warmup_steps=1", "train.lr_decay=constant",
        "train.log_every=1",
        "train.eval_batches=2", "pretrain.mvm_prob=0.5", "model.bert_dir=null", "model.backbone_weights=null"]
STEP_LINE = re.compile(r"step (\d+)/(\d+)  loss ([\d.]+).*loss/mlm ([\d.]+)")


DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 10.0,
             "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}


def launch_command(tmp_path, synthetic_data, steps, extra=(), resume=False, launcher_args=("--num_gpus", "2"),
                   ds_config=None):
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
    return cmd


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(tmp_path, synthetic_data, ranks, steps, extra=(), resume=False, ds_config=None):
    cmd = launch_command(tmp_path, synthetic_data, steps, extra, resume,
                         ("--num_gpus", str(ranks), "--master_port", str(free_port())), ds_config)
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log




def launch_pretrain(config, ranks, ds_config, overrides, env=ENV, timeout=1800):
    """`deepspeed launch/pretrain.py` with a shipped config as it is, plus `overrides`; returns the log."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "launch/pretrain.py", "--deepspeed_config", str(ds_config), "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def finetune_in_process(task, config, downstream, out_dir, steps, sets=(), init=None, micro_batch=16):
    """One finetune driver in this process (a world of one): the shipped synthetic `config` pointed at
    the test's `downstream` folder, `sets` applied on top. Returns the final metrics."""
    import argparse

    from soho_ds.tasks.run import add_finetune_arguments, finetune

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = out_dir / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 10.0, "zero_optimization": {"stage": 2}}))
    cfg = out_dir / config
    cfg.write_text((ROOT / "configs" / config).read_text().replace("data/synthetic_downstream", str(downstream)))
    sets = [f"train.max_steps={steps}", f"train.output_dir={out_dir}/run", *sets]
    argv = ["--deepspeed_config", str(ds), "--config", str(cfg)] + sum((["--set", s] for s in sets), [])
    argv += ["--init", str(init)] if init else []
    return finetune(add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv), task)
