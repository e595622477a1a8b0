"""What every downstream task shares: annotation reading with located errors, the finetune model
base (SOHO + a task head, loaded from a checkpoint), image files checked before training, and
rank-sliced batching.

A task module adds only its reader, head, loss and metric; the loop is `runtime.trainer`.
"""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from soho_ds import saved
from soho_ds.config import ReportedError, RunConfig
from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec, orientation_order
from soho_ds.data.text import load_tokenizer, tokenize
from soho_ds.models.losses import classification_loss
from soho_ds.models.soho import SohoModel
from soho_ds.models.weights import WeightsError, load_checked, what_it_holds
from soho_ds.runtime.dist import DistInfo
from soho_ds.runtime.trainer import to_device
from soho_ds.seeds import derive

log = logging.getLogger(__name__)


class AnnotationError(ReportedError, ValueError):
    """A malformed annotation, or the images it names missing, reported with its file and line."""


def read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line raises naming file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise AnnotationError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def require(obj: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise AnnotationError(f"{where}: missing field(s) {missing}")


class FinetuneModel(nn.Module):
    """SOHO plus a task head. `encode` runs images and texts through the shared model."""

    reused_heads: tuple[str, ...] = ()  # pretraining heads this task starts from (retrieval: the ITM head)

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.model = SohoModel(cfg.model)

    def encode(self, batch: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """-> pooled [CLS] vector (T, H) for each text, paired with batch["images"][image_index]."""
        visual = self.model.encode_image(batch["images"], batch.get("image_sizes"))
        _, pooled = self.model.fuse(input_ids, attention_mask, visual, image_index)
        return pooled

    def commit(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ends a training forward (see SohoModel.commit): its outputs with the loss to back-propagate."""
        return {**out, "loss": self.model.commit(out["loss"])}

    def load_pretrained(self, model: saved.SavedModel, same_task: bool = False) -> None:
        """Loads a saved model's weights. From this task's own model every weight, head included, must
        fit; from a pretraining or another task's model, the SOHO weights and `reused_heads`, every key
        present with its shape, the other heads left out by name."""
        state, path = model.weights(), model.path
        if same_task:
            load_checked(self, {k: v.to(self.state_dict()[k].dtype) if k in self.state_dict() else v
                                for k, v in state.items()}, str(path))
            log.info("initialised every weight, the task head included, from %s", path)
            return
        soho = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if not soho:
            raise WeightsError(f"--init {path}: not a soho-ds checkpoint (no model.* weights); it looks like "
                               f"{what_it_holds(sorted(state))}")
        for head in self.reused_heads:
            load_checked(getattr(self, head), {k[len(head) + 1:]: v for k, v in state.items()
                                               if k.startswith(head + ".")}, f"{path} ({head})")
        skipped = sorted({k.split(".")[0] for k in state
                          if not k.startswith(("model.",) + tuple(h + "." for h in self.reused_heads))})
        own = self.model.state_dict()
        unused = sorted(k for k in soho if k not in own)  # e.g. the VD when this task runs without it
        if unused:
            log.info("%s: not used by this model: %s", path, sorted({".".join(k.split(".")[:3]) for k in unused}))
        soho = {k: v.to(own[k].dtype) for k, v in soho.items() if k in own}
        load_checked(self.model, soho, str(path))
        log.info("initialised from %s (left out the heads %s)", path, skipped)


class ClassifierModel(FinetuneModel):
    """A finetune model whose `logits(batch)` are scored with cross-entropy against batch["labels"]."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss, acc = classification_loss(self.logits(batch), batch["labels"])
        return {"loss": loss, "loss/cls": loss, "acc/cls": acc}


class ExampleTask(ABC):
    """Base of the downstream tasks: examples -> batches, each rank its own slice of a per-epoch
    permutation drawn from (seed, epoch). Every rank gets the same number of batches (the
    remainder of an epoch is dropped), so no rank waits at a collective."""

    name: str = ""  # the key of soho_ds.tasks.TASKS and the value of task.name
    model_class: type[FinetuneModel]
    labels: tuple[str, ...] = ()  # a classifier's classes in the order of its head's outputs

    def __init__(self, cfg: RunConfig, dist_info: DistInfo, micro_batch: int, init: str | None = None):
        self.cfg, self.dist, self.micro_batch, self.init = cfg, dist_info, micro_batch, init
        self.images_per_batch = micro_batch
        d = cfg.data
        self.tokenizer = load_tokenizer(d.tokenizer_dir)
        self.generator = torch.Generator().manual_seed(derive(cfg.train.seed, "task", dist_info.rank))
        self.epoch, self.batch_in_epoch = 0, 0  # data position, saved in checkpoints
        device = dist_info.device.type
        spec = ImageSpec.from_config(d, cfg.model.stride)
        self.train_images = ImageFileDecoder(spec, micro_batch * 2, train=True, num_threads=d.num_threads,
                                             seed=derive(cfg.train.seed, "augment", dist_info.rank), device=device)
        self.eval_images = ImageFileDecoder(spec, micro_batch * 2, train=False, num_threads=d.num_threads,
                                            device=device)
        self.train_examples: list = []
        self._portrait: dict[str, bool] = {}  # image orientations read from file headers, once

    def image_path(self, name: str) -> str:
        return str(Path(self.cfg.task.image_root) / name)

    def keep_present(self, items: list, names: Callable[[object], list[str]], source: str | None) -> list:
        """`items` whose image files all exist. A missing one is refused (task.missing_images: error,
        with the count and the first names) before any training, or left out and counted (skip)."""
        missing: dict[str, None] = {}
        kept = []
        for item in items:
            absent = [n for n in names(item) if not Path(self.image_path(n)).is_file()]
            for n in absent:
                missing[n] = None
            if not absent:
                kept.append(item)
        if missing:
            first = ", ".join(list(missing)[:5])
            if self.cfg.task.missing_images == "error":
                raise AnnotationError(f"{source}: {len(missing)} image files it names are missing under "
                                      f"{self.cfg.task.image_root} (first: {first}); fix task.image_root or "
                                      "task.image_pattern, or set task.missing_images: skip to leave those "
                                      "examples out")
            log.warning("%s: left out %d of %d examples whose images are missing (%d files, first: %s)", source,
                        len(items) - len(kept), len(items), len(missing), first)
        return kept

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.cfg.data.max_text_len)

    def images(self, names: list[str], train: bool) -> dict[str, torch.Tensor]:
        images, sizes = (self.train_images if train else self.eval_images)([self.image_path(n) for n in names])
        return {"images": images, "image_sizes": sizes}

    def _decoded(self, chunks: Iterator[tuple[object, list]], names: Callable[[list], list[str]], train: bool
                 ) -> Iterator[tuple[object, list, dict[str, torch.Tensor]]]:
        """(tag, items, their images) for each (tag, items) of `chunks`; DALI reads and decodes the
        next chunks' images while the caller works on this one."""
        pending: deque = deque()

        def requests():
            for tag, items in chunks:
                pending.append((tag, items))
                yield [self.image_path(n) for n in names(items)]

        for images, sizes in (self.train_images if train else self.eval_images).stream(requests()):
            tag, items = pending.popleft()
            yield tag, items, {"images": images, "image_sizes": sizes}

    def _orientation_chunks(self, items: list, first_image: Callable[[object], str]):
        """(None, micro-batch of items), landscape items (by their first image) first, then portrait ones:
        batches padded little."""
        order = orientation_order([self.image_path(first_image(it)) for it in items], self._portrait)
        ordered = [items[i] for i in order]
        return ((None, ordered[s:s + self.micro_batch]) for s in range(0, len(ordered), self.micro_batch))

    def image_batches(self, items: list, name: Callable[[object], str]) -> Iterator[tuple[list, dict]]:
        """Evaluation images, one per item: (items, their images) per micro-batch in orientation groups,
        decoded ahead."""
        chunks = self._orientation_chunks(items, name)
        for _, chunk, images in self._decoded(chunks, lambda c: [name(it) for it in c], train=False):
            yield chunk, images

    def eval_batches(self, examples: list) -> Iterator[tuple[list, dict[str, torch.Tensor]]]:
        """(examples, collated batch) in orientation groups (by each example's first image), decoded ahead."""
        chunks = self._orientation_chunks(examples, lambda e: self.image_names([e])[0])
        for _, chunk, images in self._decoded(chunks, self.image_names, train=False):
            yield chunk, self.collate(chunk, False, images)

    @abstractmethod
    def image_names(self, examples: list) -> list[str]:
        """The image files of `examples`, in the order `collate` expects them."""

    @abstractmethod
    def collate(self, examples: list, train: bool, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Examples and their decoded images (`image_names` order) -> a batch of tensors for the model."""

    @abstractmethod
    def eval_items(self) -> list:
        """The evaluation split as read (examples, questions or images), after any skipped."""

    def check_sizes(self, training: bool) -> None:
        """Refuses, before any model is built, splits too small to run: an evaluation split left empty
        (every example's images missing and skipped) and, to train, fewer examples than the ranks
        take in one step."""
        t = self.cfg.task
        if not self.eval_items():
            raise AnnotationError(f"{t.eval_file}: no evaluation example is left (those whose images are missing "
                                  f"under {t.image_root} were skipped): fix task.image_root or task.eval_file")
        if not training:
            return
        n, world, B = len(self.train_examples), self.dist.world_size, self.micro_batch
        if n // world < B:
            raise AnnotationError(f"{t.train_file}: {n} training examples are too few for {world} ranks x "
                                  f"micro-batch {B}: give more examples, fewer ranks or a smaller "
                                  "train_micro_batch_size_per_gpu")

    @classmethod
    def build_model(cls, cfg: RunConfig, vocab: list[str] | None = None) -> FinetuneModel:
        """The task's model (SOHO + head) for `cfg`; also how a saved model of this task is rebuilt."""
        return cls.model_class(cfg)

    def make_model(self) -> FinetuneModel:
        return self.build_model(self.cfg)

    @abstractmethod
    def chance(self) -> dict[str, float]:
        """What guessing scores on the evaluation split, for the metrics it applies to."""

    def blind_baselines(self) -> dict[str, float]:
        """What a model that ignores the image scores (the text's own prior), where the task states one."""
        return {}

    def checkpoint_files(self) -> dict[str, str]:
        """Files the task writes beside each checkpoint (name -> text)."""
        return {}

    @abstractmethod
    def evaluate(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        """The task's metric over the whole evaluation split."""

    def _train_chunks(self) -> Iterator[tuple[tuple[int, int], list]]:
        """((epoch, batch in epoch after this one), examples) for this rank, from the saved position on."""
        self.check_sizes(training=True)
        n, world, B = len(self.train_examples), self.dist.world_size, self.micro_batch
        per_rank = n // world
        epoch, done = self.epoch, self.batch_in_epoch
        while True:
            seed = derive(self.cfg.train.seed, "epoch_order", epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            mine = order[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank].tolist()
            for start in range(done * B, per_rank - B + 1, B):
                done += 1
                yield (epoch, done), [self.train_examples[i] for i in mine[start:start + B]]
            epoch, done = epoch + 1, 0

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        # the data position is that of the batch handed out, not of the ones DALI decodes ahead
        for (self.epoch, self.batch_in_epoch), examples, images in self._decoded(self._train_chunks(),
                                                                                 self.image_names, train=True):
            yield self.collate(examples, True, images)

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_data_state(self, state: dict | None, step: int, images_seen: dict[str, int] | None = None) -> None:
        """Continues at the saved (epoch, batch); with None (new world size) at the next epoch."""
        if state is None:
            self.epoch, self.batch_in_epoch = self.epoch + 1 + step, 0
        else:
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]

    def images_drawn(self) -> dict[str, int]:
        return {}  # one annotation file: its epochs are the figure that counts

    def rng_generators(self) -> dict[str, torch.Generator]:
        return {"task": self.generator}

    def eval_slice(self, n: int) -> range:
        """This rank's share of n evaluation items (contiguous, all items covered once)."""
        per = -(-n // self.dist.world_size)
        return range(self.dist.rank * per, min(n, (self.dist.rank + 1) * per))

    def accuracy(self, examples: list, module: nn.Module, device, dtype) -> dict[str, float]:
        """Accuracy of `module.logits` against batch["labels"] over all examples, each rank its slice."""
        was_training = module.training
        module.eval()
        counts = torch.zeros(2, device=device)  # correct, total
        mine = [examples[i] for i in self.eval_slice(len(examples))]
        with torch.no_grad():
            for _, batch in self.eval_batches(mine):
                batch = to_device(batch, device, dtype)
                pred = module.logits(batch).argmax(1)
                counts += torch.stack([(pred == batch["labels"]).sum().float(),
                                       torch.tensor(float(len(pred)), device=device)])
        module.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return {"accuracy": 100 * (counts[0] / counts[1]).item(), "num_examples": counts[1].item()}
