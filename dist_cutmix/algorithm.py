"""The Composer ``Algorithm``s: a thin adapter from training events to :mod:`dist_cutmix.mixer`.

``CutMix``, ``MixUp`` and ``MixUpCutMix`` are one adapter (:class:`MixingAlgorithm`) configured by a
:class:`~dist_cutmix.spec.MixSpec`: what differs between them is what is drawn, not how it is applied.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from dist_cutmix.distributed import ProcessGroup, node_group
from dist_cutmix.locate import RowLookupError, locate_rows
from dist_cutmix.metrics import prepare_train_metrics
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from dist_cutmix.spec import MixSpec
from dist_cutmix.targets import mix_targets
from dist_cutmix.validation import check_input, check_num_classes, check_pool, check_seed, check_target

__all__ = ['CutMix', 'MixUp', 'MixUpCutMix', 'MixingAlgorithm']

log = logging.getLogger(__name__)



@dataclass
class _Run:
    """What one Trainer run learns; made anew at ``Event.INIT`` so a reused ``CutMix`` starts clean."""

    group: ProcessGroup = None
    group_ready: bool = False
    last: Optional[MixResult] = None
    soft_targets_at_loss: bool = False  # index targets whose class count only the outputs tell
    metrics_checked: bool = False
    warned_single: bool = False
    warned_dense_interpolation: bool = False
    stopped: bool = False  # stop_at has come: nothing is mixed any more


class MixingAlgorithm(Algorithm):
    """The one Composer adapter behind :class:`CutMix`, :class:`MixUp` and :class:`MixUpCutMix`.

    Each batch is mixed once, at ``Event.AFTER_DATALOADER``, as ``spec`` says; see :class:`CutMix` for
    the events, the randomness and every keyword argument. Use the three subclasses.
    """

    _log_prefix = 'mix'

    def __init__(
        self,
        spec: MixSpec,
        interpolate_loss: bool = False,
        input_key: Union[str, int, tuple[Callable, Callable], Any] = 0,
        target_key: Union[str, int, tuple[Callable, Callable], Any] = 1,
        *,
        mode: str = 'local',
        seed: Optional[int] = None,
        exclude_self: bool = True,
        num_classes: Optional[int] = None,
        process_group: ProcessGroup = None,
        wrap_train_metrics: bool = True,
        inplace: Optional[bool] = None,
        per_sample: bool = False,
        stop_at: Union[str, Time, None] = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(spec, MixSpec):
            raise TypeError(f'spec must be a dist_cutmix.MixSpec, got {type(spec).__name__}')
        check_pool(mode, process_group, 'process_group')
        check_seed(seed)
        check_num_classes(num_classes)
        if inplace not in (None, True, False):
            raise TypeError(f'inplace must be None, True or False, got inplace={inplace!r}')
        if per_sample and interpolate_loss:
            raise ValueError(
                f'per_sample=True gives every sample its own λ, and interpolate_loss=True would need a per-sample loss '
                f'(reduction="none") that Composer models do not promise; use interpolate_loss=False, whose soft '
                f'targets carry each sample\'s λ, got per_sample=True with interpolate_loss=True in {name}',
            )
        if interpolate_loss and spec.label_smoothing:
            raise ValueError(f'interpolate_loss=True keeps index targets and cannot smooth them, got '
                             f'label_smoothing={spec.label_smoothing}')
        self.spec = spec
        self.interpolate_loss = interpolate_loss
        self.input_key, self.target_key = input_key, target_key
        self.mode = mode
        self.seed = seed
        self.exclude_self = exclude_self
        self.num_classes = num_classes
        self.process_group = process_group
        self.wrap_train_metrics = wrap_train_metrics
        self.inplace = inplace
        self.per_sample = per_sample
        self.stop_at = _parse_stop_at(stop_at)
        self._run = self._new_run()

    # ------------------------------------------------------------------ events

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BEFORE_LOAD, Event.FIT_START, Event.AFTER_DATALOADER, Event.BEFORE_LOSS,
                         Event.BEFORE_BACKWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._run = self._new_run()
        elif event == Event.BEFORE_LOAD:
            # Before a checkpoint's metric states are loaded, so they land in the soft-aware metrics.
            self._wrap_train_metrics(state)
        elif event == Event.FIT_START:
            self._setup_group()
            self._wrap_train_metrics(state)  # metrics may have changed since; a no-op otherwise
        elif event == Event.AFTER_DATALOADER:
            self._mix(state, logger)
        elif event == Event.BEFORE_LOSS:
            self._check_outputs(state)
            if self._run.soft_targets_at_loss:
                self._soft_targets_from_outputs(state)
        elif event == Event.BEFORE_BACKWARD and self.interpolate_loss and not self._run.stopped:
            self._interpolate_loss(state)  # (after stop_at nothing is mixed: the loss is already the plain one)

    # ------------------------------------------------------------------ pieces

    def _new_run(self) -> _Run:
        return _Run(group=self.process_group, group_ready=self.mode == 'local' or self.process_group is not None)

    def _setup_group(self) -> None:
        """Build the node's process group once a run; every rank must take part, so it runs at FIT_START."""
        if self._run.group_ready:
            return
        self._run.group_ready = True
        if self.mode == 'node':
            self._run.group = node_group(dist.get_local_world_size(), dist.get_local_rank(), dist.get_node_rank())

    def _wrap_train_metrics(self, state: State) -> None:
        # With interpolate_loss the targets stay unmixed; without wrapping, the check waits for a batch.
        if self.wrap_train_metrics and not self.interpolate_loss:
            state.train_metrics = prepare_train_metrics(state.train_metrics, wrap=True, algorithm=type(self).__name__)

    def _class_count(self, state: State) -> Optional[int]:
        """``num_classes``, else a train metric's or the model's; never stored (a run's model is its own)."""
        if self.num_classes is not None:
            return self.num_classes
        model = state.model
        candidates = [getattr(m, 'num_classes', None) for m in (state.train_metrics or {}).values()]
        candidates += [getattr(model, 'num_classes', None),
                       getattr(getattr(model, 'module', None), 'num_classes', None)]
        return next((c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c > 0), None)

    def _mix(self, state: State, logger: Logger) -> None:
        """Mix the batch once, on its device, and put it back: the metrics and every microbatch see the result."""
        run = self._run
        before = state.batch_get_item(key=self.input_key)
        state.batch = state.device.batch_to_device(state.batch)
        input, target = state.batch_get_item(key=self.input_key), state.batch_get_item(key=self.target_key)
        kind = _kind_or_none(input, target)
        self._check_train_metrics_once(state, kind)
        num_classes = self._class_count(state) if kind == 'index' else self.num_classes
        # Dense targets are pasted either way: interpolating a per-pixel loss by area would be wrong.
        mix_target = not self.interpolate_loss or kind == 'dense'
        run.soft_targets_at_loss = mix_target and kind == 'index' and num_classes is None
        self._warn_once(input, kind)
        run.stopped = self._stopped(state)
        if run.stopped and not self.spec.label_smoothing:  # nothing to mix and nothing to smooth
            run.last, run.soft_targets_at_loss = None, False
            logger.log_metrics({f'{self._log_prefix}/lambda': 1.0})
            return
        result = self._mix_batch(input, target, seed=self.seed if self.seed is not None else state.rank_zero_seed,
                                 batch=int(state.timestamp.batch), num_classes=num_classes,
                                 mix_target=mix_target and not run.soft_targets_at_loss,
                                 inplace=self.inplace if self.inplace is not None else _is_fresh_copy(before, input))
        state.batch_set_item(key=self.input_key, value=result.input)
        state.batch_set_item(key=self.target_key, value=result.target)
        run.last = result
        self._log(logger, result)

    def _mix_batch(self, input: Any, target: Any, **kwargs: Any) -> MixResult:
        """The mixer call: across the group, or locally (always after ``stop_at``, where nothing crosses ranks)."""
        stopped = self._run.stopped
        spec = replace(self.spec, prob=0.0) if stopped else self.spec  # after stop_at: smoothing only
        common = dict(spec=spec, exclude_self=self.exclude_self, per_sample=self.per_sample, **kwargs)
        if self.mode == 'local' or stopped:
            return mix_batch_local(input, target, rank=dist.get_global_rank(), **common)
        return mix_batch_across_group(input, target, group=self._run.group, caller=type(self).__name__, **common)

    def _check_train_metrics_once(self, state: State, kind: Optional[str]) -> None:
        """Raise, naming the fix, for a stock metric that would misread the mixed targets (first batch only)."""
        if self._run.metrics_checked:
            return
        self._run.metrics_checked = True
        if not self.interpolate_loss and kind not in (None, 'dense'):
            prepare_train_metrics(state.train_metrics, wrap=self.wrap_train_metrics, kind=kind,
                                  algorithm=type(self).__name__)

    def _warn_once(self, input: Any, kind: Optional[str]) -> None:
        """Say once what this configuration cannot do: a local batch of one, an interpolated dense loss."""
        run, name = self._run, type(self).__name__
        if self.interpolate_loss and kind == 'dense' and not run.warned_dense_interpolation:
            run.warned_dense_interpolation = True
            warnings.warn(
                f'{name}(interpolate_loss=True) with dense targets: the partner region is pasted into the target map '
                f'(MixUp: blended with it), which is exact per pixel, and the loss is not interpolated.', UserWarning,
                stacklevel=3,
            )
        if (self.mode == 'local' and isinstance(input, torch.Tensor) and input.ndim == 4 and input.shape[0] == 1
                and not run.warned_single):
            run.warned_single = True
            warnings.warn(
                f"{name}(mode='local') got a per-rank batch of 1 sample, which cannot be mixed locally; "
                "mode='global' mixes across ranks and fixes it.", UserWarning, stacklevel=3,
            )

    def _log(self, logger: Logger, result: MixResult) -> None:
        prefix = self._log_prefix
        metrics = {f'{prefix}/lambda': result.mean_label_lam}
        if self.mode != 'local':
            metrics[f'{prefix}/cross_rank_fraction'] = 0.0 if self._run.stopped else result.cross_rank_fraction
        logger.log_metrics(metrics)

    def _stopped(self, state: State) -> bool:
        """Whether ``stop_at`` has come: the same answer on every rank and after a resume (it reads the timestamp)."""
        if self.stop_at is None:
            return False
        if self.stop_at.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            return elapsed is not None and elapsed >= self.stop_at
        return state.timestamp.get(self.stop_at.unit) >= self.stop_at

    def _check_outputs(self, state: State) -> None:
        """Raise, before the loss does, for floating class indices: (N,) float targets against (N, C) outputs."""
        last = self._run.last
        outputs = state.outputs
        if (last is not None and last.kind == 'binary' and isinstance(outputs, torch.Tensor) and outputs.ndim == 2
                and outputs.shape[1] > 1):
            raise ValueError(
                f'{type(self).__name__} got floating targets of shape (N,), which it mixes as binary probabilities, '
                f'but the model outputs {tuple(outputs.shape)} class scores: class indices must be an integer tensor '
                f'(pass target.long() in the dataset or collate function)',
            )

    def _partner_targets(self, state: State, why: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows in the mixed batch of the samples of ``state.batch`` (a microbatch), found by the samples
        themselves, and their partners' targets."""
        last = self._run.last
        if last is None:
            raise RuntimeError(f'{type(self).__name__} {why} needs a batch mixed at Event.AFTER_DATALOADER, and none '
                               f'was')
        input = state.batch_get_item(key=self.input_key)
        try:
            rows = locate_rows(input, last.input, labels=last.partner_target)
        except RowLookupError as e:
            name = type(self).__name__
            raise RuntimeError(
                f'{name} {why} cannot tell which mixed samples this microbatch holds: {e}. An algorithm changed the '
                f'images after {name} mixed them at Event.AFTER_DATALOADER (Composer runs AFTER_DATALOADER '
                f'algorithms in reverse list order). Put {name} before that algorithm in Trainer(algorithms=[...]) '
                f'so that it runs first and {name} mixes its result.',
            ) from e
        return rows, last.partner_target.index_select(0, rows.to(last.partner_target.device))

    def _soft_targets_from_outputs(self, state: State) -> None:
        last = self._run.last
        outputs = state.outputs
        target = state.batch_get_item(key=self.target_key)
        name = type(self).__name__
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[0] != target.shape[0]:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f'{name} takes the class count of index targets from the model outputs (N, C) when no num_classes is '
                f'known, got outputs {shape} for {target.shape[0]} targets; pass {name}(num_classes=...)',
            )
        if not isinstance(target, torch.Tensor) or target.ndim != 1 or target.is_floating_point():
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise RuntimeError(
                f'{name} builds soft targets at Event.BEFORE_LOSS from the index targets it mixed, but another '
                f'algorithm turned them into {shape} targets first (Composer\'s LabelSmoothing listed before {name}? '
                f'BEFORE_LOSS algorithms run in list order). Put {name} before it in Trainer(algorithms=[...]) (label '
                f'smoothing commutes with the mix), or pass {name}(num_classes=...) so the targets are mixed at '
                f'AFTER_DATALOADER, or use MixUpCutMix(label_smoothing=...)',
            )
        rows, partner = self._partner_targets(state, 'building soft targets from the outputs')
        lam = last.lam[rows.cpu()] if isinstance(last.lam, torch.Tensor) else last.lam  # type: ignore[union-attr]
        soft = mix_targets(target, partner, lam, (0, 0, 0, 0), kind='index', num_classes=outputs.shape[1],
                             smoothing=self.spec.label_smoothing if last is not None else 0.0)
        state.batch_set_item(key=self.target_key, value=soft)

    def _interpolate_loss(self, state: State) -> None:
        last = self._run.last
        if last is not None and last.kind == 'dense':
            return  # the target map was pasted: the loss is already exact
        if not isinstance(state.loss, torch.Tensor):
            raise RuntimeError(f'{type(self).__name__}(interpolate_loss=True) needs one tensor loss, got '
                               f'{type(state.loss).__name__}')
        _, partner = self._partner_targets(state, '(interpolate_loss=True)')
        model = state.model
        loss_fn = getattr(model, 'loss', None) or model.module.loss
        # The partner loss reads the user's own batch layout, with the target swapped through target_key.
        own = state.batch_get_item(key=self.target_key)
        state.batch_set_item(key=self.target_key, value=partner)
        try:
            partner_loss = loss_fn(state.outputs, state.batch)
        finally:
            state.batch_set_item(key=self.target_key, value=own)
        weight = last.label_lam  # type: ignore[union-attr]
        state.loss = weight * state.loss + (1.0 - weight) * partner_loss


