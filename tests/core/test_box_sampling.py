"""Tests written to catch plausible one-line bugs that the rest of the suite let pass (each one was planted by
hand and seen to pass the suite before these tests, and to fail them after).

* Box sampling: both samplers (one box per batch, one per sample) place and size boxes as the documented
  rule does (Composer's ``_rand_bbox``), pixel by pixel, with ``H != W``: a far edge clipped one short, a
  centre drawn over the wrong axis, one uniform draw reused for both centres, ``alpha`` ignored, or the
  enlarged range of ``uniform_sampling`` cut short, all change how often some pixel is cut.
* Local mode on several nodes: ranks with the same local rank on different nodes draw differently.
* Per-sample λ with soft targets built at ``BEFORE_LOSS`` (a model that declares no ``num_classes``) and
  microbatches: each microbatch's targets take the λ of its own samples.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')

from dist_cutmix import CutMix
from dist_cutmix import functional as F
from dist_cutmix.randomness import batch_generator
from tests import compat_models as compat
from tests.spawn import run_ranks
from tests.test_draws import _read_draw
from tests.trainer_utils import run_trainer, sample_ids

H, W = 10, 15  # unequal sides: an axis mixed up shows


def _reference_boxes(lam: np.ndarray, uniform: bool, rng: np.random.Generator) -> np.ndarray:
    """The documented rule, written out here: sides ``int(H * sqrt(1 - λ))`` by ``int(W * sqrt(1 - λ))``, centre
    uniform over the image's integer rows and columns (or the range enlarged by half a side each way), clipped;
    rows ``(y0, y1, x0, x1)``."""
    cut_h = (H * np.sqrt(1 - lam)).astype(np.int64)
    cut_w = (W * np.sqrt(1 - lam)).astype(np.int64)
    if uniform:
        cy = rng.integers(-cut_h // 2, H + cut_h // 2)
        cx = rng.integers(-cut_w // 2, W + cut_w // 2)
    else:
        cy, cx = rng.integers(0, H, len(lam)), rng.integers(0, W, len(lam))
    return np.stack([np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H),
                     np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)], axis=1)


def test_the_reference_rule_is_composers_box():
    from composer.algorithms.cutmix.cutmix import _rand_bbox

    for lam in (0.0, 0.13, 0.5, 0.77, 0.99):
        for cy in range(-3, H + 3):
            for cx in (-2, 0, 7, W - 1, W + 2):
                # Composer calls _rand_bbox(H, W) and slices its first and third entries on the height axis
                a, b, c, d = _rand_bbox(H, W, lam, cx=cy, cy=cx)
                cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
                mine = (np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H),
                        np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W))
                assert mine == (a, c, b, d)


def _coverage(boxes: torch.Tensor) -> torch.Tensor:
    """How often each pixel lies inside a box: an ``(H, W)`` map of frequencies."""
    boxes = torch.as_tensor(boxes)
    rows, cols = torch.arange(H), torch.arange(W)
    in_y = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])).double()
    in_x = ((cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])).double()
    return torch.einsum('kh,kw->hw', in_y, in_x) / len(boxes)


def _assert_same_coverage(ours: torch.Tensor, n_ours: int, ref: torch.Tensor, n_ref: int, what: str) -> None:
    """Every pixel is cut as often as under the reference, within 5 standard errors of the difference."""
    p = ((ours * n_ours + ref * n_ref) / (n_ours + n_ref)).clamp(1e-3, 1 - 1e-3)
    z = (ours - ref).abs() / (p * (1 - p) * (1 / n_ours + 1 / n_ref)).sqrt()
    worst = divmod(int(z.argmax()), W)
    assert float(z.max()) < 5, f'{what}: pixel {worst} cut {float(ours[worst]):.3f} of the time, ' \
                               f'reference {float(ref[worst]):.3f}'


@pytest.mark.parametrize('uniform', [False, True])
@pytest.mark.parametrize('alpha', [0.4, 2.0])
def test_both_samplers_cut_each_pixel_as_often_as_the_documented_rule(alpha, uniform):
    rng = np.random.default_rng(int(alpha * 10) + uniform)
    n_ref = 60_000
    ref = _coverage(_reference_boxes(rng.beta(alpha, alpha, n_ref), uniform, rng))
    # one box per sample, all drawn at once (λ drawn inside)
    n_per = 60_000
    per = F.sample_params_per_sample(n_per, H, W, alpha=alpha, uniform_sampling=uniform,
                                     generator=batch_generator(3, int(alpha * 10) + uniform))
    _assert_same_coverage(_coverage(per.boxes), n_per, ref, n_ref, f'per-sample, alpha={alpha}, uniform={uniform}')
    # one box per batch: the batch sampler's λ and box, one draw per batch
    n_batch = 3000
    g = batch_generator(4, int(alpha * 10) + uniform)
    boxes = [F.sample_box(H, W, F.sample_lambda(alpha, g), uniform_sampling=uniform, generator=g)
             for _ in range(n_batch)]
    _assert_same_coverage(_coverage(torch.tensor(boxes)), n_batch, ref, n_ref,
                          f'batch, alpha={alpha}, uniform={uniform}')


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
        draws = [_read_draw(results[r][b], sample_ids(r, 2, b, batch_size)) for r in range(2)]
        assert draws[0] != draws[1], f'batch {b}: both nodes drew {draws[0]}'


# ----------------------------------------------------------------------------- per-sample targets built at the loss


def test_per_sample_targets_built_from_the_outputs_take_each_microbatchs_own_lambdas():
    # A model without num_classes: CutMix builds the soft targets per microbatch at BEFORE_LOSS, from the
    # outputs' class count, and must pick each microbatch's own samples' λ out of the batch's.
    batch_size = 6
    out = compat.run_cell('bare', 'tuple', 'soft', 'local', algorithms=[CutMix(per_sample=True)], batch_size=batch_size,
                   microbatch=2, batches=2)
    _, labels = compat.make_data('bare')
    eye = torch.eye(compat.NUM_CLASSES)
    for b, microbatches in out['batches'].items():
        assert len(microbatches) == 3
        ids = torch.arange(b * batch_size, (b + 1) * batch_size)
        mixed = torch.cat([mb['input'] for mb in microbatches])
        boxes, partners = _read_draw(mixed, ids)
        assert len(set(boxes)) > 2 and min(partners) >= -1  # boxes differ; a partner is read in every non-empty box
        weight = torch.tensor([round((1 - (y1 - y0) * (x1 - x0) / (compat.H * compat.W)) * 1024) / 1024
                               for y0, y1, x0, x1 in boxes])[:, None]
        partner_labels = torch.tensor([labels[ids][p] if p >= 0 else -1 for p in partners])
        assert bool((weight[partner_labels < 0] == 1).all())  # an empty box keeps its own label only
        partner_labels[partner_labels < 0] = labels[ids][partner_labels < 0]
        expected = weight * eye[labels[ids]] + (1 - weight) * eye[partner_labels]
        torch.testing.assert_close(torch.cat([mb['target'] for mb in microbatches]), expected)


# ----------------------------------------------------------------------------- locating rows in a batch that is a view


@pytest.mark.parametrize('channels_last', [False, True])
def test_rows_of_a_batch_that_is_itself_a_view_are_counted_from_its_own_start(channels_last):
    # The mixed batch may itself be a slice of a larger buffer (a user's batch pasted in place): a microbatch's
    # rows are its offset from the batch's first row, not from the buffer's.
    from dist_cutmix.locate import locate_rows

    buffer = torch.rand(14, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    if channels_last:
        buffer = buffer.to(memory_format=torch.channels_last)
    for whole in (buffer[2:12], buffer[3::2]):
        assert whole.storage_offset() > 0
        expected = [list(range(i, min(i + 4, len(whole)))) for i in range(0, len(whole), 4)]
        assert [locate_rows(part, whole).tolist() for part in whole.split(4)] == expected
        assert locate_rows(whole[1::2], whole).tolist() == list(range(1, len(whole), 2))


# ----------------------------------------------------------------------------- mix_target=False on dense targets


def test_global_per_sample_mixing_leaves_dense_targets_alone_when_told():
    from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6, 8, 8), generator=g)
    for mix in (mix_batch_local, mix_batch_across_group):
        for per_sample in (False, True):
            r = mix(x, y, seed=1, batch=0, per_sample=per_sample, mix_target=False)
            assert not torch.equal(r.input, x)  # the images were mixed
            assert torch.equal(r.target, y), f'{mix.__name__}, per_sample={per_sample}: the targets changed'


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
        boxes, partners = _read_draw(rec.whole(b, 'input'), ids)
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
