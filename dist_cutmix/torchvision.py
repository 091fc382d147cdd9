"""Drop-ins for torchvision's ``v2.CutMix`` and ``v2.MixUp`` that draw their own randomness and can mix across ranks.

``from dist_cutmix.torchvision import CutMix, MixUp, RandomChoice`` in place of ``from torchvision.transforms import
v2``: the same keyword-only ``alpha``, ``num_classes`` and ``labels_getter``, the same inputs (``t(images, labels)``,
``t((images, labels))``, a ``default_collate`` result in a ``collate_fn``, dicts the default labels getter reads,
``tv_tensors.Image`` / ``Video``), the same outputs (an ``Image`` stays an ``Image``; labels become float ``(N, C)``
mixed one-hot rows), and the same kind of error for what torchvision refuses. Added, keyword-only: ``pool`` (where
partners come from: ``'local'`` this batch, ``'global'`` the ranks' batches end to end, ``'node'`` this node's
ranks), ``seed`` and ``group``. Each object is a thin adapter over one :class:`~dist_cutmix.Mixer`.

What differs by design: partners are a random permutation without fixed points (torchvision pairs sample ``i`` with
``i - 1``, ``roll(1, 0)``, and asks for a shuffled batch); draws come from ``(seed, batch)`` through a counter-based
generator, not from torch's global RNG; label weights lie on the ``2**-10`` grid (at most ``2**-11`` from the pixel
share, so one-hot rows sum to exactly 1). ``v2.RandomChoice([cutmix, mixup])`` becomes :class:`RandomChoice` from this
module: one switching mix whose choice is drawn with the rest of the batch's mix, the same on every rank.

torchvision is not needed: tv_tensors and PIL images are recognised when torchvision (or PIL) is already imported,
which any such object implies, and plain tensors need neither.
"""
from __future__ import annotations

import collections.abc
import math
import os
import sys
from contextlib import suppress
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten  # what torchvision's v2 transforms flatten with
from torch.utils.data import get_worker_info

from dist_cutmix.distributed import ProcessGroup
from dist_cutmix.loop import Mixer
from dist_cutmix.mixer import MixResult
from dist_cutmix.randomness import batch_generator
from dist_cutmix.spec import MixSpec
from dist_cutmix.validation import check_pool

__all__ = ['CutMix', 'MixInputError', 'MixUp', 'RandomChoice']

LabelsGetter = Union[str, Callable[[Any], Any], None]


class MixInputError(ValueError, RuntimeError):
    """A bad argument or input that torchvision refuses with a ``RuntimeError`` from a torch op (labels and
    ``num_classes`` in ``one_hot``, a bool ``alpha`` in its Beta sampler): a ``ValueError``, as every check of ours,
    and the ``RuntimeError`` torchvision raises."""


# ------------------------------------------------------------------------------------------- torchvision's types


def _tv_tensors() -> Any:
    """torchvision's ``tv_tensors`` module if torchvision is imported (any tv_tensor implies it), else ``None``."""
    return sys.modules.get('torchvision.tv_tensors')


def _is_tv(value: Any, *names: str) -> bool:
    tv = _tv_tensors()
    return tv is not None and any(isinstance(value, getattr(tv, n)) for n in names if hasattr(tv, n))


def _is_pure_tensor(value: Any) -> bool:
    """A tensor that is no tv_tensor (torchvision's ``is_pure_tensor``)."""
    return isinstance(value, Tensor) and not _is_tv(value, 'TVTensor')


def _is_pil(value: Any) -> bool:
    pil = sys.modules.get('PIL.Image')
    return pil is not None and isinstance(value, pil.Image)


def _find_labels_default_heuristic(inputs: Any) -> Any:
    """torchvision's default labels getter: the second item of a tuple/list, or a ``'labels'``/``'*label*'`` key."""
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[1]
    if _is_pure_tensor(inputs):  # MixUp, CutMix
        return inputs
    if not isinstance(inputs, collections.abc.Mapping):
        raise ValueError(
            f'When using the default labels_getter, the input passed to forward must be a dictionary or a two-tuple '
            f'whose second item is a dictionary or a tensor, but got {inputs} instead.'
        )
    candidate_key = None
    with suppress(StopIteration):
        candidate_key = next(key for key in inputs.keys() if key.lower() == 'labels')
    if candidate_key is None:
        with suppress(StopIteration):
            candidate_key = next(key for key in inputs.keys() if 'label' in key.lower())
    if candidate_key is None:
        raise ValueError(
            'Could not infer where the labels are in the sample. Try passing a callable as the labels_getter '
            'parameter? If there are no labels in the sample by design, pass labels_getter=None.'
        )
    return inputs[candidate_key]


