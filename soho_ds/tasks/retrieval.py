"""Image-text retrieval (COCO 5k/1k, Flickr30k): ITM finetuning with in-batch hard negatives,
evaluated by R@1/5/10 in both directions over the full split.

Readers: the Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`, ...), COCO's
official captions JSON (`captions_val2014.json`) and Flickr30k-Entities `Sentences/<id>.txt`.

Evaluation scores every (image, caption) pair with the ITM head. Each image's visual tokens
are computed once and reused for all captions; captions are scored in chunks of
`task.eval_batch` per forward pass, and ranks split the images. Ties in the scores are ranked
by position (a lower index first), so the same scores always give the same recall. The cost
grows with images x captions (COCO 1k: 5M fused pairs; 5k: 25 times that), which is why large
sets rank by the ITC first stage and rerank only the best with ITM (pretraining's retrieval,
soho-retrieve); measured rates are in benchmarks/ and docs/performance.md.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from soho_ds.config import RunConfig
from soho_ds.models.heads import ContrastiveHead, ITMHead
from soho_ds.models.losses import classification_loss, contrastive_loss
from soho_ds.models.soho import VisualTokens
from soho_ds.tasks.base import AnnotationError, ExampleTask, FinetuneModel, read_json, require


@dataclass(frozen=True)
class RetrievalImage:
    image: str  # path relative to task.image_root
    captions: tuple[str, ...]
    image_id: str


def read_karpathy(path: str | Path, splits: tuple[str, ...]) -> list[RetrievalImage]:
    """Karpathy-split JSON: {"images": [{"filename", "split", "sentences": [{"raw"}], ...}], "dataset"}.
    COCO records also carry "filepath" (train2014/val2014), which prefixes the file name."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: expected a Karpathy-split object with an 'images' list")
    out = []
    for i, rec in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        require(rec, ("filename", "split", "sentences"), where)
        if rec["split"] not in splits:
            continue
        caps = tuple(s["raw"].strip() for s in rec["sentences"] if isinstance(s, dict) and s.get("raw"))
        if not caps:
            raise AnnotationError(f"{where} ({rec['filename']}): no sentences with a 'raw' caption")
        name = f"{rec['filepath']}/{rec['filename']}" if rec.get("filepath") else rec["filename"]
        out.append(RetrievalImage(name, caps, str(rec.get("cocoid", rec.get("imgid", rec["filename"])))))
    return out


def read_coco_captions(path: str | Path) -> list[RetrievalImage]:
    """COCO's official captions JSON: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}."""
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise AnnotationError(f"{path}: expected COCO captions JSON with 'images' and 'annotations'")
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("image_id", "caption"), f"{path}: annotations[{i}]")
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    out = []
    for i, img in enumerate(data["images"]):
        require(img, ("id", "file_name"), f"{path}: images[{i}]")
        if img["id"] in captions:
            out.append(RetrievalImage(img["file_name"], tuple(captions[img["id"]]), str(img["id"])))
    return out


ENTITY = re.compile(r"\[/EN#\d+/[\w/]+ ([^\]]*)\]")


def read_flickr30k_entities(sentences_dir: str | Path) -> list[RetrievalImage]:
    """Flickr30k-Entities `Sentences/<id>.txt`: five captions with phrase markup, stripped here."""
    out = []
    for path in sorted(Path(sentences_dir).glob("*.txt")):
        caps = tuple(re.sub(r"\s+", " ", ENTITY.sub(r"\1", line)).strip()
                     for line in path.read_text().splitlines() if line.strip())
        if not caps or any("[/EN#" in c for c in caps):
            raise AnnotationError(f"{path}: no captions or unbalanced entity markup")
        out.append(RetrievalImage(f"{path.stem}.jpg", caps, path.stem))
    return out


def read_retrieval(path: str | Path, splits: tuple[str, ...]) -> list[RetrievalImage]:
    """Any of the three layouts, chosen by what `path` is."""
    path = Path(path)
    if path.is_dir():
        return read_flickr30k_entities(path)
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return read_coco_captions(path)
    return read_karpathy(path, splits)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """(R, C) scores -> (R, C) order of candidates by decreasing score; ties keep the lower candidate
    index first (a stable sort), so recall does not depend on how a sort happens to order ties."""
    return scores.argsort(dim=1, descending=True, stable=True)


