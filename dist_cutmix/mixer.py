"""Mix one batch, locally or across a process group: check, draw, exchange, then pixels and targets.

Every door ends here: the Composer algorithms, :class:`~dist_cutmix.Mixer` and the timm, torchvision,
Lightning and Accelerate adapters call :func:`mix_batch_local` or :func:`mix_batch_across_group`, which
read top to bottom: :func:`~dist_cutmix.validation.check_batch`, :func:`~dist_cutmix.draw.sample_mix` from
the batch's generator (:mod:`dist_cutmix.randomness`), the crop exchange (:mod:`dist_cutmix.distributed`),
then :mod:`dist_cutmix.pixels` and :mod:`dist_cutmix.targets`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from dist_cutmix._tensors import as_4d, to_device
from dist_cutmix.distributed import (
    BatchMismatchError,
    ExchangePlan,
    ProcessGroup,
    agree_on_batch,
    exchange_ragged,
    exchange_rows,
    group_rank_and_size,
    group_stream_key,
)
from dist_cutmix.draw import Box, LamLike, MixParams, PerSampleMixParams, box_areas, on_label_grid, sample_mix
from dist_cutmix.pixels import apply_mix, gather_crops, paste_crops
from dist_cutmix.pixels_per_sample import gather_box_pixels, paste_box_pixels
from dist_cutmix.randomness import batch_generator
from dist_cutmix.spec import MixSpec
from dist_cutmix.targets import mix_targets, mix_targets_per_sample
from dist_cutmix.validation import check_batch

__all__ = ['MixResult', 'mix_batch_across_group', 'mix_batch_local']


@dataclass(frozen=True)
class MixResult:
    """One mixed batch.

    Attributes:
        input: mixed images.
        target: mixed targets (soft for index/soft targets, pasted for dense); the original
            targets when ``mix_target=False`` was asked for.
        partner_target: each sample's partner's target (crops for dense targets; with
            ``per_sample=True`` the pixels inside each box, 1-D, in arrival order).
        lam: share of each image that stayed its own (the exact pixel share); with
            ``per_sample=True`` a ``(N,)`` float64 tensor, one per sample of this rank.
        box: ``(y0, y1, x0, x1)``; with ``per_sample=True`` a ``(N, 4)`` tensor of this rank's boxes.
        partner_rank: group rank holding each sample's partner.
        partner_index: the partner's index in that rank's batch.
        cross_rank_fraction: share of the whole (group) batch whose partner is on another rank.
        bytes_sent: bytes this rank sent to other ranks.
        kind: the target kind (see :func:`dist_cutmix.validation.target_kind`).
        group_lam: with ``per_sample=True`` across a group, every sample's λ of the group's batch.
    """

    input: Tensor
    target: Tensor
    partner_target: Tensor
    lam: LamLike
    box: Union[Box, Tensor]
    partner_rank: Tensor
    partner_index: Tensor
    cross_rank_fraction: float = 0.0
    bytes_sent: int = 0
    kind: str = 'index'
    group_lam: Optional[Tensor] = None

    @property
    def label_lam(self) -> LamLike:
        """The weight of each sample's own label and loss: ``lam`` on the ``2**-10`` label grid."""
        return on_label_grid(self.lam)

    @property
    def mean_label_lam(self) -> float:
        """The label weight averaged over the whole mixing pool (what ``cutmix/lambda`` logs): the one
        weight in batch mode; with ``per_sample=True`` the mean over the group's global batch (every
        rank drew every sample's λ, so every rank logs the same number) or the local batch."""
        if self.group_lam is not None:
            return float(on_label_grid(self.group_lam).mean()) if self.group_lam.numel() else 1.0
        lam = self.label_lam
        return float(lam.mean()) if isinstance(lam, Tensor) else lam

    @property
    def pool_lam(self) -> Optional[Tensor]:
        """The former name of :attr:`group_lam`."""
        return self.group_lam


