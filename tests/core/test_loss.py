"""The loss without dense targets: ``mixed_cross_entropy`` / ``MixedCrossEntropy`` on ``MixedLabels`` equal
``F.cross_entropy`` on the dense soft target (built here by hand, independently of the package) in value and
gradient; a tensor target is ``F.cross_entropy`` itself; the soft-target metrics score ``MixedLabels`` exactly as
the dense target; bad input raises naming the argument and the value.

Tolerances (the loss compares to ``F.cross_entropy`` on the same logits):

* float64 logits: ``rtol = atol = 1e-12`` in value and gradient.
* float32 logits: torch's float32 defaults (``rtol=1.3e-6, atol=1e-5``) in value and gradient.
* bfloat16 logits: the loss is reduced in float32 (as autocast runs cross entropy), so its value matches the float64
  reference on the same logits within the float32 defaults; the bfloat16 gradient is the float32 one rounded
  once: within ``rtol = 2**-8`` (one bfloat16 rounding) of the float64 reference. ``F.cross_entropy`` on
  bfloat16 logits itself computes in bfloat16 and is off the reference by up to ~1e-2 relative (measured 0.053
  on a loss near 10): our value is within ``rtol=2e-2`` of it.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from dist_cutmix import MixedCrossEntropy, MixedLabels, SoftTargetAccuracy, SoftTargetWrapper, mixed_cross_entropy
from dist_cutmix.metrics import soft_target_accuracy

N, C = 12, 37


def _labels(lam: str, smoothing: float, seed: int = 0, n: int = N, c: int = C) -> MixedLabels:
    """Random own/partner classes (three self-pairs) and λ: one for the batch, or per sample with 0 and 1 in."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, c, (n,), generator=g)
    partner = torch.randint(0, c, (n,), generator=g)
    partner[:3] = own[:3]  # same class: the sample's whole weight is on it
    if lam == 'batch':
        return MixedLabels(own, partner, 0.6845703125, smoothing)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[0], weights[-1] = 0.0, 1.0
    return MixedLabels(own, partner, weights, smoothing)


def _dense(labels: MixedLabels, c: int = C) -> torch.Tensor:
    """The dense soft target, in float64, from the formula (not from the package)."""
    lam = labels.lam.double().unsqueeze(1)
    mixed = lam * F.one_hot(labels.target, c).double() + (1 - lam) * F.one_hot(labels.partner_target, c).double()
    return (1 - labels.label_smoothing) * mixed + labels.label_smoothing / c


def _logits(dtype: torch.dtype, seed: int = 1, n: int = N, c: int = C) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)


def _loss_and_grad(fn, logits: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, *args, **kwargs)
    # a non-uniform upstream gradient, so that 'none' is checked per sample
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)).sum().backward()
    return loss.detach(), z.grad


# ----------------------------------------------------------------------------------------------- the value


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('lam', ['batch', 'per_sample'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_equals_cross_entropy_on_the_dense_target_in_value_and_gradient(dtype, lam, smoothing, reduction) -> None:
    labels = _labels(lam, smoothing)
    logits = _logits(dtype)
    got, got_grad = _loss_and_grad(mixed_cross_entropy, logits, labels, reduction=reduction)
    want, want_grad = _loss_and_grad(F.cross_entropy, logits, _dense(labels).to(dtype), reduction=reduction)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


@pytest.mark.parametrize('reduction', ['mean', 'none'])
@pytest.mark.parametrize('lam', ['batch', 'per_sample'])
def test_bfloat16_logits_are_reduced_in_float32(lam: str, reduction: str) -> None:
    labels = _labels(lam, 0.1)
    logits = _logits(torch.bfloat16)
    got, got_grad = _loss_and_grad(mixed_cross_entropy, logits, labels, reduction=reduction)
    exact, exact_grad = _loss_and_grad(F.cross_entropy, logits.double(), _dense(labels), reduction=reduction)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), exact_grad, rtol=2**-8, atol=1e-6)
    stock, _ = _loss_and_grad(F.cross_entropy, logits, _dense(labels).float(), reduction=reduction)
    torch.testing.assert_close(got, stock.float(), rtol=2e-2, atol=1e-5)