class CutMix(MixingAlgorithm):
    """CutMix that owns its randomness and can mix across ranks; a drop-in for ``composer.algorithms.CutMix``.

    Each batch is mixed once, at ``Event.AFTER_DATALOADER`` (after the batch is moved to the
    device), so every microbatch, and the train metrics, see the same mixed batch and its mixed
    targets. When the class count of index targets is known up front (``num_classes``, a train
    metric's or the model's), the soft targets are built then too; otherwise they are built per
    microbatch at ``Event.BEFORE_LOSS`` from the class count of the model's outputs, as Composer's
    CutMix does (the train metrics then see the unmixed labels). Every draw for batch ``b`` comes
    from a generator seeded by ``(seed, b, ...)``: the same seed mixes the same way, ranks mix
    differently, and a resumed run mixes its later batches exactly as the uninterrupted run did,
    with no state in the checkpoint.

    Args:
        alpha: Beta(alpha, alpha) concentration of the kept share λ. ``alpha=0`` disables
            mixing (λ = 1). (Composer's stock ``CutMix`` sets λ = 0 for ``alpha=0`` and then
            pastes a clipped box covering 25-100% of the image; we do not copy that bug.)
        interpolate_loss: keep index targets and interpolate the loss,
            ``λ * loss(own) + (1 - λ) * loss(partner)``, per microbatch. Only right for losses
            linear in the target, such as cross entropy.
        uniform_sampling: sample the box centre so every pixel is equally likely to be cut.
        input_key: where the input sits in the batch (index, key, or ``(getter, setter)``).
        target_key: where the target sits in the batch.
        mode: ``'local'`` mixes inside each rank's batch; ``'global'`` over the whole process
            group's batch; ``'node'`` over the ranks of one node. With one process every mode
            mixes locally, with no collective.
        seed: seed of the mixing; defaults to Composer's ``state.rank_zero_seed``.
        exclude_self: never pair a sample with itself when its batch has more than one sample;
            ``False`` gives the paper's plain permutation.
        num_classes: number of classes, to turn index targets into soft ones. By default taken
            from a train metric's or the model's ``num_classes``.
        process_group: the group to mix over in ``'global'`` mode (default: all ranks).
        wrap_train_metrics: before checkpoint loading and at fit start, replace each stock
            torchmetrics classification train metric (logged): a micro ``MulticlassAccuracy``
            by :class:`~dist_cutmix.metrics.SoftTargetAccuracy`, others by
            :class:`~dist_cutmix.metrics.SoftTargetWrapper`, so that no metric silently reports
            a wrong number on soft targets. With ``False``, such a metric stops training at the
            first batch whose targets CutMix softens (not for dense targets, which are pasted),
            with an error that names the fix.
        inplace: who owns the batch's memory. ``None`` (default): paste into the input only when
            moving the batch to the device just made a copy of it (a host batch going to the
            GPU); otherwise mix a copy, since a collated batch can alias the user's dataset
            (``DataLoader(batch_size=None)`` over numpy arrays, cached tensors). ``True``: the
            batch is yours to overwrite, always paste in place. ``False``: always mix a copy.
        per_sample: give every sample its own λ ~ Beta(alpha, alpha) and box (locally, or over the
            whole global batch in ``'global'``/``'node'`` mode), instead of one box and λ for the
            batch; soft targets use each sample's own λ and ``cutmix/lambda`` logs the batch mean.
            Not with ``interpolate_loss``.
        stop_at: a Composer time (``'0.9dur'``, ``'90ep'``, ``'1000ba'``) from which on nothing is mixed
            (timm's ``mixup_off_epoch``); label smoothing, where there is any, stays on. A resumed run
            stops at the same batch.

    Raises:
        ValueError: on a bad ``alpha``, ``mode`` or ``stop_at``, or a ``process_group`` outside ``'global'`` mode.

    Example:
        >>> from dist_cutmix import CutMix
        >>> algorithm = CutMix(alpha=1.0, mode='global')
    """

    _log_prefix = 'cutmix'

    def __init__(
        self,
        alpha: float = 1.0,
        interpolate_loss: bool = False,
        uniform_sampling: bool = False,
        input_key: Union[str, int, tuple[Callable, Callable], Any] = 0,
        target_key: Union[str, int, tuple[Callable, Callable], Any] = 1,
        *,
        mode: str = 'local',
        seed: Optional[int] = None,
        exclude_self: bool = True,
        num_classes: Optional[int] = None,
        process_group: ProcessGroup = None,
        wrap_train_metrics: bool = True,
        inplace: Optional[bool] = None,
        per_sample: bool = False,
        stop_at: Union[str, Time, None] = None,
    ) -> None:
        spec = MixSpec.cutmix(alpha, uniform_sampling)
        self.alpha, self.uniform_sampling = spec.cutmix_alpha, uniform_sampling
        super().__init__(spec, interpolate_loss, input_key, target_key,
                         mode=mode, seed=seed, exclude_self=exclude_self, num_classes=num_classes,
                         process_group=process_group, wrap_train_metrics=wrap_train_metrics, inplace=inplace,
                         per_sample=per_sample, stop_at=stop_at)


