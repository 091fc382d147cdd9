"""The ``op`` part of ``launch/benchmarks/benchmark.py``: one CutMix of a batch against its peers and the floor.

One CutMix of a batch, per call, median over many pre-drawn boxes (Beta(1, 1)); every
implementation gets the same box and λ at the same iteration (Composer's and ours also the
same partners; timm pairs with ``x.flip(0)`` and torchvision with ``x.roll(1, 0)``, which their
APIs fix). The implementations run round-robin inside each iteration, so background load hits
all of them alike; ratios are medians of the per-iteration (same box) ratios. The floor is
one plain ``copy_`` of the box region (read once, written once), on the same tensors.
Batches of up to a million elements get 4x ``--iters`` calls (cheap, and relatively noisier).

Per-sample boxes (``row['per_sample']``, in a round-robin of their own): ours
(``apply_mix(x, per_sample_params, inplace=True)``, like ``ours`` on the same batch tensor),
timm's ``Mixup(mixup_alpha=0, cutmix_alpha=1, mode='elem')`` with each sample's box and λ pinned to
ours (partner ``x.flip(0)``, which its API fixes) and our batch mode with one box whose area is the
mean area of the per-sample boxes (same partners as ours). Each iteration's draw is shared by all
three; timm and ours are checked to give the same pixels first.

With ``--device cuda`` the batch, targets and partner indices live on the GPU and every
implementation (the same set) is timed by CUDA events around each call, started on an idle GPU
(:func:`launch.benchmarks.bench_common.time_round_robin`); the profile is still the host's (aten ops by
self CPU time: launch cost on a GPU), and page faults are the host process's.
"""
from __future__ import annotations

import os
import statistics
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dist_cutmix import functional as F
from dist_cutmix.draw import Box, MixParams, PerSampleMixParams, box_areas, kept_share
from dist_cutmix.pixels import apply_mix
from dist_cutmix.pixels_per_sample import apply_per_sample
from dist_cutmix.targets import mix_targets, mix_targets_per_sample
from launch.benchmarks.bench_common import (
    DEVICES,
    NUM_CLASSES,
    Shape,
    md_table,
    median,
    paired_ratio,
    shape_str,
    time_round_robin,
)
from launch.benchmarks.bench_common import check_device as common_check_device

__all__ = ['DEVICES', 'LAYOUTS', 'PS_IMPLS', 'check_device', 'op_markdown', 'per_sample_markdown', 'run_op']

LAYOUTS: dict[str, tuple[torch.dtype, bool]] = {  # name -> (dtype, channels_last)
    'float32': (torch.float32, False),
    'bfloat16': (torch.bfloat16, False),
    'channels_last': (torch.float32, True),
}

SMALL_BATCH_ELEMENTS = 1_000_000  # batches up to this many elements get SMALL_BATCH_ITERS x the iterations
SMALL_BATCH_ITERS = 4

IMPLS = ['floor', 'ours', 'ours+targets', 'ours cutmix_batch', 'composer', 'timm', 'torchvision']
# Per-sample boxes: every sample its own box and λ (one round-robin of their own, same draw for all).
PS_IMPLS = ['ours per-sample', 'ours per-sample+targets', 'timm elem', 'ours batch (mean area)']


def check_device(device: str) -> torch.device:
    """The op part's device: ``cpu``, or ``cuda`` where CUDA is available (see :func:`bench_common.check_device`)."""
    return common_check_device(device, 'the op part')


def _draw_params(n: int, h: int, w: int, count: int, seed: int, device: torch.device) -> list[MixParams]:
    """``count`` CutMix draws (Beta(1, 1) box, partners), from one explicit generator; partners on ``device``."""
    g = torch.Generator().manual_seed(seed)
    draws = [F.sample_params(n, h, w, alpha=1.0, generator=g) for _ in range(count)]
    if device.type == 'cpu':
        return draws
    return [MixParams(p.box, p.lam, p.indices.to(device)) for p in draws]


