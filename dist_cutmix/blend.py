"""The blend of two images, ``(1 - weight) * own + weight * partner``, bit for bit as timm and Composer compute it.

Every pixel path (batch and per-sample, in place or not, row by row or masked) blends through these, so
a blended pixel is the same whichever path made it; the in-place forms only save temporaries.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from dist_cutmix._tensors import to_device
from dist_cutmix.draw import LamLike

__all__ = ['Scratch', 'blend', 'blend_into', 'fast_blend', 'take_or_blend']


def blend(own: Tensor, partner: Tensor, weight: LamLike) -> Tensor:
    """``(1 - weight) * own + weight * partner`` as a new tensor of ``own``'s dtype.

    float32 and float64 compute as Composer's ``mixup_batch`` and timm's ``Mixup`` do (two products
    and a sum, each rounded), so the same weight gives their pixels bit for bit; bfloat16 and float16
    compute in float32 and round once; integer images (uint8) compute in float32 and round to the
    nearest integer, ties to even, as timm's collate mixup (``np.rint``) does. ``weight`` is a number
    or one weight per row (a ``(N,)`` tensor).
    """
    compute = own.dtype if own.dtype in (torch.float32, torch.float64) else torch.float32
    a = own if own.dtype == compute else own.to(compute)
    b = partner if partner.dtype == compute else partner.to(compute)
    if isinstance(weight, Tensor):
        w = weight.to(torch.float64)
        shape = (-1,) + (1,) * (own.ndim - 1)
        # converted on the host, then one copy each: the weights are exact in float32 (a 2**-10 grid)
        keep = to_device((1.0 - w).to(compute).reshape(shape), own.device)
        take = to_device(w.to(compute).reshape(shape), own.device)
        mixed = a * keep + b * take
    else:
        mixed = a * (1.0 - weight) + b * weight
    if mixed.dtype == own.dtype:
        return mixed
    if not own.is_floating_point():
        mixed = mixed.round_()
    return mixed.to(own.dtype)


def fast_blend(tensor: Tensor) -> bool:
    """float32/float64: :func:`blend`'s two products and sum can be computed in place, with the same rounding."""
    return tensor.dtype in (torch.float32, torch.float64)


class Scratch:
    """One reusable buffer of up to a sample's size, for the partner's product in a row-by-row blend."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buf: Optional[Tensor] = None

    def shaped(self, shape: torch.Size) -> Tensor:
        if self.buf is None:
            self.buf = self.like.new_empty(self.like[0].numel() if self.like.shape[0] else 0)
        return self.buf[:math.prod(shape)].view(shape)


def blend_into(dst: Tensor, partner: Tensor, weight: float, scratch: Optional[Scratch] = None, *,
               own: Optional[Tensor] = None) -> Tensor:
    """``dst[...] = blend(own, partner, weight)`` (``own`` defaults to ``dst``), bit for bit as :func:`blend`.

    float32/float64 compute ``own * (1 - weight)`` straight into ``dst`` and ``partner * weight`` into one
    scratch buffer, then add: the same two rounded products and rounded sum as :func:`blend`, without its
    three temporaries (each a fresh allocation, and fresh pages, per call). Other dtypes go through :func:`blend`.
    """
    own = dst if own is None else own
    if not fast_blend(dst) or partner.dtype != dst.dtype or own.dtype != dst.dtype:
        dst.copy_(blend(own, partner, weight))
        return dst
    taken = torch.mul(partner, weight) if scratch is None \
        else torch.mul(partner, weight, out=scratch.shaped(partner.shape))
    if own is dst:
        dst.mul_(1.0 - weight)
    else:
        torch.mul(own, 1.0 - weight, out=dst)
    return dst.add_(taken)


def take_or_blend(own: Tensor, partner: Tensor, weights: Tensor) -> Tensor:
    """Per row: ``partner`` where the weight is 1 (exactly its pixels), else :func:`blend`."""
    take = to_device((weights == 1).reshape((-1,) + (1,) * (own.ndim - 1)), own.device)
    if not (fast_blend(own) and partner.dtype == own.dtype):
        return torch.where(take, partner, blend(own, partner, weights))
    # blend's two products and sum, written into one buffer: two temporaries instead of four
    w = weights.to(torch.float64)
    shape = (-1,) + (1,) * (own.ndim - 1)
    keep = to_device((1.0 - w).to(own.dtype).reshape(shape), own.device)
    taken = to_device(w.to(own.dtype).reshape(shape), own.device)
    out = torch.mul(own, keep)
    out.add_(torch.mul(partner, taken))
    return torch.where(take, partner, out, out=out)
