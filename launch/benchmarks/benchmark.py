#!/usr/bin/env python
"""Benchmarks: the CutMix op against its peers and the memory-copy floor, the global exchange
against all-gather, and CutMix's share of a Composer training step.

Run it alone (it spawns its own gloo ranks, meeting through a ``FileStore`` in a temp dir)::

    python launch/benchmarks/benchmark.py                          # everything, default sizes (a few minutes)
    python launch/benchmarks/benchmark.py --part op --iters 200    # one part, more iterations
    python launch/benchmarks/benchmark.py --quick --json out.json
    python launch/benchmarks/benchmark.py --part op --device cuda  # the op on a GPU, timed with CUDA events

or under Composer's launcher, where the process group comes from the environment::

    composer -n 4 launch/benchmarks/benchmark.py --part exchange

It prints markdown tables (rank 0 only under a launcher) and, with ``--json``, writes every
measurement. Targets are reported, not asserted.

Parts, one module each (its docstring says what is measured and how), sharing
``launch/benchmarks/bench_common.py`` (round-robin timing, paired ratios, tables, environment, rank spawning):

``op`` (``launch/benchmarks/bench_op.py``)
    One CutMix of a batch per call: ours, Composer's, timm's and torchvision's, and the floor of
    one plain ``copy_`` of the box region; on the CPU or, with ``--device cuda``, on a GPU.
``exchange`` (``launch/benchmarks/bench_exchange.py``)
    Global mixing on W gloo ranks: our crop ``all_to_all`` against all-gathering the global batch.
``step`` (``launch/benchmarks/bench_step.py``)
    CutMix's share of a Composer ``Trainer`` step, local (one rank) and global (two ranks).
``mixup`` (``run_mixup_op`` in ``bench_op.py``, ``run_mixup_exchange`` in ``bench_exchange.py``)
    MixUp's op against Composer's, timm's (batch and elem) and torchvision's ``mixup`` and the floor
    of reading two batches and writing one; per-sample MixUpCutMix against timm elem; the global MixUp
    and MixUpCutMix exchange against all-gather and a bare ``all_to_all_single`` of the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run from a checkout that is not installed
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.benchmarks.bench_common import environment, md_table, parse_shapes  # noqa: E402
from launch.benchmarks.bench_exchange import (  # noqa: E402
    combine_exchange,
    exchange_markdown,
    exchange_rank,
    mixup_exchange_markdown,
    run_exchange,
    run_mixup_exchange,
)
from launch.benchmarks.bench_op import (  # noqa: E402
    DEVICES,
    LAYOUTS,
    check_device,
    mixup_op_markdown,
    op_markdown,
    run_mixup_op,
    run_op,
)
from launch.benchmarks.bench_step import run_step, step_markdown  # noqa: E402

__all__ = ['main', 'run_exchange', 'run_op', 'run_step']

# What the issue asks for; reported against the measurements, never asserted.
TARGETS = {
    'op_vs_composer': ('op, 64x3x224x224 float32: Composer time / ours', '>=', 1.5),
    'op_vs_peers': ('op, every row: fastest peer time / ours (min)', '>', 1.0),
    'op_vs_floor': ('op, every row: ours / floor (max)', '<=', 2.0),
    'exchange_time': ('exchange W=4, 32x3x224x224: all-gather time / ours', '>=', 3.0),
    'exchange_bytes': ('exchange W=4, 32x3x224x224: all-gather bytes / ours', '>=', 4.0),
    'step_local': ('train step, local: (with - without) / without', '<', 0.02),
    'step_global': ('train step, global: (with - without) / without', '<', 0.10),
    'op_ps_vs_timm': ('op per-sample, every float32 row: timm elem time / ours per-sample (min)', '>=', 3.0),
    'op_ps_vs_batch': ('op per-sample, every float32 row: ours per-sample / ours batch, same mean area (max)',
                       '<=', 3.0),
    'exchange_ps_bytes': ('exchange per-sample W=4, every shape: |bytes sent / crops+labels that must cross - 1| (max)',
                          '<=', 0.05),
    # MixUp and MixUpCutMix
    'mixup_vs_peers': ('MixUp op, 64x3x224x224: fastest peer time / ours', '>=', 1.5),
    'mixup_vs_floor': ('MixUp op, 64x3x224x224: ours / floor (read two batches, write one)', '<=', 1.5),
    'mixupcutmix_ps_vs_timm': ('MixUpCutMix per-sample op, every row: timm elem time / ours (min)', '>=', 3.0),
    'mixup_exchange_a2a': ('MixUp/MixUpCutMix exchange W=4, every row: ours time / bare all_to_all_single (max)',
                           '<=', 1.5),
    'mixup_exchange_bytes': ('MixUp/MixUpCutMix exchange W=4, every row: abs(bytes sent / must cross - 1) (max)',
                             '<=', 0.05),
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
    'mixup_worlds': [4],
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
    'mixup_worlds': [2],
}


# ============================================================================ report


def _targets(op: Sequence[dict[str, Any]], exchange: Sequence[dict[str, Any]],
             step: Sequence[dict[str, Any]], mixup_op: Sequence[dict[str, Any]] = (),
             mixup_exchange: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
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
    ps = [r['per_sample'] for r in op if r.get('per_sample') and r['layout'] == 'float32']
    if ps:
        measured['op_ps_vs_timm'] = min(p['ratio']['timm elem/ours per-sample'] for p in ps)
        measured['op_ps_vs_batch'] = max(p['ratio']['ours per-sample/ours batch (mean area)'] for p in ps)
    ps = [r['per_sample'] for r in exchange if r.get('per_sample') and r['world'] == 4]
    if ps:
        measured['exchange_ps_bytes'] = max(abs(p['bytes_ratio'] - 1) for p in ps)
    for mode in ('local', 'global'):
        row = find(step, mode=mode)
        if row:
            measured[f'step_{mode}'] = row['share']
    measured.update(_mixup_measured(mixup_op, mixup_exchange))
    out = []
    for key, (what, op_, bound) in TARGETS.items():
        value = measured[key]
        met = None if value is None else {'>=': value >= bound, '>': value > bound, '<=': value <= bound,
                                          '<': value < bound}[op_]
        out.append({'key': key, 'what': what, 'target': f'{op_} {bound:g}', 'measured': value, 'met': met})
    return out


def _mixup_measured(op: Sequence[dict[str, Any]], exchange: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The MixUp targets this run measured."""
    out = {}
    row = next((r for r in op if r['shape'] == [64, 3, 224, 224]), None)
    if row:
        out['mixup_vs_peers'] = row['ratio']['min peer/ours']
        out['mixup_vs_floor'] = row['ratio']['ours/floor']
    if op:
        out['mixupcutmix_ps_vs_timm'] = min(r['per_sample']['ratio']['timm elem/ours per-sample'] for r in op)
    rows = [r for r in exchange if r['world'] == 4]
    if rows:
        out['mixup_exchange_a2a'] = max(r['a2a_ratio'] for r in rows)
        out['mixup_exchange_bytes'] = max(abs(r['sent_over_required'] - 1) for r in rows)
    return out


