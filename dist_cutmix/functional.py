"""CutMix as pure tensor operations: sample parameters, then apply them.

No torch.distributed and no Composer here. Every function that draws takes an explicit
``torch.Generator``; the apply step is deterministic given a :class:`CutMixParams`.

Axes are named ``(N, C, H, W)``. Internally a box is ``(y0, y1, x0, x1)`` with ``y`` on
dim -2. The drop-in :func:`cutmix_batch` keeps Composer's box tuple, ``(y0, x0, y1, x1)``
(Composer names it ``(x1, y1, x2, y2)`` but slices its first and third entries on the height
axis); :func:`box_from_composer` and :func:`box_to_composer` convert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    'Box',
    'CutMixParams',
    'PerSampleParams',
    'apply_cutmix',
    'apply_cutmix_per_sample',
    'blend',
    'boxes_for_lambda',
    'boxes_lambda',
    'apply_mix',
    'mixup_batch',
    'validate_binary',
    'gather_box_pixels',
    'paste_box_pixels',
    'sample_params_per_sample',
    'box_areas',
    'box_from_composer',
    'box_lambda',
    'box_to_composer',
    'check_labels',
    'cutmix_batch',
    'gather_crops',
    'label_lambda',
    'mix_targets',
    'mix_targets_per_sample',
    'paste_crops',
    'sample_box',
    'sample_lambda',
    'sample_pairs',
    'sample_params',
    'sample_partners',
    'target_kind',
    'validate_alpha',
    'validate_input',
    'validate_target',
]

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: rows ``y0:y1`` (dim -2) and columns ``x0:x1`` (dim -1)."""

LamLike = Union[float, Tensor]
"""One λ for the batch (a float), or one per sample (a ``(N,)`` tensor)."""

LABEL_LAMBDA_BITS = 10
"""Label weights are multiples of ``2**-LABEL_LAMBDA_BITS`` (see :func:`label_lambda`)."""


@dataclass(frozen=True)
class CutMixParams:
    """Everything that decides one CutMix of a batch.

    Attributes:
        box: ``(y0, y1, x0, x1)``, already clipped to the image.
        lam: share of each image that stays its own: ``1 - box area / (H * W)``.
        indices: ``indices[i]`` is the partner whose box region sample ``i`` receives.
        weight: the partner's weight inside the box: 1 pastes (CutMix); below 1 blends
            ``(1 - weight) * own + weight * partner`` there (MixUp: the whole image at ``1 - λ``).
            ``lam`` is then ``1 - weight * box area / (H * W)``.
    """

    box: Box
    lam: float
    indices: Tensor
    weight: float = 1.0


# ----------------------------------------------------------------------------- validation


def validate_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float; raise ``ValueError`` unless it is a finite number ``>= 0``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f'alpha must be a number, got {alpha!r}')
    if math.isnan(alpha) or alpha < 0 or math.isinf(alpha):
        raise ValueError(f'alpha must be a finite number >= 0, got {alpha}')
    return float(alpha)


