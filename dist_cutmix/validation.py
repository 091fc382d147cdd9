"""Every input check of the package and its message, once.

The functional ops, both mixers, :class:`~dist_cutmix.Mixer`, the metrics and every door call these, so
a rule and its wording live in one place. Each raises ``TypeError`` or ``ValueError`` naming the argument
and the value it got; none works by calling a worker for its exception.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dist_cutmix.spec import MixSpec

__all__ = [
    'BINARY_HINT',
    'MODES',
    'check_alpha',
    'check_batch',
    'check_binary_targets',
    'check_blendable_dense',
    'check_box_inside',
    'check_choice',
    'check_flag',
    'check_input',
    'check_labels',
    'check_multi_label',
    'check_num_classes',
    'check_partners',
    'check_pool',
    'check_seconds',
    'check_probability',
    'check_seed',
    'check_smoothable',
    'check_target',
    'target_kind',
]

MODES = ('local', 'global', 'node')

BINARY_HINT = ('floating (N,) targets are read as binary probabilities; class indices must be an integer tensor: '
               'pass target.long()')


# ----------------------------------------------------------------------------- numbers and options


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_alpha(value: object, name: str = 'alpha') -> float:
    """``value`` as a float; raise unless it is a finite number ``>= 0`` (a Beta concentration; 0 turns mixing off)."""
    if not _is_number(value):
        raise TypeError(f'{name} must be a finite number >= 0, got {name}={value!r}')
    if math.isnan(value) or value < 0 or math.isinf(value):  # type: ignore[arg-type]
        raise ValueError(f'{name} must be a finite number >= 0, got {name}={value!r}')
    return float(value)  # type: ignore[arg-type]


def check_flag(value: object, name: str) -> bool:
    """Raise unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f'{name} must be True or False, got {name}={value!r}')
    return value


def check_probability(value: object, name: str) -> float:
    """``value`` as a float; raise unless it is a number in ``[0, 1]``."""
    if not _is_number(value) or math.isnan(value) or not 0 <= value <= 1:  # type: ignore[operator,arg-type]
        raise ValueError(f'{name} must be a number in [0, 1], got {name}={value!r}')
    return float(value)  # type: ignore[arg-type]


def check_choice(value: object, name: str, choices: tuple[Any, ...]) -> Any:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {name}={value!r}')
    return value


def check_pool(mode: object, group: object, group_name: str = 'group', name: str = 'mode') -> str:
    """Raise unless ``mode`` is one of :data:`MODES`, with a process group given only for ``'global'``.

    ``name`` is what the caller calls the argument (the timm and torchvision doors call it ``pool``).
    """
    check_choice(mode, name, MODES)
    if group is not None and mode != 'global':
        raise ValueError(f"{group_name} is only used with {name}='global', got {name}={mode!r}")
    return mode  # type: ignore[return-value]


def check_seconds(value: object, name: str) -> Optional[float]:
    """Raise unless ``value`` is a positive finite number of seconds, or ``None``."""
    if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):  # type: ignore[arg-type]
        raise ValueError(f'{name} must be a positive number of seconds or None, got {name}={value!r}')
    return value  # type: ignore[return-value]


