"""A trained model from Python, without DeepSpeed or a launcher: `soho_ds.load_model(path)`.

    import soho_ds
    model = soho_ds.load_model("runs/demo_retrieval/checkpoints")       # or a .pt, or soho-export's folder
    model.itm(["photo.jpg"], ["a dog on a beach"])                        # tensor([0.93]): P(matched)
    soho_ds.load_model("runs/vqa/checkpoints").answer(["photo.jpg"], ["what colour is the dog?"], top_k=3)

Images may be paths, PIL images or HxWx3 uint8 arrays; they go through the evaluation pipeline
of the model's own config (DALI decode, the same resize and padding). What a model can do depends
on what it was trained for: pretraining and retrieval checkpoints score image-text pairs, VQA
checkpoints answer questions, NLVR2 and SNLI-VE checkpoints classify.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from soho_ds import saved
from soho_ds.config import ConfigError, RunConfig
from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec
from soho_ds.data.text import load_tokenizer, tokenize
from soho_ds.models.soho import VisualTokens
from soho_ds.models.weights import load_checked


def _encoded(image) -> np.ndarray:
    """The bytes DALI decodes: a file's own, or a lossless PNG of an in-memory image."""
    if isinstance(image, (str, Path)):
        try:
            return np.fromfile(str(image), dtype=np.uint8)
        except OSError as e:
            raise FileNotFoundError(f"{image}: cannot read image ({e.strerror})") from None
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image is a path, a PIL image or an HxWx3 uint8 array, not {type(image).__name__}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def build_module(cfg: RunConfig, task: str, vocab: list[str] | None) -> torch.nn.Module:
    """The module a saved model of `task` ("pretrain" or a key of TASKS) is rebuilt into."""
    if task == "pretrain":
        from soho_ds.pretrain.model import SohoPretrainer

        return SohoPretrainer(cfg.model, cfg.pretrain, cfg.semantic)
    from soho_ds.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"{cfg.source}: task.name {task!r} is not one of {sorted(TASKS)}")
    return TASKS[task].build_model(cfg, vocab)


class SohoPredictor:
    """One trained model in evaluation mode (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, cfg: RunConfig, task: str, vocab: list[str] | None = None,
                 device: str | torch.device = "cpu", tokenizer_dir: str | None = None, batch_size: int = 16):
        self.module, self.cfg, self.task, self.vocab = module.to(device).eval(), cfg, task, vocab
        self.device, self.batch_size = torch.device(device), batch_size
        self.tokenizer = load_tokenizer(tokenizer_dir or cfg.data.tokenizer_dir)
        spec = ImageSpec.from_config(cfg.data, cfg.model.stride)
        self._decoder = ImageFileDecoder(spec, batch_size, train=False, num_threads=cfg.data.num_threads,
                                         device=self.device.type)

    @property
    def soho(self):
        return self.module.model

    @staticmethod
    def _items(images: list) -> list:
        """Paths as they are (the decoder reads them), in-memory images as (name, encoded bytes)."""
        return [str(i) if isinstance(i, (str, Path)) else (f"image {n}", _encoded(i)) for n, i in enumerate(images)]

    def preprocess(self, images: list) -> dict[str, torch.Tensor]:
        """Images -> {"images": (B, 3, H, W) padded, "image_sizes": (B, 2)}, as evaluation prepares them."""
        pixels, sizes = self._decoder(self._items(images))
        return {"images": pixels.to(self.device), "image_sizes": sizes}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tokenize(self.tokenizer, texts, self.cfg.data.max_text_len).items()}

    @torch.no_grad()
    def encode_images(self, images: list) -> VisualTokens:
        batch = self.preprocess(images)
        return self.soho.encode_image(batch["images"], batch["image_sizes"])

    @torch.no_grad()
    def encode_image_batches(self, chunks: list[list]):
        """Visual tokens of each chunk of images (at most batch_size each), in order; the next chunks are
        read and decoded while this one is encoded."""
        for pixels, sizes in self._decoder.stream(self._items(c) for c in chunks):
            yield self.soho.encode_image(pixels.to(self.device), sizes)

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def _itm_head(self):
        if self.task not in ("pretrain", "retrieval"):
            raise ValueError(f"a {self.task} model does not score image-text pairs; load a pretraining or "
                             "retrieval checkpoint")
        return self.module.itm_head

    @torch.no_grad()
    def itm(self, images: list, texts: list[str]) -> torch.Tensor:
        """P(matched) of each (image, text) pair, the i-th image with the i-th text -> (N,)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: itm scores pairs")
        head, out = self._itm_head(), []
        for part in self._chunks(len(images)):
            text = self.tokenize(texts[part])
            out.append(head.score(self.soho, self.encode_images(images[part]), **text).sigmoid().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def itm_matrix(self, images: list, texts: list[str]) -> torch.Tensor:
        """P(matched) of every image with every text -> (images, texts); each image is encoded once."""
        head, text = self._itm_head(), self.tokenize(texts)
        return torch.cat([head.score_all(self.soho, self.encode_images(images[part]), **text,
                                         chunk=self.batch_size).sigmoid().cpu()
                          for part in self._chunks(len(images))])

    def _labels(self) -> tuple[str, ...]:
        from soho_ds.tasks import TASKS

        return TASKS[self.task].labels

    def _logits(self, images: list, texts: list[str], task: str) -> torch.Tensor:
        if self.task != task:
            raise ValueError(f"this is a {self.task} model, not a {task} one")
        out = []
        for part in self._chunks(len(texts)):
            batch = {**self.tokenize(texts[part]), **self.preprocess(images[part])}
            out.append(self.module.logits(batch).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def answer(self, images: list, questions: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """VQA: the top_k answers of each (image, question) with their scores (sigmoid: the BCE targets'
        scale, min(1, annotators / 3))."""
        scores = self._logits(images, questions, "vqa").sigmoid()
        values, index = scores.topk(min(top_k, scores.shape[1]), dim=1)
        return [[(self.vocab[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), index.tolist())]

    @torch.no_grad()
    def nlvr2(self, left: list, right: list, sentences: list[str]) -> list[dict[str, float]]:
        """NLVR2: P("True") and P("False") of each statement about its (left, right) image pair."""
        if not len(left) == len(right) == len(sentences):
            raise ValueError("nlvr2 needs one left image, one right image and one sentence per example")
        out = []
        for part in self._chunks(len(sentences)):
            batch = {**self.tokenize(sentences[part]), **self.preprocess(list(left[part]) + list(right[part]))}
            out.append(self.module.logits(batch).float().softmax(-1).cpu())
        return [dict(zip(self._labels(), p)) for p in torch.cat(out).tolist()]

    @torch.no_grad()
    def entailment(self, images: list, hypotheses: list[str]) -> list[dict[str, float]]:
        """SNLI-VE: P(entailment / neutral / contradiction) of each hypothesis about its image."""
        probs = self._logits(images, hypotheses, "snli_ve").softmax(-1)
        return [dict(zip(self._labels(), p)) for p in probs.tolist()]


def load_model(path: str | Path, device: str | torch.device | None = None, batch_size: int = 16) -> SohoPredictor:
    """A trained model from a checkpoint folder (or one of its tags), a consolidated .pt (with its .yaml),
    or an export folder (soho-export); on `device` (default: CUDA if present), in eval mode."""
    model = saved.read(path)
    cfg = model.config
    module = build_module(cfg, model.task, model.vocab)
    state, own = model.weights(), module.state_dict()
    load_checked(module, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, str(path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SohoPredictor(module, cfg, model.task, model.vocab, device, model.tokenizer_dir, batch_size)
