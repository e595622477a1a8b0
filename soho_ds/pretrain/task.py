"""Pretraining as a trainer task: DALI image batches + captions -> model inputs; held-out evaluation;
TensorBoard pictures of what the Visual Dictionary sees."""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from soho_ds.config import ConfigError, RunConfig, ShardSource
from soho_ds.data.detections import REPORT as DETECTIONS_REPORT
from soho_ds.data.pipeline import CheckedShards, ImageSpec, ImageTextBatch, ShardLoader, check_source
from soho_ds.data.regions import RegionSpec
from soho_ds.data.shards import ShardError
from soho_ds.data.text import PretrainTextBuilder, load_tokenizer, tokenize
from soho_ds.pretrain.pictures import draw_vd_picture
from soho_ds.runtime.dist import DistInfo
from soho_ds.runtime.trainer import sample_means_over_ranks, to_device
from soho_ds.seeds import derive

log = logging.getLogger(__name__)


def region_spec(cfg: RunConfig) -> RegionSpec | None:
    """What is read of the detector boxes: nothing unless a semantic visual loss is on."""
    s = cfg.semantic
    return RegionSpec(s.num_attributes, s.feature_weight > 0, s.max_boxes) if s.enabled else None


def refuse_detections_without_classes(shards: CheckedShards, cfg: RunConfig, key: str) -> None:
    """The object / attribute losses need the detector's class ids: refuses shards whose attached file
    had none (a six-column BUTD TSV), as their attach report (detections.json) records."""
    s = cfg.semantic
    for folder in sorted({str(Path(p).parent) for p in shards.paths}):
        report_path = Path(folder) / DETECTIONS_REPORT
        if not report_path.is_file():
            continue  # attached before the report existed, or in an object store: not known here
        report = json.loads(report_path.read_text())
        for weight, field, what in ((s.object_weight, "object_ids", "object"),
                                    (s.attribute_weight, "attribute_ids", "attribute")):
            if weight > 0 and not report.get(field, True):
                raise ConfigError(f"{cfg.source}: {key}: the detections attached to {folder} "
                                  f"({report.get('detections')}) carry no {what} class ids, which "
                                  f"semantic.{what}_weight {weight:g} needs: attach a file with them (LXMERT's "
                                  f"10-column TSV, VinVL) or set the weight to 0")


def check_shards(cfg: RunConfig) -> dict[str, list[CheckedShards]]:
    """Before any process group, once per start: the configured shards exist and can be trusted as they
    are. Returns them checked ("train": each source, "val", "retrieval": one or none), for every loader."""
    d = cfg.data
    if not d.train_shards:
        raise ConfigError(f"{cfg.source}: data.train_shards is required for pretraining")
    sets = {"train": [(f"data.train_shards ({s.name})" if len(d.train_sources) > 1 else "data.train_shards", s,
                       region_spec(cfg)) for s in d.train_sources],
            "val": [("data.val_shards", ShardSource("val", tuple(d.val_shards), 1.0), region_spec(cfg))]
            if d.val_shards else [],
            "retrieval": [("data.retrieval_shards", ShardSource("retrieval", tuple(d.retrieval_shards), 1.0), None)]
            if d.retrieval_shards else []}
    checked: dict[str, list[CheckedShards]] = {}
    for kind, entries in sets.items():
        checked[kind] = []
        for key, source, regions in entries:
            try:
                groups = d.captions_per_image if kind == "train" and cfg.train.epoch_unit == "caption_groups" else 0
                checked[kind].append(check_source(source, regions, report=kind == "train", captions_per_group=groups))
            except (FileNotFoundError, ShardError) as e:
                raise ConfigError(f"{cfg.source}: {key}: {e}") from None
            if regions is not None:
                refuse_detections_without_classes(checked[kind][-1], cfg, key)
            if groups and cfg.train.epochs > 0 and checked[kind][-1].caption_groups is None:
                raise ConfigError(f"{cfg.source}: {key}: train.epoch_unit caption_groups counts each sample's "
                                  f"captions from the shard indexes, and these have none (unindexed, or indexed "
                                  f"before the counts existed): index them again with soho-index-shards")
    return checked


def data_fingerprint(sources: list[CheckedShards]) -> list:
    """What the saved data positions refer to: the shards, and with several sources their names and weights."""
    if len(sources) == 1:
        return sources[0].fingerprint
    return [[s.name, s.weight, s.fingerprint] for s in sources]


