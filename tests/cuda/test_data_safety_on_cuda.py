"""Pinned and GPU-resident datasets must come out of a Composer ``Trainer`` run with ``CutMix()`` bit for bit as
they went in, as the CPU kinds do in tests/composer/test_data_safety.py: pinned cached tensors with
``DataLoader(pin_memory=True)`` and cached tensors already on the GPU, trained with ``device='gpu'``.

They need a CUDA GPU (global mode: two, over NCCL) and are skipped, with the reason, where there is none; they
run on NCCL ranks in fresh interpreters (:func:`tests.helpers.spawn.run_nccl_ranks`): Composer refuses a second
backend in a process that already holds a process group, and CUDA must not start in a forked rank.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')

from tests.helpers.data_safety import (  # noqa: E402
    CUDA_KINDS,
    EPOCHS,
    NUM_BATCHES,
    assert_safe_and_mixed,
    by_kind,
    every_kind_on_rank,
)
from tests.helpers.spawn import run_nccl_ranks  # noqa: E402

NO_CUDA = 'needs CUDA: pinned memory and a dataset on the GPU only exist with a CUDA device, and this machine has none'
NO_TWO_GPUS = "global mode on the GPU needs 2 GPUs and NCCL (Composer's 'gpu' device refuses gloo ranks)"


@pytest.fixture(scope='module')
def cuda_local_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp('cuda_local')
    return by_kind(run_nccl_ranks(every_kind_on_rank, 1, tmp, CUDA_KINDS, 'local'), CUDA_KINDS)


@pytest.fixture(scope='module')
def cuda_global_results(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp('cuda_global')
    return by_kind(run_nccl_ranks(every_kind_on_rank, 2, tmp, CUDA_KINDS, 'global'), CUDA_KINDS)


def _skip_unavailable(mode: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    if mode == 'global' and (torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available()):
        pytest.skip(f'{NO_TWO_GPUS}; {torch.cuda.device_count()} GPU(s) visible here')


@pytest.mark.parametrize('kind', CUDA_KINDS)
def test_local_mode_on_cuda_leaves_the_dataset_bit_for_bit(kind, request):
    _skip_unavailable('local')
    [report] = request.getfixturevalue('cuda_local_results')[kind]  # after the skip: the spawn needs a GPU
    assert_safe_and_mixed(report, steps=EPOCHS * NUM_BATCHES)


@pytest.mark.parametrize('kind', CUDA_KINDS)
def test_global_mode_on_two_gpus_leaves_the_dataset_bit_for_bit(kind, request):
    _skip_unavailable('global')
    reports = request.getfixturevalue('cuda_global_results')[kind]
    assert len(reports) == 2
    for r in reports:
        assert r['kind'] == kind
        # the sampler splits the 4 batches over 2 ranks: 2 steps a rank per epoch
        assert_safe_and_mixed(r, steps=EPOCHS * NUM_BATCHES // 2)
    assert reports[0]['lams'] == reports[1]['lams']  # one global draw per batch
