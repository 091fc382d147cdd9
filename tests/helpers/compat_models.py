"""The drop-in table's pieces: model kinds, batch layouts and a recorder that reads batches through a layout.

Every image carries its dataset index in channel 0, so the box and each sample's partner can be read
off the pixels the model saw. Everything here is importable by spawned ranks (no lambdas).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as TF
from composer import Callback, State, Trainer
from composer.loggers import InMemoryLogger, Logger
from composer.loss import soft_cross_entropy
from composer.models import ComposerClassifier, ComposerModel
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from dist_cutmix import CutMix

N, C, H, W = 32, 3, 7, 9  # H * W = 63: a pixel share λ is never dyadic, the label weight must be
NUM_CLASSES = 4
SEG_CLASSES = 3
MODELS = ('classifier', 'bare', 'metric', 'segmentation', 'binary')
LAYOUTS = ('tuple', 'dict', 'getset')
TARGETS = ('soft', 'interpolate')


# ----------------------------------------------------------------------------- data


def make_data(model: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, C, H, W, generator=g)
    x[:, 0] = torch.arange(N, dtype=torch.float32)[:, None, None]
    if model == 'segmentation':
        y = torch.randint(0, SEG_CLASSES, (N, H, W), generator=g)
    elif model == 'binary':
        y = torch.randint(0, 2, (N,), generator=g).float()
    else:
        y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    return x, y


def get_image(batch: Any) -> torch.Tensor:
    return batch['pixels']


def set_image(batch: Any, value: torch.Tensor) -> Any:
    batch['pixels'] = value
    return batch


def get_label(batch: Any) -> torch.Tensor:
    return batch['labels']


def set_label(batch: Any, value: torch.Tensor) -> Any:
    batch['labels'] = value
    return batch


KEYS: dict[str, tuple[Any, Any]] = {
    'tuple': (0, 1),
    'dict': ('image', 'label'),
    'getset': ((get_image, set_image), (get_label, set_label)),
}


def _get(batch: Any, key: Any) -> Any:
    from composer.utils.batch_helpers import batch_get

    return batch_get(batch, key)


class LayoutDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, layout: str) -> None:
        self.x, self.y, self.layout = x, y, layout

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        if self.layout == 'tuple':
            return self.x[i], self.y[i]
        if self.layout == 'dict':
            return {'image': self.x[i], 'label': self.y[i]}
        return {'pixels': self.x[i], 'labels': self.y[i]}


# ----------------------------------------------------------------------------- models


def _trunk(out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, out))


class LayoutClassifier(ComposerClassifier):
    """Composer's classifier (num_classes, default train metric, soft cross entropy) reading the batch by keys."""

    def __init__(self, layout: str) -> None:
        super().__init__(_trunk(NUM_CLASSES), num_classes=NUM_CLASSES)
        self.keys = KEYS[layout]

    def forward(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, tuple) and batch[1] is None:  # SelectiveBackprop's (input, None)
            return self.module(batch[0])
        return self.module(_get(batch, self.keys[0]))

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._loss_fn(outputs, _get(batch, self.keys[1]), *args, **kwargs)

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        metric.update(outputs, _get(batch, self.keys[1]))


class BareModel(ComposerModel):
    """A user's own ComposerModel: no num_classes attribute; its loss reads the batch.

    ``kind`` is 'bare' (no train metrics), 'metric' (a MulticlassAccuracy that knows num_classes),
    'segmentation' ((N, C, H, W) logits, dense targets, pixel accuracy) or 'binary' ((N,) logits,
    float targets, BCEWithLogitsLoss, BinaryAccuracy).
    """

    def __init__(self, kind: str, layout: str) -> None:
        super().__init__()
        self.kind, self.keys = kind, KEYS[layout]
        if kind == 'segmentation':
            self.net: nn.Module = nn.Conv2d(C, SEG_CLASSES, 3, padding=1)
        elif kind == 'binary':
            self.net = nn.Sequential(_trunk(1), nn.Flatten(0))
        else:
            self.net = _trunk(NUM_CLASSES)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.net(_get(batch, self.keys[0]))

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        target = _get(batch, self.keys[1])
        if self.kind == 'binary':
            return TF.binary_cross_entropy_with_logits(outputs, target)
        if self.kind == 'segmentation':
            return TF.cross_entropy(outputs, target)
        return soft_cross_entropy(outputs, target)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        if self.kind == 'metric':
            return {'Accuracy': MulticlassAccuracy(num_classes=NUM_CLASSES, average='micro')}
        if self.kind == 'segmentation':
            return {'PixelAccuracy': MulticlassAccuracy(num_classes=SEG_CLASSES, average='micro')}
        if self.kind == 'binary':
            return {'Accuracy': BinaryAccuracy()}
        return {}

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        metric.update(outputs, _get(batch, self.keys[1]))


