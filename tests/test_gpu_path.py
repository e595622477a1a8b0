"""What only a GPU runs, proven on the CPU as far as it can be: no host sync inside a training step
(counted), DeepSpeed's fp16 and bf16 casts applied to every model, every DALI graph defined with the
GPU decoder, BatchNorm in each mode across two ranks."""
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from launching import TINY
from soho_ds.config import FORMER_DEFAULTS, as_overrides

aten = torch.ops.aten

# Operators that make the host wait for the device: a scalar read, or an output whose size depends on
# values (nonzero, masked_select, boolean indexing, ...).
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
            aten.repeat_interleave, aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.allclose,
            aten.masked_scatter}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class SyncCounter(TorchDispatchMode):
    """Counts device->host synchronising operations, each attributed to the innermost frame of
    soho_ds or DeepSpeed that issued it."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if self.active and (packet in SYNC_OPS or (packet in BOOL_INDEXED and _has_bool_index(args))):
            frame = next((f for f in reversed(traceback.extract_stack())
                          if "/soho_ds/" in f.filename or "/deepspeed/" in f.filename), None)
            where = "other" if frame is None else (
                f"{'soho_ds' if '/soho_ds/' in frame.filename else 'deepspeed'}:"
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}")
            self.calls[(where, packet.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def hooks(self):
        """The trainer's StepHooks that count each micro-step (forward, commit, backward, step) here."""
        from soho_ds.runtime.trainer import StepHooks

        mode = self

        class Counting(StepHooks):
            def micro_step(self):
                return mode.step()

        return Counting()

    def step(self):
        mode = self

        class _Step:
            def __enter__(self):
                mode.active = True

            def __exit__(self, *exc):
                mode.active = False
                mode.steps += 1

        return _Step()


def _pretrain(tmp_path, shards, steps, sets, hooks):
    from launching import pretrain_in_process

    return pretrain_in_process(tmp_path, f"{shards}/train", steps, sets=sets, hooks=hooks)


def _deepspeed_norm_checks(steps: int, groups: int) -> dict:
    """DeepSpeed 0.19's ZeRO-2 step reads each param group's gradient norm and the total on the host
    (is_invalid_grad_norm) to decide on overflow and clipping: its own syncs, one more than the groups."""
    return {("deepspeed:utils.py:is_invalid_grad_norm", "_local_scalar_dense"): steps * (groups + 1)}


DEPARTURES = as_overrides(FORMER_DEFAULTS)


def test_a_training_step_issues_no_host_sync(tmp_path, synthetic_data, world_of_one):
    """Every objective on (MLM, MVM on every pair, ITM, ITC) and soho-ds's departures from SOHO (the VD
    with data initialisation and re-seeding, the projected MVM on matched pairs, ...): the steps of the
    real loop (forward, backward, optimizer step, VD update) issue no synchronising operation from
    soho-ds's code; what DeepSpeed's own step issues is counted exactly, so a change on either side
    shows."""
    counter = SyncCounter()
    counter.steps = 0
    with counter:
        _pretrain(tmp_path, synthetic_data, 4, ["pretrain.mvm_prob=1.0", "pretrain.itc_weight=0.5",
                                                "model.vd_restart_below=0.5", "train.log_every=2", *DEPARTURES],
                  counter.hooks())
    assert counter.steps == 4
    ours = {k: n for k, n in counter.calls.items() if not k[0].startswith("deepspeed:")}
    assert ours == {}, ours
    theirs = {k: n for k, n in counter.calls.items() if k[0].startswith("deepspeed:")}
    # six param groups: CNN, transformer, heads, each with and without weight decay
    assert theirs == _deepspeed_norm_checks(4, 6)


