"""Per-sample boxes and λ in one process: the op against a per-sample loop, each sample's box drawn from the
batch mode's distribution, each sample's own λ in its targets, and targets left alone when told.

Across gloo ranks: tests/ranks/test_global_per_sample.py; in Composer Trainers:
tests/composer/test_per_sample_algorithm.py.
"""
from __future__ import annotations

import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local
from dist_cutmix.pixels_per_sample import apply_per_sample
from dist_cutmix.randomness import batch_generator
from tests.helpers.mix_reference import paste_per_sample, per_sample_label_weights

K = 5


# 3x8x8 (192 elements) takes the mask path, 3x60x60 (10800) the per-sample copies
@pytest.mark.parametrize('shape', [(16, 3, 8, 8), (6, 3, 60, 60), (1, 3, 8, 8), (0, 3, 8, 8)])
@pytest.mark.parametrize('dtype, channels_last', [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False), (torch.uint8, True)])
@pytest.mark.parametrize('inplace', [False, True])
def test_op_equals_a_per_sample_loop_and_keeps_dtype_and_layout(shape, dtype, channels_last, inplace):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.rand(shape, generator=g) * 200).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = F.sample_params_per_sample(shape[0], shape[2], shape[3], generator=g)
    expected = paste_per_sample(x, params)
    original = x.clone()
    out = apply_per_sample(x, params, inplace=inplace)
    assert torch.equal(out, expected) and out.dtype == dtype
    if shape[0]:  # an empty tensor has every layout and no memory
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert (out.data_ptr() == x.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(x, original)


def test_every_sample_draws_its_own_box_from_the_batch_mode_distribution():
    h, w, n = 40, 30, 4000
    for uniform in (False, True):
        per = F.sample_params_per_sample(n, h, w, uniform_sampling=uniform, generator=batch_generator(1, 0))
        batch = [F.sample_params(2, h, w, uniform_sampling=uniform, generator=batch_generator(2, b)) for b in range(n)]
        batch_lam = torch.tensor([p.lam for p in batch], dtype=torch.float64)
        # λ_i is each box's exact pixel share; boxes lie inside the image
        y0, y1, x0, x1 = per.boxes.unbind(1)
        assert bool(((0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)).all())
        torch.testing.assert_close(per.lam, 1 - ((y1 - y0) * (x1 - x0)).double() / (h * w))
        assert len({tuple(b) for b in per.boxes.tolist()}) > n // 4  # many different boxes in one batch
        # same distribution as one-box-per-batch draws: mean and spread agree within sampling noise
        se = float(batch_lam.std()) / n ** 0.5
        assert abs(float(per.lam.mean() - batch_lam.mean())) < 4 * 2 ** 0.5 * se
        assert abs(float(per.lam.std() - batch_lam.std())) < 0.03
        # uniform_sampling reaches every edge equally often; plain sampling clips at the edges
        if uniform:
            assert float((y0 == 0).double().mean()) > 0.2
    assert bool((F.sample_params_per_sample(8, 9, 9, alpha=0.0, generator=batch_generator(0, 0)).lam == 1).all())


@pytest.mark.parametrize('kind', ['index', 'soft', 'binary', 'dense'])
def test_local_targets_use_each_samples_own_lambda(kind):
    g = torch.Generator().manual_seed(7)
    n, h, w = 9, 7, 9
    x = torch.rand(n, 3, h, w, generator=g)
    y = {'index': torch.randint(0, K, (n,), generator=g), 'soft': torch.softmax(torch.randn(n, K, generator=g), 1),
         'binary': torch.randint(0, 2, (n,), generator=g).float(),
         'dense': torch.randint(0, K, (n, h, w), generator=g)}[kind]
    r = mix_batch_local(x, y, seed=3, batch=4, num_classes=K, per_sample=True)
    params = F.sample_params_per_sample(n, h, w, generator=batch_generator(3, 4, 'local', 0))
    assert torch.equal(r.input, paste_per_sample(x, params)) and torch.equal(r.lam, params.lam)
    wgt = per_sample_label_weights(params.lam)
    if kind == 'dense':
        assert torch.equal(r.target, paste_per_sample(y[:, None], params)[:, 0])
    elif kind == 'index':
        eye = torch.eye(K)
        torch.testing.assert_close(r.target,
                                   wgt[:, None].float() * eye[y] + (1 - wgt[:, None].float()) * eye[y[params.indices]])
        assert float(r.target.sum()) == n
    else:
        col = wgt.float() if kind == 'binary' else wgt[:, None].float()
        torch.testing.assert_close(r.target, col * y + (1 - col) * y[params.indices])
    assert r.mean_label_lam == pytest.approx(float(wgt.mean()))


def test_global_per_sample_mixing_leaves_dense_targets_alone_when_told():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6, 8, 8), generator=g)
    for mix in (mix_batch_local, mix_batch_across_group):
        for per_sample in (False, True):
            r = mix(x, y, seed=1, batch=0, per_sample=per_sample, mix_target=False)
            assert not torch.equal(r.input, x)  # the images were mixed
            assert torch.equal(r.target, y), f'{mix.__name__}, per_sample={per_sample}: the targets changed'
