"""The compute planner on a recorded throughput: steps, epochs, hours and GPU-hours against hand-computed
figures, from a run's train.jsonl and from a benchmark report."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from launching import ENV
from soho_ds.bench.plan import PlanError, dataset_images, measured_images_per_s, plan
from soho_ds.config import load_config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from soho_ds.data.shards import index_shards
    from soho_ds.synthetic.shards import make_dataset

    root = tmp_path_factory.mktemp("plan")
    make_dataset(root, num_train=24, num_val=2, samples_per_shard=12, image_size=32, seed=1)
    index_shards(f"{root}/train")
    # a 2-GPU run's log: the first interval holds the start-up, the others 40, 44 and 42 images/s
    (root / "train.jsonl").write_text("\n".join(json.dumps({"step": s, "perf/img_per_s": v})
                                                for s, v in ((10, 9.0), (20, 40.0), (30, 44.0), (40, 42.0))))
    (root / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                                              "gradient_accumulation_steps": 2}))
    return root


def test_plan_from_a_runs_log_matches_the_hand_computed_budget(recorded):
    cfg = load_config(ROOT / "configs/pretrain_synthetic.yaml",
                      [f"data.train_shards={recorded}/train", "train.max_steps=900", "model.bert_dir=null",
                       "model.backbone_weights=null"])
    images = dataset_images(cfg.data.train_shards)
    per_gpu = measured_images_per_s(recorded / "train.jsonl", measured_on=2)
    assert images == 24 and per_gpu == 21.0  # median of 40, 44, 42 over 2 GPUs
    one, four = plan(cfg, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, images, per_gpu,
                     [1, 4], efficiency=0.5)
    # 1 GPU: batch 4 x 2 = 8, 900 steps = 7,200 images = 300 epochs; 7,200 / (21 x 0.5) s
    assert (one.global_batch, one.steps, one.epochs) == (8, 900, 300.0)
    assert one.hours == pytest.approx(7200 / 10.5 / 3600) and one.gpu_hours == pytest.approx(one.hours)
    # 4 GPUs: batch 32, 28,800 images = 1,200 epochs, at 4 x 10.5 images/s
    assert (four.global_batch, four.epochs) == (32, 1200.0)
    assert four.hours == pytest.approx(28800 / 42 / 3600) and four.gpu_hours == pytest.approx(4 * four.hours)
    fixed = plan(cfg, {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, images, per_gpu, [8])[0]
    assert (fixed.global_batch, fixed.epochs) == (64, 2400.0)  # the JSON's global batch at any GPU count


def test_a_weighted_mix_gets_each_sources_epochs(recorded):
    from soho_ds.bench.plan import format_plan, source_sizes

    cfg = load_config(ROOT / "configs/pretrain_synthetic.yaml",
                      [f"data.train_shards=[{{name: a, shards: {recorded}/train/000000.tar, weight: 3}}, "
                       f"{{name: b, shards: {recorded}/train/000001.tar, weight: 1}}]", "train.max_steps=900",
                       "model.bert_dir=null", "model.backbone_weights=null"])
    sources = source_sizes(cfg)
    assert sources == [("a", 12, 0.75), ("b", 12, 0.25)]
    rows = plan(cfg, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 24, 21.0, [1])
    text = format_plan(rows, 24, 21.0, sources)
    # 900 steps x 8 images = 7,200: a draws 75% = 5,400 images = 450 epochs of 12; b 1,800 = 150 epochs
    assert "| 1 | 450.00 | 150.00 |" in text and "a (12 images, 75% of batches)" in text


def test_plan_tool_reads_a_benchmark_report_and_refuses_what_it_cannot_use(recorded, tmp_path):
    report = ROOT / "benchmarks/bench_train.json"
    deepspeed_row = next(r for r in json.loads(report.read_text())["rows"] if "DeepSpeed" in r["loop"])
    assert measured_images_per_s(report, 1) == deepspeed_row["images/s"]
    out = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), "--config",
                          str(ROOT / "configs/pretrain_synthetic.yaml"),
                          "--deepspeed_config", str(recorded / "ds.json"),
                          "--set", f"data.train_shards={recorded}/train", "--set", "train.max_steps=900",
                          "--set", "model.bert_dir=null", "--set", "model.backbone_weights=null",
                          "--from", str(recorded / "train.jsonl"), "--measured-on", "2", "--gpus", "1", "4"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dataset: 24 images (one epoch); measured 21.00 images/s per GPU" in out.stdout
    assert "| 1 | 8 | 900 | 300.00 | 0.1 | 0 | 120 |" in out.stdout  # 40 epochs of 24 at batch 8: 120 steps
    assert "| 4 | 32 | 900 | 1200.00 | 0.1 | 0 | 30 |" in out.stdout
    assert "ViLT-B/32 (4M images): 64 V100" in out.stdout
    with pytest.raises(PlanError, match=r"not indexed, so their size is unknown; run soho-index-shards"):
        (tmp_path / "raw").mkdir()
        (tmp_path / "raw/000000.tar").write_bytes((recorded / "train/000000.tar").read_bytes())
        dataset_images(f"{tmp_path}/raw")
    with pytest.raises(PlanError, match=r"fewer than 2 logged intervals"):
        (tmp_path / "short.jsonl").write_text(json.dumps({"perf/img_per_s": 3.0}))
        measured_images_per_s(tmp_path / "short.jsonl", 1)
