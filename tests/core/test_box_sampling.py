"""Both box samplers (one box per batch, one per sample) place and size boxes as the documented rule does
(Composer's ``_rand_bbox``), pixel by pixel, with ``H != W``: a far edge clipped one short, a centre drawn over
the wrong axis, one uniform draw reused for both centres, ``alpha`` ignored, or the enlarged range of
``uniform_sampling`` cut short, all change how often some pixel is cut.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.randomness import batch_generator

H, W = 10, 15  # unequal sides: an axis mixed up shows


def _reference_boxes(lam: np.ndarray, uniform: bool, rng: np.random.Generator) -> np.ndarray:
    """The documented rule, written out here: sides ``int(H * sqrt(1 - λ))`` by ``int(W * sqrt(1 - λ))``, centre
    uniform over the image's integer rows and columns (or the range enlarged by half a side each way), clipped;
    rows ``(y0, y1, x0, x1)``."""
    cut_h = (H * np.sqrt(1 - lam)).astype(np.int64)
    cut_w = (W * np.sqrt(1 - lam)).astype(np.int64)
    if uniform:
        cy = rng.integers(-cut_h // 2, H + cut_h // 2)
        cx = rng.integers(-cut_w // 2, W + cut_w // 2)
    else:
        cy, cx = rng.integers(0, H, len(lam)), rng.integers(0, W, len(lam))
    return np.stack([np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H),
                     np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)], axis=1)


@pytest.mark.composer
def test_the_reference_rule_is_composers_box():
    from composer.algorithms.cutmix.cutmix import _rand_bbox

    for lam in (0.0, 0.13, 0.5, 0.77, 0.99):
        for cy in range(-3, H + 3):
            for cx in (-2, 0, 7, W - 1, W + 2):
                # Composer calls _rand_bbox(H, W) and slices its first and third entries on the height axis
                a, b, c, d = _rand_bbox(H, W, lam, cx=cy, cy=cx)
                cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
                mine = (np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H),
                        np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W))
                assert mine == (a, c, b, d)


def _coverage(boxes: torch.Tensor) -> torch.Tensor:
    """How often each pixel lies inside a box: an ``(H, W)`` map of frequencies."""
    boxes = torch.as_tensor(boxes)
    rows, cols = torch.arange(H), torch.arange(W)
    in_y = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])).double()
    in_x = ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])).double()
    return torch.einsum('kh,kw->hw', in_y, in_x) / len(boxes)


def _assert_same_coverage(ours: torch.Tensor, n_ours: int, ref: torch.Tensor, n_ref: int, what: str) -> None:
    """Every pixel is cut as often as under the reference, within 5 standard errors of the difference."""
    p = ((ours * n_ours + ref * n_ref) / (n_ours + n_ref)).clamp(1e-3, 1 - 1e-3)
    z = (ours - ref).abs() / (p * (1 - p) * (1 / n_ours + 1 / n_ref)).sqrt()
    worst = divmod(int(z.argmax()), W)
    assert float(z.max()) < 5, f'{what}: pixel {worst} cut {float(ours[worst]):.3f} of the time, ' \
                               f'reference {float(ref[worst]):.3f}'


@pytest.mark.parametrize('uniform', [False, True])
@pytest.mark.parametrize('alpha', [0.4, 2.0])
def test_both_samplers_cut_each_pixel_as_often_as_the_documented_rule(alpha, uniform):
    rng = np.random.default_rng(int(alpha * 10) + uniform)
    n_ref = 60_000
    ref = _coverage(_reference_boxes(rng.beta(alpha, alpha, n_ref), uniform, rng))
    # one box per sample, all drawn at once (λ drawn inside)
    n_per = 60_000
    per = F.sample_params_per_sample(n_per, H, W, alpha=alpha, uniform_sampling=uniform,
                                     generator=batch_generator(3, int(alpha * 10) + uniform))
    _assert_same_coverage(_coverage(per.boxes), n_per, ref, n_ref, f'per-sample, alpha={alpha}, uniform={uniform}')
    # one box per batch: the batch sampler's λ and box, one draw per batch
    n_batch = 3000
    g = batch_generator(4, int(alpha * 10) + uniform)
    boxes = [F.sample_params(2, H, W, alpha=alpha, uniform_sampling=uniform, generator=g).box for _ in range(n_batch)]
    _assert_same_coverage(_coverage(torch.tensor(boxes)), n_batch, ref, n_ref,
                          f'batch, alpha={alpha}, uniform={uniform}')
