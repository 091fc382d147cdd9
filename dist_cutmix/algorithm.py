"""The Composer ``Algorithm``: a thin adapter from training events to :mod:`dist_cutmix.mixer`."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from dist_cutmix import functional as F
from dist_cutmix.distributed import ProcessGroup, node_group
from dist_cutmix.locate import RowLookupError, locate_rows
from dist_cutmix.metrics import prepare_train_metrics
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local

__all__ = ['CutMix']

log = logging.getLogger(__name__)

MODES = ('local', 'global', 'node')


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


class CutMix(Algorithm):
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

    Raises:
        ValueError: on a bad ``alpha`` or ``mode``, or a ``process_group`` outside ``'global'`` mode.

    Example:
        >>> from dist_cutmix import CutMix
        >>> algorithm = CutMix(alpha=1.0, mode='global')
    """

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
    ) -> None:
        self.alpha = F.validate_alpha(alpha)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        if process_group is not None and mode != 'global':
            raise ValueError(f"process_group is only used with mode='global', got mode={mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f'seed must be an int or None, got seed={seed!r}')
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f'num_classes must be a positive int or None, got num_classes={num_classes!r}')
        if inplace not in (None, True, False):
            raise TypeError(f'inplace must be None, True or False, got inplace={inplace!r}')
        if per_sample and interpolate_loss:
            raise ValueError(
                'per_sample=True gives every sample its own λ, and interpolate_loss=True would need a per-sample loss '
                '(reduction="none") that Composer models do not promise; use interpolate_loss=False, whose soft '
                'targets carry each sample\'s λ, got per_sample=True with interpolate_loss=True',
            )
        self.interpolate_loss = interpolate_loss
        self.uniform_sampling = uniform_sampling
        self.input_key, self.target_key = input_key, target_key
        self.mode = mode
        self.seed = seed
        self.exclude_self = exclude_self
        self.num_classes = num_classes
        self.process_group = process_group
        self.wrap_train_metrics = wrap_train_metrics
        self.inplace = inplace
        self.per_sample = per_sample
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
        elif event == Event.BEFORE_LOSS and self._run.soft_targets_at_loss:
            self._soft_targets_from_outputs(state)
        elif event == Event.BEFORE_BACKWARD and self.interpolate_loss:
            self._interpolate_loss(state)

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
            state.train_metrics = prepare_train_metrics(state.train_metrics, wrap=True)

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
        run = self._run
        before = state.batch_get_item(key=self.input_key)
        state.batch = state.device.batch_to_device(state.batch)
        input = state.batch_get_item(key=self.input_key)
        target = state.batch_get_item(key=self.target_key)
        kind = _kind_or_none(input, target)
        if not run.metrics_checked:
            run.metrics_checked = True
            if not self.interpolate_loss and kind not in (None, 'dense'):
                # Raises, naming the fix, for a stock metric that would misread mixed targets.
                prepare_train_metrics(state.train_metrics, wrap=self.wrap_train_metrics, kind=kind)
        num_classes = self._class_count(state) if kind == 'index' else self.num_classes
        # Dense targets are pasted either way: interpolating a per-pixel loss by area would be wrong.
        mix_target = not self.interpolate_loss or kind == 'dense'
        run.soft_targets_at_loss = mix_target and kind == 'index' and num_classes is None
        if self.interpolate_loss and kind == 'dense' and not run.warned_dense_interpolation:
            run.warned_dense_interpolation = True
            warnings.warn(
                'CutMix(interpolate_loss=True) with dense targets: the partner box is pasted into the target map, '
                'which is exact per pixel, and the loss is not interpolated.', UserWarning, stacklevel=2,
            )
        kwargs = dict(
            seed=self.seed if self.seed is not None else state.rank_zero_seed,
            batch=int(state.timestamp.batch),
            alpha=self.alpha, uniform_sampling=self.uniform_sampling, exclude_self=self.exclude_self,
            num_classes=num_classes, mix_target=mix_target and not run.soft_targets_at_loss,
            inplace=self.inplace if self.inplace is not None else _is_fresh_copy(before, input),
            per_sample=self.per_sample,
        )
        if self.mode == 'local':
            if isinstance(input, torch.Tensor) and input.ndim == 4 and input.shape[0] == 1 and not run.warned_single:
                run.warned_single = True
                warnings.warn(
                    "CutMix(mode='local') got a per-rank batch of 1 sample, which cannot be mixed locally; "
                    "mode='global' mixes across ranks and fixes it.", UserWarning, stacklevel=2,
                )
            result = mix_batch_local(input, target, rank=dist.get_global_rank(), **kwargs)
        else:
            result = mix_batch_across_group(input, target, group=run.group, **kwargs)
        state.batch_set_item(key=self.input_key, value=result.input)
        state.batch_set_item(key=self.target_key, value=result.target)
        run.last = result
        metrics = {'cutmix/lambda': result.mean_label_lam}
        if self.mode != 'local':
            metrics['cutmix/cross_rank_fraction'] = result.cross_rank_fraction
        logger.log_metrics(metrics)

    def _partner_targets(self, state: State, why: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows in the mixed batch of the samples of ``state.batch`` (a microbatch), found by the samples
        themselves, and their partners' targets."""
        last = self._run.last
        if last is None:
            raise RuntimeError(f'CutMix {why} needs a batch mixed at Event.AFTER_DATALOADER, and none was')
        input = state.batch_get_item(key=self.input_key)
        try:
            rows = locate_rows(input, last.input, labels=last.partner_target)
        except RowLookupError as e:
            raise RuntimeError(
                f'CutMix {why} cannot tell which mixed samples this microbatch holds: {e}. An algorithm changed the '
                f'images after CutMix mixed them at Event.AFTER_DATALOADER (Composer runs AFTER_DATALOADER '
                f'algorithms in reverse list order). Put CutMix before that algorithm in Trainer(algorithms=[...]) '
                f'so that it runs first and CutMix mixes its result.',
            ) from e
        return rows, last.partner_target.index_select(0, rows.to(last.partner_target.device))

    def _soft_targets_from_outputs(self, state: State) -> None:
        last = self._run.last
        outputs = state.outputs
        target = state.batch_get_item(key=self.target_key)
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[0] != target.shape[0]:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f'CutMix takes the class count of index targets from the model outputs (N, C) when no num_classes is '
                f'known, got outputs {shape} for {target.shape[0]} targets; pass CutMix(num_classes=...)',
            )
        rows, partner = self._partner_targets(state, 'building soft targets from the outputs')
        lam = last.lam[rows.cpu()] if isinstance(last.lam, torch.Tensor) else last.lam  # type: ignore[union-attr]
        soft = F.mix_targets(target, partner, lam, (0, 0, 0, 0), kind='index', num_classes=outputs.shape[1])
        state.batch_set_item(key=self.target_key, value=soft)

    def _interpolate_loss(self, state: State) -> None:
        last = self._run.last
        if last is not None and last.kind == 'dense':
            return  # the target map was pasted: the loss is already exact
        if not isinstance(state.loss, torch.Tensor):
            raise RuntimeError(f'CutMix(interpolate_loss=True) needs one tensor loss, got {type(state.loss).__name__}')
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


def _kind_or_none(input: object, target: object) -> Optional[str]:
    """The target kind, or ``None`` for a malformed batch (the mixer then raises the full error)."""
    try:
        return F.validate_target(target, F.validate_input(input))
    except (TypeError, ValueError):
        return None


def _is_fresh_copy(before: object, after: object) -> bool:
    """True when moving the batch to the device made ``after`` a new tensor: memory no one else holds."""
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and (after.device != before.device or after.data_ptr() != before.data_ptr()))
