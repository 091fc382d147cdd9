"""The only module that calls ``torch.distributed``: agree on a batch, then move partner crops.

Global mixing views the ranks' batches laid end to end in group-rank order as one global batch
of ``G`` samples, mixed by one permutation ``perm`` that every rank draws identically. Sample
``g`` receives the box region of sample ``perm[g]``. Each rank sends each of its crops exactly
once, straight to the rank that needs it, in one ``all_to_all_single``: about
``(1 - lam) * B * C * H * W`` elements per rank instead of ``(W - 1) * B * C * H * W`` for
gathering the global batch.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dist_cutmix._tensors import to_device

__all__ = [
    'BatchMismatchError',
    'ExchangePlan',
    'MissingRankError',
    'agree_on_batch',
    'agree_on_seed',
    'all_gather_ints',
    'exchange_ragged',
    'exchange_rows',
    'group_rank_and_size',
    'group_stream_key',
    'node_group',
    'wait_for_ranks',
]

ProcessGroup = Optional[dist.ProcessGroup]


class BatchMismatchError(ValueError):
    """The ranks of a group hold batches that cannot be mixed together; raised on every rank."""


class MissingRankError(TimeoutError):
    """Ranks of a group did not reach a batch in time; raised on the ranks that waited, naming the missing ones."""


def group_rank_and_size(group: ProcessGroup) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def group_stream_key(group: ProcessGroup) -> tuple[str, int]:
    """A name for ``group`` that is the same on all its ranks: its lowest global rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return ('group', 0)
    return ('group', min(dist.get_process_group_ranks(group or dist.group.WORLD)))


def node_group(local_world_size: int, local_rank: Optional[int] = None,
               node_rank: Optional[int] = None) -> ProcessGroup:
    """The process group of this node's ranks; every rank must call it (it creates all nodes' groups).

    Ranks are laid out node by node (``global = node * local_world_size + local``), as Composer's
    launcher does. Each rank reads its layout from its own environment, so the ranks first check,
    with one small all-gather, that every rank reports that same layout; if not, every rank raises
    the same error naming every rank's view. ``None`` without a process group or with one process.

    Raises:
        ValueError: on every rank, if the ranks' layouts disagree or do not tile the world.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = rank % max(local_world_size, 1) if local_rank is None else local_rank
    node_rank = rank // max(local_world_size, 1) if node_rank is None else node_rank
    mine = torch.tensor([local_world_size, local_rank, node_rank], dtype=torch.int64, device=_comm_device(None))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine)
    views = [tuple(t.tolist()) for t in table]
    sizes = {v[0] for v in views}
    consistent = (len(sizes) == 1 and local_world_size >= 1 and world % local_world_size == 0
                  and all(n * size + local == r and 0 <= local < size for r, (size, local, n) in enumerate(views)))
    if not consistent:
        lines = '\n'.join(f'  rank {r}: local_world_size={s}, local_rank={lr}, node_rank={n}'
                          for r, (s, lr, n) in enumerate(views))
        raise ValueError(
            f"mode='node' needs every rank to agree on one node layout (the same local_world_size, dividing the "
            f'world size {world}, and global rank = node_rank * local_world_size + local_rank); the ranks report:\n'
            f'{lines}',
        )
    group, _ = dist.new_subgroups(group_size=local_world_size)
    return group


def _comm_device(group: ProcessGroup) -> torch.device:
    """Where a collective's tensors must live: the current GPU for NCCL, the host otherwise."""
    if dist.get_backend(group) == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _wire(t: Tensor, group: ProcessGroup) -> Tensor:
    """``t`` where the backend can send it: NCCL carries CUDA tensors only, so a host tensor (a CPU target beside a
    CUDA input) crosses on the current GPU, and comes back to the host after (a host sync, in that case only)."""
    comm = _comm_device(group)
    return to_device(t, comm) if comm.type == 'cuda' and t.device.type != 'cuda' else t


