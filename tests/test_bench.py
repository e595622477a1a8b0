"""The benchmark tools run end to end and report what they measured (no speed is asserted here)."""
import json
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
    out = run_tool(["tools/bench_vd.py", "--sizes", "64,128", "--backbone", "resnet18", "--layers", "1",
                    "--image-size", "64", "--batch", "2", "--iters", "1"], tmp_path)
    report = json.loads((tmp_path / "bench_vd.json").read_text())
    assert [r["K"] for r in report["rows"]] == [64, 128]
    for r in report["rows"]:
        assert 0 < r["VD lookup+update ms"] and 0 < r["VD share of step %"] < 100
    assert "VD share of step %" in (tmp_path / "bench_vd.md").read_text() and "| 128 |" in out


def test_bench_data_compares_dali_with_the_dataloader_on_the_same_shards(tmp_path, synthetic_data):
    run_tool(["tools/bench_data.py", "--shards", str(synthetic_data / "train"), "--image-size", "32", "--batch", "8",
              "--batches", "2", "--threads", "1"], tmp_path)
    rows = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert [r["loader"].split()[0] for r in rows] == ["DALI", "PIL"]
    assert rows[1]["ratio"] == 1.0 and rows[0]["images/s"] > 0
    assert rows[0]["ratio"] == rows[0]["images/s"] / rows[1]["images/s"]


def test_bench_train_runs_both_loops_on_the_same_model(tmp_path):
    run_tool(["tools/bench_train.py", "--backbone", "resnet18", "--layers", "1", "--image-size", "64", "--batch", "2",
              "--iters", "1"], tmp_path)
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert [r["loop"].split(" ")[0] for r in rows] == ["plain", "plain", "DeepSpeed"]
    assert rows[0]["loop"].endswith(", AdamW") and rows[1]["loop"].endswith(", fused AdamW")
    assert rows[2]["loop"].startswith("DeepSpeed ZeRO-2") and rows[2]["loop"].endswith(", fused AdamW")
    assert rows[0]["GFLOP/image"] == rows[1]["GFLOP/image"] == rows[2]["GFLOP/image"] > 0  # same model and batch
    assert all(r["images/s"] > 0 and r["peak memory GiB"] > 0 and 0 < r["MFU %"] < 100 for r in rows)


@pytest.mark.slow
def test_bench_inference_times_both_pipelines(tmp_path):
    run_tool(["tools/bench_inference.py", "--backbone", "resnet18", "--layers", "1", "--height", "200", "--width", "320",
              "--throughput-batch", "2", "--iters", "1"], tmp_path)
    rows = json.loads((tmp_path / "bench_inference.json").read_text())["rows"]
    assert rows[0]["pipeline"].startswith("SOHO") and rows[1]["pipeline"].startswith("region features")
    assert all(r["batch-1 latency ms"] > 0 and r["batch-2 images/s"] > 0 for r in rows)
    assert rows[0]["speed-up"] == rows[1]["batch-1 latency ms"] / rows[0]["batch-1 latency ms"]
