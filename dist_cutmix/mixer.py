"""Mix one batch, locally or across a process group: ``randomness`` -> ``functional`` -> ``distributed``.

This is the logic behind the ``CutMix`` algorithm, callable without Composer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from dist_cutmix import functional as F
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
from dist_cutmix.randomness import batch_generator
from dist_cutmix.spec import MixSpec, sample_mix

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
        kind: the target kind (see :func:`dist_cutmix.functional.target_kind`).
        pool_lam: with ``per_sample=True`` across a group, every sample's λ of the group's batch.
    """

    input: Tensor
    target: Tensor
    partner_target: Tensor
    lam: F.LamLike
    box: Union[F.Box, Tensor]
    partner_rank: Tensor
    partner_index: Tensor
    cross_rank_fraction: float = 0.0
    bytes_sent: int = 0
    kind: str = 'index'
    pool_lam: Optional[Tensor] = None

    @property
    def label_lam(self) -> F.LamLike:
        """The weight of each sample's own label and loss: ``lam`` rounded to a multiple of ``2**-10``."""
        return F.label_lambda(self.lam)

    @property
    def mean_label_lam(self) -> float:
        """The label weight averaged over the whole mixing pool (what ``cutmix/lambda`` logs): the one
        weight in batch mode; with ``per_sample=True`` the mean over the group's global batch (every
        rank drew every sample's λ, so every rank logs the same number) or the local batch."""
        if self.pool_lam is not None:
            return float(F.label_lambda(self.pool_lam).mean()) if self.pool_lam.numel() else 1.0
        lam = self.label_lam
        return float(lam.mean()) if isinstance(lam, Tensor) else lam


def _kind_and_problem(
    input: object, target: object, num_classes: Optional[int], mix_target: bool, spec: MixSpec,
) -> tuple[Optional[str], Optional[Exception]]:
    """This rank's target kind and its input error, if any (raised later, on every rank together)."""
    try:
        F.validate_input(input)
        kind = F.validate_target(target, input)  # type: ignore[arg-type]
        if kind == 'index' and mix_target and num_classes is None:
            raise ValueError('num_classes is required to mix index targets, got num_classes=None')
        if kind == 'index' and num_classes is not None:  # unmixed labels too (Mixer(targets='labels') returns them)
            F.check_labels(target, num_classes)  # type: ignore[arg-type]
        if kind == 'binary' and mix_target:
            F.validate_binary(target)  # type: ignore[arg-type]
        if spec.label_smoothing and kind in ('binary', 'dense') and mix_target:
            raise ValueError(
                f'label_smoothing spreads ε over a class axis: it takes index (N,) or soft (N, C) targets, got '
                f'{kind} targets of shape {tuple(target.shape)} with label_smoothing={spec.label_smoothing}'  # type: ignore[union-attr]
                + _BINARY_HINT.get(kind, ''),
            )
        if kind == 'dense' and spec.mixup_alpha > 0 and spec.prob > 0 and not target.is_floating_point():  # type: ignore[union-attr]
            F.mix_targets(target, target, 0.5, (0, 0, 0, 0), kind='dense', weight=0.5)  # type: ignore[arg-type]
        return kind, None
    except (TypeError, ValueError) as e:
        return None, e


_BINARY_HINT = {'binary': ' (floating (N,) targets are read as binary probabilities; class indices must be an integer '
                           'tensor: pass target.long())'}


