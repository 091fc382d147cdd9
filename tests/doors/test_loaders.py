"""``dist_cutmix.loaders``: ``GlobalBatchSampler`` gives every step the same global batch at any world size, and
``check_loader`` refuses, on every rank before the first batch, loaders whose lengths differ between gloo ranks."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from dist_cutmix.loaders import GlobalBatchSampler, check_loader
from tests.helpers.spawn import run_ranks

DATA = TensorDataset(torch.arange(70))


def _steps(world: int, batch_size: int, epoch: int, **kwargs) -> list[list[int]]:
    """Every step's global batch: the ranks' batches end to end, in rank order."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(DATA, batch_size, num_replicas=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        per_rank.append([b[0].tolist() for b in DataLoader(DATA, batch_sampler=sampler)])
    return [sum((batches[s] for batches in per_rank), []) for s in range(len(per_rank[0]))]


def test_every_step_takes_the_same_global_batch_at_any_world_size() -> None:
    for epoch in (0, 1):
        order = torch.randperm(70, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        want = [order[s * 20:(s + 1) * 20] for s in range(3)]  # 70 // 20 full global batches, the tail dropped
        for world in (1, 2, 4, 5):
            assert _steps(world, 20 // world, epoch, seed=5) == want, f'world {world}, epoch {epoch}'
    assert _steps(2, 10, 0, seed=5) != _steps(2, 10, 1, seed=5)  # set_epoch draws a new order
    assert _steps(4, 5, 0, shuffle=False) == [list(range(s * 20, (s + 1) * 20)) for s in range(3)]


def test_with_one_rank_it_is_distributed_samplers_order_batched_by_the_loader() -> None:
    sampler = DistributedSampler(DATA, num_replicas=1, rank=0, seed=5, drop_last=True)
    sampler.set_epoch(3)
    want = [b[0].tolist() for b in DataLoader(DATA, batch_size=8, sampler=sampler, drop_last=True)]
    assert _steps(1, 8, 3, seed=5) == want


def test_distributed_samplers_global_batch_holds_the_same_samples_in_an_order_that_depends_on_the_world_size():
    # What docs/plain_pytorch.md says of DistributedSampler: same set per step, another order (and so other pairs).
    def steps(world: int) -> list[list[int]]:
        per_rank = []
        for rank in range(world):
            sampler = DistributedSampler(DATA, num_replicas=world, rank=rank, seed=5, drop_last=True)
            per_rank.append([b[0].tolist() for b in DataLoader(DATA, batch_size=20 // world, sampler=sampler,
                                                                drop_last=True)])
        return [sum((batches[s] for batches in per_rank), []) for s in range(len(per_rank[0]))]

    two, four = steps(2), steps(4)
    assert len(two) == len(four) == 3
    assert [sorted(b) for b in two] == [sorted(b) for b in four] and two != four


def test_bad_arguments_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match='batch_size must be an int >= 1, got batch_size=0'):
        GlobalBatchSampler(DATA, 0, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match=r'rank must be in \[0, num_replicas\), got rank=4, num_replicas=4'):
        GlobalBatchSampler(DATA, 2, num_replicas=4, rank=4)
    with pytest.raises(ValueError, match='batch_size \\* num_replicas = 20 \\* 4 samples does not fit in the dataset '
                                         'of 70'):
        GlobalBatchSampler(DATA, 20, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="mode must be one of .*, got mode='all'"):
        check_loader([], 'all')


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_in_one_process_any_loader_passes() -> None:
    assert check_loader(DataLoader(DATA, batch_size=8)) == 9
    assert check_loader(DataLoader(_Stream(), batch_size=2), 'global') is None
    assert check_loader(DataLoader(_Stream(), batch_size=2), 'local') is None


def _check_on_rank(rank: int, world: int) -> dict:
    def refusal(loader, mode='global') -> str:
        try:
            return f'passed: {check_loader(loader, mode)}'
        except ValueError as e:
            return str(e)

    uneven = TensorDataset(torch.arange(11))
    return {
        'distributed_sampler': [check_loader(DataLoader(uneven, batch_size=2, sampler=DistributedSampler(
            uneven, num_replicas=world, rank=rank, drop_last=drop_last))) for drop_last in (False, True)],
        # sharded by hand: 9 samples over 2 ranks are 5 and 4, 3 batches of 2 and 2
        'by_hand': refusal(DataLoader(torch.arange(rank, 9, world), batch_size=2)),
        'local': refusal(DataLoader(torch.arange(4 + 2 * rank), batch_size=2), 'local'),
        'unsized': refusal(DataLoader(_Stream(), batch_size=2) if rank else DataLoader(DATA, batch_size=8)),
    }


def test_loaders_of_unequal_length_are_refused_on_every_rank_naming_each_count(tmp_path) -> None:
    results = run_ranks(_check_on_rank, 2, tmp_path)
    for rank, r in enumerate(results):
        # 11 samples: DistributedSampler gives each rank 6 (padding with a repeat) or 5 (dropping the tail): equal
        assert r['distributed_sampler'] == [3, 3], r
        assert "mode='global' mixes every batch across ranks" in r['by_hand']
        assert 'the loaders differ (rank 0: 3 batches, rank 1: 2 batches)' in r['by_hand'], r['by_hand']
        assert r['local'] == f'passed: {2 + rank}'  # local mixing runs no collective: lengths may differ
        assert 'cannot be checked ahead (rank 0: 9 batches, rank 1: no length)' in r['unsized'], r['unsized']
        assert 'arrival_timeout' in r['unsized']
