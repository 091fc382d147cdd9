"""How the crop exchange scales with the number of ranks, computed from the plan alone (no ranks).

For W ranks of B images each, every mode draws its permutation and box exactly as
``CutMix`` does (``dist_cutmix.functional.sample_params`` on the generator of
``batch_generator(seed, batch, 'group', lowest rank)``) and counts, per rank, what
``dist_cutmix.distributed.ExchangePlan`` would send:

* ``global``: one permutation of all ``W * B`` images;
* ``node``: one permutation per node of ``--node-size`` ranks, over that node's images;
* ``all-gather``: every rank sends its whole batch and labels to the ``W - 1`` others.

Bytes are what a rank sends to *other* ranks: crops (``C * box area`` elements) and int64 labels,
plus, for ``global`` and ``node``, the 24-byte batch handshake (``agree_on_batch``) per peer of the
group. Peers are the other ranks a rank's ``all_to_all_single`` actually sends rows to.

The counts are computed vectorised, from the permutation and a ``bincount``, not by calling
``ExchangePlan.build`` once per rank (``tests/scripts/test_scaling.py`` checks they agree)::

    python launch/benchmarks/scaling.py                          # W = 8, 64, 512, 4096 x 32 images of 3x224x224
    python launch/benchmarks/scaling.py --worlds 8,64 --draws 4 --json scaling.json
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

if __package__ in (None, ''):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_cutmix import MixParams, sample_params  # noqa: E402
from dist_cutmix.randomness import batch_generator  # noqa: E402

__all__ = ['build_parser', 'main', 'markdown', 'rank_stats', 'scaling_rows', 'send_count_matrix', 'send_ranks']

LABEL_BYTES = 8  # an int64 index label travels with each crop
HANDSHAKE_BYTES = 24  # agree_on_batch: three int64 (size, layout digest, problem flag) per rank
MODES = ('global', 'node', 'all-gather')


def send_ranks(perm: Tensor, sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For every image ``s`` of the global batch: the rank that holds it and the rank it is sent to.

    Image ``perm[g]``'s crop goes to destination ``g``; ranks own consecutive ranges of ``sizes``,
    as in ``ExchangePlan.build``.
    """
    bounds = torch.tensor(list(sizes)).cumsum(0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    src = torch.searchsorted(bounds, torch.arange(len(perm)), right=True)
    dst = torch.searchsorted(bounds, inv, right=True)
    return src, dst


def send_count_matrix(perm: Tensor, sizes: Sequence[int]) -> Tensor:
    """``(W, W)`` counts: row ``r`` is ``ExchangePlan.build(perm, sizes, r).send_counts``. Small W only."""
    world = len(sizes)
    src, dst = send_ranks(perm, sizes)
    return torch.bincount(src * world + dst, minlength=world * world).reshape(world, world)


def rank_stats(perm: Tensor, sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per rank: rows sent to other ranks, and how many other ranks receive at least one row.

    Equal to ``send_count_matrix`` with the diagonal dropped (row sums and non-zero counts), without
    building the ``W x W`` matrix.
    """
    world = len(sizes)
    src, dst = send_ranks(perm, sizes)
    away = src != dst
    rows = torch.bincount(src[away], minlength=world)
    pairs = torch.unique(src[away] * world + dst[away])
    peers = torch.bincount(pairs // world, minlength=world)
    return rows, peers


@functools.lru_cache(maxsize=None)
def _draw(n: int, height: int, width: int, seed: int, batch: int, first: int, alpha: float) -> MixParams:
    """The draw of the group whose lowest rank is ``first``, as ``mix_batch_across_group`` makes it.

    It does not depend on the world size, so node draws are shared between world sizes (cached).
    """
    return sample_params(n, height, width, alpha=alpha, generator=batch_generator(seed, batch, 'group', first))


def _crop_bytes(box: tuple[int, int, int, int], channels: int, elem: int) -> int:
    y0, y1, x0, x1 = box
    return channels * max(y1 - y0, 0) * max(x1 - x0, 0) * elem


def _exchange(world: int, per_rank: int, group_size: int, shape: tuple[int, int, int], elem: int, seed: int,
              batch: int, alpha: float) -> tuple[Tensor, Tensor, Tensor, float]:
    """Bytes and rows each rank sends, its peers, and the mean box share, for one batch of one mode.

    The groups' permutations are laid block by block into one permutation of the world's images,
    so one :func:`rank_stats` call counts every group at once.
    """
    channels, h, w = shape
    n = group_size * per_rank
    perms, row_bytes, shares = [], [], []
    for first in range(0, world, group_size):  # one group (the world, or a node) at a time
        params = _draw(n, h, w, seed, batch, first, alpha)
        perms.append(params.indices + first * per_rank)
        # mix_batch_across_group sends crops only when the box is not empty; labels always
        row_bytes.append(LABEL_BYTES + (_crop_bytes(params.box, channels, elem) if params.lam < 1 else 0))
        shares.append(1.0 - params.lam)
    rows, peers = rank_stats(torch.cat(perms), [per_rank] * world)
    per_rank_row_bytes = torch.tensor(row_bytes, dtype=torch.float64).repeat_interleave(group_size)
    sent = rows.double() * per_rank_row_bytes + HANDSHAKE_BYTES * (group_size - 1)
    return sent, rows, peers, sum(shares) / len(shares)


def scaling_rows(worlds: Sequence[int], per_rank: int = 32, shape: tuple[int, int, int] = (3, 224, 224),
                 elem: int = 4, node_size: int = 8, draws: int = 32, seed: int = 0,
                 alpha: float = 1.0) -> list[dict[str, Any]]:
    """One row per (W, mode): bytes sent per rank and peers per rank, mean and max over ranks.

    Means and maxima are taken over ranks within a draw, then averaged over ``draws`` batches
    (batch index 0 .. draws-1 of ``seed``).

    Raises:
        ValueError: if a world size is not a positive multiple of ``node_size``.
    """
    rows = []
    image = shape[0] * shape[1] * shape[2] * elem
    for world in worlds:
        if world < 1 or world % node_size:
            raise ValueError(f'every world size must be a positive multiple of node_size={node_size}, got {world}')
        gather = float((world - 1) * per_rank * (image + LABEL_BYTES))
        for mode in MODES:
            if mode == 'all-gather':
                stats = {'bytes_mean': gather, 'bytes_max': gather, 'rows_mean': float((world - 1) * per_rank),
                         'peers_mean': world - 1.0,
                         'peers_max': world - 1.0, 'box_share': None}
            else:
                group = world if mode == 'global' else node_size
                keys = ('bytes_mean', 'bytes_max', 'rows_mean', 'peers_mean', 'peers_max', 'box_share')
                acc = dict.fromkeys(keys, 0.0)
                for b in range(draws):
                    sent, sent_rows, peers, share = _exchange(world, per_rank, group, shape, elem, seed, b, alpha)
                    acc['rows_mean'] += float(sent_rows.double().mean()) / draws
                    acc['bytes_mean'] += float(sent.mean()) / draws
                    acc['bytes_max'] += float(sent.max()) / draws
                    acc['peers_mean'] += float(peers.double().mean()) / draws
                    acc['peers_max'] += float(peers.max()) / draws
                    acc['box_share'] += share / draws
                stats = acc
            rows.append({
                'world': world, 'mode': mode, 'per_rank': per_rank, 'image': 'x'.join(map(str, shape)),
                **stats, 'gather_over_ours': gather / stats['bytes_mean'] if stats['bytes_mean'] else None,
            })
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (MB = 10^6 bytes)."""
    out = [
        '| W | mode | box share | crops sent/rank | MB sent/rank, mean | max | all-gather / this '
        '| peers/rank, mean | max |',
        '|---:|:---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        share = '–' if r['box_share'] is None else f"{r['box_share']:.3f}"
        crops = '–' if r['mode'] == 'all-gather' else f"{r['rows_mean']:.1f}"
        out.append(
            f"| {r['world']} | {r['mode']} | {share} | {crops} | {r['bytes_mean'] / 1e6:,.1f} | "
            f"{r['bytes_max'] / 1e6:,.1f} | {r['gather_over_ours']:,.0f} | {r['peers_mean']:.1f} | "
            f"{r['peers_max']:.0f} |",
        )
    return '\n'.join(out)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``launch/benchmarks/scaling.py``."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--worlds', default='8,64,512,4096', help='world sizes, multiples of --node-size')
    p.add_argument('--per-rank', type=int, default=32, help='images per rank')
    p.add_argument('--image', default='3x224x224', help='C x H x W of one image')
    p.add_argument('--dtype-bytes', type=int, default=4, help='bytes per element (4: float32)')
    p.add_argument('--node-size', type=int, default=8, help='ranks per node for mode node')
    p.add_argument('--draws', type=int, default=32, help='batches averaged over')
    p.add_argument('--alpha', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', type=Path, default=None, help='also write the rows here')
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Print the table (and write ``--json``); return the rows."""
    args = build_parser().parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(',')]
    shape = tuple(int(v) for v in args.image.lower().split('x'))
    if len(shape) != 3:
        raise SystemExit(f'--image must be CxHxW, got {args.image!r}')
    start = time.perf_counter()
    rows = scaling_rows(worlds, args.per_rank, shape, args.dtype_bytes, args.node_size, args.draws,
                        args.seed, args.alpha)
    print(markdown(rows))
    print(f'\n{args.draws} draws a row, alpha={args.alpha}, {args.per_rank} x {args.image} x {args.dtype_bytes} B '
          f'per rank; {time.perf_counter() - start:.1f} s')
    if args.json is not None:
        args.json.write_text(json.dumps({'args': {k: str(v) for k, v in vars(args).items()}, 'rows': rows}, indent=1))
    return rows


if __name__ == '__main__':
    main()
