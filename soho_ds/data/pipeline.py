"""NVIDIA DALI pipeline: WebDataset shards -> decoded, augmented, normalised, padded image batches.

One pipeline definition serves both devices: with CUDA the images are decoded by nvJPEG
(`device="mixed"`) and augmented on the GPU; without it the same operators run on the CPU.
Each rank reads its own slice of the samples (`shard_id=rank, num_shards=world`).

Two image modes (`ImageSpec`): "aspect", SOHO's input, resizes each image so its shorter side
is S (drawn per image from a list for multi-scale training) and its longer side at most L,
pads the batch to a common size that is a multiple of the CNN stride, and returns each image's
valid height and width; "square" resizes to a fixed side (random-resized crop in training).
The per-sample JSON travels beside the image as zero-padded bytes and is parsed on the host
(DALI cannot parse JSON in-graph); so does the sample's source (tar, offset, member name), so
that any problem names the shard and key.
"""
from __future__ import annotations

import logging
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator, feed_ndarray
from nvidia.dali.tensors import TensorGPU

from soho_ds.config import DataConfig, ReportedError, ShardSource
from soho_ds.data import storage
from soho_ds.data.regions import BOXES_EXT, FEATURES_EXT, RegionSpec, RegionTargets
from soho_ds.data.shards import (IMAGE_EXTS, ImageChecker, ShardError, caption_group_count, check_manifest,
                                 decode_meta, fix_command, indexed_sample_count, list_shards, sample_sizes,
                                 shard_fingerprint, summarise_losses, trusted_index_paths)
from soho_ds.seeds import derive

log = logging.getLogger(__name__)

# ImageNet statistics, in 0-255 pixel units (DALI normalises before scaling).
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
READER_NAME = "shards"
CURRENT = "current"  # device_id: the current CUDA device


@dataclass(frozen=True)
class ImageSpec:
    """How images become model input (see DataConfig for each field)."""
    mode: str = "aspect"
    shorter_side: int = 600
    longer_side: int = 1000
    train_shorter_sides: tuple[int, ...] = ()
    image_size: int = 384
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip_prob: float = 0.5
    stride: int = 32  # the batch is padded to a multiple of this

    @classmethod
    def from_config(cls, data: DataConfig, stride: int) -> "ImageSpec":
        return cls(data.image_mode, data.shorter_side, data.longer_side, data.train_shorter_sides, data.image_size,
                   data.crop_scale, data.hflip_prob, stride)


class SampleDecodeError(ReportedError, RuntimeError):
    """DALI could not decode a sample at run time; names it and the way out (`images`: the image files
    of a request that do not decode and why, where the file decoder found them)."""

    def __init__(self, message: str, images: dict[str, str] | None = None):
        super().__init__(message)
        self.images = images or {}


def _resize_aspect(images, spec: ImageSpec, train: bool):
    sides = spec.train_shorter_sides if train and spec.train_shorter_sides else (spec.shorter_side,)
    shorter = fn.random.choice([float(s) for s in sides]) if len(sides) > 1 else float(sides[0])
    return fn.resize(images, resize_shorter=shorter, max_size=float(spec.longer_side), antialias=True)


def _normalise(images, mirror, spec: ImageSpec):
    """-> (CHW float images padded to the stride, (H, W) of each before padding)."""
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                      mirror=mirror)
    sizes = images.shape()[1:3]
    if spec.mode == "aspect":  # zero after normalisation: padding reads as the mean colour
        images = fn.pad(images, axes=(1, 2), align=(spec.stride, spec.stride), fill_value=0.0)
    return images, sizes


def _augment(encoded, spec: ImageSpec, train: bool, decode_device: str):
    """Decode + resize (+ flip, + random-resized crop in square mode) + normalise + pad."""
    mirror = fn.random.coin_flip(probability=spec.hflip_prob) if train and spec.hflip_prob > 0 else 0
    if spec.mode == "aspect":
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        images = _resize_aspect(images, spec, train)
    else:
        if train:
            images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                                   random_area=list(spec.crop_scale),
                                                   random_aspect_ratio=[3 / 4, 4 / 3])
        else:
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, antialias=True)
    return _normalise(images, mirror, spec)