def resolve_spec(spec: Optional[MixSpec], alpha: float, uniform_sampling: bool) -> MixSpec:
    """The mix to draw: ``spec``, or Composer's CutMix from ``alpha`` and ``uniform_sampling``.

    Raises:
        ValueError: naming both, when ``spec`` is given with an ``alpha`` or ``uniform_sampling`` that
            disagrees with it (one of them would be silently ignored).
    """
    if spec is None:
        return MixSpec.cutmix(alpha, uniform_sampling)
    if not isinstance(spec, MixSpec):
        raise TypeError(f'spec must be a dist_cutmix.MixSpec or None, got {type(spec).__name__}')
    conflicts = [f'{name}={value!r}' for name, value, default, own in (
        ('alpha', alpha, 1.0, spec.cutmix_alpha), ('uniform_sampling', uniform_sampling, False, spec.uniform_sampling),
    ) if value != default and value != own]
    if conflicts:
        raise ValueError(f'pass the mix as spec= or as alpha/uniform_sampling, not both: got spec={spec!r} and '
                         + ', '.join(conflicts))
    return spec


def mix_batch_local(
    input: Tensor,
    target: Tensor,
    *,
    seed: int,
    batch: int,
    rank: int = 0,
    alpha: float = 1.0,
    uniform_sampling: bool = False,
    exclude_self: bool = True,
    num_classes: Optional[int] = None,
    mix_target: bool = True,
    inplace: bool = False,
    per_sample: bool = False,
    spec: Optional[MixSpec] = None,
) -> MixResult:
    """Mix this rank's batch with itself, drawing from ``(seed, batch, 'local', rank)``.

    ``spec`` says what to draw (MixUp, a switch between MixUp and CutMix, label smoothing); by default
    Composer's CutMix from ``alpha`` and ``uniform_sampling`` (giving both ways raises). With
    ``per_sample=True`` every sample gets its own draw.

    Raises:
        TypeError, ValueError: on malformed input or targets, naming the argument and value.
    """
    spec = resolve_spec(spec, alpha, uniform_sampling)
    kind = check_batch(input, target, num_classes=num_classes, mix_target=mix_target, spec=spec)
    n, _, h, w = input.shape
    params = sample_mix(spec, n, h, w, per_sample=per_sample, exclude_self=exclude_self,
                        generator=batch_generator(seed, batch, 'local', rank))
    if n < 2:  # nothing to mix with: the batch stays as it is
        params = _unmixed(params)
    mixed = apply_mix(input, params, inplace=inplace)
    partner_target = target[to_device(params.indices, target.device)]
    return MixResult(
        input=mixed, target=_mix_targets(target, partner_target, params, kind, num_classes, spec, mix_target),
        partner_target=partner_target, lam=params.lam,
        box=params.boxes if isinstance(params, PerSampleMixParams) else params.box,
        partner_rank=torch.full((n,), rank, device='cpu'), partner_index=params.indices, kind=kind,
    )


def mix_batch_across_group(
    input: Tensor,
    target: Tensor,
    *,
    seed: int,
    batch: int,
    group: ProcessGroup = None,
    alpha: float = 1.0,
    uniform_sampling: bool = False,
    exclude_self: bool = True,
    num_classes: Optional[int] = None,
    mix_target: bool = True,
    inplace: bool = False,
    per_sample: bool = False,
    spec: Optional[MixSpec] = None,
    caller: str = 'mix_batch_across_group',
    problem: Optional[Exception] = None,
) -> MixResult:
    """Mix over the group's global batch (the ranks' batches end to end, in group-rank order).

    Partners, regions and weights come from ``(seed, batch, group name)``: identical on every rank with
    no broadcast. Only the partners' regions (and targets) cross ranks, each once, in one
    ``all_to_all_single``: a CutMix partner's box, a MixUp partner's whole image, an unmixed sample's
    nothing. With a group of one (or no process group) no collective runs and the result is the same as
    in one process on the concatenated batch. With ``per_sample=True`` every sample of the global batch
    gets its own draw; each crop is cut with its destination's box, and crops of all sizes travel in
    the same one collective. ``spec`` as for :func:`mix_batch_local`; ``caller`` is named in errors.
    ``problem``: a door's own finding that this rank's batch cannot be mixed (an input its framework
    refuses); it is raised as the engine's own input errors are, on every rank at once, and ``input``
    and ``target`` are then not read.

    Raises:
        BatchMismatchError: on every rank, if any rank's input is malformed or ranks disagree on the
            batch index, shapes, dtypes, target kind or ``num_classes``.
    """
    rank, world = group_rank_and_size(group)
    if rank < 0:
        raise ValueError(f'{caller}: this process is not a member of process_group {group!r}: it cannot mix over it')
    spec = resolve_spec(spec, alpha, uniform_sampling)
    kind, sizes = _check_and_agree(input, target, num_classes, mix_target, spec, batch, group, world, caller, problem)
    _, _, h, w = input.shape
    params = sample_mix(spec, sum(sizes), h, w, per_sample=per_sample, exclude_self=exclude_self,
                        generator=batch_generator(seed, batch, *group_stream_key(group)))
    plan = ExchangePlan.build(params.indices, sizes, rank)
    if isinstance(params, PerSampleMixParams):
        return _mix_group_per_sample(input, target, kind, params, plan, rank, group, num_classes, mix_target, inplace,
                                     spec)
    return _mix_group_batch(input, target, kind, params, plan, rank, group, num_classes, mix_target, inplace, spec)


