"""MixUp and timm's MixUp/CutMix switch, below the algorithm: the op against Composer's and timm's own code,
the draw's distribution, and every target kind and dtype through ``mix_batch_local``.

Expected values come from Composer (``composer.functional.mixup_batch``), timm (``Mixup`` with its draws
pinned) or the plain loops of :mod:`tests.helpers.mix_reference`, never from the code under test.
"""
from __future__ import annotations

import dataclasses
import math
from unittest import mock

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch

from dist_cutmix import MixSpec, mixup_batch, sample_mix
from dist_cutmix import functional as F
from dist_cutmix.draw import MixParams, PerSampleMixParams
from dist_cutmix.mixer import mix_batch_local
from dist_cutmix.pixels import apply_mix
from dist_cutmix.randomness import batch_generator
from dist_cutmix.targets import mix_targets, mix_targets_per_sample
from tests.helpers.mix_reference import Draw, area, as_draw, mix_labels, mix_pixels


def composer_mixup_batch(*args, **kwargs):
    """Composer's ``mixup_batch``, imported when a test (marked ``composer``) calls it."""
    from composer.functional import mixup_batch

    return mixup_batch(*args, **kwargs)

K = 7
SEED = 2024
# 3x8x8 (192 elements a sample) takes the whole-batch mask path, 3x64x64 (12288) the row-at-a-time path
SMALL, LARGE = (8, 3, 8, 8), (8, 3, 64, 64)


def _images(shape, dtype=torch.float32, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x * 256).floor().to(dtype) if dtype == torch.uint8 else (x * 4 - 2).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- mixup_batch against Composer's


@pytest.mark.composer
@pytest.mark.parametrize('shape', [SMALL, LARGE])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('mixing', [0.3, 0.125, 0.4990234375, 0.0, 1.0, 0.7])
def test_mixup_batch_equals_composers_bit_for_bit(shape, dtype, mixing):
    x = _images(shape, dtype)
    y = torch.arange(shape[0]) % K
    indices = torch.tensor([3, 0, 5, 1, 7, 2, 6, 4])  # 6 a fixed point, as Composer allows
    expected_x, expected_y, expected_m = composer_mixup_batch(x.clone(), y, mixing=mixing, indices=indices)
    out, y_perm, m = mixup_batch(x, y, mixing=mixing, indices=indices)
    assert out.dtype == dtype and torch.equal(out, expected_x)
    assert torch.equal(y_perm, expected_y) and m == expected_m == mixing
    soft = torch.softmax(_images((shape[0], K), torch.float32, seed=1), 1)
    assert torch.equal(mixup_batch(x, soft, mixing=mixing, indices=indices)[1], soft[indices])


@pytest.mark.composer
@pytest.mark.parametrize('shape', [SMALL, LARGE])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('mixing', [0.5, 0.3, 0.0625])
def test_mixup_batch_uint8_rounds_composers_float_result_half_to_even(shape, channels_last, mixing):
    x = _images(shape, torch.uint8, channels_last=channels_last)
    indices = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    float_result, _, _ = composer_mixup_batch(x.contiguous(), torch.zeros(8), mixing=mixing, indices=indices)
    assert float_result.dtype == torch.float32  # Composer promotes uint8 to float
    expected = torch.from_numpy(np.rint(float_result.numpy()).astype(np.uint8))
    out, _, _ = mixup_batch(x, torch.zeros(8), mixing=mixing, indices=indices)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(out.contiguous(), expected)
    if mixing == 0.5:  # the test must see ties: half of them round down to even, half up
        ties = (float_result - float_result.floor()) == 0.5
        assert int(ties.sum()) > 100 and bool((expected[ties] % 2 == 0).all())


@pytest.mark.composer
@pytest.mark.parametrize('shape', [SMALL, LARGE])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixup_batch_half_types_compute_in_float32_and_round_once(shape, dtype):
    x = _images(shape, dtype)
    indices = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    expected = composer_mixup_batch(x.float(), torch.zeros(8), mixing=0.3, indices=indices)[0].to(dtype)
    twice_rounded = composer_mixup_batch(x, torch.zeros(8), mixing=0.3, indices=indices)[0]
    out, _, _ = mixup_batch(x, torch.zeros(8), mixing=0.3, indices=indices)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert not torch.equal(twice_rounded, expected)  # the half-precision formula would differ: the check bites


