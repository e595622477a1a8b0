"""End to end through the real entry point: `deepspeed launch/pretrain.py` with two CPU ranks (gloo)."""
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port
from launching import ENV, history, launch, launch_command, train_log

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, synthetic_data):
    tmp = tmp_path_factory.mktemp("zero2")
    return tmp, launch(tmp, synthetic_data, ranks=2, steps=20,
                       extra=["train.save_every=10", "train.image_log_every=10"])


@pytest.mark.slow
def test_two_rank_zero2_run_lowers_the_loss(two_rank_run):
    tmp, _ = two_rank_run
    start = history(tmp / "run", "start")[0]
    assert start["world_size"] == 2 and [r["local_rank"] for r in start["ranks"]] == [0, 1]
    # The MLM term is the steady signal over a few steps (MVM targets shift as the VD moves); a step's MLM
    # loss is over a dozen masked words (a step whose captions are mostly ITM negatives has few), so the
    # first and last five steps are compared by their medians: from about ln(vocabulary) = 10.3, down by
    # a tenth, and every one of the last five below the first five's median.
    mlm = {step: row["loss/mlm"] for step, row in train_log(tmp / "run").items()}
    assert sorted(mlm) == list(range(1, 21))
    first, last = (statistics.median(mlm[s] for s in steps) for steps in (range(1, 6), range(16, 21)))
    curve = " ".join(f"{s}:{v}" for s, v in sorted(mlm.items()))
    assert last < 0.9 * first and max(mlm[s] for s in range(16, 21)) < first, curve
    saved = history(tmp / "run", "checkpoint")
    assert [(c["step"], c["replicas_agree"]) for c in saved][:2] == [(10, True), (20, True)]


@pytest.mark.slow
def test_checkpoint_loads_back_to_the_same_weights(two_rank_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from soho_ds.config import load_config
    from soho_ds.models.weights import load_checked
    from soho_ds.pretrain.model import SohoPretrainer

    tmp, _ = two_rank_run
    ckpt = tmp / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000020"
    assert (ckpt / "step_00000010").is_dir()
    # The fp32 master weights, gathered from both ranks' ZeRO-2 optimizer shards ...
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step_00000020")
    # ... equal the module weights the engine saved (fp32 training: bit-identical).
    module_state = torch.load(ckpt / "step_00000020" / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)["module"]
    for k, v in master.items():
        assert torch.equal(v, module_state[k].float()), k
    # and they load, key for key, into a freshly built model from the saved run config.
    cfg = load_config(ckpt / "step_00000020" / "run_config.yaml")
    model = SohoPretrainer(cfg.model, cfg.pretrain)
    load_checked(model, module_state, "checkpoint")
    assert torch.equal(model.model.visual_dictionary.embed, module_state["model.visual.vd.embed"])


@pytest.mark.slow
def test_tensorboard_has_every_training_scalar(two_rank_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = two_rank_run
    events = EventAccumulator(str(tmp / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "loss/mlm", "loss/mvm", "loss/itm", "acc/itm", "train/lr_transformer", "train/lr_cnn",
                "train/lr_head", "train/loss_scale",
                "train/grad_norm", "train/skipped_steps", "perf/img_per_s", "vd/usage", "vd/dead_entries",
                "val/acc/itm"):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in events.Scalars("loss/mlm")][:20] == list(range(1, 21))
    assert 0.0 < events.Scalars("vd/usage")[-1].value <= 1.0
    assert events.Scalars("train/grad_norm")[-1].value > 0
    # pictures: images with a caption and the VD index map, at steps 10 and 20; a histogram of entry use
    images = events.Tags()["images"]
    assert {"pictures/0", "pictures/3"} <= set(images)
    assert [e.step for e in events.Images("pictures/0")] == [10, 20]
    picture = events.Images("pictures/0")[-1]
    assert picture.width >= 2 * 64 and picture.height > 64  # image and overlay side by side, caption below
    assert "vd/entry_count" in events.Tags()["histograms"]
    # memory: the fullest rank's device memory and each rank's host memory, every interval
    for tag in ("perf/memory_gib", "perf/memory_gib_max", "perf/rss_gib"):
        assert [e.step for e in events.Scalars(tag)][:20] == list(range(1, 21)) and events.Scalars(tag)[-1].value > 0
    # the run config and the DeepSpeed JSON as text: what this run was, next to its curves
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
             if tag.startswith("config/")}
    assert "max_steps: 20" in texts["config/run/text_summary"] and "save_every: 10" in texts["config/run/text_summary"]
    assert "train_micro_batch_size_per_gpu: 4" in texts["config/deepspeed/text_summary"]


@pytest.mark.slow
def test_consolidate_tool_writes_a_plain_state_dict_that_loads_without_deepspeed(two_rank_run):
    from soho_ds.config import load_config
    from soho_ds.pretrain.model import SohoPretrainer

    tmp, _ = two_rank_run
    ckpt, out = tmp / "run" / "checkpoints", tmp / "consolidated.pt"
    proc = subprocess.run([sys.executable, "tools/consolidate_checkpoint.py", str(ckpt), str(out),
                           "--tag", "step_00000020"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(out, weights_only=True)
    assert out.with_suffix(".yaml").read_text() == (ckpt / "step_00000020" / "run_config.yaml").read_text()
    cfg = load_config(out.with_suffix(".yaml"))
    model = SohoPretrainer(cfg.model, cfg.pretrain)
    model.load_state_dict(state)  # strict: every key, every shape
    saved = torch.load(ckpt / "step_00000020" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    assert all(torch.equal(model.state_dict()[k].float(), saved[k].float()) for k in saved)


@pytest.mark.slow
def test_two_nodes_on_localhost_train_as_one_world(tmp_path, synthetic_data):
    """Two DeepSpeed launchers, as on two machines (--no_ssh, node ranks 0 and 1), one rank each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        args = ("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--num_nodes", "2",
                "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port)
        cmd = launch_command(tmp_path, synthetic_data, steps=4, extra=["train.save_every=4"], launcher_args=args)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # one rank on each node: two ranks, each its node's local rank 0, whose replicas agreed at the checkpoint
    (start,) = history(tmp_path / "run", "start")
    assert start["world_size"] == 2 and [r["local_rank"] for r in start["ranks"]] == [0, 0]
    assert [(c["step"], c["replicas_agree"]) for c in history(tmp_path / "run", "checkpoint")] == [(4, True)]
    assert sorted(train_log(tmp_path / "run")) == [1, 2, 3, 4]
