"""Draw one real global-mode CutMix step on 2 gloo ranks as a PNG grid.

Each rank takes its own few MNIST training images, and the ranks call
:func:`dist_cutmix.mixer.mix_batch_across_group` together, exactly as ``CutMix(mode='global')``
does at a training step. Rank 0 gathers every rank's originals and mixed images and draws, per
rank, a row of originals and a row of mixed images with the pasted box outlined, each captioned
``rank r #i ← rank p #j, λ=…`` (whose crop it received) and with its soft target. With
``--per-sample`` the step is ``CutMix(mode='global', per_sample=True)``'s: every image has its own
box and λ, and the default PNG is ``launch/cutmix_grid_per_sample.png``::

    python launch/visualize.py --out launch/cutmix_grid.png     # spawns 2 ranks itself
    python launch/visualize.py --per-sample                     # writes launch/cutmix_grid_per_sample.png
    composer -n 2 launch/visualize.py --out grid.png            # or let Composer's launcher start them
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as torch_dist

if __package__ in (None, ''):  # run as a script: make `launch` and `dist_cutmix` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.spawn import run_ranks  # noqa: E402
from launch.train import MNIST_MEAN, MNIST_STD, NUM_CLASSES, load_mnist  # noqa: E402

__all__ = ['build_parser', 'default_out', 'draw_grid', 'main', 'mix_on_rank']

OUT = 'launch/cutmix_grid.png'
OUT_PER_SAMPLE = 'launch/cutmix_grid_per_sample.png'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='launch/visualize.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', default=None, help=f'PNG to write (default {OUT}, or {OUT_PER_SAMPLE} with --per-sample)')
    p.add_argument('--per-sample', action='store_true',
                   help='draw a per-sample step (CutMix(per_sample=True)): every image its own box and λ')
    p.add_argument('--world-size', type=int, default=2, help='ranks to spawn (ignored under a launcher)')
    p.add_argument('--per-rank', type=int, default=5, help='images per rank')
    p.add_argument('--alpha', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=1, help='mixing seed (as CutMix(seed=...)); 1 draws a central box')
    p.add_argument('--batch', type=int, default=0, help='the training step whose mixing is drawn')
    p.add_argument('--dpi', type=int, default=110)
    return p


def default_out(args: argparse.Namespace) -> str:
    """``--out``, else the committed picture for the chosen mode."""
    return args.out or (OUT_PER_SAMPLE if args.per_sample else OUT)


def mix_on_rank(rank: int, world_size: int, per_rank: int, seed: int, batch: int, alpha: float,
                per_sample: bool = False) -> dict[str, Any]:
    """One rank's part of a global mixing step; returns what it had, what it got, and from where.

    With ``per_sample=True``, ``lam`` is a ``(per_rank,)`` tensor and ``box`` a ``(per_rank, 4)``
    tensor of ``(y0, y1, x0, x1)`` rows, one per image of this rank.
    """
    from dist_cutmix.mixer import mix_batch_across_group

    train, _ = load_mnist(train_samples=per_rank * world_size)
    images, labels = train.tensors
    # Rank r holds every world_size-th image, as a DistributedSampler without shuffling would give it.
    own_x, own_y = images[rank::world_size].clone(), labels[rank::world_size].clone()
    result = mix_batch_across_group(own_x, own_y, seed=seed, batch=batch, alpha=alpha, num_classes=NUM_CLASSES,
                                    per_sample=per_sample)
    return {
        'rank': rank, 'original': own_x, 'label': own_y, 'mixed': result.input, 'target': result.target,
        'partner_rank': result.partner_rank, 'partner_index': result.partner_index,
        'partner_label': result.partner_target, 'lam': result.lam, 'box': result.box,
        'cross_rank_fraction': result.cross_rank_fraction, 'per_sample': per_sample,
    }


def _gather_to_rank0(record: dict[str, Any], world_size: int) -> Optional[list[dict[str, Any]]]:
    out: Optional[list[Any]] = [None] * world_size if torch_dist.get_rank() == 0 else None
    torch_dist.gather_object(record, out, dst=0)
    return out


def draw_grid(records: list[dict[str, Any]], out: str, dpi: int = 110) -> Path:
    """Per rank, a row of originals and a row of mixed images with the box in red; returns the path.

    Records from a per-sample step (``record['per_sample']``) carry a box and a λ per image, and
    each mixed image is outlined and captioned with its own.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    world, n = len(records), records[0]['original'].shape[0]
    fig, axes = plt.subplots(2 * world, n, figsize=(2.3 * n, 2.75 * 2 * world), squeeze=False)
    per_sample = bool(records[0].get('per_sample'))
    for rec in records:
        r = rec['rank']
        for i in range(n):
            for row, key in ((2 * r, 'original'), (2 * r + 1, 'mixed')):
                ax = axes[row][i]
                img = (rec[key][i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1)
                ax.imshow(img.numpy(), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
                ax.set_xticks([])
                ax.set_yticks([])
                if key == 'original':
                    ax.set_title(f'rank {r} #{i}: digit {int(rec["label"][i])}', fontsize=9)
                    continue
                y0, y1, x0, x1 = (int(v) for v in rec['box'][i]) if per_sample else rec['box']
                lam = float(rec['lam'][i]) if per_sample else rec['lam']
                # imshow puts pixel (y, x) at [x - .5, x + .5]: the box covers rows y0..y1-1, columns x0..x1-1.
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor='red',
                                       linewidth=2))
                p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
                soft = rec['target'][i]
                top = torch.argsort(soft, descending=True)[:2]
                target = ', '.join(f'{int(c)}:{float(soft[c]):.2f}' for c in top if float(soft[c]) > 0)
                color = 'tab:blue' if p != r else 'black'
                ax.set_title(f'rank {r} #{i} ← rank {p} #{j}\nλ={lam:.2f}  target {target}', fontsize=9, color=color)
    cross = records[0]['cross_rank_fraction']  # a share of the whole group's batch: the same on every rank
    if per_sample:
        mean_lam = float(torch.cat([rec['lam'] for rec in records]).mean())
        fig.suptitle(
            f'One global per-sample CutMix step on {world} gloo ranks: every image its own box and λ '
            f'(mean λ = {mean_lam:.3f}), {cross:.0%} of crops cross ranks (blue captions)', fontsize=10,
        )
    else:
        fig.suptitle(
            f'One global CutMix step on {world} gloo ranks: box (y0, y1, x0, x1) = {records[0]["box"]}, '
            f'λ = {records[0]["lam"]:.3f}, {cross:.0%} of crops cross ranks (blue captions)', fontsize=10,
        )
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _run(rank: int, world_size: int, args: argparse.Namespace) -> Optional[Path]:
    record = mix_on_rank(rank, world_size, args.per_rank, args.seed, args.batch, args.alpha, args.per_sample)
    records = _gather_to_rank0(record, world_size)
    if records is None:
        return None
    path = draw_grid(records, default_out(args), args.dpi)
    if args.per_sample:
        lams = torch.cat([rec['lam'] for rec in records])
        drawn = f'per-sample λ from {float(lams.min()):.3f} to {float(lams.max()):.3f}'
    else:
        drawn = f'λ={records[0]["lam"]:.3f}, box={records[0]["box"]}'
    print(f'[launch/visualize] wrote {path} ({world_size} ranks x {args.per_rank} images, {drawn})', flush=True)
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Spawn the ranks (or join the launcher's) and write the grid; returns the PNG path."""
    args = build_parser().parse_args(argv)
    if args.per_rank < 1 or args.world_size < 2:
        raise ValueError(f'need --per-rank >= 1 and --world-size >= 2, got {args.per_rank} and {args.world_size}')
    if 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', '1')) > 1:  # under `composer -n N`
        torch_dist.init_process_group('gloo', timeout=timedelta(seconds=60))
        try:
            _run(torch_dist.get_rank(), torch_dist.get_world_size(), args)
        finally:
            torch_dist.destroy_process_group()
        return Path(default_out(args))
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_run, args.world_size, tmp, args, collective_timeout_s=60.0)
    return Path(default_out(args))


if __name__ == '__main__':
    main(sys.argv[1:])
