"""Train metrics in a real Composer Trainer with CutMix: the logged accuracy and F1 are the true values on the
mixed targets (the metrics are replaced or wrapped at FIT_START), and without wrapping the run stops naming
the fix."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper
from tests.helpers.soft_targets import expected_accuracy


def _train(num_batches: int, wrap: bool = True) -> tuple[Any, list[tuple[Tensor, Tensor]], Any]:
    """Train a tiny ComposerClassifier with dist_cutmix.CutMix; return trainer, (outputs, targets) per batch, logger."""
    from composer import Callback, Event, Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from dist_cutmix import CutMix

    class Recorder(Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[Tensor, Tensor]] = []

        def run_event(self, event: Event, state: Any, logger: Any) -> None:
            if event == Event.AFTER_FORWARD:
                self.batches.append((state.outputs.detach().clone(), state.batch[1].detach().clone()))

    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 8, 8, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    train_metrics = [MulticlassAccuracy(num_classes=4, average='micro'),
                     MulticlassF1Score(num_classes=4, average='macro')]
    from torchmetrics import MetricCollection

    model = ComposerClassifier(net, num_classes=4, train_metrics=MetricCollection(train_metrics))
    recorder, in_memory = Recorder(), InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(images, labels), batch_size=4),
        max_duration=f'{num_batches}ba',
        algorithms=[CutMix(alpha=1.0, wrap_train_metrics=wrap)],
        callbacks=[recorder],
        loggers=[in_memory],
        optimizers=torch.optim.SGD(net.parameters(), lr=0.5),
        device='cpu',
        seed=7,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer, recorder.batches, in_memory


def _per_batch(in_memory: Any, key: str) -> dict[int, Tensor]:
    values: dict[int, Tensor] = {}
    for timestamp, value in in_memory.data[key]:
        values.setdefault(int(timestamp.batch), value)  # the epoch-end entry repeats the last batch
    return values


@pytest.mark.composer
def test_trainer_reports_true_train_accuracy_on_mixed_targets() -> None:
    num_batches = 4
    trainer, batches, in_memory = _train(num_batches)
    assert len(batches) == num_batches
    assert any(bool((target.max(dim=1).values < 1).any()) for _, target in batches), 'CutMix mixed nothing'

    accuracy = _per_batch(in_memory, 'metrics/train/MulticlassAccuracy')
    f1 = _per_batch(in_memory, 'metrics/train/MulticlassF1Score')
    for b, (outputs, target) in enumerate(batches):
        assert target.shape == (4, 4)
        torch.testing.assert_close(accuracy[b], expected_accuracy(outputs, target), msg=f'batch {b}')
        reference_f1 = MulticlassF1Score(num_classes=4, average='macro')(outputs, target.argmax(dim=1))
        torch.testing.assert_close(f1[b], reference_f1, msg=f'batch {b}')

    metrics = trainer.state.train_metrics
    assert isinstance(metrics['MulticlassAccuracy'], SoftTargetAccuracy)
    assert isinstance(metrics['MulticlassF1Score'], SoftTargetWrapper)
    torch.testing.assert_close(metrics['MulticlassAccuracy'].compute(), expected_accuracy(*batches[-1]))


@pytest.mark.composer
def test_trainer_without_wrapping_stops_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'MulticlassAccuracy' \(MulticlassAccuracy\).*wrap_train_metrics=True"):
        _train(1, wrap=False)