def recall_at_k(scores: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """scores (I, T): higher = better match; text_image (T,): the image of each caption.

    Image->text R@K: an image counts if any of its captions is among its top K captions.
    Text->image R@K: a caption counts if its image is among its top K images.
    Tied scores are ordered by index (see `_ranks`).
    """
    I, T = scores.shape
    gt = text_image[None, :] == torch.arange(I)[:, None]  # (I, T)
    out = {}
    order_t = _ranks(scores)  # captions ranked per image
    best_rank_i2t = torch.where(gt.gather(1, order_t), torch.arange(T).expand(I, T), T).min(1).values
    order_i = _ranks(scores.t())  # images ranked per caption
    rank_t2i = (order_i == text_image[:, None]).float().argmax(1)
    for k in ks:
        out[f"i2t_r{k}"] = (best_rank_i2t < k).float().mean().item() * 100
        out[f"t2i_r{k}"] = (rank_t2i < k).float().mean().item() * 100
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def fold_recall(scores: torch.Tensor, text_image: torch.Tensor, fold: int, folds: int) -> dict[str, float]:
    """R@K within fold `fold` of `folds` equal, contiguous image ranges (and those images' captions)."""
    n = scores.shape[0] // folds
    lo, hi = fold * n, (fold + 1) * n
    cols = ((text_image >= lo) & (text_image < hi)).nonzero().flatten()
    return recall_at_k(scores[lo:hi][:, cols], text_image[cols] - lo)


def chance_recall(num_images: int, num_texts: int, ks=(1, 5, 10)) -> dict[str, float]:
    """R@K (%) of a random ranking: text->image K/images; image->text 1 - C(T-c, K)/C(T, K) for c
    captions per image (the chance that one of them is drawn); 100 where K reaches the count."""
    per_image = round(num_texts / num_images)
    return {**{f"t2i_r{k}": 100 * min(1.0, k / num_images) for k in ks},
            **{f"i2t_r{k}": 100 * (1 - math.comb(num_texts - per_image, k) / math.comb(num_texts, k)
                                   if k < num_texts else 1.0)
               for k in ks}}


def sample_hard(scores: torch.Tensor) -> torch.Tensor:
    """One negative per row, drawn with probability softmax(score) (ALBEF) rather than the argmax:
    short captions are often true of other images too, and the single best-scoring one would
    then be a false negative at every step. Rows with no candidate (-inf only) draw uniformly."""
    scores = torch.where(torch.isinf(scores).all(1, keepdim=True), torch.zeros_like(scores), scores)
    return torch.multinomial(scores.float().softmax(1), 1).squeeze(1)


class RetrievalModel(FinetuneModel):
    """ITM scoring of (image, caption) pairs; with pretrain.itc_weight > 0 also the ITC projections,
    trained alongside, which give a cheap first stage for large image sets (soho-retrieve)."""
    reused_heads = ("itm_head",)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.itm_head = ITMHead(self.model.hidden_size, cfg.model.itm_bias)
        self.itc_weight, self.itc_temperature = cfg.pretrain.itc_weight, cfg.pretrain.itc_temperature
        self.itc_head = ContrastiveHead(self.model.hidden_size, cfg.pretrain.itc_dim) if self.itc_weight > 0 else None
        if self.itc_head is not None:
            self.reused_heads = ("itm_head", "itc_head")

    def embed_images(self, visual: VisualTokens) -> torch.Tensor:
        """ITC unit vectors (B, dim) of encoded images: the first stage of large-scale retrieval."""
        return self.itc_head.embed_image(visual.tokens, visual.valid)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC unit vectors (T, dim) of captions."""
        return self.itc_head.embed_text(self.model.encode_text(input_ids, attention_mask))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B images with one caption each. Negatives from the batch: for each caption another image,
        for each image another caption, each drawn by its score (`sample_hard`, without gradient)."""
        ids, mask, same = batch["input_ids"], batch["attention_mask"], batch["same_image"]
        B = ids.shape[0]
        visual = self.model.encode_image(batch["images"], batch.get("image_sizes"))
        with torch.no_grad():
            img = torch.arange(B, device=ids.device).repeat_interleave(B)  # pair (i, t): image i, caption t
            txt = torch.arange(B, device=ids.device).repeat(B)
            scores = self.itm_head.score(self.model, visual, ids[txt], mask[txt], img).view(B, B)
            scores = scores.masked_fill(same, float("-inf"))  # a caption of the same image is no negative
            hard_image = sample_hard(scores.t())  # for caption t
            hard_text = sample_hard(scores)  # for image i
        idx = torch.arange(B, device=ids.device)
        image_index = torch.cat([idx, hard_image, idx])
        text_index = torch.cat([idx, idx, hard_text])
        _, pooled = self.model.fuse(ids[text_index], mask[text_index], visual, image_index)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        loss, acc = classification_loss(self.itm_head(pooled), labels)
        out = {"loss/itm": loss, "acc/itm": acc}
        if self.itc_head is not None:
            image_emb, text_emb = self.itc_head(visual.tokens, visual.valid, self.model.encode_text(ids, mask))
            every_image = torch.ones_like(idx, dtype=torch.bool)  # each image has its caption here
            out["loss/itc"], out["acc/itc"] = contrastive_loss(image_emb, text_emb, every_image, self.itc_temperature)
            loss = loss + self.itc_weight * out["loss/itc"]
        out["loss"] = loss
        return out


class RetrievalTask(ExampleTask):
    name = "retrieval"
    model_class = RetrievalModel

    def __init__(self, cfg: RunConfig, dist_info, micro_batch: int, init: str | None = None):
        super().__init__(cfg, dist_info, micro_batch, init)
        t = cfg.task
        names = lambda im: [im.image]  # noqa: E731
        self.train_images_list = (self.keep_present(read_retrieval(t.train_file, t.train_splits), names, t.train_file)
                                  if t.train_file else [])
        self.eval_images_list = self.keep_present(read_retrieval(t.eval_file, (t.eval_split,)), names, t.eval_file)
        if not self.eval_images_list:
            raise AnnotationError(f"{t.eval_file}: no image of split {t.eval_split!r}")
        self.train_examples = [(i, c) for i, im in enumerate(self.train_images_list) for c in im.captions]

    def eval_items(self) -> list:
        return self.eval_images_list

    def chance(self) -> dict[str, float]:
        return chance_recall(len(self.eval_images_list), sum(len(im.captions) for im in self.eval_images_list))

    def image_names(self, examples) -> list[str]:
        return [self.train_images_list[i].image for i, _ in examples]

    def collate(self, examples, train: bool, images: dict):
        batch = self.tokenize([c for _, c in examples])
        batch.update(images)
        ids = [self.train_images_list[i].image_id for i, _ in examples]
        batch["same_image"] = torch.tensor([[a == b for b in ids] for a in ids])
        return batch

    @torch.no_grad()
    def evaluate(self, module: nn.Module, device, dtype) -> dict[str, float]:
        images = self.eval_images_list
        texts = [c for im in images for c in im.captions]
        text_image = torch.tensor([i for i, im in enumerate(images) for _ in im.captions])
        scores = score_all_pairs(module, self, [im.image for im in images], texts, device, dtype)
        metrics = recall_at_k(scores, text_image)
        metrics["num_images"], metrics["num_texts"] = float(len(images)), float(len(texts))
        folds = self.cfg.task.eval_folds
        if folds > 1:  # COCO 1k: the same scores, restricted to each fold of images and their captions
            per_fold = [fold_recall(scores, text_image, f, folds) for f in range(folds)]
            for k in per_fold[0]:
                metrics[f"{folds}fold/{k}"] = sum(m[k] for m in per_fold) / folds
        return metrics


def score_all_pairs(module: RetrievalModel, task: ExampleTask, image_names: list[str], texts: list[str], device,
                    dtype) -> torch.Tensor:
    """(images, texts) ITM scores of every pair; ranks split the images, each image is encoded once.
    Shows progress and an ETA on the main rank."""
    from tqdm import tqdm

    enc = task.tokenize(texts)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    scores = torch.zeros(len(image_names), len(texts), device=device)
    was_training = module.training
    module.eval()
    mine = list(task.eval_slice(len(image_names)))
    chunk = task.cfg.task.eval_batch
    bar = tqdm(total=len(mine) * len(texts), unit="pair", desc="retrieval: scoring all pairs", unit_scale=True,
               disable=not task.dist.is_main, mininterval=5)
    for rows, batch in task.image_batches(mine, lambda i: image_names[i]):
        visual = module.model.encode_image(batch["images"].to(device, dtype), batch["image_sizes"])  # once per image
        scores[rows] = module.itm_head.score_all(module.model, visual, ids, mask, chunk)
        bar.update(len(rows) * len(texts))
    bar.close()
    module.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(scores)  # each rank filled its own rows
    return scores.cpu()
