import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, tiny_model_config
from soho_ds.models.visual_dictionary import VisualDictionary


def hand_vd(momentum=0.5):
    vd = VisualDictionary(num_entries=3, dim=2, momentum=momentum, eps=1e-5, init_from_data=False,
                          restart_below=0.0)
    vd.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    vd.ema_sum.copy_(vd.embed)
    return vd.train()


X = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.1, -0.1], [0.2, 0.8]])


def test_vd_assignment_and_ema_update_match_hand_computation():
    vd = hand_vd()
    q, index = vd(X)
    assert torch.equal(vd.ema_count, torch.ones(3))  # staged: nothing changes before the commit
    vd.commit()
    # Squared distances by hand: x0 nearest e0 (0.02), x1 e1 (0.05), x2 e1 (0.02), x3 e2 (0.08).
    assert index.tolist() == [0, 1, 1, 2]
    # Output is the entry before the update.
    assert torch.equal(q, torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # counts c = [1, 2, 1]; n = 0.5*1 + 0.5*c = [1, 1.5, 1]
    assert torch.allclose(vd.ema_count, torch.tensor([1.0, 1.5, 1.0]))
    # sums s = [[.1,.1],[2.0,.1],[.2,.8]]; m = 0.5*e + 0.5*s
    m = torch.tensor([[0.05, 0.05], [1.5, 0.05], [0.1, 0.9]])
    assert torch.allclose(vd.ema_sum, m)
    # Laplace smoothing: n~ = (n + eps) / (sum n + K eps) * sum n, e = m / n~
    n, eps, total = torch.tensor([1.0, 1.5, 1.0]), 1e-5, 3.5
    smoothed = (n + eps) / (total + 3 * eps) * total
    expected = m / smoothed[:, None]
    assert torch.allclose(vd.embed, expected, atol=1e-7)
    assert torch.allclose(vd.embed, torch.tensor([[0.05, 0.05], [1.0, 1 / 30], [0.1, 0.9]]), atol=1e-4)
    assert vd.usage.item() == pytest.approx(1.0)


def released_update(embed, cluster_size, embed_avg, x, decay, eps):
    """One training forward of the released SOHO module, written here from its formula (VQ-VAE's EMA
    codebook): nearest entry by squared L2, one-hot counts and sums, running averages from zero,
    Laplace-smoothed counts, every entry recomputed, and the updated entry returned."""
    K = embed.shape[0]
    distance = (x ** 2).sum(1, keepdim=True) - 2 * x @ embed.t() + (embed ** 2).sum(1)[None]
    index = distance.argmin(1)
    onehot = torch.nn.functional.one_hot(index, K).to(x.dtype)
    cluster_size = cluster_size * decay + (1 - decay) * onehot.sum(0)
    embed_avg = embed_avg * decay + (1 - decay) * (onehot.t() @ x)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    embed = embed_avg / smoothed[:, None]
    return embed, cluster_size, embed_avg, index, embed[index]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_official_variant_follows_the_released_update_step_for_step(seed):
    """Six steps of clustered features (some entries never chosen) through model.vd_variant official
    and through the transcription above, from the same random entries and zero statistics, γ 0.4 as in
    the released config: the same entry for every feature, the same returned vectors, counts, sums and
    entries (float32 sums in another order: to 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    K, C, decay, eps = 16, 8, 0.4, 1e-5
    vd = VisualDictionary(K, C, momentum=decay, eps=eps, variant="official").train()
    assert not vd.ema_count.any() and not vd.ema_sum.any()  # zero-started, as released
    embed, cluster_size, embed_avg = vd.embed.clone(), torch.zeros(K), torch.zeros(K, C)
    centres = torch.randn(5, C, generator=g) * 3
    for step in range(6):
        x = centres[torch.randint(5, (40,), generator=g)] + 0.3 * torch.randn(40, C, generator=g)
        q, index = vd(x)
        vd.commit()
        embed, cluster_size, embed_avg, ref_index, ref_q = released_update(embed, cluster_size, embed_avg, x,
                                                                            decay, eps)
        assert torch.equal(index, ref_index), step
        torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)  # the entry after the update
        torch.testing.assert_close(vd.ema_count, cluster_size, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vd.ema_sum, embed_avg, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vd.embed, embed, rtol=1e-6, atol=1e-6)
    unused = cluster_size == 0
    assert unused.any() and not vd.embed[unused].any()  # never chosen: exactly 0, as released


def test_model_vd_variant_reaches_the_dictionary_from_a_yaml(tmp_path):
    from soho_ds.config import VD_VARIANTS, ConfigError, load_config
    from soho_ds.models.soho import SohoModel
    from soho_ds.models.visual_dictionary import VARIANTS

    assert VD_VARIANTS == VARIANTS  # the leaf config module lists the module's variants

    (tmp_path / "run.yaml").write_text("model:\n  vd_variant: official\n  vd_momentum: 0.4\n")
    cfg = load_config(tmp_path / "run.yaml")
    vd = SohoModel(tiny_model_config(vd_variant=cfg.model.vd_variant, vd_momentum=cfg.model.vd_momentum)).visual.vd
    assert vd.official and vd.momentum == 0.4 and vd.restart_below == 0 and not vd.ema_count.any()
    (tmp_path / "bad.yaml").write_text("model:\n  vd_variant: released\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.vd_variant must be one of \('official', 'soho_ds'\)"):
        load_config(tmp_path / "bad.yaml")


def test_the_soho_ds_variant_departs_where_it_says_on_the_same_inputs():
    """From the same entries, one step of each variant: official returns the updated entry and zeroes
    what no feature chose; soho_ds returns the entry before the update, keeps unused entries, and its
    statistics start as one feature per entry."""
    torch.manual_seed(0)
    official = VisualDictionary(3, 2, momentum=0.5, eps=1e-5, variant="official").train()
    ours = VisualDictionary(3, 2, momentum=0.5, eps=1e-5, init_from_data=False, restart_below=0.0).train()
    start = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    for vd in (official, ours):
        vd.embed.copy_(start)
    ours.ema_sum.copy_(start)
    x = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.1, -0.1]])  # entry 2 is never chosen
    q_official, index = official(x)
    official.commit()
    q_ours, index_ours = ours(x)
    ours.commit()
    assert index.tolist() == index_ours.tolist() == [0, 1, 1]
    torch.testing.assert_close(q_official, official.embed[index])  # straight-through: x + (e - x), to rounding
    torch.testing.assert_close(q_ours, start[index])
    assert torch.equal(official.embed[2], torch.zeros(2)) and torch.equal(ours.embed[2], start[2])
    # official: n = 0.5 * c = [0.5, 1, 0]; m = 0.5 * s; ours: n = 0.5 + 0.5 * c = [1, 1.5, 0.5]
    torch.testing.assert_close(official.ema_count, torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(ours.ema_count, torch.tensor([1.0, 1.5, 0.5]))


def test_vd_unused_entry_keeps_its_vector_and_eval_does_not_update():
    vd = hand_vd()
    vd(X[:3])  # nothing chooses entry 2
    vd.commit()
    assert torch.equal(vd.embed[2], torch.tensor([0.0, 1.0]))
    assert vd.usage.item() == pytest.approx(2 / 3)
    before = vd.embed.clone()
    vd.eval()
    vd(X)
    with pytest.raises(RuntimeError, match="no training forward to commit"):
        vd.commit()  # evaluation staged nothing
    assert torch.equal(vd.embed, before)


def test_vd_straight_through_gradient_is_identity():
    vd = hand_vd()
    x = X.clone().requires_grad_(True)
    q, _ = vd(x)
    (q * torch.arange(8.0).view(4, 2)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).view(4, 2))


def test_vd_gradient_reaches_the_cnn():
    from soho_ds.models.soho import SohoModel

    torch.manual_seed(0)
    model = SohoModel(tiny_model_config()).train()
    visual = model.encode_image(torch.randn(2, 3, 64, 64))
    ids = torch.randint(1000, 2000, (2, 6))
    seq, pooled = model.fuse(ids, torch.ones_like(ids), visual)
    pooled.sum().backward()
    grad = model.backbone.layer4[-1].conv2.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.backbone.stem[0].weight.grad is None  # frozen stem


def test_vd_initialises_from_data_and_restarts_dead_entries():
    x = torch.tensor([[5.0, 5.0], [5.0, 5.1], [-5.0, 0.0], [0.0, -5.0]])
    torch.manual_seed(0)
    vd = VisualDictionary(num_entries=4, dim=2, momentum=0.99).train()
    vd(x)
    vd.commit()
    # Entries start as features of that batch; with momentum 0.99 one EMA step barely moves them.
    assert bool(vd.initialised)
    assert all(any(torch.allclose(e, row, atol=0.1) for row in x) for e in vd.embed)

    torch.manual_seed(0)
    vd = VisualDictionary(num_entries=4, dim=2, momentum=0.5, restart_below=0.2).train()
    vd(x)
    vd.commit()
    # Feed one cluster only: the other entries decay below 0.2 of the mean count; the trainer's
    # interval upkeep (maintain) re-seeds them from the latest features, never a training step.
    for _ in range(6):
        vd(x[:2])
        vd.commit()
    dead = int((vd.ema_count < 0.2 * vd.ema_count.mean()).sum())
    assert dead > 0 and vd.restarts.item() == 0
    assert vd.maintain() == dead and vd.restarts.item() == dead
    assert all(any(torch.allclose(e, row, atol=0.11) for row in x[:2]) for e in vd.embed)
    assert vd.maintain() == 0  # nothing dead any more


def test_a_bad_first_batch_defers_the_data_initialisation_to_the_next_good_one():
    x = torch.tensor([[5.0, 5.0], [5.0, 5.1], [-5.0, 0.0], [0.0, -5.0]])
    vd = VisualDictionary(num_entries=4, dim=2, momentum=0.99).train()
    before = vd.embed.clone()
    vd(x * float("nan"))
    vd.commit()
    assert not bool(vd.initialised) and torch.equal(vd.embed, before)
    vd(x)  # the host believes it initialised: only maintain() reads the flag back
    vd.commit()
    assert not bool(vd.initialised)
    vd.maintain()
    vd(x)
    vd.commit()
    assert bool(vd.initialised)
    assert all(any(torch.allclose(e, row, atol=0.1) for row in x) for e in vd.embed)


def _vd_worker(rank, world, port, batches, kwargs, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial table on every rank
    vd = VisualDictionary(**{k: v for k, v in kwargs.items() if k != "poison_rank_step"}).train()
    torch.manual_seed(100 + rank)  # but different per-rank randomness afterwards
    for i, step_batches in enumerate(batches):
        bad = kwargs.get("poison_rank_step") == (rank, i)
        x = step_batches[rank] * (float("nan") if bad else 1.0)
        vd(x)
        vd.commit()
        vd.maintain()  # the trainer's logging interval, here every step
    out[rank] = {k: v.clone() for k, v in vd.state_dict().items()}
    dist.destroy_process_group()


def _run_two_ranks(batches, kwargs):
    out = mp.Manager().dict()
    mp.spawn(_vd_worker, args=(2, free_port(), batches, kwargs, out), nprocs=2, join=True)
    return out[0], out[1]


@pytest.mark.slow
def test_vd_two_ranks_identical_and_equal_to_one_rank_with_both_batches():
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randn(30, 8, generator=g) + i, torch.randn(50, 8, generator=g) - i] for i in range(4)]
    kwargs = dict(num_entries=16, dim=8, momentum=0.9, init_from_data=False, restart_below=0.0)
    rank0, rank1 = _run_two_ranks(steps, kwargs)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # bit-identical across ranks
    torch.manual_seed(0)
    single = VisualDictionary(**kwargs).train()
    for a, b in steps:
        single(torch.cat([a, b]))
        single.commit()
    for k, v in single.state_dict().items():
        assert torch.allclose(rank0[k], v, rtol=1e-6, atol=1e-6), k  # sums differ only in addition order


@pytest.mark.slow
def test_vd_ranks_stay_identical_with_data_init_and_restarts():
    g = torch.Generator().manual_seed(2)
    # Rank 1 sees only one cluster, so entries die and are re-seeded from gathered features.
    steps = [[torch.randn(20, 4, generator=g) * 3, torch.randn(20, 4, generator=g) * 0.01 + 7] for _ in range(8)]
    kwargs = dict(num_entries=12, dim=4, momentum=0.5, init_from_data=True, restart_below=0.3)
    rank0, rank1 = _run_two_ranks(steps, kwargs)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert bool(rank0["initialised"]) and rank0["restarts"].item() > 0


def test_padding_cells_leave_no_trace_in_the_vd_statistics():
    """A padded batch (padding cells hold anything, even NaN) updates the VD exactly as its valid
    cells alone do (counts, sums, entries, usage), and entries initialised or re-seeded from data
    are always valid features."""
    g = torch.Generator().manual_seed(4)
    valid = torch.rand(6, 10, generator=g) < 0.6
    valid[:, 0] = True  # every image has a valid cell
    x = torch.randn(6, 10, 8, generator=g)
    padded = torch.where(valid[..., None], x, torch.randn(6, 10, 8, generator=g) * 50)
    padded[~valid] = float("nan")
    kwargs = dict(num_entries=8, dim=8, momentum=0.7, init_from_data=False, restart_below=0.0)
    torch.manual_seed(0)
    with_padding = VisualDictionary(**kwargs).train()
    torch.manual_seed(0)
    alone = VisualDictionary(**kwargs).train()
    for step in range(3):
        with_padding(padded + step, valid)
        with_padding.commit()
        alone(x[valid][None] + step)
        alone.commit()
    for name in ("embed", "ema_count", "ema_sum", "usage"):
        torch.testing.assert_close(getattr(with_padding, name), getattr(alone, name), rtol=1e-6, atol=1e-6)

    from soho_ds.models.visual_dictionary import _gather_candidates

    flat, weight = padded.reshape(-1, 8), valid.reshape(-1).float()
    drawn = _gather_candidates(torch.nan_to_num(flat), weight, 500)  # re-seeding candidates
    assert torch.isfinite(drawn).all() and all((x[valid] == row).all(1).any() for row in drawn)
    seeded = VisualDictionary(num_entries=16, dim=8, momentum=0.999).train()
    seeded(padded, valid)  # entries start at valid features of this batch
    seeded.commit()
    assert all((x[valid] - e).abs().max(1).values.min() < 0.05 for e in seeded.embed)


def test_a_non_finite_batch_or_a_refused_commit_leaves_the_vd_untouched():
    vd = hand_vd()
    before = {k: v.clone() for k, v in vd.state_dict().items()}
    vd(X * float("nan"))  # non-finite input
    vd.commit()
    vd(X)
    vd.commit(torch.tensor(False))  # the loss was not finite
    for k, v in vd.state_dict().items():
        assert torch.equal(v, before[k]), k
    vd(X)
    vd.commit(torch.tensor(True))
    assert not torch.equal(vd.ema_count, before["ema_count"])


@pytest.mark.slow
def test_one_ranks_bad_batch_stops_the_update_on_every_rank():
    g = torch.Generator().manual_seed(3)
    steps = [[torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)] for _ in range(3)]
    kwargs = dict(num_entries=6, dim=4, momentum=0.5, init_from_data=False, restart_below=0.0,
                  poison_rank_step=(1, 1))
    rank0, rank1 = _run_two_ranks(steps, kwargs)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.isfinite(rank0[k].float()).all(), k
    torch.manual_seed(0)
    single = VisualDictionary(num_entries=6, dim=4, momentum=0.5, init_from_data=False, restart_below=0.0).train()
    for i, (a, b) in enumerate(steps):
        if i != 1:  # the poisoned step is skipped on both ranks
            single(torch.cat([a, b]))
            single.commit()
    torch.testing.assert_close(rank0["ema_count"], single.ema_count)