def _parse_labels_getter(labels_getter: LabelsGetter) -> Callable[[Any], Any]:
    if isinstance(labels_getter, str) and labels_getter == 'default':
        return _find_labels_default_heuristic
    if callable(labels_getter):
        return labels_getter
    if labels_getter is None:
        return lambda _: None
    raise ValueError(f"labels_getter should either be 'default', a callable, or None, but got {labels_getter}.")


# ------------------------------------------------------------------------------------------- arguments


def _alpha(alpha: Any) -> float:
    """torchvision's ``alpha``: what ``float()`` takes, finite and > 0 (its Beta refuses 0, negatives and NaN)."""
    if isinstance(alpha, str):
        raise ValueError(f'alpha must be a number > 0, got alpha={alpha!r}')
    if isinstance(alpha, bool):  # torchvision's Beta sampler fails on it at the first call, with a RuntimeError
        raise MixInputError(f'alpha must be a number > 0, not a bool, got alpha={alpha!r}')
    try:
        value = float(alpha)
    except TypeError:
        raise TypeError(f'alpha must be a number > 0, got alpha={alpha!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f'alpha must be a finite number > 0 (the Beta concentration), got alpha={alpha!r}')
    return value


def _num_classes(num_classes: Any) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f'num_classes must be an int or None, got num_classes={num_classes!r}')
    if num_classes < 1:
        raise MixInputError(f'num_classes must be >= 1 (the one-hot width), got num_classes={num_classes}')
    return num_classes


def _pool(pool: Any, group: ProcessGroup) -> str:
    return check_pool(pool, group, name='pool')


# ------------------------------------------------------------------------------------------- the transforms