def test_class_weights_and_extra_smoothing_are_cross_entropys() -> None:
    labels = _labels('per_sample', 0.1)
    weight = torch.rand(C, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    logits = _logits(torch.float64)
    for reduction in ('mean', 'sum', 'none'):
        kwargs = dict(weight=weight, label_smoothing=0.2, reduction=reduction)
        got, got_grad = _loss_and_grad(mixed_cross_entropy, logits, labels, **kwargs)
        want, want_grad = _loss_and_grad(F.cross_entropy, logits, _dense(labels), **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    module = MixedCrossEntropy(weight=weight, label_smoothing=0.2)
    torch.testing.assert_close(module(logits, labels), F.cross_entropy(logits, _dense(labels), weight=weight,
                                                                      label_smoothing=0.2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('weighted', [False, True])
def test_gradcheck(weighted: bool) -> None:
    labels = _labels('per_sample', 0.1, n=5, c=5)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7], dtype=torch.float64) if weighted else None
    logits = _logits(torch.float64, n=5, c=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: mixed_cross_entropy(z, labels, weight, reduction='none'), (logits,))


def test_a_loss_that_needs_nothing_dense_is_what_it_says() -> None:
    # the closed form of the module docstring, on a hand-sized case
    z = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    labels = MixedLabels(torch.tensor([0]), torch.tensor([2]), 0.75, label_smoothing=0.2)
    want = torch.logsumexp(z[0], 0) - 0.8 * (0.75 * 2.0 + 0.25 * -1.0) - 0.2 * z[0].mean()
    torch.testing.assert_close(mixed_cross_entropy(z, labels), want, rtol=1e-14, atol=1e-14)


def test_an_empty_batch_gives_what_cross_entropy_gives() -> None:
    labels = MixedLabels(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0.5)
    z = torch.zeros(0, C)
    assert torch.isnan(mixed_cross_entropy(z, labels)) and torch.isnan(F.cross_entropy(z, torch.zeros(0, C)))
    assert mixed_cross_entropy(z, labels, reduction='sum').item() == 0.0
    assert mixed_cross_entropy(z, labels, reduction='none').shape == (0,)


# ----------------------------------------------------------------------------------------------- tensors fall through


def test_a_tensor_target_is_cross_entropy_itself() -> None:
    logits = _logits(torch.float32)
    index = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(2))
    index[0] = -100
    soft = _dense(_labels('per_sample', 0.1)).float()
    for target in (index, soft):
        kwargs = dict(ignore_index=-100, label_smoothing=0.1, reduction='none')
        assert torch.equal(mixed_cross_entropy(logits, target, **kwargs), F.cross_entropy(logits, target, **kwargs))
        stock, ours = torch.nn.CrossEntropyLoss(label_smoothing=0.1), MixedCrossEntropy(label_smoothing=0.1)
        assert isinstance(ours, torch.nn.CrossEntropyLoss)
        assert torch.equal(ours(logits, target), stock(logits, target))
    image = torch.randn(2, C, 3, 3)  # (N, C, d...) with index maps: F.cross_entropy's own shapes
    maps = torch.randint(0, C, (2, 3, 3))
    assert torch.equal(mixed_cross_entropy(image, maps), F.cross_entropy(image, maps))


# ----------------------------------------------------------------------------------------------- the labels


def test_to_dense_is_the_formula_and_argmax_reads_the_dense_argmax_ties_included() -> None:
    labels = _labels('per_sample', 0.1)
    torch.testing.assert_close(labels.to_dense(C).double(), _dense(labels), rtol=0, atol=1e-7)
    assert labels.to_dense(C).dtype == torch.float32
    # λ at and around one half, on both orders of the two classes: where the two entries tie (or round to
    # one float), argmax returns the first maximum, the lower class
    g = torch.Generator().manual_seed(5)
    n = 400
    own, partner = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    offsets = torch.randint(-3, 4, (n,), generator=g).double()
    for smoothing in (0.0, 0.1, 0.3):
        for scale in (2.0**-24, 2.0**-53):
            mixed = MixedLabels(own, partner, 0.5 + offsets * scale, smoothing)
            for c in (9, 1000):
                dense = mixed.to_dense(c)
                assert torch.equal(mixed.argmax(c), dense.argmax(dim=1)), (smoothing, scale, c)
    half = MixedLabels(torch.tensor([3, 1]), torch.tensor([1, 3]), 0.5)
    assert half.argmax(4).tolist() == [1, 1]


def test_labels_move_copy_and_pickle_as_a_batch_does() -> None:
    labels = _labels('per_sample', 0.1)
    for other in (labels.to('cpu'), labels.to(torch.device('cpu'), non_blocking=True), labels.cpu(),
                  copy.deepcopy(labels), pickle.loads(pickle.dumps(labels))):
        assert isinstance(other, MixedLabels) and other.label_smoothing == 0.1
        assert all(torch.equal(getattr(other, k), getattr(labels, k)) for k in ('target', 'partner_target', 'lam'))
    with pytest.raises(TypeError, match=r'between devices, not dtypes; got torch.float16'):
        labels.to(torch.float16)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        labels.lam = torch.zeros(N)  # type: ignore[misc]  # frozen
    assert len(labels) == N and labels.device == torch.device('cpu')


def test_labels_survive_lightnings_and_accelerates_batch_transfer() -> None:
    fabric_apply = pytest.importorskip('lightning.fabric.utilities.apply_func', reason='needs lightning')
    accelerate_ops = pytest.importorskip('accelerate.utils.operations', reason='needs accelerate')
    labels = _labels('batch', 0.1)
    for moved in (fabric_apply.move_data_to_device((torch.zeros(2), labels), torch.device('cpu'))[1],
                  accelerate_ops.send_to_device({'y': labels}, torch.device('cpu'))['y']):
        assert isinstance(moved, MixedLabels)
        assert torch.equal(moved.partner_target, labels.partner_target) and torch.equal(moved.lam, labels.lam)


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize('top_k', [1, 3])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('lam', ['batch', 'per_sample'])
def test_accuracy_on_labels_is_accuracy_on_their_dense_target_exactly(lam: str, smoothing: float, top_k: int) -> None:
    labels = _labels(lam, smoothing)
    preds = _logits(torch.float32, seed=7)
    preds[:4] = preds[4:8]  # rows scoring their own class, their partner's, neither
    preds[torch.arange(N), labels.target] += torch.arange(N) % 3 == 0
    preds[torch.arange(N), labels.partner_target] += 2.0 * (torch.arange(N) % 3 == 1)
    dense = labels.to_dense(C)
    got = soft_target_accuracy(preds, labels, top_k=top_k)
    assert torch.equal(got, soft_target_accuracy(preds, dense, top_k=top_k))
    metric, reference = SoftTargetAccuracy(C, top_k=top_k), SoftTargetAccuracy(C, top_k=top_k)
    for half in (slice(0, N // 2), slice(N // 2, N)):
        part = MixedLabels(labels.target[half], labels.partner_target[half], labels.lam[half], smoothing)
        metric.update(preds[half], part)
        reference.update(preds[half], dense[half])
    assert torch.equal(metric.compute(), reference.compute()) and 0 < float(metric.compute()) < 1
    assert torch.equal(SoftTargetAccuracy(C, top_k=top_k)(preds, labels), got)  # forward too
    # and the score is the target mass on the top-k, from the formula
    top = preds.topk(top_k, dim=1).indices
    want = _dense(labels).gather(1, top).sum(dim=1).mean()
    torch.testing.assert_close(soft_target_accuracy(preds, labels, top_k=top_k).double(), want, rtol=1e-6, atol=1e-7)


def test_bfloat16_preds_score_labels_as_their_dense_target() -> None:
    labels = _labels('per_sample', 0.1)
    preds = _logits(torch.bfloat16, seed=8)
    assert torch.equal(soft_target_accuracy(preds, labels), soft_target_accuracy(preds, labels.to_dense(C)))


def test_the_wrapper_reads_labels_as_the_dense_argmax() -> None:
    labels = MixedLabels(torch.tensor([0, 3, 2, 1, 4, 4]), torch.tensor([1, 0, 2, 4, 0, 4]),
                         torch.tensor([0.5, 0.5, 0.3, 0.9, 0.25, 0.0]), label_smoothing=0.1)
    preds = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    preds[:, 0] += 1.0  # class 0 predicted more often: ties that go to the wrong class would show
    for make in (lambda: MulticlassAccuracy(5, average='macro'), lambda: MulticlassF1Score(5, average=None)):
        on_labels, on_dense = SoftTargetWrapper(make()), SoftTargetWrapper(make())
        on_labels.update(preds, labels)
        on_dense.update(preds, labels.to_dense(5))
        assert torch.equal(on_labels.compute(), on_dense.compute())
        assert torch.equal(on_labels(preds, labels), on_dense(preds, labels.to_dense(5)))  # forward too
    assert labels.argmax(5).tolist() == [0, 0, 2, 1, 0, 4]


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_labels_name_the_field_and_value() -> None:
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r'MixedLabels.target must be integer class indices of shape \(N,\), got '
                                         r'shape \(3,\) and dtype torch.float32'):
        MixedLabels(y.float(), y, 0.5)
    with pytest.raises(TypeError, match=r'MixedLabels.partner_target must be a tensor of class indices, got list'):
        MixedLabels(y, [0, 1, 2], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'partner_target must match target: got shape \(2,\)'):
        MixedLabels(y, y[:2], 0.5)
    with pytest.raises(ValueError, match=r'lam must have the shape and device of target, \(3,\) on cpu, got shape '
                                         r'\(2,\)'):
        MixedLabels(y, y, torch.tensor([0.5, 0.5]))
    with pytest.raises(TypeError, match=r'lam must be a number or a floating tensor of shape \(N,\), got a tensor of '
                                        r'shape \(3,\) and dtype torch.int64'):
        MixedLabels(y, y, y)
    with pytest.raises(ValueError, match=r'label_smoothing must be a number in \[0, 1\), got label_smoothing=1.0'):
        MixedLabels(y, y, 0.5, 1.0)
    z = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r'MixedLabels.partner_target must lie in \[0, num_classes=3\), got values '
                                         r'in \[0, 3\]'):
        mixed_cross_entropy(z, MixedLabels(y, torch.tensor([0, 3, 1]), 0.5))
    with pytest.raises(ValueError, match=r'MixedLabels.target must lie in \[0, num_classes=3\), got values in '
                                         r'\[-1, 2\]'):
        mixed_cross_entropy(z, MixedLabels(torch.tensor([-1, 1, 2]), y, 0.5))
    with pytest.raises(ValueError, match=r'lam must lie in \[0, 1\], got values in \[0.5, 1.5\]'):
        mixed_cross_entropy(z, MixedLabels(y, y, torch.tensor([0.5, 1.5, 1.0])))
    with pytest.raises(ValueError, match=r'lam must lie in \[0, 1\], got values in \[nan, nan\]'):
        SoftTargetAccuracy(3).update(z, MixedLabels(y, y, float('nan')))


def test_bad_loss_arguments_name_the_argument_and_value() -> None:
    labels = MixedLabels(torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), 0.5)
    z = torch.zeros(3, 4)
    cases = [
        (dict(input=torch.zeros(3, 4, 2)), ValueError, r'input must be logits of shape \(N, C\) for MixedLabels .*got '
                                                       r'shape \(3, 4, 2\)'),
        (dict(input=torch.zeros(2, 4)), ValueError, r'same batch size, got input of shape \(2, 4\) and MixedLabels of '
                                                    r'3 samples'),
        (dict(input=torch.zeros(3, 4, dtype=torch.long)), TypeError, r'input must be floating-point logits, got a '
                                                                     r'tensor of shape \(3, 4\) and dtype torch.int64'),
        (dict(input=torch.zeros(3, 4, device='meta')), ValueError, r'target \(MixedLabels on cpu\) must be on the '
                                                                   r'device of input \(meta\).*target.to'),
        (dict(weight=torch.ones(3)), ValueError, r'weight must be a floating tensor of shape \(4,\), one per class, '
                                                 r'got a tensor of shape \(3,\)'),
        (dict(reduction='avg'), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got "
                                            r"reduction='avg'"),
        (dict(label_smoothing=1.5), ValueError, r'label_smoothing must be a number in \[0, 1\], got '
                                                r'label_smoothing=1.5'),
    ]
    for change, error, message in cases:
        kwargs = {'input': z, 'target': labels, **change}
        with pytest.raises(error, match=message):
            mixed_cross_entropy(**kwargs)
    with pytest.raises(ValueError, match=r'preds must have num_classes=5 columns'):
        SoftTargetAccuracy(5).update(z, labels)
    with pytest.raises(ValueError, match=r'preds must be floating-point scores of shape \(N, C\) for MixedLabels'):
        soft_target_accuracy(torch.zeros(3), labels)
    # validate_args=False skips the (synchronizing) value check: an out-of-range class fails in indexing instead
    with pytest.raises((IndexError, RuntimeError)):
        mixed_cross_entropy(z, MixedLabels(torch.tensor([0, 1, 9]), labels.target, 0.5), validate_args=False)