@contextmanager
def _pinned_timm(holder: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """timm's ``Mixup`` in CutMix-only mode, batch and elem, its boxes and λ pinned to ``holder``'s draw.

    timm draws from the global numpy RNG inside ``Mixup``; we replace only its draw functions, so
    its mixing code runs as written: in batch mode ``x[..., box] = x.flip(0)[..., box]`` in place;
    in elem mode a clone of the batch, then ``x[i][:, box_i] = x_orig[n-1-i][:, box_i]`` for every
    sample whose λ is not 1 (it asks for each such sample's box in turn, in sample order); then the
    target mix. Batch mode reads ``holder['box']`` and ``holder['lam']``; elem mode
    ``holder['elem_lam']`` (float32 λ per sample) and ``holder['elem_boxes']`` (box and λ of each
    sample whose λ is not 1, in order).
    """
    import timm.data.mixup as timm_mixup

    kw = dict(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=NUM_CLASSES)
    mixup = timm_mixup.Mixup(**kw)
    elem = timm_mixup.Mixup(mode='elem', **kw)

    def params_per_batch() -> tuple[float, bool]:
        holder['queue'] = None
        return holder['lam'], holder.get('use_cutmix', True)  # False: timm's MixUp blend (the MixUp rows)

    def params_per_elem(batch_size: int) -> tuple[Any, Any]:
        lam = holder['elem_lam']
        assert len(lam) == batch_size
        holder['queue'] = iter(holder['elem_boxes'])
        use_cutmix = holder.get('elem_cutmix', np.ones(batch_size, dtype=bool))  # False rows: MixUp blends
        return lam.copy(), use_cutmix  # timm writes the corrected λ into its array

    def bbox_and_lam(*args: Any, **kwargs: Any) -> tuple[Any, float]:
        queue = holder.get('queue')
        return next(queue) if queue is not None else (holder['box'], holder['lam'])

    mixup._params_per_batch = params_per_batch
    elem._params_per_elem = params_per_elem
    original = timm_mixup.cutmix_bbox_and_lam
    timm_mixup.cutmix_bbox_and_lam = bbox_and_lam
    try:
        yield mixup, elem
    finally:
        timm_mixup.cutmix_bbox_and_lam = original


def _timm_elem_draw(p: PerSampleMixParams) -> dict[str, Any]:
    """``holder`` entries that pin timm's elem mode to the per-sample draw ``p`` (made before timing)."""
    lam = p.lam.numpy().astype(np.float32)
    boxes = [(tuple(b), float(lam64)) for b, lam64, lam32 in zip(p.boxes.tolist(), p.lam.tolist(), lam, strict=True)
             if lam32 != 1.0]
    return {'elem_lam': lam, 'elem_boxes': boxes}


def _mean_area_box(boxes: torch.Tensor, height: int, width: int) -> Box:
    """One centred box of the image's aspect whose area is closest to the mean area of ``boxes``.

    Its height is within 2 rows of the aspect-true side, so it is as square as the batch boxes are.
    """
    area = float(box_areas(boxes).double().mean())
    side = min(round((area * height / width) ** 0.5), height)
    candidates = [(bh, min(width, round(area / bh)) if bh else 0)
                  for bh in range(max(side - 2, 0), min(side + 2, height) + 1)]
    bh, bw = min(candidates, key=lambda c: abs(c[0] * c[1] - area))
    y0, x0 = (height - bh) // 2, (width - bw) // 2
    return (y0, y0 + bh, x0, x0 + bw)


def _pinned_torchvision(holder: dict[str, Any]) -> Any:
    """torchvision's ``v2.CutMix``, its box and λ pinned to ``holder``'s draw (same transform code)."""
    from torchvision.transforms import v2

    cutmix = v2.CutMix(num_classes=NUM_CLASSES)

    def make_params(flat_inputs: list[Any]) -> dict[str, Any]:
        y0, y1, x0, x1 = holder['box']
        return {'box': (x0, y0, x1, y1), 'lam_adjusted': holder['lam']}

    cutmix.make_params = make_params
    return cutmix


def _check_same_work(x: torch.Tensor, y: torch.Tensor, p: MixParams, timm_mixup: Any, tv_cutmix: Any,
                     holder: dict[str, Any]) -> None:
    """Every implementation must produce the same pixels as ours for the same box and partners."""
    try:
        from composer.functional import cutmix_batch as composer_cutmix_batch
    except ImportError:  # no Composer: its peer is not timed either
        composer_cutmix_batch = None
    n = x.shape[0]
    holder.update(box=p.box, lam=p.lam)
    expect = apply_mix(x, p)
    flip = MixParams(p.box, p.lam, torch.arange(n, device=x.device).flip(0))
    roll = MixParams(p.box, p.lam, (torch.arange(n, device=x.device) - 1) % n)
    got = {
        'ours in place': (apply_mix(x.clone(), p, inplace=True), expect),
        'ours cutmix_batch': (F.cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices,
                                             generator=torch.Generator())[0], expect),
        'timm': (timm_mixup(x.clone(), y)[0], apply_mix(x, flip)),
        'torchvision': (tv_cutmix(x, y)[0], apply_mix(x, roll)),
    }
    if composer_cutmix_batch is not None:
        got['composer'] = (composer_cutmix_batch(x, y, bbox=F.box_to_composer(p.box), indices=p.indices)[0], expect)
    for name, (a, b) in got.items():
        if not torch.equal(a, b):
            raise RuntimeError(f'{name} does not reproduce the expected CutMix for box {p.box}, input {tuple(x.shape)} '
                               f'{x.dtype} on {x.device}: the benchmark would compare different work')


