"""CUDA and NCCL without Composer: the op on a GPU equals the CPU op bit for bit, makes exactly the host
syncs docs/design.md names (pageable copies included), and mixes over two NCCL ranks as one CPU process does.

Skipped without a CUDA GPU (the NCCL tests without two). The NCCL tests run on NCCL ranks in fresh
``spawn`` interpreters (:func:`tests.helpers.spawn.run_nccl_ranks`): CUDA must not start in a rank forked from
torch's CPU state. Every helper takes its device, so the same checks run on the CPU where no GPU is.
The one-GPU Composer Trainer check is in ``test_trainer_on_cuda.py``; the shared batches, comparison and
sync counter are :mod:`tests.helpers.cuda`; ``launch/tools/gpu_check.py`` runs every
``tests/cuda/test_*.py``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from dist_cutmix import functional as F
from dist_cutmix._tensors import to_device
from dist_cutmix.distributed import node_group
from dist_cutmix.draw import MixParams
from dist_cutmix.mixer import mix_batch_across_group, mix_batch_local
from dist_cutmix.pixels import apply_mix, gather_crops
from dist_cutmix.randomness import batch_generator
from dist_cutmix.targets import mix_targets
from dist_cutmix.validation import target_kind
from tests.helpers.cuda import (
    SEED,
    H,
    K,
    N,
    W,
    assert_same,
    assert_same_result,
    assert_syncs,
    make_input,
    make_target,
    needs_cuda,
    needs_two_gpus,
    syncs_of,
)
from tests.helpers.spawn import run_nccl_ranks

VARIANTS = ('float32', 'bfloat16', 'uint8', 'channels_last')
KINDS = ('index', 'soft', 'dense')


# ----------------------------------------------------------------------------- draws


def make_params(case: str) -> MixParams:
    """CPU-drawn parameters for ``N`` images: a drawn box (0.2 < λ < 0.8), an empty one, or the whole image."""
    def draw(seed: int, **kwargs: Any) -> MixParams:
        return F.sample_params(N, H, W, generator=torch.Generator().manual_seed(seed), **kwargs)

    if case == 'empty':
        return draw(0, alpha=0.0)
    if case == 'full':
        return draw(0, box=(0, H, 0, W))
    return draw(next(s for s in range(1000) if 0.2 < draw(s).lam < 0.8))


def first_mixing_batch(n: int, *key: Any) -> int:
    """The first batch whose draw from ``(SEED, batch, *key)`` pastes a real box (λ < 0.8)."""
    return next(b for b in range(1000) if F.sample_params(n, H, W, generator=batch_generator(SEED, b, *key)).lam < 0.8)


# ----------------------------------------------------------------------------- 1. CUDA equals CPU


def check_apply_cutmix(variant: str, box: str, inplace: bool, device: str) -> None:
    """``apply_cutmix`` on ``device`` with CPU-drawn params equals it on the CPU; in place returns the input."""
    params, x = make_params(box), make_input(variant)
    expected = apply_mix(x.clone(), params, inplace=inplace)
    on_device = x.to(device, copy=True)
    out = apply_mix(on_device, params, inplace=inplace)
    assert (out is on_device) == inplace
    assert_same(expected, out, device, f'apply_cutmix({variant}, {box} box, inplace={inplace})')


def check_mix_targets(kind: str, box: str, device: str) -> None:
    """``mix_targets`` on ``device`` equals it on the CPU, for the same params."""
    params, y = make_params(box), make_target(kind)
    expected = mix_targets(y, y[params.indices], params.lam, params.box, kind=kind, num_classes=K)
    on_device = y.to(device, copy=True)
    partner = on_device[params.indices.to(device)]
    out = mix_targets(on_device, partner, params.lam, params.box, kind=kind, num_classes=K)
    assert_same(expected, out, device, f'mix_targets({kind}, {box} box)')


def check_mix_batch_local(variant: str, kind: str, inplace: bool, device: str) -> None:
    """``mix_batch_local`` on ``device`` returns the CPU result, field by field."""
    x, y = make_input(variant), make_target(kind)
    kwargs: dict[str, Any] = dict(seed=SEED, batch=first_mixing_batch(N, 'local', 0), num_classes=K, inplace=inplace)
    expected = mix_batch_local(x.clone(), y.clone(), **kwargs)
    actual = mix_batch_local(x.to(device, copy=True), y.to(device, copy=True), **kwargs)
    assert expected.lam < 1.0
    assert_same_result(expected, actual, device, f'mix_batch_local({variant}, {kind}, inplace={inplace})')


@needs_cuda
@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('box', ['drawn', 'empty', 'full'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_apply_cutmix_on_cuda_equals_cpu(variant: str, box: str, inplace: bool) -> None:
    check_apply_cutmix(variant, box, inplace, 'cuda')


@needs_cuda
@pytest.mark.parametrize('box', ['drawn', 'empty', 'full'])
@pytest.mark.parametrize('kind', KINDS)
def test_mix_targets_on_cuda_equals_cpu(kind: str, box: str) -> None:
    check_mix_targets(kind, box, 'cuda')


@needs_cuda
@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_mix_batch_local_on_cuda_equals_cpu(variant: str, kind: str, inplace: bool) -> None:
    check_mix_batch_local(variant, kind, inplace, 'cuda')


# ----------------------------------------------------------------------------- 2. host syncs


@needs_cuda
def test_the_sync_count_sees_a_pageable_non_blocking_copy_and_a_read() -> None:
    # The counter's own check: without it a profiler that names copies differently would pass everything.
    host = torch.arange(1024)
    device = torch.zeros(4, device='cuda')
    assert len(syncs_of(lambda: host.to('cuda', non_blocking=True))) == 1  # pageable: hidden from debug mode
    assert len(syncs_of(lambda: host.pin_memory().to('cuda', non_blocking=True))) == 0
    assert len(syncs_of(lambda: to_device(host, 'cuda'))) == 0
    assert len(syncs_of(lambda: device.sum().item())) == 1  # a device-to-host read
    assert torch.equal(to_device(host, 'cuda').cpu(), host)


@needs_cuda
@pytest.mark.parametrize('inplace', [False, True])
def test_apply_cutmix_on_cuda_makes_no_host_sync(inplace: bool) -> None:
    params, x = make_params('drawn'), make_input('float32').cuda()  # params drawn on the CPU
    assert_syncs(lambda: apply_mix(x, params, inplace=inplace), 0, f'apply_cutmix(inplace={inplace})')


# (mode, per_sample, kind) -> host syncs per call on one GPU, as docs/design.md's table gives them: the
# range check of index labels (1), and in the group's per-sample path the masked_select of the crops (1)
# and of dense label crops (1). A group of one runs no handshake.
ONE_GPU_SYNCS = {
    ('local', False, 'soft'): 0, ('local', False, 'dense'): 0, ('local', False, 'index'): 1,
    ('local', True, 'soft'): 0, ('local', True, 'dense'): 0, ('local', True, 'index'): 1,
    ('group', False, 'soft'): 0, ('group', False, 'dense'): 0, ('group', False, 'index'): 1,
    ('group', True, 'soft'): 1, ('group', True, 'dense'): 2, ('group', True, 'index'): 2,
}


@needs_cuda
@pytest.mark.parametrize('mode, per_sample, kind', list(ONE_GPU_SYNCS))
def test_mixing_on_one_gpu_makes_the_documented_host_syncs(mode: str, per_sample: bool, kind: str) -> None:
    x, y = make_input('float32').cuda(), make_target(kind).cuda()
    mix = mix_batch_local if mode == 'local' else mix_batch_across_group
    batch = first_mixing_batch(N, 'local', 0) if mode == 'local' else first_mixing_batch(N, 'group', 0)
    assert_syncs(lambda: mix(x, y, seed=SEED, batch=batch, num_classes=K, per_sample=per_sample),
                 ONE_GPU_SYNCS[mode, per_sample, kind], f'{mode} mixing, per_sample={per_sample}, {kind} targets')


def check_per_sample_mixing(variant: str, kind: str, device: str) -> None:
    """Per-sample mixing, local and in a group of one, on ``device`` returns the CPU result field by field."""
    x, y = make_input(variant), make_target(kind)
    for mode, mix in (('local', mix_batch_local), ('group of one', mix_batch_across_group)):
        kwargs: dict[str, Any] = dict(seed=SEED, batch=3, num_classes=K, per_sample=True)
        expected = mix(x.clone(), y.clone(), **kwargs)
        actual = mix(x.to(device, copy=True), y.to(device, copy=True), **kwargs)
        what = f'per-sample {mode}({variant}, {kind})'
        assert bool((expected.lam < 1).any()), f'{what}: nothing pasted'
        for name in ('input', 'target', 'partner_target'):
            assert_same(getattr(expected, name), getattr(actual, name), device, f'{what}: {name}')
        assert torch.equal(actual.lam, expected.lam) and torch.equal(actual.box.cpu(), expected.box), what


@needs_cuda
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_per_sample_mixing_on_cuda_equals_cpu(variant: str, kind: str) -> None:
    check_per_sample_mixing(variant, kind, 'cuda')


def test_the_cuda_checks_run_on_the_cpu() -> None:
    # The checks' own code, against the CPU, so a slip in them does not cost a GPU run.
    check_per_sample_mixing('channels_last', 'dense', 'cpu')
    check_mix_batch_local('uint8', 'index', True, 'cpu')
    for mode, per_sample, kind in ONE_GPU_SYNCS:
        mix = mix_batch_local if mode == 'local' else mix_batch_across_group
        mix(make_input('float32'), make_target(kind), seed=SEED, batch=3, num_classes=K, per_sample=per_sample)


# ----------------------------------------------------------------------------- 4. two NCCL ranks


class Case(NamedTuple):
    """One batch split over two ranks: the ranks' batch sizes, the target kind and the input variant."""

    sizes: tuple[int, int]
    kind: str
    variant: str


