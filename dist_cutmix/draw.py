"""The one drawing path: partners, method, region and weight of every sample, from a :class:`MixSpec`.

:func:`sample_mix` is the only function that turns a spec and a generator into a mix; everything it
draws comes from the explicit ``torch.Generator`` (and so, through :mod:`dist_cutmix.randomness`, from
``(seed, batch, stream)``): every rank of a group draws the whole global batch's mix identically, with
no collective. The drawn mix is a frozen :class:`MixParams` (one region and weight for the batch) or
:class:`PerSampleMixParams` (one per sample), which the pixel, exchange and target steps apply.

Two numbers describe a sample's mix: ``lam``, the share of the sample that stays its own (and the weight
of its own label), and ``weight``, the partner's weight inside the region (1 pastes, as CutMix; below 1
blends, as MixUp). Label weights are ``lam`` on a ``2**-10`` grid (:func:`on_label_grid`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from dist_cutmix.spec import MixSpec

__all__ = [
    'LABEL_GRID_BITS',
    'Box',
    'LamLike',
    'MixParams',
    'PerSampleMixParams',
    'box_areas',
    'kept_share',
    'on_label_grid',
    'sample_beta',
    'sample_boxes',
    'sample_boxes_minmax',
    'sample_mix',
    'sample_pairs',
    'sample_partners',
]

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: rows ``y0:y1`` (dim -2) and columns ``x0:x1`` (dim -1)."""

LamLike = Union[float, Tensor]
"""One λ for the batch (a float), or one per sample (a ``(N,)`` tensor)."""

LABEL_GRID_BITS = 10
"""Label weights are multiples of ``2**-LABEL_GRID_BITS`` (see :func:`on_label_grid`)."""


@dataclass(frozen=True)
class MixParams:
    """One mix of a batch: every sample takes its partner's pixels in the same region, at the same weight.

    Attributes:
        box: ``(y0, y1, x0, x1)``, already clipped to the image; the whole image for MixUp, empty when unmixed.
        lam: the share of each sample that stays its own: ``1 - weight * box area / (H * W)``.
        indices: ``indices[i]`` is the partner whose region sample ``i`` receives.
        weight: the partner's weight inside the box: 1 pastes (CutMix); below 1 blends
            ``(1 - weight) * own + weight * partner`` there (MixUp).
    """

    box: Box
    lam: float
    indices: Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class PerSampleMixParams:
    """One mix per sample: every sample its own region, weight and λ.

    Attributes:
        boxes: ``(N, 4)`` int64 ``(y0, y1, x0, x1)`` per sample, clipped to the image.
        lam: ``(N,)`` float64, each sample's kept share ``1 - weight_i * area_i / (H * W)``.
        indices: ``indices[i]`` is the partner whose pixels inside ``boxes[i]`` sample ``i`` receives.
        weights: ``(N,)`` float64, each partner's weight inside its box (see :class:`MixParams`);
            ``None`` means 1 everywhere (CutMix).
    """

    boxes: Tensor
    lam: Tensor
    indices: Tensor
    weights: Optional[Tensor] = None

    @property
    def pastes_only(self) -> bool:
        """True when every nonempty box is pasted at weight 1 (plain CutMix): no blending needed."""
        return self.weights is None or bool(((self.weights == 1) | (box_areas(self.boxes) == 0)).all())


Params = Union[MixParams, PerSampleMixParams]


# ----------------------------------------------------------------------------- geometry and the label grid


def box_areas(boxes: Tensor) -> Tensor:
    """The area of each ``(y0, y1, x0, x1)`` box of a ``(K, 4)`` tensor (an inverted box has none)."""
    return (boxes[:, 1] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 2]).clamp(min=0)


def kept_share(boxes: Tensor, height: int, width: int, weights: Optional[Tensor] = None) -> Tensor:
    """Each sample's exact kept share ``1 - weight * box area / (height * width)``, as float64."""
    areas = box_areas(boxes).to(torch.float64)
    return 1.0 - (areas if weights is None else weights * areas) / max(height * width, 1)


def on_label_grid(lam: LamLike) -> LamLike:
    """``lam`` rounded to the nearest multiple of ``2**-10`` (half to even): the weight of a sample's own label.

    The pixel share λ is ``1 - area / (H * W)``, rarely a short binary fraction, and
    ``λ·onehot + (1-λ)·onehot`` then sums to a rounding step under ``N`` over a float32 batch
    about one batch in seven: Composer's ``soft_cross_entropy`` warns ("Some targets have less
    than 1 total probability") and rescales the loss. With a dyadic λ every target entry is a
    multiple of ``2**-10``, each row sums to exactly 1 and the batch to exactly ``N`` (exact in
    float32 for up to ``2**14`` samples a loss call). The label weight differs from the pixel
    share by at most ``2**-11``; MixUp's blend weights are drawn on the grid, so there the two agree.
    """
    scale = 1 << LABEL_GRID_BITS
    if isinstance(lam, Tensor):
        return torch.round(lam * scale) / scale
    return round(lam * scale) / scale


# ----------------------------------------------------------------------------- samplers


