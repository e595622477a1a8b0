"""The pretraining module: SohoModel + MLM, MVM and ITM heads (+ optional ITC), returning a weighted loss.

`forward(batch)` is what the DeepSpeed engine calls; it returns the total loss under "loss"
and every term and accuracy under `group/name` keys for logging.
"""
from __future__ import annotations

import torch
from torch import nn

from soho_ds.models.heads import ContrastiveHead, ITMHead, MLMHead, MVMHead
from soho_ds.models.semantic import SemanticVisualHeads
from soho_ds.models.soho import SohoModel
from soho_ds.pretrain.objectives import (IGNORE, classification_loss, contrastive_loss, gather_masked,
                                         sample_mvm_mask)
from soho_ds.runtime.config import ModelConfig, PretrainConfig, SemanticConfig


class SohoPretrainer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: PretrainConfig, semantic: SemanticConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = SohoModel(model_cfg)
        config = self.model.fusion.config
        self.mlm_head = MLMHead(config, self.model.fusion.word_embeddings)
        self.itm_head = ITMHead(config.hidden_size)
        self.mvm_head = MVMHead(config, cfg.mvm_temperature) if model_cfg.use_vd and cfg.mvm_weight > 0 else None
        self.itc_head = ContrastiveHead(config.hidden_size, cfg.itc_dim) if cfg.itc_weight > 0 else None
        self.semantic_heads = (SemanticVisualHeads(self.model.backbone.out_channels, semantic)
                               if semantic is not None and semantic.enabled else None)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, input_ids, image_index = batch["images"], batch["input_ids"], batch["image_index"]
        grid_features = self.model.backbone(images)  # once per image
        tokens, vd_index, grid = self.model.visual.quantise(grid_features)
        matched = batch["itm_labels"] == 1
        mvm_mask = None
        if self.mvm_head is not None:
            mvm_mask = sample_mvm_mask(vd_index, cfg.mvm_prob) if self.training else torch.zeros_like(vd_index,
                                                                                                     dtype=torch.bool)
        sequence, pooled = self.model.fuse(input_ids, batch["attention_mask"], tokens, grid, image_index, mvm_mask)
        L = input_ids.shape[1]

        out: dict[str, torch.Tensor] = {}
        itm_logits = self.itm_head(pooled)
        out["loss/itm"], out["acc/itm"] = classification_loss(itm_logits, batch["itm_labels"])

        labels = batch["mlm_labels"]
        hidden, any_masked = gather_masked(sequence[:, :L], labels != IGNORE)
        mlm_logits = self.mlm_head(hidden)
        if any_masked:
            out["loss/mlm"], out["acc/mlm"] = classification_loss(mlm_logits, labels[labels != IGNORE])
        else:
            out["loss/mlm"], out["acc/mlm"] = mlm_logits.sum() * 0.0, mlm_logits.new_zeros(())

        total = cfg.itm_weight * out["loss/itm"] + cfg.mlm_weight * out["loss/mlm"]
        if self.mvm_head is not None:
            # MVM is scored on matched pairs only: the caption of another image cannot help.
            pair_mask = mvm_mask.index_select(0, image_index) & matched[:, None]  # (T, N)
            hidden, any_masked = gather_masked(sequence[:, L:], pair_mask)
            mvm_logits = self.mvm_head(hidden, self.model.visual_dictionary.embed)
            if any_masked:
                targets = vd_index.index_select(0, image_index)[pair_mask]
                out["loss/mvm"], out["acc/mvm"] = classification_loss(mvm_logits, targets)
            else:
                out["loss/mvm"], out["acc/mvm"] = mvm_logits.sum() * 0.0, mvm_logits.new_zeros(())
            total = total + cfg.mvm_weight * out["loss/mvm"]
            out["vd/usage"] = self.model.visual_dictionary.usage.clone()
            out["vd/masked_frac"] = mvm_mask.float().mean()
            out["vd/restarts"] = self.model.visual_dictionary.restarts.float()
        if self.itc_head is not None:
            # negatives: the other images of this rank's micro-batch (no cross-rank gather); the text is
            # the caption as the fused pass sees it, MLM masks included (no second tokenisation)
            text_index = first_matched_caption(image_index, matched, len(images))
            empty = len(text_index) == 0  # no matched caption at all: the head still runs, at weight 0
            text_index = text_index if not empty else text_index.new_zeros(1)
            text_cls = self.model.fusion.encode_text(input_ids[text_index], batch["attention_mask"][text_index])
            image_emb, text_emb = self.itc_head(tokens, text_cls)
            loss, acc = contrastive_loss(image_emb, text_emb, image_index[text_index], cfg.itc_temperature)
            out["loss/itc"], out["acc/itc"] = (loss * 0.0, acc * 0.0) if empty else (loss, acc)
            total = total + cfg.itc_weight * out["loss/itc"]
        if self.semantic_heads is not None and "region_boxes" in batch:
            semantic_total, semantic_out = self.semantic_heads(grid_features, batch, images.shape[-1])
            out.update(semantic_out)
            total = total + semantic_total
        out["loss"] = total
        return out


def first_matched_caption(image_index: torch.Tensor, matched: torch.Tensor, num_images: int) -> torch.Tensor:
    """Indices of one matched caption per image (the first), for images that have one: ITC needs
    exactly one positive text per image, and a caption of another image (an ITM negative) is none."""
    T = image_index.shape[0]
    order = torch.arange(T, device=image_index.device)
    # the smallest caption position per image among matched captions (T where there is none)
    first = torch.full((num_images,), T, dtype=torch.long, device=image_index.device)
    first = first.scatter_reduce(0, image_index, torch.where(matched, order, T), reduce="amin")
    return first[first < T]
