"""Does a λ and a box per sample calm the training loss at a large global batch? Batch vs per-sample, measured.

With one box and one λ for the whole global batch, every step's batch is as mixed as its one draw
says: a step with λ near 0.5 mixes every image half and half, the next one with λ near 1 hardly
mixes at all, and the loss jumps with the draw. With ``CutMix(per_sample=True)`` every sample draws
its own, so the batch-mean λ barely moves (its std shrinks by about √N). This script measures what
that does to the loss on a real task: ``--world-size`` CPU ranks (gloo, one thread each) train
``launch/train.py``'s network on MNIST with global CutMix at ``--batch-size`` images per rank, once
with batch-mode CutMix and once with ``per_sample=True`` (and, as a reference, once without CutMix),
for the same ``--steps`` steps, per seed. Runs of one seed share initial weights and data order;
only the mixing differs.

Per run it records the train loss of every step (the global batch mean, as Composer logs it) and
the batch-mean λ (``cutmix/lambda``; in global per-sample mode each rank logs the mean over its own
samples, so the global-batch mean is the mean over the ranks), and reports their spread over steps:
the standard deviation, and the standard deviation of step-to-step differences (which removes the
loss's downward trend), per seed and as mean ± std over seeds. It writes OUT.json, OUT.md and a
PNG of the loss curves and the λ series::

    python launch/experiments/loss_spread.py                # 4 ranks x 64, 3 seeds, 120 steps a run: ~10 min on 2 cores
    python launch/experiments/loss_spread.py --quick        # 2 ranks x 8, 1 seed, 6 steps: a smoke test
    python launch/experiments/loss_spread.py --report-only  # redo OUT.md and the PNG from OUT.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

if __package__ in (None, ''):  # run as a script: make `launch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch import train  # noqa: E402
from launch.tools.spawn import answer_cpuinfo_from_constant, run_ranks  # noqa: E402

__all__ = ['build_parser', 'configurations', 'lambda_std_per_sample', 'main', 'markdown_table', 'run_configurations',
           'spread', 'summarize']

VARIANTS = ('batch', 'per-sample', 'none')
OUT = 'docs/results/loss_spread_results'
PLOT = 'docs/images/loss_spread.png'
QUICK_OUT = 'runs/loss_spread_quick'
QUICK = {'world_size': 2, 'batch_size': 8, 'steps': 6, 'seeds': [0], 'train_samples': 64, 'eval_samples': 20}
COLORS = {'batch': 'tab:red', 'per-sample': 'tab:blue', 'none': 'tab:gray'}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='launch/experiments/loss_spread.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--world-size', type=int, default=4, help='CPU ranks (gloo)')
    p.add_argument('--batch-size', type=int, default=64, help='images per rank per step')
    p.add_argument('--steps', type=int, default=120, help='training steps per run')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--variants', nargs='+', choices=VARIANTS, default=['batch', 'per-sample', 'none'],
                   help="'batch': one λ and box per global batch; 'per-sample': CutMix(per_sample=True); "
                        "'none': no CutMix (a reference)")
    p.add_argument('--alpha', type=float, default=1.0)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--train-samples', type=int, default=None,
                   help='class-balanced training subset (default: all 4,000)')
    p.add_argument('--eval-samples', type=int, default=None, help='evaluation subset (default: all 1,000)')
    p.add_argument('--quick', action='store_true',
                   help=f'a smoke test: {QUICK}; writes {QUICK_OUT}.* unless --out/--plot say otherwise')
    p.add_argument('--out', default=None, help=f'writes OUT.json and OUT.md (default {OUT})')
    p.add_argument('--plot', default=None, help=f'the PNG (default {PLOT})')
    p.add_argument('--deadline', type=float, default=1800.0, help='seconds before the ranks are stopped')
    p.add_argument('--report-only', action='store_true', help='only redo OUT.md and the PNG from an existing OUT.json')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.out = args.out or (QUICK_OUT if args.quick else OUT)
    args.plot = args.plot or (QUICK_OUT + '.png' if args.quick else PLOT)
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (seed, variant), seeds outermost, so a stopped run has whole seeds."""
    return [{'seed': s, 'variant': v} for s in args.seeds for v in args.variants]


