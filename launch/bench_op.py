"""The ``op`` part of ``launch/benchmark.py``: one CutMix of a batch against its peers and the floor.

One CutMix of a batch, per call, median over many pre-drawn boxes (Beta(1, 1)); every
implementation gets the same box and λ at the same iteration (Composer's and ours also the
same partners; timm pairs with ``x.flip(0)`` and torchvision with ``x.roll(1, 0)``, which their
APIs fix). The implementations run round-robin inside each iteration, so background load hits
all of them alike; ratios are medians of the per-iteration (same box) ratios. The floor is
one plain ``copy_`` of the box region (read once, written once), on the same tensors.
Batches of up to a million elements get 4x ``--iters`` calls (cheap, and relatively noisier).

With ``--device cuda`` the batch, targets and partner indices live on the GPU and every
implementation (the same set) is timed by CUDA events around each call, started on an idle GPU
(:func:`launch.bench_common.time_round_robin`); the profile is still the host's (aten ops by
self CPU time: launch cost on a GPU), and page faults are the host process's.
"""
from __future__ import annotations

import os
import statistics
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from dist_cutmix import functional as F
from launch.bench_common import NUM_CLASSES, Shape, md_table, median, paired_ratio, shape_str, time_round_robin

__all__ = ['DEVICES', 'LAYOUTS', 'check_device', 'op_markdown', 'run_op']

LAYOUTS: dict[str, tuple[torch.dtype, bool]] = {  # name -> (dtype, channels_last)
    'float32': (torch.float32, False),
    'bfloat16': (torch.bfloat16, False),
    'channels_last': (torch.float32, True),
}
DEVICES = ('cpu', 'cuda')

SMALL_BATCH_ELEMENTS = 1_000_000  # batches up to this many elements get SMALL_BATCH_ITERS x the iterations
SMALL_BATCH_ITERS = 4

IMPLS = ['floor', 'ours', 'ours+targets', 'ours cutmix_batch', 'composer', 'timm', 'torchvision']


def check_device(device: str) -> torch.device:
    """The op part's device: ``cpu``, or ``cuda`` where CUDA is available.

    Raises:
        ValueError: for another device.
        RuntimeError: for ``cuda`` without CUDA, naming ``--device cuda``.
    """
    if device not in DEVICES:
        raise ValueError(f'device must be one of {DEVICES}, got {device!r}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(
            f'--device cuda: CUDA is not available here (torch.cuda.is_available() is False; torch '
            f'{torch.__version__}, built for CUDA {torch.version.cuda}). Run the op part on a machine with a GPU, '
            'or leave out --device (default cpu).')
    return torch.device(device)


def _draw_params(n: int, h: int, w: int, count: int, seed: int, device: torch.device) -> list[F.CutMixParams]:
    """``count`` CutMix draws (Beta(1, 1) box, partners), from one explicit generator; partners on ``device``."""
    g = torch.Generator().manual_seed(seed)
    draws = [F.sample_params(n, h, w, alpha=1.0, generator=g) for _ in range(count)]
    if device.type == 'cpu':
        return draws
    return [F.CutMixParams(p.box, p.lam, p.indices.to(device)) for p in draws]


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
    flip = F.CutMixParams(p.box, p.lam, torch.arange(n, device=x.device).flip(0))
    roll = F.CutMixParams(p.box, p.lam, (torch.arange(n, device=x.device) - 1) % n)
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
                               f'{x.dtype} on {x.device}: the benchmark would compare different work')


def _profile_ours(x: torch.Tensor, draws: Sequence[F.CutMixParams], calls: int) -> list[tuple[str, float]]:
    """Where ours' in-place apply spends its time: top aten ops by self CPU time, as shares."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # a CUDA build on a machine without GPU logs an error otherwise
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            F.apply_cutmix(x, draws[i % len(draws)], inplace=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key.startswith('aten::')]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:3]
    return [(e.key, e.self_cpu_time_total / total) for e in top]


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
        the floor's bandwidth ``floor_gbps`` and ``profile`` (ours' top aten ops).

    Raises:
        ValueError: for an odd batch size.
        RuntimeError: if an implementation does not reproduce ours for the same box and partners,
            or for ``device='cuda'`` where CUDA is not available.
    """
    from composer.functional import cutmix_batch as composer_cutmix_batch

    dev = check_device(device)
    cuda = dev.type == 'cuda'
    rows = []
    holder: dict[str, Any] = {}
    with _pinned_timm(holder) as timm_mixup:
        tv_cutmix = _pinned_torchvision(holder)
        for shape in shapes:
            n, c, h, w = shape
            if n % 2:
                raise ValueError(f'timm needs an even batch; got shape {shape}')
            n_iters = iters * SMALL_BATCH_ITERS if n * c * h * w <= SMALL_BATCH_ELEMENTS else iters
            draws = _draw_params(n, h, w, n_iters + warmup, seed, dev)
            for layout in layouts:
                dtype, channels_last = LAYOUTS[layout]
                g = torch.Generator().manual_seed(seed + 1)
                x = torch.rand(shape, generator=g).to(device=dev, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                src = x.clone()  # the floor's source: same shape, dtype and layout
                y = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(dev)
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
                samples, faults = time_round_robin(entries, n_iters, warmup, cuda=cuda)
                ours_s = samples['ours']
                ratio = {
                    'composer/ours': paired_ratio(samples['composer'], ours_s),
                    'timm/ours': paired_ratio(samples['timm'], ours_s),
                    'torchvision/ours': paired_ratio(samples['torchvision'], ours_s),
                    'composer/ours cutmix_batch': paired_ratio(samples['composer'], samples['ours cutmix_batch']),
                    'ours/floor': paired_ratio(ours_s, samples['floor']),
                }
                peers = ('composer', 'timm', 'torchvision')
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
                    'floor_gbps': median([b / t / 1e9 for b, t in zip(moved, samples['floor']) if b]),
                    'profile': _profile_ours(x, used, max(3, min(n_iters, 20))),
                })
                del x, src
    return rows


def op_markdown(rows: Sequence[dict[str, Any]]) -> str:
    times = md_table(
        ['shape', 'layout', 'calls', 'box share'] + [f'{k} (ms)' for k in IMPLS] + ['floor GB/s'],
        [[shape_str(r['shape']), r['layout'], r['iters'], r['mean_box_share']]
         + [r['median_s'][k] * 1e3 for k in IMPLS] + [r['floor_gbps']] for r in rows],
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
         + [r['faults_per_call'][k] for k in fault_impls] for r in rows],
    )
    intro = ('`ours` = `apply_cutmix(x, params, inplace=True)` (as the algorithm uses it); `ours+targets` adds '
             '`mix_targets` (index -> soft, as the peers do); `ours cutmix_batch` is the out-of-place drop-in; '
             '`box share` is the mean share of the image pasted; `floor GB/s` counts its bytes read plus written.')
    if any(r.get('device') == 'cuda' for r in rows):
        intro += (' On CUDA: tensors on the GPU, each call timed by CUDA events from an idle GPU; the profile '
                  'and the page faults are the host\'s.')
    return '\n\n'.join([
        '### The op: median ms per call', intro,
        times, '### The op: ratios (median of same-box ratios; > 1 in a `peer/ours` column means ours is faster)',
        ratios, '### Where ours spends its time (profiler), and minor page faults per call (fresh memory)', profile,
    ])
