"""SNLI-VE: does the image entail, contradict or say nothing about the hypothesis? 3-way classifier
on the pooled [CLS] vector.

File: the official JSON-lines (`snli_ve_{train,dev,test}.jsonl`) over Flickr30k images. Both
historical spellings of the image key are read: "Flikr30kID" with the ".jpg" extension (the
original release) and "Flickr30K_ID" without it (the current generator). Lines whose
gold_label is "-" (annotators disagreed) carry no label; they are left out and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from soho_ds.config import RunConfig
from soho_ds.models.heads import classifier_head
from soho_ds.tasks.base import AnnotationError, ClassifierModel, ExampleTask, read_jsonl, require

log = logging.getLogger(__name__)
LABELS = {label: i for i, label in enumerate(("entailment", "neutral", "contradiction"))}
IMAGE_KEYS = ("Flickr30K_ID", "Flikr30kID")


@dataclass(frozen=True)
class SNLIVEExample:
    pair_id: str
    image: str  # "<flickr id>.jpg"
    hypothesis: str
    label: int


def read_snli_ve(path: str | Path) -> list[SNLIVEExample]:
    out, no_gold = [], 0
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        key = next((k for k in IMAGE_KEYS if k in obj), None)
        if key is None:
            raise AnnotationError(f"{where}: no image key (expected one of {IMAGE_KEYS})")
        require(obj, ("sentence2", "gold_label"), where)
        if obj["gold_label"] == "-":
            no_gold += 1
            continue
        if obj["gold_label"] not in LABELS:
            raise AnnotationError(f"{where}: gold_label must be one of {sorted(LABELS)}, got {obj['gold_label']!r}")
        image = str(obj[key])
        image = image if image.endswith(".jpg") else f"{image}.jpg"
        out.append(SNLIVEExample(obj.get("pairID", str(n)), image, obj["sentence2"], LABELS[obj["gold_label"]]))
    if no_gold:
        log.info("%s: left out %d lines without a gold label ('-')", path, no_gold)
    return out


class SNLIVEModel(ClassifierModel):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        h = self.model.hidden_size
        self.head = classifier_head(cfg.task.head, h, h, len(LABELS), cfg.task.head_dropout)

    def logits(self, batch) -> torch.Tensor:
        return self.head(self.encode(batch, batch["input_ids"], batch["attention_mask"])).float()


class SNLIVETask(ExampleTask):
    name = "snli_ve"
    model_class = SNLIVEModel
    labels = tuple(LABELS)

    def __init__(self, cfg: RunConfig, dist_info, micro_batch: int, init: str | None = None):
        super().__init__(cfg, dist_info, micro_batch, init)
        t = cfg.task
        names = lambda e: [e.image]  # noqa: E731
        self.train_examples = self.keep_present(read_snli_ve(t.train_file), names, t.train_file) if t.train_file else []
        self.eval_examples = self.keep_present(read_snli_ve(t.eval_file), names, t.eval_file)

    def eval_items(self) -> list:
        return self.eval_examples

    def chance(self) -> dict[str, float]:
        return {"accuracy": 100 / 3}


    def image_names(self, examples: list[SNLIVEExample]) -> list[str]:
        return [e.image for e in examples]

    def collate(self, examples: list[SNLIVEExample], train: bool, images: dict):
        batch = self.tokenize([e.hypothesis for e in examples])
        batch.update(images)
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    def evaluate(self, module, device, dtype) -> dict[str, float]:
        return self.accuracy(self.eval_examples, module, device, dtype)
