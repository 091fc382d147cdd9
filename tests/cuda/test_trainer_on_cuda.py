"""CUDA with Composer: a one-GPU Composer ``Trainer`` under bf16 autocast mixes every batch as the CPU reference.

Skipped without Composer (the GPU check machine has none) and without a CUDA GPU. The Trainer runs on an
NCCL rank in a fresh ``spawn`` interpreter (:func:`tests.helpers.spawn.run_nccl_ranks`): Composer refuses a second
backend in a process that already holds a process group, and CUDA must not start in a forked rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')

from composer import Callback, State, Trainer  # noqa: E402
from composer.loggers import Logger  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dist_cutmix import CutMix  # noqa: E402
from dist_cutmix import functional as F  # noqa: E402
from dist_cutmix.draw import MixParams  # noqa: E402
from dist_cutmix.randomness import batch_generator  # noqa: E402
from tests.helpers.cuda import SEED, C, H, W, needs_cuda  # noqa: E402
from tests.helpers.spawn import run_nccl_ranks  # noqa: E402

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


def reference_mix(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, MixParams]:
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


