"""A trained model from Python, without DeepSpeed or a launcher: `soho_ds.load_model(path)`.

    import soho_ds
    model = soho_ds.load_model("runs/demo_retrieval/checkpoints")       # or a .pt, or tools/export.py's folder
    model.itm(["photo.jpg"], ["a dog on a beach"])                        # tensor([0.93]): P(matched)
    soho_ds.load_model("runs/vqa/checkpoints").answer(["photo.jpg"], ["what colour is the dog?"], top_k=3)

Images may be paths, PIL images or HxWx3 uint8 arrays; they go through the evaluation pipeline
of the model's own config (DALI decode, the same resize and padding). What a model can do depends
on what it was trained for: pretraining and retrieval checkpoints score image-text pairs, VQA
checkpoints answer questions, NLVR2 and SNLI-VE checkpoints classify.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml

from soho_ds.config import ConfigError, RunConfig, TrainConfig, saved_run_config
from soho_ds.data.pipeline import ImageFileDecoder, ImageSpec
from soho_ds.data.text import load_tokenizer
from soho_ds.models.soho import VisualTokens
from soho_ds.models.weights import load_checked
from soho_ds.runtime.checkpoint import find_run_config, load_weights

NLVR2_LABELS = ("False", "True")
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")


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


def _build_module(cfg: RunConfig, vocab: list[str] | None) -> tuple[torch.nn.Module, str]:
    from soho_ds.tasks import TASKS

    name = cfg.task.name
    if not name:
        from soho_ds.pretrain.model import SohoPretrainer

        return SohoPretrainer(cfg.model, cfg.pretrain, cfg.semantic), "pretrain"
    if name not in TASKS:
        raise ConfigError(f"{cfg.source}: task.name {name!r} is not one of {sorted(TASKS)}")
    if name == "vqa":
        from soho_ds.tasks.vqa import VQAModel

        if vocab is None:
            raise ConfigError(f"{cfg.source}: a VQA model needs its answer_vocab.json beside it")
        return VQAModel(cfg, len(vocab)), name
    from soho_ds.tasks.nlvr2 import NLVR2Model
    from soho_ds.tasks.retrieval import RetrievalModel
    from soho_ds.tasks.snli_ve import SNLIVEModel

    return {"retrieval": RetrievalModel, "nlvr2": NLVR2Model, "snli_ve": SNLIVEModel}[name](cfg), name


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
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.cfg.data.max_text_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

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
            visual = self.encode_images(images[part])
            text = self.tokenize(texts[part])
            _, pooled = self.soho.fuse(text["input_ids"], text["attention_mask"], visual)
            out.append(head(pooled).float().softmax(-1)[:, 1].cpu())
        return torch.cat(out)

    @torch.no_grad()
    def itm_matrix(self, images: list, texts: list[str]) -> torch.Tensor:
        """P(matched) of every image with every text -> (images, texts); each image is encoded once."""
        head = self._itm_head()
        text = self.tokenize(texts)
        scores = torch.zeros(len(images), len(texts))
        for part in self._chunks(len(images)):
            visual = self.encode_images(images[part])
            for r in range(part.stop - part.start):
                for t in self._chunks(len(texts)):
                    index = torch.full((t.stop - t.start,), r, dtype=torch.long, device=self.device)
                    _, pooled = self.soho.fuse(text["input_ids"][t], text["attention_mask"][t], visual, index)
                    scores[part.start + r, t] = head(pooled).float().softmax(-1)[:, 1].cpu()
        return scores

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
        return [dict(zip(NLVR2_LABELS, p)) for p in torch.cat(out).tolist()]

    @torch.no_grad()
    def entailment(self, images: list, hypotheses: list[str]) -> list[dict[str, float]]:
        """SNLI-VE: P(entailment / neutral / contradiction) of each hypothesis about its image."""
        probs = self._logits(images, hypotheses, "snli_ve").softmax(-1)
        return [dict(zip(SNLI_VE_LABELS, p)) for p in probs.tolist()]


def read_saved(path: str | Path) -> tuple[RunConfig, list[str] | None]:
    """The run config and (VQA) answer vocabulary saved with a checkpoint, consolidated file or export."""
    saved = find_run_config(path)
    if saved is None:
        raise FileNotFoundError(f"{path}: no run_config.yaml beside it (a consolidated X.pt needs X.yaml; "
                                "tools/export.py writes a folder that has everything)")
    from soho_ds.tasks.vqa import read_answer_vocab

    return saved_run_config(*saved), read_answer_vocab(path)


def load_model(path: str | Path, device: str | torch.device | None = None, batch_size: int = 16) -> SohoPredictor:
    """A trained model from a checkpoint folder (or one of its tags), a consolidated .pt (with its .yaml),
    or an export folder (tools/export.py); on `device` (default: CUDA if present), in eval mode."""
    path = Path(path)
    cfg, vocab = read_saved(path)
    module, task = _build_module(cfg, vocab)
    state = load_weights(path)
    own = module.state_dict()
    load_checked(module, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, str(path))
    tokenizer_dir = str(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SohoPredictor(module, cfg, task, vocab, device, tokenizer_dir, batch_size)


def export(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A self-contained, shareable folder: run_config.yaml (the model), model.safetensors (every weight,
    task head included; ZeRO shards consolidated by DeepSpeed's own zero_to_fp32), the tokenizer files
    and, for VQA, answer_vocab.json. `load_model(out)` reads it."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    cfg, vocab = read_saved(checkpoint)
    state = load_weights(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors stores no shared tensors: tied weights (the MLM decoder) are written as copies
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "producer": "soho-ds"})
    saved = cfg.to_dict()
    # the model and how images and texts are prepared travel; the training machine's paths do not
    # the tokenizer: copied below
    saved["data"].update(tokenizer_dir=None, train_shards=[], val_shards=[], retrieval_shards=[])
    saved["task"].update(train_file=None, eval_file=None, train_answers=None, eval_answers=None, image_root="")
    saved["train"]["output_dir"] = TrainConfig.output_dir
    (out / "run_config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    load_tokenizer(cfg.data.tokenizer_dir).save_pretrained(str(out / "tokenizer"))
    if vocab is not None:
        (out / "answer_vocab.json").write_text(json.dumps(vocab))
    (out / "README.md").write_text(f"A soho-ds {cfg.task.name or 'pretraining'} model exported from "
                                   f"{Path(checkpoint).name}.\n\n    import soho_ds\n    model = "
                                   f"soho_ds.load_model(\"{out.name}\")\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):  # made to be shared: readable as any file this user writes
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return out