def _augment_with_boxes(encoded, boxes, spec: ImageSpec, decode_device: str):
    """Training augmentation with boxes kept aligned (DALI's bbox-aware operators). Aspect mode
    resizes the whole image, so normalised boxes only flip with it; square mode draws the crop
    window with `random_bbox_crop`, which maps the boxes into it and reports which survive. Boxes
    are xyXY in [0, 1] of the output image (before padding)."""
    mirror = fn.random.coin_flip(probability=spec.hflip_prob) if spec.hflip_prob > 0 else 0
    kept = None
    if spec.mode == "aspect":
        images = _resize_aspect(fn.decoders.image(encoded, device=decode_device, output_type=types.RGB), spec, True)
    else:
        side = [spec.crop_scale[0] ** 0.5, spec.crop_scale[1] ** 0.5]  # crop_scale is an area fraction
        anchor, shape, boxes, kept = fn.random_bbox_crop(
            boxes, bbox_layout="xyXY", scaling=side, aspect_ratio=[3 / 4, 4 / 3], thresholds=[0.0],
            bbox_prune_threshold=0.0, allow_no_crop=True, num_attempts=10, output_bbox_indices=True)
        images = fn.decoders.image_slice(encoded, anchor, shape, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, antialias=True)
    if spec.hflip_prob > 0:
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=mirror)
    images, sizes = _normalise(images, mirror, spec)
    return images, sizes, boxes, kept


@pipeline_def
def _image_json_pipeline(paths, index_paths, shard_id, num_shards, spec, train, decode_device, shuffle_buffer,
                         regions, region_features, reader_seed, pad_last_batch):
    ext = [";".join(IMAGE_EXTS), "json"] + ([BOXES_EXT] if regions else []) + ([FEATURES_EXT] if region_features
                                                                               else [])
    members = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=ext,
        shard_id=shard_id, num_shards=num_shards,
        # Training: the order of the tar files is reshuffled every epoch from (seed, epoch), the same
        # on every rank, and each rank then reads its own contiguous slice of that order, so the
        # ranks' slices are disjoint and cover the epoch; samples are also mixed in a buffer.
        random_shuffle=train and shuffle_buffer > 1, initial_fill=max(1, shuffle_buffer),
        shuffle_after_epoch=train, shuffle_after_epoch_seed=reader_seed if train else None, seed=reader_seed,
        pad_last_batch=pad_last_batch, missing_component_behavior="error",
        dtypes=[types.UINT8] * len(ext), name=READER_NAME)
    encoded, meta = members[0], members[1]
    source = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
    meta = fn.pad(meta, fill_value=0)
    if not regions:
        images, sizes = _augment(encoded, spec, train, decode_device)
        return images, sizes, meta, source
    boxes = fn.decoders.numpy(members[2])
    if train:
        images, sizes, boxes, kept = _augment_with_boxes(encoded, boxes, spec, decode_device)
    else:  # the whole image is resized, so normalised boxes stay as they are, all of them kept
        images, sizes = _augment(encoded, spec, False, decode_device)
        kept = None
    outputs = [images, sizes, meta, source, fn.pad(boxes, fill_value=-1.0, axes=0)]
    if kept is not None:
        outputs.append(fn.pad(kept, fill_value=-1))
    if region_features:
        # all axes: an image without boxes may store its features as (0, 0)
        outputs.append(fn.pad(fn.decoders.numpy(members[3]), fill_value=0))
    return tuple(outputs)


@pipeline_def
def _encoded_images_pipeline(spec, train, decode_device, source):
    # `source` hands DALI one batch of encoded images per call; DALI calls it ahead of the consumer
    # (prefetch_queue_depth batches), so files are read and decoded while the model computes.
    encoded = fn.external_source(source=source, batch=True, name="encoded", dtype=types.UINT8, ndim=1)
    return _augment(encoded, spec, train, decode_device)


