"""Each batch draws anew: consecutive batches of a run, and one batch under two seeds, get other boxes, λ and
partners, while the same ``(seed, batch)`` always draws the same; the functional draws and both mixers.

The mixers are judged by what the mixed images show: channel 0 of every sample holds its own id, so each
sample's box (where channel 0 changed) and partner (the id found there) are read off the pixels, and λ off
the box's area (:mod:`tests.helpers.seen_draws`); no expected draw is rebuilt with the code under test.
The same holds in a Composer Trainer: tests/composer/test_trainer_draws.py.
"""
from __future__ import annotations

import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local
from dist_cutmix.randomness import batch_generator
from tests.helpers.seen_draws import SeenDraw, assert_batches_draw_anew, images_with_ids, kept_shares, read_draw

N, H, W, K = 12, 16, 20, 4
BATCHES = range(6)


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
    x, y = images_with_ids(ids, H, W), torch.arange(N) % K

    def mix(seed: int, batch: int) -> SeenDraw:
        fn = mix_batch_local if mixer == 'local' else mix_batch_across_group
        r = fn(x, y, seed=seed, batch=batch, num_classes=K, per_sample=per_sample)
        draw = read_draw(r.input, ids)
        lam = r.lam.tolist() if per_sample else [r.lam] * N
        assert kept_shares(draw, H, W) == pytest.approx(lam)  # the reported λ is the share the pixels show
        return draw

    what = f'{mixer}, per_sample={per_sample}'
    first = [mix(7, b) for b in BATCHES]
    assert_batches_draw_anew(first, what, (H, W))
    assert first == [mix(7, b) for b in BATCHES], what
    other = [mix(8, b) for b in BATCHES]
    for b in BATCHES:
        assert other[b][1] != first[b][1] and other[b][0] != first[b][0], f'{what}: seeds 7 and 8 draw alike at {b}'
