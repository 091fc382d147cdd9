"""The crop exchange on 3 and 4 gloo ranks with unequal batches, where ranks send and receive unequal counts.

With two ranks, or equal traffic both ways, each rank sends a peer as many rows as it receives from it,
so swapping the send and receive split sizes of the ``all_to_all_single`` changes nothing. Here every
case is checked, inside the test, to move crops (λ < 1) and to have some rank pair whose traffic is
uneven, in rows (batch mode) or in bytes (per-sample mode), before its result is compared with one
process mixing the concatenated batch and with a plain loop over the partners and boxes.
"""
from __future__ import annotations

import pytest
import torch

from dist_cutmix.mixer import mix_batch_across_group
from tests.helpers.spawn import run_ranks

SEED, C, K = 2024, 3, 5


def _rank_data(rank: int, n: int, kind: str, hw: tuple[int, int], case: int):
    g = torch.Generator().manual_seed(1000 * case + 100 + rank)
    x = torch.randn(n, C, *hw, generator=g)
    y = {'index': lambda: torch.randint(0, K, (n,), generator=g),
         'soft': lambda: torch.softmax(torch.randn(n, K, generator=g), 1),
         'dense': lambda: torch.randint(0, K, (n, *hw), generator=g)}[kind]()
    return x, y


def _global_batch(sizes, kind, hw, case):
    xs, ys = zip(*(_rank_data(r, n, kind, hw, case) for r, n in enumerate(sizes)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _traffic(perm: torch.Tensor, sizes: list[int], weight: torch.Tensor) -> torch.Tensor:
    """``t[s, d]``: what rank ``s`` sends rank ``d`` (the summed ``weight`` of the destinations ``g`` on
    ``d`` whose partner ``perm[g]`` lives on ``s``), from the permutation alone."""
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    t = torch.zeros(len(sizes), len(sizes), dtype=torch.float64)
    t.index_put_((owner[perm], owner), weight.double(), accumulate=True)
    return t


def _uneven(t: torch.Tensor) -> bool:
    """Some rank sends a peer another amount than it receives from that peer."""
    off = ~torch.eye(len(t), dtype=torch.bool)
    return bool(((t != t.T) & off & ((t > 0) | (t.T > 0))).any())


def _areas(box: torch.Tensor) -> torch.Tensor:
    return (box[:, 1] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 2]).clamp(min=0)


def _pick_batch(sizes, kind, hw, per_sample, case) -> int:
    """The first batch index whose draw moves crops over uneven traffic: the case the test is about.

    Picked with the one-process run of the same function, so a change of the draw picks another batch
    instead of quietly testing an easy one; the test then checks the ranks' own draws again.
    """
    x, y = _global_batch(sizes, kind, hw, case)
    for b in range(400):
        r = mix_batch_across_group(x, y, seed=SEED, batch=b, num_classes=K, per_sample=per_sample)
        perm = r.partner_index
        rows_uneven = _uneven(_traffic(perm, sizes, torch.ones(len(perm))))
        if per_sample:
            if rows_uneven and _uneven(_traffic(perm, sizes, _areas(r.box))):
                return b
        elif r.lam < 1 and rows_uneven:
            return b
    raise AssertionError(f'no batch in 400 draws moves crops over uneven traffic for sizes {sizes}')


def _mix_on_rank(rank, world, cases):
    out = []
    for c, (sizes, kind, hw, per_sample, batch) in enumerate(cases):
        x, y = _rank_data(rank, sizes[rank], kind, hw, c)
        r = mix_batch_across_group(x, y, seed=SEED, batch=batch, num_classes=K, per_sample=per_sample)
        out.append(dict(input=r.input, target=r.target, partner_target=r.partner_target, lam=r.lam, box=r.box,
                        partner_rank=r.partner_rank, partner_index=r.partner_index))
    return out


def _loop_reference(x, y, kind, perm, boxes, lam):
    """Sample ``i`` takes partner ``perm[i]``'s pixels in box ``i``; targets by the documented formula."""
    mixed, target = x.clone(), y.clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        mixed[i, :, y0:y1, x0:x1] = x[int(perm[i]), :, y0:y1, x0:x1]
        if kind == 'dense':
            target[i, y0:y1, x0:x1] = y[int(perm[i]), y0:y1, x0:x1]
    if kind == 'dense':
        return mixed, target
    weight = (torch.round(lam * 1024) / 1024).float()[:, None]  # the label weight: λ on a 2**-10 grid
    own, other = (torch.eye(K)[y], torch.eye(K)[y[perm]]) if kind == 'index' else (y, y[perm])
    return mixed, weight * own + (1 - weight) * other


CASES = {
    3: [([5, 2, 3], 'index', (9, 11), False), ([5, 2, 3], 'soft', (9, 11), False),
        ([2, 6, 3], 'dense', (9, 11), False),
        ([5, 2, 3], 'index', (9, 11), True), ([4, 1, 5], 'soft', (9, 11), True),
        ([2, 6, 3], 'dense', (9, 11), True),
        ([3, 1, 4], 'dense', (60, 60), True)],  # crops of 3x60x60 images take the per-crop copy path
    4: [([4, 1, 6, 2], 'index', (8, 12), False), ([3, 5, 1, 2], 'soft', (8, 12), False),
        ([1, 4, 2, 5], 'dense', (8, 12), False),
        ([4, 1, 6, 2], 'index', (8, 12), True), ([3, 5, 1, 2], 'soft', (8, 12), True),
        ([1, 4, 2, 5], 'dense', (8, 12), True)],
}


@pytest.mark.parametrize('world', [3, 4])
def test_uneven_exchange_equals_one_process_in_batch_and_per_sample_modes(tmp_path, world):
    cases = [(sizes, kind, hw, per_sample, _pick_batch(sizes, kind, hw, per_sample, c))
             for c, (sizes, kind, hw, per_sample) in enumerate(CASES[world])]
    results = run_ranks(_mix_on_rank, world, tmp_path, cases, deadline_s=60)
    for c, (sizes, kind, hw, per_sample, batch) in enumerate(cases):
        what = f'case {c}: sizes {sizes}, {kind}, per_sample={per_sample}, batch {batch}'
        got = [r[c] for r in results]
        offsets = torch.tensor([sum(sizes[:r]) for r in range(world)])
        perm = torch.cat([offsets[g['partner_rank']] + g['partner_index'] for g in got])
        n = sum(sizes)
        assert sorted(perm.tolist()) == list(range(n)), what
        if per_sample:
            boxes, lam = torch.cat([g['box'] for g in got]), torch.cat([g['lam'] for g in got])
            # crops are cut with their destination's box: the bytes must be uneven too
            assert _uneven(_traffic(perm, sizes, _areas(boxes))), what
        else:
            assert len({g['box'] for g in got}) == 1 and len({g['lam'] for g in got}) == 1, what
            boxes, lam = torch.tensor([got[0]['box']] * n), torch.full((n,), got[0]['lam'], dtype=torch.float64)
        # the case is the one the test is about: crops move, and some rank pair's row counts are uneven
        assert bool((lam < 1).any()) and _uneven(_traffic(perm, sizes, torch.ones(n))), what

        x, y = _global_batch(sizes, kind, hw, c)
        single = mix_batch_across_group(x, y, seed=SEED, batch=batch, num_classes=K, per_sample=per_sample)
        assert torch.equal(single.partner_index, perm), what
        ref_input, ref_target = _loop_reference(x, y, kind, perm, boxes, lam)
        mixed, target = torch.cat([g['input'] for g in got]), torch.cat([g['target'] for g in got])
        assert torch.equal(mixed, single.input) and torch.equal(mixed, ref_input), what
        assert torch.equal(target, single.target), what
        torch.testing.assert_close(target, ref_target, rtol=0, atol=1e-6, msg=what)
        if kind != 'dense':
            assert torch.equal(torch.cat([g['partner_target'] for g in got]), y[perm]), what
