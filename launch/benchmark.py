#!/usr/bin/env python
"""Benchmarks: the CutMix op against its peers and the memory-copy floor, the global exchange
against all-gather, and CutMix's share of a Composer training step.

Run it alone (it spawns its own gloo ranks, meeting through a ``FileStore`` in a temp dir)::

    python launch/benchmark.py                       # everything, default sizes (a few minutes)
    python launch/benchmark.py --part op --iters 200 # one part, more iterations
    python launch/benchmark.py --quick --json out.json

or under Composer's launcher, where the process group comes from the environment::

    composer -n 4 launch/benchmark.py --part exchange

It prints markdown tables (rank 0 only under a launcher) and, with ``--json``, writes every
measurement. Targets are reported, not asserted.

Parts:

``op``
    One CutMix of a batch, per call, median over many pre-drawn boxes (Beta(1, 1)); every
    implementation gets the same box and λ at the same iteration (Composer's and ours also the
    same partners; timm pairs with ``x.flip(0)`` and torchvision with ``x.roll(1, 0)``, which their
    APIs fix). The implementations run round-robin inside each iteration, so background load hits
    all of them alike; ratios are medians of the per-iteration (same box) ratios. The floor is
    one plain ``copy_`` of the box region (read once, written once), on the same tensors.
    Batches of up to a million elements get 4x ``--iters`` calls (cheap, and relatively noisier).
``exchange``
    Global mixing on W gloo ranks: our crop ``all_to_all`` (:func:`mix_batch_across_group`)
    against all-gathering the global batch and mixing locally with the same box, λ and
    permutation. A step's time is the slowest rank's; bytes are those a rank sends to others.
``step``
    A Composer ``Trainer`` on ResNet-18 (CIFAR-sized input), with and without ``CutMix``, local
    (one rank) and global (two ranks, same global batch). A step is timed from
    ``BEFORE_DATALOADER`` to ``BATCH_END``: CutMix mixes at ``AFTER_DATALOADER``, before
    ``BATCH_START``, so a ``BATCH_START`` -> ``BATCH_END`` window would never see it (that window
    is recorded too). The share, (with - without) / without, is taken over neighbouring batches
    of one run that mixes only odd batches; a run with against a run without is reported too,
    but on a shared machine run-to-run load swings exceed the effect.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout that is not installed
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_cutmix import functional as F  # noqa: E402
from launch.spawn import answer_cpuinfo_from_constant, run_ranks  # noqa: E402

__all__ = ['main', 'run_exchange', 'run_op', 'run_step']

Shape = tuple[int, int, int, int]

NUM_CLASSES = 10
LAYOUTS: dict[str, tuple[torch.dtype, bool]] = {  # name -> (dtype, channels_last)
    'float32': (torch.float32, False),
    'bfloat16': (torch.bfloat16, False),
    'channels_last': (torch.float32, True),
}

# What the issue asks for; reported against the measurements, never asserted.
TARGETS = {
    'op_vs_composer': ('op, 64x3x224x224 float32: Composer time / ours', '>=', 1.5),
    'op_vs_peers': ('op, every row: fastest peer time / ours (min)', '>', 1.0),
    'op_vs_floor': ('op, every row: ours / floor (max)', '<=', 2.0),
    'exchange_time': ('exchange W=4, 32x3x224x224: all-gather time / ours', '>=', 3.0),
    'exchange_bytes': ('exchange W=4, 32x3x224x224: all-gather bytes / ours', '>=', 4.0),
    'step_local': ('train step, local: (with - without) / without', '<', 0.02),
    'step_global': ('train step, global: (with - without) / without', '<', 0.10),
}

DEFAULTS = {
    'op_shapes': [(256, 3, 32, 32), (64, 3, 224, 224)],
    'op_iters': 60,
    'exchange_shapes': [(32, 3, 224, 224), (256, 3, 32, 32)],
    'worlds': [2, 4],
    'exchange_iters': 20,
    'step_batch_size': 64,  # the global batch: 64 on one rank (local), 2 x 32 (global)
    'step_batches': 30,
    'step_warmup': 2,
    'step_rounds': 1,
    'step_model': 'resnet18',
}
QUICK = {
    'op_shapes': [(8, 3, 16, 16), (4, 3, 32, 32)],
    'op_iters': 5,
    'exchange_shapes': [(4, 3, 16, 16), (8, 3, 8, 8)],
    'worlds': [2],
    'exchange_iters': 3,
    'step_batch_size': 8,
    'step_batches': 2,
    'step_warmup': 1,
    'step_rounds': 1,
    'step_model': 'tiny',
}


# ============================================================================ helpers


def _shape_str(shape: Sequence[int]) -> str:
    return 'x'.join(map(str, shape))


def _parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for part in text.split(','):
        dims = tuple(int(d) for d in part.strip().lower().split('x'))
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f'a shape is NxCxHxW with positive sizes, got {part!r}')
        shapes.append(dims)  # type: ignore[arg-type]
    return shapes


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float('nan')


def _paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-iteration ratios: both ran on the same box, back to back."""
    return _median([a / b for a, b in zip(num, den) if b > 0])


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return 'n/a'
            return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
        return str(v)

    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _time_round_robin(entries: dict[str, Callable[[int], Any]], iters: int,
                      warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each entry, and its minor page faults per call.

    Iteration ``i`` calls every entry with ``i``, in an order rotated by one each iteration, so
    no implementation always runs first and a burst of background load hits all of them.
    """
    names = list(entries)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, int] = dict.fromkeys(names, 0)
    gc.collect()
    gc.disable()  # a collection inside one timed call would charge it to that implementation
    try:
        for i in range(warmup + iters):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                entries[name](i)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    finally:
        gc.enable()
    return times, {n: faults[n] / max(iters, 1) for n in names}


# ============================================================================ part 1: the op


def _draw_params(n: int, h: int, w: int, count: int, seed: int) -> list[F.CutMixParams]:
    """``count`` CutMix draws (Beta(1, 1) box, partners), from one explicit generator."""
    g = torch.Generator().manual_seed(seed)
    return [F.sample_params(n, h, w, alpha=1.0, generator=g) for _ in range(count)]


@contextmanager
def _pinned_timm(holder: dict[str, Any]) -> Iterator[Any]:
    """timm's ``Mixup`` in CutMix-only mode, its box and λ pinned to ``holder``'s draw.

    timm draws from the global numpy RNG inside ``Mixup``; we replace only the two draw
    functions, so its mixing code (``x[..., box] = x.flip(0)[..., box]`` in place, then the
    target mix) runs as written.
    """
    import timm.data.mixup as timm_mixup

    mixup = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=NUM_CLASSES)
    mixup._params_per_batch = lambda: (holder['lam'], True)
    original = timm_mixup.cutmix_bbox_and_lam
    timm_mixup.cutmix_bbox_and_lam = lambda *a, **k: (holder['box'], holder['lam'])
    try:
        yield mixup
    finally:
        timm_mixup.cutmix_bbox_and_lam = original


def _pinned_torchvision(holder: dict[str, Any]) -> Any:
    """torchvision's ``v2.CutMix``, its box and λ pinned to ``holder``'s draw (same transform code)."""
    from torchvision.transforms import v2

    cutmix = v2.CutMix(num_classes=NUM_CLASSES)

    def make_params(flat_inputs: list[Any]) -> dict[str, Any]:
        y0, y1, x0, x1 = holder['box']
        return {'box': (x0, y0, x1, y1), 'lam_adjusted': holder['lam']}

    cutmix.make_params = make_params
    return cutmix


def _check_same_work(x: torch.Tensor, y: torch.Tensor, p: F.CutMixParams, timm_mixup: Any, tv_cutmix: Any,
                     holder: dict[str, Any]) -> None:
    """Every implementation must produce the same pixels as ours for the same box and partners."""
    from composer.functional import cutmix_batch as composer_cutmix_batch

    n = x.shape[0]
    holder.update(box=p.box, lam=p.lam)
    expect = F.apply_cutmix(x, p)
    flip = F.CutMixParams(p.box, p.lam, torch.arange(n).flip(0))
    roll = F.CutMixParams(p.box, p.lam, (torch.arange(n) - 1) % n)
    got = {
        'ours in place': (F.apply_cutmix(x.clone(), p, inplace=True), expect),
        'ours cutmix_batch': (F.cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices,
                                             generator=torch.Generator())[0], expect),
        'composer': (composer_cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices)[0], expect),
        'timm': (timm_mixup(x.clone(), y)[0], F.apply_cutmix(x, flip)),
        'torchvision': (tv_cutmix(x, y)[0], F.apply_cutmix(x, roll)),
    }
    for name, (a, b) in got.items():
        if not torch.equal(a, b):
            raise RuntimeError(f'{name} does not reproduce the expected CutMix for box {p.box}, input {tuple(x.shape)} '
                               f'{x.dtype}: the benchmark would compare different work')


def _profile_ours(x: torch.Tensor, draws: Sequence[F.CutMixParams], calls: int) -> list[tuple[str, float]]:
    """Where ours' in-place apply spends its time: top aten ops by self CPU time, as shares."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # a CUDA build on a machine without GPU logs an error otherwise
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            F.apply_cutmix(x, draws[i % len(draws)], inplace=True)
    events = [e for e in prof.key_averages() if e.key.startswith('aten::')]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:3]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


