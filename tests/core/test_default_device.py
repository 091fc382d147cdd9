"""Draws and mixes of CPU tensors hold under a default device other than the CPU (``torch.set_default_device``):
every host draw names the CPU, so a CPU generator never meets a tensor made on the default device.

Under ``torch.set_default_device('cuda')`` a draw with a CPU generator and no ``device='cpu'`` raises a
generator/device mismatch; ``'meta'`` shows the same on a CPU-only host, so the test runs everywhere.
"""
from __future__ import annotations

import torch


def _draws_and_mixes() -> dict[str, object]:
    """Every draw and mix of CPU tensors the package offers without a process group, as plain values."""
    from dist_cutmix import functional as F
    from dist_cutmix.draw import sample_partners
    from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local

    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 9, 7, generator=g, device='cpu')
    labels = torch.randint(0, 5, (6,), generator=g, device='cpu')
    dense = torch.randint(0, 5, (6, 9, 7), generator=g, device='cpu')
    out: dict[str, object] = {}
    params = F.sample_params(6, 9, 7, generator=torch.Generator().manual_seed(1))
    out['params'] = (params.box, params.lam, params.indices)
    fixed = F.sample_params(6, 9, 7, indices=[1, 2, 3, 4, 5, 0], length=0.5, generator=torch.Generator().manual_seed(1))
    out['fixed'] = (fixed.box, fixed.lam, fixed.indices)
    per = F.sample_params_per_sample(6, 9, 7, uniform_sampling=True, generator=torch.Generator().manual_seed(1))
    out['per_sample_params'] = (per.boxes, per.lam, per.indices)
    out['partners_with_a_fixed_point'] = sample_partners(2, generator=torch.Generator().manual_seed(0))
    out['cutmix_batch'] = F.cutmix_batch(x, labels, generator=torch.Generator().manual_seed(2))
    for per_sample in (False, True):
        for name, target in (('index', labels), ('dense', dense)):
            for how, mix in (('local', mix_batch_local), ('group of one', mix_batch_across_group)):
                r = mix(x, target, seed=5, batch=4, num_classes=5, per_sample=per_sample)
                out[f'{how} {name} per_sample={per_sample}'] = (
                    r.input, r.target, r.partner_target, r.lam, r.box, r.partner_rank, r.partner_index)
    return out


def _assert_equal(a: object, b: object, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.device.type == 'cpu', f'{what}: {b!r}'
        assert a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_equal(u, v, f'{what}[{i}]')
    else:
        assert a == b, what


def test_draws_and_mixes_of_cpu_tensors_ignore_the_default_device() -> None:
    # Under torch.set_default_device('cuda') a draw with a CPU generator and no device='cpu' raises a
    # generator/device mismatch; 'meta' shows the same on a CPU-only host.
    expected = _draws_and_mixes()
    assert any(p < 1.0 for p in [expected['params'][1]]), 'the draw pastes no box: the check proves little'
    torch.set_default_device('meta')
    try:
        actual = _draws_and_mixes()
    finally:
        torch.set_default_device(None)
    assert torch.empty(1).device.type == 'cpu'
    assert actual.keys() == expected.keys()
    for key in expected:
        _assert_equal(expected[key], actual[key], key)
