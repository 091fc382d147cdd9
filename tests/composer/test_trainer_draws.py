"""What the CutMix algorithm draws in a real Composer Trainer, read off the pixels the model saw
(:mod:`tests.helpers.seen_draws`): each step draws anew, a seed reproduces a run and another seed changes it,
ranks of other nodes with the same local rank draw differently, and labels and losses are weighed by the
label weight (λ on the ``2**-10`` grid), not by the pixel share.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')

from dist_cutmix import CutMix
from tests.helpers.seen_draws import SeenDraw, assert_batches_draw_anew, kept_shares, read_draw
from tests.helpers.spawn import run_ranks
from tests.helpers.trainer_utils import H, W, run_trainer, sample_ids

# ----------------------------------------------------------------------------- a real Trainer


def _trainer_draws(seed: int, per_sample: bool, batches: int = 5, batch_size: int = 8) -> tuple[list[SeenDraw], list]:
    _, rec, mem = run_trainer([CutMix(seed=seed, per_sample=per_sample)], batch_size=batch_size,
                              duration=f'{batches}ba')
    draws = []
    for b in range(batches):
        ids = sample_ids(0, 1, b, batch_size)
        draws.append(read_draw(rec.whole(b, 'input'), ids))
    return draws, [v for _, v in mem.data['cutmix/lambda']]


@pytest.mark.parametrize('per_sample', [False, True])
def test_trainer_draws_anew_each_step_reproduces_a_seed_and_changes_with_it(per_sample):
    first, logged = _trainer_draws(5, per_sample)
    what = f'Trainer, per_sample={per_sample}'
    assert_batches_draw_anew(first, what, (H, W))
    # the logged λ is the label weight (on a 2**-10 grid) of the boxes the model saw, averaged over the batch
    for draw, value in zip(first, logged, strict=True):
        weights = [round(lam * 1024) / 1024 for lam in kept_shares(draw, H, W)]
        assert value == pytest.approx(sum(weights) / len(weights)), what
    again, logged_again = _trainer_draws(5, per_sample)
    assert again == first and logged_again == logged, what
    other, _ = _trainer_draws(6, per_sample)
    assert all(o != f for o, f in zip(other, first, strict=True)), f'{what}: seeds 5 and 6 draw alike'


# ----------------------------------------------------------------------------- local mode on several nodes


def _local_on_rank(rank, world, batch_size):
    _, rec, _ = run_trainer([CutMix(mode='local')], batch_size=batch_size, duration='3ba')
    return {b: rec.whole(b, 'input') for b in rec.batches}


def test_ranks_of_other_nodes_with_the_same_local_rank_draw_differently(tmp_path):
    # Two nodes of one rank each: both ranks have local rank 0. A per-rank draw keyed by the local rank would
    # give both the same box and the same partner positions in every batch.
    def one_rank_per_node(rank: int) -> dict[str, str]:
        return {'LOCAL_WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'NODE_RANK': str(rank)}

    batch_size = 8
    results = run_ranks(_local_on_rank, 2, tmp_path, batch_size, per_rank_env=one_rank_per_node)
    for b in range(3):
        draws = [read_draw(results[r][b], sample_ids(r, 2, b, batch_size)) for r in range(2)]
        assert draws[0] != draws[1], f'batch {b}: both nodes drew {draws[0]}'


# ----------------------------------------------------------------------------- the label weight in a Trainer


def _odd_sized_dataset(n: int = 48) -> torch.utils.data.TensorDataset:
    """7x9 images (63 pixels: no box's pixel share is a multiple of 2**-10) whose channel 0 holds their index."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 7, 9, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)[:, None, None]
    return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize('interpolate_loss', [False, True])
def test_trainer_weighs_labels_and_losses_by_the_label_weight_not_the_pixel_share(interpolate_loss):
    # The suite's Trainer tests use 8x8 images, where every pixel share λ = 1 - area/64 is already a multiple of
    # 2**-10 and equals its label weight: a weight taken from the wrong one of the two, or rounded the wrong
    # way, shows only on images like these.
    import torch.nn.functional as TF

    data = _odd_sized_dataset()
    batches, batch_size = 4, 6
    _, rec, mem = run_trainer([CutMix(interpolate_loss=interpolate_loss)], batch_size=batch_size,
                              duration=f'{batches}ba', microbatch=3, dataset=data)
    logged = [v for _, v in mem.data['cutmix/lambda']]
    labels, eye = data.tensors[1], torch.eye(4)
    off_grid = 0
    for b in range(batches):
        ids = torch.arange(b * batch_size, (b + 1) * batch_size)
        boxes, partners = read_draw(rec.whole(b, 'input'), ids)
        assert len(set(boxes)) == 1 and min(partners) >= 0
        (y0, y1, x0, x1), = set(boxes)
        lam = 1 - (y1 - y0) * (x1 - x0) / 63
        weight = round(lam * 1024) / 1024
        off_grid += abs(lam * 1024 - round(lam * 1024)) > 0.1
        assert logged[b] == weight, (b, logged[b], weight, lam)
        own, partner = labels[ids], labels[ids][list(partners)]
        if not interpolate_loss:
            torch.testing.assert_close(rec.whole(b, 'target'), weight * eye[own] + (1 - weight) * eye[partner],
                                       rtol=0, atol=0)
            continue
        for m, mb in enumerate(rec.batches[b]):
            rows = slice(3 * m, 3 * m + 3)
            want = weight * TF.cross_entropy(mb['outputs'], own[rows]) \
                + (1 - weight) * TF.cross_entropy(mb['outputs'], partner[rows])
            torch.testing.assert_close(mb['loss'], want, rtol=0, atol=1e-6)
    assert off_grid >= 2  # the draws are the case the test is about