class _MixTransform(nn.Module):
    """What CutMix, MixUp and RandomChoice share: read the sample as torchvision does, mix it with one Mixer."""

    def __init__(self, *, num_classes: Optional[int], labels_getter: LabelsGetter, pool: str, seed: Optional[int],
                 group: ProcessGroup) -> None:
        super().__init__()
        self.num_classes = _num_classes(num_classes)
        self._labels_getter = _parse_labels_getter(labels_getter)
        self.pool = _pool(pool, group)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f'seed must be an int or None, got seed={seed!r}')
        self.seed = seed
        self.group = group
        self.mixer = Mixer(spec=self._spec(), mode=pool, seed=seed, group=group, num_classes=self.num_classes)
        self._worker: Optional[tuple[int, Mixer]] = None  # (the worker's seed, its mixer), in a DataLoader worker

    def _spec(self) -> MixSpec:
        raise NotImplementedError

    @property
    def last(self) -> Optional[MixResult]:
        """This process's last mixed batch (partners, λ, box, bytes sent), or ``None``."""
        return self._worker[1].last if self._worker is not None else self.mixer.last

    def forward(self, *inputs: Any) -> Any:
        """Mix a batch given as torchvision's ``CutMix``/``MixUp`` take it; return it in the same structure."""
        sample = inputs if len(inputs) > 1 else inputs[0]
        flat, tree = tree_flatten(sample)
        mixer = self._current_mixer()
        try:
            labels, images = self._read(sample, flat)
        except (TypeError, ValueError) as problem:  # in a group, raised on every rank at once, never a hang
            mixer.mix(None, None, problem=problem)  # type: ignore[arg-type]
            raise AssertionError('unreachable: Mixer.mix raises the problem') from problem
        pixels, unpack = _pack([flat[i] for i in images])
        result = mixer.mix(pixels, labels.as_subclass(Tensor))
        for i, out in zip(images, unpack(result.input), strict=True):
            flat[i] = out
        flat[next(i for i, v in enumerate(flat) if v is labels)] = result.target
        return tree_unflatten(flat, tree)

    def _read(self, sample: Any, flat: list[Any]) -> tuple[Tensor, list[int]]:
        """The labels and the positions of the images in ``flat``, checked as torchvision checks them."""
        name = type(self).__name__
        if any(_is_pil(v) or _is_tv(v, 'BoundingBoxes', 'Mask', 'KeyPoints') for v in flat):
            raise ValueError(f'{name}() does not support PIL images, bounding boxes, keypoints and masks.')
        labels = self._labels_getter(sample)
        if not isinstance(labels, Tensor):
            raise ValueError(f'The labels must be a tensor, but got {type(labels)} instead.')
        if labels.ndim not in (1, 2):
            raise ValueError(
                f'labels should be index based with shape (batch_size,) or probability based with shape '
                f'(batch_size, num_classes), but got a tensor of shape {labels.shape} instead.'
            )
        if labels.ndim == 2 and self.num_classes is not None and labels.shape[-1] != self.num_classes:
            raise ValueError(
                f'When passing 2D labels, the number of elements in last dimension must match num_classes: '
                f'{labels.shape[-1]} != {self.num_classes}. You can Leave num_classes to None.'
            )
        if labels.ndim == 1 and self.num_classes is None:
            raise ValueError('num_classes must be passed if the labels are index-based (1D)')
        if not any(v is labels for v in flat):
            raise ValueError(f'labels_getter returned a tensor that is not part of the input; {name} replaces the '
                             f'labels in the structure it was given, so they must be one of its tensors')
        images = _image_positions(flat)
        if not images or any(flat[i] is labels for i in images):
            # torchvision takes the first plain tensor for the images: when that is the labels, its CutMix fails and
            # its MixUp mixes the labels alone, leaving the images as they were; we refuse both
            raise TypeError(f'{name}() found no images to mix: it takes the tv_tensors.Image/Video in the input, '
                            f'else the first plain tensor, and here that is the labels. Put the images first '
                            f'(or wrap them in tv_tensors.Image)')
        for i in images:
            expected = 5 if _is_tv(flat[i], 'Video') else 4
            if flat[i].ndim != expected:
                raise ValueError(
                    f'Expected a batched input with {expected} dims, but got {flat[i].ndim} dimensions instead.'
                )
            if flat[i].shape[0] != labels.shape[0]:
                raise ValueError(
                    f'The batch size of the image or video does not match the batch size of the labels: '
                    f'{flat[i].shape[0]} != {labels.shape[0]}.'
                )
        if labels.ndim == 1:
            _check_index_labels(labels, self.num_classes)  # type: ignore[arg-type]
        return labels, images

    def _current_mixer(self) -> Mixer:
        """This process's mixer: the constructed one, or in a DataLoader worker one keyed by the worker's seed."""
        info = get_worker_info()
        if info is None:
            return self.mixer
        if self.pool != 'local':
            raise RuntimeError(
                f"{type(self).__name__}(pool={self.pool!r}) cannot mix in a DataLoader worker: mixing across ranks "
                f"runs collectives, which a worker cannot. Call it on the loaded batch in the training loop, or use "
                f"pool='local' in a collate_fn"
            )
        if self._worker is None or self._worker[0] != info.seed:
            # info.seed differs per worker and per epoch (unless persistent_workers=True, where the worker, and the
            # batch count of its mixer, lives on) and follows the DataLoader's generator, or torch's seed
            rank = os.environ.get('RANK', '0')  # torchrun's: workers of different ranks may share info.seed
            key = batch_generator(info.seed, 0, 'dataloader-worker', 'none' if self.seed is None else self.seed, rank)
            seed = int(torch.randint(0, 2**62, (1,), generator=key).item())
            self._worker = (info.seed, Mixer(spec=self.mixer.spec, mode='local', seed=seed,
                                             num_classes=self.num_classes))
        return self._worker[1]

    # nn.Module's checkpoint protocol: ``state_dict()`` holds the mixer's (batch count, seed, configuration)
    def get_extra_state(self) -> dict[str, Any]:
        """The mixer's :meth:`~dist_cutmix.Mixer.state_dict`, under ``'_extra_state'`` of ``state_dict()``."""
        return self.mixer.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Resume the mixer (:meth:`~dist_cutmix.Mixer.load_state_dict`): later batches mix as uninterrupted."""
        self.mixer.load_state_dict(state)

    def extra_repr(self) -> str:
        return ', '.join(f'{k}={v!r}' for k, v in self._repr_fields().items())

    def _repr_fields(self) -> dict[str, Any]:
        return dict(num_classes=self.num_classes, pool=self.pool, seed=self.seed)


class _OneMethod(_MixTransform):
    def __init__(self, *, alpha: float = 1.0, num_classes: Optional[int] = None,
                 labels_getter: LabelsGetter = 'default', pool: str = 'local', seed: Optional[int] = None,
                 group: ProcessGroup = None) -> None:
        self.alpha = _alpha(alpha)
        super().__init__(num_classes=num_classes, labels_getter=labels_getter, pool=pool, seed=seed, group=group)

    def _repr_fields(self) -> dict[str, Any]:
        return dict(alpha=self.alpha, **super()._repr_fields())


class CutMix(_OneMethod):
    """torchvision's ``v2.CutMix``, with our randomness and partners from this batch, this node or all ranks.

    One box per batch: λ ~ Beta(alpha, alpha), a box of sides ``2·int(sqrt(1 - λ)·H / 2)`` by the same for ``W`` centred
    uniformly on the image and clipped, the label weight the box's exact pixel share (torchvision's size law). Sample
    ``i`` takes its partner's pixels inside the box; the partner is a random other sample (torchvision: sample
    ``i - 1``).

    Args:
        alpha: Beta concentration, > 0 (torchvision's default 1.0).
        num_classes: class count, needed for index labels ``(N,)``; ``None`` for ``(N, C)`` labels.
        labels_getter: ``'default'`` (the second item of the input, or a ``'labels'``/``'*label*'`` key of a dict),
            a callable that takes the input and returns the labels, or ``None``, as torchvision's.
        pool: ``'local'`` (default: within the batch, as torchvision), ``'global'`` (the ranks' batches end to end:
            only the boxes cross ranks) or ``'node'`` (the ranks of this node, ``LOCAL_WORLD_SIZE``). ``'global'``
            and ``'node'`` are collectives: every rank calls once per batch, in the training loop (not in
            DataLoader workers).
        seed: seed of every draw. ``None``: a fresh one, rank 0's on every rank; in a DataLoader worker the worker's
            seed (which the DataLoader's generator, or torch's seed, fixes).
        group: the process group of ``pool='global'`` (default: all ranks).

    Raises:
        ValueError, TypeError: where torchvision's ``CutMix`` refuses the argument or input (``MixInputError`` where
            its ``one_hot`` raises a ``RuntimeError``); with ``pool='global'``, a bad batch on any rank raises
            :class:`~dist_cutmix.distributed.BatchMismatchError` on every rank.

    Example:
        >>> import torch
        >>> cutmix = CutMix(alpha=1.0, num_classes=10, seed=0)
        >>> images, labels = cutmix(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> tuple(labels.shape), labels.dtype
        ((8, 10), torch.float32)
    """

    def _spec(self) -> MixSpec:
        return MixSpec(cutmix_alpha=self.alpha, mixup_alpha=0.0)


class MixUp(_OneMethod):
    """torchvision's ``v2.MixUp``, with our randomness and partners from this batch, this node or all ranks.

    One λ ~ Beta(alpha, alpha) per batch: ``λ·own + (1 - λ)·partner``, for the pixels and the one-hot labels, λ taken
    unfolded as torchvision takes it (``MixSpec(mixup_fold=False)``), on the ``2**-10`` grid. Arguments as
    :class:`CutMix`'s. Unlike torchvision's, uint8 images are accepted (blended in float32, rounded to nearest).

    Example:
        >>> import torch
        >>> mixup = MixUp(alpha=0.2, num_classes=10, seed=0)
        >>> images, labels = mixup(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> bool(torch.allclose(labels.sum(1), torch.ones(8)))
        True
    """

    def _spec(self) -> MixSpec:
        return MixSpec(cutmix_alpha=0.0, mixup_alpha=self.alpha, mixup_fold=False)


class RandomChoice(_MixTransform):
    """What replaces ``v2.RandomChoice([cutmix, mixup])`` (torchvision's references) when the draws must be ours.

    Takes our :class:`CutMix` and/or :class:`MixUp` (at most one of each, in any order) and ``p`` as torchvision's
    ``RandomChoice`` does, and mixes each batch with one or the other: one :class:`~dist_cutmix.MixSpec` that switches
    (``switch_prob`` = CutMix's share of ``p``), the choice drawn with the rest of the batch's mix from ``(seed,
    batch)``. torchvision's ``RandomChoice`` around our objects would pick from each process's global torch RNG:
    ranks could pick differently (a collective mismatch with ``pool='global'``), and a resumed run would not repeat
    the picks. ``num_classes``, ``labels_getter``, ``pool``, ``seed`` and ``group`` come from the transforms, which
    must agree on them.

    Args:
        transforms: ``[MixUp(...), CutMix(...)]`` (or one of them) from this module.
        p: probability of each transform, normalised to sum 1; ``None``: equal.

    Example:
        >>> import torch
        >>> choice = RandomChoice([MixUp(alpha=0.2, num_classes=10), CutMix(alpha=1.0, num_classes=10)])
        >>> images, labels = choice(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> tuple(labels.shape)
        (8, 10)
    """

    def __init__(self, transforms: Sequence[_OneMethod], p: Optional[Sequence[float]] = None) -> None:
        if not isinstance(transforms, collections.abc.Sequence):
            raise TypeError('Argument transforms should be a sequence of callables')
        if not transforms:
            raise ValueError('Pass at least one transform')
        wrong = [t for t in transforms if not isinstance(t, (CutMix, MixUp))]
        if wrong:
            raise TypeError(f'RandomChoice combines dist_cutmix.torchvision.CutMix and MixUp, got '
                            f'{", ".join(f"{type(t).__module__}.{type(t).__qualname__}" for t in wrong)}: build '
                            f'CutMix and MixUp from dist_cutmix.torchvision')
        kinds = [type(t).__name__ for t in transforms]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f'RandomChoice takes at most one CutMix and one MixUp (one switching mix), got {kinds}')
        if p is None:
            p = [1.0] * len(transforms)
        elif len(p) != len(transforms):
            raise ValueError(f"Length of p doesn't match the number of transforms: {len(p)} != {len(transforms)}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in p) \
                or sum(p) <= 0:
            raise ValueError(f'p must be numbers >= 0 with a positive sum, got p={list(p)!r}')
        first = transforms[0]
        for field in ('num_classes', '_labels_getter', 'pool', 'seed', 'group'):
            values = [getattr(t, field) for t in transforms]
            if any(v is not values[0] and v != values[0] for v in values):
                raise ValueError(f'the transforms of a RandomChoice must agree on {field.lstrip("_")}, got '
                                 + ', '.join(f'{k}: {v!r}' for k, v in zip(kinds, values, strict=True)))
        self.transforms = list(transforms)
        total = float(sum(p))
        self.p = [v / total for v in p]
        super().__init__(num_classes=first.num_classes, labels_getter=first._labels_getter, pool=first.pool,
                         seed=first.seed, group=first.group)

    def _spec(self) -> MixSpec:
        alphas = {type(t).__name__: t.alpha for t in self.transforms}
        share = dict(zip((type(t).__name__ for t in self.transforms), self.p, strict=True))
        if len(share) == 1:  # one method: exactly its spec (a switch probability would mean nothing)
            return self.transforms[0]._spec()
        return MixSpec(cutmix_alpha=alphas['CutMix'], mixup_alpha=alphas['MixUp'],
                       switch_prob=min(max(share['CutMix'], 0.0), 1.0), mixup_fold=False)

    def _repr_fields(self) -> dict[str, Any]:
        return dict(p=self.p, **super()._repr_fields())


# ------------------------------------------------------------------------------------------- helpers


def _image_positions(flat: list[Any]) -> list[int]:
    """Where torchvision finds the images: every tv_tensors.Image/Video, else the first plain tensor."""
    explicit = [i for i, v in enumerate(flat) if _is_tv(v, 'Image', 'Video')]
    if explicit:
        return explicit
    return next(([i] for i, v in enumerate(flat) if _is_pure_tensor(v)), [])


def _check_index_labels(labels: Tensor, num_classes: int) -> None:
    """Index labels as torchvision's ``one_hot`` takes them: int64, in ``[0, num_classes)``."""
    if labels.dtype != torch.int64:
        raise MixInputError(f'index labels (shape (N,)) must be int64 class indices, as torchvision\'s one_hot takes '
                            f'them, got {labels.dtype}: pass labels.long()')
    if labels.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if low < 0 or high >= num_classes:
            raise MixInputError(f'index labels must lie in [0, num_classes={num_classes}), got values in '
                                f'[{low}, {high}]')


def _pack(images: list[Tensor]) -> tuple[Tensor, Callable[[Tensor], list[Any]]]:
    """The images as one ``(N, C', H, W)`` tensor (a video's frames and several images side by side along the
    channels, all mixed with the same draw, as torchvision mixes each), and how to give each back its shape and type."""
    plain = [x.as_subclass(Tensor) for x in images]
    flat = [x if x.ndim == 4 else x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in plain]
    layouts = {(tuple(x.shape[-2:]), x.dtype, x.device) for x in flat}
    if len(layouts) > 1:
        raise ValueError('the images of one sample are mixed together, so they must share height, width, dtype and '
                         f'device, got {", ".join(f"{tuple(x.shape)} {x.dtype} {x.device}" for x in plain)}')
    packed = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    widths = [x.shape[1] for x in flat]

    def unpack(mixed: Tensor) -> list[Any]:
        parts = [mixed] if len(flat) == 1 else list(mixed.split(widths, dim=1))
        return [_like(part.reshape(x.shape) if x.ndim != 4 else part, x) for part, x in zip(parts, images, strict=True)]

    return packed, unpack


def _like(output: Tensor, original: Tensor) -> Any:
    """``output`` as the type of ``original`` (``tv_tensors.wrap`` for an Image or Video, as torchvision returns)."""
    if _is_tv(original, 'TVTensor'):
        return _tv_tensors().wrap(output, like=original)
    return output
