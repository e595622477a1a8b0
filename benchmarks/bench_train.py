"""Training step: the DeepSpeed ZeRO-2 engine vs a plain PyTorch AMP loop, same model, batch, device.

    python benchmarks/bench_train.py                                   # CPU: ResNet-50, 12 layers, 224 px, batch 4
    python benchmarks/bench_train.py --backbone resnet101 --image-size 384 --batch 64   # the H100 setting

Both sides train the full SOHO pretraining model (CNN + VD + 12-layer BERT + heads) on the
same batch and in the same precision: the engine's is resolved first (--precision; auto = the
JSON's fp16 on a GPU, bf16 or fp32 on a CPU) and the plain loop runs `torch.autocast` in that
dtype (fp16 with a GradScaler), or no autocast for fp32, + AdamW, once with torch's
default implementation (the baseline) and once with its fused kernel (the optimizer the engine
gets, so the engine's own cost shows apart from the optimizer's); DeepSpeed = `build_engine`
with ds_configs/zero2.json's ZeRO settings, one rank. Reports images/s,
peak memory (GPU: max allocated; CPU: peak RSS of each phase, reset through
/proc/self/clear_refs), model FLOPs per image (torch's FlopCounterMode, forward + backward)
and achieved FLOP/s as a fraction of the device peak (MFU). Writes benchmarks/bench_train.{json,md}.
"""
import argparse
import copy
import gc
import json
from pathlib import Path

import torch

