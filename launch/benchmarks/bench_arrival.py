"""What ranks that disagree on the batch count cost, with and without ``Mixer(arrival_timeout=...)``.

Two parts, on two gloo ranks:

* ``cost``: a global mix per batch with the arrival check against one without it, called alternately on
  the same batches (paired), and the check alone (:func:`dist_cutmix.distributed.wait_for_ranks`). Spawned
  ranks meet through a ``FileStore``; under ``torchrun`` (a ``TCPStore``) only this part runs.
* ``missing``: rank 1 leaves the loop one batch early and waits in a barrier, as at the end of a shorter
  loader. Without the check rank 0 waits in the exchange until the process group's timeout; with it, it
  fails after the arrival timeout. Both times and the first line of each rank's error are printed::

    python launch/benchmarks/bench_arrival.py                          # both parts, spawned ranks (FileStore)
    torchrun --nproc_per_node 2 launch/benchmarks/bench_arrival.py     # the cost part over torchrun's TCPStore
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

if __package__ in (None, ''):  # run as a script: make `dist_cutmix` and `launch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_cutmix import Mixer  # noqa: E402
from dist_cutmix.distributed import MissingRankError, wait_for_ranks  # noqa: E402
from launch.tools.spawn import run_ranks  # noqa: E402

__all__ = ['main', 'measure_cost', 'measure_missing']


def _batch(rank: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.rand(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def _mixer(timeout: Optional[float]) -> Mixer:
    return Mixer(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=10, mode='global', seed=0, arrival_timeout=timeout)


def measure_cost(rank: int, world: int, batches: int, shape: Sequence[int]) -> dict[str, Any]:
    """Per-batch seconds of a checked and an unchecked global mix, alternated, and of the check alone."""
    x, y = _batch(rank, shape)
    checked, plain = _mixer(60.0), _mixer(None)
    times: dict[str, list[float]] = {'checked': [], 'plain': [], 'check alone': []}
    for i in range(batches + 3):  # the first three warm up
        for name, mixer in (('checked', checked), ('plain', plain))[::1 if i % 2 else -1]:
            dist.barrier()
            t = time.perf_counter()
            mixer(x, y)
            times[name].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        wait_for_ranks('bench', i, 60.0)
        times['check alone'].append(time.perf_counter() - t)
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):  # name the store underneath torch's prefixes
        store = store.underlying_store
    return {'store': type(store).__name__, **{k: statistics.median(v[3:]) for k, v in times.items()},
            'paired extra': statistics.median(a - b for a, b in zip(times['checked'][3:], times['plain'][3:],
                                                                    strict=True))}


def _missing_rank(rank: int, world: int, timeout: Optional[float]) -> dict[str, Any]:
    mixer = _mixer(timeout)
    x, y = _batch(rank, (8, 3, 32, 32))
    for _ in range(2 if rank else 3):
        started = time.monotonic()
        try:
            mixer(x, y)
        except (MissingRankError, RuntimeError) as e:
            return {'after_s': time.monotonic() - started, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
    started = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError as e:
        return {'after_s': time.monotonic() - started, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
    return {'after_s': time.monotonic() - started, 'error': None}


def measure_missing(group_timeout_s: float, arrival_timeout_s: float) -> list[dict[str, Any]]:
    """Rank 1 mixes one batch fewer than rank 0: how long until each rank fails, and with what, without and with."""
    rows = []
    for timeout in (None, arrival_timeout_s):
        with tempfile.TemporaryDirectory(prefix='dist_cutmix_bench_') as workdir:
            ranks = run_ranks(_missing_rank, 2, workdir, timeout, threads=1, collective_timeout_s=group_timeout_s,
                              deadline_s=group_timeout_s * 3 + 60)
        rows.append({'arrival_timeout_s': timeout, 'group_timeout_s': group_timeout_s,
                     **{f'rank {r}': result for r, result in enumerate(ranks)}})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog='launch/benchmarks/bench_arrival.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--batches', type=int, default=200, help='timed batches of the cost part')
    p.add_argument('--shape', default='32x3x64x64', help='per-rank batch of the cost part, NxCxHxW')
    p.add_argument('--group-timeout', type=float, default=10.0, help="the missing part's process group timeout (s)")
    p.add_argument('--arrival-timeout', type=float, default=2.0, help="the missing part's arrival timeout (s)")
    p.add_argument('--json', default=None, metavar='PATH', help='write the results here')
    args = p.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split('x'))
    torch.set_num_threads(1)
    if 'RANK' in os.environ and not dist.is_initialized():  # under torchrun: its TCPStore, the cost part only
        dist.init_process_group('gloo')
        result = {'cost': measure_cost(dist.get_rank(), dist.get_world_size(), args.batches, shape)}
        if dist.get_rank() != 0:
            return result
    else:
        with tempfile.TemporaryDirectory(prefix='dist_cutmix_bench_') as workdir:
            cost = run_ranks(measure_cost, 2, workdir, args.batches, shape, threads=1, deadline_s=600)[0]
        result = {'cost': cost, 'missing': measure_missing(args.group_timeout, args.arrival_timeout)}
    cost = result['cost']
    print(f"cost per batch, {args.shape} per rank, 2 gloo ranks, {cost['store']}: global mix {cost['plain'] * 1e3:.3f} "
          f"ms, with the arrival check {cost['checked'] * 1e3:.3f} ms (paired extra {cost['paired extra'] * 1e6:.0f} "
          f"µs); the check alone {cost['check alone'] * 1e6:.0f} µs (medians of {args.batches})")
    for row in result.get('missing', []):
        print(f"missing rank, arrival_timeout={row['arrival_timeout_s']}, group timeout {row['group_timeout_s']} s:")
        for r in (0, 1):
            print(f"  rank {r}: fails after {row[f'rank {r}']['after_s']:.2f} s with {row[f'rank {r}']['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + '\n')
    return result


if __name__ == '__main__':
    main()
