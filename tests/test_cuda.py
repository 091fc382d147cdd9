"""CUDA and NCCL: the op on a GPU equals the CPU op bit for bit, makes no avoidable host sync, runs in a
one-GPU Composer Trainer under bf16 autocast, and mixes over two NCCL ranks as one CPU process does.

Skipped without a CUDA GPU (the NCCL tests without two). The Trainer and NCCL tests run on NCCL ranks in
fresh ``spawn`` interpreters (:func:`tests.spawn.run_nccl_ranks`): CUDA must not start in the pytest
process or in a rank forked from torch's CPU state, and Composer refuses a second backend in a process
that already holds a process group. Every helper takes its device, so the same checks run on the CPU
(and over gloo) where no GPU is.
"""
from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pytest
import torch
import torch.distributed as dist

pytest.importorskip('composer', reason='needs the composer extra')
from composer import Callback, State, Trainer
from composer.loggers import Logger
from composer.models import ComposerClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dist_cutmix import CutMix
from dist_cutmix import functional as F
from dist_cutmix._random import batch_generator
from dist_cutmix.distributed import node_group
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from tests.spawn import run_nccl_ranks

SEED, N, C, H, W, K = 1234, 6, 3, 9, 7, 5  # 9x7 images: a non-dyadic pixel share

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU; torch sees none on this machine (CPU-only host or CI)',
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason=f'needs 2 GPUs (one NCCL rank on each) and a torch built with NCCL; '
           f'{torch.cuda.device_count()} GPU(s) visible here',
)

VARIANTS = ('float32', 'bfloat16', 'uint8', 'channels_last')
KINDS = ('index', 'soft', 'dense')


# ----------------------------------------------------------------------------- data and comparisons


def make_input(variant: str, n: int = N, seed: int = 0) -> Tensor:
    """A CPU ``(n, C, H, W)`` batch: float32, bfloat16, uint8 or channels_last float32."""
    g = torch.Generator().manual_seed(seed)
    if variant == 'uint8':
        return torch.randint(0, 256, (n, C, H, W), generator=g, dtype=torch.uint8)
    x = torch.randn(n, C, H, W, generator=g)
    if variant == 'bfloat16':
        return x.to(torch.bfloat16)
    if variant == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    return x


def make_target(kind: str, n: int = N, seed: int = 1) -> Tensor:
    """CPU targets: index ``(n,)``, soft ``(n, K)`` or dense ``(n, H, W)`` class maps."""
    g = torch.Generator().manual_seed(seed)
    if kind == 'index':
        return torch.randint(0, K, (n,), generator=g)
    if kind == 'soft':
        return torch.softmax(torch.randn(n, K, generator=g), 1)
    return torch.randint(0, K, (n, H, W), generator=g)


def make_params(case: str) -> F.CutMixParams:
    """CPU-drawn parameters for ``N`` images: a drawn box (0.2 < λ < 0.8), an empty one, or the whole image."""
    def draw(seed: int, **kwargs: Any) -> F.CutMixParams:
        return F.sample_params(N, H, W, generator=torch.Generator().manual_seed(seed), **kwargs)

    if case == 'empty':
        return draw(0, alpha=0.0)
    if case == 'full':
        return draw(0, box=(0, H, 0, W))
    return draw(next(s for s in range(1000) if 0.2 < draw(s).lam < 0.8))


def first_mixing_batch(n: int, *key: Any) -> int:
    """The first batch whose draw from ``(SEED, batch, *key)`` pastes a real box (λ < 0.8)."""
    return next(b for b in range(1000) if F.sample_params(n, H, W, generator=batch_generator(SEED, b, *key)).lam < 0.8)


def assert_same(expected: Tensor, actual: Tensor, device: str, what: str) -> None:
    """``actual`` lives on ``device`` and equals the CPU tensor ``expected`` bit for bit, in dtype, shape and layout."""
    assert actual.device.type == torch.device(device).type, f'{what}: on {actual.device}, expected {device}'
    host = actual.cpu()  # keeps the strides of a dense tensor
    assert host.dtype == expected.dtype, f'{what}: dtype {host.dtype}, expected {expected.dtype}'
    assert host.shape == expected.shape, f'{what}: shape {tuple(host.shape)}, expected {tuple(expected.shape)}'
    if host.numel():
        assert host.stride() == expected.stride(), f'{what}: strides {host.stride()}, expected {expected.stride()}'
    assert torch.equal(host, expected), f'{what}: values differ from the CPU result'