GROUP_CASES = (
    Case((3, 5), 'index', 'float32'),
    Case((4, 2), 'soft', 'bfloat16'),
    Case((2, 3), 'dense', 'uint8'),
    Case((1, 1), 'index', 'channels_last'),  # one image a rank still mixes; crops travel NCHW, land channels_last
    Case((0, 4), 'soft', 'float32'),  # a rank with no samples takes part
)


def rank_batch(case: Case, rank: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s CPU batch of ``case``, the same in every process."""
    n = case.sizes[rank]
    return make_input(case.variant, n, seed=10 + rank), make_target(case.kind, n, seed=20 + rank)


def mix_on_rank(rank: int, world_size: int, mode: str, cases: Sequence[Case], device: str) -> dict[str, Any]:
    """Mix each case's rank batch on ``device`` over the world (global) or a node of this rank alone (node)."""
    group = node_group(local_world_size=1, local_rank=0, node_rank=rank) if mode == 'node' else None
    results = []
    for case in cases:
        x, y = rank_batch(case, rank)
        r = mix_batch_across_group(x.to(device), y.to(device), seed=SEED, batch=first_mixing_batch(sum(case.sizes),
                                   'group', 0), group=group, num_classes=K)
        results.append({
            'devices': {r.input.device.type, r.target.device.type, r.partner_target.device.type},
            'input': r.input.cpu(), 'target': r.target.cpu(), 'partner_target': r.partner_target.cpu(),
            'lam': r.lam, 'box': r.box,
        })
    return {'group_ranks': dist.get_process_group_ranks(group or dist.group.WORLD), 'results': results}


def mix_alone(x: Tensor, y: Tensor, batch: int, stream_rank: int) -> dict[str, Any]:
    """The CPU result of one group of one rank, whose lowest global rank is ``stream_rank``, from the functional API."""
    params = F.sample_params(len(x), H, W, generator=batch_generator(SEED, batch, 'group', stream_rank))
    kind = target_kind(y, x)
    partner = gather_crops(y, params.indices, params.box) if kind == 'dense' else y[params.indices]
    target = mix_targets(y, partner, params.lam, params.box, kind=kind, num_classes=K)
    return {'input': apply_mix(x, params), 'target': target, 'partner_target': partner,
            'lam': params.lam, 'box': params.box}


def expected_on_ranks(mode: str, case: Case) -> list[dict[str, Any]]:
    """What each rank must return: for global, one CPU process mixing the concatenated batch (no process group),
    split at the ranks' bounds; for node (one rank a node), each rank's batch mixed alone with its node's draw."""
    batch = first_mixing_batch(sum(case.sizes), 'group', 0)
    xs, ys = zip(*(rank_batch(case, rank) for rank in range(2)), strict=True)
    if mode == 'node':
        return [mix_alone(xs[rank], ys[rank], batch, rank) for rank in range(2)]
    single = mix_batch_across_group(torch.cat(xs), torch.cat(ys), seed=SEED, batch=batch, num_classes=K)
    assert single.lam < 1.0
    return [{'input': i, 'target': t, 'partner_target': p, 'lam': single.lam, 'box': single.box}
            for i, t, p in zip(*(getattr(single, name).split(list(case.sizes))
                                 for name in ('input', 'target', 'partner_target')), strict=True)]


def check_group_results(mode: str, out: list[dict[str, Any]], device: str) -> None:
    """Every rank's results equal the one-process CPU results, bit for bit and in dtype and layout."""
    assert [o['group_ranks'] for o in out] == ([[0, 1], [0, 1]] if mode == 'global' else [[0], [1]])
    for i, case in enumerate(GROUP_CASES):
        for rank, expected in enumerate(expected_on_ranks(mode, case)):
            got, what = out[rank]['results'][i], f'{mode}, {case}, rank {rank}'
            assert got['devices'] == {torch.device(device).type}, f'{what}: results on {got["devices"]}'
            for name in ('input', 'target', 'partner_target'):
                assert_same(expected[name], got[name], 'cpu', f'{what}: {name}')
            assert (got['lam'], got['box']) == (expected['lam'], expected['box']), what


@needs_two_gpus
@pytest.mark.parametrize('mode', ['global', 'node'])
def test_two_nccl_ranks_mix_as_one_cpu_process(tmp_path: Path, mode: str) -> None:
    out = run_nccl_ranks(mix_on_rank, 2, tmp_path, mode, GROUP_CASES, 'cuda')
    check_group_results(mode, out, 'cuda')


# Over W NCCL ranks the handshake adds one sync (one read of the gathered table) to the one-GPU counts.
TWO_RANK_SYNCS = {(per_sample, kind): 1 + ONE_GPU_SYNCS['group', per_sample, kind]
                  for per_sample in (False, True) for kind in KINDS}


def syncs_on_rank(rank: int, world_size: int) -> dict[tuple[bool, str], list[str]]:
    """Each (per_sample, kind)'s host syncs on this NCCL rank, steady state."""
    out = {}
    for per_sample, kind in TWO_RANK_SYNCS:
        x, y = make_input('float32', seed=10 + rank).cuda(), make_target(kind, seed=20 + rank).cuda()
        out[per_sample, kind] = syncs_of(functools.partial(
            mix_batch_across_group, x, y, seed=SEED, batch=first_mixing_batch(2 * N, 'group', 0), num_classes=K,
            per_sample=per_sample))
    return out


@needs_two_gpus
def test_two_nccl_ranks_make_the_documented_host_syncs(tmp_path: Path) -> None:
    for rank, syncs in enumerate(run_nccl_ranks(syncs_on_rank, 2, tmp_path)):
        for key, expected in TWO_RANK_SYNCS.items():
            assert len(syncs[key]) == expected, f'rank {rank}, (per_sample, kind)={key}: {syncs[key]}'


def mix_cpu_target_on_rank(rank: int, world_size: int, cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Each case mixed with the input on this rank's GPU and the target left on the CPU."""
    results = []
    for case in cases:
        x, y = rank_batch(case, rank)
        r = mix_batch_across_group(x.cuda(), y, seed=SEED, batch=first_mixing_batch(sum(case.sizes), 'group', 0),
                                   num_classes=K)
        results.append({'devices': (r.input.device.type, r.target.device.type, r.partner_target.device.type),
                        'input': r.input.cpu(), 'target': r.target, 'partner_target': r.partner_target})
    return results


@needs_two_gpus
def test_a_cpu_target_beside_a_cuda_input_crosses_nccl_and_stays_on_the_cpu(tmp_path: Path) -> None:
    # NCCL carries CUDA tensors only: the target rows cross on the GPU and come back to the host.
    out = run_nccl_ranks(mix_cpu_target_on_rank, 2, tmp_path, GROUP_CASES)
    for i, case in enumerate(GROUP_CASES):
        for rank, expected in enumerate(expected_on_ranks('global', case)):
            got, what = out[rank][i], f'{case}, rank {rank}'
            assert got['devices'] == ('cuda', 'cpu', 'cpu'), f'{what}: {got["devices"]}'
            for name in ('input', 'target', 'partner_target'):
                assert_same(expected[name], got[name], 'cpu', f'{what}: {name}')