# ----------------------------------------------------------------------------- steps


def _check_and_agree(input: Tensor, target: Tensor, num_classes: Optional[int], mix_target: bool, spec: MixSpec,
                     batch: int, group: ProcessGroup, world: int, caller: str,
                     problem: Optional[Exception]) -> tuple[str, list[int]]:
    """This rank's target kind and every rank's batch size; any rank's bad input (or a door's ``problem``)
    raises on every rank."""
    kind = 'invalid'
    if problem is None:
        try:
            kind = check_batch(input, target, num_classes=num_classes, mix_target=mix_target, spec=spec)
        except (TypeError, ValueError) as e:
            problem = e
    if world == 1:
        if problem is not None:
            raise problem
        return kind, [input.shape[0]]
    signature = 'invalid' if problem else _signature(input, target, kind, num_classes, batch)
    try:
        sizes = agree_on_batch(signature, 0 if problem else input.shape[0],
                               None if problem is None else f'{type(problem).__name__}: {problem}', group, caller)
    except BatchMismatchError as mismatch:
        raise mismatch from problem
    return kind, sizes


def _signature(input: Tensor, target: Tensor, kind: str, num_classes: Optional[int], batch: int) -> str:
    """What must agree across ranks, as text every rank can read in an error."""
    return (
        f'batch {batch}: input (N, {", ".join(map(str, input.shape[1:]))}) {input.dtype}; '
        f'{kind} target (N, {", ".join(map(str, target.shape[1:]))}) {target.dtype}; '
        f'num_classes={num_classes}'
    )


def _unmixed(params: Union[MixParams, PerSampleMixParams]) -> Union[MixParams, PerSampleMixParams]:
    """The same partners with nothing taken from them."""
    if isinstance(params, PerSampleMixParams):
        return PerSampleMixParams(boxes=torch.zeros_like(params.boxes), lam=torch.ones_like(params.lam),
                                  indices=params.indices)
    return MixParams(box=(0, 0, 0, 0), lam=1.0, indices=params.indices)


def _mix_targets(target: Tensor, partner: Tensor, params: Union[MixParams, PerSampleMixParams], kind: str,
                 num_classes: Optional[int], spec: MixSpec, mix_target: bool) -> Tensor:
    """Mixed (and smoothed) targets for ``params``, or ``target`` itself when they are not to be mixed."""
    if not mix_target:
        return target
    if isinstance(params, PerSampleMixParams):
        return mix_targets_per_sample(target, partner, params.lam, params.boxes, kind=kind, num_classes=num_classes,
                                      validate=False, smoothing=spec.label_smoothing, weights=params.weights,
                                      multi_label=spec.multi_label)
    return mix_targets(target, partner, params.lam, params.box, kind=kind, num_classes=num_classes, validate=False,
                       smoothing=spec.label_smoothing, weight=params.weight, multi_label=spec.multi_label)


