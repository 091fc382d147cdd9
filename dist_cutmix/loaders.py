"""Loaders that global mixing can trust: a check before the first batch, and an order that survives a new world size.

In ``'global'`` and ``'node'`` mode every mixer call is a collective, so every rank must yield the same
number of batches. :func:`check_loader` compares the ranks' loader lengths once, before the first
batch, and refuses unequal ones on every rank (a rank with more batches would wait in the exchange
for ranks that never come). ``DistributedSampler`` passes, with or without ``drop_last``: it gives
every rank the same number of samples (padding with repeats, or dropping the tail).

:class:`GlobalBatchSampler` lays out each step's global batch (the ranks' batches end to end in rank
order) as one contiguous slice of one permutation per epoch, so step ``s`` sees the same samples in
the same order whatever the number of ranks: a run resumed on another world size with the same
global batch mixes every later batch exactly as before. ``DistributedSampler`` deals the
permutation out rank by rank instead (rank ``r`` takes samples ``r, r + W, ...``): its global batch
of step ``s`` holds the same samples at any ``W``, in an order that depends on ``W``.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sized, Union

import torch
from torch.utils.data import Sampler

from dist_cutmix.distributed import ProcessGroup, all_gather_ints, group_rank_and_size

__all__ = ['GlobalBatchSampler', 'check_loader']

_MODES = ('local', 'global', 'node')


def check_loader(loader: Any, mode: str = 'global', *, group: ProcessGroup = None) -> Optional[int]:
    """Refuse, on every rank and before the first batch, a loader that would leave ranks waiting in the mixer.

    Call it on every rank of the mixing group, once per epoch or once before training, with the loader
    the loop will run. In ``'global'`` mode it compares ``len(loader)`` over ``group`` (default: all
    ranks), in ``'node'`` mode over all ranks (one small all-gather); ``'local'`` mixing needs no
    agreement and runs no collective.

    Args:
        loader: what the loop iterates over: a ``DataLoader`` or anything with ``__len__``.
        mode: the mixer's mode, ``'local'``, ``'global'`` or ``'node'``.
        group: the mixing group of ``'global'`` mode (default: all ranks).

    Returns:
        The number of batches, the same on every rank (``None`` for a loader without a length in
        ``'local'`` mode or in one process).

    Raises:
        ValueError: on every rank, naming each rank's number of batches, when they differ, or when some
            rank's loader has no length (an ``IterableDataset``): its batches cannot be counted ahead, so
            make every rank yield the same number and pass ``arrival_timeout`` to the mixer instead, which
            names a rank that stops coming within that many seconds.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from dist_cutmix.loaders import check_loader
        >>> check_loader(DataLoader(TensorDataset(torch.zeros(10, 3, 8, 8)), batch_size=4))
        3
    """
    if mode not in _MODES:
        raise ValueError(f'mode must be one of {_MODES}, got mode={mode!r}')
    if group is not None and mode != 'global':
        raise ValueError(f"group is only used with mode='global', got mode={mode!r}")
    try:
        length: Optional[int] = len(loader)
    except TypeError:
        length = None
    if mode == 'local' or group_rank_and_size(group if mode == 'global' else None)[1] == 1:
        return length  # no collective in the mixer: nothing for the ranks to agree on
    lengths = [row[0] for row in all_gather_ints([-1 if length is None else length], group)]
    if len(set(lengths)) == 1 and lengths[0] >= 0:
        return lengths[0]
    table = ', '.join(f'rank {r}: {"no length" if n < 0 else f"{n} batches"}' for r, n in enumerate(lengths))
    if min(lengths) < 0:
        raise ValueError(
            f"mode={mode!r} mixes every batch across ranks, so every rank must yield the same number of batches; "
            f'a loader without a length cannot be checked ahead ({table}). Make every rank yield the same number '
            'and pass arrival_timeout=SECONDS to the Mixer, which names a rank that stops coming within that time')
    raise ValueError(
        f"mode={mode!r} mixes every batch across ranks, so every rank must yield the same number of batches; "
        f'the loaders differ ({table}): the ranks with more would wait in the exchange for the others until the '
        'process group times out. Give every rank an equal share: a DistributedSampler (with or without '
        'drop_last) or dist_cutmix.loaders.GlobalBatchSampler')


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's batches, laid out so that every step's global batch is the same at any number of ranks.

    Each epoch draws one permutation of the dataset (from ``seed + epoch``, as ``DistributedSampler``
    does); the global batch of step ``s`` is its slice ``[s * G, (s + 1) * G)``, ``G = batch_size *
    num_replicas``, and rank ``r`` takes the ``r``-th run of ``batch_size`` samples of it. The ranks'
    batches end to end, in rank order, are that slice: the same samples in the same order at any world
    size with the same ``G``. Every rank yields ``len(dataset) // G`` full batches (the tail is dropped),
    so ranks never disagree on the count. With one rank the order is ``DistributedSampler``'s with
    ``drop_last=True`` batched by ``DataLoader(drop_last=True)``.

    Pass it as ``DataLoader(dataset, batch_sampler=sampler)`` and call :meth:`set_epoch` before each epoch.

    Args:
        data_source: the dataset (or its length).
        batch_size: samples per rank per step.
        num_replicas: ranks sharing the global batch (default: the world size).
        rank: this rank (default: its rank in the default process group).
        shuffle: a new permutation every epoch; ``False`` takes the samples in order.
        seed: seed of the permutations, the same on every rank.

    Raises:
        ValueError: naming the argument, for a batch size below 1, a rank outside ``[0, num_replicas)``,
            or a dataset too small for one global batch.
    """

    def __init__(self, data_source: Union[Sized, int], batch_size: int, *, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0) -> None:
        size = data_source if isinstance(data_source, int) else len(data_source)
        default_rank, default_world = group_rank_and_size(None)
        num_replicas = default_world if num_replicas is None else num_replicas
        rank = default_rank if rank is None else rank
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be an int >= 1, got batch_size={batch_size!r}')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}')
        if size < batch_size * num_replicas:
            raise ValueError(f'a global batch of batch_size * num_replicas = {batch_size} * {num_replicas} samples '
                             f'does not fit in the dataset of {size}')
        self.size, self.batch_size, self.num_replicas, self.rank = size, batch_size, num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` (call it on every rank before each epoch, as for ``DistributedSampler``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        step = self.batch_size * self.num_replicas
        for start in range(self.rank * self.batch_size, len(self) * step, step):
            yield order[start:start + self.batch_size].tolist()