def test_sohos_choices_issue_no_host_sync_either(tmp_path, synthetic_data, world_of_one):
    """The defaults, SOHO's official choices (released VD update, gate, MVM and MLM on every pass,
    raw-cosine MVM, bias-free ITM on the raw [CLS], decay on everything), in the same loop."""
    counter = SyncCounter()
    counter.steps = 0
    with counter:
        _pretrain(tmp_path, synthetic_data, 4, ["pretrain.mvm_prob=1.0", "train.log_every=2"], counter.hooks())
    assert counter.steps == 4
    assert {k: n for k, n in counter.calls.items() if not k[0].startswith("deepspeed:")} == {}
    # three param groups (CNN, transformer, heads), all with weight decay
    assert {k: n for k, n in counter.calls.items() if k[0].startswith("deepspeed:")} == _deepspeed_norm_checks(4, 3)


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_a_finetune_step_issues_no_host_sync(tmp_path, downstream, world_of_one, task):
    """The finetune loop through its driver (VQA's BCE head; retrieval's sampled hard negatives and ITC)."""
    from launching import finetune_in_process

    counter = SyncCounter()
    counter.steps = 0
    config = {"vqa": "finetune_vqa_synthetic.yaml", "retrieval": "finetune_retrieval_synthetic.yaml"}[task]
    with counter:
        finetune_in_process(task, config, downstream, tmp_path, 2, TINY, micro_batch=4, hooks=counter.hooks())
    assert counter.steps == 2
    ours = {k: n for k, n in counter.calls.items() if not k[0].startswith("deepspeed:")}
    assert ours == {}, ours


