"""Apply a drawn mix to a batch's pixels: one region and weight for the whole batch.

:func:`apply_mix` takes any drawn mix (:class:`~dist_cutmix.draw.MixParams` or, handed on to
:mod:`dist_cutmix.pixels_per_sample`, :class:`~dist_cutmix.draw.PerSampleMixParams`). Only the region is read
from the partners and written; dtype and memory format (channels_last) are kept; ``inplace=False`` never
writes into the caller's tensor.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from dist_cutmix._tensors import is_channels_last, to_device, use_masks
from dist_cutmix.blend import Scratch, blend_into, fast_blend
from dist_cutmix.draw import Box, MixParams, PerSampleMixParams
from dist_cutmix.pixels_per_sample import apply_per_sample, paste_along_cycles

__all__ = ['apply_batch', 'apply_mix', 'box_is_empty', 'gather_crops', 'paste_crops']


def apply_mix(input: Tensor, params: Union[MixParams, PerSampleMixParams], *, inplace: bool = False) -> Tensor:
    """Apply any drawn mix (one for the batch, or one per sample): :func:`apply_batch` or its per-sample form."""
    if isinstance(params, PerSampleMixParams):
        return apply_per_sample(input, params, inplace=inplace)
    return apply_batch(input, params, inplace=inplace)


def apply_batch(input: Tensor, params: MixParams, *, inplace: bool = False) -> Tensor:
    """Paste each sample's partner crop into its box region (or blend it there, for ``params.weight < 1``).

    Only the box region is read from the partners and written: with ``inplace=True`` the
    whole batch is never copied.
    """
    if box_is_empty(params.box) or input.shape[0] == 0 or params.weight == 0:
        return input if inplace else input.clone()
    if params.weight != 1:
        return _apply_blend(input, params, inplace=inplace)
    return paste_crops(input, gather_crops(input, params.indices, params.box), params.box, inplace=inplace)


def _apply_blend(input: Tensor, params: MixParams, *, inplace: bool) -> Tensor:
    """One weight and region for the batch, below 1: blend each sample's region with its partner's."""
    n = input.shape[0]
    y0, y1, x0, x1 = params.box
    w = params.weight
    if not use_masks(input):  # a row at a time: each row's operands stay in cache (CPU, larger images)
        boxes = [list(params.box)] * n
        if inplace:
            paste_along_cycles(input, params.indices.tolist(), boxes, [w] * n)
            return input
        out = torch.empty_like(input)
        full = params.box == (0, input.shape[-2], 0, input.shape[-1])
        scratch = Scratch(input)
        for i, j in enumerate(params.indices.tolist()):
            if not full:
                out[i].copy_(input[i])
            blend_into(out[i, ..., y0:y1, x0:x1], input[j, ..., y0:y1, x0:x1], w, scratch,
                       own=input[i, ..., y0:y1, x0:x1])
        return out
    crops = gather_crops(input, params.indices, params.box)
    if not fast_blend(input):
        return paste_crops(input, crops, params.box, inplace=inplace, weight=w)
    crops.mul_(w)  # our own copy: scaled in place, no second temporary
    if not inplace and params.box == (0, input.shape[-2], 0, input.shape[-1]):
        return torch.mul(input, 1.0 - w).add_(crops)  # the whole image: no clone first (keeps the layout)
    out = input if inplace else input.clone()
    out[..., y0:y1, x0:x1].mul_(1.0 - w).add_(crops)
    return out


def box_is_empty(box: Box) -> bool:
    """A box with no pixel (an unmixed batch's ``(0, 0, 0, 0)`` included)."""
    y0, y1, x0, x1 = box
    return y1 <= y0 or x1 <= x0


def gather_crops(tensor: Tensor, indices: Tensor, box: Box) -> Tensor:
    """``tensor[indices, ..., y0:y1, x0:x1]`` as a new tensor laid out like ``tensor``: only the box is read.

    ``index_select`` is a row copy where advanced indexing runs a generic per-element kernel
    (2-4x slower here). A channels_last batch is gathered in its physical NHWC order, so the crops
    come back channels_last and pasting them is a plain copy rather than a transpose.
    """
    y0, y1, x0, x1 = box
    indices = to_device(indices, tensor.device)
    if is_channels_last(tensor):
        return torch.index_select(tensor.permute(0, 2, 3, 1)[:, y0:y1, x0:x1], 0, indices).permute(0, 3, 1, 2)
    return torch.index_select(tensor[..., y0:y1, x0:x1], 0, indices)


def paste_crops(tensor: Tensor, crops: Tensor, box: Box, *, inplace: bool = False, weight: float = 1.0) -> Tensor:
    """Write ``crops`` into the box region of ``tensor`` (a copy unless ``inplace``); dtype and layout are kept.

    With ``weight < 1`` the region becomes ``blend(region, crops, weight)`` instead (MixUp's whole image).
    """
    out = tensor if inplace else tensor.clone()  # clone keeps channels_last (preserve_format)
    if not box_is_empty(box) and tensor.shape[0] and weight > 0:
        y0, y1, x0, x1 = box
        region = out[..., y0:y1, x0:x1]
        if weight == 1:
            region.copy_(crops)
        elif use_masks(out):
            blend_into(region, crops, weight)
        else:  # a row at a time through one scratch row: no batch-sized temporary (the global MixUp's arrivals)
            scratch = Scratch(out)
            for i in range(out.shape[0]):
                blend_into(region[i], crops[i], weight, scratch)
    return out