def define_shard_pipeline(paths, index_paths, spec: ImageSpec, *, rank: int = 0, world_size: int = 1,
                          train: bool = True, batch_size: int = 2, num_threads: int = 2, seed: int = 0,
                          shuffle_buffer: int = 1, device: str | None = None, regions: RegionSpec | None = None,
                          checkpoint: dict | None = None, device_id: int | str | None = CURRENT):
    """The shard loader's DALI pipeline, defined and not built (`device` "cuda": the mixed decoder)."""
    decode_device, device_id = _devices(device, device_id)
    return _image_json_pipeline(
        paths=paths, index_paths=index_paths, shard_id=rank, num_shards=world_size, spec=spec, train=train,
        decode_device=decode_device, shuffle_buffer=shuffle_buffer if train else 1,
        regions=regions is not None, region_features=bool(regions and regions.features),
        reader_seed=derive(seed, "order"), pad_last_batch=not train,
        # augmentation randomness differs per rank; the reader's shard order does not
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=derive(seed, "augment", rank),
        prefetch_queue_depth=2,
        # DALI's own checkpointing: reader position and every random operator's state, so a
        # resumed run sees exactly the batches the interrupted one would have seen.
        enable_checkpointing=train, checkpoint=checkpoint)


def define_file_pipeline(spec: ImageSpec, batch_size: int, source, *, train: bool = False, num_threads: int = 2,
                         seed: int = 0, device: str | None = None, device_id: int | str | None = CURRENT,
                         prefetch: int = 2):
    """The file decoder's DALI pipeline, defined and not built; `source()` returns one batch of encoded
    images (a list of uint8 arrays) per call and raises StopIteration at the end."""
    decode_device, device_id = _devices(device, device_id)
    return _encoded_images_pipeline(spec=spec, train=train, decode_device=decode_device, source=source,
                                    batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                                    prefetch_queue_depth=prefetch)