def check_seed(seed: object, name: str = 'seed') -> Optional[int]:
    """Raise unless ``seed`` is an int or ``None``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f'{name} must be an int or None, got {name}={seed!r}')
    return seed


def check_num_classes(num_classes: object, *, optional: bool = True) -> Optional[int]:
    """Raise unless ``num_classes`` is a positive int (or ``None`` where ``optional``)."""
    if num_classes is None and optional:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        allowed = 'a positive int or None' if optional else 'a positive int'
        raise ValueError(f'num_classes must be {allowed}, got num_classes={num_classes!r}')
    return num_classes


def check_partners(indices: object, n: int) -> Tensor:
    """``indices`` as a long tensor; raise unless it holds ``n`` partner indices in ``[0, n)``."""
    device = indices.device if isinstance(indices, Tensor) else 'cpu'
    indices = torch.as_tensor(indices, dtype=torch.long, device=device)
    if tuple(indices.shape) != (n,) or (n and (int(indices.min()) < 0 or int(indices.max()) >= n)):
        raise ValueError(f'indices must be a ({n},) tensor of values in [0, {n}), got indices={indices}')
    return indices


def check_box_inside(box: tuple, height: int, width: int, name: str = 'bbox') -> tuple[int, int, int, int]:
    """``box`` as ints ``(y0, y1, x0, x1)``; raise unless it lies inside the ``height x width`` image."""
    y0, y1, x0, x1 = (int(v) for v in box)
    if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
        raise ValueError(f'{name} must lie inside the {height}x{width} image as (y0, y1, x0, x1), got {name}={box}')
    return (y0, y1, x0, x1)


# ----------------------------------------------------------------------------- tensors


def check_input(input: object) -> Tensor:
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


def check_target(target: object, input: Tensor) -> str:
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


def check_labels(labels: Tensor, num_classes: Optional[int]) -> None:
    """Raise unless index ``labels`` have a ``num_classes`` and lie in ``[0, num_classes)``; one device sync at most."""
    if num_classes is None:
        raise ValueError('num_classes is required to mix index targets, got num_classes=None')
    if labels.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f'index targets must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]',
            )


def check_binary_targets(target: Tensor) -> None:
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


def check_smoothable(kind: str, target: Tensor, smoothing: float) -> None:
    """Raise for label smoothing of targets without a class axis (binary or dense)."""
    if smoothing and kind in ('binary', 'dense'):
        raise ValueError(
            f'label_smoothing spreads ε over a class axis: it takes index (N,) or soft (N, C) targets, '
            f'got {kind} targets of shape {tuple(target.shape)} with label_smoothing={smoothing}'
            + (f' ({BINARY_HINT})' if kind == 'binary' else ''),
        )


def check_blendable_dense(target: Tensor) -> None:
    """Raise for class-index maps, which a MixUp blend (a partner weight below 1) cannot mix."""
    if not target.is_floating_point():
        raise ValueError(
            f'MixUp blends dense targets only as floating maps (N, C, H, W) of class probabilities; got {target.dtype} '
            f'class-index maps of shape {tuple(target.shape)}, which would need the class count to become soft. '
            f'Use CutMix for index maps (it pastes them), or pass one-hot float maps',
        )


def check_multi_label(target: Tensor, kind: str, num_classes: Optional[int]) -> None:
    """``multi_label`` mixes multi-hot ``(N, C)`` targets, ``C == num_classes`` where that is given (as timm checks)."""
    if kind != 'soft':
        raise ValueError(
            f'multi_label=True mixes multi-hot targets of shape (N, num_classes), got {kind} targets of shape '
            f'{tuple(target.shape)}: pass multi_label=False for class indices, or multi-hot rows '
            f'(torch.nn.functional.one_hot(target, num_classes) for one label a sample)',
        )
    if num_classes is not None and target.shape[1] != num_classes:
        raise ValueError(f'multi_label=True: targets must have num_classes={num_classes} columns, got targets of '
                         f'shape {tuple(target.shape)}')


def check_batch(input: object, target: object, *, num_classes: Optional[int], mix_target: bool,
                spec: 'MixSpec') -> str:
    """Everything a mixer checks of one batch before it draws; return the target kind.

    The input's shape, the target's shape and kind, index labels in range (also unmixed ones, where
    ``num_classes`` is given: ``Mixer(targets='labels')`` hands them on), multi-hot rows for ``multi_label``,
    binary targets in ``[0, 1]``, smoothing only over a class axis, MixUp only of floating dense maps. The
    other value checks (one host sync each) run only where the targets are mixed.
    """
    input = check_input(input)
    kind = check_target(target, input)
    target = cast(Tensor, target)  # check_target raised for anything else
    if kind == 'index' and (mix_target or num_classes is not None):
        check_labels(target, num_classes)  # unmixed labels too, where a class count says what is in range
    if not mix_target:
        return kind
    if spec.multi_label:
        check_multi_label(target, kind, num_classes)
    if kind == 'binary':
        check_binary_targets(target)
    check_smoothable(kind, target, spec.label_smoothing)
    if kind == 'dense' and spec.mixup_alpha > 0 and spec.prob > 0:
        check_blendable_dense(target)
    return kind
