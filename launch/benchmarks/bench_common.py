"""What the parts of ``launch/benchmarks/benchmark.py`` share: timing, medians, tables, environment, ranks.

:func:`time_round_robin` times every implementation of one iteration back to back, by the wall
clock on the CPU or by CUDA events on a GPU; :func:`paired_ratio` compares two of them iteration
by iteration; :func:`md_table` prints a result; :func:`spawn_ranks` runs a part's rank body on W
gloo ranks (:func:`launch.tools.spawn.run_ranks`).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from launch.tools.spawn import run_ranks

__all__ = ['DEVICES', 'NUM_CLASSES', 'Shape', 'check_device', 'environment', 'md_table', 'median', 'paired_ratio',
           'parse_shapes', 'shape_str', 'spawn_ranks', 'time_round_robin']

Shape = tuple[int, int, int, int]

NUM_CLASSES = 10


DEVICES = ('cpu', 'cuda')


def check_device(device: str, tool: str) -> torch.device:
    """``cpu``, or ``cuda`` where CUDA is available; otherwise a clear error, before anything runs.

    Raises:
        ValueError: for another device.
        RuntimeError: for ``cuda`` without CUDA, naming ``tool`` and ``--device cuda``.
    """
    if device not in DEVICES:
        raise ValueError(f'device must be one of {DEVICES}, got {device!r}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(
            f'{tool} --device cuda: CUDA is not available here (torch.cuda.is_available() is False; torch '
            f'{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine with a GPU, or use '
            '--device cpu.')
    return torch.device(device)

def shape_str(shape: Sequence[int]) -> str:
    return 'x'.join(map(str, shape))


def parse_shapes(text: str) -> list[Shape]:
    """``'256x3x32x32,64x3x224x224'`` -> shapes (an ``argparse`` type)."""
    shapes = []
    for part in text.split(','):
        dims = tuple(int(d) for d in part.strip().lower().split('x'))
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f'a shape is NxCxHxW with positive sizes, got {part!r}')
        shapes.append(dims)  # type: ignore[arg-type]
    return shapes


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float('nan')


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-iteration ratios: both ran on the same box, back to back."""
    return median([a / b for a, b in zip(num, den, strict=True) if b > 0])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return 'n/a'
            return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
        return str(v)

    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def time_round_robin(entries: dict[str, Callable[[int], Any]], iters: int, warmup: int, *,
                     cuda: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each entry, and its minor page faults per call.

    Iteration ``i`` calls every entry with ``i``, in an order rotated by one each iteration, so
    no implementation always runs first and a burst of background load hits all of them.

    On the CPU (``cuda=False``) a call is timed by the wall clock. With ``cuda``, every call starts
    on an idle GPU (``torch.cuda.synchronize()`` first, so no earlier work is still queued) and is
    timed by a pair of ``torch.cuda.Event(enable_timing=True)`` recorded just before and just after
    it on the current stream: the GPU time from the call's first launch to its last kernel's end,
    gaps while the host launches included. The events are read after a final synchronize. Page
    faults are the host process's either way.
    """
    names = list(entries)
    samples: dict[str, list[Any]] = {n: [] for n in names}  # seconds, or (start, end) CUDA event pairs
    faults: dict[str, int] = dict.fromkeys(names, 0)
    gc.collect()
    gc.disable()  # a collection inside one timed call would charge it to that implementation
    try:
        for i in range(warmup + iters):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                if cuda:
                    torch.cuda.synchronize()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    entries[name](i)
                    end.record()
                    sample: Any = (start, end)
                else:
                    t0 = time.perf_counter()
                    entries[name](i)
                    sample = time.perf_counter() - t0
                if i >= warmup:
                    samples[name].append(sample)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        if cuda:
            torch.cuda.synchronize()
    finally:
        gc.enable()
    if cuda:  # elapsed_time is in milliseconds
        samples = {n: [start.elapsed_time(end) / 1e3 for start, end in pairs] for n, pairs in samples.items()}
    return samples, {n: faults[n] / max(iters, 1) for n in names}


def spawn_ranks(fn: Callable[..., Any], world: int, args: tuple[Any, ...], *, threads: int = 1,
                deadline_s: float = 900.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks (:func:`launch.tools.spawn.run_ranks`), in a temp dir."""
    with tempfile.TemporaryDirectory(prefix='dist_cutmix_bench_') as workdir:
        return run_ranks(fn, world, workdir, *args, threads=threads, deadline_s=deadline_s, collective_timeout_s=120.0)


def environment(threads: int, device: str = 'cpu') -> dict[str, Any]:
    """Versions, CPU, threads; with ``device='cuda'`` also the GPU (``gpu``) and CUDA version."""
    import composer

    env = {
        'torch': torch.__version__, 'composer': composer.__version__, 'python': platform.python_version(),
        'cpu': platform.processor() or platform.machine(), 'cpus': os.cpu_count(), 'threads': threads,
    }
    for name in ('timm', 'torchvision'):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    try:
        with open('/proc/cpuinfo') as f:
            env['cpu'] = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
        env['cuda'] = torch.version.cuda
    return env
