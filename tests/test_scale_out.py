"""Scale-out guarantees through the real launcher: exact resume after SIGKILL and after SIGTERM
(preemption), no half-written checkpoint resumed, world-size changes through universal checkpoints,
bounded waits when a rank dies or hangs. Faults are injected at a fixed step (the launcher's --inject_fault)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from launching import ENV, history, launch, launch_command, train_log

RESUME = ["train.save_every=3", "train.eval_every=0"]


def same_state(a: dict, b: dict) -> bool:
    """Two state digests (weights and both Adam moments), equal up to the order in which partitions were
    summed (it differs between world sizes)."""
    keys = ("weights", "exp_avg", "exp_avg_sq")
    return all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12) for k in keys) and a["exp_avg"] != 0.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data):
    """The uninterrupted 8-step run that the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    launch(out, synthetic_data, ranks=2, steps=8, extra=RESUME)
    return train_log(out / "run")


def assert_same_curve(reference, resumed, from_step, last=8):
    assert sorted(resumed) == list(range(1, last + 1))
    for step in range(from_step, last + 1):  # every term of every step after the resume point
        for key, value in reference[step].items():
            if key.startswith(("loss", "acc/", "vd/")):
                assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.slow
def test_a_preemption_then_a_crash_each_resume_the_uninterrupted_curve_exactly(tmp_path, synthetic_data, reference):
    """Preemption: the launcher gets SIGTERM after step 4 (and passes it on to its ranks); rank 0 holds it
    at step 4, the ranks learn of it in the all-reduce read at step 5, every rank writes the step-5
    checkpoint and exits. A crash: in the resumed run rank 0 is SIGKILLed right after step 7, between the
    checkpoints of steps 6 and 9, and a folder half-written by the crash is left beside them. Each
    --resume continues from the last complete checkpoint, and every step after it equals the
    uninterrupted run's."""
    log = launch(tmp_path, synthetic_data, ranks=2, steps=8, extra=RESUME,
                 flags=["--inject_fault", "0:4:TERM:launcher"],
                 expect_ok=False)  # the launcher reports the signal; the ranks themselves exit cleanly
    preempted = history(tmp_path / "run", "preempted")
    assert len(preempted) == 1, log[-3000:]
    stopped = preempted[0]["step"]
    ckpt = tmp_path / "run" / "checkpoints"
    assert stopped == 5 and (ckpt / "latest").read_text() == "step_00000005"
    assert json.loads((ckpt / f"step_{stopped:08d}" / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (ckpt / f"step_{stopped:08d}").glob("rank_*.pt")) == ["rank_00000.pt",
                                                                                         "rank_00001.pt"]

    log = launch(tmp_path, synthetic_data, ranks=2, steps=8, extra=RESUME, resume=True,
                 flags=["--inject_fault", "0:7:KILL"], expect_ok=False)
    start = history(tmp_path / "run", "start")[-1]
    assert (start["resumed_from"], start["step"]) == (f"step_{stopped:08d}", stopped)
    assert_same_curve(reference, train_log(tmp_path / "run"), stopped + 1, last=7)
    assert (ckpt / "latest").read_text() == "step_00000006", log[-2000:]
    # A checkpoint folder left half-written by a crash (shards but no meta.json, not in `latest`) is ignored.
    partial = ckpt / "step_00000008"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    launch(tmp_path, synthetic_data, ranks=2, steps=8, extra=RESUME, resume=True)
    start = history(tmp_path / "run", "start")[-1]
    assert (start["resumed_from"], start["step"]) == ("step_00000006", 6)
    assert_same_curve(reference, train_log(tmp_path / "run"), 7)


@pytest.mark.slow
def test_world_size_changes_on_resume_keep_weights_step_and_moments(tmp_path, synthetic_data):
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 10.0,
          "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    extra = ["train.save_every=4", "train.eval_every=0"]
    run = tmp_path / "run"

    def batch(start):
        return start["world_size"], start["micro_batch"], start["accumulation"], start["global_batch"]

    launch(tmp_path, synthetic_data, ranks=2, steps=4, extra=extra, ds_config=ds)
    assert batch(history(run, "start")[0]) == (2, 4, 1, 8)
    saved = history(run, "checkpoint")[-1]
    assert saved["step"] == 4 and saved["replicas_agree"] is True

    # 2 -> 1: converted to a universal checkpoint, then trains on with accumulation 2
    launch(tmp_path, synthetic_data, ranks=1, steps=6, extra=extra, resume=True, ds_config=ds)
    start = history(run, "start")[-1]
    assert (start["resumed_from"], start["universal"], start["step"]) == ("step_00000004_universal", True, 4)
    assert (run / "checkpoints" / "step_00000004_universal" / "zero").is_dir()
    assert same_state(start["digest"], saved["digest"])  # weights and both Adam moments
    assert batch(start) == (1, 4, 2, 8)
    assert sorted(train_log(run))[-2:] == [5, 6]
    saved6 = history(run, "checkpoint")[-1]
    assert saved6["step"] == 6

    # 1 -> 2
    launch(tmp_path, synthetic_data, ranks=2, steps=7, extra=extra, resume=True, ds_config=ds)
    start = history(run, "start")[-1]
    assert (start["resumed_from"], start["step"]) == ("step_00000006_universal", 6)
    assert same_state(start["digest"], saved6["digest"])
    assert batch(start) == (2, 4, 1, 8)
    assert 7 in train_log(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_a_dead_or_hung_rank_stops_the_others_within_the_timeout(tmp_path, synthetic_data, sig):
    timeout_s = 8
    cmd = launch_command(tmp_path, synthetic_data, 10_000, [f"train.collective_timeout_s={timeout_s}",
                                                            "train.eval_every=0"],
                         launcher_args=("--num_gpus", "2", "--master_port", str(free_port())),
                         flags=["--inject_fault", f"1:3:{sig}"])
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    # a guard against a hang of the test itself, not a limit the run must meet: it only ends the processes
    guard = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))
    guard.start()
    try:
        for line in proc.stdout:  # until rank 0 reports the failure (the launcher would then wait 30 s more)
            lines.append(line)
            if "rank 0: a collective failed" in line:
                break
        detected = time.time() - t0
    finally:
        guard.cancel()
        with contextlib.suppress(ProcessLookupError):  # the guard may have ended them already
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank and the launcher
        proc.wait()
    out = "".join(lines)
    assert "rank 0: a collective failed" in out and "train.collective_timeout_s = 8 s" in out, out[-3000:]
    stopped_at = re.findall(r"step (\d+)/10000", out)
    assert stopped_at[-1] == "3", stopped_at  # the fault point, not a timing guess
    if sig == "STOP":  # a hang is detected by the timeout, not before it
        assert detected >= timeout_s