def _profile_ours(x: torch.Tensor, draws: Sequence[Any], calls: int, apply: Any = apply_mix,
                  ) -> list[tuple[str, float]]:
    """Where ours' in-place apply spends its time: top aten ops by self CPU time, as shares."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # a CUDA build on a machine without GPU logs an error otherwise
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            apply(x, draws[i % len(draws)], inplace=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key.startswith('aten::')]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:3]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


def _draw_per_sample(n: int, h: int, w: int, count: int, seed: int) -> list[PerSampleMixParams]:
    """``count`` per-sample draws (Beta(1, 1) λ and box per sample, partners), on the CPU."""
    g = torch.Generator().manual_seed(seed + 7)  # a stream of its own: the batch draws stay as they were
    return [F.sample_params_per_sample(n, h, w, alpha=1.0, generator=g) for _ in range(count)]


def _check_same_work_per_sample(x: torch.Tensor, y: torch.Tensor, p: PerSampleMixParams, batch: MixParams,
                                timm_elem: Any, holder: dict[str, Any]) -> None:
    """timm elem reproduces ours for the same boxes and pairing; our batch mode is per-sample with equal boxes."""
    n = x.shape[0]
    dev = x.device
    flip = PerSampleMixParams(p.boxes, p.lam, torch.arange(n, device=dev).flip(0))
    same_boxes = PerSampleMixParams(torch.tensor([batch.box] * n), torch.full((n,), batch.lam, dtype=torch.float64),
                                   batch.indices)
    holder.update(_timm_elem_draw(p))
    got = {
        'timm elem': (timm_elem(x.clone(), y)[0], apply_per_sample(x, flip)),
        'ours per-sample in place': (apply_per_sample(x.clone(), p, inplace=True),
                                     apply_per_sample(x, p)),
        'ours batch (mean area)': (apply_mix(x, batch), apply_per_sample(x, same_boxes)),
    }
    for name, (a, b) in got.items():
        if not torch.equal(a, b):
            raise RuntimeError(f'{name} does not reproduce the expected per-sample CutMix, input {tuple(x.shape)} '
                               f'{x.dtype} on {x.device}: the benchmark would compare different work')


def _run_per_sample(x: torch.Tensor, y: torch.Tensor, draws: Sequence[PerSampleMixParams], iters: int, warmup: int,
                    timm_elem: Any, holder: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Per-sample boxes on ``x`` (in place): ours, timm elem and our batch mode at the same mean area."""
    h, w = x.shape[-2:]
    dev = x.device
    ps = [PerSampleMixParams(p.boxes, p.lam, p.indices.to(dev)) for p in draws]
    timm_draws = [_timm_elem_draw(p) for p in draws]
    batch = []
    for p in ps:
        box = _mean_area_box(p.boxes, h, w)
        batch.append(MixParams(box, float(kept_share(torch.tensor([box]), h, w)[0]), p.indices))
    _check_same_work_per_sample(x, y, ps[warmup], batch[warmup], timm_elem, holder)

    def ours(i: int) -> None:
        apply_per_sample(x, ps[i], inplace=True)

    def ours_targets(i: int) -> None:
        p = ps[i]
        apply_per_sample(x, p, inplace=True)
        mix_targets_per_sample(y, y[p.indices], p.lam, p.boxes, kind='index', num_classes=NUM_CLASSES)

    def timm(i: int) -> None:
        holder.update(timm_draws[i])
        timm_elem(x, y)

    def ours_batch(i: int) -> None:
        apply_mix(x, batch[i], inplace=True)

    entries = dict(zip(PS_IMPLS, [ours, ours_targets, timm, ours_batch], strict=True))
    samples, faults = time_round_robin(entries, iters, warmup, cuda=cuda)
    ours_s = samples['ours per-sample']
    used = slice(warmup, warmup + iters)
    return {
        'median_s': {k: median(v) for k, v in samples.items()},
        'samples_s': samples,
        'faults_per_call': faults,
        'ratio': {
            'timm elem/ours per-sample': paired_ratio(samples['timm elem'], ours_s),
            'timm elem/ours per-sample+targets': paired_ratio(samples['timm elem'], samples['ours per-sample+targets']),
            'ours per-sample/ours batch (mean area)': paired_ratio(ours_s, samples['ours batch (mean area)']),
        },
        'mean_box_share': statistics.fmean(1.0 - float(p.lam.mean()) for p in ps[used]),
        'batch_box_share': statistics.fmean(1.0 - p.lam for p in batch[used]),
        'profile': _profile_ours(x, ps[used], max(3, min(iters, 20)), apply_per_sample),
    }


def _op_entries(x: torch.Tensor, y: torch.Tensor, src: torch.Tensor, draws: Sequence[MixParams],
                holder: dict[str, Any], timm_mixup: Any, tv_cutmix: Any,
                composer_cutmix_batch: Any) -> dict[str, Callable[[int], None]]:
    """The timed calls of one shape and layout, by ``IMPLS`` name: call ``i`` works on ``x`` in place with
    ``draws[i]`` (the floor copies its box from ``src``)."""
    no_gen = torch.Generator()

    def floor(i: int) -> None:
        y0, y1, x0, x1 = draws[i].box
        x[..., y0:y1, x0:x1].copy_(src[..., y0:y1, x0:x1])

    def ours(i: int) -> None:
        apply_mix(x, draws[i], inplace=True)

    def ours_targets(i: int) -> None:
        p = draws[i]
        apply_mix(x, p, inplace=True)
        mix_targets(y, y[p.indices], p.lam, p.box, kind='index', num_classes=NUM_CLASSES)

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
    if composer_cutmix_batch is None:  # no Composer installed: its peer is left out, its columns read n/a
        del entries['composer']
    return entries


