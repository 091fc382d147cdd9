"""Does mixing across ranks help when each rank's batch is tiny? No CutMix vs local vs global, measured.

On ``--world-size`` CPU ranks (gloo, one thread each), train ``launch/train.py``'s network for every
combination of mode (``none``, ``local``, ``global``), per-rank batch size (1 and 8) and seed, on a
class-balanced training subset, for the same number of epochs, so every configuration sees the
same number of samples. The learning rate follows train.py's linear scaling with the global batch
(0.1 per 32 samples), so a smaller batch takes proportionally more, smaller steps. Each run reports
its final eval accuracy on the 1,000 held-out images; the script writes all runs to JSON and a
markdown table of mean ± std over seeds::

    python launch/experiments/experiment.py                       # 18 runs on 4 ranks, ~13 min on 2 cores
    python launch/experiments/experiment.py --seeds 0 --epochs 1  # a quick look

At a per-rank batch of 1 there is no partner on the rank: ``local`` CutMix leaves every image
as it is (and warns), so it is ``none`` in disguise; ``global`` still mixes, with partners on
other ranks. The ranks are spawned once and run every configuration in turn (a fresh Trainer,
model and seed each time), which saves ~10 s of imports per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

if __package__ in (None, ''):  # run as a script: make `launch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch import train  # noqa: E402
from launch.tools.spawn import answer_cpuinfo_from_constant, run_ranks  # noqa: E402

__all__ = ['build_parser', 'configurations', 'main', 'markdown_table', 'run_configurations']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='launch/experiments/experiment.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--world-size', type=int, default=4, help='CPU ranks (gloo)')
    p.add_argument('--modes', nargs='+', choices=('none', 'local', 'global'), default=['none', 'local', 'global'])
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8], help='per-rank batch sizes')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--train-samples', type=int, default=960,
                   help='class-balanced training subset; a multiple of world size x each batch size')
    p.add_argument('--eval-samples', type=int, default=None, help='evaluation subset (default: all 1,000)')
    p.add_argument('--epochs', type=int, default=8, help='epochs over the subset, the same for every configuration')
    p.add_argument('--alpha', type=float, default=1.0)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--out', default='docs/results/experiment_results', help='writes OUT.json and OUT.md')
    p.add_argument('--deadline', type=float, default=3600.0, help='seconds before the ranks are stopped')
    p.add_argument('--table-only', action='store_true', help='only rewrite OUT.md from an existing OUT.json')
    return p


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (seed, batch size, mode), seeds outermost, so a stopped experiment has whole seeds."""
    return [{'seed': s, 'batch_size': b, 'mode': m} for s in args.seeds for b in args.batch_sizes for m in args.modes]


def _train_args(args: argparse.Namespace, config: dict[str, Any]) -> argparse.Namespace:
    duration = f'{args.epochs}ep'
    argv = [
        '--mode', config['mode'], '--alpha', str(args.alpha), '--batch-size', str(config['batch_size']),
        '--duration', duration, '--eval-interval', duration, '--seed', str(config['seed']),
        '--train-samples', str(args.train_samples), '--width', str(args.width),
        '--threads', '1', '--device', 'cpu', '--no-progress-bar', '--no-train-metrics',
    ]
    if args.eval_samples is not None:
        argv += ['--eval-samples', str(args.eval_samples)]
    return train.parse_args(argv)


