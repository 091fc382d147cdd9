"""Rank bodies of the torchvision door's two-rank tests, apart from the test module so that a rank does not import
torchvision (seconds a rank): the door's global path needs none, and plain tensors take it as Images do."""
from __future__ import annotations

import torch

from dist_cutmix.distributed import BatchMismatchError
from dist_cutmix.torchvision import CutMix, MixUp, RandomChoice

SIZES = (3, 5)  # uneven on purpose: rank 0's batch is smaller
K = 6


def door(kind: str, pool: str = 'global', seed: int = 7):
    """The door under test: ``'cutmix'``, ``'mixup'`` or ``'choice'`` (both, switched)."""
    args = dict(num_classes=K, pool=pool, seed=seed)
    if kind == 'cutmix':
        return CutMix(alpha=1.0, **args)
    if kind == 'mixup':
        return MixUp(alpha=0.4, **args)
    return RandomChoice([MixUp(alpha=0.4, **args), CutMix(alpha=1.0, **args)], p=[0.3, 0.7])


def batches(rank: int, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.rand(SIZES[rank], 3, 6, 8, generator=g), torch.randint(0, K, (SIZES[rank],), generator=g))
            for _ in range(count)]


def global_rank(rank: int, world: int, kind: str) -> dict:
    """Mix this rank's batches, packed as ``(images, labels)`` in a dict, through the door with the global pool."""
    transform = door(kind)
    out, cross = [], []
    for x, y in batches(rank):
        mixed = transform({'image': x, 'labels': y})
        out.append((mixed['image'], mixed['labels']))
        cross.append(transform.last.cross_rank_fraction)
    return dict(out=out, cross=cross, state=transform.state_dict()['_extra_state'])


def bad_labels_rank(rank: int, world: int) -> str:
    """Rank 1 passes int32 labels, which torchvision refuses: every rank must raise, none may wait."""
    transform = door('cutmix')
    x, y = batches(rank)[0]
    try:
        transform(x, y.int() if rank == 1 else y)
    except BatchMismatchError as e:
        return f'{type(e.__cause__).__name__ if e.__cause__ else None}|{e}'
    return 'mixed'
