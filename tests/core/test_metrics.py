"""dist_cutmix.metrics in one process: soft-target accuracy against torchmetrics and a hand-written reference,
the argmax wrapper against the bare metric on argmax labels, and ``prepare_train_metrics``.

Synced over gloo ranks: tests/ranks/test_metrics_sync.py; in a Composer Trainer: tests/composer/test_train_metrics.py.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
)

from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper, prepare_train_metrics, soft_target_accuracy
from tests.helpers.soft_targets import expected_accuracy, soft_batch

# ----------------------------------------------------------------------------- SoftTargetAccuracy


@pytest.mark.parametrize('top_k', [1, 5])
def test_equals_torchmetrics_micro_accuracy_on_index_targets(top_k: int) -> None:
    g = torch.Generator().manual_seed(1234 + top_k)
    for case in range(60):
        num_classes = int(torch.randint(max(top_k, 2), 13, (1,), generator=g))  # torchmetrics needs C >= 2
        metric = SoftTargetAccuracy(num_classes, top_k=top_k)
        reference = MulticlassAccuracy(num_classes, top_k=top_k, average='micro')
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            n = int(torch.randint(1, 40, (1,), generator=g))
            preds = torch.randn(n, num_classes, generator=g)
            if case % 2:  # probabilities as well as logits
                preds = preds.softmax(dim=1)
            target = torch.randint(0, num_classes, (n,), generator=g)
            torch.testing.assert_close(soft_target_accuracy(preds, target, top_k=top_k), reference(preds, target))
            metric.update(preds, target)
        torch.testing.assert_close(metric.compute(), reference.compute(), msg=f'case {case}, C={num_classes}')


def test_one_hot_targets_score_like_index_targets() -> None:
    preds, _ = soft_batch(0, 50, 6)
    labels = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(1))
    for top_k in (1, 3):
        torch.testing.assert_close(
            soft_target_accuracy(preds, F.one_hot(labels, 6).float(), top_k=top_k),
            soft_target_accuracy(preds, labels, top_k=top_k),
        )


def test_cutmix_targets_score_lambda_for_own_and_one_minus_lambda_for_partner() -> None:
    lam = 0.7
    own, partner = torch.tensor([0, 1, 2]), torch.tensor([3, 2, 0])
    target = lam * F.one_hot(own, 4) + (1 - lam) * F.one_hot(partner, 4)
    # Row 0 names its own class, row 1 its partner's, row 2 neither.
    preds = torch.tensor([[5.0, 0.0, 0.0, 1.0], [0.0, 1.0, 5.0, 0.0], [1.0, 5.0, 0.0, 0.0]])
    torch.testing.assert_close(soft_target_accuracy(preds, target), torch.tensor((0.7 + 0.3 + 0.0) / 3))
    # The top 2 hold own and partner in rows 0 and 1 (mass 1), and only the partner in row 2.
    torch.testing.assert_close(soft_target_accuracy(preds, target, top_k=2), torch.tensor((1.0 + 1.0 + 0.3) / 3))
    metric = SoftTargetAccuracy(num_classes=4)
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])
    torch.testing.assert_close(metric.compute(), torch.tensor((0.7 + 0.3 + 0.0) / 3))


def test_class_and_function_agree_on_random_soft_batches() -> None:
    metric = SoftTargetAccuracy(num_classes=7, top_k=2)
    batches = [soft_batch(seed, n, 7) for seed, n in enumerate([3, 17, 8])]
    for preds, target in batches:
        metric.update(preds, target)
    preds = torch.cat([p for p, _ in batches])
    target = torch.cat([t for _, t in batches])
    torch.testing.assert_close(metric.compute(), soft_target_accuracy(preds, target, top_k=2))
    torch.testing.assert_close(
        soft_target_accuracy(preds, target), expected_accuracy(preds, target),
    )


def test_stock_accuracy_misreads_soft_targets_and_ours_does_not() -> None:
    preds, target = soft_batch(3, 64, 5)
    stock = MulticlassAccuracy(num_classes=5, average='micro')(preds, target)
    truth = expected_accuracy(preds, target)
    assert truth > 0.1
    assert stock == 0.0  # the failure this module exists for
    torch.testing.assert_close(SoftTargetAccuracy(num_classes=5)(preds, target), truth)


def test_empty_state_computes_zero_and_reset_clears() -> None:
    metric = SoftTargetAccuracy(num_classes=3)
    preds, target = soft_batch(4, 9, 3)
    metric.update(preds, target)
    metric.reset()
    metric.update(preds[:2], target[:2])
    torch.testing.assert_close(metric.compute(), expected_accuracy(preds[:2], target[:2]))
    metric.reset()
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        torch.testing.assert_close(metric.compute(), torch.tensor(0.0))


@pytest.mark.parametrize(
    ('call', 'match'),
    [
        (lambda: SoftTargetAccuracy(num_classes=4, top_k=0), r'top_k .* got top_k=0'),
        (lambda: SoftTargetAccuracy(num_classes=4, top_k=5), r'num_classes=4, got top_k=5'),
        (lambda: SoftTargetAccuracy(num_classes=0), r'num_classes=0'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 2]), top_k=5), r'got top_k=5'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.tensor([0, 1])), r'shape \(2,\)'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.full((3, 5), 0.2)), r'target has 5, preds has 4'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.full((3, 4), 0.5)), r'sum to 1'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 4])), r'\[0, 4\).*\[0, 4\]'),
        (lambda: soft_target_accuracy(torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0])), r'integer dtype'),
        (lambda: soft_target_accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])), r'preds must be'),
        (lambda: SoftTargetAccuracy(num_classes=5).update(torch.randn(3, 4), torch.tensor([0, 1, 2])),
         r'num_classes=5 columns, got preds of shape \(3, 4\)'),
    ],
)
def test_bad_arguments_raise_naming_the_value(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- SoftTargetWrapper


@pytest.mark.parametrize(
    'make',
    [
        lambda: MulticlassF1Score(num_classes=5, average='macro'),
        lambda: MulticlassConfusionMatrix(num_classes=5),
        lambda: MulticlassAccuracy(num_classes=5, average='micro', top_k=2),
    ],
)
def test_wrapper_on_soft_targets_equals_bare_metric_on_argmax_labels(make: Any) -> None:
    wrapped, bare = SoftTargetWrapper(make()), make()
    for seed, n in enumerate([6, 13, 1]):
        preds, target = soft_batch(10 + seed, n, 5)
        torch.testing.assert_close(wrapped(preds, target), bare(preds, target.argmax(dim=1)))  # forward: batch value
    preds, target = soft_batch(20, 7, 5)
    wrapped.update(preds, target)
    bare.update(preds, target.argmax(dim=1))
    torch.testing.assert_close(wrapped.compute(), bare.compute())
    # Index labels pass unchanged.
    labels = torch.randint(0, 5, (7,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(SoftTargetWrapper(make())(preds, labels), make()(preds, labels))


def test_wrapper_deepcopy_state_dict_reset_and_flags() -> None:
    metric = SoftTargetWrapper(MulticlassF1Score(num_classes=4, average='macro'))
    preds, target = soft_batch(30, 12, 4)
    metric.update(preds, target)
    expected = MulticlassF1Score(num_classes=4, average='macro')(preds, target.argmax(dim=1))

    clone = copy.deepcopy(metric)
    torch.testing.assert_close(clone.compute(), expected)
    clone.update(*soft_batch(31, 5, 4))  # the copy has its own states
    torch.testing.assert_close(metric.compute(), expected)

    metric.persistent(True)  # what Composer's checkpointing does
    state = metric.state_dict()
    assert {'wrapped_metric.tp', 'wrapped_metric.fn'} <= set(state)
    restored = SoftTargetWrapper(MulticlassF1Score(num_classes=4, average='macro'))
    restored.load_state_dict(state)
    restored._update_count += 1  # what Composer does on load; it must reach the wrapped metric
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "compute called before update"
        torch.testing.assert_close(restored.compute(), expected)

    metric.reset()
    assert int(metric.wrapped_metric.tp.sum()) == 0
    assert metric.num_classes == 4 and metric.higher_is_better is True and metric.is_differentiable is False


def test_wrapper_moves_wrapped_states_with_it() -> None:
    metric = SoftTargetWrapper(MulticlassConfusionMatrix(num_classes=3)).to('meta')
    assert metric.wrapped_metric.confmat.device.type == 'meta'


def test_wrapper_rejects_what_it_cannot_serve() -> None:
    with pytest.raises(TypeError, match='MultilabelAccuracy'):
        SoftTargetWrapper(MultilabelAccuracy(num_labels=3))
    with pytest.raises(TypeError, match='Linear'):
        SoftTargetWrapper(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    metric = SoftTargetWrapper(MulticlassF1Score(num_classes=4))
    with pytest.raises(ValueError, match=r'num_classes=4 columns .* shape \(2, 3\)'):
        metric.update(torch.randn(2, 4), torch.full((2, 3), 1 / 3))


# ----------------------------------------------------------------------------- prepare_train_metrics


@pytest.mark.composer
def test_prepare_replaces_micro_accuracy_and_wraps_other_classification_metrics(caplog: Any) -> None:
    from composer.metrics import CrossEntropy

    accuracy = MulticlassAccuracy(num_classes=6, top_k=2, average='micro', dist_sync_on_step=True)
    macro = MulticlassAccuracy(num_classes=6, average='macro')
    f1 = MulticlassF1Score(num_classes=6)
    ours = SoftTargetAccuracy(num_classes=6)
    cross_entropy = CrossEntropy()
    metrics = {'acc': accuracy, 'macro': macro, 'f1': f1, 'ours': ours, 'ce': cross_entropy}
    original = dict(metrics)

    with caplog.at_level(logging.INFO, logger='dist_cutmix'):
        prepared = prepare_train_metrics(metrics)

    assert list(prepared) == list(metrics)
    assert metrics == original  # the input is left alone
    assert isinstance(prepared['acc'], SoftTargetAccuracy)
    assert (prepared['acc'].num_classes, prepared['acc'].top_k, prepared['acc'].dist_sync_on_step) == (6, 2, True)
    assert isinstance(prepared['macro'], SoftTargetWrapper) and prepared['macro'].wrapped_metric is macro
    assert isinstance(prepared['f1'], SoftTargetWrapper) and prepared['f1'].wrapped_metric is f1
    assert prepared['ours'] is ours and prepared['ce'] is cross_entropy

    records = [r for r in caplog.records if r.name == 'dist_cutmix']
    assert len(records) == 1
    message = records[0].getMessage()
    for name in ("'acc'", "'macro'", "'f1'", 'MulticlassF1Score', 'SoftTargetAccuracy'):
        assert name in message
    assert "'ce'" not in message and "'ours'" not in message

    # The replacements read soft targets truthfully.
    preds, target = soft_batch(40, 20, 6)
    torch.testing.assert_close(prepared['acc'](preds, target), soft_target_accuracy(preds, target, top_k=2))
    torch.testing.assert_close(prepared['f1'](preds, target), MulticlassF1Score(num_classes=6)(preds, target.argmax(1)))

    # Idempotent: a second FIT_START changes nothing and logs nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='dist_cutmix'):
        again = prepare_train_metrics(prepared)
    assert all(again[k] is prepared[k] for k in prepared)
    assert not [r for r in caplog.records if r.name == 'dist_cutmix']


def test_prepare_without_wrapping_raises_naming_metric_and_fix() -> None:
    metrics = {'train_f1': MulticlassF1Score(num_classes=3), 'ours': SoftTargetAccuracy(num_classes=3)}
    with pytest.raises(ValueError,
                       match=r"'train_f1' \(MulticlassF1Score\).*SoftTargetWrapper.*wrap_train_metrics=True"):
        prepare_train_metrics(metrics, wrap=False)
    fine = {'ours': SoftTargetAccuracy(num_classes=3), 'wrapped': SoftTargetWrapper(MulticlassF1Score(num_classes=3))}
    assert prepare_train_metrics(fine, wrap=False) == fine


def test_prepare_edge_cases() -> None:
    assert prepare_train_metrics(None) == {}
    assert prepare_train_metrics({}) == {}
    with pytest.raises(ValueError, match=r"'tags' \(MultilabelAccuracy\).*interpolate_loss=True"):
        prepare_train_metrics({'tags': MultilabelAccuracy(num_labels=3)})


# ----------------------------------------------------------------------------- dense and binary targets


def test_soft_target_accuracy_on_dense_predictions_is_pixel_accuracy() -> None:
    g = torch.Generator().manual_seed(3)
    preds = torch.randn(3, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (3, 6, 7), generator=g)
    stock = MulticlassAccuracy(num_classes=5, average='micro')(preds, target)
    ours = SoftTargetAccuracy(num_classes=5)
    ours.update(preds, target)
    torch.testing.assert_close(ours.compute(), stock)
    # a soft map (N, C, H, W) scores the target mass on each pixel's predicted class
    soft = torch.softmax(torch.randn(3, 5, 6, 7, generator=g), 1)
    expected = soft.gather(1, preds.argmax(1, keepdim=True)).mean()
    torch.testing.assert_close(soft_target_accuracy(preds, soft), expected)


def test_wrapped_binary_metric_reads_a_mixed_target_as_its_majority_label() -> None:
    from torchmetrics.classification import BinaryAccuracy

    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    mixed = torch.tensor([0.75, 0.25, 0.5, 0.0])  # λ·y + (1-λ)·y'; 0.5 is a tie: the lower class
    metric = SoftTargetWrapper(BinaryAccuracy())
    metric.update(logits, mixed)
    reference = BinaryAccuracy()(logits, torch.tensor([1, 0, 0, 0]))
    torch.testing.assert_close(metric.compute(), reference)


def test_prepare_names_the_mixed_binary_targets_and_leaves_dense_ones_alone() -> None:
    from torchmetrics.classification import BinaryAccuracy

    with pytest.raises(ValueError, match=r"mixed binary targets .*'acc' \(BinaryAccuracy\)"):
        prepare_train_metrics({'acc': BinaryAccuracy()}, wrap=False, kind='binary')
    stock = {'pixels': MulticlassAccuracy(num_classes=3, average='micro')}
    assert prepare_train_metrics(stock, wrap=False, kind='dense') == stock


def test_bfloat16_predictions_score_soft_targets_at_full_precision() -> None:
    # Under amp_bf16 the logits are bfloat16; the target mass must not be rounded to bfloat16 (0.7 -> 0.69921875).
    preds = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.bfloat16)
    target = torch.tensor([[0.7, 0.3], [0.7, 0.3]])
    assert float(soft_target_accuracy(preds, target)) == pytest.approx(0.5, abs=1e-7)
    metric = SoftTargetAccuracy(num_classes=2)
    metric.update(preds, torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    assert float(metric.compute()) == pytest.approx(0.5, abs=1e-7)
    metric.update(preds[:1], torch.tensor([[0.7, 0.3]]))
    assert float(metric.compute()) == pytest.approx((0.7 + 0.3 + 0.7) / 3, abs=1e-7)


def _dense_soft_batch(seed: int, n: int, num_classes: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits ``(N, C, H, W)``, a class map ``(N, H, W)`` and a soft map ``(N, C, H, W)`` whose largest mass at
    each pixel is on the class map's class: half the mass there, the other half spread over all classes."""
    g = torch.Generator().manual_seed(seed)
    preds = torch.randn(n, num_classes, h, w, generator=g)
    labels = torch.randint(0, num_classes, (n, h, w), generator=g)
    spread = torch.softmax(3 * torch.randn(n, num_classes, h, w, generator=g), dim=1)  # every entry below 1
    target = 0.5 * F.one_hot(labels, num_classes).movedim(-1, 1) + 0.5 * spread
    return preds, labels, target


