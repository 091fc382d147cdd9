"""The ``exchange`` part of ``launch/benchmarks/benchmark.py``: global mixing, our exchange against all-gather.

Global mixing on W gloo ranks: our crop ``all_to_all`` (:func:`mix_batch_across_group`)
against all-gathering the global batch and mixing locally with the same box, λ and
permutation. A step's time is the slowest rank's; bytes are those a rank sends to others.

Per-sample boxes (``row['per_sample']``, timed in a loop of their own): our per-sample global
exchange (``mix_batch_across_group(..., per_sample=True)``) against our batch mode at the same
mean λ: for each step, the batch index (from a pool of candidates) whose batch-mode λ is closest to
the mean λ of that step's per-sample draw. The per-sample result is first checked against
all-gathering the global batch and mixing it locally with the same draw. Bytes are checked against
what must cross ranks, computed from the draw alone: for every sample whose partner lives on
another rank, the partner's rank sends ``C * area(the sample's box) * element size`` plus the label.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dist_cutmix import functional as F
from dist_cutmix.draw import MixParams, PerSampleMixParams, box_areas
from dist_cutmix.pixels import gather_crops, paste_crops
from dist_cutmix.pixels_per_sample import apply_per_sample, gather_box_pixels, paste_box_pixels
from dist_cutmix.targets import mix_targets, mix_targets_per_sample
from launch.benchmarks.bench_common import NUM_CLASSES, Shape, md_table, median, paired_ratio, shape_str, spawn_ranks

__all__ = ['combine_exchange', 'exchange_markdown', 'exchange_rank', 'per_sample_markdown', 'required_bytes',
           'run_exchange']


def _allgather_mix(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, ybuf: torch.Tensor, params: MixParams,
                   rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward global CutMix (or MixUp: ``params.weight < 1``): all-gather the global batch, then
    mix locally (in place)."""
    dist.all_gather(list(buf.chunk(world)), x.contiguous())
    dist.all_gather(list(ybuf.chunk(world)), y)
    b = x.shape[0]
    partners = params.indices[rank * b:(rank + 1) * b]
    paste_crops(x, gather_crops(buf, partners, params.box), params.box, inplace=True, weight=params.weight)
    target = mix_targets(y, ybuf[partners], params.lam, params.box, kind='index', num_classes=NUM_CLASSES,
                           weight=params.weight)
    return x, target


MATCH_CANDIDATES = 400  # batch-mode draws to pick from for the per-sample rows' "same mean λ"
MATCH_FIRST_BATCH = 1_000_000  # their batch indices start here, away from the timed ones


def required_bytes(params: PerSampleMixParams, rank: int, batch: int, channels: int, elem: int, label: int) -> int:
    """Bytes ``rank`` must send for one per-sample draw over ranks of ``batch`` samples each: for every
    sample on another rank whose partner is on ``rank``, the crop in the sample's box and one label."""
    n = len(params.indices)
    owner = torch.arange(n) // batch
    partner_owner = params.indices // batch
    boxes = params.boxes
    area = box_areas(boxes)
    crossing = (partner_owner == rank) & (owner != rank)
    return int((area[crossing] * channels * elem + label).sum())


