"""The blend paths (batch and per-sample, in place and out of place, row by row and masked) give the
pixels of the plain formula ``(1 - w) * own + w * partner`` bit for bit: Composer's ``mixup_batch`` for
one weight, a loop over samples for per-sample weights (an independent reference of the same rounding)."""
from __future__ import annotations

import pytest
import torch

from dist_cutmix.draw import MixParams, sample_partners
from dist_cutmix.pixels import apply_mix, paste_crops
from dist_cutmix.pixels_per_sample import gather_box_pixels, paste_box_pixels


def composer_mixup_batch(*args, **kwargs):
    """Composer's ``mixup_batch``, imported when a test (marked ``composer``) calls it."""
    from composer.functional import mixup_batch

    return mixup_batch(*args, **kwargs)

# 3x8x8 uses masks on CPU (small samples), 3x64x64 a row at a time (see functional._use_masks)
SHAPES = [(6, 3, 8, 8), (6, 3, 64, 64)]


def _batch(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _reference(x, indices, boxes, weights):
    """Per sample: the plain two-product formula inside its box, paste at weight 1, own pixels elsewhere."""
    out = x.clone()
    for i, (j, (y0, y1, x0, x1), w) in enumerate(zip(indices.tolist(), boxes.tolist(), weights.tolist(),
                                                      strict=True)):
        if w == 1:
            out[i, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        elif w > 0 and y1 > y0 and x1 > x0:
            out[i, :, y0:y1, x0:x1] = x[i, :, y0:y1, x0:x1] * (1 - w) + x[j, :, y0:y1, x0:x1] * w
    return out


@pytest.mark.composer
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('inplace', [False, True])
def test_batch_mixup_equals_composer_bit_for_bit(shape, dtype, channels_last, inplace):
    x = _batch(shape, dtype, channels_last)
    g = torch.Generator().manual_seed(1)
    for weight in (0.5, 0.1259765625, 2.0**-10, 0.3):  # 0.3 is off the 2**-10 grid: given mixings are used as is
        indices = sample_partners(shape[0], generator=g)
        params = MixParams((0, shape[2], 0, shape[3]), 1 - weight, indices, weight)
        expect = composer_mixup_batch(x, torch.zeros(shape[0]), mixing=weight, indices=indices)[0]
        got = apply_mix(x.clone(), params, inplace=inplace)
        assert torch.equal(got, expect), (weight, (got - expect).abs().max())
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('inplace', [False, True])
def test_batch_blend_in_a_box_equals_the_formula(shape, inplace):
    x = _batch(shape)
    n, _, h, w = shape
    indices = sample_partners(n, generator=torch.Generator().manual_seed(2))
    box = (1, h - 2, 2, w - 1)
    params = MixParams(box, 0.0, indices, 0.375)
    expect = _reference(x, indices, torch.tensor([box] * n), torch.full((n,), 0.375))
    assert torch.equal(apply_mix(x.clone(), params, inplace=inplace), expect)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('inplace', [False, True])
def test_per_sample_blends_and_pastes_equal_the_formula(shape, dtype, inplace):
    from dist_cutmix import MixSpec, sample_mix

    n, _, h, w = shape
    x = _batch(shape, dtype)
    g = torch.Generator().manual_seed(3)
    spec = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.9)
    for _ in range(4):
        p = sample_mix(spec, n, h, w, per_sample=True, generator=g)
        expect = _reference(x, p.indices, p.boxes, p.weights)
        assert torch.equal(apply_mix(x.clone(), p, inplace=inplace), expect)


@pytest.mark.parametrize('shape', SHAPES)
def test_paste_box_pixels_blends_arrivals_as_the_formula(shape):
    n, c, h, w = shape
    x = _batch(shape)
    partner = _batch(shape, seed=5)
    boxes = torch.tensor([[0, h, 0, w], [1, 3, 2, 5], [0, h, 0, w], [2, 4, 0, 3], [0, 0, 0, 0], [0, h, 0, w]])
    weights = torch.tensor([0.25, 1.0, 0.125, 1.0, 0.0, 0.5], dtype=torch.float64)
    rows = torch.tensor([3, 0, 1, 5, 2, 4])
    pixels = gather_box_pixels(partner, torch.arange(n), boxes)
    expect = x.clone()
    for k, (i, (y0, y1, x0, x1), wt) in enumerate(zip(rows.tolist(), boxes.tolist(), weights.tolist(), strict=True)):
        if y1 > y0 and x1 > x0:
            crop = partner[k, :, y0:y1, x0:x1]
            expect[i, :, y0:y1, x0:x1] = crop if wt == 1 else x[i, :, y0:y1, x0:x1] * (1 - wt) + crop * wt
    assert torch.equal(paste_box_pixels(x.clone(), rows, pixels, boxes, weights), expect)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True])
def test_paste_crops_with_a_weight_leaves_the_callers_crops_alone(shape, channels_last):
    n, _, h, w = shape
    x = _batch(shape, channels_last=channels_last)
    crops = _batch(shape, seed=9)[..., 2:h - 1, 1:w - 2].contiguous()
    before = crops.clone()
    got = paste_crops(x, crops, (2, h - 1, 1, w - 2), weight=0.25)
    expect = x.clone()
    expect[..., 2:h - 1, 1:w - 2] = x[..., 2:h - 1, 1:w - 2] * 0.75 + crops * 0.25
    assert torch.equal(got, expect) and torch.equal(crops, before)
