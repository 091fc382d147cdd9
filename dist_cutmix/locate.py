"""Find which rows of the mixed batch a microbatch holds, so per-sample data (partner labels) stays with its sample.

CutMix mixes the whole batch once, at ``Event.AFTER_DATALOADER``; what it knows per sample (the
partner's label) is needed again per microbatch, at ``BEFORE_LOSS``/``BEFORE_BACKWARD``. Composer's
microbatches are views of the batch (``torch.split``), so their rows are read off the view's
storage offset, for free. An algorithm that prunes or reorders the batch after CutMix
(``SelectiveBackprop``, which Composer's passes always run after every other ``AFTER_DATALOADER``
algorithm) hands on copies: those rows are found by their content, each checked to be bit for bit
a row of the mixed batch. A row that is in neither is an error, never a guess.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ['RowLookupError', 'locate_rows']

# Rows fingerprinted at a time on the content path: bounds the int64 copy it makes.
_CHUNK_BYTES = 1 << 26


class RowLookupError(LookupError):
    """A microbatch row is not (or not unambiguously) a row of the mixed batch."""


def locate_rows(part: Tensor, whole: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """The index in ``whole`` of each row of ``part``.

    Args:
        part: rows taken from ``whole`` (a view of it, or copies of some of its rows).
        whole: the batch the rows come from.
        labels: what the caller will read per row (for example partner labels); rows of
            ``whole`` that are bit for bit equal are then told apart only if their labels agree.

    Returns:
        A ``(len(part),)`` int64 tensor of row indices into ``whole``, on ``whole``'s device.

    Raises:
        RowLookupError: if a row of ``part`` is no row of ``whole``, or equals several rows whose
            ``labels`` differ.
    """
    rows = _rows_by_view(part, whole)
    return rows if rows is not None else _rows_by_content(part, whole, labels)


def _rows_by_view(part: Tensor, whole: Tensor) -> Optional[Tensor]:
    """Rows of ``part`` when it is a row-slice view of ``whole``'s memory; ``None`` otherwise."""
    n, total = part.shape[0], whole.shape[0]
    if (part.device != whole.device or part.dtype != whole.dtype or part.shape[1:] != whole.shape[1:]
            or part.stride()[1:] != whole.stride()[1:] or total == 0 or whole.stride(0) == 0):
        return None
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=whole.device)
    if part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr():
        return None
    row = whole.stride(0)
    delta = part.storage_offset() - whole.storage_offset()
    step = part.stride(0) // row if n > 1 else 1
    if delta % row or (n > 1 and (part.stride(0) % row or step < 1)):
        return None
    start = delta // row
    if start < 0 or start + step * (n - 1) >= total:
        return None
    return torch.arange(start, start + step * n, step, device=whole.device)


def _fingerprints(x: Tensor) -> Tensor:
    """An exact, order-independent integer sum of each row's bytes (any device, any layout)."""
    flat = x.contiguous().reshape(x.shape[0], -1)
    size = flat.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    ints = flat.view(as_int)
    rows_per_chunk = max(1, _CHUNK_BYTES // max(8 * ints.shape[1], 1))
    # Integer addition is exact and associative: the same row gives the same sum in any batch.
    return torch.cat([c.sum(dim=1, dtype=torch.int64) for c in ints.split(rows_per_chunk)]) if len(ints) \
        else torch.empty(0, dtype=torch.int64, device=x.device)


def _rows_by_content(part: Tensor, whole: Tensor, labels: Optional[Tensor]) -> Tensor:
    if part.shape[1:] != whole.shape[1:] or part.dtype != whole.dtype:
        raise RowLookupError(
            f'rows of shape {tuple(part.shape[1:])} {part.dtype} cannot come from a batch of shape '
            f'{tuple(whole.shape[1:])} {whole.dtype}',
        )
    part = part.to(whole.device)
    mine, theirs = _fingerprints(part), _fingerprints(whole)
    found = []
    for i in range(part.shape[0]):
        candidates = [int(j) for j in (theirs == mine[i]).nonzero().flatten() if torch.equal(whole[j], part[i])]
        if not candidates:
            raise RowLookupError(f'row {i} of the microbatch is no row of the mixed batch')
        if labels is not None and any(not torch.equal(labels[j], labels[candidates[0]]) for j in candidates[1:]):
            raise RowLookupError(
                f'row {i} of the microbatch equals rows {candidates} of the mixed batch, whose partners differ',
            )
        found.append(candidates[0])
    return torch.tensor(found, dtype=torch.long, device=whole.device)
