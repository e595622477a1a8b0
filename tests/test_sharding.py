"""Rank-correct data at any world size: disjoint slices covering each epoch, deterministic reshuffles."""
import collections

import pytest

from soho_ds.data.pipeline import ImageSpec, ShardLoader
from soho_ds.synthetic.shards import make_dataset

SPEC = ImageSpec(mode="aspect", shorter_side=32, longer_side=48)


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """100 samples in shards of 23, 23, 23, 23 and 8."""
    out = tmp_path_factory.mktemp("uneven")
    manifest = make_dataset(out, num_train=100, num_val=10, samples_per_shard=23, image_size=32, seed=1,
                            non_square=0.5)
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [23, 23, 23, 23, 8]
    return out


def rank_stream(folder, rank, world, n_samples, seed=5):
    """The first `n_samples` keys this rank trains on, in order."""
    loader = ShardLoader(str(folder / "train"), batch_size=4, spec=SPEC, rank=rank, world_size=world,
                         train=True, num_threads=1, seed=seed, shuffle_buffer=16)
    keys = []
    for batch in loader.forever():
        keys += [m["key"] for m in batch.metas]
        if len(keys) >= n_samples:
            return keys[:n_samples]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_is_split_across_ranks_with_no_sample_lost_or_repeated(uneven_shards, world):
    all_keys = {f"tr{i:07d}" for i in range(100)}
    epochs = [collections.Counter(), collections.Counter()]
    for rank in range(world):
        per_rank = 100 * (rank + 1) // world - 100 * rank // world  # DALI's contiguous slice sizes
        keys = rank_stream(uneven_shards, rank, world, 2 * per_rank)
        epochs[0].update(keys[:per_rank])
        epochs[1].update(keys[per_rank:])
    for counts in epochs:
        assert set(counts) == all_keys and max(counts.values()) == 1


def test_epoch_order_is_a_function_of_seed_and_epoch(uneven_shards):
    first = rank_stream(uneven_shards, 0, 1, 200)
    assert rank_stream(uneven_shards, 0, 1, 200) == first  # same seed: the same epochs, in the same order
    assert set(first[:100]) == set(first[100:]) and first[:100] != first[100:]  # each epoch reshuffled
    assert rank_stream(uneven_shards, 0, 1, 200, seed=6) != first


def test_eval_loader_slices_are_disjoint_and_complete(uneven_shards):
    for world in (1, 2, 3):
        counts = collections.Counter()
        for rank in range(world):
            loader = ShardLoader(str(uneven_shards / "train"), batch_size=8, spec=SPEC, rank=rank,
                                 world_size=world, train=False, num_threads=1)
            counts.update(m["key"] for b in loader.epochs() for m in b.metas)
        assert len(counts) == 100 and max(counts.values()) == 1, world


def test_orientation_groups_keep_each_epoch_whole_and_resume_exactly(uneven_shards):
    """Grouped by orientation, each group is still split across ranks with nothing lost or repeated
    per group epoch, and a loader rebuilt from its checkpoint continues with the same batches."""
    loader = ShardLoader(str(uneven_shards / "train"), batch_size=4, spec=SPEC, train=True, num_threads=1, seed=3,
                         shuffle_buffer=16, group_by_orientation=True)
    assert len(loader.streams) == 2 and sum(loader.stream_samples) == 100
    stream = loader.forever()
    for _ in range(5):
        next(stream)
    state = loader.checkpoint()
    expected = [[m["key"] for m in next(stream).metas] for _ in range(8)]
    again = ShardLoader(str(uneven_shards / "train"), batch_size=4, spec=SPEC, train=True, num_threads=1, seed=3,
                        shuffle_buffer=16, group_by_orientation=True, checkpoint=state)
    got = [[m["key"] for m in b.metas] for _, b in zip(range(8), again.forever())]
    assert got == expected
