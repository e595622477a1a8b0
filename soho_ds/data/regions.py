"""Offline detector outputs carried in the shards, for the semantic visual losses.

Per sample (see README "Semantic visual losses"):
- ``key.json`` holds ``"detections": {"image_w", "image_h", "boxes": [[x0, y0, x1, y1], ...]
  (original pixels), "object_ids": [c, ...], "attribute_ids": [[a, ...], ...]}``, readable
  and the source of truth;
- ``key.boxes.npy`` holds the same boxes as float32 (n, 4), normalised to [0, 1], because DALI's
  bbox operators need them inside the graph and DALI cannot parse JSON there;
- ``key.feats.npy`` (optional) holds one region feature per box, float16 (n, D).

The DALI pipeline crops, resizes and flips boxes with the image and reports which boxes
survived (`random_bbox_crop(output_bbox_indices=True)`); `RegionTargets.build` then picks
those boxes' classes, attributes and features on the host.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

BOXES_EXT = "boxes.npy"
FEATURES_EXT = "feats.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def detections_entry(boxes: np.ndarray, object_ids, attribute_ids, image_w: int, image_h: int) -> dict:
    """The sample-JSON entry for one image's detections (boxes in original pixels)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not (len(object_ids) == len(attribute_ids) == len(boxes)):
        raise ValueError(f"{len(boxes)} boxes but {len(object_ids)} object ids and {len(attribute_ids)} "
                         "attribute lists")
    return {"image_w": int(image_w), "image_h": int(image_h),
            "boxes": [[round(float(v), 2) for v in b] for b in boxes],
            "object_ids": [int(c) for c in object_ids],
            "attribute_ids": [[int(a) for a in attrs] for attrs in attribute_ids]}


def normalised_boxes(entry: dict) -> np.ndarray:
    """(n, 4) float32 boxes in [0, 1] from a detections entry; the `.boxes.npy` member's content."""
    scale = np.array([entry["image_w"], entry["image_h"]] * 2, dtype=np.float32)
    boxes = np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4) / scale
    return np.clip(boxes, 0.0, 1.0)


@dataclass(frozen=True)
class RegionSpec:
    """What the shard loader must deliver besides images and JSON."""
    num_attributes: int
    features: bool = False  # also read the `.feats.npy` member
    max_boxes: int = 36


@dataclass
class RegionTargets:
    """The boxes of one batch, flattened over images (R boxes in all).

    boxes: (R, 5) float32, rows ``[image_index, x0, y0, x1, y1]`` in pixels of the augmented
    image: the format `torchvision.ops.roi_align` takes. objects: (R,) class ids.
    attributes: (R, A) multi-hot float. features: (R, D) or None.
    """
    boxes: torch.Tensor
    objects: torch.Tensor
    attributes: torch.Tensor
    features: torch.Tensor | None

    def as_batch(self) -> dict[str, torch.Tensor]:
        out = {"region_boxes": self.boxes, "region_objects": self.objects, "region_attributes": self.attributes}
        if self.features is not None:
            out["region_features"] = self.features
        return out

    @classmethod
    def build(cls, metas: list[dict], boxes: np.ndarray, kept: np.ndarray, features: np.ndarray | None,
              image_sizes: np.ndarray, num_attributes: int, max_boxes: int,
              sources: list[str] | None = None) -> "RegionTargets":
        """metas: per image JSON; boxes (B, M, 4) in [0, 1] of each image after augmentation; kept (B, M)
        original box index of each (-1: padding); features (B, N, D) in the original box order or None;
        image_sizes (B, 2) each image's (height, width) in pixels, before the batch's padding."""
        rows, objects, attributes, feats = [], [], [], []
        for i, meta in enumerate(metas):
            where = sources[i] if sources else f"sample {meta.get('key', i)}"
            det = meta.get("detections")
            if det is None:
                raise ValueError(f"{where}: no 'detections' in its JSON (soho-attach-detections adds them)")
            n_boxes = len(det["object_ids"])
            picked = [int(j) for j in kept[i] if j >= 0][:max_boxes]
            h, w = (float(v) for v in image_sizes[i])
            for slot, j in enumerate(picked):
                if j >= n_boxes:
                    raise ValueError(f"{where}: box {j} of its {BOXES_EXT} has no entry in detections.object_ids "
                                     f"({n_boxes} boxes)")
                rows.append([i, *(boxes[i, slot] * np.array([w, h, w, h], dtype=np.float32))])
                objects.append(det["object_ids"][j])
                hot = np.zeros(num_attributes, dtype=np.float32)
                hot[[a for a in det["attribute_ids"][j] if 0 <= a < num_attributes]] = 1.0
                attributes.append(hot)
                if features is not None:
                    feats.append(features[i, j])
        return cls(
            boxes=torch.tensor(np.array(rows, dtype=np.float32)).reshape(-1, 5),
            objects=torch.tensor(objects, dtype=torch.long),
            attributes=torch.from_numpy(np.stack(attributes)) if attributes else torch.zeros(0, num_attributes),
            features=None if features is None else (
                torch.from_numpy(np.stack(feats).astype(np.float32)) if feats
                else torch.zeros(0, features.shape[-1])))