def validate_input(input: object) -> Tensor:
    """Raise unless ``input`` is a ``(N, C, H, W)`` tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f'input must be a torch.Tensor of shape (N, C, H, W), got {type(input).__name__}')
    if input.ndim != 4:
        raise ValueError(f'input must have shape (N, C, H, W), got shape {tuple(input.shape)}')
    return input


def target_kind(target: Tensor, input: Tensor) -> str:
    """Classify ``target``: ``'index'`` (integer ``(N,)``), ``'binary'`` (floating ``(N,)``, as for
    ``BCEWithLogitsLoss``), ``'soft'`` ``(N, K)`` or ``'dense'`` ``(N, ..., H, W)``."""
    if target.ndim >= 3 and tuple(target.shape[-2:]) == tuple(input.shape[-2:]):
        return 'dense'
    if target.ndim == 1:
        return 'binary' if target.is_floating_point() else 'index'
    if target.ndim == 2:
        return 'soft'
    raise ValueError(
        f'target must have shape (N,), (N, num_classes) or (N, ..., H, W) with the input\'s H and W '
        f'{tuple(input.shape[-2:])}, got shape {tuple(target.shape)}',
    )


def validate_target(target: object, input: Tensor) -> str:
    """Raise unless ``target`` fits ``input``; return its kind (see :func:`target_kind`)."""
    if not isinstance(target, Tensor):
        raise TypeError(f'target must be a torch.Tensor, got {type(target).__name__}')
    if target.ndim == 0 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f'target batch size must equal the input batch size {input.shape[0]}, '
            f'got target of shape {tuple(target.shape)}',
        )
    kind = target_kind(target, input)
    if kind == 'index' and (target.is_complex() or target.dtype == torch.bool):
        raise TypeError(
            f'targets of shape (N,) must be integer class indices or floating binary targets, got {target.dtype}',
        )
    return kind


# ----------------------------------------------------------------------------- sampling


def sample_lambda(alpha: float, generator: torch.Generator) -> float:
    """Draw the nominal λ from ``Beta(alpha, alpha)``; ``alpha == 0`` gives ``1.0`` (no mixing).

    Composer's stock code returns λ = 0 for ``alpha == 0`` and then pastes a box covering
    25-100% of the image: the opposite of "disabled". We do not copy that.
    """
    alpha = validate_alpha(alpha)
    if alpha == 0:
        return 1.0
    # numpy's Beta sampler, seeded from the explicit torch generator: no global RNG involved.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device='cpu').item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high, (1,), generator=generator, device='cpu').item())


def sample_box(
    height: int,
    width: int,
    lam: float,
    *,
    uniform_sampling: bool = False,
    generator: torch.Generator,
) -> Box:
    """Sample a box covering about ``1 - lam`` of an ``height x width`` image, clipped at the edges.

    Same distribution as Composer's (and the paper's) ``_rand_bbox``: a box of sides
    ``2 * (int(H * sqrt(1 - lam)) // 2)`` by the same for ``W``, centred uniformly on the image,
    or, with ``uniform_sampling``, on an enlarged range so each pixel is equally likely to be cut.
    """
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    if uniform_sampling:
        cy = _randint(-cut_h // 2, height + cut_h // 2, generator)
        cx = _randint(-cut_w // 2, width + cut_w // 2, generator)
    else:
        cy = _randint(0, height, generator)
        cx = _randint(0, width, generator)
    y0, y1 = _clip(cy - cut_h // 2, height), _clip(cy + cut_h // 2, height)
    x0, x1 = _clip(cx - cut_w // 2, width), _clip(cx + cut_w // 2, width)
    return (y0, y1, x0, x1)


def _clip(v: int, hi: int) -> int:
    return min(max(v, 0), hi)


def box_lambda(box: Box, height: int, width: int) -> float:
    """λ adjusted to the exact pixel ratio: ``1 - box area / (height * width)``."""
    y0, y1, x0, x1 = box
    if height * width == 0:
        return 1.0
    return 1.0 - (max(y1 - y0, 0) * max(x1 - x0, 0)) / (height * width)


def label_lambda(lam: LamLike) -> LamLike:
    """The weight of a sample's own label: λ rounded to the nearest multiple of ``2**-10``.

    The pixel share λ is ``1 - area / (H * W)``, rarely a short binary fraction, and
    ``λ·onehot + (1-λ)·onehot`` then sums to a rounding step under ``N`` over a float32 batch
    about one batch in seven: Composer's ``soft_cross_entropy`` warns ("Some targets have less
    than 1 total probability") and rescales the loss. With a dyadic λ every target entry is a
    multiple of ``2**-10``, each row sums to exactly 1 and the batch to exactly ``N`` (exact in
    float32 for up to ``2**14`` samples a loss call). The label weight differs from the pixel
    share by at most ``2**-11``.
    """
    scale = 1 << LABEL_LAMBDA_BITS
    if isinstance(lam, Tensor):  # per-sample λ: the same rounding (half to even, as Python's round)
        return torch.round(lam * scale) / scale
    return round(lam * scale) / scale


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
        other = (f + 1 + _randint(0, n - 1, generator)) % n
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


def _partners(indices: Optional[Tensor], n: int, *, exclude_self: bool, generator: torch.Generator) -> Tensor:
    """The given partners, checked to be ``n`` indices in ``[0, n)``, or drawn by :func:`sample_partners`."""
    if indices is None:
        return sample_partners(n, exclude_self=exclude_self, generator=generator)
    indices = torch.as_tensor(indices, dtype=torch.long, device=indices.device if isinstance(indices, Tensor)
                              else 'cpu')
    if tuple(indices.shape) != (n,) or (n and (int(indices.min()) < 0 or int(indices.max()) >= n)):
        raise ValueError(f'indices must be a ({n},) tensor of values in [0, {n}), got {indices}')
    return indices


def sample_params(
    n: int,
    height: int,
    width: int,
    *,
    alpha: float = 1.0,
    length: Optional[float] = None,
    box: Optional[Box] = None,
    indices: Optional[Tensor] = None,
    uniform_sampling: bool = False,
    exclude_self: bool = True,
    generator: torch.Generator,
) -> CutMixParams:
    """Sample the box, λ and partners for a batch of ``n`` images of ``height x width``.

    Args:
        n: batch size (the global batch size when mixing across ranks).
        height: image height ``H``.
        width: image width ``W``.
        alpha: Beta(alpha, alpha) concentration for the nominal λ; 0 disables mixing.
        length: if given, the box sides are ``int(length * H)`` by ``int(length * W)``
            (centred at random); ``alpha`` is then not used.
        box: a fixed ``(y0, y1, x0, x1)`` box; ``alpha`` and ``length`` are then not used.
        indices: fixed partners; otherwise drawn by :func:`sample_partners`.
        uniform_sampling: see :func:`sample_box`.
        exclude_self: never pair a sample with itself when ``n > 1``.
        generator: the only source of randomness.

    Returns:
        The parameters; ``lam`` is the exact kept-pixel share of the clipped box.

    Raises:
        ValueError: on a bad ``alpha``, ``length``, ``box`` or ``indices``.
    """
    alpha = validate_alpha(alpha)
    if box is not None and length is not None:
        raise ValueError(f'Cannot provide both length and bbox; got length={length} and bbox={box}')
    indices = _partners(indices, n, exclude_self=exclude_self, generator=generator)
    if box is None:
        if length is not None:
            if not 0 <= length <= 1:
                raise ValueError(f'length must be in [0, 1], got {length}')
            nominal = 1.0 - (int(length * height) * int(length * width)) / max(height * width, 1)
        else:
            nominal = sample_lambda(alpha, generator)
        box = sample_box(height, width, nominal, uniform_sampling=uniform_sampling, generator=generator)
    else:
        y0, y1, x0, x1 = (int(v) for v in box)
        if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
            raise ValueError(f'bbox must lie inside the {height}x{width} image as (y0, y1, x0, x1), got {box}')
        box = (y0, y1, x0, x1)
    return CutMixParams(box=box, lam=box_lambda(box, height, width), indices=indices)


def box_from_composer(bbox: tuple) -> Box:
    """Composer's ``(y0, x0, y1, x1)`` box tuple (it slices ``[:, :, b[0]:b[2], b[1]:b[3]]``) to ours."""
    a, b, c, d = (int(v) for v in bbox)
    return (a, c, b, d)


def box_to_composer(box: Box) -> tuple[int, int, int, int]:
    """Our ``(y0, y1, x0, x1)`` box to Composer's ``(y0, x0, y1, x1)`` tuple."""
    y0, y1, x0, x1 = box
    return (y0, x0, y1, x1)


# ----------------------------------------------------------------------------- applying


def _to_device(t: Tensor, device: Union[str, torch.device]) -> Tensor:
    """``t`` on ``device`` without a host sync: a host tensor bound for CUDA is pinned, then copied ``non_blocking``.

    From pageable memory CUDA stages the copy synchronously, a sync ``torch.cuda.set_sync_debug_mode`` does not
    report; the pinned copy is fresh, so nothing can change it before the device reads it.
    """
    if t.device.type == 'cpu' and torch.device(device).type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _box_is_empty(box: Box) -> bool:
    y0, y1, x0, x1 = box
    return y1 <= y0 or x1 <= x0


def gather_crops(tensor: Tensor, indices: Tensor, box: Box) -> Tensor:
    """``tensor[indices, ..., y0:y1, x0:x1]`` as a new tensor laid out like ``tensor``: only the box is read.

    ``index_select`` is a row copy where advanced indexing runs a generic per-element kernel
    (2-4x slower here). A channels_last batch is gathered in its physical NHWC order, so the crops
    come back channels_last and pasting them is a plain copy rather than a transpose.
    """
    y0, y1, x0, x1 = box
    indices = _to_device(indices, tensor.device)
    if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.index_select(tensor.permute(0, 2, 3, 1)[:, y0:y1, x0:x1], 0, indices).permute(0, 3, 1, 2)
    return torch.index_select(tensor[..., y0:y1, x0:x1], 0, indices)


def paste_crops(tensor: Tensor, crops: Tensor, box: Box, *, inplace: bool = False, weight: float = 1.0) -> Tensor:
    """Write ``crops`` into the box region of ``tensor`` (a copy unless ``inplace``); dtype and layout are kept.

    With ``weight < 1`` the region becomes ``blend(region, crops, weight)`` instead (MixUp's whole image).
    """
    out = tensor if inplace else tensor.clone()  # clone keeps channels_last (preserve_format)
    if not _box_is_empty(box) and tensor.shape[0] and weight > 0:
        y0, y1, x0, x1 = box
        region = out[..., y0:y1, x0:x1]
        if weight == 1:
            region.copy_(crops)
        elif _use_masks(out):
            _blend_into(region, crops, weight)
        else:  # a row at a time through one scratch row: no batch-sized temporary (the global MixUp's arrivals)
            scratch = _Scratch(out)
            for i in range(out.shape[0]):
                _blend_into(region[i], crops[i], weight, scratch)
    return out


def apply_cutmix(input: Tensor, params: CutMixParams, *, inplace: bool = False) -> Tensor:
    """Paste each sample's partner crop into its box region (or blend it there, for ``params.weight < 1``).

    Only the box region is read from the partners and written: with ``inplace=True`` the
    whole batch is never copied.
    """
    if _box_is_empty(params.box) or input.shape[0] == 0 or params.weight == 0:
        return input if inplace else input.clone()
    if params.weight != 1:
        return _apply_blend(input, params, inplace=inplace)
    return paste_crops(input, gather_crops(input, params.indices, params.box), params.box, inplace=inplace)


def apply_mix(input: Tensor, params: Union[CutMixParams, 'PerSampleParams'], *, inplace: bool = False) -> Tensor:
    """Apply any drawn mix (one for the batch, or one per sample): :func:`apply_cutmix` or its per-sample form."""
    if isinstance(params, PerSampleParams):
        return apply_cutmix_per_sample(input, params, inplace=inplace)
    return apply_cutmix(input, params, inplace=inplace)


def _apply_blend(input: Tensor, params: CutMixParams, *, inplace: bool) -> Tensor:
    """One weight and region for the batch, below 1: blend each sample's region with its partner's."""
    n = input.shape[0]
    y0, y1, x0, x1 = params.box
    w = params.weight
    if not _use_masks(input):  # a row at a time: each row's operands stay in cache (CPU, larger images)
        boxes = [list(params.box)] * n
        if inplace:
            _paste_along_cycles(input, params.indices.tolist(), boxes, [w] * n)
            return input
        out = torch.empty_like(input)
        full = params.box == (0, input.shape[-2], 0, input.shape[-1])
        scratch = _Scratch(input)
        for i, j in enumerate(params.indices.tolist()):
            if not full:
                out[i].copy_(input[i])
            _blend_into(out[i, ..., y0:y1, x0:x1], input[j, ..., y0:y1, x0:x1], w, scratch,
                       own=input[i, ..., y0:y1, x0:x1])
        return out
    crops = gather_crops(input, params.indices, params.box)
    if not _fast_blend(input):
        return paste_crops(input, crops, params.box, inplace=inplace, weight=w)
    crops.mul_(w)  # our own copy: scaled in place, no second temporary
    if not inplace and params.box == (0, input.shape[-2], 0, input.shape[-1]):
        return torch.mul(input, 1.0 - w).add_(crops)  # the whole image: no clone first (keeps the layout)
    out = input if inplace else input.clone()
    out[..., y0:y1, x0:x1].mul_(1.0 - w).add_(crops)
    return out


def _fast_blend(tensor: Tensor) -> bool:
    """float32/float64: :func:`blend`'s two products and sum can be computed in place, with the same rounding."""
    return tensor.dtype in (torch.float32, torch.float64)


class _Scratch:
    """One reusable buffer of up to a sample's size, for the partner's product in a row-by-row blend."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buf: Optional[Tensor] = None

    def shaped(self, shape: torch.Size) -> Tensor:
        if self.buf is None:
            self.buf = self.like.new_empty(self.like[0].numel() if self.like.shape[0] else 0)
        return self.buf[:math.prod(shape)].view(shape)


def _blend_into(dst: Tensor, partner: Tensor, weight: float, scratch: Optional[_Scratch] = None, *,
               own: Optional[Tensor] = None) -> Tensor:
    """``dst[...] = blend(own, partner, weight)`` (``own`` defaults to ``dst``), bit for bit as :func:`blend`.

    float32/float64 compute ``own * (1 - weight)`` straight into ``dst`` and ``partner * weight`` into one
    scratch buffer, then add: the same two rounded products and rounded sum as :func:`blend`, without its
    three temporaries (each a fresh allocation, and fresh pages, per call). Other dtypes go through :func:`blend`.
    """
    own = dst if own is None else own
    if not _fast_blend(dst) or partner.dtype != dst.dtype or own.dtype != dst.dtype:
        dst.copy_(blend(own, partner, weight))
        return dst
    taken = torch.mul(partner, weight) if scratch is None \
        else torch.mul(partner, weight, out=scratch.shaped(partner.shape))
    if own is dst:
        dst.mul_(1.0 - weight)
    else:
        torch.mul(own, 1.0 - weight, out=dst)
    return dst.add_(taken)


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
        keep = _to_device((1.0 - w).to(compute).reshape(shape), own.device)
        take = _to_device(w.to(compute).reshape(shape), own.device)
        mixed = a * keep + b * take
    else:
        mixed = a * (1.0 - weight) + b * weight
    if mixed.dtype == own.dtype:
        return mixed
    if not own.is_floating_point():
        mixed = mixed.round_()
    return mixed.to(own.dtype)


def mix_targets(
    target: Tensor,
    partner: Tensor,
    lam: float,
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
        lam: the exact kept share, from :class:`CutMixParams`.
        box: the pasted box.
        kind: ``'index'``, ``'binary'``, ``'soft'`` or ``'dense'`` (see :func:`target_kind`).
        num_classes: number of classes, required for index targets.
        validate: check that index targets lie in ``[0, num_classes)`` (a device sync on CUDA);
            ``False`` where the caller has checked them already.
        smoothing: label smoothing ``ε``: class targets become ``(1 - ε) * mixed + ε / C``.
        weight: for dense targets, the partner's weight inside the box (below 1 blends float maps).
        multi_label: soft ``(N, C)`` targets are multi-hot, every class its own binary label: smoothing
            moves each entry toward 1/2, ``(1 - ε) * mixed + ε / 2`` (timm's ``multi_label``).

    Returns:
        Dense targets with the partner box pasted (or blended); otherwise ``l * own + (1 - l) * partner``
        with the label weight ``l = label_lambda(lam)`` (index targets become one-hot first, as float32),
        so one-hot rows sum to exactly 1; then smoothed.

    Raises:
        ValueError: if index targets lack ``num_classes`` or fall outside ``[0, num_classes)``, or for
            smoothing of targets without a class axis.
    """
    if smoothing and kind in ('dense', 'binary'):
        raise ValueError(
            f'label_smoothing spreads ε over a class axis: it takes index (N,) or soft (N, C) targets, '
            f'got {kind} targets of shape {tuple(target.shape)} with label_smoothing={smoothing}'
            + (' (floating (N,) targets are read as binary probabilities; class indices must be an integer tensor: '
               'pass target.long())' if kind == 'binary' else ''),
        )
    if kind == 'dense':
        y0, y1, x0, x1 = box
        if partner.shape[-2:] == target.shape[-2:] and not _box_is_empty(box):
            partner = partner[..., y0:y1, x0:x1]
        return paste_crops(target, partner, box, weight=_dense_weight(target, weight))
    if kind == 'index':
        if num_classes is None:
            raise ValueError('num_classes is required to mix index targets, got num_classes=None')
        if validate:
            check_labels(torch.cat([target.reshape(-1), partner.reshape(-1)]), num_classes)
        own = _one_hot(target, num_classes)
        other = _one_hot(partner, num_classes)
    else:
        own, other = target, partner.to(target.dtype)
        if not own.is_floating_point():
            own, other = own.float(), other.float()
    keep = label_lambda(lam)
    if isinstance(keep, Tensor):  # one weight per sample, broadcast over the class axis
        keep = _to_device(keep.to(own.dtype), own.device).reshape(-1, *([1] * (own.ndim - 1)))
    mixed = own * keep + other * (1.0 - keep)
    if smoothing:
        mixed = mixed * (1.0 - smoothing) + smoothing / (2 if multi_label else mixed.shape[1])
    return mixed


def _dense_weight(target: Tensor, weight: float) -> float:
    """A dense target's blend weight; class-index maps cannot be blended."""
    if weight not in (0, 1) and not target.is_floating_point():
        raise ValueError(
            f'MixUp blends dense targets only as floating maps (N, C, H, W) of class probabilities; got {target.dtype} '
            f'class-index maps of shape {tuple(target.shape)}, which would need the class count to become soft. '
            f'Use CutMix for index maps (it pastes them), or pass one-hot float maps',
        )
    return weight


def validate_binary(target: Tensor) -> None:
    """Raise unless floating ``(N,)`` targets, mixed as binary probabilities, lie in ``[0, 1]`` (one sync at most).

    Floating class indices (``3.0``) would otherwise mix into meaningless numbers (``3.0`` and ``1.0`` into
    ``1.875``) and fail later in the loss.
    """
    if target.numel():
        low, high = (float(v) for v in torch.stack(torch.aminmax(target.detach())).tolist())
        if not (0 <= low and high <= 1):  # NaN fails too
            raise ValueError(
                f'floating targets of shape (N,) are mixed as binary probabilities in [0, 1], got values in '
                f'[{low}, {high}]; class indices must be an integer tensor: pass target.long()',
            )


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise unless every index label lies in ``[0, num_classes)``; one device sync at most."""
    if labels.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f'index targets must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]',
            )



def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    out = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0)


# ----------------------------------------------------------------------------- per-sample boxes


@dataclass(frozen=True)
class PerSampleParams:
    """Per-sample CutMix of a batch: every sample its own box and λ.

    Attributes:
        boxes: ``(N, 4)`` int64 ``(y0, y1, x0, x1)`` per sample, clipped to the image.
        lam: ``(N,)`` float64, each sample's exact kept pixel share ``1 - area_i / (H * W)``.
        indices: ``indices[i]`` is the partner whose pixels inside ``boxes[i]`` sample ``i`` receives.
        weights: ``(N,)`` float64, each partner's weight inside its box (see :class:`CutMixParams`);
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


def box_areas(boxes: Tensor) -> Tensor:
    """The area of each ``(y0, y1, x0, x1)`` box of a ``(K, 4)`` tensor (an inverted box has none)."""
    return (boxes[:, 1] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 2]).clamp(min=0)


