"""Draw one real global-mode CutMix step on 2 gloo ranks as a PNG grid.

Each rank takes its own few MNIST training images, and the ranks call
:func:`dist_cutmix.mixer.mix_batch_across_group` together, exactly as ``CutMix(mode='global')``
does at a training step. Rank 0 gathers every rank's originals and mixed images and draws, per
rank, a row of originals and a row of mixed images with the pasted box outlined, each captioned
``rank r #i ← rank p #j, λ=…`` (whose crop it received) and with its soft target. With
``--per-sample`` the step is ``CutMix(mode='global', per_sample=True)``'s: every image has its own
box and λ, and the default PNG is ``docs/images/cutmix_grid_per_sample.png``. With ``--switch`` it is
``MixUpCutMix(mode='global', per_sample=True)``'s (timm's recipe, ``mode='elem'``, with ``--mix-prob``
below 1): every image is CutMix (red box), MixUp (orange frame) or left unmixed, each captioned with
its method and λ, in ``docs/images/mix_grid_switch.png``::

    python launch/visualize.py --out docs/images/cutmix_grid.png  # spawns 2 ranks itself
    python launch/visualize.py --per-sample                       # writes docs/images/cutmix_grid_per_sample.png
    python launch/visualize.py --switch                           # writes docs/images/mix_grid_switch.png
    composer -n 2 launch/visualize.py --out grid.png              # or let Composer's launcher start them
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

from launch.tools.spawn import run_ranks  # noqa: E402
from launch.train import MNIST_MEAN, MNIST_STD, NUM_CLASSES, load_mnist  # noqa: E402

__all__ = ['build_parser', 'default_out', 'draw_grid', 'main', 'mix_methods', 'mix_on_rank', 'panels', 'switch_spec']

OUT = 'docs/images/cutmix_grid.png'
OUT_PER_SAMPLE = 'docs/images/cutmix_grid_per_sample.png'
OUT_SWITCH = 'docs/images/mix_grid_switch.png'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='launch/visualize.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', default=None, help=f'PNG to write (default {OUT}, or {OUT_PER_SAMPLE} with --per-sample)')
    p.add_argument('--per-sample', action='store_true',
                   help='draw a per-sample step (CutMix(per_sample=True)): every image its own box and λ')
    p.add_argument('--switch', action='store_true',
                   help="draw timm's switch per sample (MixUpCutMix(per_sample=True)): CutMix, MixUp or unmixed")
    p.add_argument('--mixup-alpha', type=float, default=0.8, help='with --switch: MixUp\'s Beta concentration')
    p.add_argument('--switch-prob', type=float, default=0.5, help='with --switch: probability of CutMix over MixUp')
    p.add_argument('--mix-prob', type=float, default=0.7, help='with --switch: probability that an image is mixed')
    p.add_argument('--label-smoothing', type=float, default=0.1, help='with --switch: ε of the soft targets')
    p.add_argument('--world-size', type=int, default=2, help='ranks to spawn (ignored under a launcher)')
    p.add_argument('--per-rank', type=int, default=5, help='images per rank')
    p.add_argument('--alpha', type=float, default=1.0, help="CutMix's Beta concentration")
    p.add_argument('--seed', type=int, default=None,
                   help='mixing seed (as CutMix(seed=...)); default 1 (a central box), 8 with --switch')
    p.add_argument('--batch', type=int, default=0, help='the training step whose mixing is drawn')
    p.add_argument('--dpi', type=int, default=110)
    return p


def default_out(args: argparse.Namespace) -> str:
    """``--out``, else the committed picture for the chosen mode."""
    return args.out or (OUT_SWITCH if args.switch else OUT_PER_SAMPLE if args.per_sample else OUT)


def _seed(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else (8 if args.switch else 1)


def switch_spec(args: argparse.Namespace) -> Any:
    """The ``MixSpec`` of ``MixUpCutMix(mixup_alpha, cutmix_alpha=--alpha, prob=--mix-prob, switch_prob, ...)``."""
    from dist_cutmix.spec import MixSpec

    return MixSpec(cutmix_alpha=args.alpha, mixup_alpha=args.mixup_alpha, prob=args.mix_prob,
                   switch_prob=args.switch_prob, label_smoothing=args.label_smoothing)


def mix_on_rank(rank: int, world_size: int, per_rank: int, seed: int, batch: int, alpha: float,
                per_sample: bool = False, spec: Any = None) -> dict[str, Any]:
    """One rank's part of a global mixing step; returns what it had, what it got, and from where.

    With ``per_sample=True``, ``lam`` is a ``(per_rank,)`` tensor and ``box`` a ``(per_rank, 4)``
    tensor of ``(y0, y1, x0, x1)`` rows, one per image of this rank. ``spec`` (a
    :class:`~dist_cutmix.spec.MixSpec`) mixes as ``MixUpCutMix`` would instead of ``CutMix(alpha)``;
    ``record['method']`` then names each image's mix (see :func:`mix_methods`).
    """
    from dist_cutmix.mixer import mix_batch_across_group

    train, _ = load_mnist(train_samples=per_rank * world_size)
    images, labels = train.tensors
    # Rank r holds every world_size-th image, as a DistributedSampler without shuffling would give it.
    own_x, own_y = images[rank::world_size].clone(), labels[rank::world_size].clone()
    result = mix_batch_across_group(own_x, own_y, seed=seed, batch=batch, alpha=alpha, num_classes=NUM_CLASSES,
                                    per_sample=per_sample, spec=spec)
    h, w = own_x.shape[-2:]
    boxes = result.box if per_sample else torch.tensor([result.box] * own_x.shape[0])
    lams = result.lam if per_sample else torch.full((own_x.shape[0],), float(result.lam), dtype=torch.float64)
    return {
        'rank': rank, 'original': own_x, 'label': own_y, 'mixed': result.input, 'target': result.target,
        'partner_rank': result.partner_rank, 'partner_index': result.partner_index,
        'partner_label': result.partner_target, 'lam': result.lam, 'box': result.box,
        'cross_rank_fraction': result.cross_rank_fraction, 'per_sample': per_sample,
        'switch': spec is not None, 'method': mix_methods(boxes, lams, h, w) if spec is not None else None,
    }


def mix_methods(boxes: torch.Tensor, lam: torch.Tensor, height: int, width: int) -> list[str]:
    """What each sample got, read off the engine's result (a mix is a partner, a region and a weight).

    An empty region: ``'unmixed'``; a region short of the whole image: ``'CutMix'`` (pasted at weight 1);
    the whole image with λ > 0: ``'MixUp'`` (blended at weight 1 - λ). The whole image at λ = 0 is the
    partner itself, which CutMix and MixUp would both give: ``'whole partner'``.
    """
    area = (boxes[:, 1] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 2]).clamp(min=0)
    out = []
    for a, lam_i in zip(area.tolist(), lam.tolist(), strict=True):
        if a == 0:
            out.append('unmixed')
        elif a < height * width:
            out.append('CutMix')
        else:
            out.append('MixUp' if lam_i > 0 else 'whole partner')
    return out


def _gather_to_rank0(record: dict[str, Any], world_size: int) -> Optional[list[dict[str, Any]]]:
    out: Optional[list[Any]] = [None] * world_size if torch_dist.get_rank() == 0 else None
    torch_dist.gather_object(record, out, dst=0)
    return out


METHOD_COLORS = {'CutMix': 'red', 'MixUp': 'tab:orange', 'whole partner': 'tab:orange'}


def panels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What :func:`draw_grid` draws, panel by panel: its place, the image tensor shown, its caption and outline.

    Per rank a row of originals and a row of mixed images (``record['mixed']``, un-normalised for display).
    A mixed image's caption names its partner, its λ and (for a ``--switch`` step) its method; its outline is
    the pasted box (red) or, for MixUp, the whole image (orange).
    """
    out = []
    for rec in records:
        r, n = rec['rank'], rec['original'].shape[0]
        per_sample = bool(rec.get('per_sample'))
        for i in range(n):
            for row, key in ((2 * r, 'original'), (2 * r + 1, 'mixed')):
                panel: dict[str, Any] = {'row': row, 'col': i, 'key': key, 'rank': r, 'index': i,
                                         'image': (rec[key][i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1),
                                         'outline': None, 'color': 'black', 'method': None}
                out.append(panel)
                if key == 'original':
                    panel['title'] = f'rank {r} #{i}: digit {int(rec["label"][i])}'
                    continue
                box = tuple(int(v) for v in rec['box'][i]) if per_sample else tuple(rec['box'])
                lam = float(rec['lam'][i]) if per_sample else float(rec['lam'])
                method = rec['method'][i] if rec.get('method') else 'CutMix'
                p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
                target = _caption_target(rec['target'][i])
                panel['method'] = method
                if method == 'unmixed':
                    panel['title'] = f'rank {r} #{i}: unmixed, λ=1\ntarget {target}'
                    continue
                panel['outline'] = (box, METHOD_COLORS[method])
                panel['color'] = 'tab:blue' if p != r else 'black'
                if rec.get('switch'):  # three short lines: the switched captions are longer
                    panel['title'] = f'rank {r} #{i} ← rank {p} #{j}\n{method} λ={lam:.2f}\ntarget {target}'
                else:
                    panel['title'] = f'rank {r} #{i} ← rank {p} #{j}\nλ={lam:.2f}  target {target}'
    return out


def _caption_target(soft: torch.Tensor) -> str:
    """The (at most two) classes above the floor of a soft target, and the floor ε/C when smoothed."""
    floor = float(soft.min())
    top = [int(c) for c in torch.argsort(soft, descending=True)[:2] if float(soft[c]) > floor + 1e-6]
    text = ', '.join(f'{c}:{float(soft[c]):.2f}' for c in top)
    return f'{text}, rest {floor:.2f}' if floor > 0 else text


def _suptitle(records: list[dict[str, Any]]) -> str:
    world = len(records)
    cross = records[0]['cross_rank_fraction']  # a share of the whole group's batch: the same on every rank
    if records[0].get('switch'):
        methods = [m for rec in records for m in rec['method']]
        counts = ', '.join(f'{methods.count(m)} {m}' for m in ('CutMix', 'MixUp', 'whole partner', 'unmixed')
                           if methods.count(m))
        spec = records[0]['spec']
        return (f'One global per-sample MixUpCutMix step on {world} gloo ranks (mixup_alpha={spec.mixup_alpha}, '
                f'cutmix_alpha={spec.cutmix_alpha}, switch_prob={spec.switch_prob}, prob={spec.prob}, '
                f'label_smoothing={spec.label_smoothing}):\n{counts}; CutMix boxes in red, MixUp frames in orange, '
                f'{cross:.0%} of partners on another rank (blue captions)')
    if records[0].get('per_sample'):
        mean_lam = float(torch.cat([rec['lam'] for rec in records]).mean())
        return (f'One global per-sample CutMix step on {world} gloo ranks: every image its own box and λ '
                f'(mean λ = {mean_lam:.3f}), {cross:.0%} of crops cross ranks (blue captions)')
    return (f'One global CutMix step on {world} gloo ranks: box (y0, y1, x0, x1) = {records[0]["box"]}, '
            f'λ = {records[0]["lam"]:.3f}, {cross:.0%} of crops cross ranks (blue captions)')


def draw_grid(records: list[dict[str, Any]], out: str, dpi: int = 110) -> Path:
    """Draw :func:`panels` (per rank, a row of originals and a row of mixed images); returns the path."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    world, n = len(records), records[0]['original'].shape[0]
    row_inches = 3.0 if records[0].get('switch') else 2.75  # room for three caption lines
    fig, axes = plt.subplots(2 * world, n, figsize=(2.3 * n, row_inches * 2 * world), squeeze=False)
    for panel in panels(records):
        ax = axes[panel['row']][panel['col']]
        ax.imshow(panel['image'].numpy(), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        if panel['outline'] is not None:
            (y0, y1, x0, x1), color = panel['outline']
            # imshow puts pixel (y, x) at [x - .5, x + .5]: the box covers rows y0..y1-1, columns x0..x1-1.
            inset = 0.6 if color != 'red' else 0.0  # a whole-image frame drawn just inside the axes
            ax.add_patch(Rectangle((x0 - 0.5 + inset, y0 - 0.5 + inset), x1 - x0 - 2 * inset, y1 - y0 - 2 * inset,
                                   fill=False, edgecolor=color, linewidth=2.5 if color != 'red' else 2))
        ax.set_title(panel['title'], fontsize=9, color=panel['color'])
    fig.suptitle(_suptitle(records), fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _run(rank: int, world_size: int, args: argparse.Namespace) -> Optional[Path]:
    spec = switch_spec(args) if args.switch else None
    record = mix_on_rank(rank, world_size, args.per_rank, _seed(args), args.batch, args.alpha,
                         args.per_sample or args.switch, spec=spec)
    record['spec'] = spec
    records = _gather_to_rank0(record, world_size)
    if records is None:
        return None
    path = draw_grid(records, default_out(args), args.dpi)
    if args.switch:
        methods = [m for rec in records for m in rec['method']]
        drawn = ', '.join(f'{methods.count(m)} {m}' for m in sorted(set(methods)))
    elif args.per_sample:
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