def assert_same_result(expected: MixResult, actual: MixResult, device: str, what: str) -> None:
    """Every field of two :class:`MixResult` agree; the tensors are on ``device``, the partner bookkeeping anywhere."""
    for name in ('input', 'target', 'partner_target'):
        assert_same(getattr(expected, name), getattr(actual, name), device, f'{what}: {name}')
    assert (actual.lam, actual.box, actual.kind) == (expected.lam, expected.box, expected.kind), what
    for name in ('partner_rank', 'partner_index'):
        assert torch.equal(getattr(actual, name).cpu(), getattr(expected, name)), f'{what}: {name}'


# ----------------------------------------------------------------------------- 1. CUDA equals CPU


def check_apply_cutmix(variant: str, box: str, inplace: bool, device: str) -> None:
    """``apply_cutmix`` on ``device`` with CPU-drawn params equals it on the CPU; in place returns the input."""
    params, x = make_params(box), make_input(variant)
    expected = F.apply_cutmix(x.clone(), params, inplace=inplace)
    on_device = x.to(device, copy=True)
    out = F.apply_cutmix(on_device, params, inplace=inplace)
    assert (out is on_device) == inplace
    assert_same(expected, out, device, f'apply_cutmix({variant}, {box} box, inplace={inplace})')


def check_mix_targets(kind: str, box: str, device: str) -> None:
    """``mix_targets`` on ``device`` equals it on the CPU, for the same params."""
    params, y = make_params(box), make_target(kind)
    expected = F.mix_targets(y, y[params.indices], params.lam, params.box, kind=kind, num_classes=K)
    on_device = y.to(device, copy=True)
    partner = on_device[params.indices.to(device)]
    out = F.mix_targets(on_device, partner, params.lam, params.box, kind=kind, num_classes=K)
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

SYNC_MESSAGE = 'called a synchronizing CUDA operation'


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """Each host sync ``fn`` makes, as ``file:line`` of the Python line that made it (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f'{os.path.relpath(w.filename)}:{w.lineno}' for w in caught if SYNC_MESSAGE in str(w.message)]


def first_sync_traceback(fn: Callable[[], object]) -> str:
    """The traceback of ``fn``'s first host sync, raised by ``set_sync_debug_mode('error')``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        fn()
    except RuntimeError as e:
        if SYNC_MESSAGE not in str(e):
            raise
        return ''.join(traceback.format_exception(e))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return '(none raised in error mode)'


def assert_syncs_at_most(fn: Callable[[], object], bound: int, what: str) -> None:
    """``fn``, once warmed up, makes at most ``bound`` host syncs; else name each one and show the first."""
    fn()  # first-call allocations and kernel loads are not the steady state
    syncs = host_syncs(fn)
    assert len(syncs) <= bound, (
        f'{what}: {len(syncs)} host syncs, at most {bound} allowed, at {syncs}; the first one:\n'
        f'{first_sync_traceback(fn)}'
    )


@needs_cuda
@pytest.mark.parametrize('inplace', [False, True])
def test_apply_cutmix_on_cuda_makes_no_host_sync(inplace: bool) -> None:
    params, x = make_params('drawn'), make_input('float32').cuda()  # params drawn on the CPU
    assert_syncs_at_most(lambda: F.apply_cutmix(x, params, inplace=inplace), 0, f'apply_cutmix(inplace={inplace})')


@needs_cuda
@pytest.mark.parametrize('kind, bound', [
    ('soft', 0),
    ('dense', 0),
    ('index', 1),  # the documented range check of the labels
])
def test_mix_batch_local_on_cuda_host_syncs(kind: str, bound: int) -> None:
    x, y = make_input('float32').cuda(), make_target(kind).cuda()
    batch = first_mixing_batch(N, 'local', 0)
    assert_syncs_at_most(lambda: mix_batch_local(x, y, seed=SEED, batch=batch, num_classes=K), bound,
                         f'mix_batch_local({kind} targets)')


# ----------------------------------------------------------------------------- 3. one-GPU Trainer

TRAIN_N, TRAIN_BATCH, TRAIN_BATCHES, CLASSES = 24, 6, 3, 4