def boxes_lambda(boxes: Tensor, height: int, width: int) -> Tensor:
    """Each box's exact kept share ``1 - area / (height * width)`` as float64."""
    return 1.0 - box_areas(boxes).to(torch.float64) / max(height * width, 1)


def sample_params_per_sample(
    n: int,
    height: int,
    width: int,
    *,
    alpha: float = 1.0,
    uniform_sampling: bool = False,
    exclude_self: bool = True,
    generator: torch.Generator,
) -> PerSampleParams:
    """Sample partners, and for every sample its own λ ~ Beta(alpha, alpha) and box.

    Each box follows the distribution of :func:`sample_box` for its own λ (sides
    ``2 * (int(H * sqrt(1 - λ)) // 2)``, centre uniform on the image or, with ``uniform_sampling``,
    on the enlarged range), drawn for all samples at once. The draws depend only on ``generator``
    and ``n``: in global mode every rank draws the whole global batch's boxes identically.
    """
    alpha = validate_alpha(alpha)
    indices = sample_partners(n, exclude_self=exclude_self, generator=generator)
    if alpha == 0:
        nominal = torch.ones(n, dtype=torch.float64, device='cpu')
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device='cpu').item())
        nominal = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n))
    boxes = boxes_for_lambda(nominal, height, width, uniform_sampling=uniform_sampling, generator=generator)
    return PerSampleParams(boxes=boxes, lam=boxes_lambda(boxes, height, width), indices=indices)