def _deepspeed_cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """DeepSpeed's own mixed-precision cast of a module, as `deepspeed.initialize` applies it with soho-ds's
    configs (no buffer_dtype; buffers the model names kept in fp32). The CPU accelerator refuses fp16
    engines, so the engine's method is applied to the module directly."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.keep_in_fp32 import keep_in_fp32_pattern

    DeepSpeedEngine._cast_module_mixed_precision(SimpleNamespace(module=module), dtype, None, False,
                                                 keep_in_fp32_pattern(module, "auto", dtype))
    return module


def _pretraining_model_and_batch(synthetic_data):
    from conftest import tiny_model_config
    from soho_ds.config import PretrainConfig, SemanticConfig
    from soho_ds.data.pipeline import ImageSpec, ShardLoader
    from soho_ds.data.text import PretrainTextBuilder, load_tokenizer
    from soho_ds.pretrain.model import SohoPretrainer

    semantic = SemanticConfig(object_weight=1.0, attribute_weight=1.0, feature_weight=1.0, num_objects=7,
                              num_attributes=5, feature_dim=6)
    model = SohoPretrainer(tiny_model_config(), PretrainConfig(mvm_prob=1.0, itc_weight=0.5), semantic)
    raw = next(ShardLoader(f"{synthetic_data}/train", 4, ImageSpec(shorter_side=64, longer_side=96), train=True,
                           num_threads=1, seed=0).forever())
    batch = PretrainTextBuilder(load_tokenizer(), 20, 2, 0.15, 0.5, seed=0)([m["captions"] for m in raw.metas])
    g = torch.Generator().manual_seed(0)
    batch.update(images=raw.images, image_sizes=raw.image_sizes,
                 region_boxes=torch.tensor([[0, 2.0, 3.0, 40.0, 50.0], [2, 10.0, 10.0, 60.0, 30.0]]),
                 region_objects=torch.tensor([3, 6]), region_attributes=(torch.rand(2, 5, generator=g) > 0.5).float(),
                 region_features=torch.randn(2, 6, generator=g))
    return model, batch


def _finetune_model_and_batch(task_name, downstream, world_of_one, tmp_path):
    from launching import TINY
    from soho_ds.config import load_config
    from soho_ds.tasks import TASKS

    config = tmp_path / f"{task_name}.yaml"
    config.write_text((ROOT / "configs" / f"finetune_{task_name}_synthetic.yaml").read_text().replace(
        "data/synthetic_downstream", str(downstream)))
    cfg = load_config(config, TINY + ["model.dropout=0.0"])
    task = TASKS[task_name](cfg, world_of_one, 4)
    return task.make_model(), next(task.train_batches())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["pretrain", "vqa", "retrieval", "nlvr2", "snli_ve"])
def test_deepspeeds_mixed_precision_cast_trains_every_model(kind, dtype, synthetic_data, downstream, world_of_one,
                                                            tmp_path):
    """After DeepSpeed's cast: a forward + backward gives a finite loss and a finite gradient on every
    trainable parameter; the VD's buffers and every BatchNorm's statistics stay fp32 (and are updated
    in fp32); masks, indices and labels keep their dtypes."""
    from soho_ds.models.visual_dictionary import VisualDictionary
    from soho_ds.runtime.trainer import to_device

    torch.manual_seed(0)
    model, batch = (_pretraining_model_and_batch(synthetic_data) if kind == "pretrain"
                    else _finetune_model_and_batch(kind, downstream, world_of_one, tmp_path))
    model = _deepspeed_cast(model, dtype).train()
    assert all(p.dtype == dtype for p in model.parameters())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    stats_before = [m.running_var.clone() for m in norms if m.training]
    moved = to_device(batch, torch.device("cpu"), dtype)
    for k, v in batch.items():
        assert moved[k].dtype == (v.dtype if not v.is_floating_point() or k == "region_boxes" else dtype), k
    out = model(moved)
    assert torch.isfinite(out["loss"]), out["loss"]
    out["loss"].backward()
    # finetunes mask no visual tokens: the mask embedding alone takes no part
    unused = set() if kind == "pretrain" else {"model.visual.mask_embedding"}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for m in norms:
        assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    assert all(not torch.equal(a, m.running_var) for a, m in zip(stats_before, [m for m in norms if m.training]))
    vds = [m for m in model.modules() if isinstance(m, VisualDictionary)]
    assert kind == "vqa" or vds  # VQA finetunes without the VD, as SOHO
    for vd in vds:
        assert all(getattr(vd, b).dtype == torch.float32 for b in ("embed", "ema_count", "ema_sum"))
        assert bool(vd.initialised)
    soho = model.model.eval()
    with torch.no_grad():
        visual = soho.encode_image(moved["images"][:2], moved["image_sizes"][:2])
    assert visual.valid.dtype == torch.bool and visual.tokens.dtype == dtype
    assert visual.vd_index is None or visual.vd_index.dtype == torch.long


def test_the_bf16_engine_accumulates_gradients_in_fp32_and_keeps_batchnorm_statistics_fp32(synthetic_data,
                                                                                           world_of_one):
    """ds_configs/zero2_bf16.json's settings through deepspeed.initialize: fp32 gradient accumulation
    over two micro-steps, BatchNorm statistics left fp32 by the engine, finite losses."""
    from soho_ds.config import TrainConfig
    from soho_ds.runtime.engine import build_engine, load_ds_config, resolve_precision
    from soho_ds.runtime.trainer import to_device

    ds = load_ds_config(ROOT / "ds_configs/zero2_bf16.json")
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    ds = resolve_precision({**ds, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 8,
                            "gradient_accumulation_steps": 2}, "cpu", "bf16")
    model, batch = _pretraining_model_and_batch(synthetic_data)
    engine = build_engine(model, TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10), ds)
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    for m in engine.module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.running_mean.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    for _ in range(2):
        out = engine.module.commit(engine(to_device(batch, engine.device, torch.bfloat16)))
        engine.backward(out["loss"])
        engine.step()
        assert torch.isfinite(out["loss"])
    assert engine.global_steps == 1 and engine.skipped_steps == 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["aspect", "square"])
def test_every_dali_graph_defines_for_the_gpu_decoder(mode, train, synthetic_data):
    """Each pipeline the project builds, with nvJPEG's mixed decoder, defined and checked by DALI without
    a device (serialising validates every operator's placement and the GPU->CPU transitions the
    executor allows): the shard loader without and with region boxes (and detector features), the
    file decoder of the finetunes, load_model and search, and the shard indexer's image checker."""
    from soho_ds.data.pipeline import ImageSpec, define_file_pipeline, define_shard_pipeline
    from soho_ds.data.shards import define_checker_pipeline
    from soho_ds.data.regions import RegionSpec

    spec = ImageSpec(mode=mode, shorter_side=64, longer_side=96, image_size=64)
    paths = sorted(str(p) for p in (synthetic_data / "train").glob("*.tar"))
    for regions in (None, RegionSpec(5, False, 4), RegionSpec(5, True, 4)):
        pipe = define_shard_pipeline(paths, None, spec, train=train, regions=regions, device="cuda", device_id=None)
        assert pipe.serialize()
    pipe = define_file_pipeline(spec, 4, lambda: [], train=train, device="cuda", device_id=None)
    assert pipe.serialize()
    assert define_checker_pipeline(4, on_gpu=True, device_id=None).serialize()


