"""CutMix must never write into the user's dataset (issue 11, "The dataset is overwritten").

A loader can hand out the dataset's own memory: ``DataLoader(batch_size=None)`` over pre-batched
numpy arrays yields ``torch.as_tensor`` aliases of them, a dataset of cached tensors yields the
tensors themselves, and a dataset already on the device is left where it is by the trainer's device
move. Each kind of dataset below goes through a real Composer ``Trainer`` run of 3 epochs with the
default ``CutMix()`` (``inplace=None``), in mode 'local' on one rank (this process) and in mode
'global' on 2 spawned gloo ranks (one spawn trains every kind in turn), and its stored data must
afterwards be bit for bit what a deep copy taken before training holds. Every run must also show
that mixing happened (a logged ``cutmix/lambda`` below 1
and batches the model saw that are none of the stored batches), so no test passes by not mixing.
``CutMix(inplace=True)`` is the user's promise that the batch is theirs: on cached tensors it does
overwrite them, which the last test documents.

The pinned and CUDA-resident kinds need a CUDA GPU (global mode: two, over NCCL) and are skipped,
with the reason, where there is none; they run on NCCL ranks in fresh interpreters
(:func:`tests.spawn.run_nccl_ranks`).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from dist_cutmix import CutMix
from tests.spawn import run_nccl_ranks, run_ranks
from tests.trainer_utils import Recorder, make_dataset, make_model

N, BATCH, EPOCHS = 24, 6, 3
NUM_BATCHES = N // BATCH

CUDA = torch.cuda.is_available()
NO_CUDA = 'needs CUDA: pinned memory and a dataset on the GPU only exist with a CUDA device, and this machine has none'
NO_TWO_GPUS = "global mode on the GPU needs 2 GPUs and NCCL (Composer's 'gpu' device refuses gloo ranks)"

# kind -> whether it needs CUDA
KINDS = {
    'numpy': False,  # pre-batched numpy arrays, batch_size=None: the loader yields torch.as_tensor aliases
    'cached': False,  # a list of pre-made batch tensors, returned as they are
    'views': False,  # slices of one big stored tensor
    'pinned': True,  # pinned cached tensors, DataLoader(pin_memory=True), trained on the GPU
    'on_device_cpu': False,  # cached tensors already on the trainer's device ('cpu'): the device move keeps them
    'on_device_cuda': True,  # cached tensors already on the GPU, trained with device='gpu'
}
CPU_KINDS = [k for k, needs_cuda in KINDS.items() if not needs_cuda]
CUDA_KINDS = [k for k, needs_cuda in KINDS.items() if needs_cuda]


# ---------------------------------------------------------------------------- datasets


class PreBatched(Dataset):
    """Item ``i`` is the ``i``-th pre-made batch ``(x[i], y[i])``, handed out as stored (no copy)."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.x[i], self.y[i]

    def stored(self) -> list[Any]:
        """The dataset's own memory (not a copy)."""
        return [self.x, self.y]