def boxes_for_lambda(nominal: Tensor, height: int, width: int, *, uniform_sampling: bool = False,
                     generator: torch.Generator) -> Tensor:
    """One box per nominal λ, each drawn as :func:`sample_box` draws it, all at once: ``(K, 4)`` int64."""
    n = nominal.shape[0]
    ratio = torch.sqrt(1.0 - nominal)
    cut_h, cut_w = (height * ratio).long(), (width * ratio).long()  # int() of a non-negative float: floor
    if uniform_sampling:
        low_y, high_y = torch.div(-cut_h, 2, rounding_mode='floor'), height + cut_h // 2
        low_x, high_x = torch.div(-cut_w, 2, rounding_mode='floor'), width + cut_w // 2
    else:
        low_y, high_y = torch.zeros_like(cut_h), torch.full_like(cut_h, height)
        low_x, high_x = torch.zeros_like(cut_w), torch.full_like(cut_w, width)
    u = torch.rand(2, n, dtype=torch.float64, generator=generator, device='cpu')
    cy = low_y + (u[0] * (high_y - low_y)).long()
    cx = low_x + (u[1] * (high_x - low_x)).long()
    boxes = torch.stack([
        (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height),
        (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width),
    ], dim=1)
    return boxes


# A sample of at most this many elements is mixed by masks over the whole batch; a larger one by a
# copy per sample. Measured on CPU (1 thread): masks win at 256x3x32x32 (1.3 ms against 5.2 ms),
# per-sample copies at 64x3x128x128 (2.7 against 5.2 ms) and 64x3x224x224 (5.0 against 44 ms).
# On CUDA masks always: a copy per sample is a kernel launch per sample.
_MASK_MAX_SAMPLE_NUMEL = 8192


