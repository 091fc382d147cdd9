"""Soft, CutMix-like classification batches and the hand-written reference accuracy the metric tests score them with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_batch(seed: int, n: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Random logits and CutMix-like targets ``lam * onehot(own) + (1 - lam) * onehot(partner)``, one λ per row."""
    g = torch.Generator().manual_seed(seed)
    preds = torch.randn(n, num_classes, generator=g)
    own = torch.randint(0, num_classes, (n,), generator=g)
    partner = torch.randint(0, num_classes, (n,), generator=g)
    lam = torch.rand(n, 1, generator=g)
    target = lam * F.one_hot(own, num_classes) + (1 - lam) * F.one_hot(partner, num_classes)
    return preds, target


def expected_accuracy(preds: Tensor, target: Tensor) -> Tensor:
    """Reference: mean target mass on the argmax class, written out by hand."""
    return (target * F.one_hot(preds.argmax(dim=1), target.shape[1])).sum(dim=1).mean()
