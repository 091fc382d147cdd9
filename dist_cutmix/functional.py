"""The Composer-compatible functional API: ``cutmix_batch`` and ``mixup_batch``, with explicit randomness.

Drop-ins for ``composer.functional.cutmix_batch`` and ``mixup_batch``: the same arguments and return values,
plus ``generator=``. They draw through :func:`dist_cutmix.draw.sample_mix` and apply through
:mod:`dist_cutmix.pixels`, as the mixers do. Composer's box tuple is ``(y0, x0, y1, x1)`` (Composer names it
``(x1, y1, x2, y2)`` but slices its first and third entries on the height axis); ours is ``(y0, y1, x0, x1)``:
:func:`box_from_composer` and :func:`box_to_composer` convert.

Names that lived here before the package was split into modules (``sample_partners``, ``apply_cutmix``,
``mix_targets``, ...) still resolve from this module, to their new homes (``_MOVED`` below).
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cutmix.draw import Box, MixParams, PerSampleMixParams, kept_share, sample_boxes, sample_mix
from dist_cutmix.pixels import apply_batch
from dist_cutmix.spec import MixSpec
from dist_cutmix.validation import (
    check_box_inside,
    check_input,
    check_partners,
    check_probability,
    check_target,
)

__all__ = [
    'box_from_composer',
    'box_to_composer',
    'cutmix_batch',
    'mixup_batch',
    'sample_params',
    'sample_params_per_sample',
]


def box_from_composer(bbox: tuple) -> Box:
    """Composer's ``(y0, x0, y1, x1)`` box tuple (it slices ``[:, :, b[0]:b[2], b[1]:b[3]]``) to ours."""
    a, b, c, d = (int(v) for v in bbox)
    return (a, c, b, d)


def box_to_composer(box: Box) -> tuple[int, int, int, int]:
    """Our ``(y0, y1, x0, x1)`` box to Composer's ``(y0, x0, y1, x1)`` tuple."""
    y0, y1, x0, x1 = box
    return (y0, x0, y1, x1)


def _fresh_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


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
) -> MixParams:
    """Draw Composer's CutMix of a batch of ``n`` images of ``height x width``: one box, λ and partners.

    Args:
        n: batch size (the global batch size when mixing across ranks).
        height: image height ``H``.
        width: image width ``W``.
        alpha: Beta(alpha, alpha) concentration for the drawn λ; 0 disables mixing.
        length: if given, the box sides are about ``length * H`` by ``length * W`` (centred at random);
            ``alpha`` is then not used.
        box: a fixed ``(y0, y1, x0, x1)`` box; ``alpha`` and ``length`` are then not used.
        indices: fixed partners; otherwise drawn.
        uniform_sampling: box centres on the enlarged range (see :func:`dist_cutmix.draw.sample_boxes`).
        exclude_self: never pair a sample with itself when ``n > 1``.
        generator: the only source of randomness.

    Returns:
        The parameters; ``lam`` is the exact kept-pixel share of the clipped box.

    Raises:
        ValueError: on a bad ``alpha``, ``length``, ``box`` or ``indices``.
    """
    spec = MixSpec.cutmix(alpha, uniform_sampling)
    if box is not None and length is not None:
        raise ValueError(f'Cannot provide both length and bbox; got length={length} and bbox={box}')
    params = sample_mix(spec if box is None and length is None else MixSpec.cutmix(0.0), n, height, width,
                        exclude_self=exclude_self, generator=generator)
    if box is not None:
        box = check_box_inside(box, height, width)
    elif length is not None:
        if not 0 <= length <= 1:
            raise ValueError(f'length must be in [0, 1], got length={length}')
        drawn = 1.0 - (int(length * height) * int(length * width)) / max(height * width, 1)
        lam = torch.tensor([drawn], dtype=torch.float64, device='cpu')
        box = tuple(int(v) for v in sample_boxes(lam, height, width, uniform_sampling=uniform_sampling,
                                                 generator=generator)[0])
    if box is not None:
        lam = float(kept_share(torch.tensor([box], device='cpu'), height, width)[0])
        params = MixParams(box=box, lam=lam, indices=params.indices)  # type: ignore[arg-type]
    return params if indices is None else replace(params, indices=check_partners(indices, n))