def agree_on_batch(signature: str, size: int, problem: Optional[str], group: ProcessGroup,
                   caller: str = 'mix_batch_across_group') -> list[int]:
    """Check that all ranks of ``group`` can mix together; return every rank's batch size.

    Args:
        signature: what must agree across ranks (shapes past the batch dim, dtypes, target
            kind, number of classes), as readable text.
        size: this rank's batch size.
        problem: this rank's own input error, or ``None``.
        group: the process group.
        caller: what the user called, named in the error.

    Returns:
        The batch sizes of all ranks, in group-rank order.

    Raises:
        BatchMismatchError: on every rank at once, when any rank reported a problem or the
            signatures differ. One small all-gather on the happy path; only on failure are the
            texts gathered, so every rank can name every rank's view.
    """
    digest = int.from_bytes(hashlib.blake2b(signature.encode(), digest_size=7).digest(), 'little')
    mine = to_device(torch.tensor([size, digest, int(problem is not None)], dtype=torch.int64, device='cpu'),
                      _comm_device(group))
    _, world = group_rank_and_size(group)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = torch.stack(table).tolist()  # one read of the table: one host sync, not one per rank
    if any(r[2] for r in rows) or len({r[1] for r in rows}) > 1:
        texts: list[Optional[str]] = [None] * world
        dist.all_gather_object(texts, problem or signature, group=group)
        lines = '\n'.join(f'  rank {r}: {t}' for r, t in enumerate(texts))
        if any(r[2] for r in rows):
            raise BatchMismatchError(f'{caller} cannot mix this batch; bad input on some rank:\n{lines}')
        raise BatchMismatchError(f'{caller}: the ranks disagree on the batch (its index and layout must match on '
                                 f'every rank):\n{lines}')
    return [r[0] for r in rows]


