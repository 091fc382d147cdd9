"""Global mixing on real gloo ranks equals one process mixing the concatenated batch."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_cutmix import functional as F
from dist_cutmix.distributed import BatchMismatchError, ExchangePlan
from dist_cutmix.draw import sample_partners
from dist_cutmix.mixer import mix_batch_across_group
from dist_cutmix.randomness import batch_generator
from tests.helpers.spawn import RankError, run_ranks

SEED, BATCH, C, H, W, K = 1234, 7, 3, 12, 10, 5


def _rank_data(rank: int, n: int, kind: str, channels_last: bool = False):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, C, H, W, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if kind == 'index':
        y = torch.randint(0, K, (n,), generator=g)
    elif kind == 'soft':
        y = torch.softmax(torch.randn(n, K, generator=g), 1)
    elif kind == 'binary':
        y = torch.randint(0, 2, (n,), generator=g).float()
    else:
        y = torch.randint(0, K, (n, H, W), generator=g)
    return x, y


def _mix_on_rank(rank, world, sizes, kind, mix_target, channels_last, batch=BATCH):
    x, y = _rank_data(rank, sizes[rank], kind, channels_last)
    r = mix_batch_across_group(
        x, y, seed=SEED, batch=batch, num_classes=K, mix_target=mix_target, inplace=channels_last,
    )
    return dict(input=r.input.contiguous(), target=r.target, partner_target=r.partner_target, lam=r.lam,
                box=r.box, partner_rank=r.partner_rank, partner_index=r.partner_index,
                cross=r.cross_rank_fraction, bytes_sent=r.bytes_sent, channels_last=r.input.is_contiguous(
                    memory_format=torch.channels_last))


CASES = [
    ([3, 5], 'index', True),
    ([4, 1, 2], 'soft', True),
    ([2, 6, 3], 'dense', True),
    ([5, 2], 'index', False),  # interpolate_loss: targets stay, partner targets travel
    ([1, 1], 'index', True),  # a per-rank batch of one still mixes
    ([0, 4, 2], 'soft', True),  # a rank with no samples takes part
    ([3, 2], 'binary', True),  # float (N,) targets for BCEWithLogitsLoss: λ·y + (1-λ)·y'
]


@pytest.mark.parametrize('sizes, kind, mix_target', CASES)
def test_w_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, sizes, kind, mix_target):
    world = len(sizes)
    results = run_ranks(_mix_on_rank, world, tmp_path, sizes, kind, mix_target, False)

    xs, ys = zip(*(_rank_data(r, n, kind) for r, n in enumerate(sizes)), strict=True)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    # 1) the same function in one process, no process group: the definition of global mode
    single = mix_batch_across_group(x_all, y_all, seed=SEED, batch=BATCH, num_classes=K, mix_target=mix_target)
    # 2) an independent reference: the same draw, applied by a per-sample mask blend
    params = F.sample_params(sum(sizes), H, W, generator=batch_generator(SEED, BATCH, 'group', 0))
    y0, y1, x0, x1 = params.box
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    ref_input = torch.stack([torch.where(mask, x_all[int(j)], x_all[i]) for i, j in enumerate(params.indices)]) \
        if len(x_all) else x_all

    torch.testing.assert_close(torch.cat([r['input'] for r in results]), single.input, rtol=0, atol=0)
    torch.testing.assert_close(single.input, ref_input, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r['target'] for r in results]), single.target, rtol=0, atol=0)
    if kind != 'dense':
        torch.testing.assert_close(torch.cat([r['partner_target'] for r in results]), y_all[params.indices])
    weight = round(params.lam * 1024) / 1024  # the label weight: λ on a 2**-10 grid
    if kind == 'index' and mix_target:
        ref_t = weight * torch.eye(K)[y_all] + (1 - weight) * torch.eye(K)[y_all[params.indices]]
        torch.testing.assert_close(single.target, ref_t)
        assert float(single.target.sum()) == sum(sizes)  # exactly N: no soft cross-entropy warning
    if kind == 'binary':
        torch.testing.assert_close(single.target, weight * y_all + (1 - weight) * y_all[params.indices])
    if not mix_target:
        assert torch.equal(torch.cat([r['target'] for r in results]), y_all)
    # every rank agrees on box and lambda; partners form one permutation of the global batch
    assert {r['box'] for r in results} == {params.box} and {r['lam'] for r in results} == {params.lam}
    offsets = [sum(sizes[:r]) for r in range(world)]
    partners = torch.cat([torch.tensor(offsets)[r['partner_rank']] + r['partner_index'] for r in results])
    assert torch.equal(partners, params.indices)
    if sum(sizes) > 1:
        assert not (partners == torch.arange(sum(sizes))).any()


def test_channels_last_crops_arrive_intact(tmp_path):
    sizes = [3, 4]
    results = run_ranks(_mix_on_rank, 2, tmp_path, sizes, 'index', True, True)
    xs, ys = zip(*(_rank_data(r, n, 'index') for r, n in enumerate(sizes)), strict=True)
    single = mix_batch_across_group(torch.cat(xs), torch.cat(ys), seed=SEED, batch=BATCH, num_classes=K)
    torch.testing.assert_close(torch.cat([r['input'] for r in results]), single.input, rtol=0, atol=0)
    assert all(r['channels_last'] for r in results)


def test_bytes_sent_are_only_the_cross_rank_crops(tmp_path):
    sizes = [6, 5]
    batch = next(b for b in range(100)
                 if F.sample_params(11, H, W, generator=batch_generator(SEED, b, 'group', 0)).lam < 0.9)
    results = run_ranks(_mix_on_rank, 2, tmp_path, sizes, 'index', True, False, batch)
    owner = torch.cat([r['partner_rank'] for r in results])  # rank holding each sample's partner
    home = torch.cat([torch.full((n,), rank) for rank, n in enumerate(sizes)])
    y0, y1, x0, x1 = results[0]['box']
    row_bytes = C * (y1 - y0) * (x1 - x0) * 4 + 8  # a float32 crop and its int64 label
    assert results[0]['lam'] < 0.9
    for rank, r in enumerate(results):
        sent_away = int(((owner == rank) & (home != rank)).sum())
        assert r['bytes_sent'] == sent_away * row_bytes
    gathered = sum(sizes) * C * H * W * 4  # what all-gathering the global batch would move per rank
    assert max(r['bytes_sent'] for r in results) < gathered


def test_exchange_plan_counts_balance():
    perm = sample_partners(11, generator=torch.Generator().manual_seed(0))
    sizes = [4, 0, 7]
    plans = [ExchangePlan.build(perm, sizes, r) for r in range(3)]
    for src in range(3):
        for dst in range(3):
            assert plans[src].send_counts[dst] == plans[dst].recv_counts[src]


def _mismatch_on_rank(rank, world, what):
    x, y = _rank_data(rank, 3, 'index')
    num_classes = K
    if rank == 1:
        if what == 'shape':
            x = torch.randn(3, C, H + 1, W)
        elif what == 'dtype':
            x = x.double()
        elif what == 'kind':
            y = torch.softmax(torch.randn(3, K), 1)
        elif what == 'num_classes':
            num_classes = K + 1
        elif what == 'ndim':
            x = x[0]
        elif what == 'label':
            y = torch.tensor([0, 1, K + 3])
    try:
        mix_batch_across_group(x, y, seed=SEED, batch=BATCH, num_classes=num_classes)
    except BatchMismatchError as e:
        return str(e)
    return None


@pytest.mark.parametrize('what, needle', [
    ('shape', 'input (N, 3, 13, 10)'),
    ('dtype', 'torch.float64'),
    ('kind', 'soft target'),
    ('num_classes', 'num_classes=6'),
    ('ndim', 'input must have shape (N, C, H, W), got shape (3, 12, 10)'),
    ('label', 'index targets must lie in [0, num_classes=5), got values in [0, 8]'),
])
def test_disagreement_raises_the_same_error_on_every_rank(tmp_path, what, needle):
    start = time.monotonic()
    messages = run_ranks(_mismatch_on_rank, 3, tmp_path, what)
    assert time.monotonic() - start < 20
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1, messages
    assert needle in messages[0] and 'rank 1' in messages[0]


def _die_mid_exchange(rank, world, outdir):
    x, y = _rank_data(rank, 4, 'index')
    dist.barrier()
    if rank == 1:
        os._exit(3)  # gone before the exchange that rank 0 starts
    start = time.monotonic()
    try:
        mix_batch_across_group(x, y, seed=SEED, batch=BATCH, num_classes=K)
        outcome = ('returned', '', time.monotonic() - start)
    except Exception as e:  # noqa: BLE001 - the point is that it raises at all, and soon
        outcome = ('raised', f'{type(e).__name__}: {e}', time.monotonic() - start)
    torch.save(outcome, os.path.join(outdir, 'rank0.outcome'))
    return outcome


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    with pytest.raises(RankError) as info:
        run_ranks(_die_mid_exchange, 2, tmp_path, str(tmp_path), collective_timeout_s=10, deadline_s=60)
    assert 'rank 1 (exit code 3)' in str(info.value)
    assert '1 of 2 ranks failed' in str(info.value)  # rank 0 itself ended cleanly, having caught the error
    status, message, elapsed = torch.load(tmp_path / 'rank0.outcome')
    assert status == 'raised', message
    assert elapsed < 10 + 5, elapsed


def _custom_group_on_rank(rank, world):
    groups = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    mine = groups[0] if rank in (0, 3) else groups[1]
    x = torch.full((2, 1, 4, 4), float(rank))
    y = torch.tensor([rank, rank])
    r = mix_batch_across_group(x, y, seed=SEED, batch=0, group=mine, num_classes=4, alpha=0.0)
    foreign = None
    try:
        mix_batch_across_group(x, y, seed=SEED, batch=0, group=groups[1] if mine is groups[0] else groups[0],
                               num_classes=4)
    except ValueError as e:
        foreign = str(e)
    # a box covering the whole image makes every pixel the partner's
    full = mix_batch_across_group(x, y, seed=SEED, batch=0, group=mine, num_classes=4, mix_target=False)
    return r.lam, full.partner_target.tolist(), foreign


def test_a_user_process_group_limits_partners_to_its_members(tmp_path):
    results = run_ranks(_custom_group_on_rank, 4, tmp_path)
    members = {0: {0, 3}, 3: {0, 3}, 1: {1, 2}, 2: {1, 2}}
    for rank, (lam, partner_labels, foreign) in enumerate(results):
        assert lam == 1.0
        assert set(partner_labels) <= members[rank]
        assert foreign is not None and 'not a member of process_group' in foreign


def test_one_image_per_rank_with_an_odd_crop_area(tmp_path):
    # One row per rank and an odd box area: the received label bytes start at an offset that is not a
    # multiple of 8, the case that once broke unpacking the single exchange buffer.
    def odd(b):
        y0, y1, x0, x1 = F.sample_params(2, H, W, generator=batch_generator(SEED, b, 'group', 0)).box
        return (y1 - y0) * (x1 - x0) % 2 == 1
    batch = next(b for b in range(200) if odd(b))
    results = run_ranks(_mix_on_rank, 2, tmp_path, [1, 1], 'index', True, False, batch)
    xs, ys = zip(*(_rank_data(r, 1, 'index') for r in range(2)), strict=True)
    single = mix_batch_across_group(torch.cat(xs), torch.cat(ys), seed=SEED, batch=batch, num_classes=K)
    torch.testing.assert_close(torch.cat([r['input'] for r in results]), single.input, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r['target'] for r in results]), single.target, rtol=0, atol=0)
    assert [int(r['partner_rank']) for r in results] == [1, 0]


def test_exchange_plan_delivers_each_partner_in_one_process():
    # all_to_all_single simulated by hand: rank d receives, from each rank s in order, the rows s
    # sends to d; recv_index must then put partner perm[g] at each local destination g.
    sizes = [3, 0, 5, 4]
    perm = sample_partners(sum(sizes), generator=torch.Generator().manual_seed(3))
    plans = [ExchangePlan.build(perm, sizes, r) for r in range(len(sizes))]
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    sent = []  # per source rank: the global indices it sends, split by destination rank
    for s, plan in enumerate(plans):
        rows = (offsets[s] + plan.send_order).tolist()
        cuts = torch.tensor([0, *plan.send_counts]).cumsum(0).tolist()
        sent.append([rows[cuts[d]:cuts[d + 1]] for d in range(len(sizes))])
    for d, plan in enumerate(plans):
        arrived = torch.tensor([g for s in range(len(sizes)) for g in sent[s][d]], dtype=torch.long)
        local = arrived.index_select(0, plan.recv_index) if len(arrived) else arrived
        assert torch.equal(local, perm[offsets[d]:offsets[d] + sizes[d]])
        assert torch.equal(plan.partners, perm[offsets[d]:offsets[d] + sizes[d]])


# ---------------------------------------------------------------------------- MixUp and MixUpCutMix

MISMATCHES = ['shape', 'dtype', 'kind', 'num_classes', 'ndim', 'label']


def _spec_mismatches_on_rank(rank, world):
    """Every mismatch of :func:`_mismatch_on_rank`, mixed as MixUp and as MixUpCutMix (per sample, smoothed)."""
    from dist_cutmix.spec import MixSpec

    specs = {'mixup': (MixSpec.mixup(1.0), False), 'mixupcutmix': (MixSpec(mixup_alpha=0.8, label_smoothing=0.1), True)}
    out = {}
    for name, (spec, per_sample) in specs.items():
        for what in MISMATCHES:
            x, y = _rank_data(rank, 3, 'index')
            num_classes = K
            if rank == 1:
                x, y, num_classes = {
                    'shape': (torch.randn(3, C, H + 1, W), y, K), 'dtype': (x.double(), y, K),
                    'kind': (x, torch.softmax(torch.randn(3, K), 1), K), 'num_classes': (x, y, K + 1),
                    'ndim': (x[0], y, K), 'label': (x, torch.tensor([0, 1, K + 3]), K),
                }[what]
            try:
                mix_batch_across_group(x, y, seed=SEED, batch=BATCH, num_classes=num_classes, spec=spec,
                                       per_sample=per_sample)
                out[(name, what)] = None
            except BatchMismatchError as e:
                out[(name, what)] = str(e)
    return out


def test_mixup_and_mixupcutmix_disagreement_raises_the_same_error_on_every_rank(tmp_path):
    needles = dict(shape='input (N, 3, 13, 10)', dtype='torch.float64', kind='soft target', num_classes='num_classes=6',
                   ndim='input must have shape (N, C, H, W), got shape (3, 12, 10)',
                   label='index targets must lie in [0, num_classes=5), got values in [0, 8]')
    start = time.monotonic()
    results = run_ranks(_spec_mismatches_on_rank, 3, tmp_path)
    assert time.monotonic() - start < 60  # a timeout would take 30 s a case: none hung
    for name in ('mixup', 'mixupcutmix'):
        for what in MISMATCHES:
            messages = [r[(name, what)] for r in results]
            assert all(m is not None for m in messages), (name, what, messages)
            assert len(set(messages)) == 1, (name, what, messages)
            assert needles[what] in messages[0] and 'rank 1' in messages[0], (name, what, messages[0])
