"""Scale-out guarantees through the real launcher: exact resume after SIGKILL, no half-written
checkpoint resumed, world-size changes through universal checkpoints, and bounded waits when a
rank dies or hangs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from launching import ENV, launch, launch_command

DIGEST = re.compile(r"state digest @ step (\d+): weights (\S+)  exp_avg (\S+)  exp_avg_sq (\S+)")


def digests(log):
    return {int(m.group(1)): [float(v) for v in m.groups()[1:]] for m in DIGEST.finditer(log)}


def same_state(a, b):
    """Equal up to the order in which partitions were summed (they differ between world sizes)."""
    return all(x == pytest.approx(y, rel=1e-9, abs=1e-12) for x, y in zip(a, b)) and a[1] != 0.0


def train_log(run_dir):
    """step -> logged values; a resumed run's lines replace the interrupted run's."""
    rows = {}
    for line in (run_dir / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def start(tmp_path, synthetic_data, steps, extra=(), resume=False):
    """Starts a 2-rank run in the background; its console goes to tmp_path/console.log."""
    cmd = launch_command(tmp_path, synthetic_data, steps, extra, resume,
                         ("--num_gpus", "2", "--master_port", str(free_port())))
    with open(tmp_path / "console.log", "w") as console:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: killed as a whole, like a node


def wait_for_step(run_dir, step, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run_dir / "train.jsonl"
        if log.exists() and step in train_log(run_dir):
            return
        assert proc.poll() is None, (run_dir.parent / "console.log").read_text()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_uninterrupted_loss_curve(tmp_path, synthetic_data):
    extra = ["train.save_every=3", "train.eval_every=0"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    launch(reference_dir, synthetic_data, ranks=2, steps=8, extra=extra)

    proc = start(killed_dir, synthetic_data, steps=8, extra=extra)
    wait_for_step(killed_dir / "run", 5, proc)  # between the checkpoints of steps 3 and 6
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = killed_dir / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    # A checkpoint directory left half-written by a crash (shards but no meta.json, not in
    # `latest`) must be ignored.
    partial = ckpt / "step_00000006"
    partial.mkdir(exist_ok=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    log = launch(killed_dir, synthetic_data, ranks=2, steps=8, extra=extra, resume=True)
    assert "resumed from" in log and "step_00000003 at step 3" in log
    reference, resumed = train_log(reference_dir / "run"), train_log(killed_dir / "run")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(4, 9):  # every term of every step after the resume point
        for key, value in reference[step].items():
            if key.startswith(("loss", "acc/", "vd/")):
                assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.slow
def test_world_size_changes_on_resume_keep_weights_step_and_moments(tmp_path, synthetic_data):
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 10.0,
          "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    extra = ["train.save_every=4", "train.eval_every=0"]
    log2 = launch(tmp_path, synthetic_data, ranks=2, steps=4, extra=extra, ds_config=ds)
    saved = digests(log2)[4]
    assert "micro-batch 4 x accumulation 1 = global batch 8" in log2

    # 2 -> 1: converted to a universal checkpoint, then trains on with accumulation 2
    log1 = launch(tmp_path, synthetic_data, ranks=1, steps=6, extra=extra, resume=True, ds_config=ds)
    assert "converting to a universal checkpoint" in log1
    assert re.search(r"resumed from .*step_00000004_universal at step 4", log1)
    assert same_state(digests(log1)[4], saved)  # weights and both Adam moments
    assert "micro-batch 4 x accumulation 2 = global batch 8" in log1
    assert sorted(train_log(tmp_path / "run"))[-2:] == [5, 6]
    saved6 = digests(log1)[6]

    # 1 -> 2
    log3 = launch(tmp_path, synthetic_data, ranks=2, steps=7, extra=extra, resume=True, ds_config=ds)
    assert re.search(r"resumed from .*step_00000006_universal at step 6", log3)
    assert same_state(digests(log3)[6], saved6)
    assert 7 in train_log(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_rank_stops_the_others_within_the_timeout(tmp_path, synthetic_data, sig):
    timeout_s = 15
    proc = start(tmp_path, synthetic_data, steps=10_000, extra=[f"train.collective_timeout_s={timeout_s}",
                                                                "train.eval_every=0"])
    wait_for_step(tmp_path / "run", 3, proc)
    victim = int(subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "local_rank=1"], capture_output=True,
                                text=True).stdout.split()[0])
    t0 = time.time()
    os.kill(victim, sig)
    try:
        proc.wait(timeout=timeout_s + 60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank, if anything is left
        except ProcessLookupError:
            pass
    elapsed = time.time() - t0
    out = (tmp_path / "console.log").read_text()
    assert proc.returncode != 0
    assert elapsed < timeout_s + 45, elapsed
    assert "rank 0: a collective failed" in out and "train.collective_timeout_s = 15 s" in out, out[-3000:]
    if sig == signal.SIGSTOP:  # a hang is detected by the timeout, not before it
        assert elapsed >= timeout_s - 1, elapsed


SHM_PROBE = '''
import os, torch, deepspeed.comm as ds_comm
from soho_ds.runtime.dist import init_distributed, shm_allreduce_buffer
info = init_distributed(60)
torch.distributed.barrier()  # each rank unlinks its own name after init's barrier: wait for all of them
left = [r for r in range(info.world_size) if shm_allreduce_buffer(r).exists()]
maps = open("/proc/self/maps").read()
mapped = [r for r in range(info.world_size) if f"{shm_allreduce_buffer(r)} (deleted)" in maps]
x = torch.full((1000,), float(info.rank + 1))
ds_comm.inference_all_reduce(x)  # DeepSpeed's shared-memory path, through the mappings alone
print(f"rank {info.rank}: buffers left {left} mapped {mapped} sum {x[0].item()} {x[-1].item()}", flush=True)
'''


@pytest.mark.slow
def test_local_runs_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce workspace (66 MB a rank in /dev/shm, i.e. RAM) is unlinked once
    every rank has mapped it; the shared-memory all-reduce still sums correctly through the mappings."""
    script = tmp_path / "shm_probe.py"
    script.write_text(SHM_PROBE)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: buffers left [] mapped [0, 1] sum 3.0 3.0" in log, log[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