def _train_args(args: argparse.Namespace, config: dict[str, Any]) -> argparse.Namespace:
    duration = f'{args.steps}ba'
    argv = [
        '--mode', 'none' if config['variant'] == 'none' else 'global', '--alpha', str(args.alpha),
        '--batch-size', str(args.batch_size), '--duration', duration, '--eval-interval', duration,
        '--seed', str(config['seed']), '--width', str(args.width),
        '--threads', '1', '--device', 'cpu', '--no-progress-bar', '--no-train-metrics',
    ]
    if config['variant'] == 'per-sample':
        argv.append('--per-sample')
    for flag, value in (('--train-samples', args.train_samples), ('--eval-samples', args.eval_samples)):
        if value is not None:
            argv += [flag, str(value)]
    return train.parse_args(argv)


# ----------------------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, std over steps, and std of the step-to-step differences (sample std, ddof=1)."""
    x = np.asarray(values, dtype=np.float64)
    return {
        'mean': float(x.mean()) if x.size else None,
        'std': float(x.std(ddof=1)) if x.size > 1 else None,
        'diff_std': float(np.diff(x).std(ddof=1)) if x.size > 2 else None,
    }


def _entropy(lam: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the soft label λ·y + (1-λ)·y': the least loss a step with batch λ can reach."""
    lam = np.clip(lam, 1e-12, 1 - 1e-12)
    return -(lam * np.log(lam) + (1 - lam) * np.log(1 - lam))


@functools.lru_cache(maxsize=8)
def lambda_std_per_sample(alpha: float, height: int = 28, width: int = 28, n: int = 200_000) -> float:
    """The std of one sample's label weight λ_i (the pixel share on the 2**-10 grid), from ``n`` draws."""
    from dist_cutmix import functional as F
    from dist_cutmix.draw import on_label_grid

    g = torch.Generator().manual_seed(12345)
    params = F.sample_params_per_sample(n, height, width, alpha=alpha, generator=g)
    return float(on_label_grid(params.lam).std())


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]], global_batch: int, lambda_std: Optional[float]) -> dict[str, Any]:
    """Per variant: each statistic as mean ± std over seeds; per seed: per-sample / batch ratios."""
    keys = ('loss_std', 'loss_diff_std', 'loss_diff_std_2nd_half', 'lambda_std', 'lambda_diff_std',
            'lambda_rank0_std', 'eval_accuracy', 'final_loss', 'wall_s')
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        group = [r for r in runs if r['variant'] == variant]
        if group:
            by_variant[variant] = {'seeds': [r['seed'] for r in group]}
            for key in keys:
                mean, std = _mean_std([r['stats'].get(key) for r in group])
                by_variant[variant][key] = {'mean': mean, 'std': std}
    ratios: dict[str, dict[str, float]] = {}
    paired = {(r['seed'], r['variant']): r for r in runs}
    for key in ('loss_std', 'loss_diff_std', 'loss_diff_std_2nd_half', 'lambda_std'):
        per_seed = {}
        for seed in sorted({r['seed'] for r in runs}):
            b, p = paired.get((seed, 'batch')), paired.get((seed, 'per-sample'))
            if b and p and b['stats'].get(key) and p['stats'].get(key) is not None:
                per_seed[str(seed)] = p['stats'][key] / b['stats'][key]
        if per_seed:
            mean, std = _mean_std(list(per_seed.values()))
            ratios[key] = {'per_seed': per_seed, 'mean': mean, 'std': std}
    # How much of batch mode's step-to-step loss change the λ draw explains: Δloss against Δentropy(λ).
    dl, dh = [], []
    for r in runs:
        if r['variant'] == 'batch' and len(r['loss']) > 2:
            dl.append(np.diff(r['loss']))
            dh.append(np.diff(_entropy(np.asarray(r['lambda']))))
    r2 = float(np.corrcoef(np.concatenate(dl), np.concatenate(dh))[0, 1] ** 2) if dl else None
    expected = None if lambda_std is None else {
        'per_sample_lambda_std': lambda_std,
        'global_batch_mean_std': lambda_std / math.sqrt(global_batch),
    }
    return {'by_variant': by_variant, 'per_sample_over_batch': ratios, 'batch_loss_diff_r2_on_label_entropy': r2,
            'expected_lambda_std': expected}


