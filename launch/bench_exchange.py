"""The ``exchange`` part of ``launch/benchmark.py``: global mixing, our exchange against all-gather.

Global mixing on W gloo ranks: our crop ``all_to_all`` (:func:`mix_batch_across_group`)
against all-gathering the global batch and mixing locally with the same box, λ and
permutation. A step's time is the slowest rank's; bytes are those a rank sends to others.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dist_cutmix import functional as F
from launch.bench_common import NUM_CLASSES, Shape, md_table, median, paired_ratio, shape_str, spawn_ranks

__all__ = ['combine_exchange', 'exchange_markdown', 'exchange_rank', 'run_exchange']


def _allgather_mix(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, ybuf: torch.Tensor, params: F.CutMixParams,
                   rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward global CutMix: all-gather the global batch, then mix locally (in place)."""
    dist.all_gather(list(buf.chunk(world)), x.contiguous())
    dist.all_gather(list(ybuf.chunk(world)), y)
    b = x.shape[0]
    partners = params.indices[rank * b:(rank + 1) * b]
    F.paste_crops(x, F.gather_crops(buf, partners, params.box), params.box, inplace=True)
    target = F.mix_targets(y, ybuf[partners], params.lam, params.box, kind='index', num_classes=NUM_CLASSES)
    return x, target


def exchange_rank(rank: int, world: int, shapes: Sequence[Shape], iters: int, warmup: int,
                   seed: int) -> list[dict[str, Any]]:
    """This rank's side of the exchange benchmark: per shape, per-iteration seconds and bytes."""
    from dist_cutmix._random import batch_generator
    from dist_cutmix.distributed import group_stream_key
    from dist_cutmix.mixer import mix_batch_across_group

    out = []
    for shape in shapes:
        b, c, h, w = shape
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        x = torch.rand(shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
        buf = torch.empty((world * b, c, h, w), dtype=x.dtype)
        ybuf = torch.empty(world * b, dtype=y.dtype)

        def params_of(batch: int) -> F.CutMixParams:  # what mix_batch_across_group draws for this batch
            return F.sample_params(world * b, h, w, alpha=1.0,
                                   generator=batch_generator(seed, batch, *group_stream_key(None)))

        def ours(batch: int) -> tuple[Any, int]:
            r = mix_batch_across_group(x, y, seed=seed, batch=batch, num_classes=NUM_CLASSES, inplace=True)
            return r, r.bytes_sent

        # Same work: both must give the same pixels and targets for the same batch index.
        batch0 = next(i for i in range(100) if params_of(i).lam < 1.0)
        ref = mix_batch_across_group(x.clone(), y, seed=seed, batch=batch0, num_classes=NUM_CLASSES, inplace=True)
        alt_x, alt_y = _allgather_mix(x.clone(), y, buf, ybuf, params_of(batch0), rank, world)
        if ref.box != params_of(batch0).box or not torch.equal(ref.input, alt_x) or not torch.allclose(ref.target, alt_y):
            raise RuntimeError(f'rank {rank}: all-gather mixing differs from ours for shape {shape}; '
                               'the benchmark would compare different work')

        handshake = (world - 1) * 3 * 8  # agree_on_batch's all_gather of 3 int64 per rank (not in bytes_sent)
        allgather_bytes = (world - 1) * b * (c * h * w * x.element_size() + y.element_size())
        times: dict[str, list[float]] = {'ours': [], 'allgather': []}
        sent: dict[str, list[int]] = {'ours': [], 'allgather': []}
        box_share = []
        for i in range(warmup + iters):
            params = params_of(i)
            order = ['ours', 'allgather'] if i % 2 == 0 else ['allgather', 'ours']
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                if name == 'ours':
                    _, nbytes = ours(i)
                    nbytes += handshake
                else:
                    _allgather_mix(x, y, buf, ybuf, params, rank, world)
                    nbytes = allgather_bytes
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt)
                    sent[name].append(nbytes)
            if i >= warmup:
                box_share.append(1.0 - params.lam)
        out.append({'shape': list(shape), 'times_s': times, 'bytes': sent, 'box_share': box_share})
        del x, buf
    return out


def combine_exchange(world: int, per_rank: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A step takes as long as its slowest rank; bytes are averaged over ranks and steps."""
    rows = []
    for k, first in enumerate(per_rank[0]):
        step = {name: [max(r[k]['times_s'][name][i] for r in per_rank) for i in range(len(first['times_s'][name]))]
                for name in ('ours', 'allgather')}
        mean_bytes = {name: statistics.fmean(v for r in per_rank for v in r[k]['bytes'][name])
                      for name in ('ours', 'allgather')}
        rows.append({
            'world': world, 'shape': first['shape'],
            'median_s': {n: median(v) for n, v in step.items()},
            'step_s': step,
            'bytes_per_rank': mean_bytes,
            'time_ratio': paired_ratio(step['allgather'], step['ours']),
            'bytes_ratio': mean_bytes['allgather'] / mean_bytes['ours'] if mean_bytes['ours'] else float('inf'),
            'mean_box_share': statistics.fmean(first['box_share']),
        })
    return rows


def run_exchange(worlds: Sequence[int], shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0,
                 threads: int = 1) -> list[dict[str, Any]]:
    """Spawn ``W`` gloo ranks for each ``W`` in ``worlds`` and time both ways of mixing globally."""
    rows = []
    for world in worlds:
        per_rank = spawn_ranks(exchange_rank, world, (list(shapes), iters, warmup, seed), threads=threads)
        rows += combine_exchange(world, per_rank)
    return rows


def exchange_markdown(rows: Sequence[dict[str, Any]], note: str = '') -> str:
    table = md_table(
        ['W', 'shape (per rank)', 'box share', 'ours (ms)', 'all-gather (ms)', 'time all-gather/ours',
         'ours MB sent/rank', 'all-gather MB sent/rank', 'bytes all-gather/ours'],
        [[r['world'], shape_str(r['shape']), r['mean_box_share'], r['median_s']['ours'] * 1e3,
          r['median_s']['allgather'] * 1e3, r['time_ratio'], r['bytes_per_rank']['ours'] / 1e6,
          r['bytes_per_rank']['allgather'] / 1e6, r['bytes_ratio']] for r in rows],
    )
    return '\n\n'.join(x for x in [
        '### The exchange: global mixing, median ms per step (slowest rank) and bytes each rank sends', note, table,
    ] if x)
