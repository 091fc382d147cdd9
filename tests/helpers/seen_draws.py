"""Reading a mix off the pixels: images whose channel 0 holds each sample's id, and each sample's box, partner
and kept share λ read back from the mixed images, with no call to the code under test.

Used by the draw tests of the functional ops and mixers (tests/core/test_draws.py) and of the Composer
algorithms in a Trainer (tests/composer/test_trainer_draws.py, test_per_sample_algorithm.py).
"""
from __future__ import annotations

import torch

SeenDraw = tuple[tuple[tuple[int, int, int, int], ...], tuple[int, ...]]


def images_with_ids(ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Random images whose channel 0 is each sample's id."""
    x = torch.rand(len(ids), 3, h, w, generator=torch.Generator().manual_seed(0))
    x[:, 0] = ids.float()[:, None, None]
    return x


def read_draw(mixed: torch.Tensor, ids: torch.Tensor) -> SeenDraw:
    """Each sample's box ``(y0, y1, x0, x1)`` (the pixels of channel 0 that are no longer its id) and the
    position in the batch of its partner (the id inside the box); ``(0, 0, 0, 0)`` and ``-1`` when unmixed."""
    position = {int(i): p for p, i in enumerate(ids.tolist())}
    boxes, partners = [], []
    for i in range(len(ids)):
        changed = mixed[i, 0] != ids[i].float()
        if not changed.any():
            boxes.append((0, 0, 0, 0))
            partners.append(-1)
            continue
        ys, xs = changed.nonzero(as_tuple=True)
        box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        inside = mixed[i, 0, box[0]:box[1], box[2]:box[3]]
        assert bool((inside == inside[0, 0]).all()), f'sample {i}: the pasted region is no box of one partner'
        boxes.append(box)
        partners.append(position[int(inside[0, 0].round())])
    return tuple(boxes), tuple(partners)


def kept_shares(draw: SeenDraw, h: int, w: int) -> tuple[float, ...]:
    """Each sample's kept share λ, from its box read off the pixels."""
    return tuple(1 - (y1 - y0) * (x1 - x0) / (h * w) for y0, y1, x0, x1 in draw[0])


def assert_batches_draw_anew(draws: list[SeenDraw], what: str, hw: tuple[int, int]) -> None:
    """Consecutive batches pair other partners; boxes and λ change from most batches to the next (two draws
    may share a box by chance, not run after run); no two batches repeat a whole draw."""
    pairs = range(1, len(draws))
    for b in pairs:
        assert draws[b][1] != draws[b - 1][1], f'{what}: batches {b - 1} and {b} pair the same partners'
    assert sum(draws[b][0] != draws[b - 1][0] for b in pairs) > len(pairs) // 2, f'{what}: the boxes repeat'
    lams = [kept_shares(d, *hw) for d in draws]
    assert sum(lams[b] != lams[b - 1] for b in pairs) > len(pairs) // 2, f'{what}: λ repeats'
    assert len(set(draws)) == len(draws), f'{what}: a draw repeats'