@pytest.mark.parametrize('shape', [SMALL, LARGE])
@pytest.mark.parametrize('dtype', [torch.float32, torch.uint8, torch.bfloat16])
def test_mixup_batch_keeps_channels_last_and_equals_the_contiguous_result(shape, dtype):
    x = _images(shape, dtype, seed=3)
    indices = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])
    contiguous, _, _ = mixup_batch(x, torch.zeros(8), mixing=0.375, indices=indices)
    out, _, _ = mixup_batch(x.to(memory_format=torch.channels_last), torch.zeros(8), mixing=0.375, indices=indices)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert out.dtype == dtype and torch.equal(out, contiguous)


def test_drawn_mixing_is_composers_min_z_on_the_label_grid():
    x, y = _images(SMALL), torch.arange(8)
    draws = []
    for seed in range(600):
        out, y_perm, m = mixup_batch(x, y, alpha=0.4, generator=torch.Generator().manual_seed(seed))
        draws.append(m)
        assert 0 <= m <= 0.5 and m * 1024 == int(m * 1024)
    m = torch.tensor(draws, dtype=torch.float64)
    # reference: numpy's own Beta draws, folded as Composer folds them
    z = np.random.default_rng(0).beta(0.4, 0.4, size=200_000)
    folded = np.minimum(z, 1 - z)
    se = folded.std() / math.sqrt(len(draws))
    assert abs(float(m.mean()) - folded.mean()) < 4 * se
    assert float((m > 0.25).double().mean()) == pytest.approx(float((folded > 0.25).mean()), abs=0.07)
    # the returned partners and mixing describe the output exactly
    out, y_perm, m = mixup_batch(x, y, alpha=0.4, generator=torch.Generator().manual_seed(5))
    indices = y_perm  # y is arange: the permuted targets are the partners
    assert not bool((indices == torch.arange(8)).any())
    assert torch.equal(out, (1 - m) * x + m * x[indices])


def test_alpha_zero_does_not_mix():
    x = _images(SMALL)
    out, _, m = mixup_batch(x, torch.arange(8), alpha=0.0, generator=torch.Generator().manual_seed(0))
    assert m == 0 and torch.equal(out, x)


@pytest.mark.parametrize('kwargs, name', [
    (dict(alpha=-1.0), 'alpha'), (dict(alpha=float('nan')), 'alpha'), (dict(alpha=float('inf')), 'alpha'),
    (dict(mixing=-0.1), 'mixing'), (dict(mixing=1.5), 'mixing'), (dict(mixing=float('nan')), 'mixing'),
    (dict(mixing=True), 'mixing'),
    (dict(indices=torch.arange(7)), 'indices'), (dict(indices=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])), 'indices'),
    (dict(indices=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])), 'indices'),
])
def test_mixup_batch_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mixup_batch(_images(SMALL), torch.arange(8), generator=torch.Generator().manual_seed(0), **kwargs)


# ----------------------------------------------------------------------------- against timm's Mixup, draws pinned


def _timm_mix(x, y, *, mode, lam, use_cutmix, boxes, smoothing, cutmix_minmax=None):
    """timm's Mixup on a copy of ``x`` with its λ/method draws pinned and its boxes given (their λ corrected)."""
    h, w = x.shape[-2:]
    mix = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=cutmix_minmax, mode=mode,
                           label_smoothing=smoothing, num_classes=K)
    if mode == 'batch':
        mix._params_per_batch = lambda: (lam, use_cutmix)
    else:
        mix._params_per_elem = lambda n: (np.array(lam, dtype=np.float32), np.array(use_cutmix, dtype=bool))
    given = iter(boxes)
    calls = []

    def bbox_and_lam(img_shape, lam, ratio_minmax=None, correct_lam=True, count=None):
        box = next(given)
        calls.append(box)
        return box, 1.0 - area(box) / float(h * w)

    with mock.patch.object(timm_mixup, 'cutmix_bbox_and_lam', bbox_and_lam):
        out, target = mix(x.clone(), y)
    assert calls == list(boxes)  # timm asked for exactly the boxes we pinned
    return out, target


def _flip(n):
    return torch.arange(n).flip(0)