class Slices(Dataset):
    """Item ``i`` is a view into one big stored tensor: ``x[i*B:(i+1)*B]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i * BATCH:(i + 1) * BATCH], self.y[i * BATCH:(i + 1) * BATCH]

    def stored(self) -> list[Any]:
        return [self.x, self.y]


def _build(kind: str) -> tuple[Dataset, dict[str, Any], str]:
    """The dataset, the extra DataLoader arguments and the Trainer device for one kind."""
    source = make_dataset(N)  # channel 0 of sample i is i: a pasted crop always changes the pixels
    x, y = source.tensors
    if kind == 'numpy':
        xs = x.numpy().reshape(NUM_BATCHES, BATCH, *x.shape[1:]).copy()
        ys = y.numpy().reshape(NUM_BATCHES, BATCH).copy()
        return PreBatched(xs, ys), {}, 'cpu'
    if kind == 'views':
        return Slices(x.clone(), y.clone()), {}, 'cpu'
    xs = [x[b * BATCH:(b + 1) * BATCH].clone() for b in range(NUM_BATCHES)]
    ys = [y[b * BATCH:(b + 1) * BATCH].clone() for b in range(NUM_BATCHES)]
    if kind in ('cached', 'on_device_cpu'):
        return PreBatched(xs, ys), {}, 'cpu'
    if kind == 'pinned':
        return PreBatched([t.pin_memory() for t in xs], [t.pin_memory() for t in ys]), {'pin_memory': True}, 'gpu'
    if kind == 'on_device_cuda':
        return PreBatched([t.cuda() for t in xs], [t.cuda() for t in ys]), {}, 'gpu'
    raise ValueError(kind)


def _leaves(stored: Any) -> list[Any]:
    if isinstance(stored, (list, tuple)):
        return [leaf for s in stored for leaf in _leaves(s)]
    return [stored]


def _as_cpu_tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()


def _compare(before: Any, after: Any) -> tuple[bool, float]:
    """(bit for bit equal, share of stored elements that differ)."""
    equal, changed, total = True, 0, 0
    for b, a in zip(_leaves(before), _leaves(after), strict=True):
        if isinstance(b, np.ndarray):
            equal &= a.dtype == b.dtype and np.array_equal(a, b)
        else:
            equal &= a.dtype == b.dtype and torch.equal(a, b)
        tb, ta = _as_cpu_tensor(b), _as_cpu_tensor(a)
        changed += int((tb != ta).sum())
        total += tb.numel()
    return bool(equal), changed / total


def _same_memory(t: torch.Tensor, stored: Any) -> bool:
    """Whether the loader's tensor ``t`` is the stored array's or tensor's own memory."""
    if isinstance(stored, np.ndarray):
        return t.device.type == 'cpu' and bool(np.shares_memory(t.numpy(), stored))
    return t.device == stored.device and t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()


def _stored_batches(x: Any) -> list[torch.Tensor]:
    """The stored input batches, on the CPU: a list of batches, a pre-batched array, or one tensor to slice."""
    if isinstance(x, list):
        return [_as_cpu_tensor(b) for b in x]
    x = _as_cpu_tensor(x)
    return list(x.unbind(0)) if x.ndim == 5 else list(x.split(BATCH))


# ---------------------------------------------------------------------------- one training run


def train_and_check(kind: str, mode: str, inplace: bool | None = None) -> dict[str, Any]:
    """Train 3 epochs on ``kind`` with ``CutMix(mode=mode, inplace=inplace)``; report what happened to the data."""
    dataset, loader_kwargs, device = _build(kind)
    before = copy.deepcopy(dataset.stored())
    loader = DataLoader(dataset, batch_size=None, sampler=dist.get_sampler(dataset, shuffle=False), **loader_kwargs)
    first = next(iter(loader))[0]
    aliases = any(_same_memory(first, leaf) for leaf in _leaves(dataset.stored()[0]))
    recorder, mem = Recorder(), InMemoryLogger()
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f'{EPOCHS}ep',
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        algorithms=[CutMix(mode=mode, inplace=inplace)],
        callbacks=[recorder],
        loggers=[mem],
        seed=17,
        device=device,
        progress_bar=False,
        log_to_console=False,
        device_train_microbatch_size=BATCH,  # a batch_size=None loader has no batch_size to take it from
        dist_timeout=30,
    )
    trainer.fit()
    intact, changed = _compare(before, dataset.stored())
    originals = _stored_batches(before[0])
    seen = [recorder.whole(b, 'input').cpu() for b in sorted(recorder.batches)]
    return {
        'kind': kind,
        'aliases': aliases,
        'intact': intact,
        'changed_fraction': changed,
        'lams': [float(v) for _, v in mem.data['cutmix/lambda']],
        'steps': len(seen),
        'unlike_any_stored': sum(not any(torch.equal(s, o) for o in originals) for s in seen),
    }


