"""The Composer ``Algorithm``: a thin adapter from training events to :mod:`dist_cutmix.mixer`."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from dist_cutmix.distributed import ProcessGroup, node_group
from dist_cutmix.functional import validate_alpha
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local

__all__ = ['CutMix']

log = logging.getLogger(__name__)

MODES = ('local', 'global', 'node')


class CutMix(Algorithm):
    """CutMix that owns its randomness and can mix across ranks; a drop-in for ``composer.algorithms.CutMix``.

    Each batch is mixed once, at ``Event.AFTER_DATALOADER`` (after the batch is moved to the
    device), so every microbatch, and the train metrics, see the same mixed batch and its mixed
    targets. Every draw for batch ``b`` comes from a generator seeded by ``(seed, b, ...)``:
    the same seed mixes the same way, ranks mix differently, and a resumed run mixes its later
    batches exactly as the uninterrupted run did, with no state in the checkpoint.

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
            a wrong number on soft targets. With ``False``, such a metric stops training with an
            error that names the fix.

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
    ) -> None:
        self.alpha = validate_alpha(alpha)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        if process_group is not None and mode != 'global':
            raise ValueError(f"process_group is only used with mode='global', got mode={mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f'seed must be an int or None, got seed={seed!r}')
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f'num_classes must be a positive int or None, got num_classes={num_classes!r}')
        self.interpolate_loss = interpolate_loss
        self.uniform_sampling = uniform_sampling
        self.input_key, self.target_key = input_key, target_key
        self.mode = mode
        self.seed = seed
        self.exclude_self = exclude_self
        self.num_classes = num_classes
        self.process_group = process_group
        self.wrap_train_metrics = wrap_train_metrics
        self._group: ProcessGroup = process_group
        self._group_ready = mode == 'local' or process_group is not None
        self._warned_single = False
        self._last: Optional[MixResult] = None
        self._microbatch_offset = 0

    # ------------------------------------------------------------------ events

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.BEFORE_LOAD, Event.FIT_START, Event.AFTER_DATALOADER):
            return True
        return self.interpolate_loss and event in (Event.BEFORE_TRAIN_BATCH, Event.BEFORE_BACKWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_LOAD:
            # Before a checkpoint's metric states are loaded, so they land in the soft-aware metrics.
            self._check_train_metrics(state, logger)
        elif event == Event.FIT_START:
            self._setup_group()
            self._check_train_metrics(state, logger)  # metrics may have changed since; a no-op otherwise
        elif event == Event.AFTER_DATALOADER:
            self._mix(state, logger)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._microbatch_offset = 0
        elif event == Event.BEFORE_BACKWARD:
            self._interpolate_loss(state)

    # ------------------------------------------------------------------ pieces

    def _setup_group(self) -> None:
        """Build the node's process group once; every rank must take part, so it runs at FIT_START."""
        if self._group_ready:
            return
        self._group_ready = True
        if self.mode == 'node':
            self._group = node_group(dist.get_local_world_size())

    def _check_train_metrics(self, state: State, logger: Logger) -> None:
        if self.interpolate_loss:  # targets stay index labels: stock metrics read them correctly
            return
        from dist_cutmix.metrics import prepare_train_metrics

        state.train_metrics = prepare_train_metrics(state.train_metrics, wrap=self.wrap_train_metrics)

    def _resolve_num_classes(self, state: State) -> Optional[int]:
        if self.num_classes is None:
            candidates = [getattr(m, 'num_classes', None) for m in (state.train_metrics or {}).values()]
            model = state.model
            candidates += [getattr(model, 'num_classes', None), getattr(getattr(model, 'module', None), 'num_classes', None)]
            self.num_classes = next((c for c in candidates if isinstance(c, int) and c > 0), None)
        return self.num_classes

    def _mix(self, state: State, logger: Logger) -> None:
        state.batch = state.device.batch_to_device(state.batch)
        input = state.batch_get_item(key=self.input_key)
        target = state.batch_get_item(key=self.target_key)
        mix_target = not self.interpolate_loss
        num_classes = self._resolve_num_classes(state) if mix_target and _is_index(target) else self.num_classes
        if mix_target and _is_index(target) and num_classes is None:
            raise ValueError(
                'CutMix needs num_classes to turn index targets into soft targets and found none on the '
                'train metrics or the model: pass CutMix(num_classes=...), got num_classes=None',
            )
        kwargs = dict(
            seed=self.seed if self.seed is not None else state.rank_zero_seed,
            batch=int(state.timestamp.batch),
            alpha=self.alpha, uniform_sampling=self.uniform_sampling, exclude_self=self.exclude_self,
            num_classes=num_classes, mix_target=mix_target,
            # A freshly collated batch is ours to change; a view may alias the user's dataset.
            inplace=isinstance(input, torch.Tensor) and input._base is None,
        )
        if self.interpolate_loss and isinstance(target, torch.Tensor) and target.ndim >= 3:
            raise ValueError(f'interpolate_loss cannot be used with dense targets of shape {tuple(target.shape)}')
        if self.mode == 'local':
            if isinstance(input, torch.Tensor) and input.ndim == 4 and input.shape[0] == 1 and not self._warned_single:
                self._warned_single = True
                warnings.warn(
                    "CutMix(mode='local') got a per-rank batch of 1 sample, which cannot be mixed locally; "
                    "mode='global' mixes across ranks and fixes it.", UserWarning, stacklevel=2,
                )
            result = mix_batch_local(input, target, rank=dist.get_global_rank(), **kwargs)
        else:
            result = mix_batch_across_group(input, target, group=self._group, **kwargs)
        state.batch_set_item(key=self.input_key, value=result.input)
        state.batch_set_item(key=self.target_key, value=result.target)
        self._last = result
        metrics = {'cutmix/lambda': result.lam}
        if self.mode != 'local':
            metrics['cutmix/cross_rank_fraction'] = result.cross_rank_fraction
        logger.log_metrics(metrics)

    def _interpolate_loss(self, state: State) -> None:
        if self._last is None or not isinstance(state.loss, torch.Tensor):
            raise RuntimeError('CutMix(interpolate_loss=True) needs one tensor loss and a batch mixed at AFTER_DATALOADER')
        input = state.batch_get_item(key=self.input_key)
        n = input.shape[0]
        partner = self._last.partner_target[self._microbatch_offset:self._microbatch_offset + n]
        self._microbatch_offset += n
        model = state.model
        loss_fn = getattr(model, 'loss', None) or getattr(model.module, 'loss')
        partner_loss = loss_fn(state.outputs, (input, partner))
        state.loss = self._last.lam * state.loss + (1.0 - self._last.lam) * partner_loss


def _is_index(target: object) -> bool:
    return isinstance(target, torch.Tensor) and target.ndim == 1
