"""The benchmark tools run end to end and report what they measured (no speed is asserted here)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT


# an in-process test may have made this process a world of one; each tool makes its own
WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_tool(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS}
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_vd_reports_each_dictionary_size(tmp_path):
    out = run_tool(["benchmarks/bench_vd.py", "--sizes", "64,128", "--backbone", "resnet18", "--layers", "1",
                    "--image-size", "64", "--batch", "2", "--iters", "1"], tmp_path)
    report = json.loads((tmp_path / "bench_vd.json").read_text())
    assert [r["K"] for r in report["rows"]] == [64, 128]
    # what was timed: 2 images of 64 px through ResNet-18 (stride 32, last stage not pooled): 2 x 2 x 2 features
    assert [r["features per step"] for r in report["rows"]] == [8, 8]
    assert "VD share of step %" in (tmp_path / "bench_vd.md").read_text() and "| 128 |" in out


def test_bench_data_compares_dali_with_the_dataloader_on_the_same_shards(tmp_path, synthetic_data):
    run_tool(["benchmarks/bench_data.py", "--shards", str(synthetic_data / "train"), "--image-size", "32", "--batch", "8",
              "--batches", "2", "--threads", "1"], tmp_path)
    rows = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert [r["loader"].split()[0] for r in rows] == ["DALI", "PIL"]
    assert rows[1]["ratio"] == 1.0  # the baseline, side by side in the same process


@pytest.mark.slow
def test_gpu_check_drives_the_production_path_in_tiny_mode(tmp_path):
    """The GPU acceptance run on a CPU (tiny sizes): pretraining through `deepspeed launch/pretrain.py`
    under each shipped DeepSpeed JSON, the overlap_comm comparison, VQA and NLVR2 finetunes from that
    checkpoint through their drivers, load_model and soho-retrieve, then the benchmarks; every
    figure of a run is the run's own log."""
    keep = tmp_path / "work"
    out = run_tool(["benchmarks/gpu_check.py", "--tiny", "--keep", str(keep)], tmp_path)
    assert "GPU acceptance run (tiny mode)" in out
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    runs = ["pretrain fp16 (zero2.json)", "pretrain bf16 (zero2_bf16.json)", "pretrain fp16, overlap_comm on"]
    assert list(rows)[:4] == runs + ["overlap_comm on vs off (fp16)"]
    for i, name in enumerate(runs):
        console = (keep / f"pretrain{i}.log").read_text()
        assert "training from step 0 to 4; world size 1" in console  # the real driver, the real loop
        log = [json.loads(line) for line in (keep / f"pretrain{i}" / "train.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 4]
        images_per_s = sum(r["perf/img_per_s"] for r in log[1:]) / 2
        assert rows[name]["result"] == f"{images_per_s:.1f} images/s"
        assert f"skipped steps {int(log[-1]['train/skipped_steps'])}" in rows[name]["detail"]
        assert all(0 < r["perf/mfu"] < 1 and 0 <= r["perf/data_wait_share"] < 1 for r in log)
    assert rows["overlap_comm on vs off (fp16)"]["result"] == "identical losses"  # the CPU has no streams
    for task in ("vqa", "nlvr2"):
        row = rows[f"finetune {task} from the pretraining checkpoint"]
        assert row["result"] == "ok", row
        console = (keep / f"finetune_{task}.log").read_text()
        assert f"initialised from {keep}/pretrain0/checkpoints" in console
    assert rows["load_model + itm on cpu"]["result"] == "ok" and rows["soho-retrieve on cpu"]["result"] == "ok"
    assert [rows[b]["result"] for b in ("bench_data", "bench_train", "bench_inference")] == ["ok", "ok", "ok"]
    data = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert data[-1]["loader"].startswith("DALI aspect 64/96, CPU decode") and data[-1]["images/s"] > 0

    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert [r["loop"].split(" ")[0] for r in rows[:3]] == ["plain", "plain", "DeepSpeed"]
    assert rows[0]["loop"].endswith(", AdamW") and rows[1]["loop"].endswith(", fused AdamW")
    precision = rows[2]["loop"].split()[2].rstrip(",")  # both sides in the engine's precision
    assert rows[0]["loop"] == f"plain PyTorch {'fp32' if precision == 'fp32' else 'AMP ' + precision}, AdamW"
    assert len({r["GFLOP/image"] for r in rows}) == 1 and rows[0]["GFLOP/image"] > 0  # same model and batch
    assert all(r["images/s"] > 0 and r["peak memory GiB"] > 0 for r in rows[:3])
    # MFU where the CPU reports its clock, and then a fraction of a peak that is not undercounted
    assert all(math.isnan(r["MFU %"]) or 0 < r["MFU %"] < 100 for r in rows[:3])
    train = {r["loop"]: r for r in rows}
    before = next(r for k, r in train.items() if k.endswith("channels_last parameters (before initialize)"))
    inputs = next(r for k, r in train.items() if k.endswith("channels_last inputs"))
    assert before["note"].startswith("failed:") and "view" in before["note"]  # ZeRO's known start-up failure
    assert inputs["images/s"] > 0 and not inputs.get("note")
    inference = json.loads((tmp_path / "bench_inference.json").read_text())["rows"]
    assert [r["pipeline"].split(" (")[0].split(",")[0] for r in inference] == ["SOHO", "region features",
                                                                              "region features"]
    assert "BUTD (R101-C4, 30 proposals" in inference[1]["pipeline"] and "FPN" in inference[2]["pipeline"]
    assert inference[0]["SOHO speed-up, batch 1"] == 1  # SOHO is the baseline of the comparison


@pytest.mark.slow
def test_bench_ddp_runs_ddp_and_zero2_on_two_ranks(tmp_path):
    run_tool(["benchmarks/bench_ddp.py", "--variants", "ddp,zero2_cpu_tuned", "--iters", "1", "--image-size", "64",
              "--layers", "1", "--backbone", "resnet18", "--batch", "2"], tmp_path)
    rows = json.loads((tmp_path / "bench_ddp.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["ddp", "zero2_cpu_tuned"] and all(r["ranks"] == 2 for r in rows)
    assert rows[0]["vs DDP images/s"] == 1 and rows[0]["vs DDP memory"] == 1  # DDP is the baseline
    assert "contiguous_gradients=False" in rows[1]["settings"]


@pytest.mark.slow
def test_bench_retrieval_times_search_and_measures_the_first_stage_recall(tmp_path, grounded, grounded_retrieval):
    run_tool(["benchmarks/bench_retrieval.py", "--model", str(grounded_retrieval["checkpoint"]), "--downstream",
              str(grounded["downstream"]), "--num-images", "8", "--queries", "2", "--first-stage", "4",
              "--recall-first-stage", "5,20"], tmp_path)
    timing = json.loads((tmp_path / "bench_retrieval.json").read_text())["rows"]
    assert [r["ranking"] for r in timing] == ["ITM over all", "ITC first stage, ITM on the best 4"]
    assert all(r["images"] == 8 for r in timing)
    full, top5, top_all = json.loads((tmp_path / "bench_retrieval_recall.json").read_text())["rows"]
    # a first stage that keeps all 20 test images changes nothing
    assert {k: top_all[k] for k in ("t2i R@1", "t2i R@5", "t2i R@10")} == \
        {k: full[k] for k in ("t2i R@1", "t2i R@5", "t2i R@10")} and top_all["R@1 lost"] == 0
    assert top5["R@1 lost"] == full["t2i R@1"] - top5["t2i R@1"]
    # the same model and test split as the finetune driver's evaluation (batching differs: border effect)
    assert abs(full["t2i R@10"] - grounded_retrieval["metrics"]["t2i_r10"]) <= 5, (full, grounded_retrieval["metrics"])
