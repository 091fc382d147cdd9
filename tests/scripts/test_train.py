"""End-to-end smoke tests of the launch/ entry points, each at a tiny configuration on real data.

What runs where: the command-line paths (``python launch/train.py``, ``composer -n 2
launch/train.py``, ``python launch/visualize.py``, ``python launch/experiment.py``) run as
subprocesses, exactly as a user types them; the other multi-rank checks call ``launch.train.main``
on real gloo ranks through ``tests.spawn.run_ranks`` (fast: torch and composer preloaded).
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

pytest.importorskip('composer', reason='needs the composer extra')
from tests.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
COMPOSER = shutil.which('composer', path=str(Path(PYTHON).parent)) or shutil.which('composer')

# A tiny run: 8 steps of 8 images per rank on 64 training images, scored on 40 held-out ones.
TINY = ['--batch-size', '8', '--train-samples', '64', '--eval-samples', '40', '--threads', '1', '--no-progress-bar']


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f'{" ".join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n'
                                  f'--- stderr\n{proc.stderr[-5000:]}')
    return proc


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
    proc = _run([PYTHON, 'launch/train.py', *TINY, '--duration', '8ba', '--mode', 'local', '--json', str(out)])
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
    proc = _run([PYTHON, 'launch/train.py', *TINY, '--duration', '2ba', '--mode', 'local', '--per-sample',
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
    proc = _run([COMPOSER, '-n', '2', 'launch/train.py', *TINY, '--duration', '4ba', '--mode', 'global',
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
    # The case global mixing exists for: a per-rank batch of 1 (launch/experiment.py runs it).
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

    # launch/loss_spread.py runs its baseline as --mode none --alpha A
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
    from dist_cutmix.functional import label_lambda
    from dist_cutmix.randomness import batch_generator
    from dist_cutmix.spec import MixSpec, sample_mix

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
        assert summary['series']['mix_lambda'] == [float(label_lambda(d.lam)) for d in drawn]
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
    proc = _run([COMPOSER, '-n', '2', 'launch/train.py', *RECIPE, *TINY, '--duration', '3ba', '--device', 'cpu',
                 '--json', str(out)], timeout=300)
    summary = json.loads(out.read_text())
    _check_summary(summary, world_size=2, batches=3)
    assert summary['algorithm'] == 'MixUpCutMix' and summary['label_smoothing'] == 0.1
    assert summary['mixup_alpha'] == 0.8 and summary['cutmix_alpha'] == 1.0 and summary['switch_prob'] == 0.5
    assert 'MixUpCutMix' in proc.stdout and 'world size 2' in proc.stdout
    assert summary['soft_cross_entropy_warned'] == ('less than 1 total probability' in proc.stderr)


# ----------------------------------------------------------------------------- visualize.py


def _mix_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import mix_on_rank

    return mix_on_rank(rank, world_size, 3, 3, 0, 1.0)


def test_visualize_captions_name_the_crop_each_image_received(tmp_path):
    records = run_ranks(_mix_for_picture, 2, tmp_path, deadline_s=60)
    y0, y1, x0, x1 = records[0]['box']
    assert all(r['box'] == records[0]['box'] and r['lam'] == records[0]['lam'] for r in records)
    assert (y1 - y0) * (x1 - x0) > 0
    for rec in records:
        for i in range(rec['mixed'].shape[0]):
            p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
            partner = records[p]['original'][j]
            assert torch.equal(rec['mixed'][i, :, y0:y1, x0:x1], partner[:, y0:y1, x0:x1])
            assert int(rec['partner_label'][i]) == int(records[p]['label'][j])
    assert any(int(r) != rec['rank'] for rec in records for r in rec['partner_rank'])


def _mix_per_sample_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import mix_on_rank

    return mix_on_rank(rank, world_size, 4, 3, 0, 1.0, per_sample=True)


def test_visualize_per_sample_pastes_each_partner_crop_inside_its_own_box(tmp_path):
    records = run_ranks(_mix_per_sample_for_picture, 2, tmp_path, deadline_s=60)
    boxes = torch.cat([r['box'] for r in records])
    assert boxes.shape == (8, 4) and all(r['lam'].shape == (4,) for r in records)
    assert len({tuple(b.tolist()) for b in boxes}) > 1  # not one box for the batch
    for rec in records:
        for i in range(rec['mixed'].shape[0]):
            y0, y1, x0, x1 = (int(v) for v in rec['box'][i])
            p, j = int(rec['partner_rank'][i]), int(rec['partner_index'][i])
            partner, own = records[p]['original'][j], rec['original'][i]
            assert torch.equal(rec['mixed'][i, :, y0:y1, x0:x1], partner[:, y0:y1, x0:x1])
            outside = torch.ones(28, 28, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(rec['mixed'][i, 0][outside], own[0][outside])
            assert float(rec['lam'][i]) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 28 ** 2)
    assert any(int(r) != rec['rank'] for rec in records for r in rec['partner_rank'])


def test_visualize_cli_writes_a_decodable_png(tmp_path):
    from PIL import Image

    out = tmp_path / 'grid.png'
    _run([PYTHON, 'launch/visualize.py', '--out', str(out), '--per-rank', '2', '--dpi', '40'])
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        # figsize (2.3 * per_rank, 2.75 * 2 * world_size) inches at 40 dpi
        assert img.format == 'PNG' and img.size == (184, 440)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    assert int(red.sum()) > 20  # the boxes are outlined


def test_visualize_cli_per_sample_writes_its_own_png(tmp_path):
    from PIL import Image

    from launch.visualize import OUT_PER_SAMPLE, build_parser, default_out

    assert default_out(build_parser().parse_args(['--per-sample'])) == OUT_PER_SAMPLE
    out = tmp_path / 'grid.png'
    proc = _run([PYTHON, 'launch/visualize.py', '--per-sample', '--out', str(out), '--per-rank', '2', '--dpi', '40'])
    assert 'per-sample λ from' in proc.stdout
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (184, 440)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    assert int(red.sum()) > 20


def _mix_switch_for_picture(rank: int, world_size: int) -> dict:
    from launch.visualize import build_parser, mix_on_rank, switch_spec

    args = build_parser().parse_args(['--switch'])
    record = mix_on_rank(rank, world_size, 5, 8, 0, args.alpha, per_sample=True, spec=switch_spec(args))
    record['spec'] = switch_spec(args)
    return record


def test_visualize_switch_shows_the_engines_images_and_names_each_method(tmp_path):
    from PIL import Image

    from dist_cutmix.randomness import batch_generator
    from dist_cutmix.spec import MixSpec, sample_mix
    from launch.train import MNIST_MEAN, MNIST_STD
    from launch.visualize import OUT_SWITCH, build_parser, default_out, draw_grid, panels

    assert default_out(build_parser().parse_args(['--switch'])) == OUT_SWITCH
    records = run_ranks(_mix_switch_for_picture, 2, tmp_path, deadline_s=120)
    # The reference: the draw of the global batch of 10 (rank 0's 5 images, then rank 1's), applied by hand.
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, prob=0.7, switch_prob=0.5, label_smoothing=0.1)
    draw = sample_mix(spec, 10, 28, 28, per_sample=True, generator=batch_generator(8, 0, 'group', 0))
    originals = torch.cat([r['original'] for r in records])
    shown = {(p['rank'], p['index']): p for p in panels(records) if p['key'] == 'mixed'}
    seen = set()
    for g in range(10):
        rank, i = divmod(g, 5)
        y0, y1, x0, x1 = (int(v) for v in draw.boxes[g])
        w = float(draw.weights[g])
        own, partner = originals[g], originals[int(draw.indices[g])]
        expected = own.clone()
        expected[:, y0:y1, x0:x1] = (1 - w) * own[:, y0:y1, x0:x1] + w * partner[:, y0:y1, x0:x1]
        method = 'unmixed' if (y1 - y0) * (x1 - x0) == 0 or w == 0 else 'CutMix' if w == 1 else 'MixUp'
        seen.add(method)
        rec, panel = records[rank], shown[(rank, i)]
        torch.testing.assert_close(rec['mixed'][i], expected, rtol=0, atol=1e-6)
        assert torch.equal(panel['image'], (rec['mixed'][i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1))
        assert panel['method'] == rec['method'][i] == method
        lam = 1 - w * (y1 - y0) * (x1 - x0) / 784
        if method == 'unmixed':
            assert 'unmixed, λ=1' in panel['title'] and panel['outline'] is None
        else:
            assert f'\n{method} λ={lam:.2f}\n' in panel['title']
            assert panel['outline'] == ((y0, y1, x0, x1), 'red' if method == 'CutMix' else 'tab:orange')
            p, j = divmod(int(draw.indices[g]), 5)
            assert f'← rank {p} #{j}' in panel['title']
    assert seen == {'CutMix', 'MixUp', 'unmixed'}
    png = draw_grid(records, str(tmp_path / 'switch.png'), dpi=40)
    with Image.open(png) as img:
        # figsize (2.3 * 5, 3.0 * 2 * 2) inches at 40 dpi
        assert img.format == 'PNG' and img.size == (460, 480)
        rgb = torch.tensor(list(img.convert('RGB').getdata()))
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    orange = (rgb[:, 0] > 220) & (rgb[:, 1] > 100) & (rgb[:, 1] < 160) & (rgb[:, 2] < 60)
    assert int(red.sum()) > 20 and int(orange.sum()) > 20  # CutMix boxes and MixUp frames are both drawn


# ----------------------------------------------------------------------------- experiment.py


def test_experiment_cli_at_a_tiny_configuration(tmp_path):
    out = tmp_path / 'exp'
    proc = _run([PYTHON, 'launch/experiment.py', '--world-size', '2', '--modes', 'local', 'global',
                 '--batch-sizes', '1', '2', '--seeds', '0', '--train-samples', '8', '--eval-samples', '20',
                 '--epochs', '1', '--out', str(out)], timeout=150)
    payload = json.loads(out.with_suffix('.json').read_text())
    assert payload['complete'] is True and len(payload['runs']) == 4
    assert {(r['mode'], r['batch_size_per_rank']) for r in payload['runs']} == {
        ('local', 1), ('global', 1), ('local', 2), ('global', 2)}
    assert {r['samples_seen'] for r in payload['runs']} == {8}  # the same samples for every configuration
    assert all(r['world_size'] == 2 and 0.0 <= r['eval_accuracy'] <= 1.0 for r in payload['runs'])
    table = out.with_suffix('.md').read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith('| ') and ln[2].isdigit()]
    assert len(rows) == 4 and '| global |' in table and '±' in table
    assert table in proc.stdout


# ----------------------------------------------------------------------------- loss_spread.py


def test_loss_spread_statistics_on_a_known_series():
    from launch.loss_spread import spread

    s = spread([1.0, 2.0, 4.0, 7.0])
    assert s['mean'] == pytest.approx(3.5)
    assert s['std'] == pytest.approx(torch.tensor([1.0, 2.0, 4.0, 7.0]).std().item())
    assert s['diff_std'] == pytest.approx(1.0)  # differences 1, 2, 3
    assert spread([5.0]) == {'mean': 5.0, 'std': None, 'diff_std': None}


def test_loss_spread_quick_writes_json_table_and_plot(tmp_path):
    from PIL import Image

    out, png = tmp_path / 'spread', tmp_path / 'spread.png'
    proc = _run([PYTHON, 'launch/loss_spread.py', '--quick', '--out', str(out), '--plot', str(png)], timeout=150)
    payload = json.loads(out.with_suffix('.json').read_text())
    assert payload['complete'] is True and payload['setup']['quick'] is True
    runs = {r['variant']: r for r in payload['runs']}
    assert set(runs) == {'batch', 'per-sample', 'none'} and len(payload['runs']) == 3
    for variant, r in runs.items():
        assert r['world_size'] == 2 and r['global_batch_size'] == 16 and r['steps'] == 6 and len(r['loss']) == 6
        assert len(r['lambda']) == (0 if variant == 'none' else 6)
        assert set(r['stats']) >= {'loss_std', 'loss_diff_std', 'lambda_std', 'eval_accuracy', 'wall_s'}
    # Batch mode: every rank logs the one λ; per-sample: each rank its own samples' mean.
    assert runs['batch']['lambda'] == runs['batch']['lambda_rank0']
    assert runs['per-sample']['stats']['lambda_std'] < runs['batch']['stats']['lambda_std']
    summary = payload['summary']
    assert set(summary['by_variant']) == {'batch', 'per-sample', 'none'}
    assert set(summary['per_sample_over_batch']) == {'loss_std', 'loss_diff_std', 'loss_diff_std_2nd_half',
                                                     'lambda_std'}
    assert 0.0 <= summary['batch_loss_diff_r2_on_label_entropy'] <= 1.0
    assert summary['expected_lambda_std']['global_batch_mean_std'] == pytest.approx(
        summary['expected_lambda_std']['per_sample_lambda_std'] / 4)
    table = out.with_suffix('.md').read_text()
    assert table in proc.stdout and '| per-sample |' in table and '±' in table
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size == (880, 1045)
