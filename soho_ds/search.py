"""Text-to-image search over a folder of one's own images with a trained model (soho-retrieve).

Each image's visual tokens are computed once and cached on disk, keyed by the file's size and
mtime and by the model; a query is then scored against the cached tokens by the ITM head. For
large folders an optional first stage ranks every image by the ITC vectors (one dot product
each) and the ITM head reranks only the best candidates (ALBEF's scheme).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from soho_ds.config import ReportedError
from soho_ds.data.pipeline import SampleDecodeError, orientation_order
from soho_ds.inference import SohoPredictor
from soho_ds.models.soho import VisualTokens

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SearchError(ReportedError, ValueError):
    """A search that cannot run as asked, naming the option."""


@dataclass
class Hit:
    path: str
    score: float  # P(matched) from the ITM head


class ImageIndex:
    def __init__(self, model: SohoPredictor, folder: str | Path, cache: str | Path | None = None,
                 model_id: str = ""):
        self.model, self.folder = model, Path(folder)
        self.paths = sorted(str(p) for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SearchError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or below")
        self.cache = Path(cache) if cache else self.folder / ".soho_ds_cache" / "visual_tokens.pt"
        self.model_id = model_id
        self.entries: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}  # image -> why it cannot be searched (unreadable, does not decode)
        self.itc = getattr(model.module, "itc_head", None)

    def _stamp(self, path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def _unreadable(self, path: str) -> str | None:
        """Why `path` cannot be an image to search (read from its header only), or None."""
        from PIL import Image

        try:
            if os.path.getsize(path) == 0:
                return "empty file"
            with Image.open(path) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return f"{type(e).__name__}: {str(e)[:120]}"
        return None

    def build(self, progress: bool = True) -> int:
        """Encodes the images that the cache lacks (or that changed); returns how many were encoded.
        Images that cannot be read or decoded are left out and listed in `skipped`."""
        from tqdm import tqdm

        if self.cache.is_file():
            saved = torch.load(self.cache, weights_only=True)  # a file in the user's folder: no pickled code
            if saved.get("model") == self.model_id:
                self.entries = saved["entries"]
        todo = [p for p in self.paths if p not in self.entries or tuple(self.entries[p]["stamp"]) != self._stamp(p)]
        present = set(self.paths)
        self.entries = {p: e for p, e in self.entries.items() if p in present}
        for p in todo:
            if (why := self._unreadable(p)) is not None:
                self.skipped[p] = why
        todo = [p for p in todo if p not in self.skipped]
        todo = [todo[i] for i in orientation_order(todo)]  # landscape and portrait batches: little padding
        encoded: set[str] = set()
        with tqdm(total=len(todo), unit="image", desc="encoding images", disable=not progress or not todo) as bar:
            rest = todo
            while rest:
                try:
                    self._encode(rest, encoded, bar)
                except SampleDecodeError as e:  # a file whose header reads but whose data does not decode
                    if not e.images:
                        raise
                    self.skipped.update(e.images)
                    bar.update(len(e.images))
                rest = [p for p in todo if p not in encoded and p not in self.skipped]
        if self.skipped:
            log.warning("%d images left out of the search (cannot be read or decoded); first: %s", len(self.skipped),
                        "; ".join(f"{p} ({why})" for p, why in list(self.skipped.items())[:3]))
        self.paths = [p for p in self.paths if p not in self.skipped]
        if not self.paths:
            raise SearchError(f"--images {self.folder}: none of its images can be read or decoded")
        if encoded:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache.with_suffix(".tmp")
            torch.save({"model": self.model_id, "entries": self.entries}, tmp)
            os.replace(tmp, self.cache)
        return len(encoded)

    def _encode(self, todo: list[str], encoded: set[str], bar) -> None:
        chunks = [todo[s:s + self.model.batch_size] for s in range(0, len(todo), self.model.batch_size)]
        for chunk, visual in zip(chunks, self.model.encode_image_batches(chunks)):
            itc = self.itc.embed_image(visual.tokens, visual.valid) if self.itc is not None else None
            for i, p in enumerate(chunk):
                keep = visual.valid[i]
                self.entries[p] = {"stamp": self._stamp(p), "tokens": visual.tokens[i][keep].cpu(),
                                   "position": visual.position[i][keep].cpu(),
                                   "itc": None if itc is None else itc[i].cpu()}
                encoded.add(p)
            bar.update(len(chunk))

    def _visual(self, paths: list[str]) -> VisualTokens:
        """Cached tokens of `paths`, padded to one length; padding is invalid, as in a batch of images."""
        entries = [self.entries[p] for p in paths]
        n = max(e["tokens"].shape[0] for e in entries)
        H = entries[0]["tokens"].shape[1]
        tokens = torch.zeros(len(entries), n, H)
        position = torch.zeros(len(entries), n, H)
        valid = torch.zeros(len(entries), n, dtype=torch.bool)
        for i, e in enumerate(entries):
            k = e["tokens"].shape[0]
            tokens[i, :k], position[i, :k], valid[i, :k] = e["tokens"], e["position"], True
        device = self.model.device
        return VisualTokens(None, tokens.to(device), None, valid.to(device), position.to(device), (1, n))

    @torch.no_grad()
    def itm_scores(self, query: str, paths: list[str]) -> torch.Tensor:
        text = self.model.tokenize([query])
        head, out = self.model.module.itm_head, []
        for start in range(0, len(paths), self.model.batch_size * 4):
            chunk = paths[start:start + self.model.batch_size * 4]
            ids, mask = (text[k].expand(len(chunk), -1) for k in ("input_ids", "attention_mask"))
            out.append(head.score(self.model.soho, self._visual(chunk), ids, mask).sigmoid().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def itc_scores(self, query: str) -> torch.Tensor:
        if self.itc is None:
            raise SearchError("--first-stage: this model has no ITC projections (it was pretrained with "
                              "pretrain.itc_weight 0): leave --first-stage out to rank with the ITM head alone")
        text = self.model.tokenize([query])
        vector = self.itc.embed_text(self.model.soho.encode_text(text["input_ids"], text["attention_mask"]))[0]
        return torch.stack([self.entries[p]["itc"] for p in self.paths]) @ vector.cpu()

    def search(self, query: str, top: int = 10, first_stage: int | None = None) -> list[Hit]:
        """The `top` images for `query`, by P(matched); with `first_stage` K, only the K best by ITC are scored."""
        candidates = self.paths
        if first_stage:
            order = self.itc_scores(query).argsort(descending=True, stable=True)[:first_stage]
            candidates = [self.paths[i] for i in order.tolist()]
        scores = self.itm_scores(query, candidates)
        order = scores.argsort(descending=True, stable=True)[:top].tolist()
        return [Hit(candidates[i], float(scores[i])) for i in order]