def sample_params_per_sample(
    n: int,
    height: int,
    width: int,
    *,
    alpha: float = 1.0,
    uniform_sampling: bool = False,
    exclude_self: bool = True,
    generator: torch.Generator,
) -> PerSampleMixParams:
    """Draw partners, and for every sample its own λ ~ Beta(alpha, alpha) and box (CutMix per sample)."""
    spec = MixSpec.cutmix(alpha, uniform_sampling)
    return sample_mix(spec, n, height, width, per_sample=True, exclude_self=exclude_self,  # type: ignore[return-value]
                      generator=generator)


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
        Composer's ``(y0, x0, y1, x1)`` form. Use :func:`dist_cutmix.targets.mix_targets` for the mixed targets.

    Raises:
        ValueError: for both ``length`` and ``bbox``, a bad ``alpha``, or malformed tensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixed, y_perm, lam, bbox = cutmix_batch(x, y, alpha=1.0, generator=g)
        >>> mixed.shape, 0.0 <= lam <= 1.0
        (torch.Size([4, 3, 8, 8]), True)
    """
    check_target(target, check_input(input))
    params = sample_params(
        input.shape[0], input.shape[-2], input.shape[-1],
        alpha=alpha, length=length,
        box=None if bbox is None else box_from_composer(bbox),
        indices=indices, uniform_sampling=uniform_sampling, generator=_fresh_generator(generator),
    )
    mixed = apply_batch(input, params)
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
    check_target(target, check_input(input))
    spec = MixSpec.mixup(alpha)
    if mixing is not None:
        mixing = check_probability(mixing, 'mixing')
    n, _, h, w = input.shape
    params = sample_mix(spec, n, h, w, generator=_fresh_generator(generator))
    if mixing is not None:
        params = MixParams(box=(0, h, 0, w), lam=1.0 - mixing, indices=params.indices, weight=mixing)
    if indices is not None:
        params = replace(params, indices=check_partners(indices, n))
    return apply_batch(input, params), target[params.indices.to(target.device)], params.weight


# Names of the single functional module this package had before it was split, and where each lives now.
_MOVED = {
    'Box': 'dist_cutmix.draw', 'MixParams': 'dist_cutmix.draw', 'PerSampleMixParams': 'dist_cutmix.draw',
    'box_areas': 'dist_cutmix.draw', 'sample_partners': 'dist_cutmix.draw', 'sample_mix': 'dist_cutmix.draw',
    'apply_mix': 'dist_cutmix.pixels', 'gather_crops': 'dist_cutmix.pixels', 'paste_crops': 'dist_cutmix.pixels',
    'gather_box_pixels': 'dist_cutmix.pixels_per_sample', 'paste_box_pixels': 'dist_cutmix.pixels_per_sample',
    'blend': 'dist_cutmix.blend', 'mix_targets': 'dist_cutmix.targets',
    'mix_targets_per_sample': 'dist_cutmix.targets', 'target_kind': 'dist_cutmix.validation',
    'check_labels': 'dist_cutmix.validation',
}
_RENAMED = {
    'CutMixParams': ('dist_cutmix.draw', 'MixParams'), 'PerSampleParams': ('dist_cutmix.draw', 'PerSampleMixParams'),
    'apply_cutmix': ('dist_cutmix.pixels', 'apply_mix'),
    'apply_cutmix_per_sample': ('dist_cutmix.pixels_per_sample', 'apply_per_sample'),
    'boxes_for_lambda': ('dist_cutmix.draw', 'sample_boxes'), 'boxes_lambda': ('dist_cutmix.draw', 'kept_share'),
    'label_lambda': ('dist_cutmix.draw', 'on_label_grid'), 'validate_alpha': ('dist_cutmix.validation', 'check_alpha'),
    'validate_input': ('dist_cutmix.validation', 'check_input'),
    'validate_target': ('dist_cutmix.validation', 'check_target'),
    'validate_binary': ('dist_cutmix.validation', 'check_binary_targets'),
}


def __getattr__(name: str) -> Any:
    module, new = _RENAMED.get(name, (_MOVED.get(name), name))
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(module), new)