@pytest.mark.parametrize('shape', [(8, 3, 32, 32), (8, 3, 64, 64)])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('branch', ['mixup', 'cutmix'])
def test_batch_mode_equals_timm_with_pinned_draws(shape, smoothing, branch):
    n, _, h, w = shape
    x, y = _images(shape, seed=11), torch.tensor([0, 3, 6, 1, 1, 5, 2, 4])
    if branch == 'mixup':
        lam, box, weight, boxes = 0.6875, (0, h, 0, w), 0.3125, []
    else:  # an area on the 2**-10 grid, so the label weight is λ itself
        box = (4, 4 + h // 2, 2, 2 + w // 4 * 3)
        lam, weight, boxes = 1.0 - area(box) / (h * w), 1.0, [box]
    expected_x, expected_t = _timm_mix(x, y, mode='batch', lam=0.42 if boxes else lam, use_cutmix=bool(boxes),
                                       boxes=boxes, smoothing=smoothing)
    params = MixParams(box=box, lam=lam, indices=_flip(n), weight=weight)
    out = apply_mix(x, params)
    target = mix_targets(y, y[params.indices], params.lam, params.box, kind='index', num_classes=K,
                           smoothing=smoothing, weight=params.weight)
    assert torch.equal(out, expected_x)
    torch.testing.assert_close(target, expected_t, rtol=0, atol=1e-6)
    assert not torch.equal(out, x)


# sample 0, 4 unmixed; 1, 6 MixUp; 2, 5, 7 CutMix; 3 MixUp at a small weight
ELEM_KINDS = ['none', 'mixup', 'cutmix', 'mixup', 'none', 'cutmix', 'mixup', 'cutmix']
ELEM_MIXUP_LAM = {1: 0.6875, 3: 0.9375, 6: 0.125}


def _elem_draw(h, w):
    """timm's per-element draw and ours for the same mixes: boxes with an area on the 2**-10 grid."""
    cut = {2: (0, h // 2, 0, w // 2), 5: (h // 4, h, w // 8, w // 8 + w // 4), 7: (2, 2 + h // 4, w // 2, w)}
    lam, use_cutmix, boxes, weights, ours_lam = [], [], [], [], []
    for i, kind in enumerate(ELEM_KINDS):
        if kind == 'none':
            lam.append(1.0), use_cutmix.append(False), boxes.append((0, 0, 0, 0)), weights.append(0.0)
            ours_lam.append(1.0)
        elif kind == 'mixup':
            lam.append(ELEM_MIXUP_LAM[i]), use_cutmix.append(False), boxes.append((0, h, 0, w))
            weights.append(1.0 - ELEM_MIXUP_LAM[i]), ours_lam.append(ELEM_MIXUP_LAM[i])
        else:
            lam.append(0.5), use_cutmix.append(True), boxes.append(cut[i]), weights.append(1.0)
            ours_lam.append(1.0 - area(cut[i]) / (h * w))
    params = PerSampleMixParams(boxes=torch.tensor(boxes), lam=torch.tensor(ours_lam, dtype=torch.float64),
                               indices=_flip(len(ELEM_KINDS)), weights=torch.tensor(weights, dtype=torch.float64))
    return lam, use_cutmix, [cut[i] for i in sorted(cut)], params


@pytest.mark.parametrize('shape', [(8, 3, 32, 32), (8, 3, 64, 64)])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('inplace', [False, True])
def test_per_sample_equals_timm_elem_mode_with_pinned_draws(shape, smoothing, inplace):
    n, _, h, w = shape
    x, y = _images(shape, seed=12), torch.tensor([0, 3, 6, 1, 1, 5, 2, 4])
    lam, use_cutmix, cut_boxes, params = _elem_draw(h, w)
    expected_x, expected_t = _timm_mix(x, y, mode='elem', lam=lam, use_cutmix=use_cutmix, boxes=cut_boxes,
                                       smoothing=smoothing)
    out = apply_mix(x.clone(), params, inplace=inplace)
    target = mix_targets_per_sample(y, y[params.indices], params.lam, params.boxes, kind='index', num_classes=K,
                                      smoothing=smoothing, weights=params.weights)
    assert torch.equal(out, expected_x)
    torch.testing.assert_close(target, expected_t, rtol=0, atol=1e-6)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])  # unmixed stays, mixed changes


def test_minmax_boxes_follow_timms_rand_bbox_minmax():
    h, w, n, minmax = 40, 30, 20_000, (0.2, 0.7)
    spec = MixSpec(mixup_alpha=0.0, cutmix_minmax=minmax)
    for per_sample in (True, False):
        if per_sample:
            p = sample_mix(spec, n, h, w, per_sample=True, generator=batch_generator(SEED, 0))
            boxes, lam, weights = p.boxes, p.lam, p.weights
        else:
            draws = [sample_mix(spec, 2, h, w, generator=batch_generator(SEED, b)) for b in range(500)]
            boxes = torch.tensor([d.box for d in draws])
            lam = torch.tensor([d.lam for d in draws], dtype=torch.float64)
            weights = torch.tensor([d.weight for d in draws], dtype=torch.float64)
        y0, y1, x0, x1 = boxes.unbind(1)
        sides = {'h': (y1 - y0, int(h * minmax[0]), int(h * minmax[1])),
                 'w': (x1 - x0, int(w * minmax[0]), int(w * minmax[1]))}
        for side, lo, hi in sides.values():
            assert int(side.min()) == lo and int(side.max()) == hi - 1  # [lo, hi), both ends reached
            if per_sample:  # about a thousand draws a side length: each within 30 % of the mean
                counts = torch.bincount(side - lo, minlength=hi - lo).double()
                assert float(counts.min()) > 0.7 * float(counts.mean())
                assert float(counts.max()) < 1.3 * float(counts.mean())
        assert bool(((0 <= y0) & (y1 <= h) & (0 <= x0) & (x1 <= w)).all())
        assert torch.equal(lam, 1 - ((y1 - y0) * (x1 - x0)).double() / (h * w))
        assert bool((weights == 1).all())


def test_minmax_boxes_reach_the_bottom_and_right_edges_as_timms_do():
    h, w, n, minmax = 40, 30, 20_000, (0.2, 0.7)
    p = sample_mix(MixSpec(mixup_alpha=0.0, cutmix_minmax=minmax), n, h, w, per_sample=True,
                   generator=batch_generator(SEED, 1))
    state = np.random.get_state()
    try:
        np.random.seed(0)
        yl, yu, xl, xu = timm_mixup.rand_bbox_minmax((h, w), minmax, count=n)
    finally:
        np.random.set_state(state)
    for ours, theirs in ((p.boxes[:, 1] == h, yu == h), (p.boxes[:, 3] == w, xu == w),
                         (p.boxes[:, 0] == 0, yl == 0), (p.boxes[:, 2] == 0, xl == 0)):
        assert float(ours.double().mean()) == pytest.approx(float(theirs.mean()), abs=0.01)


# ----------------------------------------------------------------------------- the draw's distribution


def _methods(draw: Draw, h: int, w: int) -> list[str]:
    """What each sample got: 'none' (no pixels move), 'mixup' (the whole image) or 'cutmix' (a smaller box at 1).

    A MixUp weight rounds to 1 on the grid for λ < 2**-11; a CutMix box covers the whole image only for a
    nominal λ of exactly 0 (never drawn): a whole-image region is MixUp.
    """
    kinds = []
    for box, weight in zip(draw.boxes, draw.weights, strict=True):
        if area(box) == 0 or weight == 0:
            kinds.append('none')
        elif box == (0, h, 0, w):
            kinds.append('mixup')
        else:
            assert weight == 1, (box, weight)  # a blend is always the whole image
            kinds.append('cutmix')
    return kinds


def _shares(kinds: list[str]) -> dict[str, float]:
    return {k: kinds.count(k) / len(kinds) for k in ('none', 'mixup', 'cutmix')}


@pytest.mark.parametrize('prob, switch_prob', [(0.7, 0.3), (1.0, 0.5), (0.4, 0.8)])
def test_prob_and_switch_prob_shares_per_sample_and_per_batch(prob, switch_prob):
    h = w = 16
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=prob, switch_prob=switch_prob)
    per_sample = _methods(as_draw(sample_mix(spec, 20_000, h, w, per_sample=True, generator=batch_generator(1, 0))),
                          h, w)
    per_batch = []
    for b in range(600):
        kinds = _methods(as_draw(sample_mix(spec, 4, h, w, generator=batch_generator(2, b))), h, w)
        assert len(set(kinds)) == 1  # batch mode: one method for the whole batch
        per_batch.append(kinds[0])
    # a few draws land on an empty box or weight 0 (λ within 2**-11 of 1): 'none' gets ~0.5 % extra
    for kinds, tol in ((per_sample, 0.015), (per_batch, 0.08)):
        shares = _shares(kinds)
        assert shares['none'] == pytest.approx(1 - prob, abs=tol)
        assert shares['cutmix'] == pytest.approx(prob * switch_prob, abs=tol)
        assert shares['mixup'] == pytest.approx(prob * (1 - switch_prob), abs=tol)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.union1d(a, b)
    return float(np.abs(np.searchsorted(np.sort(a), grid, side='right') / len(a)
                        - np.searchsorted(np.sort(b), grid, side='right') / len(b)).max())