def make_model(kind: str, layout: str) -> ComposerModel:
    torch.manual_seed(0)
    return LayoutClassifier(layout) if kind == 'classifier' else BareModel(kind, layout)


# ----------------------------------------------------------------------------- recording


class LayoutRecorder(Callback):
    """Per microbatch, what the loss saw: images, targets (after CutMix's BEFORE_LOSS), outputs, loss."""

    def __init__(self, layout: str) -> None:
        self.keys = KEYS[layout]
        self.batches: dict[int, list[dict[str, torch.Tensor]]] = {}

    def before_loss(self, state: State, logger: Logger) -> None:
        self.batches.setdefault(int(state.timestamp.batch), []).append({
            'input': _get(state.batch, self.keys[0]).detach().clone(),
            'target': _get(state.batch, self.keys[1]).detach().clone(),
            'outputs': state.outputs.detach().clone(),
        })

    def before_backward(self, state: State, logger: Logger) -> None:
        self.batches[int(state.timestamp.batch)][-1]['loss'] = state.loss.detach().clone()


def run_cell(model: str, layout: str, targets: str, mode: str, *, batch_size: int = 4, microbatch: Optional[int] = 2,
             batches: int = 2, algorithms: Optional[list] = None, dataset: Optional[Dataset] = None,
             extra_callbacks: Optional[list] = None) -> dict[str, Any]:
    """One cell of the table: a short real Trainer run; returns the recorded microbatches and logged values."""
    x, y = make_data(model)
    dataset = dataset or LayoutDataset(x, y, layout)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=dist.get_sampler(dataset, shuffle=False))
    input_key, target_key = KEYS[layout]
    cutmix = CutMix(interpolate_loss=targets == 'interpolate', input_key=input_key, target_key=target_key, mode=mode)
    net = make_model(model, layout)
    recorder, mem = LayoutRecorder(layout), InMemoryLogger()
    trainer = Trainer(
        model=net, train_dataloader=loader, max_duration=f'{batches}ba',
        optimizers=torch.optim.SGD(net.parameters(), lr=0.01), algorithms=algorithms or [cutmix],
        callbacks=[recorder, *(extra_callbacks or [])], loggers=[mem], seed=17, device='cpu', progress_bar=False,
        log_to_console=False, device_train_microbatch_size=microbatch, dist_timeout=30,
    )
    trainer.fit()
    logged = {k: [float(v) for _, v in vals] for k, vals in mem.data.items()
              if k.startswith('metrics/train/') or k.startswith('cutmix/')}
    return {'batches': recorder.batches, 'logged': logged, 'rank': dist.get_global_rank()}


def table_on_rank(rank: int, world: int, mode: str, cells: list[tuple[str, str, str]]) -> dict[tuple, Any]:
    """Run each cell in turn on this rank; a failing cell returns its traceback instead of stopping the rest."""
    import traceback
    import warnings

    out: dict[tuple, Any] = {}
    for cell in cells:
        try:
            with warnings.catch_warnings():
                # A user's run must show no soft-target warning: make it an error here.
                warnings.filterwarnings('error', message='.*less than 1 total probability.*')
                out[cell] = run_cell(*cell, mode=mode)
        except Exception:  # noqa: BLE001 - reported per cell by the test
            out[cell] = traceback.format_exc()
    return out


def reference_partners(images: torch.Tensor, ids: torch.Tensor) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """The box (where channel 0 is not the sample's own id) and each sample's partner id read inside it."""
    changed = (images[:, 0] != ids[:, None, None].float()).any(0)
    if not changed.any():
        return (0, 0, 0, 0), ids.clone()
    ys, xs = changed.nonzero(as_tuple=True)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    y0, y1, x0, x1 = box
    return box, images[:, 0, y0:y1, x0:x1].flatten(1)[:, 0].round().long()


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_loss(model: str, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss a cell's model computes, written out: binary cross entropy for ``binary``, cross entropy else."""
    if model == 'binary':
        return TF.binary_cross_entropy_with_logits(outputs, target)
    return TF.cross_entropy(outputs, target)


def reference_metric(model: str, outputs: torch.Tensor, target: torch.Tensor) -> float:
    """The train accuracy a cell should log, by hand: the expected accuracy (target mass on the predicted class)
    for soft targets, the plain one for labels, thresholded at 0.5 for ``binary``."""
    if model == 'binary':
        return float(((outputs.sigmoid() > 0.5) == (target > 0.5)).float().mean())
    predicted = outputs.argmax(1)
    if target.is_floating_point():  # soft targets: the expected accuracy (target mass on the predicted class)
        return float(target.gather(1, predicted[:, None]).mean())
    return float((predicted == target).float().mean())