SMALL_BATCH_ELEMENTS = 1_000_000  # batches up to this many elements get SMALL_BATCH_ITERS x the iterations
SMALL_BATCH_ITERS = 4


def run_op(shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0,
           layouts: Sequence[str] = tuple(LAYOUTS)) -> list[dict[str, Any]]:
    """Time one CutMix of a batch per implementation; one result row per shape and layout.

    Args:
        shapes: ``(N, C, H, W)`` batch shapes (``N`` even: timm needs it).
        iters: timed calls per implementation; small batches (up to ``SMALL_BATCH_ELEMENTS``
            elements, where one call is cheap and noise is relatively large) get
            ``SMALL_BATCH_ITERS`` times as many.
        warmup: untimed calls first.
        seed: seed of the drawn boxes and the data.
        layouts: keys of ``LAYOUTS``.

    Returns:
        Rows with ``shape``, ``layout``, ``iters``, median seconds per implementation in
        ``median_s``, all samples in ``samples_s``, minor page faults per call in
        ``faults_per_call``, paired ratios in ``ratio``, the mean pasted share ``mean_box_share``,
        the floor's bandwidth ``floor_gbps`` and ``profile`` (ours' top aten ops).

    Raises:
        ValueError: for an odd batch size.
        RuntimeError: if an implementation does not reproduce ours for the same box and partners.
    """
    from composer.functional import cutmix_batch as composer_cutmix_batch

    rows = []
    holder: dict[str, Any] = {}
    with _pinned_timm(holder) as timm_mixup:
        tv_cutmix = _pinned_torchvision(holder)
        for shape in shapes:
            n, c, h, w = shape
            if n % 2:
                raise ValueError(f'timm needs an even batch; got shape {shape}')
            n_iters = iters * SMALL_BATCH_ITERS if n * c * h * w <= SMALL_BATCH_ELEMENTS else iters
            draws = _draw_params(n, h, w, n_iters + warmup, seed)
            for layout in layouts:
                dtype, channels_last = LAYOUTS[layout]
                g = torch.Generator().manual_seed(seed + 1)
                x = torch.rand(shape, generator=g).to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                src = x.clone()  # the floor's source: same shape, dtype and layout
                y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
                _check_same_work(x, y, next(p for p in draws if p.lam < 1.0), timm_mixup, tv_cutmix, holder)
                no_gen = torch.Generator()

                def floor(i: int) -> None:
                    y0, y1, x0, x1 = draws[i].box
                    x[..., y0:y1, x0:x1].copy_(src[..., y0:y1, x0:x1])

                def ours(i: int) -> None:
                    F.apply_cutmix(x, draws[i], inplace=True)

                def ours_targets(i: int) -> None:
                    p = draws[i]
                    F.apply_cutmix(x, p, inplace=True)
                    F.mix_targets(y, y[p.indices], p.lam, p.box, kind='index', num_classes=NUM_CLASSES)

                def ours_cutmix_batch(i: int) -> None:
                    p = draws[i]
                    F.cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices, generator=no_gen)

                def composer(i: int) -> None:
                    p = draws[i]
                    composer_cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices)

                def timm(i: int) -> None:
                    holder.update(box=draws[i].box, lam=draws[i].lam)
                    timm_mixup(x, y)

                def torchvision(i: int) -> None:
                    holder.update(box=draws[i].box, lam=draws[i].lam)
                    tv_cutmix(x, y)

                entries = {
                    'floor': floor, 'ours': ours, 'ours+targets': ours_targets,
                    'ours cutmix_batch': ours_cutmix_batch,
                    'composer': composer, 'timm': timm, 'torchvision': torchvision,
                }
                samples, faults = _time_round_robin(entries, n_iters, warmup)
                ours_s = samples['ours']
                ratio = {
                    'composer/ours': _paired_ratio(samples['composer'], ours_s),
                    'timm/ours': _paired_ratio(samples['timm'], ours_s),
                    'torchvision/ours': _paired_ratio(samples['torchvision'], ours_s),
                    'composer/ours cutmix_batch': _paired_ratio(samples['composer'], samples['ours cutmix_batch']),
                    'ours/floor': _paired_ratio(ours_s, samples['floor']),
                }
                peers = ('composer', 'timm', 'torchvision')
                ratio['min peer/ours'] = min(ratio[f'{k}/ours'] for k in peers)
                used = draws[warmup:warmup + n_iters]
                # The floor reads and writes each pasted element once.
                moved = [2 * n * c * (p.box[1] - p.box[0]) * (p.box[3] - p.box[2]) * x.element_size() for p in used]
                rows.append({
                    'shape': list(shape), 'layout': layout, 'dtype': str(dtype).replace('torch.', ''),
                    'iters': n_iters,
                    'median_s': {k: _median(v) for k, v in samples.items()},
                    'samples_s': samples,
                    'faults_per_call': faults,
                    'ratio': ratio,
                    'mean_box_share': statistics.fmean(1.0 - p.lam for p in used),
                    'floor_gbps': _median([b / t / 1e9 for b, t in zip(moved, samples['floor']) if b]),
                    'profile': _profile_ours(x, used, max(3, min(n_iters, 20))),
                })
                del x, src
    return rows


