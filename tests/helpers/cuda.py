"""What the CUDA tests share: small CPU batches and targets, a bit-for-bit comparison of a device result with the CPU
one (dtype, shape, strides, values), and the host-sync counter (CUDA's sync debug mode plus the profiler's
pageable copies). Composer-free, so the GPU check runs it on a machine without Composer.
"""
from __future__ import annotations

import os
import traceback
import warnings
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from dist_cutmix.mixer import MixResult

SEED, N, C, H, W, K = 1234, 6, 3, 9, 7, 5  # 9x7 images: a non-dyadic pixel share

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU; torch sees none on this machine (CPU-only host or CI)',
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason=f'needs 2 GPUs (one NCCL rank on each) and a torch built with NCCL; '
           f'{torch.cuda.device_count()} GPU(s) visible here',
)


def make_input(variant: str, n: int = N, seed: int = 0) -> Tensor:
    """A CPU ``(n, C, H, W)`` batch: float32, bfloat16, uint8 or channels_last float32."""
    g = torch.Generator().manual_seed(seed)
    if variant == 'uint8':
        return torch.randint(0, 256, (n, C, H, W), generator=g, dtype=torch.uint8)
    x = torch.randn(n, C, H, W, generator=g)
    if variant == 'bfloat16':
        return x.to(torch.bfloat16)
    if variant == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    return x


def make_target(kind: str, n: int = N, seed: int = 1) -> Tensor:
    """CPU targets: index ``(n,)``, soft ``(n, K)`` or dense ``(n, H, W)`` class maps."""
    g = torch.Generator().manual_seed(seed)
    if kind == 'index':
        return torch.randint(0, K, (n,), generator=g)
    if kind == 'soft':
        return torch.softmax(torch.randn(n, K, generator=g), 1)
    return torch.randint(0, K, (n, H, W), generator=g)


def assert_same(expected: Tensor, actual: Tensor, device: str, what: str) -> None:
    """``actual`` lives on ``device`` and equals the CPU tensor ``expected`` bit for bit, in dtype, shape and layout."""
    assert actual.device.type == torch.device(device).type, f'{what}: on {actual.device}, expected {device}'
    host = actual.cpu()  # keeps the strides of a dense tensor
    assert host.dtype == expected.dtype, f'{what}: dtype {host.dtype}, expected {expected.dtype}'
    assert host.shape == expected.shape, f'{what}: shape {tuple(host.shape)}, expected {tuple(expected.shape)}'
    if host.numel():
        assert host.stride() == expected.stride(), f'{what}: strides {host.stride()}, expected {expected.stride()}'
    assert torch.equal(host, expected), f'{what}: values differ from the CPU result'


def assert_same_result(expected: MixResult, actual: MixResult, device: str, what: str) -> None:
    """Every field of two :class:`MixResult` agree; the tensors are on ``device``, the partner bookkeeping anywhere."""
    for name in ('input', 'target', 'partner_target'):
        assert_same(getattr(expected, name), getattr(actual, name), device, f'{what}: {name}')
    assert (actual.lam, actual.box, actual.kind) == (expected.lam, expected.box, expected.kind), what
    for name in ('partner_rank', 'partner_index'):
        assert torch.equal(getattr(actual, name).cpu(), getattr(expected, name)), f'{what}: {name}'


SYNC_MESSAGE = 'called a synchronizing CUDA operation'


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """Each host sync ``fn`` makes, as ``file:line`` of the Python line that made it (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f'{os.path.relpath(w.filename)}:{w.lineno}' for w in caught if SYNC_MESSAGE in str(w.message)]


def first_sync_traceback(fn: Callable[[], object]) -> str:
    """The traceback of ``fn``'s first host sync, raised by ``set_sync_debug_mode('error')``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        fn()
    except RuntimeError as e:
        if SYNC_MESSAGE not in str(e):
            raise
        return ''.join(traceback.format_exception(e))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return '(none raised in error mode)'


PAGEABLE_COPY = 'Memcpy HtoD (Pageable'


def pageable_copies(fn: Callable[[], object]) -> list[str]:
    """Each host-to-device copy ``fn`` makes from pageable memory, by the profiler's name for it.

    CUDA stages such a copy synchronously even when torch was told ``non_blocking=True``, and torch's sync
    debug mode does not report it: a sync hidden from :func:`host_syncs`. The profiler names every copy
    by its memory kinds ("Memcpy HtoD (Pageable -> Device)" against "(Pinned -> Device)").
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.name.startswith(PAGEABLE_COPY)]


def syncs_of(fn: Callable[[], object]) -> list[str]:
    """Every host sync ``fn`` makes once warmed up: those sync debug mode reports, then its pageable copies."""
    fn()  # first-call allocations and kernel loads are not the steady state
    return host_syncs(fn) + pageable_copies(fn)


def assert_syncs(fn: Callable[[], object], expected: int, what: str) -> None:
    """``fn``, once warmed up, makes exactly ``expected`` host syncs (docs/design.md's count); else names each."""
    syncs = syncs_of(fn)
    assert len(syncs) == expected, (
        f'{what}: {len(syncs)} host syncs, docs/design.md says {expected}, at {syncs}; the first one in error mode:\n'
        f'{first_sync_traceback(fn)}'
    )
