"""Per-sample boxes and λ: the op against a per-sample loop, W ranks against one process, real Trainers."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local
from dist_cutmix.randomness import batch_generator
from tests.spawn import run_ranks

K = 5


def _reference(x: torch.Tensor, params: F.PerSampleParams) -> torch.Tensor:
    """The plain per-sample loop: sample i takes its partner's unmixed pixels inside box i."""
    out = x.clone()
    for i, (y0, y1, x0, x1) in enumerate(params.boxes.tolist()):
        out[i, ..., y0:y1, x0:x1] = x[int(params.indices[i]), ..., y0:y1, x0:x1]
    return out


def _weight(lam: torch.Tensor) -> torch.Tensor:
    return torch.round(lam * 1024) / 1024  # the documented label weight, per sample


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
    expected = _reference(x, params)
    original = x.clone()
    out = F.apply_cutmix_per_sample(x, params, inplace=inplace)
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
    assert torch.equal(r.input, _reference(x, params)) and torch.equal(r.lam, params.lam)
    wgt = _weight(params.lam)
    if kind == 'dense':
        assert torch.equal(r.target, _reference(y[:, None], params)[:, 0])
    elif kind == 'index':
        eye = torch.eye(K)
        torch.testing.assert_close(r.target,
                                   wgt[:, None].float() * eye[y] + (1 - wgt[:, None].float()) * eye[y[params.indices]])
        assert float(r.target.sum()) == n
    else:
        col = wgt.float() if kind == 'binary' else wgt[:, None].float()
        torch.testing.assert_close(r.target, col * y + (1 - col) * y[params.indices])
    assert r.mean_label_lam == pytest.approx(float(wgt.mean()))


def _rank_data(rank: int, n: int, kind: str, channels_last: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(100 + rank)
    x = (torch.rand(n, 3, 9, 11, generator=g) * 200).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = {'index': lambda: torch.randint(0, K, (n,), generator=g),
         'soft': lambda: torch.softmax(torch.randn(n, K, generator=g), 1),
         'binary': lambda: torch.randint(0, 2, (n,), generator=g).float(),
         'dense': lambda: torch.randint(0, K, (n, 9, 11), generator=g)}[kind]()
    return x, y


def _global_on_rank(rank, world, cases):
    out = []
    for sizes, kind, channels_last, dtype in cases:
        x, y = _rank_data(rank, sizes[rank], kind, channels_last, dtype)
        r = mix_batch_across_group(x, y, seed=3, batch=5, num_classes=K, per_sample=True, inplace=channels_last)
        out.append((r.input, r.target, r.bytes_sent, r.input.is_contiguous(memory_format=torch.channels_last)))
    return out


def _row_bytes(x: torch.Tensor, y: torch.Tensor, kind: str, box: list[int]) -> int:
    y0, y1, x0, x1 = box
    area = max(y1 - y0, 0) * max(x1 - x0, 0)
    label = area * y.element_size() if kind == 'dense' else y[0:1].numel() * y.element_size()
    return area * x.shape[1] * x.element_size() + label


@pytest.mark.parametrize('world', [2, 3])
def test_w_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, world):
    cases = {
        2: [([3, 5], 'index', False, torch.float32), ([1, 1], 'soft', False, torch.bfloat16),
            ([4, 3], 'dense', True, torch.uint8)],
        3: [([2, 6, 3], 'dense', True, torch.float32), ([0, 4, 2], 'binary', False, torch.uint8),
            ([1, 1, 1], 'index', True, torch.float32)],
    }[world]
    results = run_ranks(_global_on_rank, world, tmp_path, cases)
    for c, (sizes, kind, channels_last, dtype) in enumerate(cases):
        xs, ys = zip(*(_rank_data(r, n, kind, channels_last, dtype) for r, n in enumerate(sizes)), strict=True)
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        single = mix_batch_across_group(x_all, y_all, seed=3, batch=5, num_classes=K, per_sample=True)
        params = F.sample_params_per_sample(sum(sizes), 9, 11, generator=batch_generator(3, 5, 'group', 0))
        assert torch.equal(torch.cat([r[c][0] for r in results]), single.input)
        assert torch.equal(single.input, _reference(x_all, params))
        assert torch.equal(torch.cat([r[c][1] for r in results]), single.target)
        assert all(r[c][3] == (channels_last and sizes[i] > 0) for i, r in enumerate(results))
        # bytes: exactly the crops (each cut with its destination's box) and labels that change rank
        owner = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))
        for rank in range(world):
            must = sum(_row_bytes(x_all, y_all, kind, params.boxes[g].tolist()) for g in range(sum(sizes))
                       if owner[params.indices[g]] == rank and owner[g] != rank)
            assert results[rank][c][2] == must


def _trainer_on_rank(rank, world, mode, folder, phase):
    from dist_cutmix import CutMix
    from tests.trainer_utils import run_trainer

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
    from tests.trainer_utils import make_dataset, sample_ids

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
            params = F.PerSampleParams(boxes=torch.cat([p.boxes for p in parts]), lam=torch.cat([p.lam for p in parts]),
                                       indices=torch.cat([parts[0].indices, parts[1].indices + 4]))
        assert torch.equal(mixed, _reference(x, params))
        wgt = _weight(params.lam)[:, None].float()
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
    from tests.trainer_utils import run_trainer

    _, _, mem = run_trainer([CutMix(mode='global', per_sample=True)], batch_size=4, duration='2ba')
    return [v for _, v in mem.data['cutmix/lambda']]


@pytest.mark.composer
def test_global_per_sample_logs_the_global_batch_mean_on_every_rank(tmp_path):
    logged = run_ranks(_logged_on_rank, 2, tmp_path)
    assert logged[0] == logged[1]
    for b in range(2):
        params = F.sample_params_per_sample(8, 8, 8, generator=batch_generator(17, b, 'group', 0))
        assert logged[0][b] == pytest.approx(float(_weight(params.lam).mean()))
