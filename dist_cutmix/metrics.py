"""torchmetrics metrics that read soft, mixed targets truthfully.

CutMix turns each index label into a soft target ``(N, C)``: ``λ·onehot(own) + (1-λ)·onehot(partner)``.
Composer updates the train metrics from the batch, so they receive these soft targets. A stock
torchmetrics classification metric does not expect them: ``MulticlassAccuracy(average='micro')``
reads the ``(N, C)`` float target as multi-dimensional labels and reports ``0.0`` on every batch,
with no error. This module offers two ways to get a true number:

* :class:`SoftTargetAccuracy` (and its functional twin :func:`soft_target_accuracy`): the score of
  a sample is the target mass on its top-k predicted classes, i.e. the *expected* accuracy when
  the label is drawn from the soft target. On index labels it equals
  ``MulticlassAccuracy(top_k=k, average='micro')``; on a CutMix target it is λ when the model names
  the sample's own class and ``1 - λ`` when it names the partner's.
* :class:`SoftTargetWrapper`: lets any torchmetrics classification metric (F1, confusion matrix,
  macro accuracy, ...) take soft targets by reading each one as its most likely class (argmax).
  Everything else (compute, reset, distributed sync, state_dict, forward) is the wrapped metric's.

:func:`prepare_train_metrics` is what ``dist_cutmix.CutMix`` calls at ``Event.FIT_START``. The
choice it makes, and why:

* A micro-averaged ``MulticlassAccuracy`` (Composer's default train metric) becomes
  :class:`SoftTargetAccuracy` with the same ``num_classes`` and ``top_k``: the one accuracy with a
  meaning under a soft target, and the same number on index labels.
* Any other stock metric from ``torchmetrics.classification`` is wrapped in
  :class:`SoftTargetWrapper`: a per-class metric has no single "expected" form, and the argmax
  label (the class that owns most of the image) is the honest reading.
* Multi-label metrics cannot be wrapped (an argmax would drop labels), so they are an error.
* Each replacement keeps its dict key, so Composer still logs ``metrics/train/<key>``, and one
  warning on the ``dist_cutmix`` logger names everything that was replaced.
* With ``wrap=False`` a stock classification metric is an error that names the fix: a metric that
  silently reports a wrong number is worse than one that stops training.

Metrics from elsewhere (``composer.metrics.CrossEntropy`` reads soft targets itself) pass through.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torchmetrics.classification as tm_classification
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.compute import _safe_divide
from torchmetrics.wrappers.transformations import MetricInputTransformer

from dist_cutmix.loss import MixedLabels

__all__ = ['SoftTargetAccuracy', 'SoftTargetWrapper', 'prepare_train_metrics', 'soft_target_accuracy']

log = logging.getLogger('dist_cutmix')

# Rows of a soft target must sum to 1 within this tolerance (float16 targets included).
_ROW_SUM_ATOL = 1e-3

# Keyword arguments of every torchmetrics Metric that decide how it syncs; a replacement keeps them.
_SYNC_KWARGS = ('compute_on_cpu', 'dist_sync_on_step', 'process_group', 'dist_sync_fn', 'distributed_available_fn',
                'sync_on_compute')

# ----------------------------------------------------------------------------- shared helpers


def _check_top_k(top_k: int, num_classes: int) -> None:
    """Raise unless ``1 <= top_k <= num_classes``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f'top_k must be an int, got top_k={top_k!r}')
    if not 1 <= top_k <= num_classes:
        raise ValueError(f'top_k must be between 1 and num_classes={num_classes}, got top_k={top_k}')


