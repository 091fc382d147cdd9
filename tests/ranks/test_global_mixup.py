"""MixUp and timm's switch across real gloo ranks: W ranks equal one process on the concatenated batch and an
independent per-sample loop over the draw, send exactly the bytes their partners need, resume identically,
and fail together on bad input."""
from __future__ import annotations

import time

import pytest
import torch

from dist_cutmix import MixSpec, sample_mix
from dist_cutmix.distributed import BatchMismatchError
from dist_cutmix.mixer import mix_batch_across_group
from dist_cutmix.randomness import batch_generator
from tests.helpers.mix_reference import area, as_draw, exchange_bytes, mix_labels, mix_pixels, owner_of
from tests.helpers.spawn import run_ranks

SEED, C, H, W, K = 4321, 3, 10, 12, 5

SPECS = {
    'mixup': MixSpec.mixup(0.4),
    'switch': MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8),
    'switch_smooth': MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8, label_smoothing=0.1),
}


def _rank_data(rank: int, n: int, kind: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(500 + rank)
    u = torch.rand(n, C, H, W, generator=g)
    x = (u * 256).floor().to(torch.uint8) if dtype == torch.uint8 else (u * 4 - 2).to(dtype)
    if kind == 'index':
        y = torch.randint(0, K, (n,), generator=g)
    elif kind == 'soft':
        y = torch.softmax(torch.randn(n, K, generator=g), 1)
    else:  # float class-probability maps: MixUp blends them
        y = torch.softmax(torch.randn(n, K, H, W, generator=g), 1)
    return x, y


def _concatenated(sizes, kind, dtype):
    xs, ys = zip(*(_rank_data(r, n, kind, dtype) for r, n in enumerate(sizes)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _draw(spec, sizes, batch, per_sample):
    """The group's draw, as every rank makes it: the stream of the group whose lowest rank is 0."""
    return as_draw(sample_mix(spec, sum(sizes), H, W, per_sample=per_sample,
                              generator=batch_generator(SEED, batch, 'group', 0)))


def _mix_on_rank(rank, world, sizes, spec, per_sample, kind, dtype, batches):
    x, y = _rank_data(rank, sizes[rank], kind, dtype)
    out = []
    for batch in batches:
        r = mix_batch_across_group(x, y, seed=SEED, batch=batch, num_classes=K, spec=spec, per_sample=per_sample)
        out.append(dict(input=r.input, target=r.target, partner_target=r.partner_target, lam=r.lam,
                        bytes_sent=r.bytes_sent, cross=r.cross_rank_fraction))
    return out


def _methods(draw, rows):
    """'none', 'mixup' (whole image) or 'cutmix' for the given global rows."""
    return {'none' if area(draw.boxes[g]) == 0 or draw.weights[g] == 0
            else 'mixup' if draw.boxes[g] == (0, H, 0, W) else 'cutmix' for g in rows}


def _crossing(draw, sizes):
    """Global samples whose partner lives on another rank and whose pixels move."""
    owner = owner_of(sizes)
    return [g for g, j in enumerate(draw.indices)
            if owner[j] != owner[g] and area(draw.boxes[g]) > 0 and draw.weights[g] > 0]


def _pick_batch(spec, sizes, per_sample, want):
    """The first batch whose draw has cross-rank traffic and every method in ``want`` among the moving rows."""
    for batch in range(200):
        draw = _draw(spec, sizes, batch, per_sample)
        crossing = _crossing(draw, sizes)
        if crossing and want <= _methods(draw, crossing) | _methods(draw, range(len(draw.indices))):
            return batch, draw
    raise AssertionError(f'no batch in 200 draws {want} across ranks')


# sizes (unequal per rank), spec, per_sample, target kind, dtype, methods the draw must show
CASES = [
    ([3, 5], 'mixup', False, 'index', torch.float32, {'mixup'}),
    ([2, 5, 3, 4], 'mixup', False, 'soft', torch.uint8, {'mixup'}),
    ([4, 1, 6], 'switch_smooth', False, 'index', torch.float32, {'cutmix'}),
    ([4, 1, 6], 'switch_smooth', False, 'soft', torch.float32, {'mixup'}),
    ([3, 6, 2], 'switch', False, 'dense', torch.uint8, {'mixup'}),
    ([5, 3], 'switch', False, 'dense', torch.float32, {'cutmix'}),
    ([3, 2, 4], 'switch_smooth', True, 'index', torch.float32, {'none', 'mixup', 'cutmix'}),
    ([2, 4, 1, 3], 'switch_smooth', True, 'soft', torch.uint8, {'none', 'mixup', 'cutmix'}),
    ([4, 3], 'switch', True, 'dense', torch.float32, {'none', 'mixup', 'cutmix'}),
    ([1, 3, 2, 4], 'mixup', True, 'index', torch.uint8, {'mixup'}),
]


@pytest.mark.parametrize('sizes, spec_name, per_sample, kind, dtype, want', CASES)
def test_w_ranks_equal_one_process_and_a_per_sample_loop(tmp_path, sizes, spec_name, per_sample, kind, dtype, want):
    spec = SPECS[spec_name]
    batch, draw = _pick_batch(spec, sizes, per_sample, want)
    results = [r[0] for r in run_ranks(_mix_on_rank, len(sizes), tmp_path, sizes, spec, per_sample, kind, dtype,
                                       [batch])]
    x_all, y_all = _concatenated(sizes, kind, dtype)
    # 1) one process, no process group, on the concatenated batch: the definition of global mode
    single = mix_batch_across_group(x_all, y_all, seed=SEED, batch=batch, num_classes=K, spec=spec,
                                    per_sample=per_sample)
    mixed = torch.cat([r['input'] for r in results])
    target = torch.cat([r['target'] for r in results])
    assert mixed.dtype == dtype and torch.equal(mixed, single.input) and torch.equal(target, single.target)
    # 2) independent: a per-sample loop over the draw
    assert torch.equal(mixed, mix_pixels(x_all, draw))
    expected = mix_labels(y_all, draw, kind, K, spec.label_smoothing)
    if kind == 'dense':
        assert torch.equal(target, expected)
    else:
        assert target.dtype == torch.float32
        torch.testing.assert_close(target.double(), expected, rtol=0, atol=1e-6)
        assert torch.equal(torch.cat([r['partner_target'] for r in results]),
                           y_all[torch.tensor(draw.indices)])
    lam = torch.cat([torch.as_tensor(r['lam'], dtype=torch.float64).expand(n) for r, n in zip(results, sizes,
                                                                                            strict=True)])
    assert lam.tolist() == draw.lam
    # pixels really crossed ranks: a mixed sample whose partner is elsewhere changed
    crossing = _crossing(draw, sizes)
    assert crossing and all(not torch.equal(mixed[g], x_all[g]) for g in crossing)
    owner = owner_of(sizes)
    cross = sum(owner[j] != owner[g] for g, j in enumerate(draw.indices)) / sum(sizes)
    assert all(r['cross'] == pytest.approx(cross, abs=1e-6) for r in results)
    # bytes: exactly the labels and pixels (box, whole image or none) the partners on other ranks need
    element = x_all.element_size()
    label_bytes = {'index': 8, 'soft': K * 4, 'dense': 0}[kind]
    dense_px = K * 4 if kind == 'dense' else 0
    assert [r['bytes_sent'] for r in results] == exchange_bytes(draw, sizes, C * element, label_bytes, dense_px)


def test_mixup_at_four_ranks_sends_about_a_quarter_of_an_all_gather(tmp_path):
    sizes, spec = [16, 16, 16, 16], SPECS['mixup']
    batch, draw = _pick_batch(spec, sizes, False, {'mixup'})
    results = [r[0] for r in run_ranks(_mix_on_rank, 4, tmp_path, sizes, spec, False, 'index', torch.float32,
                                       [batch])]
    sent = [r['bytes_sent'] for r in results]
    assert sent == exchange_bytes(draw, sizes, C * 4, 8)
    all_gather = sum((len(sizes) - 1) * n * C * H * W * 4 for n in sizes)  # every rank sends its batch to W-1
    ratio = sum(sent) / all_gather
    print(f'MixUp at W=4, 4x16x3x{H}x{W} float32: {sum(sent)} bytes sent, all-gather {all_gather}: ratio {ratio:.3f}')
    assert ratio < 1 / 2


def test_a_resumed_run_mixes_as_the_uninterrupted_one(tmp_path):
    sizes, spec = [3, 5], SPECS['switch_smooth']
    args = (sizes, spec, True, 'index', torch.float32)
    uninterrupted = run_ranks(_mix_on_rank, 2, tmp_path / 'a', *args, [10, 11, 12])
    resumed = run_ranks(_mix_on_rank, 2, tmp_path / 'b', *args, [12])  # fresh ranks, straight to batch 12
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(before[2]['input'], after[0]['input']) and torch.equal(before[2]['target'],
                                                                                  after[0]['target'])
    assert not torch.equal(uninterrupted[0][0]['input'], uninterrupted[0][2]['input'])  # batches do differ


BAD = {
    'shape': 'input (N, 3, 11, 12)',
    'float_index': 'target.long()',
    'int_dense_mixup': 'Use CutMix for index maps',
}


def _bad_input_on_rank(rank, world):
    messages = {}
    for what in BAD:
        x, y = _rank_data(rank, 3, 'dense' if what == 'int_dense_mixup' else 'index', torch.float32)
        if rank == 1:
            if what == 'shape':
                x = torch.rand(3, C, H + 1, W)
            elif what == 'float_index':
                y = torch.tensor([3.0, 1.0, 4.0])
            else:
                y = torch.randint(0, K, (3, H, W))
        start = time.monotonic()
        try:
            mix_batch_across_group(x, y, seed=SEED, batch=0, num_classes=K, spec=SPECS['switch'], per_sample=True)
            messages[what] = None
        except BatchMismatchError as e:
            messages[what] = (str(e), time.monotonic() - start)
    return messages


def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(tmp_path):
    results = run_ranks(_bad_input_on_rank, 3, tmp_path, deadline_s=60, collective_timeout_s=15)
    for what, needle in BAD.items():
        outcomes = [r[what] for r in results]
        assert all(o is not None for o in outcomes), (what, outcomes)
        assert len({o[0] for o in outcomes}) == 1, (what, outcomes)
        message = outcomes[0][0]
        assert needle in message and 'rank 1' in message, message
        assert max(o[1] for o in outcomes) < 10  # raised at once, not after a collective's timeout
