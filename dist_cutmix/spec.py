"""What may be drawn for a batch: CutMix, MixUp, or timm's switch between them, as one configuration.

A sample's mix is a partner, a region and a weight: it keeps its own pixels outside the region and
inside it becomes ``(1 - weight) * own + weight * partner``. CutMix is a box at weight 1, MixUp the
whole image at weight ``1 - λ``, and an unmixed sample an empty region. :class:`MixSpec` says which
of these a batch (or, per sample, each sample) may get and with what probability, and how the labels
are smoothed; :func:`dist_cutmix.draw.sample_mix` draws from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_cutmix.validation import check_alpha, check_choice, check_flag, check_probability

__all__ = ['BOX_SIDES', 'MixSpec']

BOX_SIDES = ('even', 'exact')


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
        uniform_sampling: CutMix box centres on the enlarged range, so that every pixel is equally likely
            to be cut (see :func:`dist_cutmix.draw.sample_boxes`).
        mixup_fold: MixUp's partner weight is ``min(z, 1 - z)``, ``z ~ Beta``, so the own label stays
            the main one (Composer's ``MixUp``); ``False`` takes ``1 - z`` as timm does.
        label_smoothing: ``ε``: soft targets become ``(1 - ε) * mixed + ε / C``.
        correct_lam: a CutMix sample's λ is its clipped box's exact pixel share (timm's ``correct_lam=True``);
            ``False`` keeps the drawn λ for the label however the box was clipped (timm's ``correct_lam=False``).
            A ``cutmix_minmax`` box has no drawn λ: its λ is always the box's.
        multi_label: targets are multi-hot ``(N, C)``, every class its own binary label (timm's
            ``multi_label``): smoothing moves each entry toward 1/2, ``(1 - ε) * mixed + ε / 2``, and
            index targets are refused.
        box_sides: ``'even'``: a CutMix box from λ has sides ``2 * (int(H * sqrt(1 - λ)) // 2)`` (Composer's,
            torchvision's and the paper's); ``'exact'``: ``int(H * sqrt(1 - λ))``, odd ones included (timm's
            ``rand_bbox`` since 0.9). The centre is drawn alike either way.
        pairs: partners form pairs (a random perfect matching over the batch, each the other's partner) and
            both members of a pair share one draw (timm's ``mode='pair'``); in an odd batch one sample is left
            unmixed. Needs ``per_sample=True``.

    Raises:
        ValueError: naming the field and its value, for a value out of its range (``TypeError`` for an
            alpha that is no number).

    Example:
        >>> spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, label_smoothing=0.1)  # timm's recipe
        >>> spec.mixes, MixSpec.mixup(0.2).mixup_fold
        (True, True)
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
    box_sides: str = 'even'

    def __post_init__(self) -> None:
        check_choice(self.box_sides, 'box_sides', BOX_SIDES)
        for name in ('uniform_sampling', 'mixup_fold', 'correct_lam', 'multi_label', 'pairs'):
            check_flag(getattr(self, name), name)
        for name in ('cutmix_alpha', 'mixup_alpha'):
            object.__setattr__(self, name, check_alpha(getattr(self, name), name))
        for name in ('prob', 'switch_prob', 'label_smoothing'):
            object.__setattr__(self, name, check_probability(getattr(self, name), name))
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
        """Composer's CutMix: always a box, λ ~ Beta(alpha, alpha); ``alpha=0`` mixes nothing."""
        return cls(cutmix_alpha=check_alpha(alpha), mixup_alpha=0.0, uniform_sampling=uniform_sampling)

    @classmethod
    def mixup(cls, alpha: float = 0.2) -> 'MixSpec':
        """Composer's MixUp: always a blend, partner weight ``min(z, 1 - z)``, ``z ~ Beta(alpha, alpha)``."""
        return cls(cutmix_alpha=0.0, mixup_alpha=check_alpha(alpha), mixup_fold=True)

    @property
    def mixes(self) -> bool:
        """Whether any sample can be mixed at all."""
        return self.prob > 0 and (self.cutmix_alpha > 0 or self.mixup_alpha > 0)