def _check_num_classes(num_classes: int) -> None:
    """Raise unless ``num_classes`` is a positive int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got num_classes={num_classes!r}')


def _soft_target_accuracy_validate(preds: Tensor, target: Tensor, num_classes: Optional[int],
                                   validate_values: bool) -> None:
    """Raise on preds/target shapes, dtypes or values that :func:`soft_target_accuracy` cannot score."""
    if isinstance(target, MixedLabels):
        _mixed_labels_validate(preds, target, num_classes, validate_values)
        return
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f'preds and target must be tensors, got {type(preds).__name__} and {type(target).__name__}')
    if preds.ndim < 2 or not preds.is_floating_point():
        raise ValueError(
            f'preds must be floating-point logits or probabilities of shape (N, C) or (N, C, ...), '
            f'got shape {tuple(preds.shape)} and dtype {preds.dtype}',
        )
    c = preds.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f'preds must have num_classes={num_classes} columns, got preds of shape {tuple(preds.shape)}')
    index_shape = preds.shape[:1] + preds.shape[2:]
    if target.shape == index_shape:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f'index targets of shape (N, ...) must have an integer dtype, got target dtype {target.dtype}',
            )
        if validate_values and target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(
                f'index targets must lie in [0, {c}) for preds with {c} classes, '
                f'got values in [{int(target.min())}, {int(target.max())}]',
            )
    elif target.shape == preds.shape:
        if validate_values and target.numel():
            mass = target.to(torch.float64)
            if bool((mass < 0).any()):
                raise ValueError(f'soft target must be non-negative, got a minimum of {float(mass.min())}')
            worst = float((mass.sum(dim=1) - 1).abs().max())
            if worst > _ROW_SUM_ATOL:
                raise ValueError(f'soft target rows must sum to 1, got a row sum off by {worst:.4g}')
    elif target.ndim == 2 and preds.ndim == 2 and target.shape[0] == preds.shape[0]:
        raise ValueError(
            f'soft target must have as many columns as preds: target has {target.shape[1]}, '
            f'preds has {c} (shapes {tuple(target.shape)} and {tuple(preds.shape)})',
        )
    else:
        raise ValueError(
            f'target must be index labels {tuple(index_shape)} or a soft/one-hot target {tuple(preds.shape)} for preds '
            f'of shape {tuple(preds.shape)}, got shape {tuple(target.shape)}',
        )


def _mixed_labels_validate(preds: Tensor, target: MixedLabels, num_classes: Optional[int],
                           validate_values: bool) -> None:
    """Raise unless ``preds`` are ``(N, C)`` scores for the ``N`` samples of ``target`` (and, with
    ``validate_values``, its classes lie in ``[0, C)``)."""
    if not isinstance(preds, Tensor) or not preds.is_floating_point() or preds.ndim != 2:
        raise ValueError(f'preds must be floating-point scores of shape (N, C) for MixedLabels, got '
                         f'{type(preds).__name__} {tuple(getattr(preds, "shape", ()))}')
    if num_classes is not None and preds.shape[1] != num_classes:
        raise ValueError(f'preds must have num_classes={num_classes} columns, got preds of shape {tuple(preds.shape)}')
    if preds.shape[0] != len(target) or preds.device != target.device:
        raise ValueError(f'preds and target must hold the same samples on one device, got preds of shape '
                         f'{tuple(preds.shape)} on {preds.device} and MixedLabels of {len(target)} on {target.device}')
    if validate_values:
        target.check(preds.shape[1])


def _flatten_class_last(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, C, d...)`` preds and their target as ``(N * d..., C)`` rows: every position is one sample."""
    if preds.ndim == 2:
        return preds, target
    c = preds.shape[1]
    rows = preds.movedim(1, -1).reshape(-1, c)
    return rows, (target.movedim(1, -1).reshape(-1, c) if target.shape == preds.shape else target.reshape(-1))


