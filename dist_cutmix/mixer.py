"""Mix one batch, locally or across a process group: ``_random`` -> ``functional`` -> ``distributed``.

This is the logic behind the ``CutMix`` algorithm, callable without Composer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dist_cutmix import functional as F
from dist_cutmix._random import batch_generator
from dist_cutmix.distributed import (
    ExchangePlan,
    BatchMismatchError,
    ProcessGroup,
    agree_on_batch,
    exchange_rows,
    group_rank_and_size,
    group_stream_key,
)

__all__ = ['MixResult', 'mix_batch_across_group', 'mix_batch_local']


@dataclass(frozen=True)
class MixResult:
    """One mixed batch.

    Attributes:
        input: mixed images.
        target: mixed targets (soft for index/soft targets, pasted for dense); the original
            targets when ``mix_target=False`` was asked for.
        partner_target: each sample's partner's target (crops for dense targets).
        lam: share of each image that stayed its own (the exact pixel share).
        box: ``(y0, y1, x0, x1)``.
        partner_rank: group rank holding each sample's partner.
        partner_index: the partner's index in that rank's batch.
        cross_rank_fraction: share of the whole (group) batch whose partner is on another rank.
        bytes_sent: bytes this rank sent to other ranks.
        kind: the target kind (see :func:`dist_cutmix.functional.target_kind`).
    """

    input: Tensor
    target: Tensor
    partner_target: Tensor
    lam: float
    box: F.Box
    partner_rank: Tensor
    partner_index: Tensor
    cross_rank_fraction: float = 0.0
    bytes_sent: int = 0
    kind: str = 'index'

    @property
    def label_lam(self) -> float:
        """The weight of each sample's own label and loss: ``lam`` rounded to a multiple of ``2**-10``."""
        return F.label_lambda(self.lam)


def _kind_and_problem(
    input: object, target: object, num_classes: Optional[int], mix_target: bool,
) -> tuple[Optional[str], Optional[Exception]]:
    """This rank's target kind and its input error, if any (raised later, on every rank together)."""
    try:
        F.validate_input(input)
        kind = F.validate_target(target, input)  # type: ignore[arg-type]
        if kind == 'index' and mix_target:
            if num_classes is None:
                raise ValueError('num_classes is required to mix index targets, got num_classes=None')
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):  # type: ignore[union-attr]
                raise ValueError(
                    f'index targets must lie in [0, num_classes={num_classes}), got values in '
                    f'[{int(target.min())}, {int(target.max())}]',  # type: ignore[union-attr]
                )
        return kind, None
    except (TypeError, ValueError) as e:
        return None, e


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
) -> MixResult:
    """Mix this rank's batch with itself, drawing from ``(seed, batch, 'local', rank)``.

    Raises:
        TypeError, ValueError: on malformed input or targets, naming the argument and value.
    """
    kind, problem = _kind_and_problem(input, target, num_classes, mix_target)
    if problem is not None:
        raise problem
    n, _, h, w = input.shape
    params = F.sample_params(
        n, h, w, alpha=alpha, uniform_sampling=uniform_sampling, exclude_self=exclude_self,
        generator=batch_generator(seed, batch, 'local', rank),
    )
    if n < 2:  # nothing to mix with: leave the batch as it is
        params = F.CutMixParams(box=(0, 0, 0, 0), lam=1.0, indices=params.indices)
    mixed = F.apply_cutmix(input, params, inplace=inplace)
    partner_target = target[params.indices.to(target.device)]
    mixed_target = F.mix_targets(target, partner_target, params.lam, params.box, kind=kind, num_classes=num_classes) \
        if mix_target else target
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=params.lam, box=params.box,
        partner_rank=torch.full((n,), rank), partner_index=params.indices, kind=kind,
    )


def _signature(input: Tensor, target: Tensor, kind: str, num_classes: Optional[int]) -> str:
    return (
        f'input (N, {", ".join(map(str, input.shape[1:]))}) {input.dtype}; '
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
) -> MixResult:
    """Mix over the group's global batch (the ranks' batches end to end, in group-rank order).

    Box, λ and permutation come from ``(seed, batch, group name)``: identical on every rank with
    no broadcast. Only the box crops (and the partners' targets) cross ranks, each once. With a
    group of one (or no process group) no collective runs and the result is the same as in one
    process on the concatenated batch.

    Raises:
        BatchMismatchError: on every rank, if any rank's input is malformed or ranks disagree
            on shapes, dtypes, target kind or ``num_classes``.
    """
    rank, world = group_rank_and_size(group)
    if rank < 0:
        raise ValueError(f'this process is not a member of process_group {group!r}: it cannot mix over it')
    kind, problem = _kind_and_problem(input, target, num_classes, mix_target)
    if world == 1:
        if problem is not None:
            raise problem
        sizes = [input.shape[0]]
    else:
        signature = 'invalid' if problem else _signature(input, target, kind, num_classes)
        size = input.shape[0] if problem is None else 0
        try:
            sizes = agree_on_batch(signature, size, None if problem is None else f'{type(problem).__name__}: {problem}',
                                   group)
        except BatchMismatchError as mismatch:
            raise mismatch from problem
    n, _, h, w = input.shape
    params = F.sample_params(
        sum(sizes), h, w, alpha=alpha, uniform_sampling=uniform_sampling, exclude_self=exclude_self,
        generator=batch_generator(seed, batch, *group_stream_key(group)),
    )
    plan = ExchangePlan.build(params.indices, sizes, rank)
    bounds = torch.tensor(sizes).cumsum(0)
    partner_rank = torch.searchsorted(bounds, plan.partners, right=True)
    partner_index = plan.partners - (bounds - torch.tensor(sizes))[partner_rank]
    owners = torch.searchsorted(bounds, params.indices, right=True)
    self_owner = torch.searchsorted(bounds, torch.arange(sum(sizes)), right=True)
    cross = float((owners != self_owner).float().mean()) if sum(sizes) else 0.0

    box = params.box
    send_target = F.gather_crops(target, plan.send_order, box) if kind == 'dense' \
        else target[plan.send_order.to(target.device)]
    send = [send_target]
    move_crops = params.lam < 1.0 and sum(sizes) > 0
    if move_crops:
        send.append(F.gather_crops(input, plan.send_order, box))
    row_bytes = sum(t[0:1].numel() * t.element_size() for t in send)
    bytes_sent = plan.cross_rank_rows_sent(rank) * row_bytes
    received = exchange_rows(send, plan, group)
    partner_target = received[0]
    if move_crops:
        mixed = F.paste_crops(input, received[1], box, inplace=inplace)
    else:
        mixed = input if inplace else input.clone()

    mixed_target = F.mix_targets(target, partner_target, params.lam, box, kind=kind, num_classes=num_classes) \
        if mix_target else target
    return MixResult(
        input=mixed, target=mixed_target, partner_target=partner_target, lam=params.lam, box=box,
        partner_rank=partner_rank, partner_index=partner_index,
        cross_rank_fraction=cross, bytes_sent=bytes_sent, kind=kind,
    )