def _op_markdown(rows: Sequence[dict[str, Any]]) -> str:
    impls = ['floor', 'ours', 'ours+targets', 'ours cutmix_batch', 'composer', 'timm', 'torchvision']
    times = _md_table(
        ['shape', 'layout', 'calls', 'box share'] + [f'{k} (ms)' for k in impls] + ['floor GB/s'],
        [[_shape_str(r['shape']), r['layout'], r['iters'], r['mean_box_share']]
         + [r['median_s'][k] * 1e3 for k in impls] + [r['floor_gbps']] for r in rows],
    )
    keys = ['composer/ours', 'timm/ours', 'torchvision/ours', 'composer/ours cutmix_batch', 'ours/floor',
            'min peer/ours']
    ratios = _md_table(['shape', 'layout'] + keys, [[_shape_str(r['shape']), r['layout']] + [r['ratio'][k] for k in keys]
                                                   for r in rows])
    fault_impls = ['ours', 'ours cutmix_batch', 'composer', 'timm', 'torchvision']
    profile = _md_table(
        ['shape', 'layout', "ours' in-place apply: top aten ops by self CPU time"]
        + [f'{k} faults/call' for k in fault_impls],
        [[_shape_str(r['shape']), r['layout'], ', '.join(f'{k} {s:.0%}' for k, s in r['profile'])]
         + [r['faults_per_call'][k] for k in fault_impls] for r in rows],
    )
    return '\n\n'.join([
        '### The op: median ms per call',
        '`ours` = `apply_cutmix(x, params, inplace=True)` (as the algorithm uses it); `ours+targets` adds '
        '`mix_targets` (index -> soft, as the peers do); `ours cutmix_batch` is the out-of-place drop-in; '
        '`box share` is the mean share of the image pasted; `floor GB/s` counts its bytes read plus written.',
        times, '### The op: ratios (median of same-box ratios; > 1 in a `peer/ours` column means ours is faster)',
        ratios, '### Where ours spends its time (profiler), and minor page faults per call (fresh memory)', profile,
    ])