def _spec(spec: Optional[MixSpec], alpha: float, uniform_sampling: bool) -> MixSpec:
    """The mix to draw: ``spec``, or Composer's CutMix from ``alpha`` and ``uniform_sampling``."""
    if spec is None:
        return MixSpec.cutmix(alpha, uniform_sampling)
    if not isinstance(spec, MixSpec):
        raise TypeError(f'spec must be a dist_cutmix.MixSpec or None, got {type(spec).__name__}')
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

    With ``per_sample=True`` every sample gets its own λ and box
    (:func:`~dist_cutmix.functional.sample_params_per_sample`). ``spec`` says what to draw (MixUp, a
    switch between MixUp and CutMix, label smoothing); by default Composer's CutMix from ``alpha``
    and ``uniform_sampling``.

    Raises:
        TypeError, ValueError: on malformed input or targets, naming the argument and value.
    """
    spec = _spec(spec, alpha, uniform_sampling)
    kind, problem = _kind_and_problem(input, target, num_classes, mix_target, spec)
    if problem is not None:
        raise problem
    n, _, h, w = input.shape
    params = sample_mix(spec, n, h, w, per_sample=per_sample, exclude_self=exclude_self,
                        generator=batch_generator(seed, batch, 'local', rank))
    if n < 2:  # nothing to mix with: leave the batch as it is
        params = F.PerSampleParams(boxes=torch.zeros_like(params.boxes), lam=torch.ones_like(params.lam),
                                   indices=params.indices) if per_sample \
            else F.CutMixParams(box=(0, 0, 0, 0), lam=1.0, indices=params.indices)
    box = params.boxes if per_sample else params.box
    mixed = F.apply_mix(input, params, inplace=inplace)
    partner_target = target[F._to_device(params.indices, target.device)]
    mixed_target = _mix_targets(target, partner_target, params, kind, num_classes, spec) if mix_target else target
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=params.lam, box=box,
        partner_rank=torch.full((n,), rank, device='cpu'), partner_index=params.indices, kind=kind,
    )


def _mix_targets(target: Tensor, partner: Tensor, params: F.CutMixParams | F.PerSampleParams, kind: str,
                 num_classes: Optional[int], spec: MixSpec, boxes: Optional[Tensor] = None) -> Tensor:
    """Mixed (and smoothed) targets for ``params``: one λ for the batch or one per sample."""
    if isinstance(params, F.PerSampleParams):
        return F.mix_targets_per_sample(target, partner, params.lam, params.boxes if boxes is None else boxes,
                                        kind=kind, num_classes=num_classes, validate=False,
                                        smoothing=spec.label_smoothing, weights=params.weights)
    return F.mix_targets(target, partner, params.lam, params.box, kind=kind, num_classes=num_classes, validate=False,
                         smoothing=spec.label_smoothing, weight=params.weight)


def _signature(input: Tensor, target: Tensor, kind: str, num_classes: Optional[int], batch: int) -> str:
    return (
        f'batch {batch}: input (N, {", ".join(map(str, input.shape[1:]))}) {input.dtype}; '
        f'{kind} target (N, {", ".join(map(str, target.shape[1:]))}) {target.dtype}; '
        f'num_classes={num_classes}'
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
) -> MixResult:
    """Mix over the group's global batch (the ranks' batches end to end, in group-rank order).

    Box, λ and permutation come from ``(seed, batch, group name)``: identical on every rank with
    no broadcast. Only the box crops (and the partners' targets) cross ranks, each once. With a
    group of one (or no process group) no collective runs and the result is the same as in one
    process on the concatenated batch. With ``per_sample=True`` every sample of the global batch
    gets its own λ and box, drawn identically on every rank; each crop is cut with its
    destination's box, and crops of all sizes travel in the same one ``all_to_all_single``. ``spec``
    as for :func:`mix_batch_local`: a MixUp partner's whole image crosses ranks, a CutMix partner's
    box only, an unmixed sample's nothing.

    Raises:
        BatchMismatchError: on every rank, if any rank's input is malformed or ranks disagree
            on shapes, dtypes, target kind or ``num_classes``.
    """
    rank, world = group_rank_and_size(group)
    if rank < 0:
        raise ValueError(f'this process is not a member of process_group {group!r}: it cannot mix over it')
    spec = _spec(spec, alpha, uniform_sampling)
    kind, problem = _kind_and_problem(input, target, num_classes, mix_target, spec)
    if world == 1:
        if problem is not None:
            raise problem
        sizes = [input.shape[0]]
    else:
        signature = 'invalid' if problem else _signature(input, target, kind, num_classes, batch)
        size = input.shape[0] if problem is None else 0
        try:
            sizes = agree_on_batch(signature, size, None if problem is None else f'{type(problem).__name__}: {problem}',
                                   group)
        except BatchMismatchError as mismatch:
            raise mismatch from problem
    n, _, h, w = input.shape
    generator = batch_generator(seed, batch, *group_stream_key(group))
    params = sample_mix(spec, sum(sizes), h, w, per_sample=per_sample, exclude_self=exclude_self, generator=generator)
    plan = ExchangePlan.build(params.indices, sizes, rank)
    bounds = torch.tensor(sizes, device='cpu').cumsum(0)
    partner_rank = torch.searchsorted(bounds, plan.partners, right=True)
    partner_index = plan.partners - (bounds - torch.tensor(sizes, device='cpu'))[partner_rank]
    owners = torch.searchsorted(bounds, params.indices, right=True)
    self_owner = torch.searchsorted(bounds, torch.arange(sum(sizes), device='cpu'), right=True)
    cross = float((owners != self_owner).float().mean()) if sum(sizes) else 0.0
    if isinstance(params, F.PerSampleParams):
        return _mix_group_per_sample(input, target, kind, params, plan, rank, group, num_classes=num_classes,
                                     mix_target=mix_target, inplace=inplace, partner_rank=partner_rank,
                                     partner_index=partner_index, cross=cross, spec=spec)

    box = params.box
    send_target = F.gather_crops(target, plan.send_order, box) if kind == 'dense' \
        else target[F._to_device(plan.send_order, target.device)]
    send = [send_target]
    move_crops = params.lam < 1.0 and params.weight > 0 and sum(sizes) > 0
    if move_crops:
        send.append(F.gather_crops(input, plan.send_order, box))
    row_bytes = sum(t[0:1].numel() * t.element_size() for t in send)
    bytes_sent = plan.cross_rank_rows_sent(rank) * row_bytes
    received = exchange_rows(send, plan, group)
    partner_target = received[0]
    if move_crops:
        mixed = F.paste_crops(input, received[1], box, inplace=inplace, weight=params.weight)
    else:
        mixed = input if inplace else input.clone()

    mixed_target = _mix_targets(target, partner_target, params, kind, num_classes, spec) if mix_target else target
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=params.lam, box=box,
        partner_rank=partner_rank, partner_index=partner_index,
        cross_rank_fraction=cross, bytes_sent=bytes_sent, kind=kind,
    )


def _mix_group_per_sample(input: Tensor, target: Tensor, kind: str, params: F.PerSampleParams, plan: ExchangePlan,
                          rank: int, group: ProcessGroup, *, num_classes: Optional[int], mix_target: bool,
                          inplace: bool, partner_rank: Tensor, partner_index: Tensor, cross: float,
                          spec: MixSpec) -> MixResult:
    """Global per-sample mixing: each crop is cut with its destination's box and crosses ranks once."""
    n = input.shape[0]
    world = len(plan.send_counts)
    mine = slice(plan.offset, plan.offset + n)
    boxes, lam = params.boxes[mine], params.lam[mine]
    weights = None if params.pastes_only or params.weights is None else params.weights[mine]
    arrival_weights = None if weights is None else weights[plan.recv_order]
    send_boxes = params.boxes[plan.send_dest]
    dense = kind == 'dense'
    t4 = F._as_4d(target) if dense else target
    pixels = F.gather_box_pixels(input, plan.send_order, send_boxes)
    labels = F.gather_box_pixels(target, plan.send_order, send_boxes) if dense \
        else target.index_select(0, F._to_device(plan.send_order, target.device)).reshape(-1)

    def numel_by_rank(rows_boxes: Tensor, ranks: Tensor, per_pixel: int) -> list[int]:
        """Elements each rank's rows take: every row's box area times the elements per pixel."""
        weights = (F.box_areas(rows_boxes) * per_pixel).double()
        return torch.bincount(ranks, weights=weights, minlength=world).long().tolist()

    # sent rows are grouped by destination rank; received rows arrive grouped by source rank
    dest_rank = torch.repeat_interleave(torch.arange(world, device='cpu'), torch.tensor(plan.send_counts, device='cpu'))
    src_rank = partner_rank[plan.recv_order]
    arrival_boxes = boxes[plan.recv_order]
    label_width = math.prod(target.shape[1:])
    send_numel = [numel_by_rank(send_boxes, dest_rank, input.shape[1]),
                  numel_by_rank(send_boxes, dest_rank, t4.shape[1]) if dense
                  else [c * label_width for c in plan.send_counts]]
    recv_numel = [numel_by_rank(arrival_boxes, src_rank, input.shape[1]),
                  numel_by_rank(arrival_boxes, src_rank, t4.shape[1]) if dense
                  else [c * label_width for c in plan.recv_counts]]
    got_pixels, got_labels = exchange_ragged([pixels, labels], send_numel, recv_numel, group)
    bytes_sent = sum(send_numel[0][d] * input.element_size() + send_numel[1][d] * target.element_size()
                     for d in range(world) if d != rank)

    mixed = input if inplace else input.clone()
    F.paste_box_pixels(mixed, plan.recv_order, got_pixels, arrival_boxes, arrival_weights)
    if dense:
        partner_target = got_labels
        mixed_target = F.paste_box_pixels(target.clone(), plan.recv_order, got_labels, arrival_boxes,
                                          arrival_weights) if mix_target else target
    else:
        arrived = got_labels.reshape(len(plan.recv_order), *target.shape[1:])
        partner_target = arrived.index_select(0, F._to_device(plan.recv_index, arrived.device))
        mine_params = F.PerSampleParams(boxes=boxes, lam=lam, indices=partner_index, weights=weights)
        mixed_target = _mix_targets(target, partner_target, mine_params, kind, num_classes, spec) \
            if mix_target else target
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=lam, box=boxes,
        partner_rank=partner_rank, partner_index=partner_index, cross_rank_fraction=cross, bytes_sent=bytes_sent,
        kind=kind, pool_lam=params.lam,
    )