def _use_masks(tensor: Tensor) -> bool:
    return tensor.is_cuda or tensor[0:1].numel() <= _MASK_MAX_SAMPLE_NUMEL


def _box_masks(boxes: Tensor, height: int, width: int, device: torch.device, channels_last: int = 0) -> Tensor:
    """``(K, 1, H, W)`` bool, True inside each box; with ``channels_last=C``, ``(K, H, W * C)`` for NHWC memory."""
    boxes = _to_device(boxes, device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width * max(channels_last, 1), device=device) // max(channels_last, 1)
    inside_y = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])).to(torch.uint8)
    inside_x = ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])).to(torch.uint8)
    # an outer product of 0/1 bytes: faster on CPU than a broadcast logical and
    mask = (inside_y[:, :, None] * inside_x[:, None, :]).bool()
    return mask if channels_last else mask[:, None]


def _channels_last(x: Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _as_4d(tensor: Tensor) -> Tensor:
    """``(N, ..., H, W)`` as ``(N, K, H, W)`` (a view where the layout allows)."""
    return tensor.reshape(tensor.shape[0], -1, *tensor.shape[-2:]) if tensor.ndim != 4 else tensor


def gather_box_pixels(tensor: Tensor, rows: Tensor, boxes: Tensor) -> Tensor:
    """Row ``rows[k]``'s pixels inside ``boxes[k]``, for every ``k``, end to end as one 1-D tensor.

    Each crop is laid out ``(..., h_k, w_k)`` in logical (row-major) order, whatever the memory
    format. Only the boxes are read (or, with masks, the selected rows).
    """
    x = _as_4d(tensor)
    if len(rows) == 0:
        return x.new_empty(0)
    if _use_masks(x):
        selected = x.index_select(0, _to_device(rows, x.device)).contiguous()
        # a mask expanded to the full shape: masked_select over a broadcast mask is several times slower
        mask = _box_masks(boxes, x.shape[-2], x.shape[-1], x.device).expand(selected.shape).contiguous()
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
    x = _as_4d(tensor)
    if len(rows) == 0 or pixels.numel() == 0:
        return tensor
    if weights is not None and bool((weights == 1).all()):
        weights = None
    if _use_masks(x):
        rows = _to_device(rows, x.device)
        region = x.index_select(0, rows).contiguous()
        mask = _box_masks(boxes, x.shape[-2], x.shape[-1], x.device).expand(region.shape).contiguous()
        if weights is None:
            region.masked_scatter_(mask, pixels)
        else:
            partner = region.clone()
            partner.masked_scatter_(mask, pixels)
            region = torch.where(mask, _take_or_blend(region, partner, weights), region)
        x.index_copy_(0, rows, region)
        return tensor
    areas = (box_areas(boxes) * x.shape[1]).tolist()
    weight_list = [1.0] * len(areas) if weights is None else weights.tolist()
    scratch = _Scratch(x)
    for i, (y0, y1, x0, x1), crop, w in zip(rows.tolist(), boxes.tolist(), pixels.split(areas), weight_list,
                                            strict=True):
        if crop.numel():
            crop = crop.view(x.shape[1], y1 - y0, x1 - x0)
            if w == 1:
                x[i, :, y0:y1, x0:x1] = crop
            else:
                _blend_into(x[i, :, y0:y1, x0:x1], crop, w, scratch)
    return tensor


def _take_or_blend(own: Tensor, partner: Tensor, weights: Tensor) -> Tensor:
    """Per row: ``partner`` where the weight is 1 (exactly its pixels), else :func:`blend`."""
    take = _to_device((weights == 1).reshape((-1,) + (1,) * (own.ndim - 1)), own.device)
    if not (_fast_blend(own) and partner.dtype == own.dtype):
        return torch.where(take, partner, blend(own, partner, weights))
    # blend's two products and sum, written into one buffer: two temporaries instead of four
    w = weights.to(torch.float64)
    shape = (-1,) + (1,) * (own.ndim - 1)
    keep = _to_device((1.0 - w).to(own.dtype).reshape(shape), own.device)
    taken = _to_device(w.to(own.dtype).reshape(shape), own.device)
    out = torch.mul(own, keep)
    out.add_(torch.mul(partner, taken))
    return torch.where(take, partner, out, out=out)


def apply_cutmix_per_sample(input: Tensor, params: PerSampleParams, *, inplace: bool = False) -> Tensor:
    """Paste into each sample its partner's pixels inside the sample's own box.

    Every sample receives its partner's own, unmixed pixels (as in batch mode). dtype and memory
    format are kept. On CUDA (and for small images) one masked blend over the batch, with no host
    sync; on CPU for larger images one copy per sample, straight from partner to sample.
    """
    if input.shape[0] == 0:
        return input if inplace else input.clone()
    weights = None if params.pastes_only else params.weights
    if _use_masks(input):
        return _blend_boxes(input, params.indices, params.boxes, input if inplace else None, weights)
    weight_list = [1.0] * input.shape[0] if weights is None else weights.tolist()
    if not inplace:
        out = input.clone()
        scratch = _Scratch(input)
        for i, j, (y0, y1, x0, x1), w in zip(range(len(out)), params.indices.tolist(), params.boxes.tolist(),
                                             weight_list, strict=True):
            if w == 1:
                out[i, :, y0:y1, x0:x1] = input[j, :, y0:y1, x0:x1]
            elif w > 0 and y1 > y0 and x1 > x0:
                _blend_into(out[i, :, y0:y1, x0:x1], input[j, :, y0:y1, x0:x1], w, scratch)
        return out
    _paste_along_cycles(input, params.indices.tolist(), params.boxes.tolist(), weight_list)
    return input


def _paste_along_cycles(x: Tensor, partners: list[int], boxes: list[list[int]],
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
    scratch = _Scratch(x)

    def put(i: int, box: list[int], source: Tensor) -> None:
        y0, y1, x0, x1 = box
        if weights[i] == 1:
            x[i, :, y0:y1, x0:x1] = source
        elif weights[i] > 0 and y1 > y0 and x1 > x0:
            _blend_into(x[i, :, y0:y1, x0:x1], source, weights[i], scratch)

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
    x = _as_4d(tensor)
    indices = _to_device(indices, x.device)
    if _channels_last(x):  # index_select returns NCHW; gather the NHWC rows instead, keeping the layout
        partners = x.permute(0, 2, 3, 1).index_select(0, indices).permute(0, 3, 1, 2)
    else:
        partners = x.index_select(0, indices)
    if out is None:
        out = torch.empty_like(tensor)  # preserve_format: a channels_last batch stays channels_last
    o = _as_4d(out)
    if weights is not None:
        partners = _take_or_blend(x, partners, weights)
    if _channels_last(x) and _channels_last(partners) and _channels_last(o):
        # in NHWC memory, a mask broadcast over the innermost channels is slow: blend (N, H, W*C) rows instead
        n, c, h, w = x.shape
        flat = [t.permute(0, 2, 3, 1).reshape(n, h, w * c) for t in (partners, x, o)]
        mask = _box_masks(boxes, h, w, x.device, channels_last=c)
        torch.where(mask, flat[0], flat[1], out=flat[2])
    else:
        torch.where(_box_masks(boxes, x.shape[-2], x.shape[-1], x.device), partners, x, out=o)
    return out


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
    box already gathered (1-D, as :func:`gather_box_pixels` lays them out); they are pasted into a
    copy of ``target`` (blended where ``weights`` are below 1). Other kinds mix with each sample's
    label weight ``label_lambda(lam[i])``, then are smoothed.
    """
    if kind != 'dense':
        return mix_targets(target, partner, lam, (0, 0, 0, 0), kind=kind, num_classes=num_classes, validate=validate,
                           smoothing=smoothing, multi_label=multi_label)
    if smoothing:
        mix_targets(target, partner, lam, (0, 0, 0, 0), kind=kind, smoothing=smoothing)  # raises, naming the kind
    if weights is not None:
        active = box_areas(boxes) > 0
        if bool(((weights != 1) & (weights != 0) & active).any()):
            _dense_weight(target, 0.5)  # raises for index maps
        else:
            weights = None
    rows = torch.arange(target.shape[0], device='cpu')
    if partner.ndim == 1:
        return paste_box_pixels(target.clone(), rows, partner, boxes, weights)
    if _use_masks(_as_4d(target)):
        mask = _box_masks(boxes, target.shape[-2], target.shape[-1], target.device)
        source = _as_4d(partner) if weights is None else _take_or_blend(_as_4d(target), _as_4d(partner), weights)
        return torch.where(mask, source, _as_4d(target)).reshape(target.shape)
    return paste_box_pixels(target.clone(), rows, gather_box_pixels(partner, rows, boxes), boxes, weights)


# ----------------------------------------------------------------------------- drop-in API


def cutmix_batch(
    input: Tensor,
    target: Tensor,
    length: Optional[float] = None,
    alpha: float = 1.0,
    bbox: Optional[tuple] = None,
    indices: Optional[Tensor] = None,
    uniform_sampling: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, float, tuple[int, int, int, int]]:
    """Drop-in for ``composer.functional.cutmix_batch``, with explicit randomness.

    Pastes one box region, the same for the whole batch, from each sample's partner into it.

    Args:
        input: images ``(N, C, H, W)``, any float dtype or uint8, any memory format.
        target: index ``(N,)``, soft ``(N, K)`` or dense ``(N, ..., H, W)`` targets.
        length: relative side of the box: ``int(length * H)`` by ``int(length * W)``.
            (Composer's code feeds ``length`` through λ and cuts a box of side
            ``sqrt(1 - length**2)`` instead; we follow its documentation.)
        alpha: Beta(alpha, alpha) concentration of λ; 0 disables mixing (λ = 1).
        bbox: a fixed box in Composer's ``(y0, x0, y1, x1)`` form.
        indices: the partner of each sample; by default a permutation without fixed points.
        uniform_sampling: sample the box centre so every pixel is equally likely to be cut.
        generator: source of randomness; a fresh unseeded generator if ``None``.

    Returns:
        ``(mixed_input, target_perm, lam, bbox)`` as Composer returns them: the mixed copy of
        ``input``, the partners' targets ``target[indices]``, the exact kept share λ and the box in
        Composer's ``(y0, x0, y1, x1)`` form. Use :func:`mix_targets` for the mixed targets.

    Raises:
        ValueError: for both ``length`` and ``bbox``, a bad ``alpha``, or malformed tensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixed, y_perm, lam, bbox = cutmix_batch(x, y, alpha=1.0, generator=g)
        >>> mixed.shape, 0.0 <= lam <= 1.0
        (torch.Size([4, 3, 8, 8]), True)
    """
    validate_input(input)
    validate_target(target, input)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    params = sample_params(
        input.shape[0], input.shape[-2], input.shape[-1],
        alpha=alpha, length=length,
        box=None if bbox is None else box_from_composer(bbox),
        indices=indices, uniform_sampling=uniform_sampling, generator=generator,
    )
    mixed = apply_cutmix(input, params)
    return mixed, target[params.indices.to(target.device)], params.lam, box_to_composer(params.box)


def mixup_batch(
    input: Tensor,
    target: Tensor,
    mixing: Optional[float] = None,
    alpha: float = 0.2,
    indices: Optional[Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, float]:
    """Drop-in for ``composer.functional.mixup_batch``, with explicit randomness.

    Blends every sample with its partner: ``(1 - mixing) * input + mixing * input[indices]``.

    Args:
        input: images ``(N, C, H, W)``, any float dtype or uint8 (rounded to nearest), any memory format.
        target: targets ``(N, ...)``; only permuted here.
        mixing: the partner's weight in ``[0, 1]``; by default ``min(z, 1 - z)``, ``z ~ Beta(alpha, alpha)``,
            rounded to a multiple of ``2**-10`` (so ``λ·y + (1-λ)·y'`` one-hot rows sum to exactly 1).
            A given ``mixing`` is used as it is.
        alpha: Beta(alpha, alpha) concentration; 0 means no mixing.
        indices: the partner of each sample; by default a permutation without fixed points.
        generator: source of randomness; a fresh unseeded generator if ``None``.

    Returns:
        ``(mixed_input, target_perm, mixing)`` as Composer returns them.

    Raises:
        ValueError: for a bad ``alpha``, ``mixing`` or ``indices``, or malformed tensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixed, y_perm, mixing = mixup_batch(x, y, alpha=0.2, generator=g)
        >>> mixed.shape, 0.0 <= mixing <= 0.5
        (torch.Size([4, 3, 8, 8]), True)
    """
    validate_input(input)
    validate_target(target, input)
    validate_alpha(alpha)
    if mixing is not None and (isinstance(mixing, bool) or not isinstance(mixing, (int, float))
                               or math.isnan(mixing) or not 0 <= mixing <= 1):
        raise ValueError(f'mixing must be a number in [0, 1], got mixing={mixing!r}')
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    n, _, h, w = input.shape
    indices = _partners(indices, n, exclude_self=True, generator=generator)
    if mixing is None:
        z = sample_lambda(alpha, generator)
        mixing = label_lambda(min(z, 1.0 - z))
    params = CutMixParams(box=(0, h, 0, w), lam=1.0 - float(mixing), indices=indices, weight=float(mixing))
    return apply_cutmix(input, params), target[indices.to(target.device)], float(mixing)