def test_the_file_decoder_reads_ahead_and_groups_by_orientation(tmp_path):
    """DALI asks for the next requests before the first batch is handed out (prefetching), every batch
    comes back in request order, and evaluation order puts landscape images before portrait ones."""
    import numpy as np
    from PIL import Image

    from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec, orientation_order

    paths = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 64), (64, 80), (96, 72), (72, 96)]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    order = orientation_order(paths)
    assert order == [0, 2, 4, 1, 3, 5]
    decoder = ImageFileDecoder(ImageSpec(shorter_side=64, longer_side=128), 2, num_threads=1)
    asked = []

    def requests():
        for i in range(0, 6, 2):
            asked.append(i)
            yield [paths[j] for j in order[i:i + 2]]

    stream = decoder.stream(requests())
    images, sizes = next(stream)
    assert len(asked) >= 2  # the second request was read before the first batch was consumed
    rest = list(stream)
    assert [s.tolist() for s in [sizes] + [s for _, s in rest]] == [[[64, 96], [64, 80]], [[64, 85], [96, 64]],
                                                                     [[80, 64], [85, 64]]]
    assert images.shape == (2, 3, 64, 96)  # one orientation per batch: padded to the larger only
    again, _ = decoder([paths[1]])  # the decoder streams again after a finished stream
    assert again.shape == (1, 3, 96, 64)