def train_data() -> TensorDataset:
    """A tiny image classification set, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.rand(TRAIN_N, C, H, W, generator=g), torch.randint(0, CLASSES, (TRAIN_N,), generator=g))


class Seen(Callback):
    """What the model saw in each batch, copied to the host: input, target, where they were, outputs' dtype, loss."""

    def __init__(self) -> None:
        self.batches: dict[int, dict[str, Any]] = {}

    def before_forward(self, state: State, logger: Logger) -> None:
        x, y = state.batch
        self.batches[int(state.timestamp.batch)] = {
            'device': x.device.type,
            'input': x.detach().to('cpu', copy=True),
            'target': y.detach().to('cpu', copy=True),
        }

    def after_forward(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)]['outputs_dtype'] = str(state.outputs.dtype)

    def before_backward(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)]['loss'] = state.loss.detach().float().to('cpu', copy=True)


def train_on_rank(rank: int, world_size: int, modes: Sequence[str], device: str,
                  precision: str) -> dict[str, dict[int, dict[str, Any]]]:
    """One short Trainer run of a tiny conv classifier per CutMix mode; what the model saw, per mode and batch."""
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))
        model = ComposerClassifier(net, num_classes=CLASSES)
        seen = Seen()
        trainer = Trainer(
            model=model, train_dataloader=DataLoader(train_data(), batch_size=TRAIN_BATCH),
            max_duration=f'{TRAIN_BATCHES}ba', optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
            algorithms=[CutMix(mode=mode, seed=SEED)], callbacks=[seen], seed=SEED, device=device,
            precision=precision, progress_bar=False, log_to_console=False, dist_timeout=60,
        )
        trainer.fit()
        trainer.close()
        runs[mode] = seen.batches
    return runs


def reference_mix(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, F.CutMixParams]:
    """An independent CPU reference of one draw: a per-sample mask blend, one-hot labels weighted by λ on 2**-10."""
    params = F.sample_params(len(x), x.shape[-2], x.shape[-1], generator=generator)
    y0, y1, x0, x1 = params.box
    mask = torch.zeros(x.shape[-2:], dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    mixed = torch.stack([torch.where(mask, x[int(j)], x[i]) for i, j in enumerate(params.indices)])
    eye, weight = torch.eye(CLASSES), round(params.lam * 1024) / 1024
    return mixed, weight * eye[y] + (1 - weight) * eye[y[params.indices]], params


def check_trainer_runs(runs: dict[str, dict[int, dict[str, Any]]], device_type: str, outputs_dtype: str) -> None:
    """Each batch the model saw is the reference mix of its draw, with soft targets summing to N and a finite loss."""
    data = train_data()
    for mode, batches in runs.items():
        key = ('local', 0) if mode == 'local' else ('group', 0)  # one process: global and node mix the whole batch
        assert sorted(batches) == list(range(TRAIN_BATCHES)), mode
        mixed_any = False
        for b, seen in batches.items():
            rows = slice(b * TRAIN_BATCH, (b + 1) * TRAIN_BATCH)
            mixed, target, params = reference_mix(data.tensors[0][rows], data.tensors[1][rows],
                                                  batch_generator(SEED, b, *key))
            mixed_any |= params.lam < 1.0
            what = f'{mode} mode, batch {b}'
            assert seen['device'] == device_type, f'{what}: the batch was on {seen["device"]}'
            assert seen['outputs_dtype'] == outputs_dtype, f'{what}: outputs {seen["outputs_dtype"]}'
            assert torch.equal(seen['input'], mixed), f'{what}: the mixed images differ from the CPU reference'
            assert seen['target'].dtype == torch.float32 and torch.equal(seen['target'], target), what
            assert float(seen['target'].sum()) == TRAIN_BATCH, f'{what}: targets sum to {float(seen["target"].sum())}'
            assert bool(torch.isfinite(seen['loss']).all()), f'{what}: loss {seen["loss"]}'
        assert mixed_any, f'{mode} mode: no batch pasted a box, the check proves nothing'


@needs_cuda
def test_one_gpu_trainer_in_bf16_mixes_as_the_cpu_reference(tmp_path: Path) -> None:
    # One NCCL rank: the Trainer takes the group of one run_nccl_ranks made as the one it would make itself.
    [runs] = run_nccl_ranks(train_on_rank, 1, tmp_path, ('local', 'global', 'node'), 'gpu', 'amp_bf16')
    check_trainer_runs(runs, 'cuda', 'torch.bfloat16')


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
    kind = F.target_kind(y, x)
    partner = F.gather_crops(y, params.indices, params.box) if kind == 'dense' else y[params.indices]
    target = F.mix_targets(y, partner, params.lam, params.box, kind=kind, num_classes=K)
    return {'input': F.apply_cutmix(x, params), 'target': target, 'partner_target': partner,
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
