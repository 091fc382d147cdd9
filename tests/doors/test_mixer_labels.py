"""``Mixer(..., targets='labels')``: the same mix as the dense mixer, returned as ``MixedLabels`` whose dense target
is the dense mixer's bit for bit, whose loss is the dense cross entropy and whose accuracy is the dense accuracy;
locally, per sample and over two gloo ranks in global mode (partners on the other rank); index targets only; kept
in the checked configuration of the state_dict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cutmix import MixedCrossEntropy, MixedLabels, Mixer, SoftTargetAccuracy, mix_batch_local
from dist_cutmix.distributed import BatchMismatchError
from tests.helpers.spawn import run_ranks

C, H, W, K = 3, 10, 12, 7
RECIPE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)


def _batches(count: int, n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, C, H, W, generator=g), torch.randint(0, K, (n,), generator=g)) for _ in range(count)]


def _logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_labels_are_the_dense_mix(labels: MixedLabels, dense: torch.Tensor, logits: torch.Tensor) -> None:
    """The labels' dense target is the dense mixer's bit for bit; loss and accuracy follow."""
    assert isinstance(labels, MixedLabels)
    torch.testing.assert_close(labels.to_dense(K), dense, rtol=0, atol=0)
    # the dense target's entries are float32 (ε / C and (1 - ε)·λ rounded): float32's tolerance, on float64 logits
    torch.testing.assert_close(MixedCrossEntropy()(logits, labels), F.cross_entropy(logits, dense.double()),
                               rtol=1e-6, atol=1e-7)
    on_labels, on_dense = SoftTargetAccuracy(K), SoftTargetAccuracy(K)
    on_labels.update(logits, labels)
    on_dense.update(logits, dense)
    assert torch.equal(on_labels.compute(), on_dense.compute())


@pytest.mark.parametrize('per_sample', [False, True])
def test_labels_mode_mixes_as_the_dense_mode_and_its_labels_are_the_dense_target(per_sample: bool) -> None:
    dense_mixer = Mixer(**RECIPE, num_classes=K, seed=3, per_sample=per_sample)
    label_mixer = Mixer(**RECIPE, num_classes=K, seed=3, per_sample=per_sample, targets='labels')
    weights = set()
    for b, (x, y) in enumerate(_batches(5)):
        want_x, want_y = dense_mixer(x, y)
        got_x, labels = label_mixer(x, y)
        torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
        _assert_labels_are_the_dense_mix(labels, want_y, _logits(len(y), b))
        assert torch.equal(labels.target, y) and labels.label_smoothing == 0.1
        assert torch.equal(labels.partner_target, y[label_mixer.last.partner_index])
        assert torch.equal(label_mixer.last.target, y)  # the result keeps the unmixed labels
        weights.add(tuple(labels.lam.tolist()))
    assert label_mixer.batch == 5 and len(weights) == 5
    # batch mode: one λ broadcast; per sample: λ differ within a batch
    assert all(len(set(w)) == 1 for w in weights) != per_sample


def test_disabled_labels_keep_the_smoothing_and_weigh_the_own_class_only() -> None:
    mixer = Mixer(**RECIPE, num_classes=K, seed=3, targets='labels')
    mixer.enabled = False
    x, y = _batches(1)[0]
    out_x, labels = mixer(x, y)
    torch.testing.assert_close(out_x, x, rtol=0, atol=0)
    assert torch.equal(labels.lam, torch.ones(len(y))) and labels.label_smoothing == 0.1
    torch.testing.assert_close(labels.to_dense(K), F.one_hot(y, K).float() * 0.9 + 0.1 / K)


def test_labels_mode_takes_index_targets_only_and_needs_num_classes() -> None:
    x, _ = _batches(1)[0]
    soft = torch.softmax(torch.randn(6, K), dim=1)
    mixer = Mixer(**RECIPE, num_classes=K, seed=0, targets='labels')
    with pytest.raises(ValueError, match=r"targets='labels' takes class-index targets \(N,\), got soft targets of "
                                         r"shape \(6, 7\): use targets='dense'"):
        mixer(x, soft)
    assert mixer.batch == 0 and mixer.last is None  # the refused batch is not counted
    with pytest.raises(ValueError, match=r"targets='labels' needs num_classes.*got num_classes=None"):
        Mixer(targets='labels')
    with pytest.raises(ValueError, match=r"targets must be one of \('dense', 'labels'\), got targets='soft'"):
        Mixer(num_classes=K, targets='soft')
    with pytest.raises(ValueError, match=r'index targets must lie in \[0, num_classes=7\), got values in \[0, 7\]'):
        mixer(x, torch.tensor([0, 1, 2, 3, 4, 7]))  # checked before mixing, though no dense target is built


def test_from_result_reads_only_unmixed_index_labels() -> None:
    x, y = _batches(1)[0]
    result = mix_batch_local(x, y, seed=0, batch=0, num_classes=K, mix_target=False)
    labels = MixedLabels.from_result(result, 0.1)
    assert torch.equal(labels.target, y) and torch.equal(labels.partner_target, y[result.partner_index])
    assert torch.equal(labels.lam, torch.full((6,), result.label_lam)) and labels.lam.dtype == torch.float32
    with pytest.raises(ValueError, match=r'mix_target=False.*got a mixed target of shape \(6, 7\)'):
        MixedLabels.from_result(mix_batch_local(x, y, seed=0, batch=0, num_classes=K))
    soft = mix_batch_local(x, torch.softmax(torch.randn(6, K), dim=1), seed=0, batch=0, mix_target=False)
    with pytest.raises(ValueError, match=r"targets are of kind 'soft' \(shape \(6, 7\)\)"):
        MixedLabels.from_result(soft)


def test_the_targets_option_is_part_of_the_checked_configuration() -> None:
    labels = Mixer(**RECIPE, num_classes=K, seed=4, targets='labels')
    labels(*_batches(1)[0])
    state = labels.state_dict()
    assert state['targets'] == 'labels'
    with pytest.raises(ValueError, match=r"differs in targets='dense' \(checkpoint: 'labels'\)"):
        Mixer(**RECIPE, num_classes=K, seed=4).load_state_dict(state)
    resumed = Mixer(**RECIPE, num_classes=K, seed=4, targets='labels')
    resumed.load_state_dict(state)
    assert resumed.batch == 1
    # a checkpoint from before the option was a dense mixer's
    old = {k: v for k, v in Mixer(**RECIPE, num_classes=K, seed=4).state_dict().items() if k != 'targets'}
    Mixer(**RECIPE, num_classes=K, seed=4).load_state_dict(old)
    with pytest.raises(ValueError, match=r"differs in targets='labels' \(checkpoint: 'dense'\)"):
        Mixer(**RECIPE, num_classes=K, seed=4, targets='labels').load_state_dict(old)


# ---------------------------------------------------------------------------------------------- two ranks

SIZES = (3, 5)


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return _batches(3, n=SIZES[rank], seed=10 + rank)


def _both_modes(rank: int, world: int, per_sample: bool) -> dict:
    dense = Mixer(**RECIPE, num_classes=K, mode='global', per_sample=per_sample, seed=11)
    labels = Mixer(**RECIPE, num_classes=K, mode='global', per_sample=per_sample, seed=11, targets='labels')
    out = []
    for b, (x, y) in enumerate(_rank_batches(rank)):
        dense_x, dense_y = dense(x, y)
        label_x, mixed = labels(x, y)
        logits = _logits(len(y), 100 * rank + b)
        out.append(dict(dense_x=dense_x, label_x=label_x, dense_y=dense_y, labels=mixed, logits=logits,
                        dense_loss=F.cross_entropy(logits, dense_y.double(), reduction='sum'),
                        label_loss=MixedCrossEntropy(reduction='sum')(logits, mixed),
                        partner_rank=labels.last.partner_rank))
    return dict(out=out)


@pytest.mark.parametrize('per_sample', [False, True])
def test_two_ranks_in_global_mode_give_the_loss_of_the_dense_targets(tmp_path, per_sample: bool) -> None:
    results = run_ranks(_both_modes, 2, tmp_path, per_sample)
    one = Mixer(**RECIPE, num_classes=K, mode='global', per_sample=per_sample, seed=11, targets='labels')
    crossed = 0
    for b in range(3):
        rows = [r['out'][b] for r in results]
        for rank, row in enumerate(rows):
            torch.testing.assert_close(row['label_x'], row['dense_x'], rtol=0, atol=0)
            _assert_labels_are_the_dense_mix(row['labels'], row['dense_y'], row['logits'])
            torch.testing.assert_close(row['label_loss'], row['dense_loss'], rtol=1e-6, atol=1e-7)
            crossed += int((row['partner_rank'] != rank).sum())
        # the group's loss is the loss of one process on the concatenated batch
        x = torch.cat([_rank_batches(r)[b][0] for r in range(2)])
        y = torch.cat([_rank_batches(r)[b][1] for r in range(2)])
        _, labels = one(x, y)
        logits = torch.cat([row['logits'] for row in rows])
        torch.testing.assert_close(MixedCrossEntropy(reduction='sum')(logits, labels),
                                   sum(row['label_loss'] for row in rows), rtol=1e-12, atol=1e-12)
        for field in ('target', 'partner_target', 'lam'):
            assert torch.equal(getattr(labels, field), torch.cat([getattr(row['labels'], field) for row in rows]))
    assert crossed > 0  # partners did come from the other rank


def _bad_label_on_rank_1(rank: int, world: int) -> str:
    mixer = Mixer(**RECIPE, num_classes=K, mode='global', seed=0, targets='labels')
    x, y = _rank_batches(rank)[0]
    if rank == 1:
        y = y.clone()
        y[0] = K  # out of range on one rank only
    try:
        mixer(x, y)
    except BatchMismatchError as e:
        return str(e)
    return 'mixed'


def test_a_bad_label_on_one_rank_is_an_error_on_every_rank(tmp_path) -> None:
    messages = run_ranks(_bad_label_on_rank_1, 2, tmp_path, deadline_s=60.0)
    for message in messages:
        assert 'index targets must lie in [0, num_classes=7)' in message, message