def _grid(v: np.ndarray) -> np.ndarray:
    return np.round(v * 1024) / 1024


def test_mixup_weights_follow_composers_fold_and_timms_one_minus_lambda():
    n, h, w = 20_000, 8, 8
    z = np.random.default_rng(123).beta
    # Composer's MixUp: partner weight min(z, 1 - z), z ~ Beta(alpha, alpha): never above 1/2
    folded = as_draw(sample_mix(MixSpec.mixup(0.4), n, h, w, per_sample=True, generator=batch_generator(3, 0)))
    weights = np.array(folded.weights)
    assert set(_methods(folded, h, w)) <= {'mixup', 'none'} and weights.max() <= 0.5
    assert np.array_equal(weights, _grid(weights))
    reference = z(0.4, 0.4, size=n)
    assert _ks(weights, _grid(np.minimum(reference, 1 - reference))) < 0.02
    # timm's switch: a MixUp sample's partner weight is 1 - λ, λ ~ Beta(mixup_alpha, ...), up to 1
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.3, switch_prob=0.5)
    draw = as_draw(sample_mix(spec, n, h, w, per_sample=True, generator=batch_generator(3, 1)))
    mixup = np.array([wt for wt, kind in zip(draw.weights, _methods(draw, h, w), strict=True) if kind == 'mixup'])
    # a weight rounded to 0 on the grid moves nothing and reads as unmixed: compare above 0
    reference = _grid(1 - z(0.3, 0.3, size=n))
    assert mixup.max() == 1 and _ks(mixup, reference[reference > 0]) < 0.03
    lam_mixup = np.array([lm for lm, kind in zip(draw.lam, _methods(draw, h, w), strict=True) if kind == 'mixup'])
    assert np.array_equal(lam_mixup, 1 - mixup)  # λ is exactly the kept weight
    # a CutMix sample's λ is its box's share, the nominal λ ~ Beta(cutmix_alpha) as CutMix alone draws it
    cut = [i for i, kind in enumerate(_methods(draw, h, w)) if kind == 'cutmix']
    lam_cut = np.array([draw.lam[i] for i in cut])
    assert np.array_equal(lam_cut, np.array([1 - area(draw.boxes[i]) / (h * w) for i in cut]))
    alone = F.sample_params_per_sample(n, h, w, alpha=1.0, generator=batch_generator(3, 2)).lam.numpy()
    assert _ks(lam_cut, alone[alone < 1]) < 0.03