def _devices(device: str | None, device_id: int | str | None = CURRENT) -> tuple[str, int | None]:
    """(DALI decoder placement, DALI device_id) for a torch device type. On CUDA, device_id None defines a
    graph without touching a device (DALI checks it when serialised): the CPU tests do that."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        return "cpu", None
    return "mixed", torch.cuda.current_device() if device_id == CURRENT else device_id


@dataclass
class ImageTextBatch:
    images: torch.Tensor  # (B, 3, H, W) float32, normalised, padded, on the pipeline's device
    image_sizes: torch.Tensor  # (B, 2) int64 valid (height, width) of each image, on the CPU
    metas: list[dict]  # per image: the sample JSON (captions, key, ...)
    sources: list[str]  # per image: "shard.tar:offset:member"
    regions: RegionTargets | None = None  # boxes aligned with `images`, when the loader reads them
    source: str = "train"  # the name of the source the batch was drawn from


@dataclass(frozen=True)
class CheckedShards:
    """One source's shards after `check_source`: what every later reader of them needs, so a start checks
    each shard set once however many loaders (training, its restart at a resume, evaluation) read it."""
    name: str
    weight: float
    paths: tuple[str, ...]
    index_paths: tuple[str, ...] | None  # None: not indexed (DALI scans each tar; nothing was checked)
    samples: int | None  # as the indexes list them; None when not indexed
    fingerprint: list  # what saved data positions refer to (shards.shard_fingerprint)
    caption_groups: int | None = None  # samples counted once per `captions_per_group` captions (SOHO's epoch)


def check_source(source: ShardSource, regions: RegionSpec | None = None, report: bool = True,
                 captions_per_group: int = 0) -> CheckedShards:
    """Lists a source's shards and checks them: indexes current and complete (`trusted_index_paths`), sample
    counts as the manifest records, the detector members present when `regions` are read. `report`: log
    what the converter's checker left out (one rank says it). With `captions_per_group`, also counts the
    groups of that many captions (`shards.caption_group_count`)."""
    paths = list_shards(source.shards)
    index_paths = trusted_index_paths(paths)
    if index_paths is None:
        log.warning("%d shards of %s have no index: DALI scans each tar, and no sample was checked; run %s",
                    len(paths), source.name, fix_command(paths))
    else:
        check_manifest(paths)
        if report and (losses := summarise_losses(paths)):
            log.info("%s", losses)
        if regions is not None:
            _require_members(index_paths, [BOXES_EXT] + ([FEATURES_EXT] if regions.features else []))
    return CheckedShards(source.name, source.weight, tuple(paths), None if index_paths is None else tuple(index_paths),
                         None if index_paths is None else indexed_sample_count(paths), shard_fingerprint(paths),
                         caption_group_count(paths, captions_per_group) if index_paths and captions_per_group else None)


def as_sources(shards) -> list[ShardSource | CheckedShards]:
    """A shard spec (folders, globs, tars) as one source "train"; a sequence of sources (ShardSource, or
    CheckedShards already checked) as it is."""
    if isinstance(shards, (list, tuple)) and shards and all(isinstance(s, (ShardSource, CheckedShards))
                                                           for s in shards):
        return list(shards)
    return [ShardSource("train", (shards,) if isinstance(shards, str) else tuple(shards), 1.0)]


def _strings(array: np.ndarray) -> list[str]:
    return [row.tobytes().rstrip(b"\0").decode(errors="replace") for row in array]


class _Stream:
    """One DALI pipeline and iterator over a list of tars (one orientation group, or all)."""

    def __init__(self, paths, index_paths, batch_size, spec, rank, world_size, train, num_threads, seed,
                 shuffle_buffer, device, regions, checkpoint):
        self.regions = regions
        self.pipe = define_shard_pipeline(paths, index_paths, spec, rank=rank, world_size=world_size, train=train,
                                          batch_size=batch_size, num_threads=num_threads, seed=seed,
                                          shuffle_buffer=shuffle_buffer, device=device, regions=regions,
                                          checkpoint=checkpoint)
        self.pipe.build()
        # PARTIAL for evaluation: each rank returns exactly its own samples, no padding repeats.
        # FILL (without padding) for training: an epoch's last, short batch is completed with the
        # next epoch's first samples, so every step has the full micro-batch and no sample of an
        # epoch is lost or repeated.
        policy = LastBatchPolicy.FILL if train else LastBatchPolicy.PARTIAL
        outputs = ["images", "sizes", "meta", "source"]
        if regions is not None:
            outputs += ["boxes"] + (["kept"] if train and spec.mode == "square" else []) + (
                ["features"] if regions.features else [])
        self.iterator = DALIGenericIterator([self.pipe], outputs, reader_name=READER_NAME,
                                            last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)


class ShardLoader:
    """Iterates `ImageTextBatch`es from one rank's slice of the shards.

    `shards` is one set (folders, globs, tars: each image equally likely) or a weighted mixture of
    `ShardSource`s: each batch comes from one source, drawn with probability weight / total weight
    from this rank's generator (seeded by the seed and the rank, kept in `checkpoint()`), so the mix
    is deterministic and resumes exactly. A source that reaches the end of its slice starts its next
    epoch by itself, whatever the others do.

    Before any pipeline exists the shards are checked: indexes current and complete
    (`trusted_index_paths`), sample counts as the manifest records. In aspect mode with
    `group_by_orientation`, landscape and portrait images of a source are read by two pipelines (the
    same tars, each through an index of one orientation) and each batch comes from one of them, so
    little of a batch is padding; within a source the group is drawn in proportion to its size.

    `epochs()` yields one pass; `forever()` restarts at the end of each pass, which is what a
    step-based training loop wants (every rank then takes the same number of steps).
    """

    def __init__(self, shards, batch_size: int, spec: ImageSpec, rank: int = 0, world_size: int = 1,
                 train: bool = True, num_threads: int = 2, seed: int = 0, shuffle_buffer: int = 1024,
                 device: str | None = None, regions: RegionSpec | None = None, checkpoint: dict | None = None,
                 group_by_orientation: bool = False):
        self.sources = as_sources(shards)
        self.spec, self.regions, self.batch_size = spec, regions, batch_size
        self._tmp = None
        if group_by_orientation and spec.mode == "aspect":
            self._tmp = tempfile.TemporaryDirectory(prefix="soho_ds_orientation_")
        self.paths: list[str] = []
        plan = []  # (source name, tars, index files, samples, probability weight) of each stream
        for source in self.sources:
            checked = source if isinstance(source, CheckedShards) else check_source(source, regions, rank == 0)
            self.paths += checked.paths
            groups = self._groups(checked, world_size, batch_size)
            total = sum(n for _, _, n in groups)
            plan += [(source.name, tars, idx, n, source.weight * (n / total if len(groups) > 1 else 1.0))
                     for tars, idx, n in groups]
        self.stream_sources = [p[0] for p in plan]
        self.stream_samples = [p[3] for p in plan]  # 0 where the shards are not indexed
        self.stream_weights = [p[4] for p in plan]
        states = (checkpoint or {}).get("streams") or [None] * len(plan)
        if len(states) != len(plan):
            raise ValueError(f"data state has {len(states)} streams, the shards now make {len(plan)}")
        self.streams = [_Stream(tars, idx, batch_size, spec, rank, world_size, train, num_threads,
                                derive(seed, "stream", i), shuffle_buffer, device, regions, state)
                        for i, ((_, tars, idx, _, _), state) in enumerate(zip(plan, states))]
        self.generator = torch.Generator().manual_seed(derive(seed, "mix", rank))
        if checkpoint and checkpoint.get("generator") is not None:
            self.generator.set_state(checkpoint["generator"])

    def _groups(self, checked: CheckedShards, world_size: int, batch_size: int
                ) -> list[tuple[list[str], list[str] | None, int]]:
        """One source's checked shards as (tars, index files, samples) per orientation group."""
        paths, index_paths = list(checked.paths), checked.index_paths and list(checked.index_paths)
        if index_paths is None or self._tmp is None:
            return [(paths, index_paths, 0)]
        folder = Path(self._tmp.name) / checked.name
        folder.mkdir()
        return _orientation_groups(paths, index_paths, folder, world_size * batch_size)

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    def checkpoint(self) -> dict:
        """The pipelines' state after the batches consumed so far (DALI accounts for prefetching)."""
        return {"streams": [s.iterator.checkpoints()[0] for s in self.streams],
                "generator": self.generator.get_state()}

    def _next(self, stream: _Stream):
        try:
            return next(stream.iterator)
        except StopIteration:
            raise
        except RuntimeError as e:
            raise self._decode_error(e) from None

    def _decode_error(self, error: RuntimeError) -> ReportedError:
        """DALI names neither the object it could not read nor the sample it could not decode: an object
        store that stopped answering is named first; else the undecodable samples of these shards."""
        log.error("DALI stopped (%s); looking for the cause in %d shards ...",
                  str(error).splitlines()[-1][:200] if str(error) else "", len(self.paths))
        for path in (p for p in self.paths if storage.is_s3(p)):
            try:
                storage.stat(path)
            except storage.StorageError as e:  # the first object that does not answer is enough
                return storage.StorageError(f"reading the shards stopped: {e}. Nothing was lost: once the store "
                                            "answers, restart with --resume to continue from the last checkpoint")
        bad = find_undecodable(self.paths)
        where = ("; ".join(f"{shard}:{key} ({reason})" for shard, key, reason in bad[:5])
                 if bad else "no sample failed when decoded alone (see DALI's message above)")
        return SampleDecodeError(f"a sample could not be decoded during training: {where}. Fix: "
                                 f"{fix_command(self.paths)} (leaves such samples out), then restart with --resume "
                                 f"to continue from the last checkpoint.\nDALI: {str(error)[-500:]}")

    def _convert(self, out: dict, source: str) -> ImageTextBatch:
        sources = _strings(out["source"].numpy())
        try:
            metas = [decode_meta(row.tobytes(), src.rsplit(".", 1)[0] or f"sample {i}")
                     for i, (row, src) in enumerate(zip(out["meta"].numpy(), sources))]
        except ValueError as e:  # unindexed shards: nothing was checked before training
            raise ShardError(f"{e}. Fix: {fix_command(self.paths)} checks every sample and leaves such ones out, "
                             "then restart with --resume") from None
        sizes = out["sizes"].cpu().long()
        if self.regions is None:
            return ImageTextBatch(out["images"], sizes, metas, sources, source=source)
        boxes = out["boxes"].cpu().numpy().reshape(len(metas), -1, 4)
        # Without a crop every box is kept in its original order; padding rows are -1.
        kept = out["kept"].cpu().numpy().reshape(len(metas), -1) if "kept" in out else np.where(
            boxes[..., 0] >= 0, np.arange(boxes.shape[1])[None, :], -1)
        features = out["features"].cpu().numpy() if "features" in out else None
        regions = RegionTargets.build(metas, boxes, kept, features, sizes.numpy(), self.regions.num_attributes,
                                      self.regions.max_boxes, sources)
        return ImageTextBatch(out["images"], sizes, metas, sources, regions, source)

    def epochs(self):
        """One pass over this rank's slice (evaluation), stream after stream."""
        for i, stream in enumerate(self.streams):
            while True:
                try:
                    out = self._next(stream)
                except StopIteration:
                    break
                if out[0]["sizes"].shape[0]:  # a rank's last batch of a pass may be empty (DALI's PARTIAL)
                    yield self._convert(out[0], self.stream_sources[i])

    def forever(self):
        """Training stream: epoch after epoch of every source with no gap (the iterators reset themselves)."""
        weights = torch.tensor(self.stream_weights, dtype=torch.float) if len(self.streams) > 1 else None
        while True:
            i = 0 if weights is None else int(torch.multinomial(weights, 1, generator=self.generator))
            # One draw per batch: at the end of its epoch the drawn stream starts its next one. (Drawing again
            # would tie the mix to where epochs end, which a stream restored from a checkpoint need not repeat.)
            try:
                out = self._next(self.streams[i])
            except StopIteration:
                try:
                    out = self._next(self.streams[i])
                except StopIteration:
                    raise ShardError(f"{self.stream_sources[i]}: its shards give this rank no batch of "
                                     f"{self.batch_size}: fewer samples than ranks x micro-batch") from None
            yield self._convert(out[0], self.stream_sources[i])


