"""Every bad input named before a long run starts, no silent data loss, no poisoned checkpoint: one
fault injected at a time, and what was counted, logged and kept checked."""
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from launching import ENV, TINY_MODEL, finetune_in_process, history, pretrain_in_process as pretrain
from soho_ds.config import ConfigError
from soho_ds.data.pipeline import ImageSpec, SampleDecodeError, ShardLoader
from soho_ds.data.shards import ShardError, index_shards, read_record
from soho_ds.runtime.checkpoint import CheckpointError
from soho_ds.runtime.trainer import TrainingStopped
from soho_ds.synthetic.shards import write_split

SPEC = ImageSpec(mode="aspect", shorter_side=64, longer_side=96)


class Messages(logging.Handler):
    """What soho_ds logged (its loggers are children of "soho_ds")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __contains__(self, text):
        return any(text in line for line in self.lines)


@pytest.fixture
def messages():
    handler = Messages()
    logging.getLogger("soho_ds").addHandler(handler)
    yield handler
    logging.getLogger("soho_ds").removeHandler(handler)


def rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "train.jsonl").read_text().splitlines())}


def jpeg(w=80, h=64, colour=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def png(w=64, h=80):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    """samples: key -> {ext: bytes}."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good(key, **image):
    return {"jpg": jpeg(**image), "json": json.dumps({"key": key, "captions": [f"a photo {key}"]}).encode()}


def shards(folder, n_tars=2, per_tar=8, seed=0):
    """Synthetic shards (checked and indexed, with a manifest) of n_tars x per_tar good samples."""
    write_split(folder, n_tars * per_tar, per_tar, 64, seed, "s", 0, non_square=0.3)
    return folder


def test_the_checker_reports_every_bad_shard_and_sample_and_indexes_the_rest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", {f"a{i}": good(f"a{i}") for i in range(4)})
    garbled = bytearray(jpeg(200, 160))
    garbled[300:-300] = bytes(np.random.default_rng(0).integers(0, 256, len(garbled) - 600, dtype=np.uint8))
    write_tar(data / "000001.tar", {"b0": good("b0"), "b1": {**good("b1"), "jpg": bytes(garbled)},
                                    "b2": {**good("b2"), "jpg": png()},  # PNG bytes in a .jpg member
                                    "b3": {**good("b3"), "jpg": jpeg()[:200]},
                                    "b4": {**good("b4"), "json": b'{"captions": ["", "  "]}'}})
    write_tar(data / "000002.tar", {f"c{i}": good(f"c{i}") for i in range(8)})
    full = (data / "000002.tar").read_bytes()
    with tarfile.open(data / "000002.tar") as tar:  # cut between two members: no end-of-archive
        cut = next(m for m in tar.getmembers() if m.name == "c5.jpg").offset
    (data / "000002.tar").write_bytes(full[:cut])
    (data / "000003.tar").write_bytes(b"")
    (data / "000004.tar").write_bytes(b"not a tar at all" * 100)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/index_shards.py"), str(data), "--workers", "2",
                           "--report", str(tmp_path / "report.json")], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # some shards could not be indexed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept"] == 4 + 2 + 5 and report["skipped"] == 3
    assert set(report["bad_shards"]) == {str(data / "000003.tar"), str(data / "000004.tar")}
    skipped = {s["key"]: s["reason"] for s in read_record(data / "000001.tar")["skipped"]}
    assert set(skipped) == {"b1", "b3", "b4"} and "does not decode" in skipped["b1"]  # b2, a PNG, is kept
    cut_record = read_record(data / "000002.tar")
    assert cut_record["truncated"] and cut_record["kept"] == 5
    assert "cut short" in proc.stderr and "not indexed" in proc.stderr and "b1" in proc.stderr
    assert "images/s" in proc.stderr and not list(data.glob("*.tmp"))
    with pytest.raises(ShardError, match=r"(?s)2 of 5 shards hold no usable sample:.*000003\.tar: the file is empty "
                                         r"\(0 bytes\).*000004\.tar: not a readable tar.*Fix: convert them again, "
                                         r"or move them out of the shard folder"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)


