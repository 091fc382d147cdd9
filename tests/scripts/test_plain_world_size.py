"""launch/train_plain.py checkpointed on 4 ranks and resumed on 2 with the same global batch goes on as before.

Its :class:`~dist_cutmix.loaders.GlobalBatchSampler` gives step ``s`` the same global batch (the ranks' batches
end to end) at any world size, and global mixing draws from ``(seed, s)`` over that global batch: so every
later global batch, as loaded and as mixed, equals the uninterrupted 4-rank run's bit for bit. The weights
are equal up to float rounding only: DDP averages 4 gradients of 2-sample means there, 2 of 4-sample means
here. A resume with another global batch, or on another world size outside ``--mode global``, is refused.
"""
from __future__ import annotations

import os

import pytest
import torch

from dist_cutmix import mix_batch_across_group
from launch import train_plain
from launch.train import load_mnist
from tests.helpers.spawn import run_ranks

SEED = 17
# 32 training images in global batches of 8: 4 batches an epoch, 8 in the run; stopped after batch 5 (mid-epoch 2).
ARGS = ['--train-samples', '32', '--eval-samples', '8', '--width', '4', '--threads', '1', '--device', 'cpu',
        '--epochs', '2', '--seed', str(SEED)]
GLOBAL_BATCH, STEPS, STOP = 8, 8, 5


def _on_four_ranks(rank: int, world: int, folder: str) -> dict:
    per_rank = ['--batch-size', str(GLOBAL_BATCH // world)]
    full = train_plain.main([*ARGS, *per_rank, '--save', os.path.join(folder, 'full.pt')], record=True)
    part = train_plain.main([*ARGS, *per_rank, '--stop-after', str(STOP), '--save', os.path.join(folder, 'part.pt')],
                            record=True)
    return {'full': full['records'], 'part': part['records']}


def _on_two_ranks(rank: int, world: int, folder: str) -> dict:
    part = os.path.join(folder, 'part.pt')
    resumed = train_plain.main([*ARGS, '--batch-size', str(GLOBAL_BATCH // world), '--resume', part,
                                '--save', os.path.join(folder, 'resumed.pt')], record=True)
    try:
        train_plain.main([*ARGS, '--batch-size', str(GLOBAL_BATCH // world // 2), '--resume', part])
        refused = None
    except ValueError as e:
        refused = str(e)
    return {'resumed': resumed, 'refused': refused}


def _global(records_by_rank: list[list[dict]], step: int, key: str) -> torch.Tensor:
    """The global batch of ``step``: every rank's record of it, end to end in rank order."""
    return torch.cat([next(r[key] for r in records if r['step'] == step) for records in records_by_rank])


def test_a_run_checkpointed_on_four_ranks_and_resumed_on_two_mixes_every_later_batch_as_before(tmp_path):
    four = run_ranks(_on_four_ranks, 4, tmp_path, str(tmp_path), deadline_s=240)
    two = run_ranks(_on_two_ranks, 2, tmp_path, str(tmp_path), deadline_s=240)
    full = [r['full'] for r in four]
    resumed = [r['resumed']['records'] for r in two]
    assert two[0]['resumed']['resumed_at'] == STOP and two[0]['resumed']['world_size'] == 2
    assert [[x['step'] for x in r] for r in resumed] == [list(range(STOP, STEPS))] * 2
    assert [len(x['input']) for x in resumed[0]] == [4] * 3 and [len(x['input']) for x in full[0]] == [2] * 8

    # An independent reference for every global batch: one permutation per epoch, cut into consecutive slices,
    # mixed by one process over the whole global batch with the draws of (seed, batch).
    images, labels = load_mnist(0, 32, 8)[0].tensors
    crossed = 0
    for step in range(STOP, STEPS):
        epoch, index = divmod(step, STEPS // 2)
        order = torch.randperm(32, generator=torch.Generator().manual_seed(SEED + epoch))
        take = order[index * GLOBAL_BATCH:(index + 1) * GLOBAL_BATCH]
        one = mix_batch_across_group(images[take], labels[take], seed=SEED, batch=step, num_classes=10)
        for key, want in (('input', images[take]), ('target', labels[take]), ('mixed_input', one.input),
                          ('mixed_target', one.target)):
            assert torch.equal(_global(full, step, key), want), f'4 ranks, step {step}, {key}'
            assert torch.equal(_global(resumed, step, key), want), f'resumed on 2 ranks, step {step}, {key}'
        crossed += int((one.partner_rank != torch.arange(GLOBAL_BATCH) // 4).sum())  # partners over the 2-rank cut
    assert crossed > 0, 'no partner crossed the 2-rank boundary: the test saw no cross-rank mixing'

    # The weights: equal up to rounding (the gradients are averaged in another order), not bit for bit.
    got = torch.load(tmp_path / 'resumed.pt', weights_only=True)
    want = torch.load(tmp_path / 'full.pt', weights_only=True)
    assert got['mixer']['batch'] == want['mixer']['batch'] == STEPS
    for name, tensor in want['model'].items():
        torch.testing.assert_close(got['model'][name], tensor, rtol=1e-4, atol=1e-5, msg=f'weights {name}')
    drift = max(float((got['model'][k] - v).abs().max()) for k, v in want['model'].items())
    print(f'\nweights resumed on 2 ranks against the uninterrupted 4-rank run: largest difference {drift:.2e}')
    for step in range(STOP, STEPS):  # the loss of the global batch: the mean of the ranks' (equal-sized) means
        loss_two, loss_four = (sum(next(x['loss'] for x in r if x['step'] == step) for r in records) / len(records)
                               for records in (resumed, full))
        assert loss_two == pytest.approx(loss_four, rel=1e-4, abs=1e-5), f'step {step}'

    # Another global batch would be another run: refused, naming it.
    assert 'global_batch=4 (checkpoint: 8)' in two[0]['refused'], two[0]['refused']


def test_outside_global_mode_a_resume_on_another_world_size_is_refused(tmp_path):
    # --mode local and none draw (and count) per rank: the world size is part of the run.
    def config(mode: str, batch_size: int, world: int) -> dict:
        return train_plain._run_config(train_plain.parse_args([*ARGS, '--mode', mode, '--batch-size', str(batch_size)]),
                                       world)

    for mode in ('local', 'none'):
        path = tmp_path / f'{mode}.pt'
        torch.save({'config': config(mode, 2, 4), 'mixer': {}}, path)
        with pytest.raises(ValueError, match=r'in world_size=2 \(checkpoint: 4\); resume with the same'):
            train_plain._load(str(path), torch.device('cpu'), config(mode, 4, 2))  # the same global batch of 8
    path = tmp_path / 'global.pt'
    torch.save({'config': config('global', 2, 4), 'mixer': {}}, path)
    assert train_plain._load(str(path), torch.device('cpu'), config('global', 4, 2))['config']['global_batch'] == 8
