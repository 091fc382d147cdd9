"""launch/train.py end to end at a tiny configuration on real data: the single-process command, ``composer -n 2``,
FSDP2 on CPU, one image per rank, resuming from a checkpoint, and the MixUp/timm-recipe flags.

The command lines run as subprocesses, exactly as a user types them; the other multi-rank checks call
``launch.train.main`` on real gloo ranks through ``tests.helpers.spawn.run_ranks`` (fast: torch and composer
preloaded).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from tests.helpers.scripts import PYTHON, run_script
from tests.helpers.spawn import run_ranks

COMPOSER = shutil.which('composer', path=str(Path(PYTHON).parent)) or shutil.which('composer')

# A tiny run: 8 steps of 8 images per rank on 64 training images, scored on 40 held-out ones.
TINY = ['--batch-size', '8', '--train-samples', '64', '--eval-samples', '40', '--threads', '1', '--no-progress-bar']


def _check_summary(summary: dict, *, world_size: int, batches: int, batch_size: int = 8) -> None:
    assert summary['world_size'] == world_size
    assert summary['batches'] == batches
    assert summary['samples_seen'] == batches * batch_size * world_size
    assert summary['global_batch_size'] == batch_size * world_size
    assert 0.0 <= summary['eval_accuracy'] <= 1.0
    assert summary['eval_samples'] == 40
    assert summary['eval_curve'] and summary['eval_curve'][-1]['batch'] == batches
    assert summary['eval_curve'][-1]['accuracy'] == pytest.approx(summary['eval_accuracy'])


# ----------------------------------------------------------------------------- train.py


def test_single_process_cli_trains_logs_and_writes_a_summary(tmp_path):
    out = tmp_path / 'summary.json'
    proc = run_script([PYTHON, 'launch/train.py', *TINY, '--duration', '8ba', '--mode', 'local', '--json', str(out)])
    summary = json.loads(out.read_text())
    _check_summary(summary, world_size=1, batches=8)
    assert summary['mode'] == 'local' and summary['device'] == ('gpu' if torch.cuda.is_available() else 'cpu')
    # CutMix ran and the soft-target train accuracy was logged (a fraction, not the 0.0 of a stock metric).
    assert 0.0 < summary['cutmix_lambda_mean'] < 1.0
    assert 0.0 <= summary['train_soft_accuracy'] <= 1.0
    assert summary['cutmix_cross_rank_fraction_mean'] is None  # local mode logs no cross-rank share
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('[launch/train]')]
    assert len(line) == 1 and 'eval accuracy' in line[0] and 'mode local' in line[0] and 'world size 1' in line[0]
    # the script no longer filters Composer's soft cross-entropy warning: the mixed targets never trigger it
    assert 'less than 1 total probability' not in proc.stdout + proc.stderr


def test_per_sample_flag_reaches_cutmix_and_the_summary(tmp_path):
    out = tmp_path / 'summary.json'
    proc = run_script([PYTHON, 'launch/train.py', *TINY, '--duration', '2ba', '--mode', 'local', '--per-sample',
                 '--json', str(out)])
    summary = json.loads(out.read_text())
    _check_summary(summary, world_size=1, batches=2)
    assert summary['per_sample'] is True
    # The logged λ is the mean of 8 per-sample label weights, each a multiple of 2**-10.
    assert 0.0 < summary['cutmix_lambda_mean'] < 1.0
    assert 'mode local (per-sample)' in proc.stdout


def test_per_sample_is_off_by_default():
    from launch.train import parse_args

    assert parse_args([]).per_sample is False and parse_args(['--per-sample']).per_sample is True


@pytest.mark.skipif(COMPOSER is None, reason='the composer launcher is not installed')
def test_two_ranks_under_the_real_composer_launcher(tmp_path):
    out = tmp_path / 'summary.json'
    proc = run_script([COMPOSER, '-n', '2', 'launch/train.py', *TINY, '--duration', '4ba', '--mode', 'global',
                 '--device', 'cpu', '--json', str(out)])
    summary = json.loads(out.read_text())
    _check_summary(summary, world_size=2, batches=4)
    assert summary['mode'] == 'global' and summary['device'] == 'cpu'
    # With 2 ranks, about half of the partners live on the other rank.
    assert 0.0 < summary['cutmix_cross_rank_fraction_mean'] < 1.0
    assert 'world size 2' in proc.stdout


def _train_on_rank(rank: int, world_size: int, argv: list[str]) -> dict:
    from launch.train import main

    return main(argv)


def test_two_ranks_with_fsdp2_on_cpu(tmp_path):
    summaries = run_ranks(_train_on_rank, 2, tmp_path,
                          [*TINY, '--duration', '4ba', '--fsdp', '--mode', 'global', '--device', 'cpu'], deadline_s=90)
    for summary in summaries:
        _check_summary(summary, world_size=2, batches=4)
        assert summary['fsdp'] is True
    # Metrics are synced across ranks: both ranks report the same numbers.
    assert summaries[0]['eval_accuracy'] == summaries[1]['eval_accuracy']
    assert summaries[0]['cutmix_cross_rank_fraction_mean'] == summaries[1]['cutmix_cross_rank_fraction_mean'] > 0


def test_global_mixing_with_one_image_per_rank(tmp_path):
    # The case global mixing exists for: a per-rank batch of 1 (launch/experiments/experiment.py runs it).
    # No --device: auto must take the CPU in a gloo rank, on a machine with GPUs too (test_gpu_ready.py).
    summaries = run_ranks(_train_on_rank, 2, tmp_path,
                          [*TINY, '--batch-size', '1', '--duration', '2ba', '--mode', 'global', '--seed', '2'],
                          deadline_s=60)
    for summary in summaries:
        _check_summary(summary, world_size=2, batches=2, batch_size=1)
        assert summary['device'] == 'cpu'
        assert summary['cutmix_cross_rank_fraction_mean'] == 1.0  # with one image per rank, every partner is remote


def _checkpoint_and_resume(rank: int, world_size: int, folder: str, extra: list[str]) -> tuple[dict, dict]:
    from launch.train import main

    common = [*TINY, '--mode', 'global', '--seed', '5', '--duration', '6ba', '--device', 'cpu', *extra]
    # A 6-batch run checkpointed every 3 batches; then a run that resumes from the middle checkpoint,
    # as after a crash at batch 4 (same --duration: the LR schedule spans the whole run).
    full = main([*common, '--save-folder', folder, '--save-interval', '3ba'])
    resumed = main([*common, '--resume', str(Path(folder) / 'ep0-ba3-rank0.pt')])
    return full, resumed


@pytest.mark.parametrize('extra', [[], ['--fsdp']], ids=['ddp', 'fsdp2'])
def test_resume_from_a_checkpoint_continues_the_run_exactly(tmp_path, extra):
    folder = tmp_path / 'ckpt'
    results = run_ranks(_checkpoint_and_resume, 2, tmp_path, str(folder), extra, deadline_s=90)
    assert (folder / 'ep0-ba3-rank0.pt').is_file() and (folder / 'latest-rank0.pt').exists()
    for full, resumed in results:
        assert full['checkpoint'] == str(folder / 'latest-rank0.pt')
        assert resumed['resumed_from'] == str(folder / 'ep0-ba3-rank0.pt')
        _check_summary(full, world_size=2, batches=6)
        _check_summary(resumed, world_size=2, batches=6)
        assert full['fsdp'] is resumed['fsdp'] is bool(extra)
        # Weights, optimizer, schedule, data order and CutMix's draws all pick up where they stopped.
        assert resumed['train_loss'] == pytest.approx(full['train_loss'], rel=1e-5)
        assert resumed['eval_accuracy'] == full['eval_accuracy']


# ----------------------------------------------------------------------------- train.py: MixUp and timm's recipe

RECIPE = ['--mode', 'global', '--mixup-alpha', '0.8', '--cutmix-alpha', '1.0', '--switch-prob', '0.5',
          '--label-smoothing', '0.1']


@pytest.mark.parametrize('argv, kind, spec, stop_at', [
    ([], 'CutMix', dict(cutmix_alpha=1.0, mixup_alpha=0.0, label_smoothing=0.0), None),
    (['--alpha', '0.5', '--stop-at', '3ba'], 'CutMix', dict(cutmix_alpha=0.5, mixup_alpha=0.0), '3ba'),
    (['--mixup-alpha', '0.3'], 'MixUp', dict(cutmix_alpha=0.0, mixup_alpha=0.3, mixup_fold=True), None),
    (RECIPE, 'MixUpCutMix', dict(cutmix_alpha=1.0, mixup_alpha=0.8, switch_prob=0.5, prob=1.0, label_smoothing=0.1,
                                 mixup_fold=False), None),
    (['--mixup-alpha', '0.4', '--cutmix-alpha', '0.7', '--switch-prob', '0.3', '--mix-prob', '0.6',
      '--label-smoothing', '0.2', '--stop-at', '0.5dur', '--per-sample'], 'MixUpCutMix',
     dict(cutmix_alpha=0.7, mixup_alpha=0.4, switch_prob=0.3, prob=0.6, label_smoothing=0.2), '0.5dur'),
    (['--mixup-alpha', '0.8', '--label-smoothing', '0.1'], 'MixUpCutMix',  # MixUp alone, smoothed
     dict(cutmix_alpha=0.0, mixup_alpha=0.8, label_smoothing=0.1), None),
    (['--label-smoothing', '0.1'], 'MixUpCutMix', dict(cutmix_alpha=1.0, mixup_alpha=0.0, label_smoothing=0.1), None),
    (['--alpha', '0.5', '--mixup-alpha', '0.8'], 'MixUpCutMix', dict(cutmix_alpha=0.5, mixup_alpha=0.8), None),
])
def test_mixing_flags_reach_the_algorithm(argv, kind, spec, stop_at):
    from launch.train import build_algorithm, parse_args

    args = parse_args(argv)
    algorithm = build_algorithm(args)
    assert type(algorithm).__name__ == kind and args.algorithm == kind
    assert {k: getattr(algorithm.spec, k) for k in spec} == spec
    assert algorithm.mode == args.mode and algorithm.per_sample is ('--per-sample' in argv)
    assert (None if algorithm.stop_at is None else algorithm.stop_at.to_timestring()) == stop_at


def test_mode_none_builds_no_algorithm_and_keeps_alpha():
    from launch.train import build_algorithm, parse_args

    # launch/experiments/loss_spread.py runs its baseline as --mode none --alpha A
    args = parse_args(['--mode', 'none', '--alpha', '0.5'])
    assert build_algorithm(args) is None and args.alpha == 0.5


@pytest.mark.parametrize('argv, words', [
    (['--mix-prob', '1.5'], ['prob', '1.5', '--mix-prob']),
    (['--switch-prob', '-0.1', '--mixup-alpha', '1', '--cutmix-alpha', '1'], ['switch_prob', '-0.1']),
    (['--label-smoothing', '1'], ['label_smoothing', '1']),
    (['--label-smoothing', 'nan'], ['label_smoothing', 'nan']),
    (['--mixup-alpha', '-1', '--label-smoothing', '0.1'], ['mixup_alpha', '-1']),
    (['--cutmix-alpha', 'inf'], ['cutmix_alpha', 'inf']),
    (['--mixup-alpha', '-0.5'], ['alpha', '-0.5', '--mixup-alpha']),
    (['--alpha', '-1'], ['alpha', '-1']),
    (['--stop-at', 'soon'], ['stop_at', 'soon']),
    (['--stop-at', '5tok', '--mixup-alpha', '0.2'], ['stop_at', '5tok']),
    (['--switch-prob', '0.5'], ['--switch-prob', '--mixup-alpha']),  # nothing to switch between
    (['--switch-prob', '0.5', '--mixup-alpha', '0.8'], ['--switch-prob', '--cutmix-alpha 0.0']),
    (['--alpha', '1', '--cutmix-alpha', '0.5'], ['--alpha', '--cutmix-alpha']),
    (['--mode', 'none', '--label-smoothing', '0.1'], ['--mode none', '--label-smoothing']),
    (['--mode', 'none', '--stop-at', '3ba'], ['--mode none', '--stop-at']),
    (['--mix-prob', 'half'], ['--mix-prob', 'half']),
])
def test_bad_mixing_flags_are_argparse_errors_naming_them(argv, words, capsys):
    from launch.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'error:' in err and all(w in err for w in words), err


def _recipe_on_rank(rank: int, world_size: int, argv: list[str]) -> dict:
    from launch.train import main

    return main(argv, series=True)


def test_timm_recipe_on_two_gloo_ranks_mixes_as_drawn(tmp_path):
    from dist_cutmix import MixSpec, sample_mix
    from dist_cutmix.draw import on_label_grid
    from dist_cutmix.randomness import batch_generator

    summaries = run_ranks(_recipe_on_rank, 2, tmp_path, [*TINY, *RECIPE, '--duration', '6ba', '--seed', '3'],
                          deadline_s=180)
    spec = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    # Independently of the Trainer: the draw every rank makes for global batch b (2 ranks x 8 images).
    drawn = [sample_mix(spec, 16, 28, 28, generator=batch_generator(3, b, 'group', 0)) for b in range(6)]
    kinds = {'cutmix' if d.weight == 1 else 'mixup' for d in drawn}
    assert kinds == {'cutmix', 'mixup'}, 'seed 3 should switch within 6 batches; pick another seed'
    for summary in summaries:
        _check_summary(summary, world_size=2, batches=6)
        assert summary['algorithm'] == 'MixUpCutMix' and summary['mode'] == 'global'
        assert (summary['mixup_alpha'], summary['cutmix_alpha'], summary['switch_prob'], summary['mix_prob'],
                summary['label_smoothing'], summary['stop_at']) == (0.8, 1.0, 0.5, 1.0, 0.1, None)
        # the algorithm logged, batch by batch, the λ of the switched draw (MixUp or CutMix)
        assert summary['series']['mix_lambda'] == [float(on_label_grid(d.lam)) for d in drawn]
        assert 0.0 < summary['mix_cross_rank_fraction_mean'] < 1.0
        assert summary['cutmix_lambda_mean'] is None  # MixUpCutMix logs under its own name
        assert isinstance(summary['soft_cross_entropy_warned'], bool)


def test_stop_at_stops_the_mixing_in_a_real_run(tmp_path):
    # after 2 batches nothing is mixed: the logged λ is 1 from batch 3 on (label smoothing stays)
    summaries = run_ranks(_recipe_on_rank, 2, tmp_path, [*TINY, *RECIPE, '--duration', '4ba', '--stop-at', '2ba'],
                          deadline_s=180)
    for summary in summaries:
        assert summary['stop_at'] == '2ba'
        lams = summary['series']['mix_lambda']
        assert len(lams) == 4 and all(lam < 1 for lam in lams[:2]) and lams[2:] == [1.0, 1.0]


@pytest.mark.skipif(COMPOSER is None, reason='the composer launcher is not installed')
def test_timm_recipe_line_under_the_composer_launcher_shows_composers_warning(tmp_path):
    # The README's recipe line, as a user types it. Label smoothing makes Composer's soft_cross_entropy
    # warn "less than 1 total probability" in most batches (float32 rows (1-ε)·y + ε/C sum a few ulps
    # under 1, as with Composer's own LabelSmoothing): the script must show it, never filter it, and
    # the summary must say whether it came.
    out = tmp_path / 'summary.json'
    proc = run_script([COMPOSER, '-n', '2', 'launch/train.py', *RECIPE, *TINY, '--duration', '3ba', '--device', 'cpu',
                 '--json', str(out)], timeout=300)
    summary = json.loads(out.read_text())
    _check_summary(summary, world_size=2, batches=3)
    assert summary['algorithm'] == 'MixUpCutMix' and summary['label_smoothing'] == 0.1
    assert summary['mixup_alpha'] == 0.8 and summary['cutmix_alpha'] == 1.0 and summary['switch_prob'] == 0.5
    assert 'MixUpCutMix' in proc.stdout and 'world size 2' in proc.stdout
    assert summary['soft_cross_entropy_warned'] == ('less than 1 total probability' in proc.stderr)
