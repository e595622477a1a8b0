"""NVIDIA DALI pipeline: WebDataset shards -> decoded, augmented, normalised image batches.

One pipeline definition serves both devices: with CUDA the JPEGs are decoded by nvJPEG
(`device="mixed"`) and augmented on the GPU; without it the same operators run on the CPU.
Each rank reads its own slice of the samples (`shard_id=rank, num_shards=world`). The
per-sample JSON travels beside the image as zero-padded bytes and is parsed on the host
(DALI cannot parse JSON in-graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator, feed_ndarray
from nvidia.dali.tensors import TensorGPU

from soho_ds.data.regions import BOXES_EXT, FEATURES_EXT, RegionSpec, RegionTargets
from soho_ds.data.shards import decode_meta, list_shards

# ImageNet statistics, in 0-255 pixel units (DALI normalises before scaling).
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
READER_NAME = "shards"


def _augment(encoded, image_size, train, crop_scale, hflip_prob, decode_device):
    """Decode + (random-resized-crop, flip) + resize + normalise: the ops every pipeline shares."""
    if train:
        images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                               random_area=list(crop_scale), random_aspect_ratio=[3 / 4, 4 / 3])
        mirror = fn.random.coin_flip(probability=hflip_prob)
    else:
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        mirror = 0
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                    mirror=mirror)


def _augment_with_boxes(encoded, boxes, image_size, crop_scale, hflip_prob, decode_device):
    """The training augmentation with boxes kept aligned (DALI's bbox-aware operators): the crop
    window is drawn by `random_bbox_crop`, which also maps the boxes into it and reports which
    survive; the same coin flips image and boxes. Boxes are xyXY in [0, 1] of the output image."""
    side = [crop_scale[0] ** 0.5, crop_scale[1] ** 0.5]  # crop_scale is an area fraction
    anchor, shape, boxes, kept = fn.random_bbox_crop(
        boxes, bbox_layout="xyXY", scaling=side, aspect_ratio=[3 / 4, 4 / 3], thresholds=[0.0],
        bbox_prune_threshold=0.0, allow_no_crop=True, num_attempts=10, output_bbox_indices=True)
    images = fn.decoders.image_slice(encoded, anchor, shape, device=decode_device, output_type=types.RGB)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
    mirror = fn.random.coin_flip(probability=hflip_prob)
    boxes = fn.bb_flip(boxes, ltrb=True, horizontal=mirror)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN, std=STD,
                                      mirror=mirror)
    return images, boxes, kept


@pipeline_def
def _image_json_pipeline(paths, index_paths, shard_id, num_shards, image_size, train, crop_scale, hflip_prob,
                         decode_device, shuffle_buffer, regions, region_features, reader_seed, pad_last_batch):
    ext = ["jpg", "json"] + ([BOXES_EXT] if regions else []) + ([FEATURES_EXT] if region_features else [])
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
    jpegs, meta = members[0], members[1]
    if not regions:
        return _augment(jpegs, image_size, train, crop_scale, hflip_prob, decode_device), fn.pad(meta, fill_value=0)
    boxes = fn.decoders.numpy(members[2])
    if train:
        images, boxes, kept = _augment_with_boxes(jpegs, boxes, image_size, crop_scale, hflip_prob, decode_device)
        outputs = [images, fn.pad(meta, fill_value=0), fn.pad(boxes, fill_value=-1.0, axes=0),
                   fn.pad(kept, fill_value=-1)]
    else:  # the whole image is resized, so normalised boxes stay as they are, all of them kept
        images = _augment(jpegs, image_size, False, crop_scale, hflip_prob, decode_device)
        outputs = [images, fn.pad(meta, fill_value=0), fn.pad(boxes, fill_value=-1.0, axes=0)]
    if region_features:
        # all axes: an image without boxes may store its features as (0, 0)
        outputs.append(fn.pad(fn.decoders.numpy(members[3]), fill_value=0))
    return tuple(outputs)


@pipeline_def
def _encoded_images_pipeline(image_size, train, crop_scale, hflip_prob, decode_device):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    return _augment(encoded, image_size, train, crop_scale, hflip_prob, decode_device)


def _devices(device: str | None) -> tuple[str, int | None]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    return ("mixed" if on_gpu else "cpu"), (torch.cuda.current_device() if on_gpu else None)


@dataclass
class ImageTextBatch:
    images: torch.Tensor  # (B, 3, H, W) float32, normalised, on the pipeline's device
    metas: list[dict]  # per image: the sample JSON (captions, key, ...)
    regions: RegionTargets | None = None  # boxes aligned with `images`, when the loader reads them


class ShardLoader:
    """Iterates `ImageTextBatch`es from one rank's slice of the shards.

    `epochs()` yields one pass; `forever()` restarts at the end of each pass, which is what a
    step-based training loop wants (every rank then takes the same number of steps).
    """

    def __init__(self, shards: str, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 train: bool = True, crop_scale=(0.5, 1.0), hflip_prob: float = 0.5, num_threads: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1024, device: str | None = None,
                 regions: RegionSpec | None = None, checkpoint: str | None = None):
        self.paths = list_shards(shards)
        self.image_size, self.regions = image_size, regions
        index_paths = [p[: -len(".tar")] + ".idx" for p in self.paths]
        index_paths = index_paths if all(Path(p).exists() for p in index_paths) else None
        if regions is not None and index_paths:
            _require_members(index_paths, [BOXES_EXT] + ([FEATURES_EXT] if regions.features else []))
        decode_device, device_id = _devices(device)
        self.pipe = _image_json_pipeline(
            paths=self.paths, index_paths=index_paths, shard_id=rank, num_shards=world_size,
            image_size=image_size, train=train, crop_scale=crop_scale, hflip_prob=hflip_prob,
            decode_device=decode_device, shuffle_buffer=shuffle_buffer if train else 1,
            regions=regions is not None, region_features=bool(regions and regions.features),
            reader_seed=seed, pad_last_batch=not train,
            # augmentation randomness differs per rank; the reader's shard order does not
            batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + 1 + rank,
            prefetch_queue_depth=2,
            # DALI's own checkpointing: reader position and every random operator's state, so a
            # resumed run sees exactly the batches the interrupted one would have seen.
            enable_checkpointing=train, checkpoint=checkpoint)
        self.pipe.build()
        # PARTIAL for evaluation: each rank returns exactly its own samples, no padding repeats.
        # FILL (without padding) for training: an epoch's last, short batch is completed with the
        # next epoch's first samples, so every step has the full micro-batch and no sample of an
        # epoch is lost or repeated.
        policy = LastBatchPolicy.FILL if train else LastBatchPolicy.PARTIAL
        outputs = ["images", "meta"]
        if regions is not None:
            outputs += ["boxes"] + (["kept"] if train else []) + (["features"] if regions.features else [])
        self.iterator = DALIGenericIterator([self.pipe], outputs, reader_name=READER_NAME,
                                            last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)

    def checkpoint(self) -> str:
        """The pipeline state after the batches consumed so far (DALI accounts for prefetching)."""
        return self.iterator.checkpoints()[0]

    def _convert(self, out: dict) -> ImageTextBatch:
        meta = out["meta"].numpy()
        metas = [decode_meta(row.tobytes(), f"sample {i} of a batch from {self.paths[0]}…")
                 for i, row in enumerate(meta)]
        if self.regions is None:
            return ImageTextBatch(out["images"], metas)
        boxes = out["boxes"].cpu().numpy().reshape(len(metas), -1, 4)
        # Without augmentation every box is kept in its original order; padding rows are -1.
        kept = out["kept"].cpu().numpy().reshape(len(metas), -1) if "kept" in out else np.where(
            boxes[..., 0] >= 0, np.arange(boxes.shape[1])[None, :], -1)
        features = out["features"].cpu().numpy() if "features" in out else None
        regions = RegionTargets.build(metas, boxes, kept, features, self.image_size, self.regions.num_attributes,
                                      self.regions.max_boxes, where=f"shards {self.paths[0]}…")
        return ImageTextBatch(out["images"], metas, regions)

    def epochs(self):
        """One pass over this rank's slice (evaluation)."""
        for out in self.iterator:
            yield self._convert(out[0])

    def forever(self):
        """Training stream: epoch after epoch with no gap (the iterator resets itself)."""
        while True:
            try:
                out = next(self.iterator)
            except StopIteration:
                continue
            yield self._convert(out[0])


def _require_members(index_paths: list[str], exts: list[str]) -> None:
    """Refuses, before reading, shards whose index shows a sample without one of `exts`."""
    for idx in index_paths:
        with open(idx) as f:
            next(f)
            for line in f:
                fields = line.split()
                present = set(fields[0::4])
                missing = [e for e in exts if e not in present]
                if missing:
                    key = fields[3].split(".", 1)[0]
                    raise ValueError(f"{idx[:-4]}.tar: sample {key} has no {', '.join(missing)} member; the semantic "
                                     "losses need detector outputs (tools/attach_detections.py adds them)")


class ImageFileDecoder:
    """Decodes image files in exactly the order asked for (downstream datasets: annotation files
    plus image folders). Same DALI ops as the shard pipeline; format is read from the content,
    so NLVR2's JPEG-data ".png" files decode too."""

    def __init__(self, image_size: int, batch_size: int, train: bool = False, crop_scale=(0.5, 1.0),
                 hflip_prob: float = 0.0, num_threads: int = 2, seed: int = 0, device: str | None = None):
        decode_device, device_id = _devices(device)
        self.batch_size = batch_size
        self.pipe = _encoded_images_pipeline(
            image_size=image_size, train=train, crop_scale=crop_scale, hflip_prob=hflip_prob,
            decode_device=decode_device, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
            seed=seed, exec_async=False, exec_pipelined=False)
        self.pipe.build()

    def __call__(self, paths: list[str]) -> torch.Tensor:
        """(len(paths), 3, S, S) float32 on the pipeline's device."""
        chunks = []
        for start in range(0, len(paths), self.batch_size):
            encoded = []
            for p in paths[start:start + self.batch_size]:
                try:
                    encoded.append(np.fromfile(p, dtype=np.uint8))
                except OSError as e:
                    raise FileNotFoundError(f"{p}: cannot read image ({e.strerror})") from None
            self.pipe.feed_input("encoded", encoded)
            (out,) = self.pipe.run()
            out = out.as_tensor()
            tensor = torch.empty(out.shape(), dtype=torch.float32,
                                 device="cuda" if isinstance(out, TensorGPU) else "cpu")
            feed_ndarray(out, tensor)
            chunks.append(tensor)
        return torch.cat(chunks)
