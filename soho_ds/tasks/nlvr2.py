"""NLVR2: is a statement true of a pair of images? Each image is fused with the statement in its
own pass; the two [CLS] vectors are concatenated and classified (the pairing SOHO used).

File: the official JSON-lines (`dev.json`, `test1.json`, `train.json`): `sentence`, `label`
("True"/"False"), `identifier` "split-set-pair-sentence"; images `split-set-pair-img0.png` (left)
and `-img1.png` (right), under `<directory>/` for train. Not all ".png" files are PNGs: DALI
decodes by content.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from soho_ds.config import RunConfig
from soho_ds.models.heads import classifier_head
from soho_ds.tasks.base import AnnotationError, ClassifierModel, ExampleTask, read_jsonl, require

LABELS = {label: i for i, label in enumerate(("False", "True"))}


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    sentence: str
    images: tuple[str, str]  # left, right, relative to the image root
    label: int


def read_nlvr2(path: str | Path) -> list[NLVR2Example]:
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        require(obj, ("sentence", "label", "identifier"), where)
        if obj["label"] not in LABELS:
            raise AnnotationError(f"{where}: label must be \"True\" or \"False\", got {obj['label']!r}")
        parts = obj["identifier"].split("-")
        if len(parts) != 4:
            raise AnnotationError(f"{where}: identifier {obj['identifier']!r} is not split-set-pair-sentence")
        stem = "-".join(parts[:3])
        folder = f"{obj['directory']}/" if "directory" in obj else ""  # train images are in 100 folders
        out.append(NLVR2Example(obj["identifier"], obj["sentence"],
                                (f"{folder}{stem}-img0.png", f"{folder}{stem}-img1.png"), LABELS[obj["label"]]))
    return out


class NLVR2Model(ClassifierModel):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        h = self.model.hidden_size
        self.head = classifier_head(cfg.task.head, 2 * h, h, len(LABELS), cfg.task.head_dropout)

    def logits(self, batch) -> torch.Tensor:
        B = batch["input_ids"].shape[0]
        # images = [left_0..left_B-1, right_0..right_B-1]: one CNN pass, two fusion passes
        index = torch.arange(B, device=batch["input_ids"].device)
        ids, mask = batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1)
        pooled = self.encode(batch, ids, mask, torch.cat([index, index + B]))
        return self.head(torch.cat([pooled[:B], pooled[B:]], dim=-1)).float()


class NLVR2Task(ExampleTask):
    name = "nlvr2"
    model_class = NLVR2Model
    labels = tuple(LABELS)

    def __init__(self, cfg: RunConfig, dist_info, micro_batch: int, init: str | None = None):
        super().__init__(cfg, dist_info, micro_batch, init)
        self.images_per_batch = 2 * micro_batch  # each example is a pair of images
        t = cfg.task
        names = lambda e: list(e.images)  # noqa: E731
        self.train_examples = self.keep_present(read_nlvr2(t.train_file), names, t.train_file) if t.train_file else []
        self.eval_examples = self.keep_present(read_nlvr2(t.eval_file), names, t.eval_file)

    def eval_items(self) -> list:
        return self.eval_examples

    def chance(self) -> dict[str, float]:
        return {"accuracy": 50.0}


    def image_names(self, examples: list[NLVR2Example]) -> list[str]:
        return [e.images[0] for e in examples] + [e.images[1] for e in examples]

    def collate(self, examples: list[NLVR2Example], train: bool, images: dict):
        batch = self.tokenize([e.sentence for e in examples])
        batch.update(images)
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    def evaluate(self, module, device, dtype) -> dict[str, float]:
        return self.accuracy(self.eval_examples, module, device, dtype)
