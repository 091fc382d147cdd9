"""Counter-based randomness: ``(seed, batch, *keys) -> torch.Generator``.

A generator is a pure function of its key, so every rank can rebuild the generator of any
batch at any time: no generator state to checkpoint, no collective to agree on a draw, and a
resumed run mixes exactly as the uninterrupted one did.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Union

import torch

__all__ = ['batch_generator', 'default_seed']

Key = Union[int, str]


def batch_generator(seed: int, batch: int, *keys: Key, device: Union[str, torch.device] = 'cpu') -> torch.Generator:
    """A ``torch.Generator`` seeded by a hash of ``(seed, batch, *keys)``.

    Use ``keys`` to separate streams: ``('local', rank)`` for per-rank draws, a group name for
    draws every rank of a group must share.

    Example:
        >>> a = torch.rand(2, generator=batch_generator(17, 3, 'local', 0))
        >>> b = torch.rand(2, generator=batch_generator(17, 3, 'local', 0))
        >>> bool((a == b).all())
        True
    """
    for name, value in (('seed', seed), ('batch', batch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'{name} must be an int, got {value!r}')
    digest = hashlib.blake2b(repr((seed, batch, *keys)).encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, 'little') & ((1 << 63) - 1))
    return generator


def default_seed() -> int:
    """A fresh seed in ``[0, 2**32)``, for use outside a ``Trainer``.

    Composer's ``reproducibility.get_random_seed()`` when Composer is installed, else one drawn from
    the operating system's entropy, so the core needs no Composer.
    """
    try:
        from composer.utils import reproducibility
    except ImportError:
        return secrets.randbelow(2**32)
    return reproducibility.get_random_seed()
