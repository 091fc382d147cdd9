"""A tiny, fast Composer setup whose images carry their own identity.

Channel 0 of sample ``i`` of the dataset is filled with ``i``: after mixing, the value inside
the box names the partner, so tests read partners off the pixels the model actually saw instead
of trusting what the algorithm reports.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from composer import Callback, State, Trainer
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4
H = W = 8


def make_dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)[:, None, None]
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def make_model(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES))
    return ComposerClassifier(net, num_classes=NUM_CLASSES)


class Recorder(Callback):
    """Keeps what the model saw: each microbatch's input and target, its outputs and loss."""

    def __init__(self) -> None:
        self.batches: dict[int, list[dict[str, torch.Tensor]]] = {}

    def before_forward(self, state: State, logger: Logger) -> None:
        x, y = state.batch
        self.batches.setdefault(int(state.timestamp.batch), []).append({'input': x.clone(), 'target': y.clone()})

    def after_forward(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)][-1]['outputs'] = state.outputs.detach().clone()

    def before_backward(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)][-1]['loss'] = state.loss.detach().clone()

    def whole(self, batch: int, key: str) -> torch.Tensor:
        return torch.cat([mb[key] for mb in self.batches[batch]])


def run_trainer(
    algorithms: list[Any],
    *,
    batch_size: int = 6,
    n: int = 48,
    duration: str = '3ba',
    seed: int = 17,
    microbatch: Optional[int] = None,
    save_folder: Optional[str] = None,
    load_path: Optional[str] = None,
    parallelism_config: Optional[dict] = None,
    dataset: Optional[TensorDataset] = None,
) -> tuple[Trainer, Recorder, InMemoryLogger]:
    dataset = dataset or make_dataset(n)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=dist.get_sampler(dataset, shuffle=False))
    recorder, mem = Recorder(), InMemoryLogger()
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        algorithms=algorithms,
        callbacks=[recorder],
        loggers=[mem],
        seed=seed,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        device_train_microbatch_size=microbatch,
        save_folder=save_folder,
        save_interval='2ba' if save_folder else '1ep',
        save_filename='ba{batch}-rank{rank}.pt',
        save_overwrite=True,
        load_path=load_path,
        parallelism_config=parallelism_config,
        dist_timeout=30,
    )
    trainer.fit()
    return trainer, recorder, mem


def sample_ids(rank: int, world: int, batch: int, batch_size: int, n: int = 48) -> torch.Tensor:
    """Dataset indices of a rank's batch under the unshuffled DistributedSampler."""
    ranked = torch.arange(n)[rank::world]
    return ranked[batch * batch_size:(batch + 1) * batch_size]


def partner_ids(mixed: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Read each sample's partner id off channel 0 inside the box."""
    y0, y1, x0, x1 = box
    return mixed[:, 0, y0:y1, x0:x1].flatten(1)[:, 0].round().long()


def find_box(mixed: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int, int]:
    """The box where channel 0 differs from the sample's own id (the same box for the batch)."""
    changed = (mixed[:, 0] != ids[:, None, None].float()).any(0)
    if not changed.any():
        return (0, 0, 0, 0)
    ys, xs = changed.nonzero(as_tuple=True)
    return (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
