"""Cross entropy of a mixed batch from its labels, without dense ``(N, C)`` targets.

A mixed sample's soft target is ``t = (1 - ε)·(λ·onehot(y) + (1 - λ)·onehot(y')) + ε / C``: its own class
``y``, its partner's class ``y'``, its own label weight λ and the label smoothing ε say everything about it.
The cross entropy against it needs no ``(N, C)`` target either::

    CE = logsumexp(z) - (1 - ε)·(λ·z[y] + (1 - λ)·z[y']) - ε·mean_c(z)

:class:`MixedLabels` holds those four things for a batch (``Mixer(..., targets='labels')`` returns it instead of
dense targets), :func:`mixed_cross_entropy` and :class:`MixedCrossEntropy` compute the loss from it, and
``SoftTargetAccuracy`` / ``SoftTargetWrapper`` score it. Every result equals the one on the dense target
:meth:`MixedLabels.to_dense` builds (the same target the mixers build), within float rounding for the loss and
exactly for the metrics. Given a plain tensor target (class indices or class probabilities) the loss is
``F.cross_entropy``, so it can replace it unconditionally.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from dist_cutmix.mixer import MixResult

__all__ = ['MixedCrossEntropy', 'MixedLabels', 'mixed_cross_entropy']

_REDUCTIONS = ('mean', 'sum', 'none')
# Half-precision logits are reduced in float32, as autocast runs cross entropy: the loss of a
# 1000-class batch is a difference of numbers near log(C), where bfloat16 keeps two decimal digits.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensors is elementwise; labels compare by identity
class MixedLabels:
    """The labels of a mixed batch, without dense targets: own class, partner class, own weight λ, smoothing ε.

    Sample ``i`` stands for the soft target ``(1 - ε)·(λ_i·onehot(target_i) + (1 - λ_i)·onehot(partner_target_i))
    + ε / C``. Frozen, three ``(N,)`` tensors and a number: :meth:`to` moves it between devices (Lightning's and
    Accelerate's batch transfer call it), :meth:`pin_memory` serves a pinning ``DataLoader``, and it pickles and
    deep-copies as a dataclass.

    Attributes:
        target: each sample's own class, integer ``(N,)``.
        partner_target: its partner's class, integer ``(N,)`` (the sample's own class when it was not mixed).
        lam: the weight of the own class, floating ``(N,)``; a number is one λ for the batch, broadcast (float64
            on ``target``'s device, so that the number is kept exactly).
        label_smoothing: ``ε`` in ``[0, 1)``.

    Raises:
        TypeError, ValueError: naming the field and its value, on a wrong type, shape, dtype or device, or on
            ``label_smoothing`` outside ``[0, 1)``. Values (classes in range, λ in ``[0, 1]``) are checked where
            the class count is known: :meth:`check` (the loss and the metrics call it).

    Example:
        >>> import torch
        >>> labels = MixedLabels(torch.tensor([0, 2]), torch.tensor([1, 2]), 0.75, label_smoothing=0.0)
        >>> labels.to_dense(3)
        tensor([[0.7500, 0.2500, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """

    target: Tensor
    partner_target: Tensor
    lam: Tensor
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        for name in ('target', 'partner_target'):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f'MixedLabels.{name} must be a tensor of class indices, got {type(value).__name__}')
            if value.ndim != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f'MixedLabels.{name} must be integer class indices of shape (N,), got shape '
                                 f'{tuple(value.shape)} and dtype {value.dtype}')
        target, partner = self.target, self.partner_target
        if partner.shape != target.shape or partner.device != target.device:
            raise ValueError(f'MixedLabels.partner_target must match target: got shape {tuple(partner.shape)} on '
                             f'{partner.device} for target of shape {tuple(target.shape)} on {target.device}')
        lam = self.lam
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            lam = torch.full(target.shape, float(lam), dtype=torch.float64, device=target.device)
            object.__setattr__(self, 'lam', lam)
        if not isinstance(lam, Tensor) or not lam.is_floating_point():
            raise TypeError(f'MixedLabels.lam must be a number or a floating tensor of shape (N,), got '
                            f'{_describe(lam)}')
        if lam.shape != target.shape or lam.device != target.device:
            raise ValueError(f'MixedLabels.lam must have the shape and device of target, {tuple(target.shape)} on '
                             f'{target.device}, got shape {tuple(lam.shape)} on {lam.device}')
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) or not 0 <= eps < 1:
            raise ValueError(f'MixedLabels.label_smoothing must be a number in [0, 1), got label_smoothing={eps!r}')
        object.__setattr__(self, 'label_smoothing', float(eps))

    @classmethod
    def from_result(cls, result: MixResult, label_smoothing: float = 0.0) -> MixedLabels:
        """The labels of a batch mixed with ``mix_target=False``: its own and partner targets and label weight.

        Args:
            result: a :class:`~dist_cutmix.MixResult` of index targets (``result.kind == 'index'``), local or global;
                ``result.target`` must be the unmixed labels (mixed with ``mix_target=False``).
            label_smoothing: the ``ε`` of the spec the batch was mixed with.

        Raises:
            ValueError: for a result of another target kind, naming it.
        """
        if result.kind != 'index':
            raise ValueError(f"MixedLabels holds class-index targets (N,); this batch's targets are of kind "
                             f'{result.kind!r} (shape {tuple(result.target.shape)}): mix it with dense targets')
        target = result.target
        if target.ndim != 1:
            raise ValueError(f'MixedLabels.from_result takes a batch mixed with mix_target=False, whose target is its '
                             f'class indices (N,); got a mixed target of shape {tuple(target.shape)}')
        lam = result.label_lam
        if isinstance(lam, Tensor):  # per sample: on the 2**-10 grid, exact in float32; one small copy to the device
            lam = lam.to(device=target.device, dtype=torch.float32)
        else:
            lam = torch.full(target.shape, float(lam), dtype=torch.float32, device=target.device)
        return cls(target, result.partner_target, lam, label_smoothing)

    # ------------------------------------------------------------------ what user code does to a target

    @property
    def device(self) -> torch.device:
        """The device of the labels."""
        return self.target.device

    def __len__(self) -> int:
        """The batch size ``N``."""
        return self.target.shape[0]

    def to(self, device: Union[str, torch.device, int], non_blocking: bool = False) -> MixedLabels:
        """The same labels on ``device`` (a no-op copy-free move when they are there already).

        Raises:
            TypeError: for a dtype: class indices stay integers, and λ keeps its precision.
        """
        if isinstance(device, torch.dtype):
            raise TypeError(f'MixedLabels.to moves labels between devices, not dtypes; got {device}')
        return dataclasses.replace(self, target=self.target.to(device, non_blocking=non_blocking),
                                   partner_target=self.partner_target.to(device, non_blocking=non_blocking),
                                   lam=self.lam.to(device, non_blocking=non_blocking))

    def cpu(self) -> MixedLabels:
        """The same labels on the host."""
        return self.to('cpu')

    def pin_memory(self) -> MixedLabels:
        """The same labels in pinned host memory (what ``DataLoader(pin_memory=True)`` asks of a batch)."""
        return dataclasses.replace(self, target=self.target.pin_memory(),
                                   partner_target=self.partner_target.pin_memory(), lam=self.lam.pin_memory())

    # ------------------------------------------------------------------ values, and the dense target where needed

    def check(self, num_classes: int) -> None:
        """Raise unless every class lies in ``[0, num_classes)`` and every λ in ``[0, 1]`` (one device sync).

        Raises:
            ValueError: naming the field and the values found.
        """
        self._check(self.classes(), num_classes)

    def classes(self) -> Tensor:
        """Own and partner class side by side, ``(N, 2)``."""
        return torch.stack([self.target, self.partner_target], dim=1)

    def _check(self, classes: Tensor, num_classes: int) -> None:
        """:meth:`check`, given :meth:`classes`."""
        if not len(self):
            return
        bounds = torch.aminmax(classes, dim=0)
        lam = torch.stack(torch.aminmax(self.lam)).to(torch.float64)
        extremes = torch.cat([bounds.min, bounds.max, lam])  # cat promotes the class indices to float64
        low_y, low_p, high_y, high_p, low_l, high_l = extremes.tolist()  # one copy to the host
        for name, low, high in (('target', low_y, high_y), ('partner_target', low_p, high_p)):
            if low < 0 or high >= num_classes:
                raise ValueError(f'MixedLabels.{name} must lie in [0, num_classes={num_classes}), got values in '
                                 f'[{int(low)}, {int(high)}]')
        if not (0 <= low_l and high_l <= 1):  # written so that NaN fails too
            raise ValueError(f'MixedLabels.lam must lie in [0, 1], got values in [{low_l}, {high_l}]')

    def entries(self, classes: Tensor, num_classes: int) -> Tensor:
        """The dense ``num_classes``-class target's entries at ``classes`` (integer ``(N, k)``), float32 ``(N, k)``.

        Bit for bit the entries of :meth:`to_dense` (and of the mixers' dense targets): the metrics read the
        target mass on the predicted classes here without building the target.
        """
        lam = self.lam.to(torch.float32).unsqueeze(1)
        own = (classes == self.target.unsqueeze(1)).to(torch.float32)
        other = (classes == self.partner_target.unsqueeze(1)).to(torch.float32)
        # the arithmetic of dist_cutmix.targets.mix_targets, step for step, so every entry is the same float
        mixed = own * lam + other * (1.0 - lam)
        if self.label_smoothing:
            mixed = mixed * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        return mixed

    def to_dense(self, num_classes: int) -> Tensor:
        """The dense float32 soft target ``(N, num_classes)``, as the mixers build it."""
        classes = torch.arange(num_classes, device=self.device).expand(len(self), num_classes)
        return self.entries(classes, num_classes)

    def argmax(self, num_classes: int) -> Tensor:
        """``to_dense(num_classes).argmax(dim=1)`` without the dense target: the heavier of the two classes, the
        lower index on a tie (as ``argmax`` returns the first maximum), ``(N,)``."""
        values = self.entries(self.classes(), num_classes)  # the very floats the dense target compares
        own_wins = values[:, 0] > values[:, 1]
        partner_wins = values[:, 1] > values[:, 0]
        lower = torch.minimum(self.target, self.partner_target)
        return torch.where(own_wins, self.target, torch.where(partner_wins, self.partner_target, lower))


# ----------------------------------------------------------------------------- the loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _MixedCrossEntropy(torch.autograd.Function):
    """Per-sample cross entropy against ``Σ_j weights[:, j]·onehot(classes[:, j]) + smoothing / C``.

    ``classes`` and ``weights`` are ``(N, 2)``: own and partner class, and their shares. Saves the logits rather
    than the ``(N, C)`` log-probabilities ``F.cross_entropy`` keeps (no float32 copy of bfloat16 logits held
    between forward and backward: the forward's log-probabilities are freed at once), and computes the gradient
    ``g·(p·Σ_c w_c t_c - w ⊙ t)`` in place in the ``(N, C)`` buffer of a recomputed softmax (one fused kernel:
    faster on the CPU than ``exp`` of saved log-probabilities).
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, classes: Tensor, weights: Tensor, smoothing: float,
                weight: Optional[Tensor]) -> Tensor:
        log_p = torch.log_softmax(input, dim=1, dtype=weights.dtype)
        if weight is not None:  # w_c·t_c: the class weight scales each label's share
            weights = weights * weight[classes]
        loss = (log_p.gather(1, classes) * weights).sum(dim=1)
        if smoothing:
            loss = loss.add_(log_p.mean(dim=1) if weight is None else (log_p @ weight) / input.shape[1],
                             alpha=smoothing)
        ctx.save_for_backward(input, classes, weights, weight)
        ctx.smoothing = smoothing
        return loss.neg_()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        input, classes, weights, weight = ctx.saved_tensors
        spread = ctx.smoothing / input.shape[1]
        grad_input = torch.softmax(input, dim=1, dtype=weights.dtype)
        if weight is not None:
            grad_input.mul_((weights.sum(dim=1) + spread * weight.sum()).unsqueeze(1))
            if spread:
                grad_input.sub_(weight * spread)
        elif spread:
            grad_input.sub_(spread)
        rows = torch.arange(grad_input.shape[0], device=grad_input.device).unsqueeze(1).expand_as(classes)
        # index_put_ with accumulate, not scatter_add_: deterministic on CUDA too; own == partner takes both shares
        grad_input.index_put_((rows, classes), weights.neg(), accumulate=True)
        # in-place sub_/mul_ and one cast at the end: an out= of another dtype, or addcmul's broadcast, runs
        # several times slower on the CPU
        return grad_input.mul_(grad.unsqueeze(1)).to(input.dtype), None, None, None, None


def _check_loss_arguments(input: Tensor, target: MixedLabels, weight: Optional[Tensor], reduction: str,
                          label_smoothing: float) -> None:
    """Raise, naming the argument and value, on anything the mixed-label loss cannot take."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f'input must be floating-point logits, got {_describe(input)}')
    if input.ndim != 2:
        raise ValueError(f'input must be logits of shape (N, C) for MixedLabels (one label pair per sample), got shape '
                         f'{tuple(input.shape)}')
    if input.shape[0] != len(target):
        raise ValueError(f'input and target must have the same batch size, got input of shape {tuple(input.shape)} '
                         f'and MixedLabels of {len(target)} samples')
    if input.shape[1] < 1:
        raise ValueError(f'input must have at least one class, got shape {tuple(input.shape)}')
    if target.device != input.device:
        raise ValueError(f'target (MixedLabels on {target.device}) must be on the device of input ({input.device}): '
                         f'move it with target.to(input.device)')
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.shape != input.shape[1:]:
            raise ValueError(f'weight must be a floating tensor of shape ({input.shape[1]},), one per class, got '
                             f'{_describe(weight)}')
        if weight.device != input.device:
            raise ValueError(f'weight (on {weight.device}) must be on the device of input ({input.device})')
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got reduction={reduction!r}')
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0 <= label_smoothing <= 1):
        raise ValueError(f'label_smoothing must be a number in [0, 1], got label_smoothing={label_smoothing!r}')


def mixed_cross_entropy(
    input: Tensor,
    target: Union[MixedLabels, Tensor],
    weight: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = 'mean',
    label_smoothing: float = 0.0,
    validate_args: bool = True,
) -> Tensor:
    """Cross entropy of a mixed batch from its :class:`MixedLabels`; ``F.cross_entropy`` for a tensor target.

    For ``MixedLabels`` of smoothing ε it equals ``F.cross_entropy(input, target.to_dense(C), weight=weight,
    reduction=reduction, label_smoothing=label_smoothing)`` (the dense soft target, smoothed once more by
    ``label_smoothing`` as ``F.cross_entropy`` smooths a soft target) within float rounding, in value and in
    gradient, without building the ``(N, C)`` target: per sample
    ``logsumexp(z) - (1 - ε)·(λ·z[y] + (1 - λ)·z[y']) - ε·mean_c(z)`` (unweighted). The arguments are
    ``F.cross_entropy``'s; ``ignore_index`` applies to index targets only, as there.

    Half-precision logits (bfloat16, float16) are reduced in float32, as autocast runs cross entropy, and the
    loss is float32; float32 and float64 logits give a loss of their dtype.

    Args:
        input: logits ``(N, C)`` (any shape ``F.cross_entropy`` takes, for a tensor target).
        target: :class:`MixedLabels`, or class indices / class probabilities as ``F.cross_entropy`` takes them.
        weight: a weight per class ``(C,)``, as in ``F.cross_entropy``.
        ignore_index: as in ``F.cross_entropy`` (index targets only).
        reduction: ``'mean'`` (over the batch), ``'sum'`` or ``'none'`` (the ``(N,)`` losses).
        label_smoothing: as in ``F.cross_entropy``, applied on top of the labels' own ε (usually leave it 0:
            the labels carry the mixer's smoothing).
        validate_args: check that the labels' classes lie in ``[0, C)`` and λ in ``[0, 1]``: one device sync, as
            torchmetrics' ``validate_args``; ``False`` skips it (an out-of-range class then fails inside indexing).

    Returns:
        The loss: a scalar, or ``(N,)`` with ``reduction='none'``.

    Raises:
        TypeError, ValueError: naming the argument and value, for a wrong shape, dtype, device, class or λ.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
        >>> labels = MixedLabels(torch.tensor([0, 1]), torch.tensor([2, 0]), 0.75, label_smoothing=0.1)
        >>> dense = torch.nn.functional.cross_entropy(logits, labels.to_dense(3))
        >>> torch.allclose(mixed_cross_entropy(logits, labels), dense)
        True
    """
    if not isinstance(target, MixedLabels):
        return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    _check_loss_arguments(input, target, weight, reduction, label_smoothing)
    classes = target.classes()
    if validate_args:
        target._check(classes, input.shape[1])
    dtype = _compute_dtype(input.dtype)
    # F.cross_entropy smooths a soft target once more: (1 - e2)·((1 - e1)·mix + e1 / C) + e2 / C
    keep = (1.0 - target.label_smoothing) * (1.0 - float(label_smoothing))
    lam = target.lam.to(dtype)
    weights = torch.stack([lam, 1.0 - lam], dim=1).mul_(keep)
    loss = _MixedCrossEntropy.apply(input, classes, weights, 1.0 - keep, None if weight is None else weight.to(dtype))
    if reduction == 'mean':
        return loss.mean()
    return loss.sum() if reduction == 'sum' else loss


class MixedCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` that also takes :class:`MixedLabels`: :func:`mixed_cross_entropy` as a module.

    Constructed as ``nn.CrossEntropyLoss`` (same arguments and defaults, ``weight`` a buffer), plus
    ``validate_args``; a tensor target gives exactly ``nn.CrossEntropyLoss``'s loss, so it can replace it
    unconditionally.

    Example:
        >>> import torch
        >>> loss_fn = MixedCrossEntropy()
        >>> labels = MixedLabels(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0.5, 1.0]))
        >>> loss_fn(torch.zeros(2, 2), labels)
        tensor(0.6931)
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average: Optional[bool] = None, ignore_index: int = -100,
                 reduce: Optional[bool] = None, reduction: str = 'mean', label_smoothing: float = 0.0, *,
                 validate_args: bool = True) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.validate_args = validate_args

    def forward(self, input: Tensor, target: Union[MixedLabels, Tensor]) -> Tensor:
        """The loss of ``input`` against ``target`` (:class:`MixedLabels`, class indices or probabilities)."""
        return mixed_cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing,
                                   validate_args=self.validate_args)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f'a tensor of shape {tuple(value.shape)} and dtype {value.dtype}'
    return f'{type(value).__name__} {value!r}'