@pytest.mark.parametrize('per_sample', [False, True])
def test_one_alpha_zero_gives_only_the_other_method(per_sample):
    h = w = 8
    seen = {'mixup': set(), 'cutmix': set()}
    for b in range(40):
        for only, spec in (('mixup', MixSpec(cutmix_alpha=0.0, mixup_alpha=0.8, prob=0.9)),
                           ('cutmix', MixSpec(cutmix_alpha=1.0, mixup_alpha=0.0, prob=0.9))):
            kinds = _methods(as_draw(sample_mix(spec, 8, h, w, per_sample=per_sample,
                                                generator=batch_generator(4, b))), h, w)
            seen[only] |= set(kinds)
    assert seen == {'mixup': {'mixup', 'none'}, 'cutmix': {'cutmix', 'none'}}
    alpha0 = as_draw(sample_mix(MixSpec(cutmix_alpha=0.0, mixup_alpha=0.0), 8, h, w, per_sample=per_sample,
                                generator=batch_generator(4, 0)))
    assert set(_methods(alpha0, h, w)) == {'none'} and set(alpha0.lam) == {1.0}


@pytest.mark.parametrize('alpha, uniform_sampling', [(1.0, False), (0.3, True), (0.0, False)])
def test_the_composer_style_draws_go_through_the_one_drawing_path(alpha, uniform_sampling):
    spec = MixSpec.cutmix(alpha, uniform_sampling)
    for b in range(5):
        ours = sample_mix(spec, 9, 13, 11, generator=batch_generator(5, b))
        theirs = F.sample_params(9, 13, 11, alpha=alpha, uniform_sampling=uniform_sampling,
                                 generator=batch_generator(5, b))
        assert (ours.box, ours.lam, ours.weight) == (theirs.box, theirs.lam, theirs.weight)
        assert torch.equal(ours.indices, theirs.indices)
        if alpha == 0:  # alpha 0 mixes nothing: an empty box, λ 1, no weight
            assert (ours.box, ours.lam, ours.weight) == ((0, 0, 0, 0), 1.0, 0.0)
        ours = sample_mix(spec, 9, 13, 11, per_sample=True, generator=batch_generator(6, b))
        theirs = F.sample_params_per_sample(9, 13, 11, alpha=alpha, uniform_sampling=uniform_sampling,
                                            generator=batch_generator(6, b))
        assert torch.equal(ours.boxes, theirs.boxes) and torch.equal(ours.lam, theirs.lam)
        assert torch.equal(ours.indices, theirs.indices) and ours.pastes_only


