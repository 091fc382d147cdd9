"""Mix the targets of a drawn mix: soft labels by weight, dense maps by region, then label smoothing.

Class targets (index ``(N,)``, binary ``(N,)``, soft ``(N, C)``) become ``l * own + (1 - l) * partner`` with the
label weight ``l = on_label_grid(lam)``, one per batch or per sample; index targets become one-hot first.
Dense targets ``(N, ..., H, W)`` take the partner's region as the pixels do. Smoothing spreads ``ε`` over the
class axis: ``(1 - ε) * mixed + ε / C``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dist_cutmix._tensors import as_4d, box_masks, to_device, use_masks
from dist_cutmix.blend import take_or_blend
from dist_cutmix.draw import Box, LamLike, box_areas, on_label_grid
from dist_cutmix.pixels import box_is_empty, paste_crops
from dist_cutmix.pixels_per_sample import gather_box_pixels, paste_box_pixels
from dist_cutmix.validation import check_blendable_dense, check_labels, check_smoothable

__all__ = ['mix_targets', 'mix_targets_per_sample', 'one_hot']


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Index labels ``(N,)`` as float32 one-hot rows ``(N, num_classes)``, on the labels' device."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0)


def mix_targets(
    target: Tensor,
    partner: Tensor,
    lam: LamLike,
    box: Box,
    *,
    kind: str,
    num_classes: Optional[int] = None,
    validate: bool = True,
    smoothing: float = 0.0,
    weight: float = 1.0,
    multi_label: bool = False,
) -> Tensor:
    """Mix each target with its partner's.

    Args:
        target: own targets: index ``(N,)``, soft ``(N, K)`` or dense ``(N, ..., H, W)``.
        partner: the partners' targets, in the same form; for dense targets only the box crops
            ``(N, ..., y1 - y0, x1 - x0)`` are needed (full maps are cropped here).
        lam: the kept share (a float, or one per sample), from the drawn mix.
        box: the pasted box (used for dense targets).
        kind: ``'index'``, ``'binary'``, ``'soft'`` or ``'dense'`` (see :func:`dist_cutmix.validation.target_kind`).
        num_classes: number of classes, required for index targets.
        validate: check that index targets lie in ``[0, num_classes)`` (a device sync on CUDA);
            ``False`` where the caller has checked them already.
        smoothing: label smoothing ``ε``: class targets become ``(1 - ε) * mixed + ε / C``.
        weight: for dense targets, the partner's weight inside the box (below 1 blends float maps).
        multi_label: soft ``(N, C)`` targets are multi-hot, every class its own binary label: smoothing
            moves each entry toward 1/2, ``(1 - ε) * mixed + ε / 2`` (timm's ``multi_label``).

    Returns:
        Dense targets with the partner box pasted (or blended); otherwise ``l * own + (1 - l) * partner``
        with the label weight ``l = on_label_grid(lam)`` (index targets become one-hot first, as float32),
        so one-hot rows sum to exactly 1; then smoothed.

    Raises:
        ValueError: if index targets lack ``num_classes`` or fall outside ``[0, num_classes)``, for
            smoothing of targets without a class axis, or for blending class-index maps.
    """
    check_smoothable(kind, target, smoothing)
    if kind == 'dense':
        if weight not in (0, 1):
            check_blendable_dense(target)
        y0, y1, x0, x1 = box
        if partner.shape[-2:] == target.shape[-2:] and not box_is_empty(box):
            partner = partner[..., y0:y1, x0:x1]
        return paste_crops(target, partner, box, weight=weight)
    if kind == 'index':
        check_labels(torch.cat([target.reshape(-1), partner.reshape(-1)]) if validate else target[:0], num_classes)
        own, other = one_hot(target, num_classes), one_hot(partner, num_classes)  # type: ignore[arg-type]
    else:
        own, other = target, partner.to(target.dtype)
        if not own.is_floating_point():
            own, other = own.float(), other.float()
    label_lam = on_label_grid(lam)
    if isinstance(label_lam, Tensor):  # one weight per sample, broadcast over the class axis
        label_lam = to_device(label_lam.to(own.dtype), own.device).reshape(-1, *([1] * (own.ndim - 1)))
    mixed = own * label_lam + other * (1.0 - label_lam)
    if smoothing:
        mixed = mixed * (1.0 - smoothing) + smoothing / (2 if multi_label else mixed.shape[1])
    return mixed


def mix_targets_per_sample(
    target: Tensor,
    partner: Tensor,
    lam: Tensor,
    boxes: Tensor,
    *,
    kind: str,
    num_classes: Optional[int] = None,
    validate: bool = True,
    smoothing: float = 0.0,
    weights: Optional[Tensor] = None,
    multi_label: bool = False,
) -> Tensor:
    """:func:`mix_targets` with one λ and box per sample.

    For dense targets ``partner`` is the partners' full maps, or the pixels inside each sample's
    box already gathered (1-D, as :func:`~dist_cutmix.pixels_per_sample.gather_box_pixels` lays them out);
    they are pasted into a copy of ``target`` (blended where ``weights`` are below 1). Other kinds mix with
    each sample's label weight ``on_label_grid(lam[i])``, then are smoothed.
    """
    if kind != 'dense':
        return mix_targets(target, partner, lam, (0, 0, 0, 0), kind=kind, num_classes=num_classes, validate=validate,
                           smoothing=smoothing, multi_label=multi_label)
    check_smoothable(kind, target, smoothing)
    if weights is not None:
        if bool(((weights != 1) & (weights != 0) & (box_areas(boxes) > 0)).any()):
            check_blendable_dense(target)
        else:
            weights = None
    rows = torch.arange(target.shape[0], device='cpu')
    if partner.ndim == 1:
        return paste_box_pixels(target.clone(), rows, partner, boxes, weights)
    if use_masks(as_4d(target)):
        mask = box_masks(boxes, target.shape[-2], target.shape[-1], target.device)
        source = as_4d(partner) if weights is None else take_or_blend(as_4d(target), as_4d(partner), weights)
        return torch.where(mask, source, as_4d(target)).reshape(target.shape)
    return paste_box_pixels(target.clone(), rows, gather_box_pixels(partner, rows, boxes), boxes, weights)
