"""Soak benchmark: a tiny model for thousands of steps on 2 ranks, through a preemption and a shard that
goes bad mid-run; resident memory and step time at the start and the end of each phase (no leak, no drift).

    python benchmarks/soak.py --steps 3000          # about 10 minutes on 2 CPU cores

Phase 1 trains to half the steps, where the launcher gets SIGTERM (a cluster's preemption): every
rank checkpoints at the next step and exits. Then one shard in the middle of the set is corrupted
(a member's image garbled and the tar rewritten): the resumed run refuses the changed shard and
names the shard; the shards are checked again (the sample is left out) and phase 2 resumes to the
end. Writes benchmarks/soak.{json,md}. Not a test: it measures.
"""
import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from harness import ROOT, TINY_DATA, TINY_MODEL, write_report
from soho_ds.data.shards import index_shards
from soho_ds.synthetic.shards import make_dataset

TINY = TINY_MODEL + TINY_DATA + [
        "train.lr=1e-3", "train.warmup_steps=10", "train.lr_decay=constant", "train.eval_every=0",
        "train.image_log_every=0", "pretrain.itc_weight=0"]


def launch(run: Path, data: Path, steps: int, log_every: int, resume: bool, fault: str | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "launch/pretrain.py", "--deepspeed_config", str(run / "ds.json"),
           "--config", "configs/pretrain_synthetic.yaml", "--precision", "fp32"]
    for s in TINY + [f"data.train_shards={data}/train", "data.val_shards=null", f"train.output_dir={run}",
                     f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.save_every={steps}"]:
        cmd += ["--set", s]
    cmd += (["--resume"] if resume else []) + (["--inject_fault", fault] if fault else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def garble_one_image(tar_path: Path) -> str:
    """Rewrites `tar_path` with its first image's middle replaced by noise (markers intact)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    name, data = next((m.name, d) for m, d in members if m.name.endswith(".jpg"))
    bad = data[:200] + os.urandom(len(data) - 400) + data[-200:]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, d in members:
            d = bad if m.name == name else d
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))
    return name


def phase_rows(run: Path, first: int, last: int) -> list[dict]:
    rows = {}
    for line in (run / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r
    return [rows[s] for s in sorted(rows) if first <= s <= last]


def summary(name: str, rows: list[dict]) -> dict:
    start, end = rows[1], rows[-1]  # the first logged interval includes start-up
    return {"phase": name, "steps": f"{rows[0]['step']}-{end['step']}",
            "RSS GiB start": start["perf/rss_gib"], "RSS GiB end": end["perf/rss_gib"],
            "img/s start": start["perf/img_per_s"], "img/s end": end["perf/img_per_s"],
            "loss start": start["loss"], "loss end": end["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    half = a.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, run = tmp / "data", tmp / "run"
        make_dataset(data, num_train=400, num_val=8, samples_per_shard=50, image_size=64, seed=0, non_square=0.3)
        run.mkdir()
        (run / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
                                                 "gradient_clipping": 10.0}))
        first = launch(run, data, a.steps, a.log_every, False, fault=f"0:{half}:TERM:launcher")
        stopped = [line for line in first.stdout.splitlines() if "SIGTERM: checkpoint" in line]
        assert stopped, first.stdout[-3000:] + first.stderr[-3000:]
        tag = (run / "checkpoints" / "latest").read_text()
        bad_shard = sorted((data / "train").glob("*.tar"))[4]
        member = garble_one_image(bad_shard)
        refused = launch(run, data, a.steps, a.log_every, True)
        refusal = next((line for line in (refused.stdout + refused.stderr).splitlines() if "changed after it was indexed" in line), "")
        assert refused.returncode != 0 and refusal, refused.stdout[-3000:]
        report = index_shards(str(data / "train"))
        second = launch(run, data, a.steps, a.log_every, True)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        stopped_at = int(tag.split("_")[1])
        rows = [summary("1: start to SIGTERM", phase_rows(run, 1, stopped_at)),
                summary("2: resumed after re-index", phase_rows(run, stopped_at + 1, a.steps))]
    notes = [f"tiny model (ResNet-18, 2 BERT layers of 64), micro-batch 4 on each of 2 ranks (gloo), fp32, "
             f"{a.steps} steps; RSS is the mean over ranks of each process's resident memory",
             f"SIGTERM to the launcher after step {half}: {stopped[0].split('] ', 1)[-1]}",
             f"then {bad_shard.name}:{member} garbled; the resumed run refused: "
             f"{refusal.split('] ', 1)[-1].strip()[:160]}",
             f"re-indexed: {report['kept']} kept, {report['skipped']} left out; phase 2 resumed from {tag} to the end"]
    print(write_report("soak", "Soak: memory and step time over a long run", list(rows[0]), rows, notes, a.out))


if __name__ == "__main__":
    main()