def test_the_loader_refuses_a_partly_indexed_a_stale_or_a_short_set(tmp_path):
    data = shards(tmp_path / "data", n_tars=2)
    ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)  # as written: trusted
    write_tar(data / "000002.tar", {"new0": good("new0")})  # one new tar, not indexed
    with pytest.raises(ShardError, match=r"000002\.tar: no index"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)
    (data / "000002.tar").unlink()
    raw = (data / "000001.tar").read_bytes()
    (data / "000001.tar").write_bytes(raw)  # the same bytes written again (a copy): new mtime, still trusted
    ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)
    before = (data / "000001.tar").stat()
    with tarfile.open(data / "000001.tar") as tar:  # two samples' images swapped: same size, other content
        first, second = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:2]
    swapped = bytearray(raw)
    size = min(first.size, second.size)
    swapped[first.offset_data:first.offset_data + size] = raw[second.offset_data:second.offset_data + size]
    (data / "000001.tar").write_bytes(bytes(swapped))
    os.utime(data / "000001.tar", ns=(before.st_atime_ns, before.st_mtime_ns))  # and its mtime put back
    with pytest.raises(ShardError, match=r"000001\.tar: the tar changed after it was indexed \(its size or content "
                                         r"differs\)"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)
    (data / "000001.tar").write_bytes(raw)
    with tarfile.open(data / "000001.tar") as tar:  # cut short and indexed again: fewer than the manifest says
        cut = tar.getmembers()[-4].offset
    (data / "000001.tar").write_bytes(raw[:cut])
    index_shards(str(data))
    with pytest.raises(ShardError, match=r"000001\.tar: 7 samples, the manifest records 8"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)


def test_shards_copied_with_new_mtimes_stay_trusted_and_resume_keeps_the_data_position(tmp_path):
    data = shards(tmp_path / "data", n_tars=2)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, copy_function=shutil.copy)  # cp -r: contents kept, mtimes new
    assert all((copy / p.name).stat().st_mtime_ns != p.stat().st_mtime_ns for p in data.glob("*.tar"))
    from soho_ds.data.shards import list_shards, shard_fingerprint

    assert shard_fingerprint(list_shards(str(copy))) == shard_fingerprint(list_shards(str(data)))
    loader = ShardLoader(str(copy), 4, SPEC, train=False, num_threads=1)
    assert sum(len(b.metas) for b in loader.epochs()) == 16
    # the whole files were hashed once; their records now hold the copies' mtimes (the next start is quick)
    assert all(read_record(p)["tar_mtime_ns"] == p.stat().st_mtime_ns for p in copy.glob("*.tar"))