@pytest.mark.parametrize(
    'make',
    [
        lambda: MulticlassAccuracy(num_classes=4, average='macro'),
        lambda: MulticlassF1Score(num_classes=4, average='weighted'),
        lambda: MulticlassConfusionMatrix(num_classes=4),
    ],
)
def test_wrapper_on_soft_dense_targets_equals_bare_metric_on_the_class_map(make: Any) -> None:
    # A soft (N, C, H, W) target is read along its class axis, dim 1, into its (N, H, W) class map. C, H and W
    # differ, so reading another axis fails loudly or scores another map.
    wrapped, bare = SoftTargetWrapper(make()), make()
    for seed, (n, h, w) in enumerate([(3, 5, 6), (1, 7, 3), (2, 4, 4)]):
        preds, labels, target = _dense_soft_batch(40 + seed, n, 4, h, w)
        assert torch.equal(target.argmax(dim=1), labels)  # the class map is the argmax over dim 1
        torch.testing.assert_close(wrapped(preds, target), bare(preds, labels))  # forward: the batch value
    torch.testing.assert_close(wrapped.compute(), bare.compute())
    # float (N, C, H, W) maps pass the wrapper's check of the class count; another count is named
    with pytest.raises(ValueError, match=r'num_classes=4 columns .* shape \(2, 3, 4, 4\)'):
        wrapped.update(torch.randn(2, 4, 4, 4), torch.full((2, 3, 4, 4), 1 / 3))
