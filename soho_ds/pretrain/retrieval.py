"""Zero-shot image<->text retrieval on held-out shards while pretraining (open_clip measures the same).

Two stages, as large-scale retrieval runs: the ITC projections rank every caption for every image
(one matrix product), then ITM scores the best K of each image's captions and of each caption's
images, and those pairs rank above the rest in ITM's order. Each rank encodes its own slice of the
images once; the captions are encoded on every rank; the ITM scores each rank computes for its
images meet in one all-reduce. The cost is bounded by the image count and K, both in the config.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from soho_ds.data.pipeline import ImageTextBatch

NO_SCORE = float("-inf")
RERANKED = 1e4  # added to ITM scores so reranked pairs rank above every ITC similarity (in [-1, 1])


def _everyone(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


@torch.no_grad()
def retrieval_scores(pretrainer, batches: Iterable[ImageTextBatch], tokenize, rerank: int, max_images: int,
                     device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scores (I, T) over every rank's images and their captions, the image of each caption (T,)).
    This rank reads `batches` up to its share of `max_images` (all of them are drained)."""
    model, itc = pretrainer.model, pretrainer.itc_head
    share = -(-max_images // (dist.get_world_size() if dist.is_initialized() else 1))
    visuals, embeddings, captions = [], [], []
    for raw in batches:
        room = share - sum(len(c) for c in captions)
        if room <= 0:
            continue  # drained: the next evaluation starts from the same images
        images, sizes = raw.images[:room].to(device, dtype), raw.image_sizes[:room]
        visual = model.encode_image(images, sizes)
        visuals.append(visual)
        embeddings.append(itc.embed_image(visual.tokens, visual.valid).float().cpu())
        captions.append([m["captions"] for m in raw.metas[:room]])
    mine = [c for batch in captions for c in batch]
    everyone = _everyone((torch.cat(embeddings) if embeddings else torch.zeros(0, itc.image.out_features),
                          mine))
    offset = sum(len(caps) for _, caps in everyone[:dist.get_rank() if dist.is_initialized() else 0])
    image_emb = torch.cat([e for e, _ in everyone])
    texts = [c for _, caps in everyone for per_image in caps for c in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(c for _, caps in everyone for c in caps)
                               for _ in per_image])
    enc = tokenize(texts)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    text_emb = torch.cat([itc.embed_text(model.encode_text(ids[s:s + 256], mask[s:s + 256])).float().cpu()
                          for s in range(0, len(texts), 256)])
    # (I, T) cosines, the first stage; float64 so ITM scores lifted by RERANKED keep their precision
    similarity = (image_emb @ text_emb.t()).double()
    k_text, k_image = min(rerank, len(texts)), min(rerank, len(image_emb))
    wanted = torch.zeros_like(similarity, dtype=torch.bool)
    wanted.scatter_(1, similarity.topk(k_text, dim=1).indices, True)  # each image's best captions
    wanted.scatter_(0, similarity.topk(k_image, dim=0).indices, True)  # each caption's best images
    itm = torch.full_like(similarity, NO_SCORE)
    start = 0
    for visual in visuals:  # this rank's images, batch by batch
        n = len(visual.tokens)
        for r in range(n):
            cols = wanted[offset + start + r].nonzero().flatten()
            rows = torch.full((len(cols),), r, dtype=torch.long, device=device)
            itm[offset + start + r, cols] = pretrainer.itm_head.score(
                model, visual, ids[cols.to(device)], mask[cols.to(device)], rows, chunk=64).cpu().double()
        start += n
    if dist.is_initialized() and dist.get_world_size() > 1:
        itm = itm.to(device)  # NCCL reduces device tensors
        dist.all_reduce(itm, op=dist.ReduceOp.MAX)  # each rank filled its own rows
        itm = itm.cpu()
    return torch.where(itm > NO_SCORE, itm + RERANKED, similarity), text_image