def _run_stats(loss: list[float], lam: list[float], lam_rank0: list[float]) -> dict[str, Optional[float]]:
    s_loss, s_lam, s_rank0 = spread(loss), spread(lam), spread(lam_rank0)
    half = spread(loss[len(loss) // 2:])
    return {
        'loss_std': s_loss['std'], 'loss_diff_std': s_loss['diff_std'], 'loss_diff_std_2nd_half': half['diff_std'],
        'lambda_mean': s_lam['mean'], 'lambda_std': s_lam['std'], 'lambda_diff_std': s_lam['diff_std'],
        'lambda_rank0_std': s_rank0['std'],
    }


# ----------------------------------------------------------------------------- the ranks


def run_configurations(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every configuration on this rank (inside an initialised process group); rank 0 saves as it goes."""
    import logging

    import torch.distributed as torch_dist

    logging.getLogger('composer').setLevel(logging.ERROR)
    warnings.filterwarnings('ignore')  # the per-run Composer warnings would drown the progress lines
    configs = configurations(args)
    results: list[dict[str, Any]] = []
    for i, config in enumerate(configs):
        summary = train.main(_train_args(args, config), series=True)
        # Each rank logged the mean λ of the samples it holds; the global batch's mean is their mean.
        per_rank: list[Any] = [None] * world_size
        torch_dist.all_gather_object(per_rank, summary['series']['cutmix_lambda'])
        lam_rank0 = per_rank[0]
        lam = [statistics.fmean(step) for step in zip(*per_rank, strict=True)] if lam_rank0 else []
        loss = summary['series']['loss']
        results.append({
            **config, 'loss': loss, 'lambda': lam, 'lambda_rank0': lam_rank0,
            'stats': {**_run_stats(loss, lam, lam_rank0), 'eval_accuracy': summary['eval_accuracy'],
                      'final_loss': loss[-1] if loss else None, 'wall_s': summary['wall_s']},
            'steps': summary['batches'], 'global_batch_size': summary['global_batch_size'], 'lr': summary['lr'],
            'world_size': summary['world_size'], 'samples_seen': summary['samples_seen'],
            'train_samples': summary['train_samples'], 'eval_samples': summary['eval_samples'],
        })
        if rank == 0:
            st = results[-1]['stats']
            lam_text = '' if st['lambda_std'] is None else f', λ std {st["lambda_std"]:.4f}'
            print(f'[launch/loss_spread] {i + 1}/{len(configs)} {config["variant"]:<10} seed={config["seed"]}: '
                  f'loss std {st["loss_std"]:.4f}, Δloss std {st["loss_diff_std"]:.4f}{lam_text} '
                  f'({summary["batches"]} steps, {summary["wall_s"]:.1f} s)', flush=True)
            _write(args, results, done=False)
    if rank == 0:
        _write(args, results, done=True)
    return results


# ----------------------------------------------------------------------------- report


def _pm(stat: dict[str, Optional[float]], digits: int = 4) -> str:
    if stat['mean'] is None:
        return '–'
    return f'{stat["mean"]:.{digits}f} ± {stat["std"]:.{digits}f}'


def markdown_table(payload: dict[str, Any]) -> str:
    """The summary table (mean ± std over seeds), the paired ratios, and one row per run."""
    summary, runs = payload['summary'], payload['runs']
    lines = [
        '| CutMix | loss std over steps | std of step-to-step Δloss | Δloss std, 2nd half | batch-mean λ std '
        '| Δλ std | λ std as logged on rank 0 | final loss | eval accuracy | seeds |',
        '|:---|:---|:---|:---|:---|:---|:---|:---|:---|---:|',
    ]
    for variant, s in summary['by_variant'].items():
        acc = s['eval_accuracy']
        lines.append(
            f'| {variant} | {_pm(s["loss_std"])} | {_pm(s["loss_diff_std"])} | {_pm(s["loss_diff_std_2nd_half"])} | '
            f'{_pm(s["lambda_std"])} | {_pm(s["lambda_diff_std"])} | {_pm(s["lambda_rank0_std"])} | '
            f'{_pm(s["final_loss"], 3)} | {100 * acc["mean"]:.1f} ± {100 * acc["std"]:.1f} % | {len(s["seeds"])} |',
        )
    out = '\n'.join(lines) + '\n'
    ratios = summary['per_sample_over_batch']
    if ratios:
        out += '\nPer-sample ÷ batch, same seed (mean ± std over seeds; per seed in brackets):\n\n'
        names = {'loss_std': 'loss std over steps', 'loss_diff_std': 'std of step-to-step Δloss',
                 'loss_diff_std_2nd_half': 'Δloss std, 2nd half', 'lambda_std': 'batch-mean λ std'}
        for key, r in ratios.items():
            seeds = ', '.join(f'{v:.2f}' for v in r['per_seed'].values())
            out += f'* {names[key]}: {r["mean"]:.2f} ± {r["std"]:.2f} ({seeds})\n'
    expected = summary.get('expected_lambda_std')
    if expected:
        out += (f'\nOne sample\'s λ has std {expected["per_sample_lambda_std"]:.4f} '
                f'(α = {payload["setup"]["alpha"]}, '
                f'28×28, from 200,000 draws); the mean of {payload["runs"][0]["global_batch_size"]} independent '
                f'ones, {expected["global_batch_mean_std"]:.4f}.\n')
    if summary.get('batch_loss_diff_r2_on_label_entropy') is not None:
        out += (f'Batch mode: the λ draw (the entropy of the soft label, H(λ)) explains R² = '
                f'{summary["batch_loss_diff_r2_on_label_entropy"]:.2f} of the step-to-step loss changes '
                f'(Δloss against ΔH(λ), all seeds pooled).\n')
    out += ('\n| CutMix | seed | loss std | Δloss std | Δloss std, 2nd half | λ std | final loss | eval accuracy '
            '| wall |\n')
    out += '|:---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
    for r in runs:
        st = r['stats']
        lam = '–' if st['lambda_std'] is None else f'{st["lambda_std"]:.4f}'
        out += (f'| {r["variant"]} | {r["seed"]} | {st["loss_std"]:.4f} | {st["loss_diff_std"]:.4f} | '
                f'{st["loss_diff_std_2nd_half"]:.4f} | {lam} | {st["final_loss"]:.3f} | '
                f'{100 * st["eval_accuracy"]:.1f} % | {st["wall_s"]:.0f} s |\n')
    return out


def _header(payload: dict[str, Any]) -> str:
    setup, runs = payload['setup'], payload['runs']
    r0 = runs[0]
    return (
        f'{len(runs)} runs on {r0["world_size"]} CPU ranks (gloo, 1 thread each), global mode (none: no CutMix), '
        f'{setup["batch_size"]} images per rank = global batch {r0["global_batch_size"]}, {r0["steps"]} steps a run '
        f'(lr {r0["lr"]:g}, cosine with 10 % warm-up), α = {setup["alpha"]}; {r0["train_samples"]} training images, '
        f'eval on {r0["eval_samples"]}. Spread = sample std over the steps of one run, then mean ± std over seeds.'
        f'{"" if payload["complete"] else " (incomplete)"}\n\n'
    )


def plot(payload: dict[str, Any], path: str, dpi: int = 110) -> Path:
    """Loss curves (first seed bold, others faint), step-to-step Δloss, and the global batch-mean λ."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = payload['runs']
    first = runs[0]['seed']
    fig, axes = plt.subplots(3, 1, figsize=(8, 9.5), sharex=True)
    for r in runs:
        bold = r['seed'] == first
        kw = dict(color=COLORS[r['variant']], alpha=1.0 if bold else 0.3, linewidth=1.6 if bold else 0.9,
                  label=f'{r["variant"]}' if bold else None)
        steps = np.arange(1, len(r['loss']) + 1)
        axes[0].plot(steps, r['loss'], **kw)
        axes[1].plot(steps[1:], np.diff(r['loss']), **kw)
        if r['lambda']:
            axes[2].plot(steps, r['lambda'], **kw)
    s = payload['summary']['by_variant']
    legend = ', '.join(f'{v}: {_pm(x["loss_diff_std"], 3)}' for v, x in s.items())
    axes[0].set_ylabel('train loss (global batch mean)')
    axes[0].set_title(f'seed {first} bold, other seeds faint', fontsize=9)
    axes[0].legend()
    axes[1].set_ylabel('Δ loss, step to step')
    axes[1].axhline(0, color='black', linewidth=0.5)
    axes[1].set_title(f'std of Δloss (mean ± std over seeds) — {legend}', fontsize=9)
    axes[2].set_ylabel('batch-mean λ (global batch)')
    axes[2].set_xlabel('training step')
    lam = ', '.join(f'{v}: {_pm(x["lambda_std"], 3)}' for v, x in s.items() if x['lambda_std']['mean'] is not None)
    axes[2].set_title(f'std of batch-mean λ over steps — {lam}', fontsize=9)
    r0 = runs[0]
    per_rank = r0['global_batch_size'] // r0['world_size']
    fig.suptitle(f'Batch vs per-sample CutMix, global mode: {r0["world_size"]} ranks × {per_rank} = '
                 f'{r0["global_batch_size"]} images a step', fontsize=11)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _write(args: argparse.Namespace, results: list[dict[str, Any]], done: bool) -> None:
    import composer

    global_batch = results[0]['global_batch_size']
    lambda_std = lambda_std_per_sample(args.alpha) if args.alpha > 0 else None
    setup = {k: v for k, v in vars(args).items() if k not in ('out', 'plot', 'deadline', 'report_only')}
    payload = {
        'setup': setup, 'versions': {'torch': torch.__version__, 'composer': composer.__version__},
        'complete': done, 'summary': summarize(results, global_batch, lambda_std), 'runs': results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(payload, indent=1) + '\n')
    _report(args, payload)


def _report(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    Path(args.out).with_suffix('.md').write_text(_header(payload) + markdown_table(payload))
    plot(payload, args.plot)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Spawn the ranks, run every configuration, and return what was written to ``OUT.json``."""
    args = parse_args(argv)
    if args.report_only:
        payload = json.loads(Path(args.out).with_suffix('.json').read_text())
        _report(args, payload)
        print(Path(args.out).with_suffix('.md').read_text(), flush=True)
        return payload
    if args.world_size < 2 or args.batch_size < 1 or args.steps < 3:
        raise ValueError(f'need --world-size >= 2, --batch-size >= 1 and --steps >= 3, got {args.world_size}, '
                         f'{args.batch_size} and {args.steps}')
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_ranks(run_configurations, args.world_size, tmp, args, deadline_s=args.deadline,
                      collective_timeout_s=120.0, setup=answer_cpuinfo_from_constant)
        except RuntimeError as err:
            if time.perf_counter() - start > args.deadline:
                raise TimeoutError(f'ran past --deadline={args.deadline} s; partial results are in {args.out}.json') \
                    from err
            raise
    payload = json.loads(Path(args.out).with_suffix('.json').read_text())
    elapsed = time.perf_counter() - start
    print(f'[launch/loss_spread] {len(payload["runs"])} runs in {elapsed:.0f} s; wrote '
          f'{Path(args.out).with_suffix(".json")}, {Path(args.out).with_suffix(".md")} and {args.plot}\n', flush=True)
    print(Path(args.out).with_suffix('.md').read_text(), flush=True)
    return payload


if __name__ == '__main__':
    main(sys.argv[1:])
