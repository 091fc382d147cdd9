"""Independent references for the mixing tests: plain per-sample loops over drawn parameters.

Nothing here calls the code under test's apply, exchange or target functions: a drawn mix (partners,
boxes, weights, λ) goes in, the expected pixels, targets and exchange bytes come out, written from the
documented semantics (a sample keeps its pixels outside its box; inside, ``(1 - w) * own + w * partner``
in float32 or float64, uint8 rounded half to even as ``np.rint``, half types rounded once; labels
``l * y + (1 - l) * y'`` with ``l = λ`` on the ``2**-10`` grid, then ``(1 - ε) * mix + ε / C``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GRID = 1024  # label weights are multiples of 2**-10


@dataclass(frozen=True)
class Draw:
    """One mix per sample, whatever the mode: partner, ``(y0, y1, x0, x1)`` box, partner weight, kept share λ."""

    indices: list[int]
    boxes: list[tuple[int, int, int, int]]
    weights: list[float]
    lam: list[float]


def as_draw(params) -> Draw:
    """A batch-mode ``MixParams`` (one box for all) or ``PerSampleMixParams`` as one mix per sample."""
    indices = [int(i) for i in params.indices]
    n = len(indices)
    if hasattr(params, 'boxes'):
        boxes = [tuple(int(v) for v in b) for b in params.boxes.tolist()]
        weights = [1.0] * n if params.weights is None else [float(w) for w in params.weights]
        lam = [float(v) for v in params.lam]
    else:
        boxes = [tuple(int(v) for v in params.box)] * n
        weights = [float(params.weight)] * n
        lam = [float(params.lam)] * n
    return Draw(indices, boxes, weights, lam)


def area(box: tuple[int, int, int, int]) -> int:
    y0, y1, x0, x1 = box
    return max(y1 - y0, 0) * max(x1 - x0, 0)


def blend_pixels(own: Tensor, partner: Tensor, weight: float) -> Tensor:
    """``(1 - w) * own + w * partner``: in float32/float64 as Composer and timm compute it; uint8 in float32
    rounded half to even (numpy's ``rint``); bfloat16/float16 in float32, rounded once."""
    if own.dtype in (torch.float32, torch.float64):
        return own * (1.0 - weight) + partner * weight
    mixed = own.float() * (1.0 - weight) + partner.float() * weight
    if own.dtype == torch.uint8:
        return torch.from_numpy(np.rint(mixed.numpy())).to(torch.uint8)
    return mixed.to(own.dtype)


def mix_pixels(x: Tensor, draw: Draw) -> Tensor:
    """Sample ``i`` takes ``blend(own, partner)`` inside its box (the partner's pixels at weight 1), from the
    original batch; a contiguous result."""
    x = x.contiguous()
    out = x.clone()
    for i, (j, (y0, y1, x0, x1), w) in enumerate(zip(draw.indices, draw.boxes, draw.weights, strict=True)):
        if area((y0, y1, x0, x1)) == 0 or w == 0:
            continue
        own, partner = x[i, ..., y0:y1, x0:x1], x[j, ..., y0:y1, x0:x1]
        out[i, ..., y0:y1, x0:x1] = partner if w == 1 else blend_pixels(own, partner, w)
    return out


def paste_per_sample(x: Tensor, params) -> Tensor:
    """The plain per-sample CutMix loop over a ``PerSampleMixParams``: sample i takes its partner's unmixed pixels
    inside box i; the input's layout is kept."""
    out = x.clone()
    for i, (y0, y1, x0, x1) in enumerate(params.boxes.tolist()):
        out[i, ..., y0:y1, x0:x1] = x[int(params.indices[i]), ..., y0:y1, x0:x1]
    return out


def label_weight(lam: float) -> float:
    """λ on the 2**-10 label grid (half to even, as Python's round)."""
    return round(lam * GRID) / GRID


def per_sample_label_weights(lam: Tensor) -> Tensor:
    """Per-sample λ on the 2**-10 label grid: the documented label weight of each sample."""
    return torch.round(lam * GRID) / GRID


def mix_labels(y: Tensor, draw: Draw, kind: str, num_classes: int | None = None, smoothing: float = 0.0) -> Tensor:
    """Expected mixed targets, in float64 for index/soft/binary (compare with a tolerance) and in the
    target's dtype for dense maps (exact)."""
    n = len(draw.indices)
    partner = y[torch.tensor(draw.indices, dtype=torch.long)] if n else y
    if kind == 'dense':
        return mix_pixels(y.reshape(n, -1, *y.shape[-2:]), draw).reshape(y.shape)
    if kind == 'index':
        eye = torch.eye(num_classes, dtype=torch.float64)
        own, other = eye[y], eye[partner]
    else:
        own, other = y.double(), partner.double()
    keep = torch.tensor([label_weight(v) for v in draw.lam], dtype=torch.float64).reshape(-1, *[1] * (own.ndim - 1))
    mixed = keep * own + (1 - keep) * other
    if smoothing:
        mixed = (1 - smoothing) * mixed + smoothing / mixed.shape[1]
    return mixed


def owner_of(sizes: list[int]) -> list[int]:
    """Rank holding each global sample, ranks' batches end to end."""
    return [r for r, n in enumerate(sizes) for _ in range(n)]


def exchange_bytes(draw: Draw, sizes: list[int], pixel_bytes_per_px: int, label_bytes: int,
                   dense_label_bytes_per_px: int = 0) -> list[int]:
    """Bytes each rank sends to other ranks: for every sample whose partner lives on another rank, the
    partner's rank sends its label (a whole row, or for dense maps the box region) and its pixels inside
    the box (MixUp: the whole image; unmixed: none)."""
    owner = owner_of(sizes)
    sent = [0] * len(sizes)
    for g, j in enumerate(draw.indices):
        if owner[j] == owner[g]:
            continue
        a = area(draw.boxes[g])
        moves_pixels = a > 0 and draw.weights[g] > 0
        sent[owner[j]] += label_bytes + dense_label_bytes_per_px * a + (pixel_bytes_per_px * a if moves_pixels else 0)
    return sent
