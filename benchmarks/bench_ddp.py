"""DeepSpeed ZeRO-2 against DistributedDataParallel, the loop users would otherwise write: the same model,
batch and precision on the same ranks, launched the same way (the deepspeed launcher).

    python benchmarks/bench_ddp.py                      # 2 ranks, ResNet-50 + 12-layer BERT-base, 224 px, fp32
    python benchmarks/bench_ddp.py --variants ddp,zero2 --iters 3 --image-size 96 --layers 2 --backbone resnet18

Each variant runs in its own launch: DDP (torch.nn.parallel.DistributedDataParallel + torch's fused
AdamW + norm clipping) and ZeRO-2 with the settings in VARIANTS (bucket sizes, overlap_comm,
contiguous_gradients, reduce_scatter). Reported: images/s over both ranks and each rank's peak
resident memory (reset after the warm-up step). Writes benchmarks/bench_ddp.{json,md}.
"""
import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import ROOT, peak_memory_gib, pretraining_batch
BASE = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
VARIANTS = {
    "ddp": None,
    "zero2": {},  # ds_configs/zero2.json's ZeRO settings
    "zero2_no_overlap": {"overlap_comm": False},
    "zero2_no_contiguous": {"contiguous_gradients": False},
    "zero2_allreduce": {"reduce_scatter": False},
    "zero2_big_buckets": {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000},
    "zero2_small_buckets": {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000},
    "zero2_cpu_tuned": {"contiguous_gradients": False, "overlap_comm": False, "reduce_bucket_size": 5_000_000,
                        "allgather_bucket_size": 5_000_000},
    "zero2_cpu_tuned_allreduce": {"contiguous_gradients": False, "overlap_comm": False, "reduce_scatter": False,
                                  "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000},
}



def worker(a) -> None:
    import torch.distributed as dist

    from soho_ds.config import ModelConfig, PretrainConfig, TrainConfig
    from soho_ds.pretrain.model import SohoPretrainer
    from soho_ds.runtime.dist import init_distributed
    from soho_ds.runtime.engine import build_engine, build_optimizer

    info = init_distributed()
    torch.manual_seed(0)
    batch = pretraining_batch(a.batch, a.image_size, "cpu", seed=info.rank)
    module = SohoPretrainer(ModelConfig(backbone=a.backbone, num_layers=a.layers, pool_last=False, dropout=0.0),
                            PretrainConfig())
    cfg = TrainConfig(lr=1e-5, warmup_steps=0, lr_decay="constant", max_steps=1000)
    if a.variant == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = build_optimizer(module, cfg)  # the engine's own: torch's fused AdamW over the same groups

        def step():
            loss = module.commit(model(batch))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
            optimizer.step()
    else:
        zero = {**BASE, **VARIANTS[a.variant]}
        engine = build_engine(module, cfg, {"train_micro_batch_size_per_gpu": a.batch,
                                            "gradient_accumulation_steps": 1, "gradient_clipping": 10.0,
                                            "zero_optimization": zero})

        def step():
            engine.backward(engine.module.commit(engine(batch))["loss"])
            engine.step()

    step()  # warm-up: buffers, optimizer state
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, peak_memory_gib("cpu"))
    if info.rank == 0:
        print("RESULT " + json.dumps({"variant": a.variant, "images/s": a.batch * info.world_size * a.iters / seconds,
                                      "peak RSS GiB per rank": max(peaks), "ranks": info.world_size}), flush=True)
    gc.freeze()  # the exit then skips a collection over torch's millions of objects (~1.5 s a rank)


def launch(a, variant: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(a.ranks), "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", "--variant", variant, "--batch", str(a.batch), "--iters",
           str(a.iters), "--image-size", str(a.image_size), "--layers", str(a.layers), "--backbone", a.backbone]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // a.ranks))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="ddp")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4, help="images per rank per step (2 captions each)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from harness import write_report

    rows = []
    for variant in a.variants.split(","):
        row = launch(a, variant)
        row["settings"] = "DDP, fused AdamW" if variant == "ddp" else ", ".join(
            f"{k}={v}" for k, v in VARIANTS[variant].items()) or "zero2.json's ZeRO settings"
        rows.append(row)
        print(row, flush=True)
    ddp = next((r for r in rows if r["variant"] == "ddp"), rows[0])
    for r in rows:
        r["vs DDP images/s"] = r["images/s"] / ddp["images/s"]
        r["vs DDP memory"] = r["peak RSS GiB per rank"] / ddp["peak RSS GiB per rank"]
    md = write_report("bench_ddp", "DeepSpeed ZeRO-2 vs DistributedDataParallel",
                      ["variant", "settings", "images/s", "vs DDP images/s", "peak RSS GiB per rank", "vs DDP memory"],
                      rows, [f"{a.ranks} ranks on one machine (gloo), {a.backbone} + {a.layers}-layer BERT-base + VD + "
                             f"heads, {a.image_size} px, {a.batch} images x 2 captions per rank, fp32, {a.iters} timed "
                             "steps after one warm-up; both sides clip gradients at 10 and use torch's fused AdamW",
                             "targets on this CPU: ZeRO-2 >= 1.0x DDP in images/s, below DDP in memory per rank"], a.out)
    print(md)


if __name__ == "__main__":
    main()