def _assert_safe_and_mixed(r: dict[str, Any], steps: int) -> None:
    if r['kind'] != 'pinned':  # the premise: the loader hands out the dataset's own memory (or a view of it)
        assert r['aliases'], f"{r['kind']}: the loader copied the data, so this case tests nothing"
    assert r['intact'], (
        f"{r['kind']}: CutMix() overwrote the dataset: {r['changed_fraction']:.1%} of the stored elements changed"
    )
    assert r['steps'] == steps and len(r['lams']) == steps
    assert min(r['lams']) < 1.0, f"{r['kind']}: no batch was mixed (lambdas {r['lams']})"
    assert r['unlike_any_stored'] > 0, f"{r['kind']}: every batch the model saw is a stored batch, unmixed"


@pytest.fixture(autouse=True)
def _no_cpuinfo_probe(monkeypatch):
    """Composer asks py-cpuinfo about the CPU in every Trainer (about 1 s); answer from a constant."""
    import cpuinfo

    monkeypatch.setattr(cpuinfo, 'get_cpu_info', lambda: {'brand_raw': 'cpu', 'count': 1})


# ---------------------------------------------------------------------------- spawned ranks
# Composer keeps the process group of the first Trainer of a process and refuses another backend, so a
# 'gpu' Trainer (nccl) cannot run in this pytest process once a 'cpu' one (gloo) has, nor in gloo ranks.
# The CPU kinds' global mode runs on 2 gloo ranks; the CUDA kinds run on NCCL ranks in fresh 'spawn'
# interpreters: one rank, whose NCCL group of one the Trainer takes as the one it would make itself, or
# two, one GPU each. Each spawn trains every kind of its list in turn.


def _every_kind_on_rank(rank: int, world: int, kinds: list[str], mode: str) -> list[dict[str, Any]]:
    return [train_and_check(kind, mode) for kind in kinds]


