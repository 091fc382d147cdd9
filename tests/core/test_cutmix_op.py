"""The functional core against an independent, per-sample reference and against Composer's own op."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_cutmix import functional as F
from dist_cutmix.draw import Box, sample_beta, sample_partners
from dist_cutmix.functional import cutmix_batch
from dist_cutmix.pixels import apply_mix
from dist_cutmix.randomness import batch_generator
from dist_cutmix.targets import mix_targets
from dist_cutmix.validation import target_kind


def _reference(x: torch.Tensor, indices: torch.Tensor, box: Box) -> torch.Tensor:
    """Per-sample mask blend: own pixels outside the box, the partner's inside."""
    y0, y1, x0, x1 = box
    mask = torch.zeros(x.shape[-2:], dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return torch.stack([torch.where(mask, x[int(j)], x[i]) for i, j in enumerate(indices)]) if len(x) else x.clone()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pixels_come_from_self_outside_box_and_partner_inside():
    x = torch.randn(6, 3, 17, 23)
    y = torch.arange(6)
    mixed, y_perm, lam, bbox = cutmix_batch(x, y, alpha=1.0, generator=_gen(1))
    box = F.box_from_composer(bbox)
    indices = y_perm  # labels are the sample indices
    assert torch.equal(mixed, _reference(x, indices, box))
    y0, y1, x0, x1 = box
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (17 * 23))
    assert not torch.equal(mixed, x) or (y1 - y0) * (x1 - x0) == 0


@pytest.mark.composer
def test_matches_composer_given_the_same_box_and_partners():
    from composer.functional import cutmix_batch as composer_cutmix_batch

    x = torch.randn(5, 3, 12, 9)
    y = torch.randint(0, 10, (5,))
    ours, y_perm, lam, bbox = cutmix_batch(x, y, generator=_gen(3))
    indices = F.sample_params(5, 12, 9, generator=_gen(3)).indices
    theirs, their_y_perm, their_lam, their_bbox = composer_cutmix_batch(x, y, bbox=bbox, indices=indices)
    assert torch.equal(ours, theirs)
    assert torch.equal(y_perm, their_y_perm)
    assert lam == pytest.approx(their_lam)
    assert tuple(int(v) for v in their_bbox) == bbox


@pytest.mark.parametrize('kind', ['index', 'soft'])
def test_targets_are_lambda_own_plus_one_minus_lambda_partner(kind):
    n, c = 7, 5
    labels = torch.randint(0, c, (n,))
    target = labels if kind == 'index' else torch.softmax(torch.randn(n, c), 1)
    params = F.sample_params(n, 10, 10, generator=_gen(4))
    partner = target[params.indices]
    mixed = mix_targets(target, partner, params.lam, params.box, kind=kind, num_classes=c)
    own = torch.eye(c)[labels] if kind == 'index' else target
    other = own[params.indices]
    weight = round(params.lam * 1024) / 1024  # the label weight: λ on a 2**-10 grid
    assert abs(weight - params.lam) <= 2**-11
    torch.testing.assert_close(mixed, weight * own + (1 - weight) * other)
    torch.testing.assert_close(mixed.sum(1), torch.ones(n))


def test_dense_targets_get_the_box_pasted():
    x = torch.randn(4, 3, 9, 11)
    seg = torch.randint(0, 3, (4, 9, 11))
    params = F.sample_params(4, 9, 11, box=(2, 7, 1, 6), generator=_gen())
    mixed = mix_targets(seg, seg[params.indices], params.lam, params.box, kind='dense')
    assert torch.equal(mixed, _reference(seg.unsqueeze(1), params.indices, params.box).squeeze(1))
    assert target_kind(seg, x) == 'dense'


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize('channels_last', [False, True])
def test_dtype_and_layout_are_kept(dtype, channels_last):
    x = (torch.rand(4, 3, 8, 8) * 200).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mixed, y_perm, _, bbox = cutmix_batch(x, torch.arange(4), generator=_gen(5))
    assert mixed.dtype == dtype
    assert mixed.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(mixed, _reference(x, y_perm, F.box_from_composer(bbox)))


def test_inplace_apply_touches_only_the_box_and_keeps_the_tensor():
    x = torch.randn(5, 3, 8, 8).to(memory_format=torch.channels_last)
    expected_src = x.clone()
    params = F.sample_params(5, 8, 8, box=(1, 5, 2, 7), generator=_gen())
    out = apply_mix(x, params, inplace=True)
    assert out is x
    assert torch.equal(out, _reference(expected_src, params.indices, params.box))


def test_input_is_not_modified_by_cutmix_batch():
    x = torch.randn(4, 3, 8, 8)
    before = x.clone()
    cutmix_batch(x, torch.arange(4), alpha=1.0, generator=_gen())
    assert torch.equal(x, before)