def sample_beta(alpha: float, size: int, generator: torch.Generator) -> Tensor:
    """``size`` draws from Beta(alpha, alpha) (float64, on the host), by numpy seeded from the explicit torch generator.

    The one Beta draw of the package: torch has no seeded Beta sampler of its own on every device.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device='cpu').item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=size))


def sample_partners(n: int, *, exclude_self: bool = True, generator: torch.Generator) -> Tensor:
    """A random permutation of ``range(n)``; with ``exclude_self`` and ``n > 1`` it has no fixed point.

    A fixed point (a sample mixed with itself) is wasted compute. The draw is one ``randperm``;
    its fixed points, if any, are then moved: two or more are rotated among themselves, a single
    one swaps partners with a random other sample.
    """
    perm = torch.randperm(n, generator=generator, device='cpu')
    if not exclude_self or n < 2:
        return perm
    fixed = (perm == torch.arange(n, device='cpu')).nonzero().flatten()
    if len(fixed) >= 2:
        perm[fixed] = perm[fixed.roll(-1)]
    elif len(fixed) == 1:
        f = int(fixed[0])
        other = (f + 1 + int(torch.randint(0, n - 1, (1,), generator=generator, device='cpu'))) % n
        perm[f], perm[other] = perm[other].clone(), perm[f].clone()
    return perm


def sample_pairs(n: int, *, generator: torch.Generator) -> Tensor:
    """Partners that pair up: a random perfect matching of ``range(n)``, ``partners[partners[i]] == i``.

    One ``randperm`` laid out as pairs ``(p[0], p[1]), (p[2], p[3]), ...``; in an odd batch its last
    sample is its own partner (timm's ``mode='pair'`` mixes ``i`` with ``N - 1 - i``; here the matching is drawn).
    """
    perm = torch.randperm(n, generator=generator, device='cpu')
    half = n // 2
    first, second = perm[0:2 * half:2], perm[1:2 * half:2]
    partners = torch.arange(n, device='cpu')
    partners[first], partners[second] = second, first
    return partners


def sample_boxes(lam: Tensor, height: int, width: int, *, uniform_sampling: bool = False, exact_sides: bool = False,
                 generator: torch.Generator) -> Tensor:
    """One box per λ of ``lam``, covering about ``1 - λ`` of the image, clipped at the edges: ``(K, 4)`` int64.

    The distribution of Composer's (and the paper's) ``_rand_bbox``: sides ``2 * (int(H * sqrt(1 - λ)) // 2)``
    by the same for ``W``, centred uniformly on the image or, with ``uniform_sampling``, on a range enlarged
    by half a side each way so that every pixel is equally likely to be cut. With ``exact_sides`` the sides
    are ``int(H * sqrt(1 - λ))`` before clipping, odd ones included (timm's ``rand_bbox``: ``cy - cut // 2``
    to ``cy + (cut + 1) // 2``).
    """
    ratio = torch.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).long(), (width * ratio).long()  # int() of a non-negative float: floor
    if uniform_sampling:
        low_y, high_y = torch.div(-cut_h, 2, rounding_mode='floor'), height + cut_h // 2
        low_x, high_x = torch.div(-cut_w, 2, rounding_mode='floor'), width + cut_w // 2
    else:
        low_y, high_y = torch.zeros_like(cut_h), torch.full_like(cut_h, height)
        low_x, high_x = torch.zeros_like(cut_w), torch.full_like(cut_w, width)
    u = torch.rand(2, lam.shape[0], dtype=torch.float64, generator=generator, device='cpu')
    cy = low_y + (u[0] * (high_y - low_y)).long()
    cx = low_x + (u[1] * (high_x - low_x)).long()
    up_h, up_w = ((cut_h + 1) // 2, (cut_w + 1) // 2) if exact_sides else (cut_h // 2, cut_w // 2)
    return torch.stack([
        (cy - cut_h // 2).clamp(0, height), (cy + up_h).clamp(0, height),
        (cx - cut_w // 2).clamp(0, width), (cx + up_w).clamp(0, width),
    ], dim=1)


def sample_boxes_minmax(n: int, height: int, width: int, minmax: tuple[float, float],
                        generator: torch.Generator) -> Tensor:
    """timm's ``rand_bbox_minmax``: sides uniform in ``[int(lo * side), int(hi * side))``, corner uniform inside."""
    u = torch.rand(4, n, dtype=torch.float64, generator=generator, device='cpu')
    sides = []
    for k, size in enumerate((height, width)):
        lo, hi = int(size * minmax[0]), int(size * minmax[1])
        fixed = torch.full((n,), lo, dtype=torch.long, device='cpu')
        sides.append(lo + (u[k] * (hi - lo)).long() if hi > lo else fixed)
    cut_h, cut_w = sides
    y0 = (u[2] * (height - cut_h + 1)).long()  # timm: randint(0, H - cut_h + 1), the far edge included
    x0 = (u[3] * (width - cut_w + 1)).long()
    return torch.stack([y0, y0 + cut_h, x0, x0 + cut_w], dim=1)


def sample_mix(
    spec: MixSpec,
    n: int,
    height: int,
    width: int,
    *,
    per_sample: bool = False,
    exclude_self: bool = True,
    generator: torch.Generator,
) -> Params:
    """Draw one batch's mix: partners, and per batch (or per sample) the method, region and weight.

    In this order, from ``generator``: the partners (:func:`sample_partners`, or :func:`sample_pairs` for
    ``spec.pairs``); two uniforms per draw (mixed
    at all with probability ``prob``; CutMix rather than MixUp with probability ``switch_prob``); CutMix's λ
    from Beta(cutmix_alpha); MixUp's from Beta(mixup_alpha); the boxes. A draw that cannot happen (an alpha
    of 0) consumes nothing, so a plain CutMix spec draws partners, uniforms, λ and boxes only.

    Args:
        spec: what may be drawn.
        n: batch size (the global batch size when mixing across ranks).
        height: image height ``H``.
        width: image width ``W``.
        per_sample: one draw per sample (timm's ``mode='elem'``) instead of one per batch.
        exclude_self: never pair a sample with itself when ``n > 1``.
        generator: the only source of randomness.

    Returns:
        :class:`MixParams` (one region and weight for the batch) or :class:`PerSampleMixParams` (one per
        sample). ``lam`` is each sample's kept share, ``1 - weight * area / (H * W)``: for MixUp on the
        ``2**-10`` label grid; for CutMix with ``spec.correct_lam=False``, the drawn λ instead.

    Raises:
        ValueError: for ``spec.pairs`` without ``per_sample``.

    Example:
        >>> from dist_cutmix.randomness import batch_generator
        >>> params = sample_mix(MixSpec.cutmix(1.0), 8, 32, 32, generator=batch_generator(0, 0))
        >>> params.weight, 0.0 <= params.lam <= 1.0
        (1.0, True)
    """
    if spec.pairs and not per_sample:
        raise ValueError("MixSpec(pairs=True) gives each pair its own draw: it needs per_sample=True (timm's "
                         "mode='pair'); a batch-wide draw takes partners from a permutation")
    indices = sample_pairs(n, generator=generator) if spec.pairs \
        else sample_partners(n, exclude_self=exclude_self, generator=generator)
    count = n if per_sample else 1
    u = torch.rand(2, count, dtype=torch.float64, generator=generator, device='cpu')
    mixed = u[0] < spec.prob
    if spec.cutmix_alpha > 0 and spec.mixup_alpha > 0:
        use_cutmix = mixed & (u[1] < spec.switch_prob)
    else:
        use_cutmix = mixed & (spec.cutmix_alpha > 0)
    use_mixup = mixed & ~use_cutmix
    ones = torch.ones(count, dtype=torch.float64, device='cpu')
    drawn_lam = torch.where(use_cutmix, sample_beta(spec.cutmix_alpha, count, generator), ones) \
        if spec.cutmix_alpha > 0 else ones
    weight = torch.zeros(count, dtype=torch.float64, device='cpu')
    if spec.mixup_alpha > 0:
        z = sample_beta(spec.mixup_alpha, count, generator)
        # the partner's weight: 1 - z as timm draws it, or min(z, 1 - z) as Composer does; on the label grid, so
        # that the image blend and the label use this same weight and one-hot rows sum to exactly 1
        weight = torch.where(use_mixup, on_label_grid(torch.minimum(z, 1.0 - z) if spec.mixup_fold else 1.0 - z),
                             weight)
    boxes = torch.zeros(count, 4, dtype=torch.long, device='cpu')
    if bool(use_cutmix.any()):
        drawn = sample_boxes_minmax(count, height, width, spec.cutmix_minmax, generator) \
            if spec.cutmix_minmax is not None \
            else sample_boxes(drawn_lam, height, width, uniform_sampling=spec.uniform_sampling,
                              exact_sides=spec.box_sides == 'exact', generator=generator)
        boxes = torch.where(use_cutmix[:, None], drawn, boxes)
    whole = torch.tensor([0, height, 0, width], device='cpu')
    boxes = torch.where((use_mixup & (weight > 0))[:, None], whole, boxes)
    weight = torch.where(use_cutmix, torch.ones_like(weight), weight)
    if spec.pairs:  # both members of a pair take the draw of its lower index; the odd one out stays unmixed
        own = torch.arange(n, device='cpu')
        alone = indices == own
        first = torch.minimum(own, indices)
        boxes = boxes[first].masked_fill(alone[:, None], 0)
        weight = weight[first].masked_fill(alone, 0.0)
        use_cutmix, drawn_lam = use_cutmix[first] & ~alone, drawn_lam[first]
    lam = kept_share(boxes, height, width, weight)
    if not spec.correct_lam and spec.cutmix_minmax is None:  # timm: the label keeps the drawn λ, clipped or not
        lam = torch.where(use_cutmix, drawn_lam, lam)
    if per_sample:
        return PerSampleMixParams(boxes=boxes, lam=lam, indices=indices, weights=weight)
    box = tuple(int(v) for v in boxes[0])
    return MixParams(box=box, lam=float(lam[0]), indices=indices, weight=float(weight[0]))  # type: ignore[arg-type]
