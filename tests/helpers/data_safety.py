"""Datasets that hand the loader their own memory, and one Composer training run that reports what happened to
them: the data-safety tests (tests/composer/test_data_safety.py on the CPU, tests/cuda/test_data_safety_on_cuda.py
for pinned and GPU-resident data) train on each kind and check the stored data bit for bit afterwards.

A loader can hand out the dataset's own memory: ``DataLoader(batch_size=None)`` over pre-batched numpy arrays
yields ``torch.as_tensor`` aliases of them, a dataset of cached tensors yields the tensors themselves, and a
dataset already on the device is left where it is by the trainer's device move.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from dist_cutmix import CutMix
from tests.helpers.trainer_utils import Recorder, make_dataset, make_model

N, BATCH, EPOCHS = 24, 6, 3
NUM_BATCHES = N // BATCH


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


def build(kind: str) -> tuple[Dataset, dict[str, Any], str]:
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


def leaves(stored: Any) -> list[Any]:
    if isinstance(stored, (list, tuple)):
        return [leaf for s in stored for leaf in leaves(s)]
    return [stored]


def as_cpu_tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()


def compare(before: Any, after: Any) -> tuple[bool, float]:
    """(bit for bit equal, share of stored elements that differ)."""
    equal, changed, total = True, 0, 0
    for b, a in zip(leaves(before), leaves(after), strict=True):
        if isinstance(b, np.ndarray):
            equal &= a.dtype == b.dtype and np.array_equal(a, b)
        else:
            equal &= a.dtype == b.dtype and torch.equal(a, b)
        tb, ta = as_cpu_tensor(b), as_cpu_tensor(a)
        changed += int((tb != ta).sum())
        total += tb.numel()
    return bool(equal), changed / total


def same_memory(t: torch.Tensor, stored: Any) -> bool:
    """Whether the loader's tensor ``t`` is the stored array's or tensor's own memory."""
    if isinstance(stored, np.ndarray):
        return t.device.type == 'cpu' and bool(np.shares_memory(t.numpy(), stored))
    return t.device == stored.device and t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()


def stored_batches(x: Any) -> list[torch.Tensor]:
    """The stored input batches, on the CPU: a list of batches, a pre-batched array, or one tensor to slice."""
    if isinstance(x, list):
        return [as_cpu_tensor(b) for b in x]
    x = as_cpu_tensor(x)
    return list(x.unbind(0)) if x.ndim == 5 else list(x.split(BATCH))


# ---------------------------------------------------------------------------- one training run


def train_and_check(kind: str, mode: str, inplace: bool | None = None) -> dict[str, Any]:
    """Train 3 epochs on ``kind`` with ``CutMix(mode=mode, inplace=inplace)``; report what happened to the data."""
    dataset, loader_kwargs, device = build(kind)
    before = copy.deepcopy(dataset.stored())
    loader = DataLoader(dataset, batch_size=None, sampler=dist.get_sampler(dataset, shuffle=False), **loader_kwargs)
    first = next(iter(loader))[0]
    aliases = any(same_memory(first, leaf) for leaf in leaves(dataset.stored()[0]))
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
    intact, changed = compare(before, dataset.stored())
    originals = stored_batches(before[0])
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


def assert_safe_and_mixed(r: dict[str, Any], steps: int) -> None:
    if r['kind'] != 'pinned':  # the premise: the loader hands out the dataset's own memory (or a view of it)
        assert r['aliases'], f"{r['kind']}: the loader copied the data, so this case tests nothing"
    assert r['intact'], (
        f"{r['kind']}: CutMix() overwrote the dataset: {r['changed_fraction']:.1%} of the stored elements changed"
    )
    assert r['steps'] == steps and len(r['lams']) == steps
    assert min(r['lams']) < 1.0, f"{r['kind']}: no batch was mixed (lambdas {r['lams']})"
    assert r['unlike_any_stored'] > 0, f"{r['kind']}: every batch the model saw is a stored batch, unmixed"


# ---------------------------------------------------------------------------- spawned ranks
# Composer keeps the process group of the first Trainer of a process and refuses another backend, so a
# 'gpu' Trainer (nccl) cannot run in a pytest process once a 'cpu' one (gloo) has, nor in gloo ranks.
# The CPU kinds' global mode runs on 2 gloo ranks; the CUDA kinds run on NCCL ranks in fresh 'spawn'
# interpreters: one rank, whose NCCL group of one the Trainer takes as the one it would make itself, or
# two, one GPU each. Each spawn trains every kind of its list in turn.


def every_kind_on_rank(rank: int, world: int, kinds: list[str], mode: str) -> list[dict[str, Any]]:
    """A rank body: train every kind of ``kinds`` in turn in ``mode``; each run's report."""
    return [train_and_check(kind, mode) for kind in kinds]


def by_kind(per_rank: list[list[dict[str, Any]]], kinds: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per-rank lists of reports, in ``kinds`` order, as kind -> each rank's report."""
    return {kind: [reports[i] for reports in per_rank] for i, kind in enumerate(kinds)}
