"""``Mixer(arrival_timeout=S)``: a rank that stops calling the mixer is named, with the batch, within ``S`` seconds
on the ranks that wait for it, instead of leaving them in the exchange until the process group's timeout; ranks
that arrive late but within ``S`` mix as without the check."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from dist_cutmix import Mixer
from dist_cutmix.distributed import MissingRankError
from tests.helpers.spawn import run_ranks

C, H, W, K = 3, 8, 8, 5
GROUP_TIMEOUT_S = 30.0  # the process group's: the error must come from the arrival check, long before it


def _batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(torch.rand(4, C, H, W, generator=g), torch.randint(0, K, (4,), generator=g)) for _ in range(count)]


def _mixer(timeout: float | None) -> Mixer:
    return Mixer(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=K, mode='global', seed=3, arrival_timeout=timeout)


def _stopping_rank(rank: int, world: int, stop_after: int, timeout: float) -> dict:
    """Rank 1 mixes ``stop_after`` batches and leaves the loop for a collective elsewhere (as at an epoch's end)."""
    # First, ranks that arrive late but within the timeout mix exactly as without the check.
    late = _mixer(timeout)
    node = Mixer(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=K, mode='node', seed=3, arrival_timeout=timeout)
    mixed, by_node = [], []
    for x, y in _batches(rank, 2):
        time.sleep(0.3 * rank)
        mixed.append(late(x, y))
        by_node.append(node(x, y))  # one node holds both ranks: its mix is the global one
    assert all(torch.equal(a, b) for m, n in zip(mixed, by_node, strict=True) for a, b in zip(m, n, strict=True))
    mixer = _mixer(timeout)
    started = time.monotonic()
    try:
        for x, y in _batches(rank, stop_after if rank == 1 else stop_after + 3):
            started = time.monotonic()
            mixer(x, y)
        dist.barrier()
        return {'mixed': mixed, 'error': None}
    except (MissingRankError, RuntimeError) as e:
        return {'mixed': mixed, 'error': e, 'waited_s': time.monotonic() - started, 'batch': mixer.batch}


@pytest.mark.parametrize('stop_after', [2, 0])
def test_a_rank_that_stops_calling_is_named_with_the_batch_within_the_timeout(tmp_path, stop_after: int) -> None:
    timeout = 1.5
    waiting, stopped = run_ranks(_stopping_rank, 2, tmp_path, stop_after, timeout,
                                 collective_timeout_s=GROUP_TIMEOUT_S)
    error = waiting['error']
    assert isinstance(error, MissingRankError), repr(error)
    message = str(error)
    if stop_after:
        assert f'rank 1 reached batch {stop_after - 1} but not batch {stop_after} within 1.5 s of rank 0' in message
    else:
        assert 'rank 1 did not reach batch 0, the first of this loop on rank 0, within 1.5 s of rank 0' in message
    assert 'Every rank must call the mixer once for every batch' in message and 'check_loader' in message
    # It waited the bound (the store's wait: up to about a second more on a FileStore), not the group's timeout.
    assert waiting['batch'] == stop_after and timeout <= waiting['waited_s'] < GROUP_TIMEOUT_S
    # The rank that left sat in a barrier; it fails once the waiting rank's error ends that rank's process.
    assert isinstance(stopped['error'], RuntimeError) and not isinstance(stopped['error'], MissingRankError)
    # The late ranks' batches: those of one process mixing the concatenated batch.
    one = _mixer(None)
    for b, (got0, got1) in enumerate(zip(waiting['mixed'], stopped['mixed'], strict=True)):
        want = one(torch.cat([_batches(r, 2)[b][0] for r in range(2)]), torch.cat([_batches(r, 2)[b][1]
                                                                                   for r in range(2)]))
        assert torch.equal(torch.cat([got0[0], got1[0]]), want[0]) and torch.equal(torch.cat([got0[1], got1[1]]),
                                                                                   want[1])


def test_without_a_group_or_in_local_mode_the_check_costs_nothing_and_changes_nothing() -> None:
    x, y = _batches(0, 1)[0]
    for mode in ('global', 'local'):
        checked = Mixer(cutmix_alpha=1.0, mixup_alpha=0.0, num_classes=K, seed=3, mode=mode, arrival_timeout=0.01)
        plain = Mixer(cutmix_alpha=1.0, mixup_alpha=0.0, num_classes=K, seed=3, mode=mode)
        assert all(torch.equal(a, b) for a, b in zip(checked(x, y), plain(x, y), strict=True))


@pytest.mark.parametrize('value', [0, -1.0, float('nan'), float('inf'), True, '5'])
def test_a_bad_arrival_timeout_is_refused_naming_it(value) -> None:
    with pytest.raises(ValueError, match=f'arrival_timeout must be a positive number of seconds or None, got '
                                         f'arrival_timeout={value!r}'):
        Mixer(arrival_timeout=value)
