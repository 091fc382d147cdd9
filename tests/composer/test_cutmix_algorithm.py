"""The CutMix algorithm in real Composer Trainers: one process and spawned gloo ranks."""
from __future__ import annotations

import glob
import math
import os

import pytest
import torch
import torch.nn.functional as TF

pytest.importorskip('composer', reason='needs the composer extra')
from composer.utils import dist

from dist_cutmix import CutMix
from dist_cutmix import functional as F
from dist_cutmix.randomness import batch_generator
from dist_cutmix.targets import mix_targets
from tests.helpers.spawn import run_ranks
from tests.helpers.trainer_utils import NUM_CLASSES, find_box, make_dataset, partner_ids, run_trainer, sample_ids

SEED = 17


def _expected_local(batch: int, rank: int, ids: torch.Tensor, seed: int = SEED):
    """Independent reference of local mixing: the same draw, applied by a mask blend."""
    data = make_dataset()
    x, y = data.tensors[0][ids], data.tensors[1][ids]
    params = F.sample_params(len(ids), x.shape[-2], x.shape[-1], generator=batch_generator(seed, batch, 'local', rank))
    y0, y1, x0, x1 = params.box
    mask = torch.zeros(x.shape[-2:], dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    mixed = torch.stack([torch.where(mask, x[int(j)], x[i]) for i, j in enumerate(params.indices)])
    eye = torch.eye(NUM_CLASSES)
    weight = label_weight(params.lam)
    target = weight * eye[y] + (1 - weight) * eye[y[params.indices]]
    return mixed, target, params


def label_weight(lam: float) -> float:
    """The label weight the docs promise: the pixel share λ on a grid of 2**-10."""
    return round(lam * 1024) / 1024


def test_single_process_trainer_mixes_each_batch_as_the_reference():
    _, rec, mem = run_trainer([CutMix(alpha=1.0)], duration='3ba')
    lams = [v for _, v in mem.data['cutmix/lambda']]
    assert len(lams) == 3
    for b in range(3):
        mixed, target, params = _expected_local(b, 0, sample_ids(0, 1, b, 6))
        torch.testing.assert_close(rec.whole(b, 'input'), mixed, rtol=0, atol=0)
        torch.testing.assert_close(rec.whole(b, 'target'), target)
        assert lams[b] == label_weight(params.lam)


def test_same_seed_same_mixing_other_seed_other_mixing():
    _, a, _ = run_trainer([CutMix(seed=5)], duration='2ba')
    _, b, _ = run_trainer([CutMix(seed=5)], duration='2ba')
    _, c, _ = run_trainer([CutMix(seed=6)], duration='2ba')
    assert all(torch.equal(a.whole(i, 'input'), b.whole(i, 'input')) for i in range(2))
    assert not all(torch.equal(a.whole(i, 'input'), c.whole(i, 'input')) for i in range(2))


def test_seed_defaults_to_composer_rank_zero_seed():
    _, a, _ = run_trainer([CutMix()], duration='2ba', seed=123)
    _, b, _ = run_trainer([CutMix(seed=123)], duration='2ba', seed=999)
    assert all(torch.equal(a.whole(i, 'input'), b.whole(i, 'input')) for i in range(2))


def test_microbatching_sees_the_same_mixed_batch():
    _, whole, _ = run_trainer([CutMix()], batch_size=8, duration='2ba')
    _, split, _ = run_trainer([CutMix()], batch_size=8, duration='2ba', microbatch=2)
    for b in range(2):
        assert len(split.batches[b]) == 4
        assert torch.equal(split.whole(b, 'input'), whole.whole(b, 'input'))
        assert torch.equal(split.whole(b, 'target'), whole.whole(b, 'target'))


@pytest.mark.parametrize('microbatch', [None, 3])
def test_interpolate_loss_equals_the_formula_by_hand(microbatch):
    _, rec, mem = run_trainer([CutMix(interpolate_loss=True)], batch_size=6, duration='2ba', microbatch=microbatch)
    lams = [v for _, v in mem.data['cutmix/lambda']]
    for b in range(2):
        ids = sample_ids(0, 1, b, 6)
        mixed, _, params = _expected_local(b, 0, ids)
        y = make_dataset().tensors[1][ids]
        assert torch.equal(rec.whole(b, 'input'), mixed)
        assert torch.equal(rec.whole(b, 'target'), y)  # index labels stay in the batch
        offset = 0
        for mb in rec.batches[b]:
            n = len(mb['target'])
            own = TF.cross_entropy(mb['outputs'], y[offset:offset + n])
            partner = TF.cross_entropy(mb['outputs'], y[params.indices][offset:offset + n])
            offset += n
            expected = lams[b] * own + (1 - lams[b]) * partner
            torch.testing.assert_close(mb['loss'], expected)


def test_alpha_zero_leaves_the_batch_alone():
    _, rec, mem = run_trainer([CutMix(alpha=0.0)], duration='1ba')
    ids = sample_ids(0, 1, 0, 6)
    data = make_dataset()
    assert torch.equal(rec.whole(0, 'input'), data.tensors[0][ids])
    torch.testing.assert_close(rec.whole(0, 'target'), torch.eye(NUM_CLASSES)[data.tensors[1][ids]])
    assert mem.data['cutmix/lambda'][0][1] == 1.0


def test_batch_of_one_warns_once_and_points_to_global_mode():
    with pytest.warns(UserWarning, match="mode='global' mixes across ranks") as record:
        _, rec, _ = run_trainer([CutMix()], batch_size=1, duration='3ba')
    assert sum("per-rank batch of 1" in str(w.message) for w in record) == 1
    assert torch.equal(rec.whole(0, 'input'), make_dataset().tensors[0][:1])


def test_soft_and_onehot_targets_are_accepted():
    data = make_dataset()
    onehot = torch.eye(NUM_CLASSES)[data.tensors[1]]
    soft = onehot * 0.9 + 0.1 / NUM_CLASSES
    for targets in (onehot, soft):
        ds = torch.utils.data.TensorDataset(data.tensors[0], targets)
        _, rec, mem = run_trainer([CutMix()], duration='1ba', dataset=ds)
        ids = sample_ids(0, 1, 0, 6)
        _, _, params = _expected_local(0, 0, ids)
        weight = label_weight(params.lam)
        expected = weight * targets[ids] + (1 - weight) * targets[ids][params.indices]
        torch.testing.assert_close(rec.whole(0, 'target'), expected)


@pytest.mark.parametrize('kwargs, match', [
    (dict(alpha=-0.5), 'alpha must be a finite number >= 0, got alpha=-0.5'),
    (dict(alpha=float('nan')), 'alpha must be a finite number >= 0, got alpha=nan'),
    (dict(mode='cluster'), "mode must be one of .*, got mode='cluster'"),
    (dict(mode='local', process_group=object()), "process_group is only used with mode='global'"),
    (dict(num_classes=0), 'num_classes must be a positive int or None, got num_classes=0'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CutMix(**kwargs)


def test_bad_batch_is_named_inside_a_trainer():
    data = make_dataset()
    ds = torch.utils.data.TensorDataset(data.tensors[0], data.tensors[1].bool())
    with pytest.raises(TypeError, match='targets of shape \\(N,\\) must be integer .*, got torch.bool'):
        run_trainer([CutMix()], duration='1ba', dataset=ds)


def test_empty_batch_passes_through():
    x, y = torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long)
    from dist_cutmix.mixer import mix_batch_local

    r = mix_batch_local(x, y, seed=1, batch=0, num_classes=3)
    assert r.input.shape == (0, 3, 8, 8) and r.target.shape == (0, 3)


# ---------------------------------------------------------------------------- spawned ranks


def _local_on_rank(rank, world):
    _, rec, mem = run_trainer([CutMix()], batch_size=6, duration='3ba')
    return {b: (rec.whole(b, 'input'), rec.whole(b, 'target')) for b in rec.batches}


def test_two_ranks_local_mode_partners_stay_on_the_rank(tmp_path):
    results = run_ranks(_local_on_rank, 2, tmp_path)
    boxes = []
    for rank, batches in enumerate(results):
        for b, (x, target) in batches.items():
            ids = sample_ids(rank, 2, b, 6)
            mixed, expected_target, params = _expected_local(b, rank, ids)
            torch.testing.assert_close(x, mixed, rtol=0, atol=0)
            torch.testing.assert_close(target, expected_target)
            box = find_box(x, ids)
            if box != (0, 0, 0, 0):
                assert set(partner_ids(x, box).tolist()) <= set(ids.tolist())  # same rank's samples only
            boxes.append((rank, b, params.box))
    # ranks draw differently: not every batch has the same box on both ranks
    assert any(b0 != b1 for (_, _, b0), (_, _, b1) in zip(boxes[:3], boxes[3:], strict=True))


def _resume_on_rank(rank, world, folder, mode, phase):
    if phase == 'full':
        _, rec, _ = run_trainer([CutMix(mode=mode)], duration='4ba', save_folder=folder)
    else:
        path = os.path.join(folder, 'ba2-rank0.pt')
        _, rec, _ = run_trainer([CutMix(mode=mode)], duration='4ba', load_path=path)
    return {b: (rec.whole(b, 'input'), rec.whole(b, 'target')) for b in rec.batches}


@pytest.mark.parametrize('mode', ['local', 'global'])
def test_resume_from_checkpoint_reproduces_mixing_bit_for_bit(tmp_path, mode):
    folder = str(tmp_path / 'ckpt')
    full = run_ranks(_resume_on_rank, 2, tmp_path, folder, mode, 'full')
    assert glob.glob(os.path.join(folder, 'ba2-rank0.pt'))
    resumed = run_ranks(_resume_on_rank, 2, tmp_path, folder, mode, 'resume')
    for rank in range(2):
        assert sorted(resumed[rank]) == [2, 3]  # only the batches after the checkpoint ran
        for b in (2, 3):
            assert torch.equal(resumed[rank][b][0], full[rank][b][0])
            assert torch.equal(resumed[rank][b][1], full[rank][b][1])


def _global_on_rank(rank, world, batch_size, mode, fsdp):
    parallelism = None
    if fsdp:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {'fsdp': FSDP2Config()}
    _, rec, mem = run_trainer([CutMix(mode=mode)], batch_size=batch_size, duration='3ba',
                              parallelism_config=parallelism)
    return {
        'batches': {b: rec.whole(b, 'input') for b in rec.batches},
        'cross': [v for _, v in mem.data.get('cutmix/cross_rank_fraction', [])],
        'lam': [v for _, v in mem.data['cutmix/lambda']],
        'local_world': dist.get_local_world_size(),
    }


def _partners_by_batch(results, world, batch_size):
    """For each batch: global ids, partner ids (read off pixels), and each sample's rank."""
    out = []
    for b in range(3):
        ids = torch.cat([sample_ids(r, world, b, batch_size) for r in range(world)])
        x = torch.cat([results[r]['batches'][b] for r in range(world)])
        ranks = torch.cat([torch.full((batch_size,), r) for r in range(world)])
        box = find_box(x, ids)
        out.append((ids, partner_ids(x, box) if box != (0, 0, 0, 0) else None, ranks))
    return out


@pytest.mark.parametrize('world, batch_size, fsdp', [(2, 4, False), (3, 1, False), (2, 2, True)])
def test_global_mode_in_trainer_mixes_one_global_permutation(tmp_path, world, batch_size, fsdp):
    results = run_ranks(_global_on_rank, world, tmp_path, batch_size, 'global', fsdp)
    n = world * batch_size
    mixed_any = False
    cross_total = 0
    for b, (ids, partners, ranks) in enumerate(_partners_by_batch(results, world, batch_size)):
        if partners is None:
            assert results[0]['lam'][b] == 1.0
            continue
        mixed_any = True
        assert sorted(partners.tolist()) == sorted(ids.tolist())  # one permutation of the global batch
        assert not (partners == ids).any()
        id_to_rank = dict(zip(ids.tolist(), ranks.tolist(), strict=True))
        cross = sum(id_to_rank[p] != r for p, r in zip(partners.tolist(), ranks.tolist(), strict=True))
        assert results[0]['cross'][b] == pytest.approx(cross / n)
        cross_total += cross
    assert mixed_any
    # with W ranks a random partner lives elsewhere with probability about (W-1)/W
    assert cross_total > 0
    assert {tuple(r['lam']) for r in results} == {tuple(results[0]['lam'])}


def test_node_mode_keeps_partners_inside_each_node(tmp_path):
    world, batch_size = 4, 3

    def node_env(rank: int) -> dict[str, str]:
        return {'LOCAL_WORLD_SIZE': '2', 'LOCAL_RANK': str(rank % 2), 'NODE_RANK': str(rank // 2)}

    results = run_ranks(_global_on_rank, world, tmp_path, batch_size, 'node', False, per_rank_env=node_env)
    assert [r['local_world'] for r in results] == [2] * 4
    crossed_ranks = False
    for b, (ids, _partners, ranks) in enumerate(_partners_by_batch(results, world, batch_size)):
        for node in (0, 1):
            sel = (ranks // 2) == node
            node_ids = ids[sel]
            # the two nodes draw their own boxes: read each node's box separately
            x = torch.cat([results[r]['batches'][b] for r in (2 * node, 2 * node + 1)])
            box = find_box(x, node_ids)
            if box == (0, 0, 0, 0):
                continue
            node_partners = partner_ids(x, box)
            assert sorted(node_partners.tolist()) == sorted(node_ids.tolist())
            first_rank_ids = set(node_ids[:batch_size].tolist())
            crossed_ranks |= any((p in first_rank_ids) != (i in first_rank_ids)
                                 for p, i in zip(node_partners.tolist(), node_ids.tolist(), strict=True))
    assert crossed_ranks  # partners do cross ranks, within the node


def test_cross_rank_fraction_is_fair(tmp_path):
    results = run_ranks(_global_on_rank, 2, tmp_path, 8, 'global', False)
    fractions = results[0]['cross']
    # expected (W-1)/W * n/(n-1) about 0.53 for derangements of 16 over 2 ranks; allow wide noise
    assert 0.2 < sum(fractions) / len(fractions) < 0.9
    assert not math.isnan(sum(fractions))


def test_train_accuracy_is_the_same_with_microbatches():
    from dist_cutmix.metrics import soft_target_accuracy

    _, rec, whole = run_trainer([CutMix()], batch_size=8, duration='3ba')
    _, _, split = run_trainer([CutMix()], batch_size=8, duration='3ba', microbatch=2)
    key = 'metrics/train/MulticlassAccuracy'
    a = [float(v) for _, v in whole.data[key]]
    b = [float(v) for _, v in split.data[key]]
    expected = [float(soft_target_accuracy(rec.whole(i, 'outputs'), rec.whole(i, 'target'))) for i in range(3)]
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-6) and a == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- drop-in details


def test_mixed_targets_sum_to_exactly_n_so_soft_cross_entropy_never_warns():
    # Composer's soft cross entropy warns and rescales when a float32 target batch sums under N; with a
    # pixel-share λ that happened about one batch in seven. Many random draws, the warning an error.
    import warnings

    from composer.loss import soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*less than 1 total probability.*')
        for batch in range(400):
            n, c = int(torch.randint(2, 300, (1,), generator=g)), int(torch.randint(2, 1000, (1,), generator=g))
            h, w = int(torch.randint(5, 64, (1,), generator=g)), int(torch.randint(5, 64, (1,), generator=g))
            labels = torch.randint(0, c, (n,), generator=g)
            params = F.sample_params(n, h, w, generator=batch_generator(batch, 0))
            target = mix_targets(labels, labels[params.indices], params.lam, params.box, kind='index', num_classes=c)
            assert float(target.sum()) == n and bool((target.sum(1) == 1).all())
            soft_cross_entropy(torch.randn(n, c, generator=g), target)


def test_one_cutmix_serves_two_trainers_with_different_class_counts():
    # Pretrain on 10 classes, fine-tune on 4: what the first run learned must not reach the second.
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    cutmix = CutMix()
    for classes in (10, 4):
        x, y = torch.rand(12, 3, 8, 8), torch.randint(0, classes, (12,))
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
        trainer = Trainer(model=ComposerClassifier(net, num_classes=classes),
                          train_dataloader=DataLoader(TensorDataset(x, y), batch_size=4), max_duration='2ba',
                          algorithms=[cutmix], device='cpu', progress_bar=False, log_to_console=False)
        trainer.fit()
        assert trainer.state.batch[1].shape == (4, classes)
    assert cutmix.num_classes is None


def test_dense_targets_keep_the_stock_pixel_metric_without_wrapping():
    # wrap_train_metrics=False refuses metrics that would misread soft targets; dense targets are pasted,
    # not softened, so a stock pixel-accuracy metric is right and training goes on.
    from tests.helpers.compat_models import run_cell

    out = run_cell('segmentation', 'tuple', 'soft', 'local')
    assert out['logged']['metrics/train/PixelAccuracy']
    with pytest.raises(ValueError, match=r'soft targets \(N, C\) into the batch.*wrap_train_metrics=True'):
        _, _, _ = run_trainer([CutMix(wrap_train_metrics=False)], duration='1ba')


def test_interpolate_loss_on_dense_targets_pastes_the_map_and_says_so():
    from tests.helpers.compat_models import run_cell

    with pytest.warns(UserWarning, match='pasted into the target map'):
        run_cell('segmentation', 'dict', 'interpolate', 'local', batches=1)


def _reuse_in_node_mode(rank, world):
    cutmix = CutMix(mode='node')
    groups = []
    for _ in range(2):
        run_trainer([cutmix], batch_size=3, duration='1ba')
        groups.append(id(cutmix._run.group))
    return groups


def test_a_reused_cutmix_builds_its_node_group_anew_for_each_run(tmp_path):
    results = run_ranks(_reuse_in_node_mode, 2, tmp_path)
    assert all(first != second for first, second in results)


def _node_layout_on_rank(rank, world):
    run_trainer([CutMix(mode='node')], batch_size=3, duration='1ba')


def test_ranks_that_disagree_on_the_node_layout_fail_together(tmp_path):
    def env(rank: int) -> dict[str, str]:  # rank 1 believes it is alone on its node; rank 0 that they share one
        return {'LOCAL_WORLD_SIZE': str(2 - rank), 'LOCAL_RANK': '0', 'NODE_RANK': str(rank)}

    with pytest.raises(AssertionError) as failure:
        run_ranks(_node_layout_on_rank, 2, tmp_path, per_rank_env=env)
    text = str(failure.value)
    assert text.count("mode='node' needs every rank to agree on one node layout") == 2, text
    assert 'rank 1: local_world_size=1, local_rank=0, node_rank=1' in text