def all_gather_ints(values: Sequence[int], group: ProcessGroup) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), in group-rank order: one small all-gather.

    ``[list(values)]`` without a process group or in a group of one.
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return [list(values)]
    mine = to_device(torch.tensor(list(values), dtype=torch.int64, device='cpu'), _comm_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    return torch.stack(table).tolist()


def _group_store(group: ProcessGroup) -> dist.Store:
    """The key-value store the group's ranks met through (its own prefix of it), which any backend has.

    torch keeps it in a private table: there is no public accessor (torch 2.6 to 2.14 have this one).
    """
    from torch.distributed import distributed_c10d

    getter = getattr(distributed_c10d, '_get_process_group_store', None)
    if getter is None:
        raise RuntimeError(f'this torch ({torch.__version__}) gives no access to the process group\'s store, '
                           'which the bounded wait for missing ranks needs')
    return getter(group or dist.group.WORLD)


def wait_for_ranks(tag: str, batch: int, timeout_s: float, group: ProcessGroup = None, hint: str = '') -> None:
    """Return once every rank of ``group`` has reached ``batch`` of ``tag``; raise naming the ranks that did not.

    Each rank marks its arrival in the group's store and waits for the others' marks, at most ``timeout_s``
    seconds from its own arrival. The store answers on any backend, even while a rank is stuck elsewhere,
    so a rank that will never come (its loader ended, it left the loop) is named within the bound instead
    of leaving the others in a collective until the process group's timeout. Three store operations a
    call; nothing without a process group or in a group of one. Every rank must use the same ``tag`` for
    the same sequence of batches (a name unique to one loop, e.g. one per mixer).

    Raises:
        MissingRankError: on each rank that waited in vain, naming every missing rank (by global rank) with
            the last batch it reached, and ``hint``.
    """
    rank, world = group_rank_and_size(group)
    if world == 1:
        return
    store = _group_store(group)
    prefix = f'dist_cutmix/arrival/{tag}'
    store.set(f'{prefix}/{batch}/{rank}', '1')
    # Every rank passed its wait for batch - 2 before it marked batch - 1, which this rank has seen: drop the old mark.
    store.delete_key(f'{prefix}/{batch - 2}/{rank}')
    keys = [f'{prefix}/{batch}/{r}' for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        return
    except RuntimeError as e:  # the store's timeout (DistStoreError is a RuntimeError), or the store is gone
        waited = e
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    try:
        missing = [r for r in range(world) if not store.check([keys[r]])]
        # This rank marked batch - 1 only if it mixed it here, and passed it only once every rank had marked it.
        seen_previous = store.check([f'{prefix}/{batch - 1}/{rank}'])
    except RuntimeError as e:  # the rank that hosted the store left: no rank can be named
        raise MissingRankError(f'rank {ranks[rank]} waited for the other ranks at batch {batch} and lost the process '
                               f'group\'s store ({waited}; then {e}); the rank that hosted it has probably left'
                               + (f'. {hint}' if hint else '')) from e
    if not missing:  # they came just as the wait gave up
        return
    names = ', '.join(f'rank {ranks[r]}' for r in missing)
    if seen_previous:
        where = f'{names} reached batch {batch - 1} but not batch {batch}'
    else:
        where = f'{names} did not reach batch {batch}, the first of this loop on rank {ranks[rank]},'
    raise MissingRankError(f'{where} within {timeout_s:g} s of rank {ranks[rank]}, which waited for '
                           f'{"it" if len(missing) == 1 else "them"} there' + (f'. {hint}' if hint else ''))


def agree_on_seed(seed: int, group: ProcessGroup) -> int:
    """``seed`` of the group's first rank, on every rank of ``group``: one broadcast; ``seed`` itself without one."""
    rank, world = group_rank_and_size(group)
    if world == 1:
        return seed
    value = to_device(torch.tensor([seed], dtype=torch.int64, device='cpu'), _comm_device(group))
    dist.broadcast(value, src=min(dist.get_process_group_ranks(group or dist.group.WORLD)), group=group)
    return int(value.item())


@dataclass(frozen=True)
class ExchangePlan:
    """Who owns, sends and receives which rows, for one global permutation; the same arithmetic on every rank.

    Attributes:
        send_order: local indices of this rank's samples, in the order they are sent.
        send_dest: global index of the destination of each sent row (ascending).
        send_counts: rows sent to each rank.
        recv_index: for each local sample, where its partner's row is among the received rows
            (which arrive grouped by source rank).
        recv_order: the local samples in the order their partners' rows arrive (the inverse of
            ``recv_index``).
        recv_counts: rows received from each rank.
        partners: global index of each local sample's partner (``perm`` restricted to this rank).
        offset: global index of this rank's first sample.
        partner_rank: group rank holding each local sample's partner.
        partner_index: each local sample's partner's index in that rank's batch.
        cross_rank_fraction: share of the whole group's batch whose partner is on another rank.
    """

    send_order: Tensor
    send_dest: Tensor
    send_counts: list[int]
    recv_index: Tensor
    recv_order: Tensor
    recv_counts: list[int]
    partners: Tensor
    offset: int
    partner_rank: Tensor
    partner_index: Tensor
    cross_rank_fraction: float

    @classmethod
    def build(cls, perm: Tensor, sizes: Sequence[int], rank: int) -> 'ExchangePlan':
        """Plan the exchange for global permutation ``perm`` over ranks of batch ``sizes``."""
        world = len(sizes)
        counts = torch.tensor(list(sizes), device='cpu')
        bounds = counts.cumsum(0)  # exclusive end of each rank's range
        starts = bounds - counts
        offset = int(starts[rank])
        mine = torch.arange(offset, offset + sizes[rank], device='cpu')

        def owner(g: Tensor) -> Tensor:
            return torch.searchsorted(bounds, g, right=True)

        # Receive: my destination g takes perm[g]; rows arrive grouped by source, ascending g.
        partners = perm[mine]
        src = owner(partners)
        recv_order = torch.argsort(src, stable=True)
        recv_index = torch.argsort(recv_order)  # rank of each sample in arrival order
        # Send: my sample s goes to destination inv[s]; sending in ascending destination order
        # groups rows by destination rank and matches each receiver's ascending-g order.
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device='cpu')
        dst = inv[mine]
        send_order = torch.argsort(dst)
        total = len(perm)
        cross = float((owner(perm) != owner(torch.arange(total, device='cpu'))).double().mean()) if total else 0.0
        return cls(
            send_order=send_order,
            send_dest=dst[send_order],
            send_counts=torch.bincount(owner(dst), minlength=world).tolist(),
            recv_index=recv_index,
            recv_order=recv_order,
            recv_counts=torch.bincount(src, minlength=world).tolist(),
            partners=partners,
            offset=offset,
            partner_rank=src,
            partner_index=partners - starts[src],
            cross_rank_fraction=cross,
        )

    def cross_rank_rows_sent(self, rank: int) -> int:
        """Rows this rank sends to other ranks (its own rows never leave it)."""
        return sum(self.send_counts) - self.send_counts[rank]

    def sent_per_rank(self, row_sizes: Tensor) -> list[int]:
        """The total of ``row_sizes`` (one per sent row, in send order) that goes to each rank."""
        return _per_rank(row_sizes, self.send_counts)

    def received_per_rank(self, row_sizes: Tensor) -> list[int]:
        """The total of ``row_sizes`` (one per arriving row, in arrival order) that comes from each rank."""
        return _per_rank(row_sizes, self.recv_counts)


def _per_rank(row_sizes: Tensor, counts: list[int]) -> list[int]:
    """Sum ``row_sizes`` over consecutive runs of ``counts`` rows (rows are grouped by rank, ascending)."""
    ranks = torch.repeat_interleave(torch.arange(len(counts), device='cpu'), torch.tensor(counts, device='cpu'))
    return torch.bincount(ranks, weights=row_sizes.double(), minlength=len(counts)).long().tolist()


def exchange_rows(rows: Sequence[Tensor], plan: ExchangePlan, group: ProcessGroup) -> list[Tensor]:
    """Send each tensor of ``rows`` (already in ``plan.send_order``); return the partner rows, in local order.

    Each tensor has a leading dim of this rank's batch size; the rest of its shape and its dtype
    must agree across ranks (:func:`agree_on_batch` checks). Several tensors (crops and labels) are
    packed row by row into one byte buffer, so the whole exchange is one ``all_to_all_single``:
    each collective costs a round of latency. No collective for a group of one.
    """
    if len(plan.send_counts) == 1:
        # A group of one: rows were "sent" in destination order, which here is local order.
        return list(rows)
    # gloo reads raw memory: a channels_last or strided tensor would arrive scrambled.
    parts = [t.contiguous() for t in rows]
    n = parts[0].shape[0]
    if len(parts) == 1 or len({t.device for t in parts}) > 1:
        return [_in_local_order(_all_to_all(t, plan, group), plan) for t in parts]
    flat = [t.reshape(n, math.prod(t.shape[1:])).view(torch.uint8) for t in parts]
    received = _all_to_all(torch.cat(flat, dim=1), plan, group)
    widths = [f.shape[1] for f in flat]
    # index_select both reorders the rows and copies each column chunk into a fresh buffer, whose
    # offset and strides suit a view as the wider dtype (a one-row slice of the packed buffer does not).
    return [
        _in_local_order(chunk, plan).view(t.dtype).reshape(received.shape[0], *t.shape[1:])
        for chunk, t in zip(received.split(widths, dim=1), parts, strict=True)
    ]


def _all_to_all(send: Tensor, plan: ExchangePlan, group: ProcessGroup) -> Tensor:
    """Rows in arrival order: grouped by source rank, as ``plan`` counts them."""
    home, send = send.device, _wire(send, group)
    received = send.new_empty((sum(plan.recv_counts), *send.shape[1:]))
    dist.all_to_all_single(
        received, send, output_split_sizes=plan.recv_counts, input_split_sizes=plan.send_counts, group=group,
    )
    return received.to(home)


def _in_local_order(received: Tensor, plan: ExchangePlan) -> Tensor:
    # A row-wise gather (index_select), not ``out[arrival_order] = received``: advanced-index
    # assignment runs an element-wise kernel, many times slower on a byte buffer.
    return received.index_select(0, to_device(plan.recv_index, received.device))


def exchange_ragged(
    payloads: Sequence[Tensor], send_numel: Sequence[Sequence[int]], recv_numel: Sequence[Sequence[int]],
    group: ProcessGroup,
) -> list[Tensor]:
    """Send 1-D payloads whose rows differ in size (per-sample crops); return what arrives, per payload.

    Args:
        payloads: 1-D tensors, each already grouped by destination rank (ascending).
        send_numel: for each payload, how many of its elements go to each rank.
        recv_numel: for each payload, how many elements arrive from each rank (every rank knows,
            from the draws alone, the size of every crop it will receive).
        group: the process group.

    Returns:
        For each payload, the received elements grouped by source rank (ascending), as a fresh 1-D
        tensor of the payload's dtype.

    All payloads travel as bytes in one ``all_to_all_single``: for each destination, payload 0's
    elements for it, then payload 1's, and so on. No collective for a group of one.
    """
    world = len(send_numel[0])
    if world == 1:
        return [p.clone() for p in payloads]
    sizes = [p.element_size() for p in payloads]
    raw = [_wire(p.contiguous().view(torch.uint8), group) for p in payloads]
    starts = [[0] + list(itertools.accumulate(b * size for b in counts))
              for counts, size in zip(send_numel, sizes, strict=True)]
    segments, send_bytes = [], []
    for d in range(world):
        parts = [r[s[d]:s[d + 1]] for r, s in zip(raw, starts, strict=True)]
        send_bytes.append(sum(len(q) for q in parts))
        segments += [q for q in parts if len(q)]
    device = raw[0].device
    send = torch.cat(segments) if segments else torch.empty(0, dtype=torch.uint8, device=device)
    recv_bytes = [sum(counts[r] * size for counts, size in zip(recv_numel, sizes, strict=True)) for r in range(world)]
    received = send.new_empty(sum(recv_bytes))
    dist.all_to_all_single(received, send, output_split_sizes=recv_bytes, input_split_sizes=send_bytes, group=group)
    pieces: list[list[Tensor]] = [[] for _ in payloads]
    offset = 0
    for r in range(world):
        for k, (counts, size) in enumerate(zip(recv_numel, sizes, strict=True)):
            n = counts[r] * size
            pieces[k].append(received[offset:offset + n])
            offset += n
    # A fresh buffer per payload: a byte slice's offset may not suit a view as the wider dtype.
    return [torch.cat(piece).view(p.dtype).to(p.device) if piece else p.new_empty(0)
            for piece, p in zip(pieces, payloads, strict=True)]