def _targets_markdown(targets: Sequence[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        value = t['measured']
        shown = ('not measured' if value is None
                 else (f'{value:+.2%}' if t['key'].startswith('step') else f'{value:.3g}'))
        rows.append([t['what'], t['target'], shown, {None: '-', True: 'met', False: '**missed**'}[t['met']]])
    return '### Targets\n\n' + md_table(['target', 'wanted', 'measured', ''], rows)


def _launched_world() -> int:
    """World size given by a launcher (``composer -n N``), 1 when run alone."""
    return int(os.environ.get('WORLD_SIZE', '1'))


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', choices=['op', 'exchange', 'step', 'mixup', 'all'], default='all',
                   help='what to measure')
    p.add_argument('--quick', action='store_true', help='tiny sizes and few iterations (a smoke run)')
    p.add_argument('--iters', type=int, default=None,
                   help='iterations per measurement: op calls, exchange steps, measured train batches')
    p.add_argument('--threads', type=int, default=1,
                   help='torch.set_num_threads, here and in every spawned rank (default 1: one core per rank)')
    p.add_argument('--op-shapes', type=parse_shapes, default=None, help='e.g. 256x3x32x32,64x3x224x224')
    p.add_argument('--layouts', default=','.join(LAYOUTS), help=f'op layouts, from {",".join(LAYOUTS)}')
    p.add_argument('--exchange-shapes', type=parse_shapes, default=None, help='per-rank batch shapes')
    p.add_argument('--worlds', default=None, help='exchange world sizes, e.g. 2,4')
    p.add_argument('--step-batch-size', type=int, default=None, help='global batch of the train step')
    p.add_argument('--step-model', choices=['resnet18', 'tiny'], default=None)
    p.add_argument('--device', choices=DEVICES, default='cpu',
                   help='where the op part runs: cpu (wall clock) or cuda (CUDA events); the exchange and step '
                        'parts run on CPU gloo ranks either way')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', type=Path, default=None, help='write all measurements here')
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.op_shapes = args.op_shapes or base['op_shapes']
    args.exchange_shapes = args.exchange_shapes or base['exchange_shapes']
    args.mixup_worlds = [int(w) for w in args.worlds.split(',')] if args.worlds else base['mixup_worlds']
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
                         f'got --part {args.part}. Run the other parts as `python launch/benchmarks/benchmark.py`.')
    torch.set_num_threads(args.threads)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group('gloo', timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = exchange_rank(rank, world, args.exchange_shapes, args.exchange_iters, args.warmup, args.seed)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    rows = combine_exchange(world, gathered)
    report = {'environment': environment(args.threads), 'exchange': rows,
              'targets': _targets([], rows, [])}
    if rank == 0:
        print(exchange_markdown(rows, f'Ranks from the launcher (W = {world}), {args.threads} thread(s) each.'))
        measured = [t for t in report['targets'] if t['measured'] is not None]
        if measured:
            print()
            print(_targets_markdown(measured))
        _write_json(args.json, report)
    dist.barrier()
    if created:  # a group someone else made is theirs to tear down (a gloo teardown racing a peer can hang)
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
    op_device = args.device if args.part in ('op', 'all') else 'cpu'
    check_device(op_device)  # before anything runs: --device cuda needs CUDA
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = environment(args.threads, op_device)
    gpu = f" The op on {env['gpu']} (CUDA {env['cuda']}), timed with CUDA events." if op_device == 'cuda' else ''
    print(f"## dist_cutmix benchmark\n\ntorch {env['torch']}, composer {env['composer']}, timm {env['timm']}, "
          f"torchvision {env['torchvision']}; {env['cpu']}, {env['cpus']} CPUs; "
          f"torch.set_num_threads({args.threads}) in this process and in every spawned rank.{gpu}"
          f"{' Quick run (tiny sizes).' if args.quick else ''}\n", flush=True)
    op: list[dict[str, Any]] = []
    exchange: list[dict[str, Any]] = []
    step: list[dict[str, Any]] = []
    mixup_op: list[dict[str, Any]] = []
    mixup_exchange: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    if args.part in ('op', 'all'):
        t0 = time.perf_counter()
        op = run_op(args.op_shapes, args.op_iters, warmup=args.warmup, seed=args.seed, layouts=args.layouts,
                    device=args.device)
        seconds['op'] = time.perf_counter() - t0
        print(op_markdown(op) + '\n', flush=True)
    if args.part in ('exchange', 'all'):
        t0 = time.perf_counter()
        exchange = run_exchange(args.worlds, args.exchange_shapes, args.exchange_iters, warmup=args.warmup,
                                seed=args.seed, threads=args.threads)
        seconds['exchange'] = time.perf_counter() - t0
        print(exchange_markdown(exchange, f'Spawned gloo ranks on this machine ({os.cpu_count()} CPUs), '
                                           f'{args.threads} thread(s) each.') + '\n', flush=True)
    if args.part in ('step', 'all'):
        t0 = time.perf_counter()
        step = run_step(args.step_batch_size, args.step_batches, warmup=args.step_warmup, rounds=args.step_rounds,
                        model=args.step_model, seed=args.seed, threads=args.threads)
        seconds['step'] = time.perf_counter() - t0
        print(step_markdown(step) + '\n', flush=True)
    if args.part in ('mixup', 'all'):
        t0 = time.perf_counter()
        mixup_op = run_mixup_op(args.op_shapes, args.op_iters, warmup=args.warmup, seed=args.seed)
        print(mixup_op_markdown(mixup_op) + '\n', flush=True)
        mixup_exchange = run_mixup_exchange(args.mixup_worlds, args.exchange_shapes, args.exchange_iters,
                                            warmup=args.warmup, seed=args.seed, threads=args.threads)
        print(mixup_exchange_markdown(mixup_exchange, f'Spawned gloo ranks on this machine ({os.cpu_count()} CPUs), '
                                                      f'{args.threads} thread(s) each.') + '\n', flush=True)
        seconds['mixup'] = time.perf_counter() - t0
    targets = _targets(op, exchange, step, mixup_op, mixup_exchange)
    seconds['total'] = time.perf_counter() - started
    print(_targets_markdown(targets))
    print(f"\nRun time: {seconds['total']:.0f} s (" + ', '.join(f'{k} {v:.0f} s' for k, v in seconds.items()
                                                        if k != 'total') + ').')
    report = {'environment': env, 'args': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              'op': op, 'exchange': exchange, 'step': step, 'mixup_op': mixup_op, 'mixup_exchange': mixup_exchange,
              'targets': targets, 'seconds': seconds}
    _write_json(args.json, report)
    return report


if __name__ == '__main__':
    main()
