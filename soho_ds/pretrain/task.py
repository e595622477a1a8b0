"""Pretraining as a trainer task: DALI image batches + captions -> model inputs; held-out evaluation."""
from __future__ import annotations

from typing import Iterator

import torch

from soho_ds.data.pipeline import ImageTextBatch, ShardLoader
from soho_ds.data.regions import RegionSpec
from soho_ds.data.text import PretrainTextBuilder, load_tokenizer
from soho_ds.runtime.config import RunConfig
from soho_ds.runtime.dist import DistInfo
from soho_ds.runtime.trainer import mean_over_ranks, to_device


class PretrainTask:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, micro_batch: int):
        d, p = cfg.data, cfg.pretrain
        self.cfg, self.dist, self.micro_batch = cfg, dist_info, micro_batch
        self.images_per_batch = micro_batch
        tokenizer = load_tokenizer(d.tokenizer_dir)

        def text_builder(seed: int) -> PretrainTextBuilder:
            return PretrainTextBuilder(tokenizer, d.max_text_len, d.captions_per_image, p.mlm_prob,
                                       p.itm_neg_prob, seed)

        self.text = text_builder(cfg.train.seed * 1000 + dist_info.rank)
        self.val_seed = cfg.train.seed * 1000 + 500 + dist_info.rank
        self.val_text = text_builder(self.val_seed)
        s = cfg.semantic
        # Detector boxes are read only when a semantic visual loss is on.
        self.regions = RegionSpec(s.num_attributes, s.feature_weight > 0, s.max_boxes) if s.enabled else None
        self.loader = self._train_loader(cfg.train.seed)
        self._val_loader = None

    def _train_loader(self, seed: int, checkpoint: str | None = None) -> ShardLoader:
        d = self.cfg.data
        return ShardLoader(d.train_shards, self.micro_batch, d.image_size, self.dist.rank, self.dist.world_size,
                           train=True, crop_scale=d.crop_scale, hflip_prob=d.hflip_prob, num_threads=d.num_threads,
                           seed=seed, shuffle_buffer=d.shuffle_buffer, device=self.dist.device.type,
                           regions=self.regions, checkpoint=checkpoint)

    def data_state(self) -> dict:
        return {"dali": self.loader.checkpoint()}

    def load_data_state(self, state: dict | None, step: int) -> None:
        """Continues the data stream where `state` left it; with None (the world size changed, so
        the old per-rank positions mean nothing) a fresh order seeded by the step."""
        self.loader = (self._train_loader(self.cfg.train.seed, state["dali"]) if state is not None
                       else self._train_loader(self.cfg.train.seed + step))

    def make_batch(self, raw: ImageTextBatch, builder: PretrainTextBuilder) -> dict[str, torch.Tensor]:
        batch = builder([m["captions"] for m in raw.metas])
        batch["images"] = raw.images
        if raw.regions is not None:
            batch.update(raw.regions.as_batch())
        return batch

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for raw in self.loader.forever():
            yield self.make_batch(raw, self.text)

    def rng_generators(self) -> dict[str, torch.Generator]:
        return {"text": self.text.generator}

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        """ITM accuracy (half matched, half another image's caption) and MLM accuracy on held-out shards.

        The negatives and masks are drawn from a fixed seed each time, so evaluations compare.
        Each rank scores its own slice; the means are combined once at the end.
        """
        d = self.cfg.data
        if d.val_shards is None:
            return {}
        if self._val_loader is None:
            self._val_loader = ShardLoader(d.val_shards, self.micro_batch, d.image_size, self.dist.rank,
                                           self.dist.world_size, train=False, num_threads=d.num_threads,
                                           device=self.dist.device.type, regions=self.regions)
        self.val_text.generator.manual_seed(self.val_seed)
        was_training = module.training
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        for i, raw in enumerate(self._val_loader.epochs()):
            if i == self.cfg.train.eval_batches:
                # Drain the rest of the pass so the next evaluation starts from the beginning.
                continue
            out = module(to_device(self.make_batch(raw, self.val_text), device, dtype))
            for k in ("acc/itm", "acc/mlm", "loss/itm", "loss/mlm", "acc/itc", "loss/itc", "acc/object",
                      "acc/attribute", "loss/region_feature"):
                if k in out:
                    sums[k] = sums.get(k, 0) + out[k].float()
            sums["batches"] = sums.get("batches", 0) + torch.ones((), device=device)
        module.train(was_training)
        n = sums.pop("batches")
        return mean_over_ranks({k: v / n for k, v in sums.items()})