class PretrainTask:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, micro_batch: int, stride: int,
                 shards: dict[str, list[CheckedShards]] | None = None):
        """`shards`: check_shards(cfg), when the driver has checked them already."""
        d, p = cfg.data, cfg.pretrain
        self.cfg, self.dist, self.micro_batch = cfg, dist_info, micro_batch
        self.images_per_batch = micro_batch
        self.spec = ImageSpec.from_config(d, stride)
        tokenizer = load_tokenizer(d.tokenizer_dir)

        def text_builder(seed: int) -> PretrainTextBuilder:
            return PretrainTextBuilder(tokenizer, d.max_text_len, d.captions_per_image, p.mlm_prob,
                                       p.itm_neg_prob, seed, mlm_on_negatives=p.mlm_pairs == "all")

        self.text = text_builder(derive(cfg.train.seed, "text", dist_info.rank))
        self.val_seed = derive(cfg.train.seed, "val_text", dist_info.rank)
        self.val_text = text_builder(self.val_seed)
        self.regions = region_spec(cfg)
        self.shards = shards if shards is not None else check_shards(cfg)
        self.fingerprint = data_fingerprint(self.shards["train"])
        self.images_seen = {s.name: 0 for s in d.train_sources}  # this rank's, plus the run's before a resume
        self.loader = self._train_loader(derive(cfg.train.seed, "shards"))
        self._val_loader = None
        self._retrieval_loader = None
        self.best_metric = "retrieval/rsum" if d.retrieval_shards else None
        self.tokenizer = tokenizer
        self._last_metas: list[dict] = []

    def _train_loader(self, seed: int, state: dict | None = None) -> ShardLoader:
        d = self.cfg.data
        return ShardLoader(self.shards["train"], self.micro_batch, self.spec, self.dist.rank, self.dist.world_size,
                           train=True, num_threads=d.num_threads, seed=seed, shuffle_buffer=d.shuffle_buffer,
                           device=self.dist.device.type, regions=self.regions, checkpoint=state,
                           group_by_orientation=d.group_by_orientation)

    def data_state(self) -> dict:
        return {"loader": self.loader.checkpoint(), "shards": self.fingerprint}

    def load_data_state(self, state: dict | None, step: int, images_seen: dict[str, int] | None = None) -> None:
        """Continues the data stream where `state` left it. A fresh order seeded by the step when there
        is none (the world size changed, so the old per-rank positions mean nothing) or when the shards
        changed since (re-indexed after a bad sample was found: the old positions no longer match).
        `images_seen`: the counts this rank carries on (the run's totals on one rank, nothing on the others)."""
        self.images_seen = {name: int((images_seen or {}).get(name, 0)) for name in self.images_seen}
        if state is not None and state.get("shards") != self.fingerprint:
            log.warning("the shards or their mixing weights changed since this checkpoint (re-indexed, replaced or "
                        "re-weighted): the data order restarts, seeded by the step")
            state = None
        seed = self.cfg.train.seed
        self.loader = (self._train_loader(derive(seed, "shards"), state["loader"]) if state is not None
                       else self._train_loader(derive(seed, "restart", step)))

    def make_batch(self, raw: ImageTextBatch, builder: PretrainTextBuilder) -> dict[str, torch.Tensor]:
        batch = builder([m["captions"] for m in raw.metas])
        batch["images"] = raw.images
        batch["image_sizes"] = raw.image_sizes
        if raw.regions is not None:
            batch.update(raw.regions.as_batch())
        return batch

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for raw in self.loader.forever():
            self._last_metas = raw.metas
            self.images_seen[raw.source] += len(raw.metas)
            yield self.make_batch(raw, self.text)

    def images_drawn(self) -> dict[str, int]:
        return dict(self.images_seen)

    def rng_generators(self) -> dict[str, torch.Generator]:
        return {"text": self.text.generator}

    def checkpoint_files(self) -> dict[str, str]:
        return {}

    @torch.no_grad()
    def log_pictures(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, logger) -> None:
        """A few training images with a caption each and the VD index of every grid cell drawn over them;
        the distribution of entry use and the number of dead entries."""
        if not self.dist.is_main:
            return
        model = module.model
        was_training = model.training
        model.eval()  # no statistics change: this look is not a training step
        n = min(4, len(batch["images"]))
        visual = model.encode_image(batch["images"][:n], batch["image_sizes"][:n])
        model.train(was_training)
        for i in range(n):
            caption = self._last_metas[i]["captions"][0] if i < len(self._last_metas) else ""
            picture = draw_vd_picture(batch["images"][i].float().cpu(), batch["image_sizes"][i].tolist(),
                                      None if visual.vd_index is None else visual.vd_index[i].cpu(), visual.grid,
                                      caption)
            logger.image(f"pictures/{i}", picture, step)
        vd = model.visual_dictionary
        if vd is not None:
            logger.histogram("vd/entry_count", vd.ema_count.cpu(), step)
            dead = (vd.ema_count < max(vd.restart_below, 1e-3) * vd.ema_count.mean()).sum().item()
            logger.scalars(step, {"vd/dead_entries": float(dead)})

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        """ITM accuracy (half matched, half another image's caption) and MLM accuracy on held-out shards.

        The negatives and masks are drawn from a fixed seed each time, so evaluations compare.
        Each rank scores its own slice (up to `train.eval_batches` batches; a slice may be short or
        empty); every figure is a mean over the images scored on all ranks, combined once at the end.
        """
        d = self.cfg.data
        metrics = self.evaluate_retrieval(module, device, dtype) if d.retrieval_shards else {}
        if not d.val_shards:
            return metrics
        if self._val_loader is None:
            self._val_loader = self._eval_loader(self.shards["val"], self.regions)
        self.val_text.generator.manual_seed(self.val_seed)
        was_training = module.training
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for i, raw in enumerate(self._val_loader.epochs() if self._val_loader is not False else ()):
            if i >= self.cfg.train.eval_batches:
                continue  # drain the rest of the pass so the next evaluation starts from the beginning
            out = module(to_device(self.make_batch(raw, self.val_text), device, dtype))
            for k in EVAL_METRICS:
                if k in out:
                    sums[k] = sums.get(k, 0) + out[k].float() * len(raw.metas)
                    counts[k] = counts.get(k, 0) + len(raw.metas)
        module.train(was_training)
        return {**metrics, **sample_means_over_ranks(sums, counts, list(EVAL_METRICS), device)}

    def _eval_loader(self, shards, regions) -> ShardLoader | bool:
        """This rank's reader of a held-out set; False on ranks beyond its sample count (DALI splits a set
        over at most as many readers as it has samples: the other ranks score none)."""
        d = self.cfg.data
        n = shards[0].samples
        readers = self.dist.world_size if n is None else max(1, min(self.dist.world_size, n))
        if self.dist.rank >= readers:
            return False
        return ShardLoader(shards, self.micro_batch, self.spec, self.dist.rank, readers, train=False,
                           num_threads=d.num_threads, device=self.dist.device.type, regions=regions)

    @torch.no_grad()
    def evaluate_retrieval(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype
                           ) -> dict[str, float]:
        """Zero-shot retrieval R@1/5/10 both ways on data.retrieval_shards (see pretrain/retrieval.py)."""
        from soho_ds.pretrain.retrieval import retrieval_scores
        from soho_ds.tasks.retrieval import recall_at_k

        t, d = self.cfg.train, self.cfg.data
        if self._retrieval_loader is None:
            self._retrieval_loader = self._eval_loader(self.shards["retrieval"], None)
        batches = self._retrieval_loader.epochs() if self._retrieval_loader is not False else ()
        tokens = functools.partial(tokenize, self.tokenizer, max_len=d.max_text_len)
        was_training = module.training
        module.eval()
        scores, text_image = retrieval_scores(module, batches, tokens, t.retrieval_rerank, t.retrieval_images,
                                              device, dtype)
        module.train(was_training)
        recall = recall_at_k(scores, text_image)
        return {**{f"retrieval/{k}": v for k, v in recall.items()},
                "retrieval/images": float(scores.shape[0]), "retrieval/captions": float(scores.shape[1])}


# What the held-out evaluation reports, where the model's configuration computes it.
EVAL_METRICS = ("acc/itm", "acc/mlm", "loss/itm", "loss/mlm", "acc/itc", "loss/itc", "acc/object", "acc/attribute",
                "loss/region_feature")