@pytest.mark.slow
def test_a_busy_port_is_named_with_the_way_out(tmp_path, synthetic_data):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = launch_command(tmp_path, synthetic_data, 2, launcher_args=("--num_gpus", "1", "--master_port",
                                                                         str(port)))
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in out and "--master_port" in out, out[-2000:]
    assert "Traceback" not in out.split("is already in use")[0][-2000:]  # the message, not a traceback


SHM_PROBE = '''
import os, torch, deepspeed.comm as ds_comm
from soho_ds.runtime.dist import init_distributed
info = init_distributed(60)
torch.distributed.barrier()  # both ranks are past init: a workspace would exist by now
port = os.environ["MASTER_PORT"]
names = [n for n in os.listdir("/dev/shm") if n.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_")
         and f"_{port}_" in n]
mapped = [line for line in open("/proc/self/maps") if "deepspeed_allreduce_buffer" in line]
built = hasattr(torch.ops.deepspeed, "inference_all_reduce_")
x = torch.full((1000,), float(info.rank + 1))
ds_comm.inference_all_reduce(x)  # the one DeepSpeed call that would use the op: torch.distributed's instead
print(f"rank {info.rank}: workspaces {len(names)} mapped {len(mapped)} op {built} sum {x[0].item()} {x[-1].item()}",
      flush=True)
'''


@pytest.mark.slow
def test_local_runs_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU backend would build its shared-memory all-reduce op (~35 s) and give each rank a
    66 MB workspace in /dev/shm (RAM) that it never unlinks; only its inference all-reduce uses them.
    soho-ds's ranks build neither, and that all-reduce still sums, through torch.distributed."""
    script = tmp_path / "shm_probe.py"
    script.write_text(SHM_PROBE)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: workspaces 0 mapped 0 op False sum 3.0 3.0" in log, log[-3000:]
    assert "deepspeed_shm_comm" not in log  # nothing compiled, nothing loaded