def _orientation_groups(paths: list[str], index_paths: list[str], folder: Path, min_samples: int
                        ) -> list[tuple[list[str], list[str], int]]:
    """(tars, index files, samples) of the landscape (width >= height) and the portrait samples,
    each through an index holding only that orientation. One group when either would be smaller
    than `min_samples` (one full batch per rank)."""
    sizes = sample_sizes(paths)
    if sizes is None:
        return [(paths, index_paths, 0)]
    groups = {"landscape": ([], [], 0), "portrait": ([], [], 0)}
    for i, (tar, idx, shard_sizes) in enumerate(zip(paths, index_paths, sizes)):
        lines = storage.read_text(idx).splitlines()[1:]
        for name in groups:
            keep = [line for line, (h, w) in zip(lines, shard_sizes) if (w >= h) == (name == "landscape")]
            if keep:
                sub = folder / f"{i:06d}.{name}.idx"
                sub.write_text(f"v1.2 {len(keep)}\n" + "\n".join(keep) + "\n")
                tars, idxs, n = groups[name]
                groups[name] = (tars + [tar], idxs + [str(sub)], n + len(keep))
    if min(n for _, _, n in groups.values()) < min_samples:
        return [(paths, index_paths, 0)]
    return list(groups.values())


def find_undecodable(paths: list[str]) -> list[tuple[str, str, str]]:
    """(shard, key, reason) of every sample of `paths` whose image does not decode alone."""
    import tarfile

    checker, bad = ImageChecker(), []
    for shard in paths:
        try:
            with storage.local_file(shard) as local, tarfile.open(local) as tar:
                for member in tar:
                    name = member.name
                    ext = name[name.find(".", name.rfind("/") + 1) + 1:]
                    if member.isfile() and ext in IMAGE_EXTS:
                        result = checker([tar.extractfile(member).read()])[0]
                        if isinstance(result, str):
                            bad.append((shard, name[: -len(ext) - 1], result))
        except (tarfile.TarError, OSError) as e:  # StorageError is an OSError: the object is named with it
            bad.append((shard, "-", f"unreadable tar ({e})"))
    return bad


