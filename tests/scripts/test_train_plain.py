"""launch/train_plain.py: global CutMix in a plain DDP loop, without Composer.

Two real ``torchrun`` gloo ranks mix as one process mixing the concatenated batch; a run stopped
and resumed from its own checkpoint trains and mixes bit for bit as the uninterrupted one; the
single-process command runs and logs the soft-target train accuracy. Nothing here needs Composer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

from dist_cutmix import functional as F
from dist_cutmix.draw import on_label_grid
from dist_cutmix.mixer import mix_batch_across_group
from dist_cutmix.randomness import batch_generator
from launch import train_plain
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = shutil.which('torchrun', path=str(Path(PYTHON).parent))
# 64 training images, 8 a rank a step: 4 steps an epoch on 2 ranks, 8 on one.
TINY = ['--batch-size', '8', '--train-samples', '64', '--eval-samples', '40', '--threads', '1', '--device', 'cpu']
SEED = 17


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    return env


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f'{" ".join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n'
                                  f'--- stderr\n{proc.stderr[-5000:]}')
    return proc


def _pixel_reference(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One global CutMix of the concatenated batch from its parameters, slice by slice: images, targets, partners."""
    n, _, h, w = x.shape
    params = F.sample_params(n, h, w, generator=batch_generator(SEED, step, 'group', 0))
    y0, y1, x0, x1 = params.box
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[params.indices][..., y0:y1, x0:x1]
    own = on_label_grid(params.lam)
    target = own * TF.one_hot(y, 10).float() + (1 - own) * TF.one_hot(y[params.indices], 10).float()
    return mixed, target, params.indices


@pytest.mark.skipif(TORCHRUN is None, reason='torchrun is not installed beside this Python')
def test_two_torchrun_ranks_mix_as_one_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / 'ranks'
    out.mkdir()
    _run([TORCHRUN, '--standalone', '--nproc_per_node', '2', '-m', 'tests.helpers.plain_rank', str(out),
          *TINY, '--epochs', '1', '--json', str(tmp_path / 'summary.json')])
    ranks = [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(2)]
    assert [s['world_size'] for s in ranks] == [2, 2] and [s['steps'] for s in ranks] == [4, 4]
    crossed = 0
    for step in range(4):
        recs = [s['records'][step] for s in ranks]
        assert [r['step'] for r in recs] == [step, step]
        assert not torch.equal(recs[0]['input'], recs[1]['input'])  # each rank trains on its own shard
        x = torch.cat([r['input'] for r in recs])
        y = torch.cat([r['target'] for r in recs])
        mixed = torch.cat([r['mixed_input'] for r in recs])
        target = torch.cat([r['mixed_target'] for r in recs])
        one = mix_batch_across_group(x, y, seed=SEED, batch=step, num_classes=10)  # one process, no group
        assert torch.equal(mixed, one.input) and torch.equal(target, one.target), f'step {step}'
        ref_x, ref_y, partners = _pixel_reference(x, y, step)
        assert torch.equal(mixed, ref_x) and torch.equal(target, ref_y), f'step {step}'
        crossed += int(((partners >= 8) != (torch.arange(16) >= 8)).sum())
    assert crossed > 0, 'no crop crossed ranks: the test saw no global mixing'
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['mode'] == 'global' and summary['steps'] == 4
    assert 0 < summary['cutmix_cross_rank_fraction_mean'] < 1
    assert 0 <= summary['train_soft_accuracy'] <= 1 and 0 <= summary['eval_accuracy'] <= 1


def _resume_on_rank(rank: int, world: int, folder: str) -> dict:
    argv = [*TINY, '--epochs', '2']
    checkpoint = os.path.join(folder, 'last.pt')
    full = train_plain.main(argv, record=True)
    part = train_plain.main([*argv, '--stop-after', '5', '--save', checkpoint], record=True)
    resumed = train_plain.main([*argv, '--resume', checkpoint], record=True)
    try:
        train_plain.main([*argv, '--resume', checkpoint, '--seed', '3'])
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    return {'full': full, 'part': part, 'resumed': resumed, 'mismatch': mismatch}


def test_resumed_run_mixes_and_trains_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    results = run_ranks(_resume_on_rank, 2, tmp_path, str(tmp_path), deadline_s=240)
    for rank, r in enumerate(results):
        full, part, resumed = r['full']['records'], r['part']['records'], r['resumed']['records']
        assert [x['step'] for x in full] == list(range(8))
        assert [x['step'] for x in part] == list(range(5)) and r['part']['steps'] == 5
        # stopped mid-epoch 2: the resume starts at batch 5, with that batch's images and mixing
        assert r['resumed']['resumed_at'] == 5 and [x['step'] for x in resumed] == [5, 6, 7]
        for ran, ref in [*zip(part, full[:5], strict=True), *zip(resumed, full[5:], strict=True)]:
            for key in ('input', 'target', 'mixed_input', 'mixed_target'):
                assert torch.equal(ran[key], ref[key]), f'rank {rank}, step {ref["step"]}, {key}'
            assert ran['loss'] == ref['loss'], f'rank {rank}, step {ref["step"]}: the weights differ'
        assert r['resumed']['eval_accuracy'] == r['full']['eval_accuracy']
        assert 'seed=3 (checkpoint: 17)' in r['mismatch']
    # every batch, of both epochs, is the global mix of the two ranks' batches drawn from (seed, batch index)
    for step in range(8):
        recs = [r['full']['records'][step] for r in results]
        x, y = torch.cat([r['input'] for r in recs]), torch.cat([r['target'] for r in recs])
        ref_x, ref_y, _ = _pixel_reference(x, y, step)
        assert torch.equal(torch.cat([r['mixed_input'] for r in recs]), ref_x), f'step {step}'
        assert torch.equal(torch.cat([r['mixed_target'] for r in recs]), ref_y), f'step {step}'


def test_single_process_command_trains_and_logs_the_soft_train_accuracy(tmp_path):
    out = tmp_path / 'summary.json'
    proc = _run([PYTHON, 'launch/train_plain.py', *TINY, '--epochs', '1', '--json', str(out)])
    summary = json.loads(out.read_text())
    assert summary['world_size'] == 1 and summary['steps'] == summary['total_steps'] == 8
    assert summary['device'] == 'cpu' and summary['mode'] == 'global'
    assert 0.0 < summary['cutmix_lambda_mean'] < 1.0 and summary['cutmix_cross_rank_fraction_mean'] == 0.0
    # a soft-target accuracy: a fraction of the mixed labels' mass, not the 0.0 of a stock metric on soft targets
    assert 0.0 < summary['train_soft_accuracy'] < 1.0
    epochs = [line for line in proc.stdout.splitlines() if line.startswith('[launch/train_plain] epoch')]
    assert len(epochs) == 1 and 'train soft accuracy' in epochs[0] and 'eval accuracy' in epochs[0]
    assert f'torch {torch.__version__}' in proc.stdout


@pytest.mark.parametrize('argv, match', [
    (['--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--alpha', '-1'], '--alpha must be >= 0, got -1.0'),
    (['--stop-after', '0'], '--stop-after must be >= 1, got 0'),
    (['--mode', 'node'], "invalid choice: 'node'"),
])
def test_bad_arguments_are_refused_naming_the_value(argv, match, capsys):
    with pytest.raises(SystemExit):
        train_plain.parse_args(argv)
    assert match in capsys.readouterr().err
