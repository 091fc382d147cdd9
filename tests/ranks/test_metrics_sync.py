"""dist_cutmix.metrics over two real gloo ranks with uneven batches: the synced value is the value over the
union of the ranks' batches, and each rank's own state is left unsynced after compute."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score

from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper, soft_target_accuracy
from tests.helpers.soft_targets import soft_batch
from tests.helpers.spawn import run_ranks

RANK_SIZES = (5, 11)  # uneven on purpose
NUM_CLASSES = 4


def _rank_data(rank: int) -> tuple[Tensor, Tensor]:
    return soft_batch(100 + rank, RANK_SIZES[rank], NUM_CLASSES)


def _make_metrics() -> dict[str, Any]:
    return {
        'accuracy': SoftTargetAccuracy(NUM_CLASSES),
        'f1': SoftTargetWrapper(MulticlassF1Score(NUM_CLASSES, average='macro')),
        'confmat': SoftTargetWrapper(MulticlassConfusionMatrix(NUM_CLASSES)),
    }


def _synced_metrics(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == world_size
    preds, target = _rank_data(rank)
    metrics = _make_metrics()
    for metric in metrics.values():
        metric.update(preds[:3], target[:3])
        metric.update(preds[3:], target[3:])
    synced = {name: metric.compute() for name, metric in metrics.items()}
    synced['local_count'] = int(metrics['accuracy'].count)  # unsynced again after compute
    return synced


def test_two_ranks_sync_to_the_value_over_the_union(tmp_path: Any) -> None:
    results = run_ranks(_synced_metrics, 2, tmp_path)
    data = [_rank_data(rank) for rank in range(2)]
    preds = torch.cat([p for p, _ in data])
    target = torch.cat([t for _, t in data])
    union = _make_metrics()
    for metric in union.values():
        metric.update(preds, target)
    for rank, result in enumerate(results):
        assert result['local_count'] == RANK_SIZES[rank]
        for name, metric in union.items():
            torch.testing.assert_close(result[name], metric.compute(), msg=f'rank {rank}, {name}')
    # The synced accuracy is not rank 0's own: the test would notice a sync that did nothing.
    assert not torch.allclose(results[0]['accuracy'], soft_target_accuracy(*data[0]))
