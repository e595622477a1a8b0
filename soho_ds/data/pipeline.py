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


@pipeline_def
def _image_json_pipeline(paths, index_paths, shard_id, num_shards, image_size, train, crop_scale, hflip_prob,
                         decode_device, shuffle_buffer):
    jpegs, meta = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "json"],
        shard_id=shard_id, num_shards=num_shards,
        random_shuffle=train, initial_fill=shuffle_buffer,
        pad_last_batch=True, missing_component_behavior="error",
        dtypes=[types.UINT8, types.UINT8], name=READER_NAME)
    images = _augment(jpegs, image_size, train, crop_scale, hflip_prob, decode_device)
    return images, fn.pad(meta, fill_value=0)


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


class ShardLoader:
    """Iterates `ImageTextBatch`es from one rank's slice of the shards.

    `epochs()` yields one pass; `forever()` restarts at the end of each pass, which is what a
    step-based training loop wants (every rank then takes the same number of steps).
    """

    def __init__(self, shards: str, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 train: bool = True, crop_scale=(0.5, 1.0), hflip_prob: float = 0.5, num_threads: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1024, device: str | None = None):
        self.paths = list_shards(shards)
        index_paths = [p[: -len(".tar")] + ".idx" for p in self.paths]
        index_paths = index_paths if all(Path(p).exists() for p in index_paths) else None
        decode_device, device_id = _devices(device)
        self.pipe = _image_json_pipeline(
            paths=self.paths, index_paths=index_paths, shard_id=rank, num_shards=world_size,
            image_size=image_size, train=train, crop_scale=crop_scale, hflip_prob=hflip_prob,
            decode_device=decode_device, shuffle_buffer=shuffle_buffer if train else 1,
            batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + rank,
            prefetch_queue_depth=2)
        self.pipe.build()
        # PARTIAL for evaluation: each rank returns exactly its own samples, no padding repeats.
        # DROP for training: only full batches, so every step has the configured micro-batch.
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator([self.pipe], ["images", "meta"], reader_name=READER_NAME,
                                            last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)

    def _convert(self, out: dict) -> ImageTextBatch:
        meta = out["meta"].numpy()
        metas = [decode_meta(row.tobytes(), f"sample {i} of a batch from {self.paths[0]}…")
                 for i, row in enumerate(meta)]
        return ImageTextBatch(out["images"], metas)

    def epochs(self):
        for out in self.iterator:
            yield self._convert(out[0])

    def forever(self):
        while True:
            yield from self.epochs()


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
