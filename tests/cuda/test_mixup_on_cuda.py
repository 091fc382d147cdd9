"""CUDA: MixUp and the MixUp/CutMix switch on a GPU equal the CPU bit for bit and make no avoidable host sync.

Needs no Composer, so the prepared GPU check runs it on a machine without it. The CUDA tests skip without a
GPU; every check takes its device, and the same checks run here on the CPU against an independent reference,
so a broken check cannot pass on the GPU unnoticed.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from dist_cutmix import MixSpec, sample_mix
from dist_cutmix.draw import MixParams, PerSampleMixParams
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from dist_cutmix.pixels import apply_mix
from dist_cutmix.randomness import batch_generator
from tests.helpers.cuda import assert_same, assert_syncs
from tests.helpers.cuda import make_input as cuda_make_input

SEED, N, C, H, W, K = 99, 8, 3, 9, 7, 5

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU; torch sees none on this machine (CPU-only host or CI)',
)
DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]
VARIANTS = ('float32', 'bfloat16', 'uint8', 'channels_last')
SWITCH = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8, switch_prob=0.5, label_smoothing=0.1)


def make_input(variant: str, n: int = N, seed: int = 0) -> Tensor:
    """tests.helpers.cuda's batches (float32, bfloat16, uint8, channels_last), ``N`` images here."""
    return cuda_make_input(variant, n, seed)


def make_target(kind: str, n: int = N, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == 'index':
        return torch.randint(0, K, (n,), generator=g)
    if kind == 'soft':
        return torch.softmax(torch.randn(n, K, generator=g), 1)
    return torch.softmax(torch.randn(n, K, H, W, generator=g), 1)  # float dense maps: MixUp blends them


def reference_blend(own: Tensor, partner: Tensor, w: float) -> Tensor:
    """``(1 - w) * own + w * partner`` written out: in float32 for half and integer types, ties to even."""
    if own.dtype in (torch.float32, torch.float64):
        return own * (1 - w) + partner * w
    v = own.float() * (1 - w) + partner.float() * w
    return (v if own.is_floating_point() else v.round()).to(own.dtype)


def reference_mix(x: Tensor, params: PerSampleMixParams) -> Tensor:
    """Each sample mixed with its partner a row at a time, from the drawn params alone."""
    out = x.clone()
    for i, (j, (y0, y1, x0, x1), w) in enumerate(zip(params.indices.tolist(), params.boxes.tolist(),
                                                     params.weights.tolist(), strict=True)):
        if w == 1:
            out[i, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        elif w > 0:
            out[i, :, y0:y1, x0:x1] = reference_blend(x[i, :, y0:y1, x0:x1], x[j, :, y0:y1, x0:x1], w)
    return out


def mixing_batch(per_sample: bool, stream: str = 'local') -> int:
    """The first batch whose switched draw mixes some samples by each method (per sample) or blends (per batch)."""
    key = ('local', 0) if stream == 'local' else ('group', 0)
    for b in range(1000):
        p = sample_mix(SWITCH, N, H, W, per_sample=per_sample, generator=batch_generator(SEED, b, *key))
        if per_sample and bool((p.weights == 1).any() & ((p.weights > 0) & (p.weights < 1)).any()):
            return b
        if not per_sample and 0 < p.weight < 1:
            return b
    raise AssertionError('no batch mixes both ways')


# ----------------------------------------------------------------------------- 1. the device equals the CPU


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('variant', VARIANTS)
def test_mixup_op_on_device_equals_cpu(variant: str, inplace: bool, device: str) -> None:
    x = make_input(variant)
    params = MixParams(box=(0, H, 0, W), lam=0.6875, indices=torch.randperm(N, generator=torch.Generator()
                                                                                    .manual_seed(3)), weight=0.3125)
    expected = reference_blend(x, x[params.indices], 0.3125)
    expected = torch.empty_like(x).copy_(expected)  # the layout of the input
    on_device = x.to(device, copy=True)
    out = apply_mix(on_device, params, inplace=inplace)
    assert (out is on_device) == inplace
    assert_same(expected, out, device, f'MixUp op ({variant}, inplace={inplace})')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('variant', VARIANTS)
def test_switched_per_sample_op_on_device_equals_cpu(variant: str, inplace: bool, device: str) -> None:
    x = make_input(variant)
    params = sample_mix(SWITCH, N, H, W, per_sample=True, generator=batch_generator(SEED, mixing_batch(True)))
    expected = torch.empty_like(x).copy_(reference_mix(x, params))
    out = apply_mix(x.to(device, copy=True), params, inplace=inplace)
    assert_same(expected, out, device, f'switched per-sample op ({variant}, inplace={inplace})')


def _result_fields(r: MixResult) -> dict[str, Any]:
    return {'input': r.input, 'target': r.target, 'partner_target': r.partner_target}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('kind', ['index', 'soft', 'dense'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_switched_mix_batch_local_on_device_equals_cpu(variant: str, kind: str, per_sample: bool, device: str) -> None:
    x, y = make_input(variant), make_target(kind)
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.8) if kind == 'dense' else SWITCH  # smoothing: classes
    kwargs: dict[str, Any] = dict(seed=SEED, batch=mixing_batch(per_sample), num_classes=K, spec=spec,
                                  per_sample=per_sample)
    expected = mix_batch_local(x.clone(), y.clone(), **kwargs)
    actual = mix_batch_local(x.to(device, copy=True), y.to(device, copy=True), **kwargs)
    for name, value in _result_fields(expected).items():
        assert_same(value, _result_fields(actual)[name], device, f'{name} ({variant}, {kind}, per_sample={per_sample})')
    if kind != 'dense':  # the labels carry the pixels' λ: rows sum to 1 (smoothing keeps that)
        assert torch.allclose(actual.target.float().sum(1).cpu(), torch.ones(N), atol=1e-6)


# ----------------------------------------------------------------------------- 2. host syncs

# (mode, per_sample, kind) -> host syncs per call on one GPU, counted as tests/cuda/test_cutmix_on_cuda.py counts
# them (sync debug mode plus pageable copies): the switch adds none to CutMix's table in docs/design.md. The range
# check of index labels (1); in the group's per-sample path the masked_select of the crops (1).
SWITCH_SYNCS = {
    ('local', False, 'soft'): 0, ('local', False, 'index'): 1,
    ('local', True, 'soft'): 0, ('local', True, 'index'): 1,
    ('group', False, 'soft'): 0, ('group', False, 'index'): 1,
    ('group', True, 'soft'): 1, ('group', True, 'index'): 2,
}


@needs_cuda
@pytest.mark.parametrize('mode, per_sample, kind', list(SWITCH_SYNCS))
def test_switched_mixing_makes_the_documented_host_syncs(mode: str, per_sample: bool, kind: str) -> None:
    x, y = make_input('float32').cuda(), make_target(kind).cuda()
    mix = mix_batch_local if mode == 'local' else mix_batch_across_group
    batch = mixing_batch(per_sample, 'local' if mode == 'local' else 'group')
    assert_syncs(lambda: mix(x, y, seed=SEED, batch=batch, num_classes=K, spec=SWITCH, per_sample=per_sample),
                 SWITCH_SYNCS[mode, per_sample, kind], f'switched {mode} mixing, per_sample={per_sample}, {kind}')