class MixUp(MixingAlgorithm):
    """MixUp that owns its randomness and can mix across ranks; a drop-in for ``composer.algorithms.MixUp``.

    Every sample becomes ``(1 - m) * own + m * partner``, its label ``(1 - m) * y + m * y'``, with the
    partner weight ``m = min(z, 1 - z)``, ``z ~ Beta(alpha, alpha)`` as Composer draws it (so the own
    label stays the main one), rounded to a multiple of ``2**-10`` so that image and label use the same
    weight and one-hot rows sum to exactly 1. Mixed once per batch at ``Event.AFTER_DATALOADER`` (not
    per microbatch at ``BEFORE_FORWARD`` as Composer's), with the train metrics seeing the mixed
    targets. Across ranks (``mode='global'``/``'node'``) each partner's whole image crosses once.

    Args:
        alpha: Beta(alpha, alpha) concentration; ``alpha=0`` means no mixing.
        interpolate_loss: keep index targets and interpolate the loss, ``(1 - m) * loss(own) + m * loss(partner)``.
        input_key: where the input sits in the batch (index, key, or ``(getter, setter)``).
        target_key: where the target sits in the batch.
        mode, seed, exclude_self, num_classes, process_group, wrap_train_metrics, inplace, per_sample
            (each sample its own ``m``), stop_at: as for :class:`CutMix`.

    Dense targets: floating ``(N, C, H, W)`` maps are blended like the images; class-index maps are an
    error (Composer's MixUp one-hot encodes them with the outputs' class count; use CutMix there).

    Example:
        >>> from dist_cutmix import MixUp
        >>> algorithm = MixUp(alpha=0.2, mode='global')
    """

    _log_prefix = 'mixup'

    def __init__(
        self,
        alpha: float = 0.2,
        interpolate_loss: bool = False,
        input_key: Union[str, int, tuple[Callable, Callable], Any] = 0,
        target_key: Union[str, int, tuple[Callable, Callable], Any] = 1,
        *,
        mode: str = 'local',
        seed: Optional[int] = None,
        exclude_self: bool = True,
        num_classes: Optional[int] = None,
        process_group: ProcessGroup = None,
        wrap_train_metrics: bool = True,
        inplace: Optional[bool] = None,
        per_sample: bool = False,
        stop_at: Union[str, Time, None] = None,
    ) -> None:
        spec = MixSpec.mixup(alpha)
        self.alpha = spec.mixup_alpha
        super().__init__(spec, interpolate_loss, input_key, target_key,
                         mode=mode, seed=seed, exclude_self=exclude_self, num_classes=num_classes,
                         process_group=process_group, wrap_train_metrics=wrap_train_metrics, inplace=inplace,
                         per_sample=per_sample, stop_at=stop_at)


