"""Each batch draws anew: consecutive batches of a run, and one batch under two seeds, get other boxes, λ and
partners, while the same ``(seed, batch)`` always draws the same.

The mixers and the Trainer are judged by what the mixed images show: channel 0 of every sample holds its own
id, so each sample's box (where channel 0 changed) and partner (the id found there) are read off the pixels,
and λ off the box's area, by this file's own code; no expected draw is rebuilt with the code under test.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')

from dist_cutmix import CutMix
from dist_cutmix import functional as F
from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local
from dist_cutmix.randomness import batch_generator
from tests.trainer_utils import H as TRAINER_H
from tests.trainer_utils import W as TRAINER_W
from tests.trainer_utils import run_trainer, sample_ids

N, H, W, K = 12, 16, 20, 4
BATCHES = range(6)

Draw = tuple[tuple[tuple[int, int, int, int], ...], tuple[int, ...]]


def _images(ids: torch.Tensor, h: int = H, w: int = W) -> torch.Tensor:
    """Random images whose channel 0 is each sample's id."""
    x = torch.rand(len(ids), 3, h, w, generator=torch.Generator().manual_seed(0))
    x[:, 0] = ids.float()[:, None, None]
    return x


def _read_draw(mixed: torch.Tensor, ids: torch.Tensor) -> Draw:
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


def _lambdas(draw: Draw, h: int = H, w: int = W) -> tuple[float, ...]:
    """Each sample's kept share, from its box read off the pixels."""
    return tuple(1 - (y1 - y0) * (x1 - x0) / (h * w) for y0, y1, x0, x1 in draw[0])


def _assert_batches_draw_anew(draws: list[Draw], what: str, hw: tuple[int, int] = (H, W)) -> None:
    """Consecutive batches pair other partners; boxes and λ change from most batches to the next (two draws
    may share a box by chance, not run after run); no two batches repeat a whole draw."""
    pairs = range(1, len(draws))
    for b in pairs:
        assert draws[b][1] != draws[b - 1][1], f'{what}: batches {b - 1} and {b} pair the same partners'
    assert sum(draws[b][0] != draws[b - 1][0] for b in pairs) > len(pairs) // 2, f'{what}: the boxes repeat'
    lams = [_lambdas(d, *hw) for d in draws]
    assert sum(lams[b] != lams[b - 1] for b in pairs) > len(pairs) // 2, f'{what}: λ repeats'
    assert len(set(draws)) == len(draws), f'{what}: a draw repeats'


# ----------------------------------------------------------------------------- the functional draw


@pytest.mark.parametrize('keys', [(), ('local', 0), ('local', 3), ('group', 0)])
def test_functional_draws_differ_by_batch_and_seed_and_repeat_for_the_same_key(keys):
    def draw(seed: int, batch: int):
        one = F.sample_params(N, H, W, generator=batch_generator(seed, batch, *keys))
        per = F.sample_params_per_sample(N, H, W, generator=batch_generator(seed, batch, *keys))
        return (one.box, one.lam, tuple(one.indices.tolist())), \
            (tuple(map(tuple, per.boxes.tolist())), tuple(per.lam.tolist()), tuple(per.indices.tolist()))

    for seed in (11, 12):
        runs = [draw(seed, b) for b in BATCHES]
        assert runs == [draw(seed, b) for b in BATCHES]  # the same (seed, batch) draws the same
        for mode in (0, 1):
            for b in range(1, len(runs)):
                for part, name in enumerate(('box', 'λ', 'partners')):
                    assert runs[b][mode][part] != runs[b - 1][mode][part], (seed, keys, mode, b, name)
    for b in BATCHES:  # the same batch on another seed
        a, c = draw(11, b), draw(12, b)
        for mode in (0, 1):
            assert a[mode][0] != c[mode][0] and a[mode][2] != c[mode][2], (keys, b, mode)


def test_streams_of_other_keys_are_other_streams():
    def stream(*key):
        return torch.randint(0, 2**62, (4,), generator=batch_generator(*key)).tolist()

    keys = [(5, 0), (5, 1), (6, 0), (5, 0, 'local', 0), (5, 0, 'local', 1), (5, 1, 'local', 0), (5, 0, 'group', 0),
            (0, 5)]
    streams = [stream(*k) for k in keys]
    assert len({tuple(s) for s in streams}) == len(keys)
    assert streams == [stream(*k) for k in keys]


# ----------------------------------------------------------------------------- the mixers


@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('mixer', ['local', 'group'])
def test_mixers_draw_anew_each_batch_and_the_same_for_the_same_seed_and_batch(mixer, per_sample):
    ids = torch.arange(100, 100 + N)
    x, y = _images(ids), torch.arange(N) % K

    def mix(seed: int, batch: int) -> Draw:
        fn = mix_batch_local if mixer == 'local' else mix_batch_across_group
        r = fn(x, y, seed=seed, batch=batch, num_classes=K, per_sample=per_sample)
        draw = _read_draw(r.input, ids)
        lam = r.lam.tolist() if per_sample else [r.lam] * N
        assert _lambdas(draw) == pytest.approx(lam)  # the reported λ is the share the pixels show
        return draw

    what = f'{mixer}, per_sample={per_sample}'
    first = [mix(7, b) for b in BATCHES]
    _assert_batches_draw_anew(first, what)
    assert first == [mix(7, b) for b in BATCHES], what
    other = [mix(8, b) for b in BATCHES]
    for b in BATCHES:
        assert other[b][1] != first[b][1] and other[b][0] != first[b][0], f'{what}: seeds 7 and 8 draw alike at {b}'


# ----------------------------------------------------------------------------- a real Trainer


def _trainer_draws(seed: int, per_sample: bool, batches: int = 5, batch_size: int = 8) -> tuple[list[Draw], list]:
    _, rec, mem = run_trainer([CutMix(seed=seed, per_sample=per_sample)], batch_size=batch_size,
                              duration=f'{batches}ba')
    draws = []
    for b in range(batches):
        ids = sample_ids(0, 1, b, batch_size)
        draws.append(_read_draw(rec.whole(b, 'input'), ids))
    return draws, [v for _, v in mem.data['cutmix/lambda']]


@pytest.mark.parametrize('per_sample', [False, True])
def test_trainer_draws_anew_each_step_reproduces_a_seed_and_changes_with_it(per_sample):
    first, logged = _trainer_draws(5, per_sample)
    what = f'Trainer, per_sample={per_sample}'
    _assert_batches_draw_anew(first, what, (TRAINER_H, TRAINER_W))
    # the logged λ is the label weight (on a 2**-10 grid) of the boxes the model saw, averaged over the batch
    for draw, value in zip(first, logged, strict=True):
        weights = [round(lam * 1024) / 1024 for lam in _lambdas(draw, TRAINER_H, TRAINER_W)]
        assert value == pytest.approx(sum(weights) / len(weights)), what
    again, logged_again = _trainer_draws(5, per_sample)
    assert again == first and logged_again == logged, what
    other, _ = _trainer_draws(6, per_sample)
    assert all(o != f for o, f in zip(other, first, strict=True)), f'{what}: seeds 5 and 6 draw alike'
