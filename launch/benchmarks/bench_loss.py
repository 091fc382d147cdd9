"""The loss without dense targets against cross entropy on dense soft targets, forward and backward.

    python launch/benchmarks/bench_loss.py [--device cpu|cuda] [--iters 30] [--json PATH]
    python -m launch.benchmarks.bench_loss ...

Each row times one training step's loss on a mixed batch of ``N`` index labels (a batch λ, label smoothing 0.1,
as ``Mixer`` mixes them): **ours** builds the :class:`~dist_cutmix.MixedLabels` and runs
:func:`~dist_cutmix.mixed_cross_entropy` forward and backward; **dense** builds the ``(N, C)`` soft target as the
mixers build it (``dist_cutmix.mix_targets``: one-hot, mix, smooth, float32) and runs ``F.cross_entropy`` on it
forward and backward. Both run on the same logits, interleaved round robin (the order turns every iteration, so
background load hits both); the table gives the medians and the median of the per-iteration ratios dense/ours,
measured in this one run. On a GPU each call is timed by CUDA events after a synchronize.

:func:`run_loss` takes the device, so the GPU check runs the same rows: ``run_loss('cuda')`` and
:func:`loss_markdown` for its table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python launch/benchmarks/bench_loss.py` puts this folder first, not the project
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dist_cutmix import MixedLabels, mix_targets, mixed_cross_entropy  # noqa: E402
from launch.benchmarks.bench_common import time_round_robin  # noqa: E402

__all__ = ['CLASSES', 'DTYPES', 'N', 'SMOOTHING', 'build_parser', 'loss_markdown', 'main', 'run_loss']

N = 256
CLASSES = (1000, 21841)
DTYPES = ('float32', 'bfloat16')
SMOOTHING = 0.1
LAM = 0.6845703125  # a batch λ on the mixers' 2**-10 label grid


def _row(n: int, c: int, dtype_name: str, device: torch.device, iters: int, warmup: int, seed: int) -> dict[str, Any]:
    """One row: ours and dense, forward and backward, on the same logits and labels."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    logits = torch.randn(n, c, generator=g).to(device=device, dtype=dtype).requires_grad_()
    own = torch.randint(0, c, (n,), generator=g).to(device)
    partner = own.roll(1)  # the mixers' partners are a permutation; which one does not change the cost

    def ours() -> torch.Tensor:
        logits.grad = None
        loss = mixed_cross_entropy(logits, MixedLabels(own, partner, LAM, SMOOTHING))
        loss.backward()
        return loss

    def dense() -> torch.Tensor:
        logits.grad = None
        target = mix_targets(own, partner, LAM, (0, 0, 0, 0), kind='index', num_classes=c, validate=False,
                             smoothing=SMOOTHING)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        return loss

    # the two agree (bfloat16: F.cross_entropy computes in bfloat16, ours in float32)
    ours_loss, ours_grad = float(ours().detach()), logits.grad.double()
    dense_loss, dense_grad = float(dense().detach()), logits.grad.double()
    samples, faults = time_round_robin({'ours': lambda i: ours(), 'dense': lambda i: dense()}, iters, warmup,
                                       cuda=device.type == 'cuda')
    ratios = [d / o for d, o in zip(samples['dense'], samples['ours'], strict=True) if o > 0]
    return {
        'n': n, 'classes': c, 'dtype': dtype_name, 'device': str(device), 'iters': iters,
        'ours_ms': statistics.median(samples['ours']) * 1e3, 'dense_ms': statistics.median(samples['dense']) * 1e3,
        'speedup': statistics.median(ratios) if ratios else float('nan'),
        'ours_faults': faults['ours'], 'dense_faults': faults['dense'],
        'loss_rel_diff': abs(ours_loss - dense_loss) / max(abs(dense_loss), 1e-30),
        'grad_max_abs_diff': float((ours_grad - dense_grad).abs().max()),
        'samples_ms': {k: [round(v * 1e3, 4) for v in vs] for k, vs in samples.items()},
    }


def run_loss(device: str = 'cpu', *, n: int = N, classes: Sequence[int] = CLASSES, dtypes: Sequence[str] = DTYPES,
             iters: int = 30, warmup: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Time every ``(classes, dtype)`` row on ``device``: ours and dense, forward and backward, round robin.

    Returns:
        One dict a row: ``n``, ``classes``, ``dtype``, ``device``, ``iters``, ``ours_ms`` and ``dense_ms``
        (medians), ``speedup`` (median of the per-iteration ratios dense / ours), ``loss_rel_diff`` and
        ``grad_max_abs_diff`` (how far the two results are apart), ``ours_faults`` and ``dense_faults`` (the host's
        minor page faults per call), ``samples_ms`` (every timing).

    Raises:
        RuntimeError: for ``device='cuda'`` without CUDA.
    """
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'bench_loss: device={device!r}, but CUDA is not available here (torch {torch.__version__})')
    return [_row(n, c, d, dev, iters, warmup, seed) for c in classes for d in dtypes]


def loss_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table: medians in milliseconds, the speed-up measured in the same run, page faults."""
    lines = ['| N | C | dtype | device | ours ms | dense ms | speed-up (dense / ours) | '
             'page faults a call (ours, dense) |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f"| {r['n']} | {r['classes']} | {r['dtype']} | {r['device']} | {r['ours_ms']:.3g} | "
              f"{r['dense_ms']:.3g} | {r['speedup']:.2f}x | {r['ours_faults']:.0f}, {r['dense_faults']:.0f} |"
              for r in rows]
    return '\n'.join(lines)


def environment(device: str, threads: int) -> dict[str, Any]:
    """What the timings depend on: versions, the CPU (or GPU), threads, and the load on the machine."""
    env: dict[str, Any] = {'torch': torch.__version__, 'python': platform.python_version(),
                           'cpu': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
                           'threads': threads, 'device': device}
    if hasattr(os, 'getloadavg'):
        env['load_average_1min'] = round(os.getloadavg()[0], 2)
    if device == 'cuda' and torch.cuda.is_available():
        env['gpu'] = torch.cuda.get_device_name()
    return env


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated positive ints, got {text!r}') from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'expected comma-separated positive ints, got {text!r}')
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--n', type=int, default=N, help='batch size (default %(default)s)')
    p.add_argument('--classes', type=_ints, default=list(CLASSES), help='class counts, e.g. 1000,21841')
    p.add_argument('--dtypes', default=','.join(DTYPES), help='logit dtypes, e.g. float32,bfloat16')
    p.add_argument('--iters', type=int, default=30, help='timed iterations per row (default %(default)s)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations first (default %(default)s)')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (default %(default)s)')
    p.add_argument('--json', type=Path, default=None, help='write the rows and the environment here')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(',')]
    for d in dtypes:
        if d not in ('float32', 'float64', 'bfloat16', 'float16'):
            build_parser().error(f'--dtypes: not a floating dtype: {d!r}')
    torch.set_num_threads(args.threads)
    env = environment(args.device, args.threads)
    rows = run_loss(args.device, n=args.n, classes=args.classes, dtypes=dtypes, iters=args.iters,
                    warmup=args.warmup)
    if hasattr(os, 'getloadavg'):
        env['load_average_1min_after'] = round(os.getloadavg()[0], 2)
    table = loss_markdown(rows)
    print(f"bench_loss: forward + backward, index labels, batch λ, label smoothing {SMOOTHING}; medians of "
          f"{args.iters} round-robin iterations; {', '.join(f'{k} {v}' for k, v in env.items())}")
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'environment': env, 'rows': rows, 'markdown': table}, indent=1))
        print(f'wrote {args.json}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