class MixUpCutMix(MixingAlgorithm):
    """timm's ``Mixup``: switch between MixUp and CutMix per batch (or per sample) and smooth the labels.

    With probability ``prob`` a batch (with ``per_sample=True``, a sample: timm's ``mode='elem'``) is
    mixed; when both alphas are > 0 it gets CutMix with probability ``switch_prob``, else MixUp; one
    alpha at 0 means only the other. λ ~ Beta of the chosen alpha (MixUp's image is
    ``λ * own + (1 - λ) * partner``, λ on the ``2**-10`` label grid; CutMix's λ is its clipped box's kept
    share). Soft targets are ``(1 - ε) * (λ * y + (1 - λ) * y') + ε / C`` with ``ε = label_smoothing``,
    also for batches that are not mixed and after ``stop_at``. Unlike timm's, the pairing is a random
    permutation without fixed points (not ``flip``), any batch size works, and the draws are owned
    and resumable.

    Args:
        mixup_alpha: MixUp's Beta concentration; 0 turns MixUp off.
        cutmix_alpha: CutMix's Beta concentration; 0 turns CutMix off.
        cutmix_minmax: ``(lo, hi)``: CutMix box sides uniform in ``[lo, hi)`` of the image sides, as
            timm's ``rand_bbox_minmax`` (λ is then the box's; ``cutmix_alpha`` becomes 1).
        prob: probability of mixing a batch (or sample).
        switch_prob: probability of CutMix rather than MixUp when both are on.
        label_smoothing: ``ε``.
        per_sample: one draw per sample instead of per batch.
        stop_at: from this Composer time on nothing is mixed (timm's ``mixup_off_epoch``); smoothing stays.
        input_key: where the input sits in the batch.
        target_key: where the target sits in the batch.
        mode, seed, exclude_self, num_classes, process_group, wrap_train_metrics, inplace: as for :class:`CutMix`.

    Example:
        >>> from dist_cutmix import MixUpCutMix
        >>> algorithm = MixUpCutMix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
        ...                         mode='global')
    """

    _log_prefix = 'mixupcutmix'

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: Optional[tuple[float, float]] = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        *,
        input_key: Union[str, int, tuple[Callable, Callable], Any] = 0,
        target_key: Union[str, int, tuple[Callable, Callable], Any] = 1,
        mode: str = 'local',
        seed: Optional[int] = None,
        exclude_self: bool = True,
        num_classes: Optional[int] = None,
        process_group: ProcessGroup = None,
        wrap_train_metrics: bool = True,
        inplace: Optional[bool] = None,
        per_sample: bool = False,
        stop_at: Union[str, Time, None] = None,
    ) -> None:
        spec = MixSpec(cutmix_alpha=cutmix_alpha, mixup_alpha=mixup_alpha, prob=prob, switch_prob=switch_prob,
                       cutmix_minmax=cutmix_minmax, label_smoothing=label_smoothing)
        super().__init__(spec, False, input_key, target_key, mode=mode, seed=seed, exclude_self=exclude_self,
                         num_classes=num_classes, process_group=process_group, wrap_train_metrics=wrap_train_metrics,
                         inplace=inplace, per_sample=per_sample, stop_at=stop_at)


def _parse_stop_at(stop_at: Union[str, Time, None]) -> Optional[Time]:
    """``stop_at`` as a Composer ``Time``; raise, naming it, for anything else."""
    if stop_at is None:
        return None
    try:
        time = Time.from_timestring(stop_at) if isinstance(stop_at, str) else stop_at
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"stop_at must be a Composer time string such as '0.9dur', '90ep' or '1000ba', "
                         f'got stop_at={stop_at!r}') from e
    if not isinstance(time, Time) or time.unit not in _STOP_UNITS or time.value < 0:
        raise ValueError(f"stop_at must be a Composer time of {', '.join(u.value for u in _STOP_UNITS)} units, "
                         f"such as '0.9dur' or '90ep', got stop_at={stop_at!r}")
    return time


_STOP_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.DURATION)


def _kind_or_none(input: object, target: object) -> Optional[str]:
    """The target kind, or ``None`` for a malformed batch (the mixer then raises the full error)."""
    try:
        return check_target(target, check_input(input))
    except (TypeError, ValueError):
        return None


def _is_fresh_copy(before: object, after: object) -> bool:
    """True when moving the batch to the device made ``after`` a new tensor: memory no one else holds."""
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and (after.device != before.device or after.data_ptr() != before.data_ptr()))
