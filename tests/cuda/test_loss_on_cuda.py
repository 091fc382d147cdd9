"""The loss without dense targets on a GPU: ``MixedLabels`` move and pin, ``mixed_cross_entropy`` gives the CPU's
value and gradient (and the same gradient twice under deterministic algorithms), ``Mixer(targets='labels')``
gives the dense mixer's target bit for bit, the metrics score as on the CPU, and a bad label is an error. Skips
without CUDA; run by the prepared GPU check (``tests/cuda/test_*.py``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cutmix import MixedCrossEntropy, MixedLabels, Mixer, SoftTargetAccuracy, mixed_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

N, C = 64, 1000


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, MixedLabels]:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(N, C, generator=g)).to(dtype)
    own = torch.randint(0, C, (N,), generator=g)
    partner = torch.randint(0, C, (N,), generator=g)
    partner[:4] = own[:4]
    lam = torch.rand(N, generator=g)
    return logits, MixedLabels(own, partner, lam, label_smoothing=0.1)


def _loss_and_grad(logits: torch.Tensor, labels: MixedLabels, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach().clone().requires_grad_()
    loss = mixed_cross_entropy(z, labels, **kwargs)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_loss_on_the_gpu_is_the_cpus(dtype: torch.dtype) -> None:
    logits, labels = _case(dtype)
    weight = torch.linspace(0.5, 1.5, C)
    cpu_loss, cpu_grad = _loss_and_grad(logits, labels, weight=weight)
    gpu_loss, gpu_grad = _loss_and_grad(logits.cuda(), labels.to('cuda', non_blocking=True), weight=weight.cuda())
    assert gpu_loss.dtype == torch.float32 and gpu_grad.dtype == dtype
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, **tol)
    # and the dense cross entropy on the GPU
    dense = F.cross_entropy(logits.cuda().float(), labels.to_dense(C).cuda(), weight=weight.cuda())
    torch.testing.assert_close(gpu_loss, dense, rtol=1e-5, atol=1e-5)


def test_deterministic_algorithms_give_the_same_gradient_twice() -> None:
    logits, labels = _case(torch.float32)
    labels = labels.to('cuda')
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [_loss_and_grad(logits.cuda(), labels)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(grads[0], grads[1])


def test_labels_pin_and_travel_through_a_pinning_dataloader() -> None:
    _, labels = _case(torch.float32)
    pinned = labels.pin_memory()
    assert pinned.target.is_pinned() and pinned.partner_target.is_pinned() and pinned.lam.is_pinned()
    data = [(torch.zeros(3), i) for i in range(4)]

    def collate(batch: list) -> tuple[torch.Tensor, MixedLabels]:
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch])
        return x, MixedLabels(y, y.flip(0), 0.5)

    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate, pin_memory=True)
    _, got = next(iter(loader))
    assert isinstance(got, MixedLabels) and got.target.is_pinned()
    assert got.to('cuda', non_blocking=True).device.type == 'cuda'


def test_the_labels_mixer_on_the_gpu_builds_the_dense_mixers_target() -> None:
    x = torch.rand(8, 3, 16, 16, device='cuda')
    y = torch.randint(0, 10, (8,), device='cuda')
    for per_sample in (False, True):
        args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, seed=3,
                    per_sample=per_sample)
        want_x, want_y = Mixer(**args)(x, y)
        got_x, labels = Mixer(**args, targets='labels')(x, y)
        assert labels.device.type == 'cuda' and labels.lam.device.type == 'cuda'
        torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
        torch.testing.assert_close(labels.to_dense(10), want_y, rtol=0, atol=0)
        logits = torch.randn(8, 10, device='cuda')
        torch.testing.assert_close(MixedCrossEntropy()(logits, labels), F.cross_entropy(logits, want_y))
        assert torch.equal(SoftTargetAccuracy(10).to('cuda')(logits, labels),
                           SoftTargetAccuracy(10).to('cuda')(logits, want_y))


def test_a_bad_class_on_the_gpu_is_an_error_naming_it() -> None:
    labels = MixedLabels(torch.tensor([0, 1, 5]), torch.tensor([0, 1, 2]), 0.5).to('cuda')
    with pytest.raises(ValueError, match=r'MixedLabels.target must lie in \[0, num_classes=4\), got values in '
                                         r'\[0, 5\]'):
        mixed_cross_entropy(torch.zeros(3, 4, device='cuda'), labels)