@pytest.mark.parametrize('per_sample', [False, True])
def test_index_label_rows_sum_to_exactly_one_and_smoothing_is_affine(per_sample):
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8)
    smoothed = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8, label_smoothing=0.1)
    x = _images((16, 3, 9, 11), seed=4)
    y = torch.randint(0, K, (16,), generator=torch.Generator().manual_seed(4))
    for b in range(60):
        r = mix_batch_local(x, y, seed=SEED, batch=b, num_classes=K, spec=spec, per_sample=per_sample)
        assert r.target.dtype == torch.float32 and bool((r.target.sum(1) == 1).all())
        assert float(r.target.sum()) == 16.0
        s = mix_batch_local(x, y, seed=SEED, batch=b, num_classes=K, spec=smoothed, per_sample=per_sample)
        assert torch.equal(s.input, r.input)  # smoothing changes labels only, not the draw
        torch.testing.assert_close(s.target.double(), 0.9 * r.target.double() + 0.1 / K, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- every kind and dtype, locally

SPECS = {
    'mixup': MixSpec.mixup(0.4),
    'switch': MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8, switch_prob=0.5),
}


def _local_draw(spec, shape, batch, per_sample):
    n, _, h, w = shape
    return as_draw(sample_mix(spec, n, h, w, per_sample=per_sample,
                              generator=batch_generator(SEED, batch, 'local', 0)))


@pytest.mark.parametrize('shape', [SMALL, LARGE])
@pytest.mark.parametrize('dtype, channels_last', [(torch.float32, False), (torch.float32, True),
                                                  (torch.uint8, True), (torch.bfloat16, False)])
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('spec_name', list(SPECS))
def test_local_pixels_equal_a_per_sample_loop_over_the_draw(shape, dtype, channels_last, per_sample, spec_name):
    spec = SPECS[spec_name]
    x = _images(shape, dtype, seed=5, channels_last=channels_last)
    y = torch.arange(shape[0]) % K
    seen = set()
    for b in range(6):
        draw = _local_draw(spec, shape, b, per_sample)
        seen |= set(_methods(draw, *shape[-2:]))
        expected = mix_pixels(x, draw)
        r = mix_batch_local(x, y, seed=SEED, batch=b, num_classes=K, spec=spec, per_sample=per_sample)
        assert r.input.dtype == dtype and r.input.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(r.input.contiguous(), expected)
        copy = x.clone()
        inplace = mix_batch_local(copy, y, seed=SEED, batch=b, num_classes=K, spec=spec, per_sample=per_sample,
                                  inplace=True)
        assert inplace.input.data_ptr() == copy.data_ptr() and torch.equal(inplace.input, r.input)
        assert torch.equal(inplace.target, r.target)
    assert 'mixup' in seen and (spec_name == 'mixup' or 'cutmix' in seen)  # every branch was exercised


# the image size matters to the target path only for dense maps (masks or a copy a row, as for pixels)
TARGET_CASES = [('index', 0.0, SMALL), ('index', 0.1, SMALL), ('soft', 0.0, SMALL), ('soft', 0.1, SMALL),
                ('binary', 0.0, SMALL), ('dense', 0.0, SMALL), ('dense', 0.0, (8, 3, 48, 48))]