def _allgather_mix_per_sample(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, ybuf: torch.Tensor,
                              params: PerSampleMixParams, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample reference: all-gather the global batch, mix it in one process, keep this rank's rows."""
    dist.all_gather(list(buf.chunk(world)), x.contiguous())
    dist.all_gather(list(ybuf.chunk(world)), y)
    b = x.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    mixed = apply_per_sample(buf, params)[mine]
    target = mix_targets_per_sample(y, ybuf[params.indices[mine]], params.lam[mine], params.boxes[mine],
                                      kind='index', num_classes=NUM_CLASSES)
    return mixed, target


def _per_sample_rank(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, ybuf: torch.Tensor, rank: int, world: int,
                     iters: int, warmup: int, seed: int, handshake: int) -> dict[str, Any]:
    """Per-sample global mixing against batch mode at the same mean λ, on this rank."""
    from dist_cutmix.distributed import group_stream_key
    from dist_cutmix.mixer import mix_batch_across_group
    from dist_cutmix.randomness import batch_generator

    b, c, h, w = x.shape
    key = group_stream_key(None)

    def draw(batch: int) -> PerSampleMixParams:  # what mix_batch_across_group(per_sample=True) draws
        return F.sample_params_per_sample(world * b, h, w, alpha=1.0, generator=batch_generator(seed, batch, *key))

    candidates = [(F.sample_params(world * b, h, w, alpha=1.0, generator=batch_generator(seed, j, *key)).lam, j)
                  for j in range(MATCH_FIRST_BATCH, MATCH_FIRST_BATCH + MATCH_CANDIDATES)]

    batch0 = next(i for i in range(100) if float(draw(i).lam.min()) < 1.0)
    ref = mix_batch_across_group(x.clone(), y, seed=seed, batch=batch0, num_classes=NUM_CLASSES, inplace=True,
                                 per_sample=True)
    alt_x, alt_y = _allgather_mix_per_sample(x.clone(), y, buf, ybuf, draw(batch0), rank, world)
    if not torch.equal(ref.input, alt_x) or not torch.allclose(ref.target, alt_y):
        raise RuntimeError(f'rank {rank}: per-sample all-gather mixing differs from ours for shape {tuple(x.shape)}; '
                           'the benchmark would compare different work')

    names = ('ours per-sample', 'ours batch (same mean λ)')
    times: dict[str, list[float]] = {n: [] for n in names}
    payload: dict[str, list[int]] = {n: [] for n in names}  # MixResult.bytes_sent (no handshake)
    required, lam_ps, lam_batch = [], [], []
    for i in range(warmup + iters):
        params = draw(i)
        mean_lam = float(params.lam.mean())
        lam_b, j = min(candidates, key=lambda cand: abs(cand[0] - mean_lam))
        for name in (names if i % 2 == 0 else names[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            if name == names[0]:
                r = mix_batch_across_group(x, y, seed=seed, batch=i, num_classes=NUM_CLASSES, inplace=True,
                                           per_sample=True)
            else:
                r = mix_batch_across_group(x, y, seed=seed, batch=j, num_classes=NUM_CLASSES, inplace=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
                payload[name].append(r.bytes_sent)
        if i >= warmup:
            required.append(required_bytes(params, rank, b, c, x.element_size(), y.element_size()))
            lam_ps.append(mean_lam)
            lam_batch.append(lam_b)
    return {'times_s': times, 'payload': payload, 'handshake': handshake, 'required': required,
            'mean_lam': {'per-sample': lam_ps, 'batch': lam_batch}}


def _exchange_calls(x: torch.Tensor, y: torch.Tensor, world: int,
                    seed: int) -> tuple[Callable[[int], MixParams], Callable[[int], tuple[Any, int]]]:
    """``params_of(batch)``, what :func:`mix_batch_across_group` draws for a batch index, and ``ours(batch)``,
    which mixes ``x`` and ``y`` globally in place and returns the result and its ``bytes_sent``."""
    from dist_cutmix.distributed import group_stream_key
    from dist_cutmix.mixer import mix_batch_across_group
    from dist_cutmix.randomness import batch_generator

    b, _, h, w = x.shape

    def params_of(batch: int) -> MixParams:
        return F.sample_params(world * b, h, w, alpha=1.0,
                               generator=batch_generator(seed, batch, *group_stream_key(None)))

    def ours(batch: int) -> tuple[Any, int]:
        r = mix_batch_across_group(x, y, seed=seed, batch=batch, num_classes=NUM_CLASSES, inplace=True)
        return r, r.bytes_sent

    return params_of, ours


def exchange_rank(rank: int, world: int, shapes: Sequence[Shape], iters: int, warmup: int,
                   seed: int) -> list[dict[str, Any]]:
    """This rank's side of the exchange benchmark: per shape, per-iteration seconds and bytes."""
    from dist_cutmix.mixer import mix_batch_across_group

    out = []
    for shape in shapes:
        b, c, h, w = shape
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        x = torch.rand(shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
        buf = torch.empty((world * b, c, h, w), dtype=x.dtype)
        ybuf = torch.empty(world * b, dtype=y.dtype)
        params_of, ours = _exchange_calls(x, y, world, seed)

        # Same work: both must give the same pixels and targets for the same batch index.
        batch0 = next(i for i in range(100) if params_of(i).lam < 1.0)
        ref = mix_batch_across_group(x.clone(), y, seed=seed, batch=batch0, num_classes=NUM_CLASSES, inplace=True)
        alt_x, alt_y = _allgather_mix(x.clone(), y, buf, ybuf, params_of(batch0), rank, world)
        if (ref.box != params_of(batch0).box or not torch.equal(ref.input, alt_x)
                or not torch.allclose(ref.target, alt_y)):
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
        per_sample = _per_sample_rank(x, y, buf, ybuf, rank, world, iters, warmup, seed, handshake)
        out.append({'shape': list(shape), 'times_s': times, 'bytes': sent, 'box_share': box_share,
                    'per_sample': per_sample})
        del x, buf, ours  # ours holds x too
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
            'per_sample': _combine_per_sample([r[k]['per_sample'] for r in per_rank]),
        })
    return rows


def _combine_per_sample(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Slowest rank per step; bytes (payload plus handshake) against what must cross, over ranks and steps."""
    first = per_rank[0]
    names = list(first['times_s'])
    steps = len(first['times_s'][names[0]])
    step = {n: [max(r['times_s'][n][i] for r in per_rank) for i in range(steps)] for n in names}
    sent = {n: [v + r['handshake'] for r in per_rank for v in r['payload'][n]] for n in names}
    required = [v for r in per_rank for v in r['required']]
    payload = [v for r in per_rank for v in r['payload'][names[0]]]
    ratios = [s / q for s, q in zip(sent[names[0]], required, strict=True) if q]
    return {
        'median_s': {n: median(v) for n, v in step.items()},
        'step_s': step,
        'time_ratio': paired_ratio(step[names[0]], step[names[1]]),  # per-sample / batch
        'bytes_per_rank': {n: statistics.fmean(v) for n, v in sent.items()},
        'required_per_rank': statistics.fmean(required),
        'payload_equals_required': payload == required,
        'bytes_ratio': sum(sent[names[0]]) / sum(required) if sum(required) else float('inf'),
        'bytes_ratio_max': max(ratios) if ratios else float('nan'),
        'mean_lam': {k: statistics.fmean(v) for k, v in first['mean_lam'].items()},
        'max_lam_gap': max(abs(a - b)
                           for a, b in zip(first['mean_lam']['per-sample'], first['mean_lam']['batch'], strict=True)),
    }


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
    parts = ['### The exchange: global mixing, median ms per step (slowest rank) and bytes each rank sends', note,
             table]
    ps_rows = [r for r in rows if r.get('per_sample')]
    if ps_rows:
        parts += ['### The exchange with per-sample boxes, against batch mode at the same mean λ', PS_INTRO,
                  per_sample_markdown(ps_rows)]
    return '\n\n'.join(x for x in parts if x)


PS_INTRO = ('`per-sample` = `mix_batch_across_group(..., per_sample=True)`; `batch` = batch mode on the batch index '
            "whose λ is closest to the step's mean per-sample λ (`mean λ` per-sample / batch, largest gap in a step). "
            '`must cross` = crops (C·area of each box) and labels of the samples whose partner is on another rank; '
            '`sent / must cross` = `bytes_sent` plus the 24-byte handshake per peer, over all ranks and steps '
            '(max over rank-steps in brackets).')


def per_sample_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The per-sample table of the exchange rows that have one."""
    return md_table(
        ['W', 'shape (per rank)', 'mean λ (gap)', 'per-sample (ms)', 'batch (ms)', 'time per-sample/batch',
         'per-sample MB sent/rank', 'batch MB sent/rank', 'must cross MB/rank', 'sent / must cross'],
        [[r['world'], shape_str(r['shape']),
          f"{p['mean_lam']['per-sample']:.3f} / {p['mean_lam']['batch']:.3f} ({p['max_lam_gap']:.2g})",
          p['median_s']['ours per-sample'] * 1e3, p['median_s']['ours batch (same mean λ)'] * 1e3, p['time_ratio'],
          p['bytes_per_rank']['ours per-sample'] / 1e6, p['bytes_per_rank']['ours batch (same mean λ)'] / 1e6,
          p['required_per_rank'] / 1e6, f"{p['bytes_ratio']:.5f} ({p['bytes_ratio_max']:.5f})"]
         for r in rows for p in [r['per_sample']]],
    )


# ============================================================================ MixUp and MixUpCutMix

MIXUP_MODES = ('mixup', 'mixupcutmix per-sample')
MIXUP_WAYS = ('ours', 'allgather', 'all_to_all')


def _mix_spec(mode: str) -> Any:
    from dist_cutmix.spec import MixSpec
    from launch.benchmarks.bench_op import MIXUP_ALPHA, MIXUPCUTMIX

    return MixSpec.mixup(MIXUP_ALPHA) if mode == 'mixup' else MixSpec(**MIXUPCUTMIX)


def _as_per_sample(params: Any, height: int, width: int) -> PerSampleMixParams:
    """A batch draw as one region and weight per sample (a MixUp whose weight is 0 moves no pixels)."""
    if isinstance(params, PerSampleMixParams):
        return params
    n = len(params.indices)
    box = params.box if params.weight > 0 else (0, 0, 0, 0)
    return PerSampleMixParams(torch.tensor([box] * n), torch.full((n,), params.lam, dtype=torch.float64),
                             params.indices, torch.full((n,), params.weight, dtype=torch.float64))


def _allgather_mix_rows(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, ybuf: torch.Tensor,
                        params: PerSampleMixParams, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather the global batch, then mix this rank's rows only (in place): each takes its partner's
    pixels in its region, pasted or blended at its weight, as ours does when they arrive."""
    dist.all_gather(list(buf.chunk(world)), x.contiguous())
    dist.all_gather(list(ybuf.chunk(world)), y)
    b = x.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    partners, boxes = params.indices[mine], params.boxes[mine]
    weights = None if params.weights is None else params.weights[mine]
    rows = torch.arange(b)
    paste_box_pixels(x, rows, gather_box_pixels(buf, partners, boxes), boxes, weights)
    target = mix_targets_per_sample(y, ybuf[partners], params.lam[mine], boxes, kind='index',
                                      num_classes=NUM_CLASSES)
    return x, target


def _split_bytes(params: PerSampleMixParams, rank: int, world: int, b: int, pixel_bytes: int,
                 label_bytes: int) -> tuple[list[int], list[int]]:
    """Bytes this rank sends to and receives from each rank (itself included) in our exchange of ``params``:
    per row its region's pixels and its label, computed from the draw."""
    from dist_cutmix.distributed import ExchangePlan

    sizes = [b] * world
    plan = ExchangePlan.build(params.indices, sizes, rank)

    def by_rank(boxes: torch.Tensor, ranks: torch.Tensor) -> list[int]:
        per_row = box_areas(boxes) * pixel_bytes + label_bytes
        return torch.bincount(ranks, weights=per_row.double(), minlength=world).long().tolist()

    dest = torch.repeat_interleave(torch.arange(world), torch.tensor(plan.send_counts))
    mine = params.boxes[rank * b:(rank + 1) * b]
    src = (plan.partners // b)[plan.recv_order]
    return by_rank(params.boxes[plan.send_dest], dest), by_rank(mine[plan.recv_order], src)


def mixup_exchange_rank(rank: int, world: int, shapes: Sequence[Shape], iters: int, warmup: int,
                        seed: int) -> list[dict[str, Any]]:
    """This rank's side of the MixUp exchange rows: per shape and mode, per-step seconds and bytes of ours,
    all-gather and a bare ``all_to_all_single`` of our byte counts, and the bytes that must cross."""
    from dist_cutmix import sample_mix
    from dist_cutmix.distributed import group_stream_key
    from dist_cutmix.mixer import mix_batch_across_group
    from dist_cutmix.randomness import batch_generator

    key = group_stream_key(None)
    out = []
    for shape in shapes:
        b, c, h, w = shape
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        x = torch.rand(shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
        buf = torch.empty((world * b, c, h, w), dtype=x.dtype)
        ybuf = torch.empty(world * b, dtype=y.dtype)
        elem, label = x.element_size(), y.element_size()
        send_buf = torch.empty(world * b * (c * h * w * elem + label), dtype=torch.uint8)
        recv_buf = torch.empty_like(send_buf)
        handshake = (world - 1) * 3 * 8  # agree_on_batch's all_gather of 3 int64 per rank (not in bytes_sent)
        allgather_bytes = (world - 1) * b * (c * h * w * elem + label)
        for mode in MIXUP_MODES:
            spec, per_sample = _mix_spec(mode), mode != 'mixup'

            def draw(batch: int) -> Any:  # what mix_batch_across_group draws for this batch index
                return sample_mix(spec, world * b, h, w, per_sample=per_sample,  # noqa: B023
                                  generator=batch_generator(seed, batch, *key))

            # batch MixUp: only batch indices that do blend (a partner weight rounded to 0 moves labels only)
            batches = [i for i in range(4 * (iters + warmup) + 100)
                       if per_sample or draw(i).weight > 0][:iters + warmup + 1]
            check = batches.pop()
            ref = mix_batch_across_group(x.clone(), y, seed=seed, batch=check, num_classes=NUM_CLASSES, inplace=True,
                                         per_sample=per_sample, spec=spec)
            alt_x, alt_y = _allgather_mix_rows(x.clone(), y, buf, ybuf, _as_per_sample(draw(check), h, w), rank, world)
            if not torch.equal(ref.input, alt_x) or not torch.allclose(ref.target, alt_y, rtol=0, atol=1e-6):
                raise RuntimeError(f'rank {rank}: all-gather {mode} differs from ours for shape {shape}; '
                                   'the benchmark would compare different work')
            times: dict[str, list[float]] = {k: [] for k in MIXUP_WAYS}
            sent: dict[str, list[int]] = {k: [] for k in MIXUP_WAYS}
            required, weights = [], []
            for i, batch in enumerate(batches):
                params = draw(batch)
                as_ps = _as_per_sample(params, h, w)
                send_bytes, recv_bytes = _split_bytes(as_ps, rank, world, b, c * elem, label)
                k = i % len(MIXUP_WAYS)
                for way in MIXUP_WAYS[k:] + MIXUP_WAYS[:k]:
                    dist.barrier()
                    t0 = time.perf_counter()
                    if way == 'ours':
                        nbytes = mix_batch_across_group(x, y, seed=seed, batch=batch, num_classes=NUM_CLASSES,
                                                        inplace=True, per_sample=per_sample, spec=spec).bytes_sent
                        nbytes += handshake
                    elif way == 'allgather':
                        if per_sample:
                            _allgather_mix_rows(x, y, buf, ybuf, params, rank, world)
                        else:
                            _allgather_mix(x, y, buf, ybuf, params, rank, world)
                        nbytes = allgather_bytes
                    else:
                        dist.all_to_all_single(recv_buf[:sum(recv_bytes)], send_buf[:sum(send_bytes)],
                                               output_split_sizes=recv_bytes, input_split_sizes=send_bytes)
                        nbytes = sum(send_bytes) - send_bytes[rank]
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        times[way].append(dt)
                        sent[way].append(nbytes)
                if i >= warmup:
                    required.append(required_bytes(as_ps, rank, b, c, elem, label))
                    weights.append(float(as_ps.weights.mean()) if as_ps.weights is not None else 1.0)
            out.append({'shape': list(shape), 'mode': mode, 'times_s': times, 'bytes': sent, 'required': required,
                        'handshake': handshake, 'mean_weight': weights})
        del x, buf, send_buf, recv_buf
    return out


def combine_mixup_exchange(world: int, per_rank: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A step takes as long as its slowest rank; bytes are averaged over ranks and steps."""
    rows = []
    for k, first in enumerate(per_rank[0]):
        steps = len(first['times_s']['ours'])
        step = {n: [max(r[k]['times_s'][n][i] for r in per_rank) for i in range(steps)] for n in MIXUP_WAYS}
        mean_bytes = {n: statistics.fmean(v for r in per_rank for v in r[k]['bytes'][n]) for n in MIXUP_WAYS}
        ours_sent = [v for r in per_rank for v in r[k]['bytes']['ours']]
        required = [v for r in per_rank for v in r[k]['required']]
        bare = [v + r[k]['handshake'] for r in per_rank for v in r[k]['bytes']['all_to_all']]
        rows.append({
            'world': world, 'shape': first['shape'], 'mode': first['mode'],
            'median_s': {n: median(v) for n, v in step.items()},
            'step_s': step,
            'bytes_per_rank': mean_bytes,
            'required_per_rank': statistics.fmean(required),
            'time_ratio': paired_ratio(step['allgather'], step['ours']),
            'a2a_ratio': paired_ratio(step['ours'], step['all_to_all']),
            'bytes_ratio': mean_bytes['allgather'] / mean_bytes['ours'] if mean_bytes['ours'] else float('inf'),
            'sent_over_required': sum(ours_sent) / sum(required) if sum(required) else float('inf'),
            'sent_equals_a2a': ours_sent == bare,
            'mean_weight': statistics.fmean(first['mean_weight']),
        })
    return rows


def run_mixup_exchange(worlds: Sequence[int], shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0,
                       threads: int = 1) -> list[dict[str, Any]]:
    """Spawn ``W`` gloo ranks for each ``W`` in ``worlds``: global MixUp and per-sample MixUpCutMix rows."""
    rows = []
    for world in worlds:
        per_rank = spawn_ranks(mixup_exchange_rank, world, (list(shapes), iters, warmup, seed), threads=threads)
        rows += combine_mixup_exchange(world, per_rank)
    return rows


MIXUP_EXCHANGE_INTRO = (
    '`ours` = `mix_batch_across_group(..., spec=...)`: `mixup` = `MixSpec.mixup(0.2)` (batch mode: each sample '
    "takes its partner's whole image; only batch indices whose partner weight is above 0 are timed), "
    '`mixupcutmix per-sample` = `MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)` with '
    "`per_sample=True` (a CutMix row takes its partner's box, a MixUp row the whole image). `all-gather` = "
    "`dist.all_gather` of the global batch and labels, then the same mix of this rank's rows; `a2a` = one bare "
    '`dist.all_to_all_single` of the byte counts ours sends and receives (pixels and labels, from the draw), '
    'no packing or mixing. A step costs its slowest rank; round robin within each step. `must cross` = pixels of '
    "each sample's region and its label, for every sample whose partner is on another rank, computed from the "
    "draw; `sent` = ours' `bytes_sent` plus the 24-byte batch handshake per peer. `mean m` = mean partner weight.")


def mixup_exchange_markdown(rows: Sequence[dict[str, Any]], note: str = '') -> str:
    table = md_table(
        ['W', 'shape (per rank)', 'mode', 'mean m', 'ours (ms)', 'all-gather (ms)', 'a2a (ms)',
         'time all-gather/ours', 'time ours/a2a', 'ours MB sent/rank', 'all-gather MB sent/rank',
         'bytes all-gather/ours', 'must cross MB/rank', 'sent / must cross'],
        [[r['world'], shape_str(r['shape']), r['mode'], r['mean_weight'], r['median_s']['ours'] * 1e3,
          r['median_s']['allgather'] * 1e3, r['median_s']['all_to_all'] * 1e3, r['time_ratio'], r['a2a_ratio'],
          r['bytes_per_rank']['ours'] / 1e6, r['bytes_per_rank']['allgather'] / 1e6, r['bytes_ratio'],
          r['required_per_rank'] / 1e6, f"{r['sent_over_required']:.5f}"] for r in rows])
    return '\n\n'.join(x for x in ['### MixUp and MixUpCutMix, the exchange: median ms per step (slowest rank) and '
                                   'bytes each rank sends', note, MIXUP_EXCHANGE_INTRO, table] if x)