def test_alpha_zero_disables_mixing():
    x = torch.randn(4, 3, 8, 8)
    mixed, _, lam, _ = cutmix_batch(x, torch.arange(4), alpha=0.0, generator=_gen())
    assert lam == 1.0
    assert torch.equal(mixed, x)


def test_partners_exclude_self_by_default_and_cover_the_batch():
    for n in range(2, 40):
        for seed in range(5):
            perm = sample_partners(n, generator=_gen(seed))
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any()
    plain = [sample_partners(4, exclude_self=False, generator=_gen(s)) for s in range(200)]
    assert any((p == torch.arange(4)).any() for p in plain)  # the paper's plain permutation keeps self-pairs


def test_length_gives_box_of_that_relative_side():
    params = F.sample_params(2, 40, 20, length=0.5, box=None, generator=_gen(2))
    y0, y1, x0, x1 = params.box
    assert y1 - y0 <= 20 and x1 - x0 <= 10
    # away from the edges the box has exactly the asked-for sides
    for seed in range(50):
        y0, y1, x0, x1 = F.sample_params(2, 40, 20, length=0.5, generator=_gen(seed)).box
        if 0 < y0 and y1 < 40 and 0 < x0 and x1 < 20:
            assert (y1 - y0, x1 - x0) == (20, 10)


def test_same_generator_seed_same_result_different_seed_differs():
    x = torch.randn(8, 3, 16, 16)
    a = cutmix_batch(x, torch.arange(8), generator=batch_generator(1, 5, 'local', 0))
    b = cutmix_batch(x, torch.arange(8), generator=batch_generator(1, 5, 'local', 0))
    c = cutmix_batch(x, torch.arange(8), generator=batch_generator(1, 5, 'local', 1))
    assert torch.equal(a[0], b[0]) and a[2:] == b[2:]
    assert not (torch.equal(a[1], c[1]) and a[3] == c[3])


def test_lambda_follows_beta_alpha_alpha():
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): check the nominal draws.
    for alpha in (0.5, 1.0, 4.0):
        g = _gen(11)
        draws = sample_beta(alpha, 4000, g)
        assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
        assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


@pytest.mark.parametrize(
    'call, match',
    [
        (lambda x, y: cutmix_batch(x, y, alpha=-1.0), 'alpha must be a finite number >= 0, got alpha=-1.0'),
        (lambda x, y: cutmix_batch(x, y, alpha=math.nan), 'alpha must be a finite number >= 0, got alpha=nan'),
        (lambda x, y: cutmix_batch(x, y, length=0.5, bbox=(0, 0, 2, 2)), 'Cannot provide both length and bbox'),
        (lambda x, y: cutmix_batch(x[0], y), r'input must have shape \(N, C, H, W\), got shape \(3, 8, 8\)'),
        (lambda x, y: cutmix_batch([1, 2], y), 'input must be a torch.Tensor'),
        (lambda x, y: cutmix_batch(x, y.tolist()), 'target must be a torch.Tensor, got list'),
        (lambda x, y: cutmix_batch(x, y[:3]), 'target batch size must equal the input batch size 4'),
        (lambda x, y: cutmix_batch(x, y.bool()), r'targets of shape \(N,\) must be integer .*, got torch.bool'),
        (lambda x, y: cutmix_batch(x, y, bbox=(0, 0, 9, 2)), 'bbox must lie inside the 8x8 image'),
    ],
)
def test_bad_input_names_argument_and_value(call, match):
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, y)


def test_index_targets_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r'index targets must lie in \[0, num_classes=3\), got values in \[0, 5\]'):
        mix_targets(torch.tensor([0, 5]), torch.tensor([5, 0]), 0.5, (0, 1, 0, 1), kind='index', num_classes=3)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    alpha=st.floats(0.0, 5.0),
    uniform=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n, c, h, w, alpha, uniform, seed):
    x = torch.randn(n, c, h, w)
    y = torch.arange(n)
    mixed, y_perm, lam, bbox = cutmix_batch(x, y, alpha=alpha, uniform_sampling=uniform, generator=_gen(seed))
    box = F.box_from_composer(bbox)
    y0, y1, x0, x1 = box
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (h * w))
    assert sorted(y_perm.tolist()) == list(range(n))
    if n > 1:
        assert not (y_perm == y).any()
    assert torch.equal(mixed, _reference(x, y_perm, box))
    soft = mix_targets(y, y_perm, lam, box, kind='index', num_classes=max(n, 1))
    assert soft.shape == (n, max(n, 1))
    torch.testing.assert_close(soft.sum(1), torch.ones(n))