from harness import ROOT, peak_memory_gib, pretraining_batch, reset_peak_memory, sync, time_per_call, write_report
from soho_ds.pretrain.model import SohoPretrainer
from soho_ds.config import ModelConfig, PretrainConfig, TrainConfig
from soho_ds.runtime.dist import init_distributed
from soho_ds.runtime.engine import build_engine, compute_dtype, resolve_precision
from soho_ds.runtime.perf import device_peak_flops



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs; CPU: cores x clock x 32)")
    p.add_argument("--deepspeed_config", default=str(ROOT / "ds_configs/zero2.json"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="the engine's (auto: the JSON's on a GPU, bf16 or fp32 on a CPU)")
    p.add_argument("--options", default="",
                   help="extra engine rows (comma-separated): channels_last_params, channels_last_params_after, "
                        "channels_last_inputs, compile_cnn")
    p.add_argument("--tokenizer-dir", help="WordPiece vocab folder (default: bert-base-uncased's, packaged)")
    p.add_argument("--out", default="benchmarks")
    a = p.parse_args()
    dist_info = init_distributed()
    device = dist_info.device
    torch.manual_seed(0)
    batch = pretraining_batch(a.batch, a.image_size, device, tokenizer_dir=a.tokenizer_dir)
    images = batch.pop("images")
    cfg = ModelConfig(backbone=a.backbone, num_layers=a.layers, pool_last=False, dropout=0.0)
    base = SohoPretrainer(cfg, PretrainConfig())
    rows = []
    ds = json.loads(Path(a.deepspeed_config).read_text())
    ds.update(train_batch_size=a.batch, train_micro_batch_size_per_gpu=a.batch, gradient_accumulation_steps=1)
    ds = resolve_precision(ds, device.type, a.precision)
    name = "fp16" if ds["fp16"]["enabled"] else "bf16" if ds["bf16"]["enabled"] else "fp32"
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)

    # --- plain PyTorch AMP loops: torch's default AdamW (the baseline), then the fused AdamW kernel
    # that build_engine gives the engine, so the engine's own overhead is visible separately
    flops_per_image = None
    for fused in (False, True):
        plain = copy.deepcopy(base).to(device).train()
        opt = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-5, fused=fused)
        scaler = torch.amp.GradScaler(enabled=name == "fp16")

        def plain_step():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = plain.commit(plain({**batch, "images": images}))["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        if flops_per_image is None:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                plain_step()
            flops_per_image = counter.get_total_flops() / a.batch
        reset_peak_memory()
        t = time_per_call(plain_step, a.iters, warmup=1)
        rows.append({"loop": "plain PyTorch " + (f"AMP {name}" if amp_dtype else "fp32")
                             + (", fused AdamW" if fused else ", AdamW"),
                     "images/s": a.batch / t, "peak memory GiB": peak_memory_gib()})
        plain = opt = None  # frees the model before the next phase (the closure holds the names)
        sync()

    # --- DeepSpeed ZeRO-2 engine, the project's own build_engine; with --options also the GPU candidates:
    # channels_last (ZeRO's start-up broadcast is known to fail on channels_last 16-bit parameters, so
    # three placements are tried) and torch.compile of the CNN
    for option in ["engine"] + [o for o in a.options.split(",") if o]:
        module = copy.deepcopy(base)
        inputs = images
        try:
            if option == "channels_last_params":  # before deepspeed.initialize
                module = module.to(memory_format=torch.channels_last)
            if option == "compile_cnn":
                module.model.backbone.compile()
            engine = build_engine(module, TrainConfig(lr=1e-5, warmup_steps=0, max_steps=10**6), ds)
            dtype = compute_dtype(engine)
            if option == "channels_last_params_after":
                engine.module.to(memory_format=torch.channels_last)
            if option == "channels_last_inputs":  # the parameters stay ZeRO's contiguous views
                inputs = images.contiguous(memory_format=torch.channels_last)

            def ds_step():
                out = engine.module.commit(engine({**batch, "images": inputs.to(dtype)}))
                engine.backward(out["loss"])
                engine.step()

            reset_peak_memory()
            t = time_per_call(ds_step, a.iters, warmup=1)
            row = {"images/s": a.batch / t, "peak memory GiB": peak_memory_gib()}
            if option == "channels_last_params_after":
                # ZeRO-1/2 re-points every parameter at its flat fp16/bf16 buffer after each step,
                # which is contiguous: the conversion does not survive the first step
                conv = next(q for q in engine.module.parameters() if q.dim() == 4)
                kept = conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
                row["note"] = f"after {a.iters + 1} steps the conv weights are channels_last: {kept}"
        except Exception as e:  # a row of the table: which option fails, and how
            row = {"images/s": float("nan"), "peak memory GiB": float("nan"),
                   "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        label = {"engine": "", "channels_last_params": ", channels_last parameters (before initialize)",
                 "channels_last_params_after": ", channels_last parameters (after initialize)",
                 "channels_last_inputs": ", channels_last inputs", "compile_cnn": ", torch.compile(CNN)"}[option]
        rows.append({"loop": f"DeepSpeed ZeRO-{ds['zero_optimization']['stage']} {name}, fused AdamW{label}", **row})
        engine = module = ds_step = None  # frees this engine before the next row's
        gc.collect()
        sync()
    peak = device_peak_flops("cuda" if torch.cuda.is_available() else "cpu", name, a.peak_tflops)
    for r in rows:
        r["ratio vs plain"] = r["images/s"] / rows[0]["images/s"]
        r["GFLOP/image"] = flops_per_image / 1e9
        r["MFU %"] = 100 * r["images/s"] * flops_per_image / peak if peak else float("nan")
    md = write_report(
        "bench_train", "Training step: DeepSpeed engine vs plain PyTorch loop",
        ["loop", "images/s", "ratio vs plain", "peak memory GiB", "GFLOP/image", "MFU %", "note"], rows,
        [f"SOHO pretraining model: {a.backbone} + {a.layers}-layer BERT-base + VD (K=2048) + MLM/MVM/ITM heads, "
         f"{a.image_size} px, batch {a.batch}, 2 captions per image, one rank",
         "FLOPs counted by torch.utils.flop_counter (forward + backward); " + (
             f"device peak {peak / 1e12:.2f} TFLOP/s" if peak else
             "MFU not given: this CPU does not report its clock (pass --peak-tflops)"),
         "CPU peak memory is the process's peak RSS during each phase (the plain model is freed first; an "
         "engine's DeepSpeed state is not wholly released in-process, so option rows' memory includes the "
         "earlier engines' and is comparable only with the first engine row's by running one option alone)"], a.out)
    print(md)


if __name__ == "__main__":
    main()