def run_configurations(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every configuration on this rank (inside an initialised process group); rank 0 saves as it goes."""
    import logging

    logging.getLogger('composer').setLevel(logging.ERROR)
    warnings.filterwarnings('ignore')  # the per-run Composer warnings would drown the progress lines
    configs = configurations(args)
    results: list[dict[str, Any]] = []
    for i, config in enumerate(configs):
        summary = train.main(_train_args(args, config))
        results.append(summary)
        if rank == 0:
            print(f'[launch/experiment] {i + 1}/{len(configs)} mode={config["mode"]:<6} '
                  f'batch/rank={config["batch_size"]} '
                  f'seed={config["seed"]}: eval accuracy {summary["eval_accuracy"]:.4f} '
                  f'({summary["samples_seen"]} samples, {summary["batches"]} steps, {summary["wall_s"]:.1f} s)',
                  flush=True)
            _write(args, results, world_size, done=False)
    if rank == 0:
        _write(args, results, world_size, done=True)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(results: list[dict[str, Any]], world_size: int) -> str:
    """One row per (per-rank batch, mode): eval accuracy mean ± std over seeds, the paired gap to no CutMix, the rest.

    The gap pairs runs of the same seed (same initial weights and data order) and batch size.
    """
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r['batch_size_per_rank'], r['mode']), []).append(r)
    baseline = {(r['batch_size_per_rank'], r['seed']): r['eval_accuracy'] for r in results if r['mode'] == 'none'}
    lines = [
        '| batch / rank | global batch | mode | eval accuracy (mean ± std) | vs none, same seed | seeds | samples seen '
        '| steps | wall / run |',
        '|---:|---:|:---|:---|:---|---:|---:|---:|---:|',
    ]
    order = ('none', 'local', 'global', 'node')
    for (b, mode), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        mean, std = _mean_std([r['eval_accuracy'] for r in runs])
        gaps = [r['eval_accuracy'] - baseline[(b, r['seed'])] for r in runs if (b, r['seed']) in baseline]
        gap = '–' if mode == 'none' or not gaps else '{:+.1f} ± {:.1f} pts'.format(*(100 * v for v in _mean_std(gaps)))
        wall = statistics.fmean(r['wall_s'] for r in runs)
        lines.append(
            f'| {b} | {b * world_size} | {mode} | {100 * mean:.1f} ± {100 * std:.1f} % | {gap} | {len(runs)} | '
            f'{runs[0]["samples_seen"]} | {runs[0]["batches"]} | {wall:.0f} s |',
        )
    return '\n'.join(lines) + '\n'


def _write(args: argparse.Namespace, results: list[dict[str, Any]], world_size: int, done: bool) -> None:
    import composer

    import dist_cutmix

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k not in ('out', 'deadline', 'table_only')}
    versions = {'torch': torch.__version__, 'composer': composer.__version__, 'dist_cutmix': dist_cutmix.__file__}
    payload = {'setup': setup, 'versions': versions, 'complete': done, 'runs': results}
    out.with_suffix('.json').write_text(json.dumps(payload, indent=2) + '\n')
    _write_table(out, payload)


def _write_table(out: Path, payload: dict[str, Any]) -> None:
    setup, results = payload['setup'], payload['runs']
    world_size = results[0]['world_size']
    header = (
        f'{len(results)} runs on {world_size} CPU ranks (gloo, 1 thread each); {setup["train_samples"]} training '
        f'images, {setup["epochs"]} epochs, alpha={setup["alpha"]}; eval on {results[0]["eval_samples"]} held-out '
        f'images.{"" if payload["complete"] else " (incomplete)"}\n\n'
    )
    out.with_suffix('.md').write_text(header + markdown_table(results, world_size))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Spawn the ranks, run every configuration, and return what was written to ``OUT.json``."""
    args = build_parser().parse_args(argv)
    if args.table_only:
        payload = json.loads(Path(args.out).with_suffix('.json').read_text())
        _write_table(Path(args.out), payload)
        print(Path(args.out).with_suffix('.md').read_text(), flush=True)
        return payload
    if args.world_size < 2:
        raise ValueError(f'--world-size must be >= 2 to compare local and global mixing, got {args.world_size}')
    uneven = [b for b in args.batch_sizes if b < 1 or args.train_samples % (args.world_size * b)]
    if uneven:
        # Otherwise drop_last would drop a different number of samples per batch size.
        raise ValueError(
            f'--train-samples must be a multiple of world size x batch size so that every configuration sees the '
            f'same samples, got --train-samples={args.train_samples}, --world-size={args.world_size}, '
            f'batch sizes {uneven}',
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # Every Trainer asks py-cpuinfo about the CPU (~1 s a rank, 18 times): answer from a constant.
            run_ranks(run_configurations, args.world_size, tmp, args, deadline_s=args.deadline,
                      collective_timeout_s=120.0, setup=answer_cpuinfo_from_constant)
        except RuntimeError as err:
            if time.perf_counter() - start > args.deadline:
                raise TimeoutError(f'the experiment ran past --deadline={args.deadline} s; partial results are in '
                                   f'{args.out}.json') from err
            raise
    payload = json.loads(Path(args.out).with_suffix('.json').read_text())
    print(f'[launch/experiment] {len(payload["runs"])} runs in {time.perf_counter() - start:.0f} s; '
          f'wrote {Path(args.out).with_suffix(".json")} and {Path(args.out).with_suffix(".md")}\n', flush=True)
    print(Path(args.out).with_suffix('.md').read_text(), flush=True)
    return payload


if __name__ == '__main__':
    main(sys.argv[1:])