def run_op(shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0,
           layouts: Sequence[str] = tuple(LAYOUTS), device: str = 'cpu') -> list[dict[str, Any]]:
    """Time one CutMix of a batch per implementation; one result row per shape and layout.

    Args:
        shapes: ``(N, C, H, W)`` batch shapes (``N`` even: timm needs it).
        iters: timed calls per implementation; small batches (up to ``SMALL_BATCH_ELEMENTS``
            elements, where one call is cheap and noise is relatively large) get
            ``SMALL_BATCH_ITERS`` times as many.
        warmup: untimed calls first.
        seed: seed of the drawn boxes and the data.
        layouts: keys of ``LAYOUTS``.
        device: ``'cpu'`` (wall clock) or ``'cuda'`` (tensors on the GPU, CUDA-event timing).

    Returns:
        Rows with ``shape``, ``layout``, ``device``, ``iters``, median seconds per implementation in
        ``median_s``, all samples in ``samples_s``, minor page faults per call in
        ``faults_per_call``, paired ratios in ``ratio``, the mean pasted share ``mean_box_share``,
        the floor's bandwidth ``floor_gbps``, ``profile`` (ours' top aten ops) and ``per_sample``
        (per-sample boxes: ``median_s``, ``samples_s``, ``faults_per_call`` per ``PS_IMPLS`` entry,
        ``ratio``, the mean pasted share of the per-sample boxes ``mean_box_share`` and of the
        batch-mode box ``batch_box_share``, and ``profile``).

    Raises:
        ValueError: for an odd batch size.
        RuntimeError: if an implementation does not reproduce ours for the same box and partners,
            or for ``device='cuda'`` where CUDA is not available.
    """
    try:
        from composer.functional import cutmix_batch as composer_cutmix_batch
    except ImportError:  # the core runs without Composer (launch/tools/gpu_check.py): time the other peers
        composer_cutmix_batch = None
    dev = check_device(device)
    cuda = dev.type == 'cuda'
    rows = []
    holder: dict[str, Any] = {}
    with _pinned_timm(holder) as (timm_mixup, timm_elem):
        tv_cutmix = _pinned_torchvision(holder)
        for shape in shapes:
            n, c, h, w = shape
            if n % 2:
                raise ValueError(f'timm needs an even batch; got shape {shape}')
            n_iters = iters * SMALL_BATCH_ITERS if n * c * h * w <= SMALL_BATCH_ELEMENTS else iters
            draws = _draw_params(n, h, w, n_iters + warmup, seed, dev)
            ps_draws = _draw_per_sample(n, h, w, n_iters + warmup, seed)
            for layout in layouts:
                dtype, channels_last = LAYOUTS[layout]
                g = torch.Generator().manual_seed(seed + 1)
                x = torch.rand(shape, generator=g).to(device=dev, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                src = x.clone()  # the floor's source: same shape, dtype and layout
                y = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(dev)
                _check_same_work(x, y, next(p for p in draws if p.lam < 1.0), timm_mixup, tv_cutmix, holder)
                entries = _op_entries(x, y, src, draws, holder, timm_mixup, tv_cutmix, composer_cutmix_batch)
                samples, faults = time_round_robin(entries, n_iters, warmup, cuda=cuda)
                ours_s = samples['ours']
                nan = [float('nan')] * len(ours_s)
                ratio = {
                    'composer/ours': paired_ratio(samples.get('composer', nan), ours_s),
                    'timm/ours': paired_ratio(samples['timm'], ours_s),
                    'torchvision/ours': paired_ratio(samples['torchvision'], ours_s),
                    'composer/ours cutmix_batch': paired_ratio(samples.get('composer', nan),
                                                               samples['ours cutmix_batch']),
                    'ours/floor': paired_ratio(ours_s, samples['floor']),
                }
                peers = [k for k in ('composer', 'timm', 'torchvision') if k in samples]
                ratio['min peer/ours'] = min(ratio[f'{k}/ours'] for k in peers)
                used = draws[warmup:warmup + n_iters]
                # The floor reads and writes each pasted element once.
                moved = [2 * n * c * (p.box[1] - p.box[0]) * (p.box[3] - p.box[2]) * x.element_size() for p in used]
                rows.append({
                    'shape': list(shape), 'layout': layout, 'dtype': str(dtype).replace('torch.', ''),
                    'device': dev.type, 'iters': n_iters,
                    'median_s': {k: median(v) for k, v in samples.items()},
                    'samples_s': samples,
                    'faults_per_call': faults,
                    'ratio': ratio,
                    'mean_box_share': statistics.fmean(1.0 - p.lam for p in used),
                    'floor_gbps': median([b / t / 1e9 for b, t in zip(moved, samples['floor'], strict=True) if b]),
                    'profile': _profile_ours(x, used, max(3, min(n_iters, 20))),
                    'per_sample': _run_per_sample(x, y, ps_draws, n_iters, warmup, timm_elem, holder, cuda),
                })
                del x, src, entries  # entries' calls hold x and src too
    return rows


def op_markdown(rows: Sequence[dict[str, Any]]) -> str:
    times = md_table(
        ['shape', 'layout', 'calls', 'box share'] + [f'{k} (ms)' for k in IMPLS] + ['floor GB/s'],
        [[shape_str(r['shape']), r['layout'], r['iters'], r['mean_box_share']]
         + [r['median_s'].get(k, float('nan')) * 1e3 for k in IMPLS] + [r['floor_gbps']] for r in rows],
    )
    keys = ['composer/ours', 'timm/ours', 'torchvision/ours', 'composer/ours cutmix_batch', 'ours/floor',
            'min peer/ours']
    ratios = md_table(['shape', 'layout'] + keys, [[shape_str(r['shape']), r['layout']] + [r['ratio'][k] for k in keys]
                                                  for r in rows])
    fault_impls = ['ours', 'ours cutmix_batch', 'composer', 'timm', 'torchvision']
    profile = md_table(
        ['shape', 'layout', "ours' in-place apply: top aten ops by self CPU time"]
        + [f'{k} faults/call' for k in fault_impls],
        [[shape_str(r['shape']), r['layout'], ', '.join(f'{k} {s:.0%}' for k, s in r['profile'])]
         + [r['faults_per_call'].get(k, float('nan')) for k in fault_impls] for r in rows],
    )
    intro = ('`ours` = `apply_mix(x, params, inplace=True)` (as the algorithm uses it); `ours+targets` adds '
             '`mix_targets` (index -> soft, as the peers do); `ours cutmix_batch` is the out-of-place drop-in; '
             '`box share` is the mean share of the image pasted; `floor GB/s` counts its bytes read plus written.')
    if any(r.get('device') == 'cuda' for r in rows):
        intro += (' On CUDA: tensors on the GPU, each call timed by CUDA events from an idle GPU; the profile '
                  'and the page faults are the host\'s.')
    parts = [
        '### The op: median ms per call', intro,
        times, '### The op: ratios (median of same-box ratios; > 1 in a `peer/ours` column means ours is faster)',
        ratios, '### Where ours spends its time (profiler), and minor page faults per call (fresh memory)', profile,
    ]
    ps_rows = [r for r in rows if r.get('per_sample')]
    if ps_rows:
        parts += ['### The op with per-sample boxes: median ms per call, ratios, profile', PS_INTRO,
                  per_sample_markdown(ps_rows)]
    return '\n\n'.join(parts)


PS_INTRO = ('Every sample its own box and λ (Beta(1, 1)), the same draw for all three at each call: '
            '`ours per-sample` = `apply_mix(x, per_sample_params, inplace=True)`; '
            "`timm elem` = `Mixup(mixup_alpha=0, cutmix_alpha=1, mode='elem')` with each sample's box and λ pinned to "
            'ours (partner `x.flip(0)`), targets included; `ours batch (mean area)` = '
            '`apply_mix(..., inplace=True)` with one centred box whose area is the mean area of the per-sample '
            'boxes. `box share` = mean pasted share (per-sample / the batch box).')


def per_sample_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The per-sample table of the op rows that have one."""
    keys = ['timm elem/ours per-sample', 'timm elem/ours per-sample+targets', 'ours per-sample/ours batch (mean area)']
    return md_table(
        ['shape', 'layout', 'calls', 'box share'] + [f'{k} (ms)' for k in PS_IMPLS] + keys
        + ["ours per-sample: top aten ops by self CPU time", 'faults/call ours / timm'],
        [[shape_str(r['shape']), r['layout'], r['iters'],
          f"{r['per_sample']['mean_box_share']:.3f} / {r['per_sample']['batch_box_share']:.3f}"]
         + [r['per_sample']['median_s'][k] * 1e3 for k in PS_IMPLS] + [r['per_sample']['ratio'][k] for k in keys]
         + [', '.join(f'{k} {v:.0%}' for k, v in r['per_sample']['profile']),
            ' / '.join(f"{r['per_sample']['faults_per_call'][k]:.3g}" for k in ('ours per-sample', 'timm elem'))]
         for r in rows],
    )


# ============================================================================ MixUp and MixUpCutMix

MIXUP_IMPLS = ['floor', 'ours', 'ours+targets', 'ours mixup_batch', 'composer', 'timm', 'timm elem', 'torchvision']
MIXUP_PEERS = ('composer', 'timm', 'timm elem', 'torchvision')
MIXUP_PS_IMPLS = ['ours per-sample', 'ours per-sample+targets', 'timm elem']
MIXUP_ALPHA = 0.2  # Composer's MixUp default; the pixel work does not depend on it
MIXUPCUTMIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)  # timm's DeiT recipe


def _draw_mixup(n: int, h: int, w: int, count: int, seed: int) -> list[MixParams]:
    """``count`` batch MixUp draws (whole image, partner weight ``min(z, 1 - z)`` on the ``2**-10`` grid),
    leaving out the rare draw whose weight rounds to 0 (nothing to blend: every implementation would skip it)."""
    from dist_cutmix import MixSpec, sample_mix

    spec = MixSpec.mixup(MIXUP_ALPHA)
    g = torch.Generator().manual_seed(seed + 11)
    draws: list[MixParams] = []
    while len(draws) < count:
        p = sample_mix(spec, n, h, w, generator=g)
        if p.weight > 0:
            draws.append(p)  # type: ignore[arg-type]
    return draws


def _draw_mixupcutmix(n: int, h: int, w: int, count: int, seed: int) -> list[PerSampleMixParams]:
    """``count`` per-sample MixUpCutMix draws (``MIXUPCUTMIX``): each sample a CutMix box or a MixUp blend."""
    from dist_cutmix import MixSpec, sample_mix

    spec = MixSpec(**MIXUPCUTMIX)
    g = torch.Generator().manual_seed(seed + 13)
    return [sample_mix(spec, n, h, w, per_sample=True, generator=g) for _ in range(count)]  # type: ignore[misc]


def _with_indices(p: Any, indices: torch.Tensor) -> Any:
    """The same draw with other partners (a peer's fixed pairing)."""
    if isinstance(p, PerSampleMixParams):
        return PerSampleMixParams(p.boxes, p.lam, indices, p.weights)
    return MixParams(p.box, p.lam, indices, p.weight)


def _timm_mixup_draw(p: MixParams, n: int) -> dict[str, Any]:
    """``holder`` entries that pin timm's batch and elem modes to the batch MixUp draw ``p`` (own weight 1 - m)."""
    keep = 1.0 - p.weight  # exact: the weight is on the 2**-10 grid
    return {'lam': keep, 'use_cutmix': False, 'elem_lam': np.full(n, keep, dtype=np.float32),
            'elem_cutmix': np.zeros(n, dtype=bool), 'elem_boxes': [], 'tv_lam': keep}


def _timm_mixupcutmix_draw(p: PerSampleMixParams) -> dict[str, Any]:
    """``holder`` entries that pin timm's elem mode to the per-sample draw ``p``: CutMix rows take their
    box and λ (asked for in sample order), MixUp rows blend at their own weight ``1 - m``."""
    weights = p.weights if p.weights is not None else torch.ones(len(p.lam), dtype=torch.float64)
    cut = (weights == 1) & (box_areas(p.boxes) > 0)
    lam = p.lam.numpy().astype(np.float32)  # MixUp rows: 1 - m, exact; unmixed rows: 1
    boxes = [(tuple(b), float(lam64)) for b, lam64, lam32, c in zip(p.boxes.tolist(), p.lam.tolist(), lam,
                                                                    cut.tolist(), strict=True) if c and lam32 != 1.0]
    return {'elem_lam': lam, 'elem_cutmix': cut.numpy(), 'elem_boxes': boxes}


def _pinned_torchvision_mixup(holder: dict[str, Any]) -> Any:
    """torchvision's ``v2.MixUp``, its λ (the own image's weight) pinned to ``holder['tv_lam']`` (same code)."""
    from torchvision.transforms import v2

    mixup = v2.MixUp(num_classes=NUM_CLASSES)
    mixup.make_params = lambda flat_inputs: {'lam': holder['tv_lam']}
    return mixup


def _check_same_mixup(x: torch.Tensor, y: torch.Tensor, p: MixParams, timm_mixup: Any, timm_elem: Any,
                      tv_mixup: Any, holder: dict[str, Any]) -> None:
    """Every MixUp implementation gives exactly our pixels for the same weight and pairing (and timm our targets).

    Raises:
        RuntimeError: naming the implementation that differs.
    """
    from composer.functional import mixup_batch as composer_mixup_batch

    from dist_cutmix import mixup_batch

    n = x.shape[0]
    ar = torch.arange(n, device=x.device)
    holder.update(_timm_mixup_draw(p, n))
    expect = apply_mix(x, p)
    flip = apply_mix(x, _with_indices(p, ar.flip(0)))
    timm_x, timm_y = timm_mixup(x.clone(), y)
    got = {
        'ours in place': (apply_mix(x.clone(), p, inplace=True), expect),
        'ours mixup_batch': (mixup_batch(x, y, mixing=p.weight, indices=p.indices)[0], expect),
        'composer': (composer_mixup_batch(x, y, mixing=p.weight, indices=p.indices)[0], expect),
        'timm': (timm_x, flip),
        'timm elem': (timm_elem(x.clone(), y)[0], flip),
        'torchvision': (tv_mixup(x, y)[0], apply_mix(x, _with_indices(p, (ar - 1) % n))),
    }
    for name, (a, b) in got.items():
        if not torch.equal(a, b):
            raise RuntimeError(f'{name} does not reproduce our MixUp (partner weight {p.weight}), input '
                               f'{tuple(x.shape)} {x.dtype} on {x.device}: the benchmark would compare different work')
    ours_y = mix_targets(y, y.flip(0), p.lam, p.box, kind='index', num_classes=NUM_CLASSES)
    if not torch.allclose(timm_y, ours_y, rtol=0, atol=1e-6):
        raise RuntimeError(f'timm MixUp targets differ from ours by {float((timm_y - ours_y).abs().max()):.3g}')


def _check_same_mixupcutmix(x: torch.Tensor, y: torch.Tensor, p: PerSampleMixParams, timm_elem: Any,
                            holder: dict[str, Any]) -> None:
    """timm elem reproduces our per-sample MixUpCutMix pixels (pairing ``flip(0)``); in place equals a copy.

    Raises:
        RuntimeError: naming the implementation that differs.
    """
    n = x.shape[0]
    holder.update(_timm_mixupcutmix_draw(p))
    got = {
        'timm elem': (timm_elem(x.clone(), y)[0], apply_mix(x, _with_indices(p, torch.arange(n).flip(0)))),
        'ours per-sample in place': (apply_mix(x.clone(), p, inplace=True), apply_mix(x, p)),
    }
    for name, (a, b) in got.items():
        if not torch.equal(a, b):
            raise RuntimeError(f'{name} does not reproduce our per-sample MixUpCutMix, input {tuple(x.shape)} '
                               f'{x.dtype}: the benchmark would compare different work')


def _mixup_entries(x: torch.Tensor, y: torch.Tensor, src: torch.Tensor, draws: Sequence[MixParams],
                   timm_draws: Sequence[dict[str, Any]], holder: dict[str, Any], timm_mixup: Any, timm_elem: Any,
                   tv_mixup: Any) -> dict[str, Callable[[int], None]]:
    """The timed MixUp calls by ``MIXUP_IMPLS`` name: call ``i`` blends ``x`` with ``draws[i]``'s weight."""
    from composer.functional import mixup_batch as composer_mixup_batch

    from dist_cutmix import mixup_batch

    def floor(i: int) -> None:  # read two images, write one, in place like ours
        torch.add(x, src, out=x)

    def ours(i: int) -> None:
        apply_mix(x, draws[i], inplace=True)

    def ours_targets(i: int) -> None:
        p = draws[i]
        apply_mix(x, p, inplace=True)
        mix_targets(y, y[p.indices], p.lam, p.box, kind='index', num_classes=NUM_CLASSES)

    def ours_mixup_batch(i: int) -> None:
        mixup_batch(x, y, mixing=draws[i].weight, indices=draws[i].indices)

    def composer(i: int) -> None:
        composer_mixup_batch(x, y, mixing=draws[i].weight, indices=draws[i].indices)

    def timm(i: int) -> None:
        holder.update(timm_draws[i])
        timm_mixup(x, y)

    def elem(i: int) -> None:
        holder.update(timm_draws[i])
        timm_elem(x, y)

    def torchvision(i: int) -> None:
        holder.update(timm_draws[i])
        tv_mixup(x, y)

    return dict(zip(MIXUP_IMPLS, [floor, ours, ours_targets, ours_mixup_batch, composer, timm, elem, torchvision],
                    strict=True))


def _run_mixupcutmix(x: torch.Tensor, y: torch.Tensor, draws: Sequence[PerSampleMixParams], iters: int, warmup: int,
                     timm_elem: Any, holder: dict[str, Any]) -> dict[str, Any]:
    """Per-sample MixUpCutMix on ``x`` (in place): ours against timm ``mode='elem'`` with the same draws."""
    timm_draws = [_timm_mixupcutmix_draw(p) for p in draws]
    _check_same_mixupcutmix(x, y, draws[warmup], timm_elem, holder)

    def ours(i: int) -> None:
        apply_mix(x, draws[i], inplace=True)

    def ours_targets(i: int) -> None:
        p = draws[i]
        apply_mix(x, p, inplace=True)
        mix_targets_per_sample(y, y[p.indices], p.lam, p.boxes, kind='index', num_classes=NUM_CLASSES)

    def timm(i: int) -> None:
        holder.update(timm_draws[i])
        timm_elem(x, y)

    entries = dict(zip(MIXUP_PS_IMPLS, [ours, ours_targets, timm], strict=True))
    samples, faults = time_round_robin(entries, iters, warmup)
    used = draws[warmup:warmup + iters]
    weights = [p.weights for p in used if p.weights is not None]
    return {
        'median_s': {k: median(v) for k, v in samples.items()},
        'samples_s': samples,
        'faults_per_call': faults,
        'ratio': {
            'timm elem/ours per-sample': paired_ratio(samples['timm elem'], samples['ours per-sample']),
            'timm elem/ours per-sample+targets': paired_ratio(samples['timm elem'],
                                                              samples['ours per-sample+targets']),
        },
        'cutmix_share': statistics.fmean(float((w == 1).double().mean()) for w in weights) if weights else 0.0,
        'profile': _profile_ours(x, used, max(3, min(iters, 20)), apply_mix),
    }


def run_mixup_op(shapes: Sequence[Shape], iters: int, *, warmup: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Time one MixUp of a float32 batch per implementation (CPU); one result row per shape.

    Every implementation gets draw ``i``'s partner weight ``m`` at call ``i``: ours
    (``apply_mix(x, params, inplace=True)``, with ``mix_targets`` in ``ours+targets``), our and Composer's
    out-of-place ``mixup_batch`` (same partners), timm's ``Mixup`` in batch and ``mode='elem'`` (pairing
    ``flip(0)``) and torchvision's ``v2.MixUp`` (pairing ``roll(1, 0)``) with their λ pinned to ``1 - m``;
    checked to give our pixels first. The floor reads two batches and writes one (``torch.add(x, src,
    out=x)``). ``row['per_sample']``: per-sample MixUpCutMix (``MIXUPCUTMIX``) against timm elem.

    Args:
        shapes: ``(N, C, H, W)`` batch shapes (``N`` even: timm needs it).
        iters: timed calls per implementation (small batches get ``SMALL_BATCH_ITERS`` times as many).
        warmup: untimed calls first.
        seed: seed of the draws and the data.

    Returns:
        Rows with ``shape``, ``iters``, ``median_s``, ``samples_s``, ``faults_per_call``, ``ratio``
        (``peer/ours``, ``min peer/ours``, ``ours/floor``, ``composer/ours mixup_batch``), ``mean_weight``,
        ``floor_gbps``, ``profile`` and ``per_sample``.

    Raises:
        ValueError: for an odd batch size.
        RuntimeError: if an implementation does not reproduce ours for the same draw.
    """
    rows = []
    holder: dict[str, Any] = {}
    with _pinned_timm(holder) as (timm_mixup, timm_elem):
        tv_mixup = _pinned_torchvision_mixup(holder)
        for shape in shapes:
            n, c, h, w = shape
            if n % 2:
                raise ValueError(f'timm needs an even batch; got shape {shape}')
            n_iters = iters * SMALL_BATCH_ITERS if n * c * h * w <= SMALL_BATCH_ELEMENTS else iters
            draws = _draw_mixup(n, h, w, n_iters + warmup, seed)
            timm_draws = [_timm_mixup_draw(p, n) for p in draws]
            g = torch.Generator().manual_seed(seed + 1)
            x = torch.rand(shape, generator=g)
            src = torch.rand(shape, generator=g)
            y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
            _check_same_mixup(x, y, draws[warmup], timm_mixup, timm_elem, tv_mixup, holder)
            entries = _mixup_entries(x, y, src, draws, timm_draws, holder, timm_mixup, timm_elem, tv_mixup)
            samples, faults = time_round_robin(entries, n_iters, warmup)
            ours_s = samples['ours']
            ratio = {f'{k}/ours': paired_ratio(samples[k], ours_s) for k in MIXUP_PEERS}
            ratio['min peer/ours'] = min(ratio[f'{k}/ours'] for k in MIXUP_PEERS)
            ratio['ours/floor'] = paired_ratio(ours_s, samples['floor'])
            ratio['composer/ours mixup_batch'] = paired_ratio(samples['composer'], samples['ours mixup_batch'])
            moved = 3 * x.numel() * x.element_size()  # the floor reads two batches and writes one
            used = draws[warmup:warmup + n_iters]
            ps_draws = _draw_mixupcutmix(n, h, w, n_iters + warmup, seed)
            rows.append({
                'shape': list(shape), 'dtype': 'float32', 'device': 'cpu', 'iters': n_iters,
                'median_s': {k: median(v) for k, v in samples.items()},
                'samples_s': samples,
                'faults_per_call': faults,
                'ratio': ratio,
                'mean_weight': statistics.fmean(p.weight for p in used),
                'floor_gbps': median([moved / t / 1e9 for t in samples['floor'] if t > 0]),
                'profile': _profile_ours(x, used, max(3, min(n_iters, 20)), apply_mix),
                'per_sample': _run_mixupcutmix(x, y, ps_draws, n_iters, warmup, timm_elem, holder),
            })
            del x, src, entries
    return rows


MIXUP_INTRO = (
    'float32, CPU. `ours` = `apply_mix(x, params, inplace=True)` with a batch MixUp draw (whole image, partner weight '
    f'm = min(z, 1 - z), z ~ Beta({MIXUP_ALPHA}, {MIXUP_ALPHA}), as `dist_cutmix.MixUp` draws it); `ours+targets` adds '
    '`mix_targets` (index -> soft); `ours mixup_batch` and `composer` = `mixup_batch(x, y, mixing=m, indices=...)`, '
    "ours and `composer.functional`'s (out of place, same partners); `timm` = `Mixup(mixup_alpha>0)` batch mode and "
    "`timm elem` = `mode='elem'` (in place, partner `x.flip(0)`, targets included), `torchvision` = `v2.MixUp` "
    '(partner `x.roll(1, 0)`, out of place, targets included), their λ pinned to 1 - m; every one checked to give '
    'our pixels bit for bit first. `floor` = `torch.add(x, src, out=x)`: two batches read, one written; '
    '`floor GB/s` counts those bytes. `mean m` = mean partner weight.')
MIXUP_PS_INTRO = (
    'Per-sample MixUpCutMix (`MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)`, per_sample=True, as '
    "`MixUpCutMix(per_sample=True)` draws it): `ours` = `apply_mix(x, params, inplace=True)`; `timm elem` = timm's "
    "`Mixup(mode='elem')` with each sample's method, box and λ pinned to ours (partner `x.flip(0)`), targets "
    'included; checked to give our pixels first. `CutMix rows` = share of samples pasted (the rest blended).')


def mixup_op_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The MixUp op tables (times, ratios, profile) and the per-sample MixUpCutMix table."""
    times = md_table(
        ['shape', 'calls', 'mean m'] + [f'{k} (ms)' for k in MIXUP_IMPLS] + ['floor GB/s'],
        [[shape_str(r['shape']), r['iters'], r['mean_weight']] + [r['median_s'][k] * 1e3 for k in MIXUP_IMPLS]
         + [r['floor_gbps']] for r in rows])
    keys = [f'{k}/ours' for k in MIXUP_PEERS] + ['min peer/ours', 'ours/floor', 'composer/ours mixup_batch']
    ratios = md_table(['shape'] + keys, [[shape_str(r['shape'])] + [r['ratio'][k] for k in keys] for r in rows])
    profile = md_table(
        ['shape', "ours' in-place apply: top aten ops by self CPU time", 'faults/call ours / composer / timm'],
        [[shape_str(r['shape']), ', '.join(f'{k} {s:.0%}' for k, s in r['profile']),
          ' / '.join(f"{r['faults_per_call'][k]:.3g}" for k in ('ours', 'composer', 'timm'))] for r in rows])
    ps_keys = ['timm elem/ours per-sample', 'timm elem/ours per-sample+targets']
    per_sample = md_table(
        ['shape', 'calls', 'CutMix rows'] + [f'{k} (ms)' for k in MIXUP_PS_IMPLS] + ps_keys
        + ['ours per-sample: top aten ops by self CPU time'],
        [[shape_str(r['shape']), r['iters'], r['per_sample']['cutmix_share']]
         + [r['per_sample']['median_s'][k] * 1e3 for k in MIXUP_PS_IMPLS]
         + [r['per_sample']['ratio'][k] for k in ps_keys]
         + [', '.join(f'{k} {v:.0%}' for k, v in r['per_sample']['profile'])] for r in rows])
    return '\n\n'.join([
        '### MixUp, the op: median ms per call', MIXUP_INTRO, times,
        '### MixUp, the op: ratios (median of same-draw ratios; > 1 in a `peer/ours` column means ours is faster)',
        ratios, "### MixUp: where ours spends its time, and minor page faults per call", profile,
        '### MixUpCutMix per sample, the op: median ms per call and ratios', MIXUP_PS_INTRO, per_sample])