def _soft_target_accuracy_update(preds: Tensor, target: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Return the summed per-sample scores (target mass on the top-k predicted classes) and the sample count."""
    preds, target = _flatten_class_last(preds, target)
    # argmax for k = 1 breaks ties the way torchmetrics does (first maximum); topk may not.
    top = preds.argmax(dim=1, keepdim=True) if top_k == 1 else preds.topk(top_k, dim=1).indices
    # Scores in float32 at least: under amp_bf16 the predictions are bfloat16, and a soft target
    # rounded to bfloat16 would score a λ of 0.7 as 0.69921875.
    dtype = torch.promote_types(preds.dtype, torch.float32)
    if isinstance(target, MixedLabels):  # the dense target's own floats at the top-k classes, not the target
        scores = target.entries(top, preds.shape[1]).to(dtype).sum(dim=1)
    elif target.ndim == 1:
        scores = (top == target.unsqueeze(1)).any(dim=1).to(dtype)
    else:
        scores = target.to(dtype).gather(1, top).sum(dim=1)
    # torch.full fills on the device; torch.tensor(n, device=...) would copy from the host and sync.
    count = torch.full((), preds.shape[0], dtype=torch.long, device=preds.device)
    return scores.sum(dtype=torch.float32), count


def _soft_target_accuracy_compute(score: Tensor, count: Tensor) -> Tensor:
    """Return the mean score; ``0`` when nothing was scored, as torchmetrics' accuracy does."""
    return _safe_divide(score.to(torch.float32), count.to(torch.float32))


# ----------------------------------------------------------------------------- accuracy


def soft_target_accuracy(preds: Tensor, target: Tensor, top_k: int = 1, validate_args: bool = True) -> Tensor:
    """Expected top-k accuracy under a soft target: the mean target mass on the top-k predicted classes.

    For index labels this is ``MulticlassAccuracy(num_classes, top_k=top_k, average='micro')``. For a
    CutMix target ``λ·onehot(own) + (1-λ)·onehot(partner)`` a sample scores λ when the model names its
    own class, ``1 - λ`` when it names the partner's, and 0 otherwise. Dense predictions
    ``(N, C, d...)`` (segmentation) score every position as a sample: pixel accuracy, as micro
    ``MulticlassAccuracy`` computes it.

    Args:
        preds: logits or probabilities of shape ``(N, C)`` or ``(N, C, d...)``.
        target: index labels ``(N,)``/``(N, d...)`` (integer) or a soft or one-hot target shaped like
            ``preds`` whose class axis (dim 1) sums to 1, or the :class:`~dist_cutmix.loss.MixedLabels` of
            ``(N, C)`` preds (exactly the score of their dense target).
        top_k: how many of the highest-scoring classes count as predicted, ``1 <= top_k <= C``.
        validate_args: check target values (index range, non-negative rows summing to 1); costs a
            device sync, as in torchmetrics.

    Returns:
        A scalar float tensor in ``[0, 1]`` (``0`` for an empty batch).

    Raises:
        TypeError: if ``preds`` or ``target`` is not a tensor, or ``top_k`` is not an int.
        ValueError: on a bad ``top_k``, mismatched shapes, or (with ``validate_args``) bad target values.

    Example:
        >>> import torch
        >>> preds = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> target = torch.tensor([[0.7, 0.3], [0.7, 0.3]])
        >>> soft_target_accuracy(preds, target)
        tensor(0.5000)
    """
    _soft_target_accuracy_validate(preds, target, None, validate_args)
    _check_top_k(top_k, preds.shape[1])
    score, count = _soft_target_accuracy_update(preds, target, top_k)
    return _soft_target_accuracy_compute(score, count)


class SoftTargetAccuracy(Metric):
    """Expected top-k accuracy under soft targets; equals micro ``MulticlassAccuracy`` on index labels.

    The score of a sample is the target mass on its ``top_k`` highest-scoring predicted classes;
    the metric is the mean score over all samples seen (on all ranks, once synced). See
    :func:`soft_target_accuracy`.

    Args:
        num_classes: number of classes ``C``.
        top_k: how many of the highest-scoring classes count as predicted, ``1 <= top_k <= C``.
        validate_args: check target values on every update (a device sync), as in torchmetrics.
        kwargs: torchmetrics ``Metric`` options (``dist_sync_on_step``, ``process_group``, ...).

    Raises:
        ValueError: on a bad ``num_classes`` or ``top_k``; on ``update``, on inputs that do not fit.

    Example:
        >>> import torch
        >>> metric = SoftTargetAccuracy(num_classes=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    score: Tensor
    count: Tensor

    def __init__(self, num_classes: int, top_k: int = 1, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_top_k(top_k, num_classes)
        self.num_classes = num_classes
        self.top_k = top_k
        self.validate_args = validate_args
        self.add_state('score', default=torch.tensor(0.0), dist_reduce_fx='sum')
        self.add_state('count', default=torch.tensor(0, dtype=torch.long), dist_reduce_fx='sum')

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` ``(N, C, d...)`` and index ``(N, d...)`` or soft ``(N, C, d...)`` targets."""
        _soft_target_accuracy_validate(preds, target, self.num_classes, self.validate_args)
        score, count = _soft_target_accuracy_update(preds, target, self.top_k)
        self.score += score.to(self.score.dtype)
        self.count += count

    def compute(self) -> Tensor:
        """Return the mean score of all samples seen."""
        return _soft_target_accuracy_compute(self.score, self.count)


# ----------------------------------------------------------------------------- wrapper


def _argmax_target(target: Tensor, binary: bool = False) -> Tensor:
    """Read a floating-point target as its most likely class; pass others unchanged.

    A target with a class axis (dim 1) becomes its argmax; a binary metric's target (a probability
    of the positive class, as CutMix mixes ``λ·y + (1-λ)·y'``) becomes ``1`` above 0.5, else ``0``
    (a tie goes to the lower class, as with argmax).
    """
    if isinstance(target, Tensor) and target.is_floating_point():
        if binary:
            return (target > 0.5).long()
        if target.ndim >= 2:
            return target.argmax(dim=1)
    return target


def _class_count(preds: object) -> Optional[int]:
    """The class axis' length of ``(N, C, ...)`` scores; ``None`` for binary ``(N,)`` scores."""
    return preds.shape[1] if isinstance(preds, Tensor) and preds.ndim >= 2 else None


def _is_binary(metric: Metric) -> bool:
    """True for a torchmetrics binary metric (or a subclass of one)."""
    return any(cls.__name__.startswith('Binary') for cls in type(metric).__mro__)


def _is_multilabel(metric: Metric) -> bool:
    """True for a torchmetrics multi-label metric (or a subclass of one)."""
    return any(cls.__name__.startswith('Multilabel') for cls in type(metric).__mro__)


class SoftTargetWrapper(MetricInputTransformer):
    """Let a torchmetrics classification metric take soft targets ``(N, C)`` by reading each as its argmax.

    A floating-point target with a class axis (``(N, C)``, or ``(N, C, ...)``) becomes index labels
    ``target.argmax(dim=1)`` (ties go to the lower class index); for a binary metric a mixed float
    target ``(N, ...)`` becomes ``target > 0.5``; index labels pass unchanged.
    Predictions are not touched. Everything else is the wrapped metric's own: ``compute``, ``reset``,
    ``forward``, distributed sync and ``state_dict`` (under the ``wrapped_metric.`` prefix), built on
    torchmetrics' :class:`~torchmetrics.wrappers.transformations.MetricInputTransformer`.

    :class:`~dist_cutmix.loss.MixedLabels` (from ``Mixer(..., targets='labels')``) are read as the class their
    dense target's argmax would name, ties included. Integer one-hot targets are not converted (an integer
    ``(N, d)`` target is also a valid multi-dimensional label); pass them as float.

    Args:
        metric: a multiclass or binary torchmetrics ``Metric``, such as ``MulticlassF1Score``.

    Raises:
        TypeError: if ``metric`` is not a torchmetrics ``Metric``, or is a multi-label metric (an
            argmax would drop all but one label).

    Example:
        >>> import torch
        >>> from torchmetrics.classification import MulticlassF1Score
        >>> metric = SoftTargetWrapper(MulticlassF1Score(num_classes=3, average='micro'))
        >>> metric.update(torch.tensor([[2.0, 0.1, 0.3], [0.1, 0.2, 3.0]]),
        ...               torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    wrapped_metric: Metric

    def __init__(self, metric: Metric) -> None:
        if not isinstance(metric, Metric):
            raise TypeError(f'metric must be a torchmetrics Metric, got {type(metric).__name__}')
        if _is_multilabel(metric):
            raise TypeError(
                f'SoftTargetWrapper reads a soft target as one class (argmax) and cannot serve the multi-label '
                f'metric {type(metric).__name__}',
            )
        super().__init__(metric)

    @property
    def _update_count(self) -> int:  # type: ignore[override]
        """The wrapped metric's update count, so that Composer's ``_update_count += 1`` on resume reaches it."""
        metric = self.__dict__.get('_modules', {}).get('wrapped_metric')
        return metric._update_count if metric is not None else 0

    @_update_count.setter
    def _update_count(self, value: int) -> None:
        metric = self.__dict__.get('_modules', {}).get('wrapped_metric')
        if metric is not None:  # Metric.__init__ sets it before the wrapped metric is attached
            metric._update_count = value

    @property
    def num_classes(self) -> Optional[int]:
        """The wrapped metric's ``num_classes`` (``None`` if it has none)."""
        return getattr(self.wrapped_metric, 'num_classes', None)

    @property
    def higher_is_better(self) -> Optional[bool]:  # type: ignore[override]
        """The wrapped metric's flag."""
        return self.wrapped_metric.higher_is_better

    @property
    def is_differentiable(self) -> Optional[bool]:  # type: ignore[override]
        """The wrapped metric's flag."""
        return self.wrapped_metric.is_differentiable

    def transform_target(self, target: Tensor, num_classes: Optional[int] = None) -> Tensor:
        """Turn a soft target into index labels (argmax over dim 1); leave index labels unchanged.

        :class:`~dist_cutmix.loss.MixedLabels` become the class their dense ``num_classes``-class target's argmax
        reads (``num_classes`` defaults to the wrapped metric's).
        """
        if isinstance(target, MixedLabels):
            return target.argmax(num_classes or self.num_classes or 2)
        num_classes = self.num_classes
        if (isinstance(target, Tensor) and target.is_floating_point() and target.ndim >= 2
                and isinstance(num_classes, int) and target.shape[1] != num_classes):
            raise ValueError(
                f'soft target must have num_classes={num_classes} columns for {type(self.wrapped_metric).__name__}, '
                f'got target of shape {tuple(target.shape)}',
            )
        return _argmax_target(target, binary=_is_binary(self.wrapped_metric))

    def update(self, preds: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> None:
        """Update the wrapped metric with ``target`` read as index labels."""
        self.wrapped_metric.update(preds, self.transform_target(target, _class_count(preds)), *args, **kwargs)

    def forward(self, preds: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped metric's ``forward`` with ``target`` read as index labels."""
        return self.wrapped_metric(preds, self.transform_target(target, _class_count(preds)), *args, **kwargs)

    def persistent(self, mode: bool = False) -> None:
        """Make the wrapped metric's states (not) part of ``state_dict``; Composer's checkpoints call this."""
        self.wrapped_metric.persistent(mode)
        super().persistent(mode)

    def sync(
        self,
        dist_sync_fn: Optional[Callable] = None,
        process_group: Optional[Any] = None,
        should_sync: bool = True,
        distributed_available: Optional[Callable] = None,
    ) -> None:
        """Sync the wrapped metric's states across processes."""
        self.wrapped_metric.sync(
            dist_sync_fn=dist_sync_fn, process_group=process_group, should_sync=should_sync,
            distributed_available=distributed_available,
        )

    def unsync(self, should_unsync: bool = True) -> None:
        """Restore the wrapped metric's local states after :meth:`sync`."""
        self.wrapped_metric.unsync(should_unsync=should_unsync)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.wrapped_metric!r})'


# ----------------------------------------------------------------------------- Composer glue

_CLASSIFICATION_METRICS: tuple[type, ...] = tuple(
    cls for name in tm_classification.__all__
    if isinstance(cls := getattr(tm_classification, name, None), type) and issubclass(cls, Metric))


def is_stock_classification(metric: object) -> bool:
    """True for a torchmetrics classification metric that would misread soft targets."""
    if isinstance(metric, (SoftTargetAccuracy, SoftTargetWrapper)):
        return False
    return isinstance(metric, _CLASSIFICATION_METRICS)


def _sync_kwargs(metric: Metric) -> dict[str, Any]:
    """The ``Metric`` keyword arguments that decide how ``metric`` syncs across processes."""
    return {name: getattr(metric, name) for name in _SYNC_KWARGS if hasattr(metric, name)}


def _soft_aware(metric: Metric) -> Metric:
    """Return a metric that reads soft targets truthfully in place of the stock ``metric``."""
    if (type(metric) is MulticlassAccuracy and metric.average == 'micro' and metric.multidim_average == 'global'
            and metric.ignore_index is None and isinstance(metric.num_classes, int)):
        replacement: Metric = SoftTargetAccuracy(
            metric.num_classes, top_k=metric.top_k or 1, validate_args=metric.validate_args, **_sync_kwargs(metric),
        )
        return replacement.to(metric.device)
    return SoftTargetWrapper(metric)


_MIXED_TARGETS = {
    'index': 'soft targets (N, C)',
    'soft': 'soft targets (N, C)',
    'binary': "mixed binary targets λ·y + (1-λ)·y' (floats between 0 and 1)",
}


def prepare_train_metrics(
    metrics: Optional[dict[str, Metric]], *, wrap: bool = True, kind: str = 'index', algorithm: str = 'CutMix',
) -> dict[str, Metric]:
    """Make train metrics read CutMix's soft targets truthfully, or refuse the ones that cannot.

    Each stock torchmetrics classification metric (from ``torchmetrics.classification``) that is
    not already soft-aware is replaced under the same key: a micro-averaged ``MulticlassAccuracy``
    by :class:`SoftTargetAccuracy` (same ``num_classes`` and ``top_k``), any other by
    :class:`SoftTargetWrapper` around it. One warning on the ``dist_cutmix`` logger names what was
    replaced. Other metrics pass through untouched. The input dict is not changed.

    Args:
        metrics: Composer's ``state.train_metrics`` (``None`` gives ``{}``).
        wrap: replace stock metrics; with ``False`` a stock metric is an error instead.
        kind: the kind of the targets before mixing (see :func:`dist_cutmix.functional.target_kind`),
            named in the error; dense targets are pasted, not softened, and need no change.
        algorithm: the mixing algorithm's name, for the error and the log line.

    Returns:
        A new dict with the same keys, in the same order.

    Raises:
        ValueError: with ``wrap=False``, naming each stock classification metric's key and class and
            the fix; always, for a multi-label classification metric (soft targets cannot be read
            as its labels).

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> prepare_train_metrics({'MulticlassAccuracy': MulticlassAccuracy(num_classes=10, average='micro')})
        {'MulticlassAccuracy': SoftTargetAccuracy()}
    """
    if metrics is None:
        return {}
    if kind == 'dense':
        return dict(metrics)
    stock = {key: metric for key, metric in metrics.items() if is_stock_classification(metric)}
    multilabel = [f'{key!r} ({type(m).__name__})' for key, m in stock.items() if _is_multilabel(m)]
    if multilabel:
        raise ValueError(
            f'{algorithm} mixes targets into soft targets, which the multi-label train metric(s) '
            f'{", ".join(multilabel)} cannot read; use {algorithm}(interpolate_loss=True), which keeps the targets '
            f'unmixed, or remove them '
            f'from the train metrics',
        )
    if stock and not wrap:
        names = ', '.join(f'{key!r} ({type(m).__name__})' for key, m in stock.items())
        raise ValueError(
            f'{algorithm} puts {_MIXED_TARGETS.get(kind, "mixed targets")} into the batch, and the train metric(s) '
            f'{names} would report wrong numbers on them without an error; use dist_cutmix.metrics.SoftTargetAccuracy '
            f'or SoftTargetWrapper(metric) instead, or {algorithm}(wrap_train_metrics=True) to do it for you',
        )
    prepared = {key: _soft_aware(stock[key]) if key in stock else metric for key, metric in metrics.items()}
    if stock:
        log.warning(
            '%s: train metrics read soft targets now: %s', algorithm,
            '; '.join(f'{key!r}: {type(stock[key]).__name__} -> {_describe(prepared[key])}' for key in stock),
        )
    return prepared


def _describe(metric: Metric) -> str:
    """One line on a replacement metric, for the log."""
    if isinstance(metric, SoftTargetAccuracy):
        return f'SoftTargetAccuracy(num_classes={metric.num_classes}, top_k={metric.top_k}) (expected accuracy)'
    return f'SoftTargetWrapper({type(metric.wrapped_metric).__name__}) (soft targets read as argmax)'  # type: ignore[union-attr]
