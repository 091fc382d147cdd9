"""CutMix, MixUp and MixUpCutMix must never write into the user's dataset.

Each kind of dataset of :mod:`tests.helpers.data_safety` (pre-batched numpy arrays, cached tensors, views of
one stored tensor, tensors already on the trainer's device) goes through a real Composer ``Trainer`` run of 3
epochs with the default ``CutMix()`` (``inplace=None``), in mode 'local' on one rank (this process) and in mode
'global' on 2 spawned gloo ranks (one spawn trains every kind in turn), and its stored data must afterwards be
bit for bit what a deep copy taken before training holds. Every run must also show that mixing happened (a
logged ``cutmix/lambda`` below 1 and batches the model saw that are none of the stored batches), so no test
passes by not mixing. ``CutMix(inplace=True)`` is the user's promise that the batch is theirs: on cached
tensors it does overwrite them, which a test documents. Pinned and GPU-resident data:
tests/cuda/test_data_safety_on_cuda.py.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import dist
from torch.utils.data import DataLoader

from tests.helpers.data_safety import (
    BATCH,
    CPU_KINDS,
    EPOCHS,
    NUM_BATCHES,
    assert_safe_and_mixed,
    build,
    by_kind,
    compare,
    every_kind_on_rank,
    leaves,
    same_memory,
    stored_batches,
    train_and_check,
)
from tests.helpers.spawn import run_ranks
from tests.helpers.trainer_utils import Recorder, make_model


@pytest.fixture(autouse=True)
def _no_cpuinfo_probe(monkeypatch):
    """Composer asks py-cpuinfo about the CPU in every Trainer (about 1 s); answer from a constant."""
    import cpuinfo

    monkeypatch.setattr(cpuinfo, 'get_cpu_info', lambda: {'brand_raw': 'cpu', 'count': 1})


# ---------------------------------------------------------------------------- local: one rank


@pytest.mark.parametrize('kind', CPU_KINDS)
def test_local_mode_leaves_the_dataset_bit_for_bit(kind):
    report = train_and_check(kind, 'local')  # in this process
    assert_safe_and_mixed(report, steps=EPOCHS * NUM_BATCHES)


# ---------------------------------------------------------------------------- global: 2 spawned ranks


@pytest.fixture(scope='module')
def global_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """One spawn of 2 gloo ranks that trains every CPU kind in turn; kind -> each rank's report."""
    tmp = tmp_path_factory.mktemp('global')
    return by_kind(run_ranks(every_kind_on_rank, 2, tmp, CPU_KINDS, 'global'), CPU_KINDS)


@pytest.mark.parametrize('kind', CPU_KINDS)
def test_global_mode_on_two_ranks_leaves_the_dataset_bit_for_bit(kind, global_results):
    reports = global_results[kind]
    assert len(reports) == 2
    for r in reports:
        assert r['kind'] == kind
        # the sampler splits the 4 batches over 2 ranks: 2 steps a rank per epoch
        assert_safe_and_mixed(r, steps=EPOCHS * NUM_BATCHES // 2)
    assert reports[0]['lams'] == reports[1]['lams']  # one global draw per batch


# ---------------------------------------------------------------------------- the tests can fail


def test_inplace_true_does_overwrite_cached_tensors():
    """``inplace=True`` is the user's word that the batch is theirs: the cached tensors are pasted into."""
    r = train_and_check('cached', 'local', inplace=True)
    assert r['aliases'] and min(r['lams']) < 1.0
    assert not r['intact'] and r['changed_fraction'] > 0


# ---------------------------------------------------------------------------- MixUp and MixUpCutMix
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
    dataset, loader_kwargs, device = build(kind)
    before = copy.deepcopy(dataset.stored())
    loader = DataLoader(dataset, batch_size=None, sampler=dist.get_sampler(dataset, shuffle=False), **loader_kwargs)
    first = next(iter(loader))[0]
    aliases = any(same_memory(first, leaf) for leaf in leaves(dataset.stored()[0]))
    recorder, mem = Recorder(), InMemoryLogger()
    model = make_model()
    algorithm = _mixer(name, mode)
    Trainer(
        model=model, train_dataloader=loader, max_duration=f'{EPOCHS}ep',
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01), algorithms=[algorithm], callbacks=[recorder],
        loggers=[mem], seed=17, device=device, progress_bar=False, log_to_console=False,
        device_train_microbatch_size=BATCH, dist_timeout=30,
    ).fit()
    intact, changed = compare(before, dataset.stored())
    originals = stored_batches(before[0])
    seen = [recorder.whole(b, 'input').cpu() for b in sorted(recorder.batches)]
    return {
        'kind': kind, 'aliases': aliases, 'intact': intact, 'changed_fraction': changed,
        'lams': [float(v) for _, v in mem.data[f'{name}/lambda']], 'steps': len(seen),
        'unlike_any_stored': sum(not any(torch.equal(s, o) for o in originals) for s in seen),
    }


@pytest.mark.parametrize('name', MIXERS)
@pytest.mark.parametrize('kind', CPU_KINDS)
def test_mixup_and_mixupcutmix_leave_the_dataset_bit_for_bit_locally(kind, name):
    assert_safe_and_mixed(train_mixer_and_check(kind, 'local', name), steps=EPOCHS * NUM_BATCHES)


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
        assert_safe_and_mixed(r, steps=EPOCHS * NUM_BATCHES // 2)
    assert reports[0]['lams'] == reports[1]['lams']  # one global draw per batch