def _norm_worker(rank, world, port, modes, images, out):
    import torch.distributed as dist

    from conftest import tiny_model_config
    from soho_ds.models.norm import synchronise_norms
    from soho_ds.models.soho import SohoModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for mode in modes:
        torch.manual_seed(0)
        model = synchronise_norms(SohoModel(tiny_model_config(use_vd=False, backbone_norm=mode)), mode, world).train()
        kinds = {n: type(m).__name__ for n, m in model.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        model.encode_image(images[rank]).tokens.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for g in grads.values():  # the data-parallel average the engine applies
            dist.all_reduce(g)
            g /= world
        out[(mode, rank)] = {"kinds": kinds, "grads": grads,
                             "stats": {n: b.clone() for n, b in model.named_buffers() if "running" in n}}
    dist.destroy_process_group()


NORM_MODES = ("batch", "sync", "frozen")


@pytest.fixture(scope="module")
def norms_on_two_ranks():
    """Each backbone_norm mode's model after one step on two gloo ranks (one pair of processes for all
    modes): the images, and mode -> (rank 0's, rank 1's) norm kinds, statistics and averaged gradients."""
    import torch.multiprocessing as mp

    from conftest import free_port

    g = torch.Generator().manual_seed(7)
    images = [torch.randn(2, 3, 64, 64, generator=g) + r for r in range(2)]
    out = mp.Manager().dict()
    mp.spawn(_norm_worker, args=(2, free_port(), NORM_MODES, images, out), nprocs=2, join=True)
    return images, {mode: (out[(mode, 0)], out[(mode, 1)]) for mode in NORM_MODES}


def _reference(mode, images):
    """The same model in one process over both ranks' images together."""
    from conftest import tiny_model_config
    from soho_ds.models.soho import SohoModel

    torch.manual_seed(0)
    model = SohoModel(tiny_model_config(use_vd=False, backbone_norm=mode)).train()
    model.encode_image(torch.cat(images)).tokens.float().square().mean().backward()
    return model, {n: b for n, b in model.named_buffers() if "running" in n}


NECK = "visual.proj.1"


@pytest.mark.slow
@pytest.mark.parametrize("mode", NORM_MODES)
def test_backbone_norm_modes_across_two_ranks(mode, norms_on_two_ranks):
    """batch: each rank's backbone statistics are its own (SOHO's per-GPU BatchNorm); sync: the
    backbone's statistics and gradients equal one process over both ranks' images; frozen: the
    backbone's statistics never move and its BatchNorm trains nothing. The neck is synchronised on
    several ranks in every mode."""
    images, runs = norms_on_two_ranks
    rank0, rank1 = runs[mode]
    reference, union = _reference(mode, images)
    backbone = [n for n in rank0["stats"] if n.startswith(("backbone.layer2", "backbone.layer3", "backbone.layer4"))]
    assert backbone and rank0["kinds"][NECK] == "SyncBatchNorm2d"
    for name in (f"{NECK}.running_mean", f"{NECK}.running_var"):  # the neck: over both ranks' images
        torch.testing.assert_close(rank0["stats"][name], rank1["stats"][name])
        if mode != "batch":  # (with per-rank backbone statistics its input differs from one process's)
            torch.testing.assert_close(rank0["stats"][name], union[name], rtol=1e-4, atol=1e-5)
    stem = [n for n in rank0["stats"] if n.startswith(("backbone.stem", "backbone.layer1"))]
    for name in stem:  # freeze_stem: ImageNet statistics stay in every mode
        assert torch.equal(rank0["stats"][name], dict(reference.named_buffers())[name]), name
    if mode == "batch":
        assert {rank0["kinds"][n.rsplit(".", 1)[0]] for n in backbone} == {"BatchNorm2d"}
        assert all(not torch.allclose(rank0["stats"][n], rank1["stats"][n]) for n in backbone if "mean" in n)
    elif mode == "sync":
        assert {rank0["kinds"][n.rsplit(".", 1)[0]] for n in backbone} == {"SyncBatchNorm2d"}
        for n in backbone:
            torch.testing.assert_close(rank0["stats"][n], rank1["stats"][n])
            torch.testing.assert_close(rank0["stats"][n], union[n], rtol=1e-4, atol=1e-5)
        for n, p in reference.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(rank0["grads"][n], p.grad, rtol=1e-3, atol=1e-6)
    else:
        assert {rank0["kinds"][n.rsplit(".", 1)[0]] for n in backbone} == {"FrozenBatchNorm2d"}
        initial = dict(reference.named_buffers())
        for n in backbone:
            assert torch.equal(rank0["stats"][n], initial[n]) and torch.equal(rank1["stats"][n], initial[n]), n
        assert not any(".bn" in n or "downsample.1" in n for n in rank0["grads"] if n.startswith("backbone."))


def test_the_fp16_loss_scale_is_capped_as_soho_caps_it(world_of_one):
    """DeepSpeed's dynamic loss scaler doubles the scale after every window of good steps, without bound;
    train.max_loss_scale holds it at the cap (SOHO: 128) and leaves the halving on overflow alone."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from soho_ds.runtime.engine import cap_loss_scale

    def scales(cap, overflows):
        scaler = DynamicLossScaler(init_scale=32, scale_window=2, min_scale=1, delayed_shift=1,
                                   consecutive_hysteresis=False)
        engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler))
        seen = []
        for overflow in overflows:
            scaler.update_scale(overflow)
            cap_loss_scale(engine, cap)
            seen.append(scaler.cur_scale)
        return seen

    good = [False] * 8
    assert scales(0, good) == [32, 32, 64, 64, 128, 128, 256, 256]  # DeepSpeed alone: unbounded
    assert scales(128, good) == [32, 32, 64, 64, 128, 128, 128, 128]
    assert scales(128, good[:6] + [True, False]) == [32, 32, 64, 64, 128, 128, 64, 64]