def test_files_that_cannot_be_read_at_all_are_named_with_a_fix_that_can_help(tmp_path, monkeypatch):
    data = shards(tmp_path / "data", n_tars=2)
    (data / "000002.tar").symlink_to(tmp_path / "elsewhere/000002.tar")
    (data / "000003.tar").mkdir()
    with pytest.raises(ShardError, match=r"(?s)2 of 4 shards cannot be read at all \(indexing again cannot help\):"
                                         r".*000002\.tar: a symbolic link to .*elsewhere/000002\.tar, which does not "
                                         r"exist.*000003\.tar: not a regular file.*Fix: restore these files, or move "
                                         r"them out of the shard folder"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(data) and real_access(path, mode))
    with pytest.raises(ShardError, match=rf"{data}: the folder cannot be listed \(permission denied\): give this "
                                         r"user read access to it"):
        ShardLoader(str(data), 4, SPEC, train=False, num_threads=1)
    monkeypatch.undo()
    tool = subprocess.run([sys.executable, str(ROOT / "tools/index_shards.py"), str(data)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert tool.returncode == 1 and "Traceback" not in tool.stderr
    assert tool.stderr.startswith("error: 2 of 4 shards cannot be read at all"), tool.stderr[-2000:]


def test_repeated_sample_keys_are_left_out_and_counted_inside_a_tar_and_across_shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", {"a0": good("a0"), "a1": good("a1")})
    with tarfile.open(data / "000000.tar", "a") as tar:  # a second a0 after a1 (tar append)
        for ext, blob in good("a0", colour=(0, 0, 250)).items():
            info = tarfile.TarInfo(f"a0.{ext}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    write_tar(data / "000001.tar", {"b0": good("b0"), "a1": good("a1"), "b1": good("b1")})
    report = index_shards(str(data))
    assert report["kept"] == 4 and report["skipped"] == 2
    assert report["duplicates"] == [(str(data / "000001.tar"), "a1", str(data / "000000.tar"))]
    assert read_record(data / "000000.tar")["skipped"] == [
        {"key": "a0", "reason": "duplicate key (an earlier sample of this tar has it)"}]
    assert read_record(data / "000001.tar")["skipped"] == [
        {"key": "a1", "reason": f"duplicate key (also in {data / '000000.tar'})"}]
    loader = ShardLoader(str(data), 2, SPEC, train=False, num_threads=1)
    keys = [m["key"] for b in loader.epochs() for m in b.metas]
    assert sorted(keys) == ["a0", "a1", "b0", "b1"]


def test_an_error_in_a_later_shard_names_that_shard_and_the_key(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", {f"a{i}": good(f"a{i}") for i in range(4)})
    write_tar(data / "000001.tar", {"b0": good("b0"), "b1": {**good("b1"), "json": b'{"captions": []}'}})
    loader = ShardLoader(str(data), 3, SPEC, train=False, num_threads=1)  # not indexed: nothing was checked
    with pytest.raises(ShardError, match=r"000001\.tar:\d+:b1: JSON member has no non-empty 'captions'.*Fix: "
                                         r"soho-index-shards .* leaves such ones out, then restart with "
                                         r"--resume"):
        list(loader.epochs())


def test_a_nan_input_is_a_skipped_counted_step_that_leaves_no_trace(tmp_path, world_of_one, messages, monkeypatch):
    data = shards(tmp_path / "data")
    pretrain(tmp_path, data, 6, fault="0:3:NAN")
    log = rows(tmp_path / "run")
    # the skipped step has no line of its own (nothing to average); later lines count it
    assert {s: log[s]["train/skipped_steps"] for s in log} == {1: 0, 2: 0, 4: 1, 5: 1, 6: 1}
    assert all(np.isfinite(log[s]["loss"]) for s in log)
    assert ("step 3 skipped by DeepSpeed: non-finite gradients (1 in a row, 1 in all); its VD and BatchNorm "
            "statistics were held back (non-finite inputs or loss)") in messages
    assert not any(line.startswith("eval @") for line in messages.lines)  # nothing held out: no empty eval line
    from soho_ds import saved

    state = saved.read(tmp_path / "run/checkpoints").weights()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path, world_of_one,
                                                                                 monkeypatch):
    data = shards(tmp_path / "data")
    with pytest.raises(TrainingStopped, match=r"3 steps in a row had non-finite loss or gradients .* stopping at "
                                              r"step 5. The last good checkpoint is step_00000004"):
        pretrain(tmp_path, data, 20, ["train.save_every=2", "train.max_skipped_steps=3"],
                 fault="0:3-99:NAN")
    # the step-4 checkpoint holds the step-2 weights and optimizer state: the skipped steps changed nothing
    saved = history(tmp_path / "run", "checkpoint")
    assert [c["step"] for c in saved] == [2, 4] and saved[0]["digest"] == saved[1]["digest"]
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000004"


def test_checkpoints_with_non_finite_values_are_never_written_nor_loaded(tmp_path, world_of_one, monkeypatch):
    from soho_ds.runtime import checkpoint
    from soho_ds.runtime.engine import build_engine
    from soho_ds.config import TrainConfig

    data = shards(tmp_path / "data")
    pretrain(tmp_path, data, 2)
    ckpt = tmp_path / "run/checkpoints"
    # --resume refuses a checkpoint whose weights hold a NaN
    states = ckpt / "step_00000002" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)
    name = next(k for k in saved["module"] if "fusion" in k and k.endswith("weight"))
    saved["module"][name].view(-1)[0] = float("nan")
    torch.save(saved, states)
    with pytest.raises(CheckpointError, match=rf"{name}.*resume from an earlier tag"):
        pretrain(tmp_path, data, 4, resume="yes")
    # --init refuses one too (a consolidated file with a NaN)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    state["model.visual.vd.embed"][0, 0] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    shutil.copy(ckpt / "step_00000002" / "run_config.yaml", tmp_path / "bad.yaml")
    from soho_ds import saved
    from soho_ds.tasks.retrieval import RetrievalModel

    bad = saved.read(tmp_path / "bad.pt")
    model = RetrievalModel(bad.config)
    with pytest.raises(ValueError, match=r"bad\.pt: 1 tensors hold NaN or infinite values \(visual\.vd\.embed\)"):
        model.load_pretrained(bad)
    # and save refuses to write one
    net = torch.nn.Linear(2, 2)
    engine = build_engine(net, TrainConfig(lr=0.1, warmup_steps=0, max_steps=5),
                          {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    with torch.no_grad():
        engine.module.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving step 7: non-finite weights or buffers \(weight\)"):
        checkpoint.save(engine, tmp_path / "never", 7, {}, {})
    assert not (tmp_path / "never" / "latest").exists()


def test_nothing_is_overwritten_without_being_asked(tmp_path, world_of_one, messages, monkeypatch):
    data = shards(tmp_path / "data")
    pretrain(tmp_path, data, 2)
    with pytest.raises(ConfigError, match=r"already holds a run \(latest checkpoint: step_00000002\); continue it "
                                          r"with --resume, or start over with --restart"):
        pretrain(tmp_path, data, 2)
    with pytest.raises(ConfigError, match=r"--resume: no complete checkpoint in .*elsewhere/run/checkpoints"):
        pretrain(tmp_path / "elsewhere", data, 2, resume="yes")
    pretrain(tmp_path / "auto", data, 1, resume="auto")  # nothing yet: starts
    assert "--resume auto: no checkpoint" in messages
    # a resumed run whose YAML changed the learning rate says that the restored state keeps the old one
    pretrain(tmp_path, data, 3, ["train.lr=1e-4"], resume="yes")
    assert "train.lr is 0.0001 in" in messages and "the restored optimizer and schedule keep 0.002" in messages
    # --restart: the old run's files move aside, the new run's checkpoint is the final one
    pretrain(tmp_path, data, 2, restart=True)
    previous = list((tmp_path / "run/previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "checkpoints/step_00000003").is_dir()
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000002"
    assert sorted(rows(tmp_path / "run")) == [1, 2]  # a fresh log, not appended to the old one


def test_a_decode_failure_at_run_time_names_shard_and_key_and_reindex_then_resume_recovers(tmp_path, world_of_one,
                                                                                          messages, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", {f"a{i:02d}": good(f"a{i:02d}", colour=(i * 9, 50, 90)) for i in range(16)})
    garbled = bytearray(jpeg(200, 160))
    garbled[300:-300] = bytes(np.random.default_rng(1).integers(0, 256, len(garbled) - 600, dtype=np.uint8))
    write_tar(data / "000001.tar", {"b00": {**good("b00"), "jpg": bytes(garbled)},
                                    **{f"b{i:02d}": good(f"b{i:02d}") for i in range(1, 8)}})
    sets = ["train.save_every=2", "data.shuffle_buffer=1", "data.group_by_orientation=false"]
    with pytest.raises(SampleDecodeError, match=r"(?s)000001\.tar:b00 \(does not decode.*Fix: "
                                                r"soho-index-shards .*--resume"):
        pretrain(tmp_path, data, 12, sets)
    # the run stopped at the step whose batch held b00 (where DALI met it depends on its read-ahead): the last
    # checkpoint is the last even step it completed
    completed = max(rows(tmp_path / "run"))
    assert (tmp_path / "run/checkpoints/latest").read_text() == f"step_{completed - completed % 2:08d}"
    index_shards(str(data))  # the documented way out
    pretrain(tmp_path, data, 12, sets, resume="yes")
    assert "the shards or their mixing weights changed since this checkpoint" in messages
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000012"


def test_finetune_images_that_do_not_exist_are_refused_before_training_or_skipped_and_counted(
        downstream, tmp_path, world_of_one, messages):
    copy = tmp_path / "downstream"
    shutil.copytree(downstream, copy)
    for name in ("1000.jpg", "1001.jpg", "1002.jpg"):
        (copy / "images" / name).unlink()
    sets = TINY_MODEL + ["data.shorter_side=64", "data.longer_side=96", "train.warmup_steps=0"]
    with pytest.raises(Exception, match=r"3 image files it names are missing under .*images \(first: 1000\.jpg, "
                                        r"1001\.jpg, 1002\.jpg\).*task\.missing_images: skip"):
        finetune_in_process("snli_ve", "finetune_snli_ve_synthetic.yaml", copy, tmp_path / "refused", steps=2, sets=sets)
    assert not (tmp_path / "refused" / "run" / "checkpoints").exists()  # nothing built, nothing trained
    finetune_in_process("snli_ve", "finetune_snli_ve_synthetic.yaml", copy, tmp_path / "skipped", steps=2,
                        sets=sets + ["task.missing_images=skip"])
    assert "left out 9 of 480 examples whose images are missing (3 files" in messages


def test_inputs_are_refused_before_any_model_is_built(tmp_path, world_of_one, messages, monkeypatch):
    data = shards(tmp_path / "data")
    ds = tmp_path / "broken.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "2"}))
    from soho_ds.pretrain.run import pretrain as run

    with pytest.raises(ConfigError, match=r"broken\.json: train_micro_batch_size_per_gpu must be a positive integer"):
        # the demo's stand-in weights may not exist yet: the tiny model's overrides
        run(ROOT / "configs/pretrain_synthetic.yaml", ds, overrides=[f"data.train_shards={data}"] + TINY_MODEL)
    with pytest.raises(ConfigError, match=r"data\.train_shards: shard path does not exist: /nonexistent"):
        pretrain(tmp_path, "/nonexistent", 2)
    assert "model:" not in " ".join(messages.lines)  # refused before any model was built
    # --init from a checkpoint trained without pool_last, into a YAML that asks for it
    pretrain(tmp_path, data, 1)
    assert "model.backbone_weights is null: the resnet18 starts from random weights" in messages  # said at start
    assert "model.bert_dir is null: the transformer starts from random weights" in messages
    with pytest.raises(ConfigError, match=r"model\.pool_last is True but the checkpoint was trained with False"):
        finetune_in_process("snli_ve", "finetune_snli_ve_synthetic.yaml", tmp_path / "nowhere", tmp_path / "ft", 2,
                            sets=["model.pool_last=true"], init=tmp_path / "run/checkpoints")


def test_splits_emptied_by_skipping_or_too_small_for_the_ranks_are_refused_before_any_model_is_built(
        downstream, tmp_path, world_of_one, monkeypatch):
    from soho_ds.tasks.base import AnnotationError, FinetuneModel

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the split was refused")

    monkeypatch.setattr(FinetuneModel, "__init__", built)
    dev = tmp_path / "snli_ve_dev.jsonl"
    dev.write_text("\n".join(json.dumps({"Flikr30kID": f"absent{i}.jpg", "gold_label": "neutral",
                                         "sentence2": "there is a shape", "pairID": f"p{i}"}) for i in range(3)))
    with pytest.raises(AnnotationError, match=rf"{dev}: no evaluation example is left .*task\.image_root"):
        finetune_in_process("snli_ve", "finetune_snli_ve_synthetic.yaml", downstream, tmp_path / "snli", steps=2,
                            sets=TINY_MODEL + ["task.missing_images=skip", f"task.eval_file={dev}",
                                               "train.warmup_steps=0"])
    questions = json.loads((downstream / "vqa/questions_train.json").read_text())
    questions["questions"] = questions["questions"][:5]
    few = tmp_path / "questions_train.json"
    few.write_text(json.dumps(questions))
    with pytest.raises(AnnotationError, match=rf"{few}: 5 training examples are too few for 1 ranks x micro-batch 16"):
        finetune_in_process("vqa", "finetune_vqa_synthetic.yaml", downstream, tmp_path / "vqa", steps=2,
                            sets=TINY_MODEL + [f"task.train_file={few}", "train.warmup_steps=0"])


def test_chance_recall_with_fewer_captions_than_k():
    from soho_ds.tasks.retrieval import chance_recall

    # 3 images x 2 captions: a random caption ranking puts one of an image's 2 among the first 1 of 6
    # with 1 - C(4,1)/C(6,1) = 1/3; K = 5 or 10 of 6 always does.
    chance = chance_recall(3, 6)
    assert chance == pytest.approx({"t2i_r1": 100 / 3, "t2i_r5": 100, "t2i_r10": 100,
                                    "i2t_r1": 100 / 3, "i2t_r5": 100, "i2t_r10": 100})


def test_a_disk_that_fills_during_a_checkpoint_leaves_the_last_complete_one_and_names_path_and_free_space(
        tmp_path, world_of_one, monkeypatch):
    data = shards(tmp_path / "data")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):  # torch's own words when the disk fills mid-file
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2496 vs 2390")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*/run/checkpoints/step_00000004 \(1 rank"
                                              r"\(s\) failed; .*step_00000004\.partial.*unexpected pos 2496 vs "
                                              r"2390'?\); "
                                              r"[\d.]+ GiB free on .*last complete checkpoint is step_00000002"):
        pretrain(tmp_path, data, 4, sets=["train.save_every=2"])
    ckpt = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]  # complete or absent
    assert (ckpt / "latest").read_text() == "step_00000002"
    monkeypatch.setattr(torch, "save", real_save)
    pretrain(tmp_path, data, 4, sets=["train.save_every=2"], resume="yes")
    assert (ckpt / "latest").read_text() == "step_00000004" and (ckpt / "step_00000004/meta.json").is_file()
    assert [r["step"] for r in map(json.loads, (tmp_path / "run/train.jsonl").read_text().splitlines())][-2:] == [3, 4]


def test_sigterm_during_the_final_checkpoint_finishes_it_and_says_so(tmp_path, world_of_one, monkeypatch, messages):
    import os
    import signal

    from soho_ds.runtime import checkpoint

    data = shards(tmp_path / "data")
    real_save = checkpoint.save

    def terminated_while_saving(engine, ckpt_dir, step, *args, **kwargs):
        if step == 3:
            # the scheduler's SIGTERM arrives as the final save starts; the run must still hold it
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(engine, ckpt_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", terminated_while_saving)
    pretrain(tmp_path, data, 3)
    ckpt = tmp_path / "run/checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    assert {p.name for p in (ckpt / "step_00000003").iterdir()} >= {"meta.json", "run_config.yaml", "rank_00000.pt"}
    assert ("SIGTERM arrived during the final evaluation or save: the run had finished and its last checkpoint "
            "step_00000003 is complete") in messages


def test_weights_and_settings_that_do_not_fit_end_in_one_line_naming_the_setting(downstream, tmp_path, world_of_one):
    import torchvision

    from conftest import tiny_model_config
    from soho_ds.config import PretrainConfig, RunConfig, SemanticConfig, load_config
    from soho_ds.inference import SohoPredictor
    from soho_ds.models.backbone import ResNetBackbone
    from soho_ds.models.soho import SohoModel
    from soho_ds.models.weights import WeightsError
    from soho_ds.pretrain.model import SohoPretrainer
    from soho_ds.search import ImageIndex, SearchError

    torchvision_pt = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), torchvision_pt)
    with pytest.raises(WeightsError, match=rf"--init {torchvision_pt}: not a soho-ds checkpoint \(no model\.\* "
                                           r"weights\); it looks like a torchvision ResNet .*give it as model\.backbone_weights"):
        finetune_in_process("snli_ve", "finetune_snli_ve_synthetic.yaml", downstream, tmp_path / "ft", steps=2,
                            sets=TINY_MODEL + ["train.warmup_steps=0"], init=torchvision_pt)
    soho_pt = tmp_path / "soho.pt"
    torch.save({f"model.{k}": v for k, v in SohoModel(tiny_model_config()).state_dict().items()}, soho_pt)
    with pytest.raises(WeightsError, match=rf"model\.backbone_weights \({soho_pt}\): none of its \d+ weights belongs "
                                           r"to this model; it looks like a soho-ds model .*start from it with --init"):
        ResNetBackbone(name="resnet18", weights_path=str(soho_pt))
    (tmp_path / "pickled.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"model\.backbone_weights: .*pickled\.pt is not a plain torch state dict"):
        ResNetBackbone(name="resnet18", weights_path=str(tmp_path / "pickled.pt"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"train\.output_dir .*a_file is a file, not a folder: choose a folder"):
        load_config(ROOT / "configs/pretrain_synthetic.yaml", TINY_MODEL + [f"train.output_dir={tmp_path / 'a_file'}"])
    cfg = RunConfig(model=tiny_model_config())
    no_itc = SohoPredictor(SohoPretrainer(cfg.model, PretrainConfig(itc_weight=0.0), SemanticConfig()), cfg,
                           "pretrain")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos/a.jpg")
    with pytest.raises(SearchError, match=r"--first-stage: this model has no ITC projections"):
        ImageIndex(no_itc, tmp_path / "photos").itc_scores("a dog")
    with pytest.raises(SearchError, match=r"--images .*empty: no images \(\.jpg"):
        (tmp_path / "empty").mkdir()
        ImageIndex(no_itc, tmp_path / "empty")
