"""The pretraining module: SohoModel + MLM, MVM and ITM heads (+ optional ITC), returning a weighted loss.

`forward(batch)` is what the DeepSpeed engine calls; it returns the total loss under "loss"
and every term and accuracy under `group/name` keys for logging.
"""
from __future__ import annotations

import torch
from torch import nn

from soho_ds.config import ModelConfig, PretrainConfig, SemanticConfig
from soho_ds.data.text import IGNORE
from soho_ds.models.heads import ContrastiveHead, ITMHead, MLMHead, MVMHead
from soho_ds.models.losses import classification_loss, contrastive_loss
from soho_ds.models.semantic import SemanticVisualHeads
from soho_ds.models.soho import SohoModel
from soho_ds.pretrain.objectives import sample_mvm_mask


class SohoPretrainer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: PretrainConfig, semantic: SemanticConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = SohoModel(model_cfg)
        config = self.model.bert_config
        self.mlm_head = MLMHead(config, self.model.word_embeddings)
        self.itm_head = ITMHead(config.hidden_size, model_cfg.itm_bias)
        self.mvm_head = (MVMHead(config, cfg.mvm_temperature, projected=cfg.mvm_head == "projected")
                         if model_cfg.use_vd and cfg.mvm_weight > 0 else None)
        self.itc_head = ContrastiveHead(config.hidden_size, cfg.itc_dim) if cfg.itc_weight > 0 else None
        self.semantic_heads = (SemanticVisualHeads(self.model.grid_channels, semantic)
                               if semantic is not None and semantic.enabled else None)

    def mvm_mask(self, visual, image_index: torch.Tensor) -> torch.Tensor:
        """(T, N) visual tokens hidden from each caption's pass: drawn per (image, caption) pair or per
        image (pretrain.mvm_unit); none in evaluation."""
        if not self.training:
            return torch.zeros(len(image_index), visual.valid.shape[1], dtype=torch.bool,
                               device=visual.valid.device)
        if self.cfg.mvm_unit == "pair":
            return sample_mvm_mask(visual.vd_index.index_select(0, image_index),
                                   visual.valid.index_select(0, image_index), self.cfg.mvm_prob)
        return sample_mvm_mask(visual.vd_index, visual.valid, self.cfg.mvm_prob).index_select(0, image_index)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        input_ids, image_index = batch["input_ids"], batch["image_index"]
        visual = self.model.encode_image(batch["images"], batch.get("image_sizes"))  # once per image
        matched = batch["itm_labels"] == 1
        mvm_mask = self.mvm_mask(visual, image_index) if self.mvm_head is not None else None
        sequence, pooled = self.model.fuse(input_ids, batch["attention_mask"], visual, image_index, mvm_mask)
        L = input_ids.shape[1]

        out: dict[str, torch.Tensor] = {}
        out["loss/itm"], out["acc/itm"] = classification_loss(self.itm_head(pooled), batch["itm_labels"])

        # MLM on the masked positions, which the text builder lists on the host (no device-side
        # boolean indexing); without the list every position is scored, padding as IGNORE.
        labels = batch["mlm_labels"].reshape(-1)
        positions = batch.get("mlm_positions")
        if positions is None:
            positions = torch.arange(labels.numel(), device=labels.device)
        hidden = sequence[:, :L].reshape(-1, sequence.shape[-1]).index_select(0, positions)
        out["loss/mlm"], out["acc/mlm"] = classification_loss(self.mlm_head(hidden), labels.index_select(0, positions))

        total = cfg.itm_weight * out["loss/itm"] + cfg.mlm_weight * out["loss/mlm"]
        if self.mvm_head is not None:
            # Every visual token is scored (a fixed shape: which ones are masked is known only on the
            # device); masked tokens count, of every pass or of matched pairs only (pretrain.mvm_pairs)
            scored = mvm_mask & matched[:, None] if cfg.mvm_pairs == "matched" else mvm_mask  # (T, N)
            targets = torch.where(scored, visual.vd_index.index_select(0, image_index), IGNORE)
            visual_hidden = sequence[:, L:].reshape(-1, sequence.shape[-1])
            mvm_logits = self.mvm_head(visual_hidden, self.model.visual_dictionary.embed)
            out["loss/mvm"], out["acc/mvm"] = classification_loss(mvm_logits, targets.reshape(-1))
            total = total + cfg.mvm_weight * out["loss/mvm"]
            out["vd/masked_frac"] = mvm_mask.sum() / visual.valid.index_select(0, image_index).sum()
        if self.itc_head is not None:
            # negatives: the other images of this rank's micro-batch (no cross-rank gather); the text is
            # the caption as the fused pass sees it, MLM masks included (no second tokenisation)
            text_index, has_text = first_matched_caption(image_index, matched, len(visual.tokens))
            text_cls = self.model.encode_text(input_ids[text_index], batch["attention_mask"][text_index])
            image_emb, text_emb = self.itc_head(visual.tokens, visual.valid, text_cls)
            out["loss/itc"], out["acc/itc"] = contrastive_loss(image_emb, text_emb, has_text, cfg.itc_temperature)
            total = total + cfg.itc_weight * out["loss/itc"]
        if self.semantic_heads is not None and "region_boxes" in batch:
            semantic_total, semantic_out = self.semantic_heads(visual.features, batch, self.model.stride)
            out.update(semantic_out)
            total = total + semantic_total
        out["loss"] = total
        return out

    def commit(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ends a training forward (see SohoModel.commit): its outputs with the loss to back-propagate and
        the dictionary's figures after this step's update."""
        out = {**out, "loss": self.model.commit(out["loss"])}
        if self.mvm_head is not None:
            out["vd/usage"] = self.model.visual_dictionary.usage.clone()
            out["vd/restarts"] = self.model.visual_dictionary.restarts.float()
        return out


def first_matched_caption(image_index: torch.Tensor, matched: torch.Tensor, num_images: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_images,) the position of each image's first matched caption, and whether it has one (where
    not, position 0 stands in). ITC needs exactly one positive text per image, and a caption of
    another image (an ITM negative) is none. Fixed shapes: no host sync."""
    T = image_index.shape[0]
    order = torch.arange(T, device=image_index.device)
    # the smallest caption position per image among matched captions (T where there is none)
    first = torch.full((num_images,), T, dtype=torch.long, device=image_index.device)
    first = first.scatter_reduce(0, image_index, torch.where(matched, order, T), reduce="amin")
    has_text = first < T
    return torch.where(has_text, first, 0), has_text
