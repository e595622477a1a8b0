"""The GPU acceptance run: on one CUDA machine, in at most ~8 minutes and with nothing to download beyond
the wheels ../shared/gpu/stage.sh stages, what only a GPU can show; on a CPU the same steps in a tiny
mode, so that the script cannot rot (tests/test_bench.py runs it).

    make gpu-check                     # = python tools/gpu_check.py [--tiny] [--out benchmarks/gpu]

1. DALI's mixed (nvJPEG) decoder on real-size JPEGs: the training loader's images/s, square 384 px
   and SOHO's aspect mode (600/1000, grouped by orientation).
2. A few ZeRO-2 training steps of the full model (ResNet-101 + 12-layer BERT-base, K = 2048) in fp16
   and in bf16, at 384 px and in the 600x1000 aspect mode: images/s, loss finite, loss scale.
3. tools/bench_train.py: the engine vs a plain AMP loop, with channels_last (parameters before
   deepspeed.initialize, or inputs only) and torch.compile of the CNN as options.
4. tools/bench_data.py with the mixed decoder, and tools/bench_inference.py (SOHO vs BUTD vs FPN).
Writes benchmarks/gpu/*.{json,md} (benchmarks/gpu_tiny/ in the tiny mode) and a summary gpu_check.md.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed's op builder rejects Hopper's "9.0a"; torch reports it for H100/H200
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(backbone="resnet18", layers=1, square=64, shorter=64, longer=96, batch=2, steps=2, images=48,
                    photo=(160, 120), stride=32)
    return dict(backbone="resnet101", layers=12, square=384, shorter=600, longer=1000, batch=32, steps=6,
                images=512, photo=(640, 480), stride=64)


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> str:
    """n real-size JPEG photos of the synthetic world (a quarter portrait), checked into shards."""
    from soho_ds.synthetic.shards import make_dataset

    make_dataset(folder, num_train=n, num_val=8, samples_per_shard=max(8, n // 4), image_size=min(size),
                 seed=0, non_square=1.0)
    return str(folder / "train")


def decode_rows(shards: str, s: dict, device: str) -> list[dict]:
    from soho_ds.data.pipeline import ImageSpec, ShardLoader

    rows = []
    for name, spec, grouped in (
            (f"square {s['square']}", ImageSpec(mode="square", image_size=s["square"]), False),
            (f"aspect {s['shorter']}/{s['longer']}, grouped", ImageSpec(mode="aspect", shorter_side=s["shorter"],
                                                                        longer_side=s["longer"], stride=s["stride"]),
             True)):
        loader = ShardLoader(shards, s["batch"], spec, train=True, num_threads=4, seed=0, shuffle_buffer=64,
                             device=device, group_by_orientation=grouped)
        stream = loader.forever()
        for _ in range(2):
            next(stream)
        t0 = time.perf_counter()
        n = 10
        for _ in range(n):
            batch = next(stream)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"check": f"DALI {'mixed' if device == 'cuda' else 'cpu'} decode, {name}",
                     "result": f"{n * s['batch'] / (time.perf_counter() - t0):.0f} images/s",
                     "detail": f"batch {tuple(batch.images.shape)} on {batch.images.device}"})
    return rows


def train_rows(shards: str, s: dict, precisions: list[str]) -> list[dict]:
    from soho_ds.config import ModelConfig, PretrainConfig, TrainConfig
    from soho_ds.data.pipeline import ImageSpec, ShardLoader
    from soho_ds.data.text import PretrainTextBuilder, load_tokenizer
    from soho_ds.pretrain.model import SohoPretrainer
    from soho_ds.runtime.engine import build_engine, compute_dtype, resolve_precision
    from soho_ds.runtime.trainer import to_device

    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = PretrainTextBuilder(load_tokenizer(), 24, 2, 0.15, 0.5, seed=0)
    for precision in precisions:
        for name, spec in ((f"{s['square']} px", ImageSpec(mode="square", image_size=s["square"])),
                           (f"aspect {s['shorter']}/{s['longer']}", ImageSpec(mode="aspect", shorter_side=s["shorter"],
                                                                              longer_side=s["longer"],
                                                                              stride=s["stride"]))):
            torch.manual_seed(0)
            model = SohoPretrainer(ModelConfig(backbone=s["backbone"], num_layers=s["layers"], pool_last=True),
                                   PretrainConfig())
            if device == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ds = resolve_precision({"train_micro_batch_size_per_gpu": s["batch"], "gradient_accumulation_steps": 1,
                                    "gradient_clipping": 10.0, "zero_optimization": {"stage": 2},
                                    "fp16": {"enabled": precision == "fp16", "initial_scale_power": 7}},
                                   device, precision)
            try:
                engine = build_engine(model, TrainConfig(lr=1e-4, warmup_steps=0, max_steps=100), ds)
                loader = ShardLoader(shards, s["batch"], spec, train=True, num_threads=4, seed=0, device=device,
                                     group_by_orientation=spec.mode == "aspect")
                stream = loader.forever()
                losses, t0 = [], None
                for i in range(s["steps"] + 1):
                    raw = next(stream)
                    batch = text([m["captions"] for m in raw.metas])
                    batch.update(images=raw.images, image_sizes=raw.image_sizes)
                    out = engine(to_device(batch, engine.device, compute_dtype(engine)))
                    engine.backward(out["loss"])
                    engine.step()
                    losses.append(out["loss"].detach().float())  # read after the timed loop: no per-step sync
                    if i == 0:  # time from the end of the first (compiling, allocating) step
                        if device == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                if device == "cuda":
                    torch.cuda.synchronize()
                ips = s["steps"] * s["batch"] / (time.perf_counter() - t0)
                losses = torch.stack(losses).cpu().tolist()
                scale = getattr(engine.optimizer, "loss_scale", 1.0)
                rows.append({"check": f"ZeRO-2 {precision}, {s['backbone']} + {s['layers']}-layer BERT, {name}, "
                                      f"batch {s['batch']}",
                             "result": f"{ips:.1f} images/s",
                             "detail": f"losses {losses[0]:.2f} -> {losses[-1]:.2f}, all finite: "
                                       f"{all(torch.isfinite(torch.tensor(losses)))}, loss scale {scale}, "
                                       f"skipped {engine.skipped_steps}"})
            except Exception as e:  # the table says which combination fails and how
                rows.append({"check": f"ZeRO-2 {precision}, {name}", "result": "failed",
                             "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            engine = model = None
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def run_tool(args: list[str], out: Path) -> dict:
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    ok = proc.returncode == 0
    return {"check": " ".join(Path(args[0]).name.split() + args[1:]), "result": "ok" if ok else "failed",
            "detail": f"{time.time() - t0:.0f} s; " + (f"see {out}/{Path(args[0]).stem}.md" if ok
                                                       else proc.stderr.strip().splitlines()[-1][:200])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small sizes (the default without CUDA)")
    p.add_argument("--out", help="report folder (default: benchmarks/gpu, or benchmarks/gpu_tiny)")
    a = p.parse_args()
    on_gpu = torch.cuda.is_available()
    tiny = a.tiny or not on_gpu
    out = Path(a.out or ROOT / "benchmarks" / ("gpu_tiny" if tiny else "gpu"))
    out.mkdir(parents=True, exist_ok=True)
    s = sizes(tiny)
    from soho_ds.bench.report import write_report
    from soho_ds.runtime.dist import init_distributed

    init_distributed()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_photos(Path(tmp), s["images"], s["photo"])
        rows = decode_rows(shards, s, "cuda" if on_gpu else "cpu")
        rows += train_rows(shards, s, ["fp16", "bf16"] if on_gpu else ["bf16", "fp32"])
    small = ["--backbone", s["backbone"], "--layers", str(s["layers"])]
    rows.append(run_tool(["tools/bench_train.py", *small, "--image-size", str(s["square"]), "--batch", str(s["batch"]),
                          "--iters", "1" if tiny else "5", "--options",
                          "channels_last_params,channels_last_params_after,channels_last_inputs,compile_cnn"], out))
    rows.append(run_tool(["tools/bench_data.py", "--image-size", str(s["square"]), "--batch", str(s["batch"]),
                          "--batches", "3" if tiny else "15", "--threads", "2" if tiny else "8"], out))
    rows.append(run_tool(["tools/bench_inference.py", *small, "--height", str(s["shorter"]), "--width",
                          str(s["longer"]), "--throughput-batch", str(s["batch"] if tiny else 64), "--iters",
                          "1" if tiny else "3"], out))
    md = write_report("gpu_check", "GPU acceptance run" + (" (tiny mode)" if tiny else ""),
                      ["check", "result", "detail"], rows,
                      [f"{'tiny mode: ' if tiny else ''}{s['backbone']} + {s['layers']}-layer BERT-base, batch {s['batch']}, "
                       f"{s['images']} synthetic {s['photo'][0]}x{s['photo'][1]} JPEGs; {time.time() - t0:.0f} s in all",
                       f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (DeepSpeed's op builder rejects 9.0a)"],
                      out)
    print(md)


if __name__ == "__main__":
    main()
