"""Weighted mixing of training sources: the realised share of batches against the weights, each
source restarting its own epochs, determinism from the seed, per-source image counts logged and kept
in the checkpoint, and an exact resume after SIGTERM with mixing on."""
import json
import logging
import math
from collections import Counter

import pytest

from launching import pretrain_in_process
from soho_ds.config import ShardSource
from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.synthetic.shards import write_split

SPEC = ImageSpec(mode="aspect", shorter_side=32, longer_side=48, stride=32, hflip_prob=0.0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """small: 16 images in 2 shards; large: 48 images in 3 shards (indexed, with manifests)."""
    root = tmp_path_factory.mktemp("mix")
    write_split(root / "small", 16, 8, 32, 1, "small_", 0, non_square=0.3)
    write_split(root / "large", 48, 16, 32, 2, "large_", 0, non_square=0.3)
    return root


def mixture(root, small=3.0, large=1.0):
    return [ShardSource("small", (str(root / "small"),), small), ShardSource("large", (str(root / "large"),), large)]


def draw(loader, n):
    stream = loader.forever()
    return [next(stream) for _ in range(n)]


def test_batches_come_from_each_source_in_proportion_to_its_weight(sources):
    loader = ShardLoader(mixture(sources), 2, SPEC, seed=5, shuffle_buffer=4, num_threads=1,
                         group_by_orientation=True)
    assert len(loader.streams) == 4  # each source split into its landscape and portrait images
    batches = draw(loader, 400)
    for b in batches:  # a batch is one source's: its keys say where they come from
        assert {m["key"].split("_")[0] for m in b.metas} == {b.source}
    drawn = Counter(b.source for b in batches)
    # 400 draws with p = 3/4: mean 300, standard deviation 8.7; 4 deviations either side
    assert abs(drawn["small"] - 300) <= 35, drawn
    # the small source ran through its 16 images many times (37 epochs on average), each epoch of each stream
    # (orientation group) whole: within a stream no image is seen twice more often than another
    seen = Counter(m["key"] for b in batches if b.source == "small" for m in b.metas)
    assert len(seen) == 16 and sum(seen.values()) >= 16 * 30, seen
    portrait = {m["key"]: bool(size[0] > size[1]) for b in batches for m, size in zip(b.metas, b.image_sizes)}
    for group in (True, False):
        counts = [n for key, n in seen.items() if portrait[key] == group]
        assert counts and max(counts) - min(counts) <= 1, (group, seen)
    large = Counter(m["key"] for b in batches if b.source == "large" for m in b.metas)
    assert len(large) == 48  # about 200 images: four epochs of the large source, every image in each
    # uniform draws inside one source: landscape and portrait streams in proportion to their sizes
    small_streams = [i for i, s in enumerate(loader.stream_sources) if s == "small"]
    assert sum(loader.stream_weights[i] for i in small_streams) == pytest.approx(3.0)


def test_the_mix_is_set_by_the_seed_and_the_rank_and_resumes_from_its_checkpoint(sources):
    def order(**kwargs):
        return [(b.source, tuple(m["key"] for m in b.metas))
                for b in draw(ShardLoader(mixture(sources, 1.0, 1.0), 2, SPEC, shuffle_buffer=4, num_threads=1,
                                          **kwargs), 30)]

    first = order(seed=7)
    assert order(seed=7) == first
    assert order(seed=7, rank=1, world_size=2) != order(seed=7, rank=0, world_size=2)
    loader = ShardLoader(mixture(sources, 1.0, 1.0), 2, SPEC, seed=7, shuffle_buffer=4, num_threads=1)
    stream = loader.forever()
    head = [next(stream) for _ in range(12)]
    state = loader.checkpoint()
    resumed = ShardLoader(mixture(sources, 1.0, 1.0), 2, SPEC, seed=7, shuffle_buffer=4, num_threads=1,
                          checkpoint=state)
    rest = draw(resumed, 18)
    assert [(b.source, tuple(m["key"] for m in b.metas)) for b in head + rest] == first


def test_one_source_reads_as_before(sources):
    """Plain paths make one source, "train": no draw between sources, every image equally likely."""
    plain = ShardLoader(str(sources / "large"), 2, SPEC, seed=3, shuffle_buffer=4, num_threads=1)
    named = ShardLoader([ShardSource("train", (str(sources / "large"),), 1.0)], 2, SPEC, seed=3, shuffle_buffer=4,
                        num_threads=1)
    keys = [[m["key"] for m in b.metas] for b in draw(plain, 10)]
    assert keys == [[m["key"] for m in b.metas] for b in draw(named, 10)]
    assert {b.source for b in draw(plain, 3)} == {"train"}


def rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "train.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_mixed_pretraining_counts_each_source_and_resumes_exactly_after_sigterm_and_a_crash(
        sources, tmp_path, world_of_one, monkeypatch):
    mix = (f"[{{name: small, shards: {sources}/small, weight: 3}}, "
           f"{{name: large, shards: {sources}/large, weight: 1}}]")
    sets = ["train.save_every=3", "train.log_every=1"]
    pretrain_in_process(tmp_path / "whole", mix, 6, sets=sets)
    whole = rows(tmp_path / "whole/run")
    # every step draws one batch of 4 images from one source: the counts add up, both sources drawn
    for step, row in whole.items():
        assert row["data/images_small"] + row["data/images_large"] == 4 * step
    assert whole[6]["data/images_small"] > 0 and whole[6]["data/images_large"] > 0
    meta = json.loads((tmp_path / "whole/run/checkpoints/step_00000003/meta.json").read_text())
    assert meta["images_seen"] == {"large": whole[3]["data/images_large"], "small": whole[3]["data/images_small"]}

    # SIGTERM after step 4: a checkpoint at step 4, then --resume runs steps 5 and 6 as the whole run did
    pretrain_in_process(tmp_path / "cut", mix, 6, sets=sets, fault="0:4:TERM")
    ckpt = tmp_path / "cut/run/checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    pretrain_in_process(tmp_path / "cut", mix, 6, sets=sets, resume="yes")
    cut = rows(tmp_path / "cut/run")
    for step in (5, 6):
        for key, value in whole[step].items():
            if key.startswith(("loss", "acc/", "vd/", "data/")):
                assert cut[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    assert math.isclose(cut[6]["data/images_small"] + cut[6]["data/images_large"], 24)

    # a crash right after step 5 (as SIGKILL: no checkpoint written on the way out): --resume goes back to
    # step 3's checkpoint and steps 4 to 6 repeat the whole run's, counts included
    from soho_ds.runtime.trainer import StepHooks

    class Crash(StepHooks):
        def after_step(self, rank, step):
            if step == 5:
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pretrain_in_process(tmp_path / "crash", mix, 6, sets=sets, hooks=Crash())
    assert (tmp_path / "crash/run/checkpoints/latest").read_text() == "step_00000003"
    pretrain_in_process(tmp_path / "crash", mix, 6, sets=sets, resume="yes")
    crashed = rows(tmp_path / "crash/run")
    for step in (4, 5, 6):
        for key, value in whole[step].items():
            if key.startswith(("loss", "acc/", "vd/", "data/")):
                assert crashed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.slow
def test_changed_weights_restart_the_data_order_with_a_warning(sources, tmp_path, world_of_one, monkeypatch):
    mix = "[{{name: small, shards: {0}/small, weight: {1}}}, {{name: large, shards: {0}/large, weight: 1}}]"
    pretrain_in_process(tmp_path, mix.format(sources, 3), 2, sets=["train.save_every=2"])
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("soho_ds").addHandler(handler)
    import soho_ds.data.pipeline as pipeline

    checked, check = [], pipeline.trusted_index_paths
    monkeypatch.setattr(pipeline, "trusted_index_paths", lambda paths: checked.append(tuple(paths)) or check(paths))
    try:
        pretrain_in_process(tmp_path, mix.format(sources, 1), 3, resume="yes")
    finally:
        logging.getLogger("soho_ds").removeHandler(handler)
    assert any("mixing weights changed" in w for w in warnings), warnings
    # one start builds two loaders (the first, and its restart at the resume): each source's shards checked once
    assert sorted(Counter(checked).values()) == [1, 1] and len(checked) == 2, checked
    # the counts carried on from the checkpoint: 3 steps of 4 images in all
    last = rows(tmp_path / "run")[3]
    assert last["data/images_small"] + last["data/images_large"] == 12