def _require_members(index_paths: list[str], exts: list[str]) -> None:
    """Refuses, before reading, shards whose index shows a sample without one of `exts`."""
    for idx in index_paths:
        for line in storage.read_text(idx).splitlines()[1:]:
            fields = line.split()
            present = set(fields[0::4])
            missing = [e for e in exts if e not in present]
            if missing:
                key = fields[3].split(".", 1)[0]
                raise ValueError(f"{idx[:-4]}.tar: sample {key} has no {', '.join(missing)} member; the semantic "
                                 "losses need detector outputs (soho-attach-detections adds them)")


def _read(item) -> tuple[str, np.ndarray]:
    """A request item: a file path, or (name, encoded bytes) of an in-memory image."""
    if isinstance(item, tuple):
        return item
    try:
        return item, np.fromfile(item, dtype=np.uint8)
    except OSError as e:
        raise FileNotFoundError(f"{item}: cannot read image ({e.strerror})") from None


class ImageFileDecoder:
    """Decodes image files (downstream datasets: annotation files plus image folders; search over a
    folder; `load_model`) with the shard pipeline's DALI operators, on either device. Format is read
    from the content, so NLVR2's JPEG-data ".png" files decode too.

    `stream(requests)` decodes a sequence of requests (each a list of paths, or (name, bytes)
    pairs), yielding one padded batch per request in order; DALI reads and decodes the next
    requests while the caller works on the current one. `__call__(paths)` is one request."""

    def __init__(self, spec: ImageSpec, batch_size: int, train: bool = False, num_threads: int = 2, seed: int = 0,
                 device: str | None = None):
        self.batch_size, self.spec, self.train = batch_size, spec, train
        self._args = dict(train=train, num_threads=num_threads, seed=seed, device=device)
        self._requests: Iterator | None = None
        self._pending: deque[tuple[list[str], list[np.ndarray]]] = deque()  # handed to DALI, not yet returned
        self.pipe = None

    def _source(self) -> list[np.ndarray]:
        request = next(self._requests)  # StopIteration: the end of this stream
        if not 0 < len(request) <= self.batch_size:
            raise ValueError(f"a request holds {len(request)} images; this decoder takes 1 to {self.batch_size}")
        names, encoded = zip(*map(_read, request))
        self._pending.append((list(names), list(encoded)))
        return list(encoded)

    def stream(self, requests) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """-> per request: (len, 3, H, W) float32 on the pipeline's device, padded to a common size
        (aspect mode), and the valid (height, width) of each (len, 2) on the CPU."""
        if self._requests is not None:
            raise RuntimeError("this decoder is already streaming: one stream at a time")
        if self.pipe is None:
            self.pipe = define_file_pipeline(self.spec, self.batch_size, self._source, **self._args)
            self.pipe.build()
        self._requests, self._pending = iter(requests), deque()
        finished = False
        try:
            while True:
                try:
                    out, size = self.pipe.run()
                except StopIteration:
                    self.pipe.reset()
                    finished = True
                    return
                except RuntimeError as e:
                    raise self._decode_error(e) from None
                names, _ = self._pending.popleft()
                yield _to_torch(out), _sizes(size, len(names))
        finally:
            self._requests = None
            if not finished:  # abandoned with batches in flight: the next stream starts on a new pipeline
                self.pipe = None

    def _decode_error(self, error: RuntimeError) -> SampleDecodeError:
        """Names the images of the failed request that do not decode alone."""
        names, encoded = self._pending.popleft() if self._pending else ([], [])
        last = str(error).splitlines()[-1] if str(error) else repr(error)
        bad = {n: r for n, r in zip(names, ImageChecker()([c.tobytes() for c in encoded])) if isinstance(r, str)}
        return SampleDecodeError(f"cannot decode image(s) {', '.join(bad or names[:1]) or '?'}: {last}",
                                 bad or {n: last for n in names[:1]})

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Paths (or (name, bytes) pairs), any number -> (len, 3, H, W) padded, (len, 2) valid sizes."""
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        images, sizes = zip(*self.stream(chunks))
        return _pad_to_common(list(images)), torch.cat(sizes)


def _to_torch(out) -> torch.Tensor:
    out = out.as_tensor()
    tensor = torch.empty(out.shape(), dtype=torch.float32, device="cuda" if isinstance(out, TensorGPU) else "cpu")
    feed_ndarray(out, tensor)
    return tensor


def _sizes(size, n: int) -> torch.Tensor:
    size = size.as_cpu() if hasattr(size, "as_cpu") else size
    return torch.from_numpy(np.stack([np.array(size[i]) for i in range(n)])).long()


def orientation_order(paths: list[str], cache: dict[str, bool] | None = None) -> list[int]:
    """Indices of `paths`, landscape images (width >= height, EXIF rotation applied) first, then portrait,
    each in the given order: batches taken in this order are padded little (aspect mode). The sizes
    come from the file headers (kept in `cache`); an unreadable one counts as landscape (the decoder
    names it later)."""
    from PIL import Image

    cache = {} if cache is None else cache
    for p in paths:
        if p in cache:
            continue
        try:
            with Image.open(p) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                    w, h = h, w
        except (OSError, ValueError, SyntaxError):
            w, h = 1, 0
        cache[p] = w < h  # portrait
    return sorted(range(len(paths)), key=lambda i: cache[paths[i]])


def _pad_to_common(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates padded batches of possibly different sizes (zero = the mean colour)."""
    h = max(c.shape[-2] for c in chunks)
    w = max(c.shape[-1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, w - c.shape[-1], 0, h - c.shape[-2])) for c in chunks])