# ============================================================================ part 2: the exchange


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


def _exchange_rank(rank: int, world: int, shapes: Sequence[Shape], iters: int, warmup: int,
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


def _combine_exchange(world: int, per_rank: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A step takes as long as its slowest rank; bytes are averaged over ranks and steps."""
    rows = []
    for k, first in enumerate(per_rank[0]):
        step = {name: [max(r[k]['times_s'][name][i] for r in per_rank) for i in range(len(first['times_s'][name]))]
                for name in ('ours', 'allgather')}
        mean_bytes = {name: statistics.fmean(v for r in per_rank for v in r[k]['bytes'][name])
                      for name in ('ours', 'allgather')}
        rows.append({
            'world': world, 'shape': first['shape'],
            'median_s': {n: _median(v) for n, v in step.items()},
            'step_s': step,
            'bytes_per_rank': mean_bytes,
            'time_ratio': _paired_ratio(step['allgather'], step['ours']),
            'bytes_ratio': mean_bytes['allgather'] / mean_bytes['ours'] if mean_bytes['ours'] else float('inf'),
            'mean_box_share': statistics.fmean(first['box_share']),
        })
    return rows


def run_exchange(worlds: Sequence[int], shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0,
                 threads: int = 1) -> list[dict[str, Any]]:
    """Spawn ``W`` gloo ranks for each ``W`` in ``worlds`` and time both ways of mixing globally."""
    rows = []
    for world in worlds:
        per_rank = _spawn_ranks(_exchange_rank, world, (list(shapes), iters, warmup, seed), threads=threads)
        rows += _combine_exchange(world, per_rank)
    return rows


def _exchange_markdown(rows: Sequence[dict[str, Any]], note: str = '') -> str:
    table = _md_table(
        ['W', 'shape (per rank)', 'box share', 'ours (ms)', 'all-gather (ms)', 'time all-gather/ours',
         'ours MB sent/rank', 'all-gather MB sent/rank', 'bytes all-gather/ours'],
        [[r['world'], _shape_str(r['shape']), r['mean_box_share'], r['median_s']['ours'] * 1e3,
          r['median_s']['allgather'] * 1e3, r['time_ratio'], r['bytes_per_rank']['ours'] / 1e6,
          r['bytes_per_rank']['allgather'] / 1e6, r['bytes_ratio']] for r in rows],
    )
    return '\n\n'.join(x for x in [
        '### The exchange: global mixing, median ms per step (slowest rank) and bytes each rank sends', note, table,
    ] if x)


# ============================================================================ part 3: the training step


def _make_net(model: str) -> torch.nn.Module:
    if model == 'resnet18':
        import torchvision

        return torchvision.models.resnet18(num_classes=NUM_CLASSES)
    if model == 'tiny':
        nn = torch.nn
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))
    raise ValueError(f"model must be 'resnet18' or 'tiny', got {model!r}")


def _step_rank(rank: int, world: int, mode: str, batch_size: int, batches: int, warmup: int, rounds: int,
               model: str, seed: int) -> dict[str, Any]:
    """Train with and without CutMix on this rank; per-batch seconds of every run.

    Runs, each in a fresh ``Trainer`` on the same data and initial weights: ``rounds`` x
    (``without``, ``with``) of ``warmup + batches`` batches, then one ``alternating`` run of
    ``warmup + 2 * batches`` batches where CutMix mixes only the odd batches, so each mixed batch
    has an unmixed neighbour that ran under the same background load.
    """
    from composer import Callback, Trainer
    from composer.core import Event
    from composer.models import ComposerClassifier
    from composer.utils import dist as composer_dist
    from torch.utils.data import DataLoader, TensorDataset

    from dist_cutmix import CutMix

    class StepTimer(Callback):
        """``BEFORE_DATALOADER`` -> ``BATCH_END`` (the whole step, CutMix included) and ``BATCH_START`` -> ``BATCH_END``."""

        def __init__(self) -> None:
            self.step: list[float] = []
            self.inner: list[float] = []
            self.batch: list[int] = []
            self._t0 = self._t1 = 0.0

        def before_dataloader(self, state: Any, logger: Any) -> None:
            self._t0 = time.perf_counter()

        def batch_start(self, state: Any, logger: Any) -> None:
            self._t1 = time.perf_counter()

        def batch_end(self, state: Any, logger: Any) -> None:
            now = time.perf_counter()
            self.step.append(now - self._t0)
            self.inner.append(now - self._t1)
            self.batch.append(int(state.timestamp.batch) - 1)  # BATCH_END comes after the counter moved on

    class TimedCutMix(CutMix):
        """Our ``CutMix``, timing its own work at ``AFTER_DATALOADER``; with ``odd_only``, it mixes odd batches only."""

        def __init__(self, *args: Any, odd_only: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.odd_only = odd_only
            self.mix_s: list[float] = []

        def match(self, event: Event, state: Any) -> bool:
            if event == Event.AFTER_DATALOADER and self.odd_only and int(state.timestamp.batch) % 2 == 0:
                return False
            return super().match(event, state)

        def apply(self, event: Event, state: Any, logger: Any) -> None:
            t0 = time.perf_counter()
            super().apply(event, state, logger)
            if event == Event.AFTER_DATALOADER:
                self.mix_s.append(time.perf_counter() - t0)

    answer_cpuinfo_from_constant()  # Composer's CPU query costs ~1 s of start-up, no effect on steps
    logging.getLogger('dist_cutmix').setLevel(logging.ERROR)  # the metric-wrapping notice, once per Trainer
    g = torch.Generator().manual_seed(seed)
    start = warmup + warmup % 2  # alternating pairs (even: plain, odd: mixed) start on an even batch
    longest = start + 2 * batches
    n = world * batch_size * longest
    dataset = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))

    def train(algorithms: list[Any], total: int) -> StepTimer:
        torch.manual_seed(seed)
        net = _make_net(model)
        loader = DataLoader(dataset, batch_size=batch_size, drop_last=True,
                            sampler=composer_dist.get_sampler(dataset, shuffle=False))
        timer = StepTimer()
        trainer = Trainer(
            model=ComposerClassifier(net, num_classes=NUM_CLASSES),
            train_dataloader=loader,
            max_duration=f'{total}ba',
            train_subset_num_batches=total,
            optimizers=torch.optim.SGD(net.parameters(), lr=0.01),
            algorithms=algorithms,
            callbacks=[timer],
            seed=seed,
            device='cpu',
            progress_bar=False,
            log_to_console=False,
            dist_timeout=120,
        )
        trainer.fit()
        trainer.close()
        return timer

    runs: dict[str, dict[str, list[Any]]] = {v: {'step': [], 'inner': [], 'mix': []} for v in ('without', 'with')}
    for _ in range(rounds):
        timer = train([], warmup + batches)
        runs['without']['step'] += timer.step[warmup:]
        runs['without']['inner'] += timer.inner[warmup:]
        cutmix = TimedCutMix(mode=mode, num_classes=NUM_CLASSES)
        timer = train([cutmix], warmup + batches)
        runs['with']['step'] += timer.step[warmup:]
        runs['with']['inner'] += timer.inner[warmup:]
        runs['with']['mix'] += cutmix.mix_s[warmup:]
    cutmix = TimedCutMix(mode=mode, num_classes=NUM_CLASSES, odd_only=True)
    timer = train([cutmix], start + 2 * batches)
    runs['alternating'] = {'step': timer.step[start:], 'batch': timer.batch[start:]}
    return runs


def _combine_step(mode: str, world: int, batch_size: int, model: str,
                  per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per batch, the slowest rank (ranks wait for each other in DDP); shares from medians."""
    def slowest(variant: str, key: str) -> list[float]:
        return [max(vals) for vals in zip(*(r[variant][key] for r in per_rank))]

    step = {v: slowest(v, 'step') for v in ('without', 'with')}
    inner = {v: slowest(v, 'inner') for v in ('without', 'with')}
    mix = slowest('with', 'mix')
    alternating = slowest('alternating', 'step')
    batch = per_rank[0]['alternating']['batch']
    plain = [t for t, b in zip(alternating, batch) if b % 2 == 0]
    mixed = [t for t, b in zip(alternating, batch) if b % 2 == 1]
    base = _median(step['without'])
    plain_median = _median(plain)
    return {
        'mode': mode, 'world': world, 'batch_per_rank': batch_size, 'model': model,
        'median_step_s': {v: _median(s) for v, s in step.items()},
        'median_inner_s': {v: _median(s) for v, s in inner.items()},
        'median_mix_s': _median(mix),
        # (with - without) / without over neighbouring batches of one run: robust to slow load changes
        'share': _median([m - p for p, m in zip(plain, mixed)]) / plain_median,
        # the same estimate on the run without CutMix (odd vs even batches): what noise alone gives
        'null_share': _median([b - a for a, b in zip(step['without'][0::2], step['without'][1::2])]) / base,
        # the same over separate runs: exposed to the load of a shared machine
        'separate_runs_share': (_median(step['with']) - base) / base,
        'direct_share': _median(mix) / base,
        'alternating_median_s': {'plain': plain_median, 'mixed': _median(mixed)},
        'step_s': step, 'inner_s': inner, 'mix_s': mix, 'alternating_s': {'plain': plain, 'mixed': mixed},
    }


def run_step(batch_size: int, batches: int, *, warmup: int = 2, rounds: int = 1, model: str = 'resnet18',
             seed: int = 0, threads: int = 1) -> list[dict[str, Any]]:
    """CutMix's share of a Composer training step: local on one rank, global on two (same global batch)."""
    rows = []
    for mode, world in (('local', 1), ('global', 2)):
        per_rank_batch = max(1, batch_size // world)
        per_rank = _spawn_ranks(_step_rank, world, (mode, per_rank_batch, batches, warmup, rounds, model, seed),
                                threads=threads, deadline_s=1800.0)
        rows.append(_combine_step(mode, world, per_rank_batch, model, per_rank))
    return rows


def _step_markdown(rows: Sequence[dict[str, Any]]) -> str:
    table = _md_table(
        ['mode', 'ranks x batch', 'model', 'step without (ms)', 'step with (ms)',
         'CutMix share, alternating batches', 'same estimate, no CutMix (noise)', 'CutMix share, separate runs',
         'CutMix own time (ms)',
         'own time / step', 'BATCH_START->END without / with (ms)'],
        [[r['mode'], f"{r['world']} x {r['batch_per_rank']}", r['model'], r['median_step_s']['without'] * 1e3,
          r['median_step_s']['with'] * 1e3, f"{r['share']:+.2%}", f"{r['null_share']:+.2%}",
          f"{r['separate_runs_share']:+.2%}",
          r['median_mix_s'] * 1e3, f"{r['direct_share']:.2%}",
          f"{r['median_inner_s']['without'] * 1e3:.0f} / {r['median_inner_s']['with'] * 1e3:.0f}"] for r in rows],
    )
    return '\n\n'.join([
        "### The training step: CutMix's share (Composer Trainer, CPU; median over batches, slowest rank)",
        'A step is timed `BEFORE_DATALOADER` -> `BATCH_END`; CutMix runs at `AFTER_DATALOADER`, before '
        '`BATCH_START`, so the `BATCH_START -> BATCH_END` window (last column) never sees it. '
        '"Alternating batches": one run that mixes only odd batches; the share is the median difference '
        'between each mixed batch and the unmixed one before it, over the unmixed median; the same estimate '
        'on the run without CutMix shows the noise. "Separate runs": '
        'median of a run with CutMix against a run without. "Own time": the algorithm\'s `AFTER_DATALOADER` '
        'call alone (in global mode it includes waiting for the other rank at the first collective).',
        table,
    ])


# ============================================================================ ranks


def _spawn_ranks(fn: Callable[..., Any], world: int, args: tuple[Any, ...], *, threads: int = 1,
                 deadline_s: float = 900.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks (:func:`launch.spawn.run_ranks`), in a temp dir."""
    with tempfile.TemporaryDirectory(prefix='dist_cutmix_bench_') as workdir:
        return run_ranks(fn, world, workdir, *args, threads=threads, deadline_s=deadline_s, collective_timeout_s=120.0)


def _launched_world() -> int:
    """World size given by a launcher (``composer -n N``), 1 when run alone."""
    return int(os.environ.get('WORLD_SIZE', '1'))


# ============================================================================ report


def _targets(op: Sequence[dict[str, Any]], exchange: Sequence[dict[str, Any]],
             step: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured value (``None`` where this run did not measure it)."""
    def find(rows: Sequence[dict[str, Any]], **kw: Any) -> Optional[dict[str, Any]]:
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)

    measured: dict[str, Optional[float]] = dict.fromkeys(TARGETS)
    row = find(op, shape=[64, 3, 224, 224], layout='float32')
    if row:
        measured['op_vs_composer'] = row['ratio']['composer/ours']
    if op:
        measured['op_vs_peers'] = min(r['ratio']['min peer/ours'] for r in op)
        measured['op_vs_floor'] = max(r['ratio']['ours/floor'] for r in op)
    row = find(exchange, world=4, shape=[32, 3, 224, 224])
    if row:
        measured['exchange_time'] = row['time_ratio']
        measured['exchange_bytes'] = row['bytes_ratio']
    for mode in ('local', 'global'):
        row = find(step, mode=mode)
        if row:
            measured[f'step_{mode}'] = row['share']
    out = []
    for key, (what, op_, bound) in TARGETS.items():
        value = measured[key]
        met = None if value is None else {'>=': value >= bound, '>': value > bound, '<=': value <= bound,
                                          '<': value < bound}[op_]
        out.append({'key': key, 'what': what, 'target': f'{op_} {bound:g}', 'measured': value, 'met': met})
    return out


def _targets_markdown(targets: Sequence[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        value = t['measured']
        shown = 'not measured' if value is None else (f'{value:+.2%}' if t['key'].startswith('step') else f'{value:.3g}')
        rows.append([t['what'], t['target'], shown, {None: '-', True: 'met', False: '**missed**'}[t['met']]])
    return '### Targets\n\n' + _md_table(['target', 'wanted', 'measured', ''], rows)


def _environment(threads: int) -> dict[str, Any]:
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
    return env


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', choices=['op', 'exchange', 'step', 'all'], default='all', help='what to measure')
    p.add_argument('--quick', action='store_true', help='tiny sizes and few iterations (a smoke run)')
    p.add_argument('--iters', type=int, default=None,
                   help='iterations per measurement: op calls, exchange steps, measured train batches')
    p.add_argument('--threads', type=int, default=1,
                   help='torch.set_num_threads, here and in every spawned rank (default 1: one core per rank)')
    p.add_argument('--op-shapes', type=_parse_shapes, default=None, help='e.g. 256x3x32x32,64x3x224x224')
    p.add_argument('--layouts', default=','.join(LAYOUTS), help=f'op layouts, from {",".join(LAYOUTS)}')
    p.add_argument('--exchange-shapes', type=_parse_shapes, default=None, help='per-rank batch shapes')
    p.add_argument('--worlds', default=None, help='exchange world sizes, e.g. 2,4')
    p.add_argument('--step-batch-size', type=int, default=None, help='global batch of the train step')
    p.add_argument('--step-model', choices=['resnet18', 'tiny'], default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', type=Path, default=None, help='write all measurements here')
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.op_shapes = args.op_shapes or base['op_shapes']
    args.exchange_shapes = args.exchange_shapes or base['exchange_shapes']
    args.worlds = [int(w) for w in args.worlds.split(',')] if args.worlds else base['worlds']
    args.layouts = [s.strip() for s in args.layouts.split(',')]
    bad = [s for s in args.layouts if s not in LAYOUTS]
    if bad:
        p.error(f'unknown layouts {bad}; choose from {list(LAYOUTS)}')
    if args.iters is not None and args.iters < 1:
        p.error(f'--iters must be >= 1, got {args.iters}')
    if any(w < 2 for w in args.worlds):
        p.error(f'--worlds must all be >= 2, got {args.worlds}')
    args.op_iters = args.iters or base['op_iters']
    args.exchange_iters = args.iters or base['exchange_iters']
    args.step_batches = args.iters or base['step_batches']
    args.step_batch_size = args.step_batch_size or base['step_batch_size']
    args.step_model = args.step_model or base['step_model']
    args.step_warmup, args.step_rounds = base['step_warmup'], base['step_rounds']
    args.warmup = 1 if args.quick else 2
    return args


def _main_launched(args: argparse.Namespace) -> dict[str, Any]:
    """Under ``composer -n N``: the exchange at this world size, on the launcher's process group."""
    if args.part != 'exchange':
        raise SystemExit(f'under a launcher (WORLD_SIZE={_launched_world()}) only --part exchange runs; '
                         f'got --part {args.part}. Run the other parts as `python launch/benchmark.py`.')
    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group('gloo', timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _exchange_rank(rank, world, args.exchange_shapes, args.exchange_iters, args.warmup, args.seed)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    rows = _combine_exchange(world, gathered)
    report = {'environment': _environment(args.threads), 'exchange': rows,
              'targets': _targets([], rows, [])}
    if rank == 0:
        print(_exchange_markdown(rows, f'Ranks from the launcher (W = {world}), {args.threads} thread(s) each.'))
        measured = [t for t in report['targets'] if t['measured'] is not None]
        if measured:
            print()
            print(_targets_markdown(measured))
        _write_json(args.json, report)
    dist.barrier()
    dist.destroy_process_group()
    return report


def _write_json(path: Optional[Path], report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the chosen parts, print markdown, write JSON; return the report."""
    args = _parse_args(argv)
    if _launched_world() > 1:
        return _main_launched(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = _environment(args.threads)
    print(f"## dist_cutmix benchmark\n\ntorch {env['torch']}, composer {env['composer']}, timm {env['timm']}, "
          f"torchvision {env['torchvision']}; {env['cpu']}, {env['cpus']} CPUs; "
          f"torch.set_num_threads({args.threads}) in this process and in every spawned rank."
          f"{' Quick run (tiny sizes).' if args.quick else ''}\n", flush=True)
    op: list[dict[str, Any]] = []
    exchange: list[dict[str, Any]] = []
    step: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    if args.part in ('op', 'all'):
        t0 = time.perf_counter()
        op = run_op(args.op_shapes, args.op_iters, warmup=args.warmup, seed=args.seed, layouts=args.layouts)
        seconds['op'] = time.perf_counter() - t0
        print(_op_markdown(op) + '\n', flush=True)
    if args.part in ('exchange', 'all'):
        t0 = time.perf_counter()
        exchange = run_exchange(args.worlds, args.exchange_shapes, args.exchange_iters, warmup=args.warmup,
                                seed=args.seed, threads=args.threads)
        seconds['exchange'] = time.perf_counter() - t0
        print(_exchange_markdown(exchange, f'Spawned gloo ranks on this machine ({os.cpu_count()} CPUs), '
                                           f'{args.threads} thread(s) each.') + '\n', flush=True)
    if args.part in ('step', 'all'):
        t0 = time.perf_counter()
        step = run_step(args.step_batch_size, args.step_batches, warmup=args.step_warmup, rounds=args.step_rounds,
                        model=args.step_model, seed=args.seed, threads=args.threads)
        seconds['step'] = time.perf_counter() - t0
        print(_step_markdown(step) + '\n', flush=True)
    targets = _targets(op, exchange, step)
    seconds['total'] = time.perf_counter() - started
    print(_targets_markdown(targets))
    print(f"\nRun time: {seconds['total']:.0f} s (" + ', '.join(f'{k} {v:.0f} s' for k, v in seconds.items()
                                                        if k != 'total') + ').')
    report = {'environment': env, 'args': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              'op': op, 'exchange': exchange, 'step': step, 'targets': targets, 'seconds': seconds}
    _write_json(args.json, report)
    return report


if __name__ == '__main__':
    main()
