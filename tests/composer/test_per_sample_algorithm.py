"""CutMix(per_sample=True) in real Composer Trainers: every sample's own box and λ in local and global mode, a
bit-for-bit resume, the global batch's mean λ logged on every rank, each microbatch's own λ in targets built at
the loss, and ``interpolate_loss`` refused with the fix named.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.draw import PerSampleMixParams
from dist_cutmix.randomness import batch_generator
from tests.helpers.mix_reference import paste_per_sample, per_sample_label_weights
from tests.helpers.seen_draws import read_draw
from tests.helpers.spawn import run_ranks


def _trainer_on_rank(rank, world, mode, folder, phase):
    from dist_cutmix import CutMix
    from tests.helpers.trainer_utils import run_trainer

    kwargs = dict(batch_size=4, duration='4ba')
    if phase == 'resume':
        kwargs['load_path'] = os.path.join(folder, 'ba2-rank0.pt')
    elif phase == 'full':
        kwargs['save_folder'] = folder
    _, rec, mem = run_trainer([CutMix(mode=mode, per_sample=True)], **kwargs)
    return {b: (rec.whole(b, 'input'), rec.whole(b, 'target')) for b in rec.batches}, \
        [v for _, v in mem.data['cutmix/lambda']]


@pytest.mark.composer
@pytest.mark.parametrize('mode', ['local', 'global'])
def test_trainer_mixes_per_sample_and_resumes_bit_for_bit(tmp_path, mode):
    from tests.helpers.trainer_utils import make_dataset, sample_ids

    folder = str(tmp_path / 'ckpt')
    full = run_ranks(_trainer_on_rank, 2, tmp_path, mode, folder, 'full')
    assert glob.glob(os.path.join(folder, 'ba2-rank0.pt'))
    data = make_dataset()
    for b in range(4):
        ids = torch.cat([sample_ids(r, 2, b, 4) for r in range(2)])
        x, y = data.tensors[0][ids], data.tensors[1][ids]
        mixed = torch.cat([full[r][0][b][0] for r in range(2)])
        target = torch.cat([full[r][0][b][1] for r in range(2)])
        if mode == 'global':
            params = F.sample_params_per_sample(8, 8, 8, generator=batch_generator(17, b, 'group', 0))
        else:
            parts = [F.sample_params_per_sample(4, 8, 8, generator=batch_generator(17, b, 'local', r))
                     for r in range(2)]
            params = PerSampleMixParams(boxes=torch.cat([p.boxes for p in parts]),
                                        lam=torch.cat([p.lam for p in parts]),
                                        indices=torch.cat([parts[0].indices, parts[1].indices + 4]))
        assert torch.equal(mixed, paste_per_sample(x, params))
        wgt = per_sample_label_weights(params.lam)[:, None].float()
        torch.testing.assert_close(target, wgt * torch.eye(4)[y] + (1 - wgt) * torch.eye(4)[y[params.indices]])
        assert len({tuple(bx) for bx in params.boxes.tolist()}) > 1  # boxes differ within the batch
    resumed = run_ranks(_trainer_on_rank, 2, tmp_path, mode, folder, 'resume')
    for r in range(2):
        assert sorted(resumed[r][0]) == [2, 3]
        for b in (2, 3):
            assert torch.equal(resumed[r][0][b][0], full[r][0][b][0])
            assert torch.equal(resumed[r][0][b][1], full[r][0][b][1])


@pytest.mark.composer
def test_interpolate_loss_with_per_sample_is_refused_naming_the_fix():
    from dist_cutmix import CutMix

    with pytest.raises(ValueError, match='use interpolate_loss=False.*got per_sample=True with interpolate_loss=True'):
        CutMix(per_sample=True, interpolate_loss=True)


def _logged_on_rank(rank, world):
    from dist_cutmix import CutMix
    from tests.helpers.trainer_utils import run_trainer

    _, _, mem = run_trainer([CutMix(mode='global', per_sample=True)], batch_size=4, duration='2ba')
    return [v for _, v in mem.data['cutmix/lambda']]


@pytest.mark.composer
def test_global_per_sample_logs_the_global_batch_mean_on_every_rank(tmp_path):
    logged = run_ranks(_logged_on_rank, 2, tmp_path)
    assert logged[0] == logged[1]
    for b in range(2):
        params = F.sample_params_per_sample(8, 8, 8, generator=batch_generator(17, b, 'group', 0))
        assert logged[0][b] == pytest.approx(float(per_sample_label_weights(params.lam).mean()))


@pytest.mark.composer
def test_per_sample_targets_built_from_the_outputs_take_each_microbatchs_own_lambdas():
    # A model without num_classes: CutMix builds the soft targets per microbatch at BEFORE_LOSS, from the
    # outputs' class count, and must pick each microbatch's own samples' λ out of the batch's.
    from dist_cutmix import CutMix
    from tests.helpers import compat_models as compat

    batch_size = 6
    out = compat.run_cell('bare', 'tuple', 'soft', 'local', algorithms=[CutMix(per_sample=True)],
                          batch_size=batch_size, microbatch=2, batches=2)
    _, labels = compat.make_data('bare')
    eye = torch.eye(compat.NUM_CLASSES)
    for b, microbatches in out['batches'].items():
        assert len(microbatches) == 3
        ids = torch.arange(b * batch_size, (b + 1) * batch_size)
        mixed = torch.cat([mb['input'] for mb in microbatches])
        boxes, partners = read_draw(mixed, ids)
        assert len(set(boxes)) > 2 and min(partners) >= -1  # boxes differ; a partner is read in every non-empty box
        weight = torch.tensor([round((1 - (y1 - y0) * (x1 - x0) / (compat.H * compat.W)) * 1024) / 1024
                               for y0, y1, x0, x1 in boxes])[:, None]
        partner_labels = torch.tensor([labels[ids][p] if p >= 0 else -1 for p in partners])
        assert bool((weight[partner_labels < 0] == 1).all())  # an empty box keeps its own label only
        partner_labels[partner_labels < 0] = labels[ids][partner_labels < 0]
        expected = weight * eye[labels[ids]] + (1 - weight) * eye[partner_labels]
        torch.testing.assert_close(torch.cat([mb['target'] for mb in microbatches]), expected)