def _mix_group_batch(input: Tensor, target: Tensor, kind: str, params: MixParams, plan: ExchangePlan, rank: int,
                     group: ProcessGroup, num_classes: Optional[int], mix_target: bool, inplace: bool,
                     spec: MixSpec) -> MixResult:
    """One region for the whole global batch: each partner's crop (and target) crosses ranks once."""
    box = params.box
    send = [gather_crops(target, plan.send_order, box) if kind == 'dense'
            else target[to_device(plan.send_order, target.device)]]
    move_crops = params.lam < 1.0 and params.weight > 0 and len(params.indices) > 0
    if move_crops:
        send.append(gather_crops(input, plan.send_order, box))
    bytes_sent = plan.cross_rank_rows_sent(rank) * sum(t[0:1].numel() * t.element_size() for t in send)
    received = exchange_rows(send, plan, group)
    partner_target = received[0]
    mixed = paste_crops(input, received[1], box, inplace=inplace, weight=params.weight) if move_crops \
        else input if inplace else input.clone()
    mine = MixParams(box=box, lam=params.lam, indices=plan.partner_index, weight=params.weight)
    return MixResult(
        input=mixed, target=_mix_targets(target, partner_target, mine, kind, num_classes, spec, mix_target),
        partner_target=partner_target, lam=params.lam, box=box, partner_rank=plan.partner_rank,
        partner_index=plan.partner_index, cross_rank_fraction=plan.cross_rank_fraction, bytes_sent=bytes_sent,
        kind=kind,
    )


def _mix_group_per_sample(input: Tensor, target: Tensor, kind: str, params: PerSampleMixParams, plan: ExchangePlan,
                          rank: int, group: ProcessGroup, num_classes: Optional[int], mix_target: bool, inplace: bool,
                          spec: MixSpec) -> MixResult:
    """A draw per sample of the global batch: each crop is cut with its destination's box and crosses ranks once."""
    mine = slice(plan.offset, plan.offset + input.shape[0])
    boxes, lam = params.boxes[mine], params.lam[mine]
    weights = None if params.pastes_only or params.weights is None else params.weights[mine]
    arrival_weights = None if weights is None else weights[plan.recv_order]
    send_boxes, arrival_boxes = params.boxes[plan.send_dest], boxes[plan.recv_order]
    dense = kind == 'dense'
    pixels = gather_box_pixels(input, plan.send_order, send_boxes)
    labels = gather_box_pixels(target, plan.send_order, send_boxes) if dense \
        else target.index_select(0, to_device(plan.send_order, target.device)).reshape(-1)
    # elements per row: a crop's box area times the channels; a label row's width, or its map's crop
    label_channels = as_4d(target).shape[1] if dense else 0
    label_width = math.prod(target.shape[1:])

    def row_numel(row_boxes: Tensor) -> list[Tensor]:
        areas = box_areas(row_boxes)
        return [areas * input.shape[1], areas * label_channels if dense else torch.full_like(areas, label_width)]

    send_numel = [plan.sent_per_rank(r) for r in row_numel(send_boxes)]
    recv_numel = [plan.received_per_rank(r) for r in row_numel(arrival_boxes)]
    got_pixels, got_labels = exchange_ragged([pixels, labels], send_numel, recv_numel, group)
    bytes_sent = sum(send_numel[0][d] * input.element_size() + send_numel[1][d] * target.element_size()
                     for d in range(len(plan.send_counts)) if d != rank)

    mixed = input if inplace else input.clone()
    paste_box_pixels(mixed, plan.recv_order, got_pixels, arrival_boxes, arrival_weights)
    if dense:
        partner_target = got_labels
        mixed_target = paste_box_pixels(target.clone(), plan.recv_order, got_labels, arrival_boxes,
                                        arrival_weights) if mix_target else target
    else:
        arrived = got_labels.reshape(len(plan.recv_order), *target.shape[1:])
        partner_target = arrived.index_select(0, to_device(plan.recv_index, arrived.device))
        my_params = PerSampleMixParams(boxes=boxes, lam=lam, indices=plan.partner_index, weights=weights)
        mixed_target = _mix_targets(target, partner_target, my_params, kind, num_classes, spec, mix_target)
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=lam, box=boxes,
        partner_rank=plan.partner_rank, partner_index=plan.partner_index,
        cross_rank_fraction=plan.cross_rank_fraction, bytes_sent=bytes_sent, kind=kind, group_lam=params.lam,
    )
