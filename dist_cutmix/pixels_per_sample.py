"""Apply a drawn mix sample by sample: every sample its own box, weight and partner.

On CUDA (and for small images) one masked blend over the batch, with no host sync; on the CPU for larger
images one copy per sample, straight from partner to sample. :func:`gather_box_pixels` and
:func:`paste_box_pixels` pack and unpack each sample's box pixels end to end, as the global exchange sends them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dist_cutmix._tensors import as_4d, box_masks, is_channels_last, to_device, use_masks
from dist_cutmix.blend import Scratch, blend_into, take_or_blend
from dist_cutmix.draw import PerSampleMixParams, box_areas

__all__ = ['apply_per_sample', 'gather_box_pixels', 'paste_along_cycles', 'paste_box_pixels']


def apply_per_sample(input: Tensor, params: PerSampleMixParams, *, inplace: bool = False) -> Tensor:
    """Paste into each sample its partner's pixels inside the sample's own box.

    Every sample receives its partner's own, unmixed pixels (as in batch mode). dtype and memory
    format are kept. On CUDA (and for small images) one masked blend over the batch, with no host
    sync; on CPU for larger images one copy per sample, straight from partner to sample.
    """
    if input.shape[0] == 0:
        return input if inplace else input.clone()
    weights = None if params.pastes_only else params.weights
    if use_masks(input):
        return _blend_boxes(input, params.indices, params.boxes, input if inplace else None, weights)
    weight_list = [1.0] * input.shape[0] if weights is None else weights.tolist()
    if not inplace:
        out = input.clone()
        scratch = Scratch(input)
        for i, j, (y0, y1, x0, x1), w in zip(range(len(out)), params.indices.tolist(), params.boxes.tolist(),
                                             weight_list, strict=True):
            if w == 1:
                out[i, :, y0:y1, x0:x1] = input[j, :, y0:y1, x0:x1]
            elif w > 0 and y1 > y0 and x1 > x0:
                blend_into(out[i, :, y0:y1, x0:x1], input[j, :, y0:y1, x0:x1], w, scratch)
        return out
    paste_along_cycles(input, params.indices.tolist(), params.boxes.tolist(), weight_list)
    return input


def paste_along_cycles(x: Tensor, partners: list[int], boxes: list[list[int]],
                        weights: Optional[list[float]] = None) -> None:
    """In place: ``x[i, box_i] = original x[partners[i], box_i]`` for a permutation ``partners`` (or, where
    ``weights[i] < 1``, :func:`blend` of the row's own and its partner's original pixels there).

    Following each cycle ``i -> partners[i] -> ...``, a sample is overwritten only after the one
    sample that reads from it has read; the last sample of a cycle reads the first one's pixels,
    saved before the cycle started: one spare crop per cycle instead of a copy of every crop.
    """
    if sorted(partners) != list(range(len(partners))):
        raise ValueError('per-sample partners must be a permutation to paste in place along its cycles')
    weights = [1.0] * len(partners) if weights is None else weights
    scratch = Scratch(x)

    def put(i: int, box: list[int], source: Tensor) -> None:
        y0, y1, x0, x1 = box
        if weights[i] == 1:
            x[i, :, y0:y1, x0:x1] = source
        elif weights[i] > 0 and y1 > y0 and x1 > x0:
            blend_into(x[i, :, y0:y1, x0:x1], source, weights[i], scratch)

    done = [False] * len(partners)
    for start in range(len(partners)):
        if done[start] or partners[start] == start:
            done[start] = True
            continue
        last = start
        while partners[last] != start:
            last = partners[last]
        y0, y1, x0, x1 = boxes[last]
        saved = x[start, :, y0:y1, x0:x1].clone()  # what the cycle's last sample takes from the first
        i = start
        while i != last:
            j = partners[i]
            y0, y1, x0, x1 = boxes[i]
            put(i, boxes[i], x[j, :, y0:y1, x0:x1])
            done[i] = True
            i = j
        put(last, boxes[last], saved)
        done[last] = True


def _blend_boxes(tensor: Tensor, indices: Tensor, boxes: Tensor, out: Optional[Tensor],
                 weights: Optional[Tensor] = None) -> Tensor:
    """``where(inside box i, tensor[indices[i]], tensor[i])`` for every row, into ``out`` (may be ``tensor``);
    with ``weights``, rows whose weight is below 1 take :func:`blend` of the two inside the box."""
    x = as_4d(tensor)
    indices = to_device(indices, x.device)
    if is_channels_last(x):  # index_select returns NCHW; gather the NHWC rows instead, keeping the layout
        partners = x.permute(0, 2, 3, 1).index_select(0, indices).permute(0, 3, 1, 2)
    else:
        partners = x.index_select(0, indices)
    if out is None:
        out = torch.empty_like(tensor)  # preserve_format: a channels_last batch stays channels_last
    o = as_4d(out)
    if weights is not None:
        partners = take_or_blend(x, partners, weights)
    if is_channels_last(x) and is_channels_last(partners) and is_channels_last(o):
        # in NHWC memory, a mask broadcast over the innermost channels is slow: blend (N, H, W*C) rows instead
        n, c, h, w = x.shape
        flat = [t.permute(0, 2, 3, 1).reshape(n, h, w * c) for t in (partners, x, o)]
        mask = box_masks(boxes, h, w, x.device, channels_last=c)
        torch.where(mask, flat[0], flat[1], out=flat[2])
    else:
        torch.where(box_masks(boxes, x.shape[-2], x.shape[-1], x.device), partners, x, out=o)
    return out


def gather_box_pixels(tensor: Tensor, rows: Tensor, boxes: Tensor) -> Tensor:
    """Row ``rows[k]``'s pixels inside ``boxes[k]``, for every ``k``, end to end as one 1-D tensor.

    Each crop is laid out ``(..., h_k, w_k)`` in logical (row-major) order, whatever the memory
    format. Only the boxes are read (or, with masks, the selected rows).
    """
    x = as_4d(tensor)
    if len(rows) == 0:
        return x.new_empty(0)
    if use_masks(x):
        selected = x.index_select(0, to_device(rows, x.device)).contiguous()
        # a mask expanded to the full shape: masked_select over a broadcast mask is several times slower
        mask = box_masks(boxes, x.shape[-2], x.shape[-1], x.device).expand(selected.shape).contiguous()
        return selected.masked_select(mask)
    sizes = (box_areas(boxes) * x.shape[1]).tolist()
    out = x.new_empty(sum(sizes))
    offset = 0
    for j, (y0, y1, x0, x1), n in zip(rows.tolist(), boxes.tolist(), sizes, strict=True):
        if n:  # straight into the packed buffer: one copy per crop
            out[offset:offset + n].view(x.shape[1], y1 - y0, x1 - x0).copy_(x[j, :, y0:y1, x0:x1])
        offset += n
    return out


def paste_box_pixels(tensor: Tensor, rows: Tensor, pixels: Tensor, boxes: Tensor,
                     weights: Optional[Tensor] = None) -> Tensor:
    """Write ``pixels`` (as :func:`gather_box_pixels` lays them out) into ``boxes[k]`` of row ``rows[k]``, in place.

    With ``weights`` (one per row), a row whose weight is below 1 blends its box region with the pixels
    (:func:`blend`) instead of taking them.
    """
    x = as_4d(tensor)
    if len(rows) == 0 or pixels.numel() == 0:
        return tensor
    if weights is not None and bool((weights == 1).all()):
        weights = None
    if use_masks(x):
        rows = to_device(rows, x.device)
        region = x.index_select(0, rows).contiguous()
        mask = box_masks(boxes, x.shape[-2], x.shape[-1], x.device).expand(region.shape).contiguous()
        if weights is None:
            region.masked_scatter_(mask, pixels)
        else:
            partner = region.clone()
            partner.masked_scatter_(mask, pixels)
            region = torch.where(mask, take_or_blend(region, partner, weights), region)
        x.index_copy_(0, rows, region)
        return tensor
    areas = (box_areas(boxes) * x.shape[1]).tolist()
    weight_list = [1.0] * len(areas) if weights is None else weights.tolist()
    scratch = Scratch(x)
    for i, (y0, y1, x0, x1), crop, w in zip(rows.tolist(), boxes.tolist(), pixels.split(areas), weight_list,
                                            strict=True):
        if crop.numel():
            crop = crop.view(x.shape[1], y1 - y0, x1 - x0)
            if w == 1:
                x[i, :, y0:y1, x0:x1] = crop
            else:
                blend_into(x[i, :, y0:y1, x0:x1], crop, w, scratch)
    return tensor