def _by_kind(per_rank: list[list[dict[str, Any]]], kinds: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {kind: [reports[i] for reports in per_rank] for i, kind in enumerate(kinds)}


@pytest.fixture(scope='module')
def cuda_local_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp('cuda_local')
    return _by_kind(run_nccl_ranks(_every_kind_on_rank, 1, tmp, CUDA_KINDS, 'local'), CUDA_KINDS)


@pytest.fixture(scope='module')
def cuda_global_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp('cuda_global')
    return _by_kind(run_nccl_ranks(_every_kind_on_rank, 2, tmp, CUDA_KINDS, 'global'), CUDA_KINDS)


def _skip_unavailable(kind: str, mode: str) -> None:
    if not KINDS[kind]:
        return
    if not CUDA:
        pytest.skip(NO_CUDA)
    if mode == 'global' and (torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available()):
        pytest.skip(f'{NO_TWO_GPUS}; {torch.cuda.device_count()} GPU(s) visible here')


# ---------------------------------------------------------------------------- local: one rank


@pytest.mark.parametrize('kind', list(KINDS))
def test_local_mode_leaves_the_dataset_bit_for_bit(kind, request):
    _skip_unavailable(kind, 'local')
    if KINDS[kind]:
        [report] = request.getfixturevalue('cuda_local_results')[kind]
    else:
        report = train_and_check(kind, 'local')  # in this process
    _assert_safe_and_mixed(report, steps=EPOCHS * NUM_BATCHES)


# ---------------------------------------------------------------------------- global: 2 spawned ranks


@pytest.fixture(scope='module')
def global_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """One spawn of 2 gloo ranks that trains every CPU kind in turn; kind -> each rank's report."""
    tmp = tmp_path_factory.mktemp('global')
    return _by_kind(run_ranks(_every_kind_on_rank, 2, tmp, CPU_KINDS, 'global'), CPU_KINDS)


@pytest.mark.parametrize('kind', list(KINDS))
def test_global_mode_on_two_ranks_leaves_the_dataset_bit_for_bit(kind, request):
    _skip_unavailable(kind, 'global')
    reports = request.getfixturevalue('cuda_global_results' if KINDS[kind] else 'global_results')[kind]
    assert len(reports) == 2
    for r in reports:
        assert r['kind'] == kind
        # the sampler splits the 4 batches over 2 ranks: 2 steps a rank per epoch
        _assert_safe_and_mixed(r, steps=EPOCHS * NUM_BATCHES // 2)
    assert reports[0]['lams'] == reports[1]['lams']  # one global draw per batch


# ---------------------------------------------------------------------------- the tests can fail


def test_inplace_true_does_overwrite_cached_tensors():
    """``inplace=True`` is the user's word that the batch is theirs: the cached tensors are pasted into."""
    r = train_and_check('cached', 'local', inplace=True)
    assert r['aliases'] and min(r['lams']) < 1.0
    assert not r['intact'] and r['changed_fraction'] > 0


# ---------------------------------------------------------------------------- MixUp and MixUpCutMix (issue 16)
# The same promise for the other mixing algorithms: MixUp blends every pixel of the batch, MixUpCutMix pastes
# or blends, so a write into the loader's memory would change every stored sample.

MIXERS = ('mixup', 'mixupcutmix')


def _mixer(name: str, mode: str) -> Any:
    from dist_cutmix import MixUp, MixUpCutMix

    if name == 'mixup':
        return MixUp(alpha=1.0, mode=mode)
    return MixUpCutMix(label_smoothing=0.1, per_sample=True, mode=mode)


def train_mixer_and_check(kind: str, mode: str, name: str) -> dict[str, Any]:
    """:func:`train_and_check` for MixUp or MixUpCutMix (``inplace=None``); ``name`` is the logged key's prefix."""
    dataset, loader_kwargs, device = _build(kind)
    before = copy.deepcopy(dataset.stored())
    loader = DataLoader(dataset, batch_size=None, sampler=dist.get_sampler(dataset, shuffle=False), **loader_kwargs)
    first = next(iter(loader))[0]
    aliases = any(_same_memory(first, leaf) for leaf in _leaves(dataset.stored()[0]))
    recorder, mem = Recorder(), InMemoryLogger()
    model = make_model()
    algorithm = _mixer(name, mode)
    Trainer(
        model=model, train_dataloader=loader, max_duration=f'{EPOCHS}ep',
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01), algorithms=[algorithm], callbacks=[recorder],
        loggers=[mem], seed=17, device=device, progress_bar=False, log_to_console=False,
        device_train_microbatch_size=BATCH, dist_timeout=30,
    ).fit()
    intact, changed = _compare(before, dataset.stored())
    originals = _stored_batches(before[0])
    seen = [recorder.whole(b, 'input').cpu() for b in sorted(recorder.batches)]
    return {
        'kind': kind, 'aliases': aliases, 'intact': intact, 'changed_fraction': changed,
        'lams': [float(v) for _, v in mem.data[f'{name}/lambda']], 'steps': len(seen),
        'unlike_any_stored': sum(not any(torch.equal(s, o) for o in originals) for s in seen),
    }


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('kind', CPU_KINDS)
def test_mixup_and_mixupcutmix_leave_the_dataset_bit_for_bit_locally(kind, name):
    _assert_safe_and_mixed(train_mixer_and_check(kind, 'local', name), steps=EPOCHS * NUM_BATCHES)


def _every_mixer_on_rank(rank: int, world: int) -> dict[tuple[str, str], dict[str, Any]]:
    return {(kind, name): train_mixer_and_check(kind, 'global', name) for name in MIXERS for kind in CPU_KINDS}


@pytest.fixture(scope='module')
def global_mixer_results(tmp_path_factory) -> list[dict[tuple[str, str], dict[str, Any]]]:
    """One spawn of 2 gloo ranks training every CPU kind with MixUp and with MixUpCutMix in mode 'global'."""
    return run_ranks(_every_mixer_on_rank, 2, tmp_path_factory.mktemp('global_mixers'), deadline_s=300)


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('kind', CPU_KINDS)
def test_mixup_and_mixupcutmix_leave_the_dataset_bit_for_bit_on_two_ranks(kind, name, global_mixer_results):
    reports = [r[(kind, name)] for r in global_mixer_results]
    for r in reports:
        _assert_safe_and_mixed(r, steps=EPOCHS * NUM_BATCHES // 2)
    assert reports[0]['lams'] == reports[1]['lams']  # one global draw per batch