def _targets(kind, n, h, w):
    g = torch.Generator().manual_seed(9)
    if kind == 'index':
        return torch.randint(0, K, (n,), generator=g)
    if kind == 'soft':
        return torch.softmax(torch.randn(n, K, generator=g), 1)
    if kind == 'binary':
        return torch.randint(0, 2, (n,), generator=g).float()
    return torch.softmax(torch.randn(n, K, h, w, generator=g), 1)  # float class-probability maps


@pytest.mark.parametrize('kind, smoothing, shape', TARGET_CASES)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('spec_name', list(SPECS))
def test_local_targets_of_every_kind_equal_the_reference(shape, kind, smoothing, per_sample, spec_name):
    spec = dataclasses.replace(SPECS[spec_name], label_smoothing=smoothing)
    n, _, h, w = shape
    x, y = _images(shape, seed=6), _targets(kind, n, h, w)
    for b in range(4):
        draw = _local_draw(spec, shape, b, per_sample)
        r = mix_batch_local(x, y, seed=SEED, batch=b, num_classes=K, spec=spec, per_sample=per_sample)
        assert r.kind == kind
        expected = mix_labels(y, draw, kind, K, smoothing)
        assert torch.equal(r.partner_target, y[torch.tensor(draw.indices)])
        if kind == 'dense':
            assert r.target.dtype == y.dtype and torch.equal(r.target, expected)
        else:
            assert r.target.dtype == torch.float32
            torch.testing.assert_close(r.target.double(), expected, rtol=0, atol=1e-6)
        inplace = mix_batch_local(x.clone(), y, seed=SEED, batch=b, num_classes=K, spec=spec, per_sample=per_sample,
                                  inplace=True)
        assert torch.equal(inplace.target, r.target)
        lam = torch.as_tensor(r.lam, dtype=torch.float64).expand(n)
        assert lam.tolist() == draw.lam  # the reported λ is the draw's
        for weight, kept in zip(draw.weights, draw.lam, strict=True):
            if 0 < weight < 1:  # a blend: pixels and labels use one weight, on the 2**-10 grid
                assert weight * 1024 == int(weight * 1024) and kept == 1 - weight


@pytest.mark.parametrize('per_sample', [False, True])
def test_cutmix_still_pastes_int_dense_maps(per_sample):
    x, y = _images(SMALL), torch.randint(0, K, (8, 8, 8), generator=torch.Generator().manual_seed(1))
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.0, prob=0.9)
    for b in range(3):
        r = mix_batch_local(x, y, seed=SEED, batch=b, spec=spec, per_sample=per_sample)
        assert r.target.dtype == torch.int64
        assert torch.equal(r.target, mix_labels(y, _local_draw(spec, SMALL, b, per_sample), 'dense'))


@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('spec_name', list(SPECS))
def test_int_dense_maps_with_mixup_raise_naming_the_fix(per_sample, spec_name):
    y = torch.randint(0, K, (8, 8, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r'(?s)torch.int64 class-index maps.*Use CutMix.*one-hot float maps'):
        mix_batch_local(_images(SMALL), y, seed=SEED, batch=0, spec=SPECS[spec_name], per_sample=per_sample)


@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('spec_name', list(SPECS))
def test_float_class_indices_raise_naming_target_long(per_sample, spec_name):
    y = torch.tensor([3.0, 1.0, 0.0, 2.0, 6.0, 1.0, 0.0, 4.0])
    with pytest.raises(ValueError, match=r'(?s)\[0\.0, 6\.0\].*target\.long\(\)'):
        mix_batch_local(_images(SMALL), y, seed=SEED, batch=0, num_classes=K, spec=SPECS[spec_name],
                        per_sample=per_sample)


@pytest.mark.parametrize('kind', ['binary', 'dense'])
@pytest.mark.parametrize('per_sample', [False, True])
def test_smoothing_targets_without_a_class_axis_raises(kind, per_sample):
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, label_smoothing=0.1)
    with pytest.raises(ValueError, match=rf'(?s)label_smoothing.*{kind} targets'):
        mix_batch_local(_images(SMALL), _targets(kind, 8, 8, 8), seed=SEED, batch=0, num_classes=K, spec=spec,
                        per_sample=per_sample)
