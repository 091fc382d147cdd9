"""What to draw for one batch: CutMix, MixUp, or timm's switch between them, as one configuration.

A sample's mix is a partner, a region and a weight: it keeps its own pixels outside the region and
inside it becomes ``(1 - weight) * own + weight * partner``. CutMix is a box at weight 1, MixUp the
whole image at weight ``1 - λ``, and an unmixed sample an empty region. :class:`MixSpec` says which
of these a batch (or, per sample, each sample) may get and with what probability; :func:`sample_mix`
draws them as :class:`~dist_cutmix.functional.CutMixParams` or
:class:`~dist_cutmix.functional.PerSampleParams`, which every apply, exchange and target step takes.

The draw is a pure function of the generator (and so of ``(seed, batch, stream)``): every rank of a
group draws the whole global batch's mix identically, with no collective. A plain CutMix spec draws
exactly what :func:`~dist_cutmix.functional.sample_params` (or its per-sample form) draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from dist_cutmix import functional as F

__all__ = ['MixSpec', 'sample_mix']


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f'{name} must be a number in [0, 1], got {name}={value!r}')
    return float(value)


@dataclass(frozen=True)
class MixSpec:
    """How to mix a batch: which methods, how likely, and how the labels are smoothed.

    Attributes:
        cutmix_alpha: Beta(a, a) concentration of CutMix's kept share λ; 0 turns CutMix off.
        mixup_alpha: Beta(a, a) concentration of MixUp's λ; 0 turns MixUp off.
        prob: probability that a batch (per sample: a sample) is mixed at all (timm's ``prob``).
        switch_prob: when both alphas are > 0, probability of CutMix rather than MixUp.
        cutmix_minmax: ``(lo, hi)``: box sides drawn uniformly in ``[int(lo * H), int(hi * H))`` (and
            the same for ``W``) as timm's ``rand_bbox_minmax``, instead of from λ; λ is then the box's.
        uniform_sampling: CutMix box centres on the enlarged range (see :func:`~dist_cutmix.functional.sample_box`).
        mixup_fold: MixUp's partner weight is ``min(z, 1 - z)``, ``z ~ Beta``, so the own label stays
            the main one (Composer's ``MixUp``); ``False`` takes ``1 - z`` as timm does.
        label_smoothing: ``ε``: soft targets become ``(1 - ε) * mixed + ε / C``.
        correct_lam: a CutMix sample's λ is its clipped box's exact pixel share (timm's ``correct_lam=True``);
            ``False`` keeps the drawn λ for the label however the box was clipped (timm's ``correct_lam=False``).
            A ``cutmix_minmax`` box has no drawn λ: its λ is always the box's.
        multi_label: targets are multi-hot ``(N, C)``, every class its own binary label (timm's
            ``multi_label``): smoothing moves each entry toward 1/2, ``(1 - ε) * mixed + ε / 2``, and
            index targets are refused.
        pairs: partners form pairs (a random perfect matching over the batch, each the other's partner) and
            both members of a pair share one draw (timm's ``mode='pair'``); in an odd batch one sample is left
            unmixed. Needs ``per_sample=True``.
    """

    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    cutmix_minmax: Optional[tuple[float, float]] = None
    uniform_sampling: bool = False
    mixup_fold: bool = False
    label_smoothing: float = 0.0
    correct_lam: bool = True
    multi_label: bool = False
    pairs: bool = False

    def __post_init__(self) -> None:
        for name in ('correct_lam', 'multi_label', 'pairs'):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f'{name} must be True or False, got {name}={getattr(self, name)!r}')
        for name in ('cutmix_alpha', 'mixup_alpha'):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, F.validate_alpha(value))
            except (TypeError, ValueError):
                raise ValueError(f'{name} must be a finite number >= 0, got {name}={value!r}') from None
        object.__setattr__(self, 'prob', _probability('prob', self.prob))
        object.__setattr__(self, 'switch_prob', _probability('switch_prob', self.switch_prob))
        object.__setattr__(self, 'label_smoothing', _probability('label_smoothing', self.label_smoothing))
        if self.label_smoothing == 1:
            raise ValueError('label_smoothing must be < 1 (1 would erase every label), got label_smoothing=1.0')
        if self.cutmix_minmax is not None:
            mm = self.cutmix_minmax
            if (not isinstance(mm, (tuple, list)) or len(mm) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mm)
                    or not 0 <= mm[0] < mm[1] <= 1):
                raise ValueError(f'cutmix_minmax must be (lo, hi) with 0 <= lo < hi <= 1, got cutmix_minmax={mm!r}')
            # timm: a min/max box ignores cutmix_alpha's λ and turns CutMix on at alpha 1
            object.__setattr__(self, 'cutmix_minmax', (float(mm[0]), float(mm[1])))
            object.__setattr__(self, 'cutmix_alpha', 1.0)

    @classmethod
    def cutmix(cls, alpha: float = 1.0, uniform_sampling: bool = False) -> 'MixSpec':
        """Composer's CutMix: always a box, λ ~ Beta(alpha, alpha)."""
        return cls(cutmix_alpha=alpha, mixup_alpha=0.0, uniform_sampling=uniform_sampling)

    @classmethod
    def mixup(cls, alpha: float = 0.2) -> 'MixSpec':
        """Composer's MixUp: always a blend, partner weight ``min(z, 1 - z)``, ``z ~ Beta(alpha, alpha)``."""
        return cls(cutmix_alpha=0.0, mixup_alpha=alpha, mixup_fold=True)

    @property
    def is_plain_cutmix(self) -> bool:
        """Every batch a CutMix box from λ: the draw of :func:`~dist_cutmix.functional.sample_params`."""
        return (self.mixup_alpha == 0 and self.prob == 1 and self.cutmix_minmax is None and self.correct_lam
                and not self.pairs)

    @property
    def mixes(self) -> bool:
        """Whether any sample can be mixed at all."""
        return self.prob > 0 and (self.cutmix_alpha > 0 or self.mixup_alpha > 0)


Params = Union[F.CutMixParams, F.PerSampleParams]


def _beta(alpha: float, size: int, generator: torch.Generator) -> np.ndarray:
    """``size`` draws from Beta(alpha, alpha) by numpy, seeded from the explicit torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device='cpu').item())
    return np.random.default_rng(seed).beta(alpha, alpha, size=size)


def _partner_weight(lam_mix: np.ndarray, fold: bool) -> np.ndarray:
    """MixUp's partner weight from λ: ``1 - λ`` (timm) or ``min(λ, 1 - λ)`` (Composer), on the label grid."""
    weight = np.minimum(lam_mix, 1.0 - lam_mix) if fold else 1.0 - lam_mix
    scale = 1 << F.LABEL_LAMBDA_BITS
    # the image blend and the label use this same dyadic weight: every one-hot row sums to exactly 1
    return np.round(weight * scale) / scale


def _minmax_boxes(n: int, height: int, width: int, minmax: tuple[float, float],
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


def _cutmix_boxes(nominal: Tensor, height: int, width: int, spec: MixSpec, generator: torch.Generator) -> Tensor:
    """A box per λ in ``nominal`` (or per min/max draw), as CutMix draws them."""
    n = nominal.shape[0]
    if spec.cutmix_minmax is not None:
        return _minmax_boxes(n, height, width, spec.cutmix_minmax, generator)
    return F.boxes_for_lambda(nominal, height, width, uniform_sampling=spec.uniform_sampling, generator=generator)


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

    Args:
        spec: what may be drawn.
        n: batch size (the global batch size when mixing across ranks).
        height: image height ``H``.
        width: image width ``W``.
        per_sample: one draw per sample (timm's ``mode='elem'``) instead of one per batch.
        exclude_self: never pair a sample with itself when ``n > 1``.
        generator: the only source of randomness.

    Returns:
        :class:`~dist_cutmix.functional.CutMixParams` (one region and weight for the batch) or
        :class:`~dist_cutmix.functional.PerSampleParams` (one per sample). ``lam`` is each sample's
        kept share, ``1 - weight * area / (H * W)``: for MixUp on the ``2**-10`` label grid; for CutMix with
        ``spec.correct_lam=False``, the drawn λ instead.

    Raises:
        ValueError: for ``spec.pairs`` without ``per_sample``.
    """
    if spec.pairs and not per_sample:
        raise ValueError('MixSpec(pairs=True) gives each pair its own draw: it needs per_sample=True (timm\'s '
                         "mode='pair'); a batch-wide draw takes partners from a permutation")
    if spec.is_plain_cutmix:  # Composer's CutMix: keep exactly its established draw
        draw = F.sample_params_per_sample if per_sample else F.sample_params
        return draw(n, height, width, alpha=spec.cutmix_alpha, uniform_sampling=spec.uniform_sampling,
                    exclude_self=exclude_self, generator=generator)
    indices = F.sample_pairs(n, generator=generator) if spec.pairs \
        else F.sample_partners(n, exclude_self=exclude_self, generator=generator)
    count = n if per_sample else 1
    u = torch.rand(2, count, dtype=torch.float64, generator=generator, device='cpu')
    mixed = u[0] < spec.prob
    if spec.cutmix_alpha > 0 and spec.mixup_alpha > 0:
        use_cutmix = u[1] < spec.switch_prob
    else:
        use_cutmix = torch.full((count,), spec.cutmix_alpha > 0, device='cpu')
    use_cutmix &= mixed
    use_mixup = mixed & ~use_cutmix
    nominal = torch.ones(count, dtype=torch.float64, device='cpu')
    if spec.cutmix_alpha > 0:
        nominal = torch.where(use_cutmix, torch.from_numpy(_beta(spec.cutmix_alpha, count, generator)), nominal)
    weight = torch.zeros(count, dtype=torch.float64, device='cpu')
    if spec.mixup_alpha > 0:
        lam_mix = _beta(spec.mixup_alpha, count, generator)
        weight = torch.where(use_mixup, torch.from_numpy(_partner_weight(lam_mix, spec.mixup_fold)), weight)
    boxes = torch.zeros(count, 4, dtype=torch.long, device='cpu')
    if bool(use_cutmix.any()):
        boxes = torch.where(use_cutmix[:, None], _cutmix_boxes(nominal, height, width, spec, generator), boxes)
    full = torch.tensor([0, height, 0, width], device='cpu')
    boxes = torch.where(use_mixup[:, None] & (weight > 0)[:, None], full, boxes)
    weight = torch.where(use_cutmix, torch.ones_like(weight), weight)
    if spec.pairs:  # both members of a pair take the draw of its lower index; the odd one out stays unmixed
        own = torch.arange(n, device='cpu')
        alone = indices == own
        first = torch.minimum(own, indices)
        boxes = boxes[first].masked_fill(alone[:, None], 0)
        weight = weight[first].masked_fill(alone, 0.0)
        use_cutmix, nominal = use_cutmix[first] & ~alone, nominal[first]
    lam = 1.0 - weight * F.box_areas(boxes).double() / max(height * width, 1)
    if not spec.correct_lam and spec.cutmix_minmax is None:  # timm: the label keeps the drawn λ, clipped or not
        lam = torch.where(use_cutmix, nominal, lam)
    if per_sample:
        return F.PerSampleParams(boxes=boxes, lam=lam, indices=indices, weights=weight)
    box = tuple(int(v) for v in boxes[0])
    return F.CutMixParams(box=box, lam=float(lam[0]), indices=indices, weight=float(weight[0]))  # type: ignore[arg-type]
